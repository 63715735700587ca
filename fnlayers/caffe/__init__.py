"""Caffe import: prototxt nets (and ``.caffemodel`` weights) as :func:`fnlayers.graph` models,
with no protobuf dependency (:mod:`fnlayers.caffe.prototxt` parses text format,
:mod:`fnlayers.caffe.wire` decodes the binary wire format)."""

from fnlayers.caffe.net import CaffeNet, load_net
from fnlayers.caffe.prototxt import PrototxtError, parse

__all__ = ["CaffeNet", "PrototxtError", "load_net", "parse"]
