"""Caffe on JAX: prototxt nets (current or V1 format) and ``.caffemodel`` weights as
:func:`fnlayers.graph` models and back, solver prototxts, Caffe's data layers as batch
sources, and Caffe's training loop (the ``fnlayers`` command), with no protobuf dependency
(:mod:`fnlayers.caffe.prototxt` parses and writes text format, :mod:`fnlayers.caffe.wire`
decodes and encodes the binary wire format)."""

from fnlayers.caffe.data import DataSource, data_source, write_lmdb
from fnlayers.caffe.datum import Datum, read_binaryproto, write_binaryproto
from fnlayers.caffe.net import CaffeNet, load_net, save_caffemodel, to_prototxt, upgrade_v1
from fnlayers.caffe.prototxt import PrototxtError, parse
from fnlayers.caffe.solver import CaffeSolver, NetState, TestNet, load_solver

__all__ = [
    "CaffeNet", "CaffeSolver", "DataSource", "Datum", "NetState", "PrototxtError", "TestNet",
    "data_source", "load_net", "load_solver", "parse", "read_binaryproto", "save_caffemodel",
    "to_prototxt", "upgrade_v1", "write_binaryproto", "write_lmdb",
]  # fmt: skip
