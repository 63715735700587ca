"""The graph-form model zoo: GoogLeNet and ResNet against Caffe's own prototxts.

The references are BVLC's ``bvlc_googlenet/train_val.prototxt`` (tests/data/caffe, BSD licence
there) and KaimingHe/deep-residual-networks' ``ResNet-50-deploy.prototxt`` (tests/data/resnet,
MIT licence there), walked here with Caffe's shape rules; parameter counts are worked out by
hand from the layer tables. Everything but one small forward pass runs on shapes alone.
"""

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import fnlayers as fl
from fnlayers import models
from fnlayers._zoo_graph import GOOGLENET_INCEPTION, _inception

DATA = Path(__file__).parent / "data"
SKIPPED_TYPES = ("Data", "SoftmaxWithLoss", "Accuracy", "Softmax")  # not part of the model


def one(msg, field, default=None):
    return msg[field][-1] if field in msg else default


def caffe_layers(path):
    net = fl.caffe.parse(path.read_text())
    return [layer for layer in net["layer"] if one(layer, "type") not in SKIPPED_TYPES]


def caffe_shapes(layers, height, width, channels):
    """Every top's shape, ``(H, W, C)`` or ``(num_output,)``, by Caffe's reshape rules: floor
    for convolution, ceil (with the window-start clip when padded) for pooling."""
    shapes = {"data": (height, width, channels)}
    for layer in layers:
        kind, bottoms = one(layer, "type"), layer["bottom"]
        h, w, c = shapes[bottoms[0]] + (None,) * (3 - len(shapes[bottoms[0]]))
        if kind == "Convolution":
            p = one(layer, "convolution_param")
            k, s, pad = one(p, "kernel_size"), one(p, "stride", 1), one(p, "pad", 0)
            out = ((h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1, one(p, "num_output"))
        elif kind == "Pooling":
            p = one(layer, "pooling_param")
            k, s, pad = one(p, "kernel_size"), one(p, "stride", 1), one(p, "pad", 0)
            oh = math.ceil((h + 2 * pad - k) / s) + 1
            if pad and (oh - 1) * s >= h + pad:
                oh -= 1
            out = (oh, oh, c)  # square here
        elif kind == "InnerProduct":
            out = (one(one(layer, "inner_product_param"), "num_output"),)
        elif kind == "Concat":
            out = (h, w, sum(shapes[b][2] for b in bottoms))
        else:  # ReLU, LRN, Dropout, BatchNorm, Scale, Eltwise keep the shape
            out = shapes[bottoms[0]]
        shapes[layer["top"][0]] = out
    return shapes


def mults(model, params):
    lr, decay = fl.param_mults(model)
    as_tree = jax.tree_util.tree_map_with_path
    return as_tree(lr, params), as_tree(decay, params)


def count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def abstract_init(model, in_shape):
    """``model.init`` traced abstractly: the output shape, and params and state as
    ``ShapeDtypeStruct`` trees."""
    out = []

    def init(key):
        shape, params, state = model.init(key, in_shape)
        out.append(shape)
        return params, state

    params, state = jax.eval_shape(init, jax.random.key(0))
    return out[0], params, state


# ----------------------------------------------------------------------------- GoogLeNet

# The prototxt's inception table: input channels (the previous concat or pool), then
# num_output of 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj.
INCEPTION_TABLE = [
    (192, 64, 96, 128, 16, 32, 32),
    (256, 128, 128, 192, 32, 96, 64),
    (480, 192, 96, 208, 16, 48, 64),
    (512, 160, 112, 224, 24, 64, 64),
    (512, 128, 128, 256, 24, 64, 64),
    (512, 112, 144, 288, 32, 64, 64),
    (528, 256, 160, 320, 32, 128, 128),
    (832, 256, 160, 320, 32, 128, 128),
    (832, 384, 192, 384, 48, 128, 128),
]


def conv_count(k, cin, cout):
    return k * k * cin * cout + cout


def googlenet_count(num_classes, aux_heads):
    stem = conv_count(7, 3, 64) + conv_count(1, 64, 64) + conv_count(3, 64, 192)
    inception = sum(
        conv_count(1, cin, n1)
        + conv_count(1, cin, n3r)
        + conv_count(3, n3r, n3)
        + conv_count(1, cin, n5r)
        + conv_count(5, n5r, n5)
        + conv_count(1, cin, npool)
        for cin, n1, n3r, n3, n5r, n5, npool in INCEPTION_TABLE
    )
    main = 1024 * num_classes + num_classes

    def aux(cin):  # 1x1 conv to 128, fc from 4*4*128 to 1024, classifier
        return conv_count(1, cin, 128) + (2048 * 1024 + 1024) + (1024 * num_classes + num_classes)

    return stem + inception + main + (aux(512) + aux(528) if aux_heads else 0)


def test_googlenet_outputs_and_parameter_count(key):
    model = models.googlenet()
    out, params, state = abstract_init(model, (-1, 224, 224, 3))
    heads = ("loss1/classifier", "loss2/classifier", "loss3/classifier")
    assert out == dict.fromkeys(heads, (-1, 1000))
    assert count(params) == googlenet_count(1000, True) == 13_378_280
    assert count(state) == 0

    bare = models.googlenet(10, aux_heads=False)
    out, params, _ = abstract_init(bare, (-1, 224, 224, 3))
    assert out == {"loss3/classifier": (-1, 10)}
    assert count(params) == googlenet_count(10, False)
    assert googlenet_count(1000, False) == 6_998_552  # BVLC GoogLeNet's published size
    assert not any(name.startswith(("loss1", "loss2")) for name in params)


def test_googlenet_is_the_bvlc_prototxt():
    layers = caffe_layers(DATA / "caffe" / "bvlc_googlenet__train_val.prototxt")
    model = models.googlenet()
    assert [name for name, _ in model.children] == [one(lyr, "name") for lyr in layers]

    _, params, _ = abstract_init(model, (-1, 224, 224, 3))
    lr, decay = mults(model, params)
    blobs = caffe_shapes(layers, 224, 224, 3)
    produced = {name: shape for name, shape, _ in fl.layer_shapes(model, (-1, 224, 224, 3))}
    children = dict(model.children)
    for layer in layers:
        name, kind = one(layer, "name"), one(layer, "type")
        assert produced[name] == (-1, *blobs[layer["top"][0]]), name
        if kind in ("Convolution", "InnerProduct"):
            p = one(layer, "convolution_param") or one(layer, "inner_product_param")
            n = one(p, "num_output")
            bottom = blobs[layer["bottom"][0]]
            k = one(p, "kernel_size")
            w_shape = (k, k, bottom[2], n) if kind == "Convolution" else (math.prod(bottom), n)
            assert params[name]["w"].shape == w_shape, name
            assert params[name]["b"].shape == (n,), name
            specs = layer["param"]
            assert lr[name] == {"w": one(specs[0], "lr_mult"), "b": one(specs[1], "lr_mult")}
            assert decay[name] == {
                "w": one(specs[0], "decay_mult"),
                "b": one(specs[1], "decay_mult"),
            }
        elif kind == "Pooling":
            pool = one(one(layer, "pooling_param"), "pool")
            assert children[name].kind == {"MAX": "max_pool", "AVE": "avg_pool"}[pool], name
        elif kind == "Dropout":
            ratio = one(one(layer, "dropout_param"), "dropout_ratio")
            assert dict(children[name].config)["rate"] == ratio, name
        elif kind == "LRN":
            p = one(layer, "lrn_param")
            assert params[name] == {}
            cfg = {"size": 5, "beta": 0.75, **dict(children[name].config)}  # the defaults
            assert (cfg["size"], cfg["alpha"], cfg["beta"]) == (
                one(p, "local_size"),
                one(p, "alpha"),
                one(p, "beta"),
            )


def test_googlenet_fillers(key):
    # One layer of each filler kind, initialised alone (the whole net is 13M draws).
    children = dict(models.googlenet().children)
    _, conv1, _ = children["conv1/7x7_s2"].init(key, (1, 224, 224, 3))
    np.testing.assert_array_equal(conv1["b"], np.float32(0.2))
    assert float(jnp.abs(conv1["w"]).max()) <= math.sqrt(3.0 / (7 * 7 * 3))  # xavier
    _, fc, _ = children["loss1/fc"].init(key, (1, 4, 4, 128))
    np.testing.assert_array_equal(fc["b"], np.float32(0.2))
    _, classifier, _ = children["loss3/classifier"].init(key, (1, 1, 1, 1024))
    np.testing.assert_array_equal(classifier["b"], 0.0)
    assert float(jnp.abs(classifier["w"]).max()) <= math.sqrt(3.0 / 1024)


def test_inception_concatenates_in_prototxt_order():
    # Zero weights: each branch is relu(its bias). The 3x3 branch's negative bias must come
    # out 0 (its ReLU), the others in the order 1x1, 3x3, 5x5, pool_proj.
    name, *widths = GOOGLENET_INCEPTION[0]
    module = fl.graph("data", _inception(name, widths, "data", "im2col"), outputs=f"{name}/output")
    _, shapes, state = abstract_init(module, (1, 5, 5, 192))
    bias = {"1x1": 1.0, "3x3_reduce": 2.0, "3x3": -3.0, "5x5_reduce": 4.0, "5x5": 5.0}
    bias["pool_proj"] = 7.0
    params = {
        node: {
            "w": np.zeros(leaf["w"].shape, np.float32),
            "b": np.full(leaf["b"].shape, bias[node.split("/")[1]], np.float32),
        }
        if leaf
        else {}
        for node, leaf in shapes.items()
    }
    y, _ = jax.jit(module.apply)(params, state, jnp.ones((1, 5, 5, 192)))
    n1, _, n3, _, n5, npool = widths
    expected = [1.0] * n1 + [0.0] * n3 + [5.0] * n5 + [7.0] * npool
    np.testing.assert_array_equal(y, np.broadcast_to(expected, (1, 5, 5, 256)))


def test_googlenet_composes_with_the_library(key):
    model = models.googlenet(7, impl="xla")
    text = fl.summary(model, (-1, 224, 224, 3))
    assert re.search(r"\ninception_5b/output +\(-1, 7, 7, 1024\) +0\n", text)
    assert text.splitlines()[-1].split()[-1] == f"{googlenet_count(7, True):,}"

    _, params, state = abstract_init(model, (-1, 224, 224, 3))
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    train = jax.eval_shape(
        lambda p, s, x, k: model.apply(p, s, x, key=k, train=True), params, state, x, key
    )[0]
    assert {k: v.shape for k, v in train.items()} == dict.fromkeys(train, (2, 7))
    with pytest.raises(ValueError, match="pass key=jax.random.key"):
        jax.eval_shape(lambda p, s, x: model.apply(p, s, x, train=True), params, state, x)


def test_googlenet_validates_its_arguments():
    with pytest.raises(ValueError, match="googlenet: num_classes=0"):
        models.googlenet(0)
    with pytest.raises(TypeError, match="googlenet: aux_heads=1"):
        models.googlenet(aux_heads=1)
    with pytest.raises(ValueError, match="googlenet: impl='cudnn'"):
        models.googlenet(impl="cudnn")


# ----------------------------------------------------------------------------- ResNet


def resnet_count(depth, num_classes):
    """By hand: conv weights k*k*cin*cout, 2 Scale params per BN channel, conv1's bias."""
    bottleneck = depth == 50
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    total = 7 * 7 * 3 * 64 + 64 + 2 * 64  # conv1 (with bias), scale_conv1
    cin = 64
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        for i in range(n):
            if bottleneck:
                cout = 4 * width
                total += cin * width + 9 * width * width + width * cout + 2 * (2 * width + cout)
            else:
                cout = width
                total += 9 * cin * width + 9 * width * width + 2 * 2 * width
            if i == 0 and (stage > 0 or cin != cout):  # the projection shortcut
                total += cin * cout + 2 * cout
            cin = cout
    return total + cin * num_classes + num_classes


# torchvision's counts (resnet18/34/50, no bias in conv1): ours add conv1's 64 biases.
TORCHVISION = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_parameter_counts(depth):
    model = models.resnet(depth)
    out, params, state = abstract_init(model, (-1, 224, 224, 3))
    assert out == (-1, 1000)
    assert count(params) == resnet_count(depth, 1000) == TORCHVISION[depth] + 64
    bns = [n for n in state if state[n]]
    assert all(n.startswith("bn") for n in bns)
    channels = sum(state[n]["mean_acc"].shape[0] for n in bns)
    assert count(state) == 2 * channels + len(bns)  # mean_acc, var_acc, scale_factor
    assert count({n: p for n, p in params.items() if n.startswith("scale")}) == 2 * channels


def test_resnet50_is_the_caffe_prototxt():
    layers = caffe_layers(DATA / "resnet" / "ResNet-50-deploy.prototxt")
    model = models.resnet(50)
    assert [name for name, _ in model.children] == [one(lyr, "name") for lyr in layers]

    _, params, state = abstract_init(model, (-1, 224, 224, 3))
    blobs = caffe_shapes(layers, 224, 224, 3)
    produced = {name: shape for name, shape, _ in fl.layer_shapes(model, (-1, 224, 224, 3))}
    children = dict(model.children)
    for layer in layers:
        name, kind = one(layer, "name"), one(layer, "type")
        top = blobs[layer["top"][0]]
        assert produced[name] == (-1, *top), name
        if kind == "Convolution":
            p = one(layer, "convolution_param")
            cin = blobs[layer["bottom"][0]][2]
            k, n = one(p, "kernel_size"), one(p, "num_output")
            expected = {"w": (k, k, cin, n)} | ({"b": (n,)} if one(p, "bias_term", True) else {})
            assert {k: v.shape for k, v in params[name].items()} == expected, name
        elif kind == "BatchNorm":
            assert params[name] == {}
            assert state[name]["mean_acc"].shape == (top[2],), name
        elif kind == "Scale":
            assert one(one(layer, "scale_param"), "bias_term")
            assert {k: v.shape for k, v in params[name].items()} == {
                "scale": (top[2],),
                "bias": (top[2],),
            }, name
        elif kind == "Eltwise":
            assert children[name].kind == "eltwise" and children[name].config == (), name
    assert params["fc1000"]["w"].shape == (2048, 1000)


@pytest.mark.parametrize(
    "depth,last,projections",
    [(18, "res5b", ["res3a", "res4a", "res5a"]), (34, "res5c", ["res3a", "res4a", "res5a"])],
)
def test_resnet_basic_blocks_follow_the_naming_scheme(depth, last, projections):
    model = models.resnet(depth)
    names = [name for name, _ in model.children]
    assert names[:5] == ["conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1"]
    assert names[-4:] == [last, f"{last}_relu", "pool5", "fc1000"]
    assert [n[:-8] for n in names if n.startswith("res") and n.endswith("_branch1")] == projections
    assert names[5:15] == [
        "res2a_branch2a", "bn2a_branch2a", "scale2a_branch2a", "res2a_branch2a_relu",
        "res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b",
        "res2a", "res2a_relu", "res2b_branch2a",
    ]  # fmt: skip
    _, params, _ = abstract_init(model, (-1, 224, 224, 3))
    assert params["res3a_branch2a"]["w"].shape == (3, 3, 64, 128)
    assert params["res3a_branch1"]["w"].shape == (1, 1, 64, 128)
    lr, decay = mults(model, params)
    assert set(jax.tree.leaves(lr)) == {1.0} and set(jax.tree.leaves(decay)) == {1.0}


def test_resnet18_forward_on_a_small_image_matches_numpy(rng):
    # With every block's last Scale zeroed the residual branches add nothing: identity blocks
    # pass relu(x) = x through, and the net is the stem, the projections res3a/4a/5a_branch1
    # (with their BN and Scale), pool5 and fc1000, which numpy computes here from Caffe's
    # formulas. The test-phase BatchNorm uses the stored statistics.
    model = models.resnet(18, num_classes=5)
    _, shapes, state_shapes = abstract_init(model, (-1, 32, 32, 3))

    def draw(path, leaf):
        kind = path[-1].key
        if kind == "scale_factor":
            return np.full(leaf.shape, 2.0, np.float32)
        if kind == "var_acc":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    state = jax.tree_util.tree_map_with_path(draw, state_shapes)
    for name in params:
        if name.endswith("_branch2b") and name.startswith("scale"):
            params[name] = {k: np.zeros_like(v) for k, v in params[name].items()}
    x = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)

    y, new_state = jax.jit(lambda p, s, x: model.apply(p, s, x))(params, state, x)

    def bn_scale_relu(a, tag, relu=True):
        s = state[f"bn{tag}"]
        f = 1.0 / s["scale_factor"][0]
        a = (a - f * s["mean_acc"]) / np.sqrt(f * s["var_acc"] + 1e-5)
        a = a * params[f"scale{tag}"]["scale"] + params[f"scale{tag}"]["bias"]
        return np.maximum(a, 0.0) if relu else a

    a = np.pad(x.astype(np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
    patches = sliding_window_view(a, (7, 7), axis=(1, 2))[:, ::2, ::2]  # (1, 16, 16, 3, 7, 7)
    a = np.einsum("nhwcij,ijco->nhwo", patches, params["conv1"]["w"]) + params["conv1"]["b"]
    a = bn_scale_relu(a, "_conv1")
    # pool1: max 3/2, 16 -> ceil(13/2) + 1 = 8; the last window overhangs by one (-inf).
    a = np.pad(a, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
    a = sliding_window_view(a, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))
    assert a.shape == (1, 8, 8, 64)
    for stage in (3, 4, 5):  # res2a/2b and every "b" block are identities here
        w = params[f"res{stage}a_branch1"]["w"][0, 0]
        a = bn_scale_relu(a[:, ::2, ::2] @ w, f"{stage}a_branch1", relu=True)
    a = a.mean(axis=(1, 2))
    expected = a @ params["fc1000"]["w"] + params["fc1000"]["b"]

    assert y.shape == (1, 5)
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)  # test phase: unchanged


def test_resnet_validates_depth():
    for depth in (101, 0, 50.0, "50", True):
        with pytest.raises(ValueError, match=r"resnet: depth=.* must be one of \(18, 34, 50\)"):
            models.resnet(depth)
    with pytest.raises(ValueError, match="resnet: num_classes=0"):
        models.resnet(18, 0)
    with pytest.raises(ValueError, match="resnet: impl='cudnn'"):
        models.resnet(18, impl="cudnn")
