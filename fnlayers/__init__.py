"""fnlayers: pure-function neural-network layers for JAX with Caffe's exact semantics.

Ops (``conv2d``, ``max_pool``, ``batch_norm``, ...) are plain functions of arrays; layers
(``Conv2D``, ``MaxPool``, ``BatchNorm``, ...) are ``(init, apply)`` pairs composed with
``serial``/``parallel``/``shared``, or wired as a network of named blobs with ``graph``.
Submodules: ``caffe`` (Caffe nets, caffemodels, solvers and data layers; the ``fnlayers``
command),
``catalogue`` and ``tensor_ops`` (the rest of Caffe's layers and their ops),
``init`` (Caffe fillers), ``losses``, ``optim`` (Caffe's solvers), ``schedules`` (Caffe's
learning-rate policies), ``models`` (the model zoo),
``train`` (jit-compiled steps and ``fit``), ``precision`` (mixed precision and loss scaling),
``distributed`` (data parallelism over a mesh),
``checkpoint``, ``data``.
"""

from fnlayers import (
    catalogue,
    checkpoint,
    data,
    diagnostics,
    distributed,
    init,
    losses,
    models,
    optim,
    precision,
    schedules,
    tensor_ops,
    train,
)
from fnlayers.activations import elu, maxout, prelu, relu, sigmoid, tanh
from fnlayers.conv import (
    col2im,
    conv2d,
    conv_output_shape,
    conv_transpose2d,
    conv_transpose_output_shape,
    im2col,
)
from fnlayers.dropout import dropout
from fnlayers.graphs import Concat, Eltwise, graph
from fnlayers.layers import (
    ELU,
    LRN,
    AvgPool,
    BatchNorm,
    Container,
    Conv2D,
    Deconv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    Lambda,
    Layer,
    LayerNode,
    Maxout,
    MaxPool,
    PReLU,
    ReLU,
    Sigmoid,
    StochasticPool,
    Tanh,
    container_layer,
    layer_shapes,
    parallel,
    param_mults,
    serial,
    shared,
    summary,
    walk,
)
from fnlayers.linear import dense, flatten
from fnlayers.losses import (
    accuracy,
    contrastive,
    euclidean,
    sigmoid_cross_entropy,
    softmax_cross_entropy,
)
from fnlayers.normalization import batch_norm, batch_norm_state, lrn
from fnlayers.pooling import (
    avg_pool,
    global_avg_pool,
    global_max_pool,
    max_pool,
    pool_output_shape,
    pool_output_size,
    stochastic_pool,
)

__version__ = "0.1.0"

__all__ = [
    "ELU",
    "LRN",
    "AvgPool",
    "BatchNorm",
    "Concat",
    "Container",
    "Conv2D",
    "Deconv2D",
    "Dense",
    "Dropout",
    "Eltwise",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "Lambda",
    "Layer",
    "LayerNode",
    "MaxPool",
    "Maxout",
    "PReLU",
    "ReLU",
    "Sigmoid",
    "StochasticPool",
    "Tanh",
    "accuracy",
    "avg_pool",
    "batch_norm",
    "batch_norm_state",
    "caffe",
    "catalogue",
    "checkpoint",
    "col2im",
    "container_layer",
    "contrastive",
    "conv2d",
    "conv_output_shape",
    "conv_transpose2d",
    "conv_transpose_output_shape",
    "data",
    "dense",
    "diagnostics",
    "distributed",
    "dropout",
    "elu",
    "euclidean",
    "flatten",
    "global_avg_pool",
    "global_max_pool",
    "graph",
    "im2col",
    "init",
    "layer_shapes",
    "losses",
    "lrn",
    "max_pool",
    "maxout",
    "models",
    "optim",
    "parallel",
    "param_mults",
    "pool_output_shape",
    "pool_output_size",
    "precision",
    "prelu",
    "relu",
    "schedules",
    "serial",
    "shared",
    "sigmoid",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "stochastic_pool",
    "summary",
    "tanh",
    "tensor_ops",
    "train",
    "walk",
]


def __getattr__(name: str):
    # fnlayers.caffe (Caffe import) builds on the whole library and nothing in it imports the
    # importer: it is loaded on first use, so `import fnlayers` stays one-way.
    if name == "caffe":
        import importlib

        return importlib.import_module("fnlayers.caffe")
    raise AttributeError(f"module 'fnlayers' has no attribute {name!r}")
