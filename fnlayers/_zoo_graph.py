"""The node lists of the model zoo's graph networks (GoogLeNet, ResNet) for :func:`fnlayers.graph`.

Every node is named, and writes its top, as the Caffe prototxt's layer of the same name;
:mod:`fnlayers.models` holds the public constructors and their documentation.
"""

from __future__ import annotations

from fnlayers import init
from fnlayers.catalogue import Scale
from fnlayers.graphs import Concat, Eltwise
from fnlayers.layers import (
    LRN,
    AvgPool,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    GlobalAvgPool,
    MaxPool,
    ReLU,
)

# ----------------------------------------------------------------------------- GoogLeNet

# bvlc_googlenet/train_val.prototxt's inception modules: num_output of
# (1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj); the output concatenates 1x1, 3x3, 5x5
# and pool_proj.
GOOGLENET_INCEPTION = (
    ("inception_3a", 64, 96, 128, 16, 32, 32),
    ("inception_3b", 128, 128, 192, 32, 96, 64),
    ("inception_4a", 192, 96, 208, 16, 48, 64),
    ("inception_4b", 160, 112, 224, 24, 64, 64),
    ("inception_4c", 128, 128, 256, 24, 64, 64),
    ("inception_4d", 112, 144, 288, 32, 64, 64),
    ("inception_4e", 256, 160, 320, 32, 128, 128),
    ("inception_5a", 256, 160, 320, 32, 128, 128),
    ("inception_5b", 384, 192, 384, 48, 128, 128),
)
_POOL_AFTER = {"inception_3b": "pool3/3x3_s2", "inception_4e": "pool4/3x3_s2"}
_AUX_AFTER = {"inception_4a": "loss1", "inception_4d": "loss2"}

# Every learned GoogLeNet layer: param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2
# decay_mult: 0 }, xavier weights.
_GOOGLENET_MULTS = dict(lr_mult=(1.0, 2.0), decay_mult=(1.0, 0.0), w_init=init.xavier())


def googlenet_nodes(num_classes: int, aux_heads: bool, impl: str) -> list:
    """The ``(layer, bottom, top)`` nodes of BVLC GoogLeNet, input blob ``"data"``."""
    nodes = [
        *_relu_conv("conv1/7x7_s2", 64, 7, "data", impl, stride=2, pad=3, relu="conv1/relu_7x7"),
        (MaxPool(3, stride=2, name="pool1/3x3_s2"), "conv1/7x7_s2", "pool1/3x3_s2"),
        (_lrn("pool1/norm1"), "pool1/3x3_s2", "pool1/norm1"),
        *_relu_conv("conv2/3x3_reduce", 64, 1, "pool1/norm1", impl),
        *_relu_conv("conv2/3x3", 192, 3, "conv2/3x3_reduce", impl, pad=1),
        (_lrn("conv2/norm2"), "conv2/3x3", "conv2/norm2"),
        (MaxPool(3, stride=2, name="pool2/3x3_s2"), "conv2/norm2", "pool2/3x3_s2"),
    ]
    bottom = "pool2/3x3_s2"
    for name, *widths in GOOGLENET_INCEPTION:
        nodes += _inception(name, widths, bottom, impl)
        bottom = f"{name}/output"
        if aux_heads and name in _AUX_AFTER:
            nodes += _aux_head(_AUX_AFTER[name], bottom, num_classes, impl)
        if name in _POOL_AFTER:
            pool = _POOL_AFTER[name]
            nodes.append((MaxPool(3, stride=2, name=pool), bottom, pool))
            bottom = pool
    pool = "pool5/7x7_s1"
    nodes += [
        (AvgPool(7, stride=1, name=pool), bottom, pool),
        (Dropout(0.4, name="pool5/drop_7x7_s1"), pool, pool),
        (_fc("loss3/classifier", num_classes, bias=0.0), pool, "loss3/classifier"),
    ]
    return nodes


def _inception(name: str, widths, bottom: str, impl: str) -> list:
    n1, n3r, n3, n5r, n5, npool = widths
    nodes = [
        *_relu_conv(f"{name}/1x1", n1, 1, bottom, impl),
        *_relu_conv(f"{name}/3x3_reduce", n3r, 1, bottom, impl),
        *_relu_conv(f"{name}/3x3", n3, 3, f"{name}/3x3_reduce", impl, pad=1),
        *_relu_conv(f"{name}/5x5_reduce", n5r, 1, bottom, impl),
        *_relu_conv(f"{name}/5x5", n5, 5, f"{name}/5x5_reduce", impl, pad=2),
        (MaxPool(3, stride=1, padding=1, name=f"{name}/pool"), bottom, f"{name}/pool"),
        *_relu_conv(f"{name}/pool_proj", npool, 1, f"{name}/pool", impl),
    ]
    branches = tuple(f"{name}/{b}" for b in ("1x1", "3x3", "5x5", "pool_proj"))
    nodes.append((Concat(name=f"{name}/output"), branches, f"{name}/output"))
    return nodes


