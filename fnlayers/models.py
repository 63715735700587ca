"""The model zoo: Caffe's reference networks, built from fnlayers layers.

Each function reproduces a definition in Caffe's model zoo (BVLC Caffe's ``examples/`` and
``models/`` prototxt files, and Caffe's ResNet-50): the same layer types, sizes, fillers and
per-parameter ``lr_mult``/``decay_mult``, with Caffe's layer names as parameter keys (``conv1``,
``pool1``, ``ip1``, ...). GoogLeNet and ResNet, whose branches merge again, are
:func:`fnlayers.graph` networks with Caffe's blob names. Multipliers travel with the layers;
:func:`fnlayers.layers.param_mults` turns them into the trees :func:`fnlayers.optim.sgd` takes.
Every model takes ``impl=`` for its convolutions (``"im2col"``, the default, or ``"xla"``:
``lax.conv_general_dilated``).

Inputs are NHWC. Caffe flattens ``(C, H, W)`` before an InnerProduct and fnlayers flattens
``(H, W, C)``, so importing Caffe InnerProduct weights that follow a convolution needs that
permutation; networks trained here are unaffected.
"""

from __future__ import annotations

from fnlayers import init
from fnlayers._checks import check_bool, check_choice, check_positive_int, is_int
from fnlayers._zoo_graph import RESNET_DEPTHS, googlenet_nodes, resnet_nodes
from fnlayers.conv import IMPLS
from fnlayers.graphs import graph
from fnlayers.layers import (
    LRN,
    AvgPool,
    BatchNorm,
    Conv2D,
    Deconv2D,
    Dense,
    Dropout,
    Layer,
    MaxPool,
    ReLU,
    Sigmoid,
    serial,
    shared,
)

__all__ = [
    "alexnet",
    "cifar10_bn",
    "cifar10_quick",
    "fcn_tiny",
    "googlenet",
    "lenet",
    "resnet",
    "siamese_lenet",
]

# Caffe's usual ``param { lr_mult: 1 } param { lr_mult: 2 }``: biases learn twice as fast.
_LR_W1_B2 = (1.0, 2.0)


def lenet(num_classes: int = 10, *, impl: str = "im2col") -> Layer:
    """Caffe's LeNet (``mnist/lenet_train_test.prototxt``), input ``(N, 28, 28, 1)``.

    conv1 (20, 5x5) -> pool1 (max 2/2) -> conv2 (50, 5x5) -> pool2 (max 2/2) -> ip1 (500) ->
    relu1 -> ip2 (num_classes). Xavier weights, zero biases, biases at lr_mult 2.
    """
    return serial(*_lenet_layers(num_classes, impl), name="lenet")


def cifar10_quick(num_classes: int = 10, *, impl: str = "im2col") -> Layer:
    """Caffe's CIFAR10-quick (``cifar10/cifar10_quick_train_test.prototxt``), input
    ``(N, 32, 32, 3)``: three 5x5 pad-2 convolutions (32, 32, 64) with max/ave/ave 3/2 pooling
    and ReLUs, then ip1 (64) and ip2 (num_classes). Gaussian fillers as in the prototxt."""
    return serial(
        _conv("conv1", 32, 5, padding=2, std=1e-4, impl=impl),
        MaxPool(3, stride=2, name="pool1"),
        ReLU(name="relu1"),
        _conv("conv2", 32, 5, padding=2, std=0.01, impl=impl),
        ReLU(name="relu2"),
        AvgPool(3, stride=2, name="pool2"),
        _conv("conv3", 64, 5, padding=2, std=0.01, impl=impl),
        ReLU(name="relu3"),
        AvgPool(3, stride=2, name="pool3"),
        _dense("ip1", 64, std=0.1),
        _dense("ip2", num_classes, std=0.1),
        name="cifar10_quick",
    )


