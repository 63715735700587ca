"""Caffe import and export: prototxt nets (current or V1 format) and ``.caffemodel`` weights
as :func:`fnlayers.graph` models, and back, with no protobuf dependency
(:mod:`fnlayers.caffe.prototxt` parses and writes text format, :mod:`fnlayers.caffe.wire`
decodes and encodes the binary wire format)."""

from fnlayers.caffe.net import CaffeNet, load_net, save_caffemodel, to_prototxt, upgrade_v1
from fnlayers.caffe.prototxt import PrototxtError, parse

__all__ = [
    "CaffeNet", "PrototxtError", "load_net", "parse", "save_caffemodel", "to_prototxt",
    "upgrade_v1",
]  # fmt: skip