def _aux_head(head: str, bottom: str, num_classes: int, impl: str) -> list:
    """An auxiliary classifier (``loss1``/``loss2``): average pool 5/3, 1x1 conv (128), fc
    (1024), dropout 0.7, classifier."""
    fc = f"{head}/fc"
    return [
        (AvgPool(5, stride=3, name=f"{head}/ave_pool"), bottom, f"{head}/ave_pool"),
        *_relu_conv(f"{head}/conv", 128, 1, f"{head}/ave_pool", impl),
        (_fc(fc, 1024, bias=0.2), f"{head}/conv", fc),
        (ReLU(name=f"{head}/relu_fc"), fc, fc),
        (Dropout(0.7, name=f"{head}/drop_fc"), fc, fc),
        (_fc(f"{head}/classifier", num_classes, bias=0.0), fc, f"{head}/classifier"),
    ]


def _relu_conv(name, num_output, kernel, bottom, impl, *, stride=1, pad=0, relu=None) -> list:
    """A GoogLeNet convolution (bias 0.2) and its in-place ReLU, named as the prototxt does:
    ``a/b`` is followed by ``a/relu_b``."""
    if relu is None:
        head, _, tail = name.rpartition("/")
        relu = f"{head}/relu_{tail}"
    conv = Conv2D(
        num_output,
        kernel,
        stride=stride,
        padding=pad,
        b_init=init.constant(0.2),
        impl=impl,
        name=name,
        **_GOOGLENET_MULTS,
    )
    return [(conv, bottom, name), (ReLU(name=relu), name, name)]


def _fc(name: str, num_output: int, *, bias: float):
    return Dense(num_output, b_init=init.constant(bias), name=name, **_GOOGLENET_MULTS)


def _lrn(name: str):
    return LRN(5, alpha=1e-4, beta=0.75, name=name)


# ----------------------------------------------------------------------------- ResNet

# depth -> (bottleneck blocks?, blocks per stage res2..res5); the stage widths are 64, 128,
# 256, 512 (a bottleneck block outputs 4x its width).
RESNET_DEPTHS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
}
_WIDTHS = (64, 128, 256, 512)


def resnet_nodes(depth: int, num_classes: int, impl: str) -> list:
    """The ``(layer, bottom, top)`` nodes of a ResNet, input blob ``"data"``, output
    ``"fc1000"``."""
    bottleneck, blocks = RESNET_DEPTHS[depth]
    nodes = [
        *_conv_bn("conv1", "_conv1", 64, 7, "data", impl, stride=2, pad=3, bias=True),
        (MaxPool(3, stride=2, name="pool1"), "conv1", "pool1"),
    ]
    bottom, channels = "pool1", 64
    for stage, (width, count) in enumerate(zip(_WIDTHS, blocks, strict=True), start=2):
        out = 4 * width if bottleneck else width
        for i in range(count):
            stride = 2 if i == 0 and stage > 2 else 1
            project = stride != 1 or channels != out
            name = f"res{stage}{'abcdefghijklmnopqrstuvwxyz'[i]}"
            nodes += _residual_block(name, bottom, width, out, stride, project, bottleneck, impl)
            bottom, channels = name, out
    nodes += [
        (GlobalAvgPool(name="pool5"), bottom, "pool5"),
        (Dense(num_classes, w_init=init.xavier(), name="fc1000"), "pool5", "fc1000"),
    ]
    return nodes


def _residual_block(name, bottom, width, out, stride, project, bottleneck, impl) -> list:
    """Block ``res2a`` etc.: ``relu(shortcut + branch2)``, the shortcut ``res2a_branch1`` (a
    1x1 projection) when the shape changes, else the input. Caffe's ResNet-50 strides in the
    first 1x1 of a bottleneck (``branch2a``), as the prototxt does."""
    tag = name[3:]  # "2a": bn2a_branch2a, scale2a_branch2a
    nodes = []
    shortcut = bottom
    if project:
        shortcut = f"{name}_branch1"
        nodes += _conv_bn(
            shortcut, f"{tag}_branch1", out, 1, bottom, impl, stride=stride, relu=False
        )
    if bottleneck:
        branch = (("2a", width, 1, stride, 0), ("2b", width, 3, 1, 1), ("2c", out, 1, 1, 0))
    else:
        branch = (("2a", width, 3, stride, 1), ("2b", out, 3, 1, 1))
    x = bottom
    for j, (b, num_output, kernel, s, pad) in enumerate(branch):
        conv = f"{name}_branch{b}"
        last = j == len(branch) - 1
        nodes += _conv_bn(
            conv, f"{tag}_branch{b}", num_output, kernel, x, impl, stride=s, pad=pad, relu=not last
        )
        x = conv
    nodes += [
        (Eltwise("sum", name=name), (shortcut, x), name),
        (ReLU(name=f"{name}_relu"), name, name),
    ]
    return nodes


def _conv_bn(
    conv, tag, num_output, kernel, bottom, impl, *, stride=1, pad=0, bias=False, relu=True
):
    """Convolution ``conv`` (msra weights), then in place BatchNorm ``bn{tag}`` (statistics
    only), Scale ``scale{tag}`` (learned scale and bias) and, with ``relu``, ``{conv}_relu``."""
    layer = Conv2D(
        num_output,
        kernel,
        stride=stride,
        padding=pad,
        bias=bias,
        w_init=init.msra(),
        impl=impl,
        name=conv,
    )
    nodes = [
        (layer, bottom, conv),
        (BatchNorm(affine=False, name=f"bn{tag}"), conv, conv),
        (Scale(bias=True, name=f"scale{tag}"), conv, conv),
    ]
    if relu:
        nodes.append((ReLU(name=f"{conv}_relu"), conv, conv))
    return nodes