def alexnet(num_classes: int = 1000, *, dropout_rate: float = 0.5, impl: str = "im2col") -> Layer:
    """Caffe's BVLC AlexNet (``bvlc_alexnet/train_val.prototxt``), input ``(N, 227, 227, 3)``.

    Grouped convolutions (conv2, conv4, conv5 with group 2), LRN after conv1/conv2 (local_size
    5, alpha 1e-4, beta 0.75), max pooling 3/2, fc6/fc7 (4096) with dropout, fc8. Weights
    gaussian (std 0.01; 0.005 for fc6/fc7), biases 0 or 0.1 as in the prototxt; every layer
    has lr_mult (1, 2) and decay_mult (1, 0).
    """
    mult = dict(lr_mult=_LR_W1_B2, decay_mult=(1.0, 0.0))
    return serial(
        _conv("conv1", 96, 11, stride=4, std=0.01, **mult, impl=impl),
        ReLU(name="relu1"),
        LRN(5, alpha=1e-4, beta=0.75, name="norm1"),
        MaxPool(3, stride=2, name="pool1"),
        _conv("conv2", 256, 5, padding=2, groups=2, std=0.01, bias=0.1, **mult, impl=impl),
        ReLU(name="relu2"),
        LRN(5, alpha=1e-4, beta=0.75, name="norm2"),
        MaxPool(3, stride=2, name="pool2"),
        _conv("conv3", 384, 3, padding=1, std=0.01, **mult, impl=impl),
        ReLU(name="relu3"),
        _conv("conv4", 384, 3, padding=1, groups=2, std=0.01, bias=0.1, **mult, impl=impl),
        ReLU(name="relu4"),
        _conv("conv5", 256, 3, padding=1, groups=2, std=0.01, bias=0.1, **mult, impl=impl),
        ReLU(name="relu5"),
        MaxPool(3, stride=2, name="pool5"),
        _dense("fc6", 4096, std=0.005, bias=0.1, **mult),
        ReLU(name="relu6"),
        Dropout(dropout_rate, name="drop6"),
        _dense("fc7", 4096, std=0.005, bias=0.1, **mult),
        ReLU(name="relu7"),
        Dropout(dropout_rate, name="drop7"),
        _dense("fc8", num_classes, std=0.01, **mult),
        name="alexnet",
    )


def siamese_lenet(embedding_dim: int = 2, *, impl: str = "im2col") -> Layer:
    """Caffe's Siamese LeNet (``siamese/mnist_siamese_train_test.prototxt``).

    Input: a pair ``(x, x_p)`` of ``(N, 28, 28, 1)`` batches; output the pair of embeddings
    ``(feat, feat_p)``, each ``(N, embedding_dim)``. Caffe shares weights by naming the params
    of both branches alike (``conv1_w`` ...); here :func:`fnlayers.shared` applies one LeNet
    trunk (conv1 ... ip2, then ``feat``) to both inputs, so there is one set of parameters.
    Train it with :func:`fnlayers.losses.contrastive`.
    """
    trunk = serial(
        *_lenet_layers(10, impl), _dense("feat", embedding_dim, xavier=True), name="siamese_trunk"
    )
    return shared(trunk, 2, name="siamese_lenet")


def fcn_tiny(num_classes: int, *, width: int = 16, impl: str = "im2col") -> Layer:
    """A small fully convolutional network for per-pixel classification (no Caffe original).

    Input ``(N, H, W, C)`` with H and W multiples of 4; output per-pixel logits
    ``(N, H, W, num_classes)``. conv1 (3x3) -> pool1 (max 2/2) -> conv2 (3x3) -> pool2 ->
    conv3 (3x3), ReLUs, then ``score`` (1x1, num_classes) at 1/4 resolution and ``upscore``:
    a grouped ``Deconv2D`` (kernel 8, stride 4, pad 2, one group per class) initialised with
    :func:`fnlayers.init.bilinear` and frozen (lr_mult 0), FCN's fixed bilinear upsampling.
    """
    check_positive_int(num_classes, fn="fcn_tiny", name="num_classes")
    msra = dict(w_init=init.msra(), impl=impl)
    return serial(
        Conv2D(width, 3, padding=1, name="conv1", lr_mult=_LR_W1_B2, **msra),
        ReLU(name="relu1"),
        MaxPool(2, stride=2, name="pool1"),
        Conv2D(2 * width, 3, padding=1, name="conv2", lr_mult=_LR_W1_B2, **msra),
        ReLU(name="relu2"),
        MaxPool(2, stride=2, name="pool2"),
        Conv2D(4 * width, 3, padding=1, name="conv3", lr_mult=_LR_W1_B2, **msra),
        ReLU(name="relu3"),
        Conv2D(num_classes, 1, name="score", lr_mult=_LR_W1_B2, w_init=init.xavier(), impl=impl),
        Deconv2D(
            num_classes,
            8,
            stride=4,
            padding=2,
            groups=num_classes,
            bias=False,
            w_init=init.bilinear(),
            lr_mult=0.0,
            decay_mult=0.0,
            name="upscore",
        ),
        name="fcn_tiny",
    )


