"""fnlayers: pure-function neural-network layers for JAX with Caffe's exact semantics."""

from fnlayers import init
from fnlayers.conv import (
    col2im,
    conv2d,
    conv_output_shape,
    conv_transpose2d,
    conv_transpose_output_shape,
    im2col,
)
from fnlayers.layers import (
    Conv2D,
    Deconv2D,
    Dense,
    Flatten,
    Lambda,
    Layer,
    parallel,
    serial,
    shared,
)
from fnlayers.linear import dense, flatten

__version__ = "0.1.0"

__all__ = [
    "Conv2D",
    "Deconv2D",
    "Dense",
    "Flatten",
    "Lambda",
    "Layer",
    "col2im",
    "conv2d",
    "conv_output_shape",
    "conv_transpose2d",
    "conv_transpose_output_shape",
    "dense",
    "flatten",
    "im2col",
    "init",
    "parallel",
    "serial",
    "shared",
]