def cifar10_bn(num_classes: int = 10, *, impl: str = "im2col") -> Layer:
    """Caffe's CIFAR10-full with sigmoid and batch norm
    (``cifar10/cifar10_full_sigmoid_train_test_bn.prototxt``), input ``(N, 32, 32, 3)``.

    Three bias-free 5x5 pad-2 convolutions (32, 32, 64), each followed by BatchNorm (Caffe's,
    no learned scale: ``affine=False``) and a sigmoid, with max/ave/ave 3/2 pooling, then ip1
    (num_classes) with decay_mult (1, 0).
    """
    return serial(
        _conv("conv1", 32, 5, padding=2, std=1e-4, bias=None, lr_mult=1.0, impl=impl),
        MaxPool(3, stride=2, name="pool1"),
        BatchNorm(affine=False, name="bn1"),
        Sigmoid(name="Sigmoid1"),
        _conv("conv2", 32, 5, padding=2, std=0.01, bias=None, lr_mult=1.0, impl=impl),
        BatchNorm(affine=False, name="bn2"),
        Sigmoid(name="Sigmoid2"),
        AvgPool(3, stride=2, name="pool2"),
        _conv("conv3", 64, 5, padding=2, std=0.01, bias=None, lr_mult=1.0, impl=impl),
        BatchNorm(affine=False, name="bn3"),
        Sigmoid(name="Sigmoid3"),
        AvgPool(3, stride=2, name="pool3"),
        _dense("ip1", num_classes, std=0.01, lr_mult=1.0, decay_mult=(1.0, 0.0)),
        name="cifar10_bn",
    )


def googlenet(num_classes: int = 1000, *, aux_heads: bool = True, impl: str = "im2col") -> Layer:
    """BVLC GoogLeNet (``bvlc_googlenet/train_val.prototxt``) as an :func:`fnlayers.graph`,
    input ``(N, 224, 224, 3)``.

    The prototxt's layers, names and blobs: conv1/7x7_s2 (64, 7x7, stride 2, pad 3), max pool
    3/2, LRN (local_size 5, alpha 1e-4, beta 0.75), conv2/3x3_reduce (64, 1x1), conv2/3x3
    (192, 3x3), LRN, max pool 3/2, nine inception modules (``inception_3a`` ... ``inception_5b``:
    1x1, 3x3 and 5x5 branches behind 1x1 reductions and a 3x3/1 max pool with a 1x1 projection,
    concatenated on channels) with max pools 3/2 after 3b and 4e, average pool 7/1, dropout 0.4
    and ``loss3/classifier``. Pooling rounds up, as Caffe's (docs/caffe-semantics.md §3):
    224 -> 112 -> 56 -> 28 -> 14 -> 7 -> 1. ``aux_heads`` adds the two auxiliary classifiers
    ``loss1`` (after inception_4a) and ``loss2`` (after inception_4d): average pool 5/3 (14 ->
    4), ``conv`` (128, 1x1), ``fc`` (1024), ReLUs, dropout 0.7, ``classifier``. Caffe weights
    them 0.3 in the loss; at test time only loss3 is used.

    Every convolution and InnerProduct has xavier weights, lr_mult (1, 2) and decay_mult (1, 0);
    biases are 0.2, the classifiers' 0. Params and state are keyed by the Caffe layer names
    (``"inception_3a/1x1"`` ...; the ReLU, pooling, LRN, Concat and Dropout layers hold none).

    Returns:
      A graph whose ``apply`` returns a dict of ``(N, num_classes)`` logits keyed by Caffe's
      top names: ``{"loss1/classifier", "loss2/classifier", "loss3/classifier"}``, only
      ``"loss3/classifier"`` without ``aux_heads``. With 1000 classes it has 13,378,280
      parameters, 6,998,552 without the auxiliary heads; no state. ``train=True`` needs a key
      (dropout).

    Raises:
      ValueError: ``num_classes`` below 1, ``impl`` unknown.
      TypeError: ``num_classes`` not an int, ``aux_heads`` not a bool.

    Caffe flattens an InnerProduct's input as ``(C, H, W)`` and fnlayers as ``(H, W, C)``, so
    Caffe weights for ``loss1/fc`` and ``loss2/fc`` (4x4x128 inputs) need that permutation;
    :func:`fnlayers.caffe.load_net` does it when it reads the prototxt itself.
    """
    check_positive_int(num_classes, fn="googlenet", name="num_classes")
    check_bool(aux_heads, fn="googlenet", name="aux_heads")
    check_choice(impl, IMPLS, fn="googlenet", name="impl")
    heads = ("loss1/classifier", "loss2/classifier") if aux_heads else ()
    return graph(
        "data",
        googlenet_nodes(num_classes, aux_heads, impl),
        outputs=(*heads, "loss3/classifier"),
        name="googlenet",
    )


def resnet(depth: int, num_classes: int = 1000, *, impl: str = "im2col") -> Layer:
    """A ResNet of ``depth`` 18, 34 or 50 as an :func:`fnlayers.graph`, laid out and named as
    Caffe's ResNet-50 (``ResNet-50-deploy.prototxt``, KaimingHe/deep-residual-networks).
    Input ``(N, H, W, 3)``, 224x224 as trained; output ``(N, num_classes)`` logits.

    ``conv1`` (64, 7x7, stride 2, pad 3, with a bias as in the prototxt), ``bn_conv1``,
    ``scale_conv1``, ``conv1_relu``, ``pool1`` (max 3/2, rounding up: 112 -> 56), then stages
    res2 ... res5 (widths 64, 128, 256, 512; blocks ``res2a``, ``res2b``, ...; the first block
    of res3 ... res5 halves the size) and ``pool5`` (global average), ``fc1000``. Every other
    convolution is bias-free; each is followed by BatchNorm ``bn2a_branch2a`` (statistics
    only: state ``mean_acc``/``var_acc``/``scale_factor``, docs/caffe-semantics.md §5) and
    Scale ``scale2a_branch2a`` (learned ``scale``, init 1, and ``bias``, init 0); a block adds its
    shortcut (Eltwise ``res2a``) and applies ``res2a_relu``. The shortcut is the block's input,
    or the 1x1 projection ``res2a_branch1`` (conv, BN, Scale, with the block's stride) where the
    shape changes.

    * depth 50: bottleneck blocks (3, 4, 6, 3 per stage): ``branch2a`` 1x1 (carrying the stride,
      as in Caffe's prototxt), ``branch2b`` 3x3, ``branch2c`` 1x1 to 4x the width.
    * depth 18 (2, 2, 2, 2) and 34 (3, 4, 6, 3): basic blocks as in the paper (and
      torchvision): ``branch2a`` 3x3 (with the stride) and ``branch2b`` 3x3. Caffe has no
      official prototxt for them; the names follow the ResNet-50 scheme, and res2a has no
      projection (64 channels in and out).

    The deploy prototxt has no fillers or multipliers: convolutions here are ``msra`` (He et
    al.), ``fc1000`` xavier, every lr_mult and decay_mult 1. BatchNorm uses the batch's
    statistics when ``train=True`` and the stored ones otherwise (Caffe's default; the deploy
    prototxt's ``use_global_stats: true`` is the test-time behaviour). ``pool5`` averages
    globally, which on a 224x224 input is the prototxt's 7x7 average pool and lets smaller
    inputs run.

    Parameter counts with 1000 classes (BN statistics are state, not counted): ResNet-18
    11,689,576; ResNet-34 21,797,736; ResNet-50 25,557,096. Each is torchvision's count plus
    the 64 biases of conv1 (torchvision's conv1 has none). State: 2 x (channels) + 1 floats per
    BatchNorm: 9,620 (18), 17,060 (34), 53,173 (50).

    Raises:
      ValueError: ``depth`` not 18, 34 or 50 (an int); ``num_classes`` below 1; ``impl``
        unknown.
      TypeError: ``num_classes`` not an int.
    """
    if not is_int(depth) or depth not in RESNET_DEPTHS:
        raise ValueError(f"resnet: depth={depth!r} must be one of {tuple(RESNET_DEPTHS)}")
    depth = int(depth)
    check_positive_int(num_classes, fn="resnet", name="num_classes")
    check_choice(impl, IMPLS, fn="resnet", name="impl")
    nodes = resnet_nodes(depth, num_classes, impl)
    return graph("data", nodes, outputs="fc1000", name=f"resnet{depth}")


# ----------------------------------------------------------------------------- helpers


def _lenet_layers(num_classes, impl):
    return (
        Conv2D(20, 5, name="conv1", lr_mult=_LR_W1_B2, impl=impl),
        MaxPool(2, stride=2, name="pool1"),
        Conv2D(50, 5, name="conv2", lr_mult=_LR_W1_B2, impl=impl),
        MaxPool(2, stride=2, name="pool2"),
        _dense("ip1", 500, xavier=True),
        ReLU(name="relu1"),
        _dense("ip2", num_classes, xavier=True),
    )


def _conv(name, num_output, kernel, *, std, bias=0.0, lr_mult=_LR_W1_B2, decay_mult=1.0, **kw):
    return Conv2D(
        num_output,
        kernel,
        name=name,
        w_init=init.gaussian(std),
        bias=bias is not None,
        b_init=init.constant(bias or 0.0),
        lr_mult=lr_mult,
        decay_mult=decay_mult,
        **kw,
    )


def _dense(
    name, num_output, *, std=None, xavier=False, bias=0.0, lr_mult=_LR_W1_B2, decay_mult=1.0
):
    return Dense(
        num_output,
        name=name,
        w_init=init.xavier() if xavier else init.gaussian(std),
        b_init=init.constant(bias),
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )
