"""fnlayers.caffe.load_net: each Caffe layer type's prototxt parameters mapped onto fnlayers,
checked on small blobs against numpy loops that transliterate Caffe's Forward_cpu (NCHW, float64)
and values worked by hand; the loss and accuracy layers as graph nodes; bad parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlayers.caffe import load_net
from fnlayers.caffe.wire import write_net
from fnlayers.tensor_ops import from_caffe_blob, to_caffe_blob

FLT_MIN = float(np.finfo(np.float32).tiny)


def _run(net, feed, *, train=False, key=None):
    """``net.model.apply`` on Caffe blobs (NCHW numpy), outputs back as Caffe blobs."""
    x = {k: from_caffe_blob(jnp.asarray(v, jnp.float32)) for k, v in feed.items()}
    x = x if len(x) > 1 else next(iter(x.values()))
    out, state = net.model.apply(net.params, net.state, x, train=train, key=key)
    return {k: np.asarray(to_caffe_blob(v), np.float64) for k, v in out.items()}, state


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- elementwise

ELEMENTWISE = """
input: "x" input_shape { dim: 2 dim: 3 dim: 2 dim: 2 }
layer { name: "prelu" type: "PReLU" bottom: "x" top: "prelu" }
layer { name: "shared" type: "PReLU" bottom: "x" top: "shared"
        prelu_param { channel_shared: true filler { type: "constant" value: 0.5 } } }
layer { name: "elu" type: "ELU" bottom: "x" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "abs" type: "AbsVal" bottom: "x" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "x" top: "bnll" }
layer { name: "exp" type: "Exp" bottom: "x" top: "exp"
        exp_param { base: 2 scale: 0.5 shift: -1 } }
layer { name: "exp_e" type: "Exp" bottom: "x" top: "exp_e" exp_param { shift: 0.25 } }
layer { name: "abs2" type: "AbsVal" bottom: "x" top: "abs2" }
layer { name: "log" type: "Log" bottom: "abs2" top: "log"
        log_param { base: 10 scale: 2 shift: 0.5 } }
layer { name: "power" type: "Power" bottom: "abs2" top: "power"
        power_param { power: 1.5 scale: 0.5 shift: 1 } }
layer { name: "thresh" type: "Threshold" bottom: "x" top: "thresh"
        threshold_param { threshold: 0.25 } }
"""


def test_elementwise_layers_follow_caffes_forward(rng):
    slopes = np.array([0.1, 0.2, 0.3])
    weights = write_net(None, [("prelu", "PReLU", [slopes])])
    net = load_net(ELEMENTWISE, weights)
    assert net.params["prelu"]["alpha"].shape == (3,) and net.params["shared"]["alpha"].shape == ()
    assert "abs2" not in net.outputs  # read by log and power
    x = rng.normal(size=(2, 3, 2, 2))
    x[0, 0, 0, :] = [0.25, 0.0]  # the threshold's strict > and the slopes at 0
    out, _ = _run(net, {"x": x})
    neg, pos = np.minimum(x, 0), np.maximum(x, 0)
    _assert_close(out["prelu"], pos + slopes[None, :, None, None] * neg)
    _assert_close(out["shared"], pos + 0.5 * neg)
    _assert_close(out["elu"], pos + 0.5 * (np.exp(neg) - 1))
    _assert_close(out["abs"], np.abs(x))
    bnll = np.where(x > 0, x + np.log1p(np.exp(-x)), np.log1p(np.exp(x)))
    _assert_close(out["bnll"], bnll)
    # Caffe's Exp: outer_scale * exp(inner_scale * x), inner = ln(base) * scale, outer = base^shift
    _assert_close(out["exp"], 2.0**-1 * np.exp(math.log(2) * 0.5 * x))
    _assert_close(out["exp_e"], math.exp(0.25) * np.exp(x))
    _assert_close(out["log"], np.log(0.5 + 2 * np.abs(x)) / math.log(10))
    _assert_close(out["power"], (1 + 0.5 * np.abs(x)) ** 1.5)
    _assert_close(out["thresh"], (x > 0.25).astype(float))
    assert out["thresh"][0, 0, 0, 0] == 0.0  # 0.25 is not > 0.25


# ----------------------------------------------------------------------------- affine, shape

AFFINE = """
input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }
input: "g" input_shape { dim: 2 dim: 3 }
input: "ref" input_shape { dim: 2 dim: 1 dim: 2 dim: 3 }
layer { name: "bias" type: "Bias" bottom: "x" top: "bias"
        bias_param { axis: 1 num_axes: 2 filler { type: "constant" value: 0.5 } } }
layer { name: "bias2" type: "Bias" bottom: "x" bottom: "g" top: "bias2" bias_param { axis: 0 } }
layer { name: "gate" type: "Scale" bottom: "x" bottom: "g" top: "gate"
        scale_param { axis: 0 bias_term: true } }
layer { name: "crop" type: "Crop" bottom: "x" bottom: "ref" top: "crop"
        crop_param { axis: 1 offset: 1 offset: 2 offset: 1 } }
layer { name: "crop_hw" type: "Crop" bottom: "x" bottom: "ref" top: "crop_hw"
        crop_param { offset: 1 } }
layer { name: "reshape" type: "Reshape" bottom: "x" top: "reshape"
        reshape_param { shape { dim: 0 dim: -1 dim: 2 } axis: 1 num_axes: 2 } }
layer { name: "append" type: "Reshape" bottom: "g" top: "append"
        reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 } }
"""


def test_bias_scale_crop_reshape(rng):
    b = rng.normal(size=(3, 4))  # Caffe's Bias axis 1, num_axes 2 on (2, 3, 4, 5): shape (3, 4)
    gb = rng.normal(size=(2, 3))  # the two-bottom Scale's learned bias: the scale's shape
    net = load_net(AFFINE, write_net(None, [("bias", "Bias", [b]), ("gate", "Scale", [gb])]))
    assert net.params["bias2"] == {} and list(net.params["gate"]) == ["bias"]
    x, g = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3))
    out, _ = _run(net, {"x": x, "g": g, "ref": np.zeros((2, 1, 2, 3))})
    _assert_close(out["bias"], x + b[None, :, :, None])
    _assert_close(out["bias2"], x + g[:, :, None, None])
    _assert_close(out["gate"], x * g[:, :, None, None] + gb[:, :, None, None])
    # Crop: axes 1.. (C, H, W) cut to ref's (1, 2, 3) at offsets (1, 2, 1); by default H and W
    # only, one offset for both
    _assert_close(out["crop"], x[:, 1:2, 2:4, 1:4])
    _assert_close(out["crop_hw"], x[:, :, 1:3, 1:4])
    # Reshape's axes [1, 3) of (2, 3, 4, 5), i.e. (3, 4) -> (3, 2, 2): 0 copies 3, -1 infers 2
    assert out["reshape"].shape == (2, 3, 2, 2, 5)
    _assert_close(out["reshape"], x.reshape(2, 3, 2, 2, 5))
    # axis -1 with num_axes 0 appends axes after the last one
    _assert_close(out["append"], g.reshape(2, 3, 1))


# ----------------------------------------------------------------------------- ArgMax, Silence

ARGMAX = """
input: "x" input_shape { dim: 2 dim: 4 dim: 1 dim: 3 }
layer { name: "top2" type: "ArgMax" bottom: "x" top: "top2"
        argmax_param { top_k: 2 out_max_val: true } }
layer { name: "by_c" type: "ArgMax" bottom: "x" top: "by_c" argmax_param { axis: 1 } }
"""
SILENCED = ARGMAX + 'layer { name: "quiet" type: "Silence" bottom: "x" bottom: "by_c" }'


def test_argmax():
    net = load_net(ARGMAX)
    assert net.outputs == ("by_c", "top2")
    flat = np.array([[3, 9, 1, 9, 0, 2, 5, 7, 8, 4, 6, 2], np.arange(12)], float)
    out, _ = _run(net, {"x": flat.reshape(2, 4, 1, 3)})
    # without an axis each example's values are ranked in Caffe's (C, H, W) order; the top is
    # (N, 2, top_k, 1): the indices, then the values. Example 0's two 9s tie: Caffe's
    # partial_sort on (value, index) pairs with std::greater puts index 3 before index 1
    assert out["top2"].shape == (2, 2, 2, 1)
    np.testing.assert_array_equal(out["top2"][..., 0], [[[3, 1], [9, 9]], [[11, 10], [11, 10]]])
    # along C: (N, 1, H, W), the index of each position's largest channel
    x = flat.reshape(2, 4, 1, 3)
    np.testing.assert_array_equal(out["by_c"], np.argmax(x, axis=1)[:, None])


def test_silence_consumes_its_bottoms():
    net = load_net(SILENCED)
    assert net.outputs == ("top2",) and net.layer_types["quiet"] == "Silence"
    out, _ = _run(net, {"x": np.ones((2, 4, 1, 3))})
    assert set(out) == {"top2"}


# ----------------------------------------------------------------------------- learned, pooling

LEARNED = """
input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
layer { name: "ip_t" type: "InnerProduct" bottom: "x" top: "ip_t"
        inner_product_param { num_output: 2 transpose: true weight_filler { type: "xavier" } } }
layer { name: "stoch" type: "Pooling" bottom: "x" top: "stoch"
        pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 } }
layer { name: "gstoch" type: "Pooling" bottom: "x" top: "gstoch"
        pooling_param { pool: STOCHASTIC global_pooling: true } }
layer { name: "floor" type: "Pooling" bottom: "x" top: "floor"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR } }
"""


def test_transposed_inner_product_and_pooling(rng, key):
    net = load_net(LEARNED, key=key)
    # Caffe's transposed weight blob is (K, num_output) = (48, 2); its xavier filler takes
    # fan_in = count / shape(0) = 2, so the bound sqrt(3 / 2), not sqrt(3 / 48) = 0.25
    w0 = np.asarray(net.params["ip_t"]["w"])
    assert w0.shape == (48, 2) and 0.25 < np.abs(w0).max() <= math.sqrt(1.5)
    w, b = rng.normal(size=(48, 2)), rng.normal(size=2)
    net = load_net(LEARNED, write_net(None, [("ip_t", "InnerProduct", [w, b])]))
    x = rng.uniform(0, 1, size=(2, 3, 4, 4))
    out, _ = _run(net, {"x": x})
    _assert_close(out["ip_t"], x.reshape(2, 48) @ w + b)  # Caffe: y = x W with transpose
    # STOCHASTIC at test time: each window's sum(a^2) / sum(a)
    windows = x.reshape(2, 3, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 2, 2, 4)
    _assert_close(out["stoch"], (windows**2).sum(-1) / windows.sum(-1))
    plane = x.reshape(2, 3, 16)
    _assert_close(out["gstoch"][..., 0, 0], (plane**2).sum(-1) / plane.sum(-1))
    # round_mode FLOOR: (4 - 3) / 2 + 1 = 1 output row and column, the top-left 3x3 maximum
    _assert_close(out["floor"], x[:, :, :3, :3].max(axis=(2, 3))[:, :, None, None])
    # in training each output is one element of its window, drawn with the key
    train, _ = _run(net, {"x": x}, train=True, key=key)
    assert np.all(np.any(np.abs(windows - train["stoch"][..., None]) < 1e-6, axis=-1))
    with pytest.raises(ValueError, match="key"):
        _run(net, {"x": x}, train=True)


BATCH_NORM = """
input: "x" input_shape { dim: 4 dim: 2 dim: 1 dim: 3 }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "bn" }
layer { name: "bn_global" type: "BatchNorm" bottom: "x" top: "bn_global"
        batch_norm_param { use_global_stats: true eps: 0.001 } }
layer { name: "bn_batch" type: "BatchNorm" bottom: "x" top: "bn_batch"
        batch_norm_param { use_global_stats: false moving_average_fraction: 0.5 } }
"""


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_use_global_stats(rng, train, key):
    mean, var, s = np.array([0.5, -1.0]), np.array([2.0, 0.25]), 4.0
    blobs = [mean * s, var * s, [s]]  # Caffe stores the sums, divided by the factor at use
    net = load_net(BATCH_NORM, write_net(None, [(n, "BatchNorm", blobs) for n in net_names()]))
    x = rng.normal(size=(4, 2, 1, 3))
    out, state = _run(net, {"x": x}, train=train)

    def normalised(mu, v, eps):
        return (x - mu[None, :, None, None]) / np.sqrt(v[None, :, None, None] + eps)

    batch_mu, batch_var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    _assert_close(out["bn_global"], normalised(mean, var, 1e-3))  # stored, even in training
    _assert_close(out["bn_batch"], normalised(batch_mu, batch_var, 1e-5))  # the batch's, always
    expected = normalised(batch_mu, batch_var, 1e-5) if train else normalised(mean, var, 1e-5)
    _assert_close(out["bn"], expected)  # unset: train decides
    np.testing.assert_array_equal(state["bn_global"]["scale_factor"], [s])  # never updated
    # use_global_stats false updates the statistics in any mode: s <- 0.5 s + 1, and
    # var_acc <- m / (m - 1) var + 0.5 var_acc with m = 4 * 1 * 3 values per channel
    np.testing.assert_allclose(state["bn_batch"]["scale_factor"], [0.5 * s + 1])
    np.testing.assert_allclose(
        state["bn_batch"]["var_acc"], 12 / 11 * batch_var + 0.5 * var * s, rtol=1e-5
    )


def net_names():
    return ("bn", "bn_global", "bn_batch")


# ----------------------------------------------------------------------------- losses, accuracy

LOSSES = """
name: "losses"
input: "scores" input_shape { dim: 2 dim: 3 dim: 1 dim: 2 }
input: "label" input_shape { dim: 2 dim: 1 dim: 1 dim: 2 }
input: "logits" input_shape { dim: 4 dim: 5 }
input: "klass" input_shape { dim: 4 }
input: "a" input_shape { dim: 3 dim: 2 }
input: "b" input_shape { dim: 3 dim: 2 dim: 1 dim: 1 }
input: "sim" input_shape { dim: 3 }
input: "wlabel" input_shape { dim: 6 }
layer { name: "valid" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label"
        top: "valid" top: "prob" loss_param { ignore_label: 2 } }
layer { name: "batch" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label" top: "batch"
        loss_weight: 0.5 loss_param { ignore_label: 2 normalize: false } }
layer { name: "full" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label" top: "full"
        loss_param { ignore_label: 2 normalization: FULL } }
layer { name: "plain" type: "SoftmaxWithLoss" bottom: "logits" bottom: "klass" top: "plain"
        loss_param { normalization: NONE } }
layer { name: "by_w" type: "SoftmaxWithLoss" bottom: "scores" bottom: "wlabel" top: "by_w"
        softmax_param { axis: -1 } }
layer { name: "acc" type: "Accuracy" bottom: "logits" bottom: "klass" top: "acc"
        accuracy_param { top_k: 2 ignore_label: 4 } }
layer { name: "acc_px" type: "Accuracy" bottom: "scores" bottom: "label" top: "acc_px" }
layer { name: "l2" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l2" }
layer { name: "bce" type: "SigmoidCrossEntropyLoss" bottom: "a" bottom: "b" top: "bce" }
layer { name: "pair" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "sim"
        top: "pair" contrastive_loss_param { margin: 2 } }
layer { name: "legacy" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "sim"
        top: "legacy" contrastive_loss_param { margin: 2 legacy_version: true } }
layer { name: "quiet" type: "EuclideanLoss" bottom: "a" bottom: "b" }
"""


def test_loss_and_accuracy_layers():
    net = load_net(LOSSES)
    assert net.loss_weights == {
        "valid": 1.0, "batch": 0.5, "full": 1.0, "plain": 1.0, "l2": 1.0, "bce": 1.0,
        "pair": 1.0, "legacy": 1.0, "quiet (automatic)": 1.0, "by_w": 1.0,
    }  # fmt: skip
    scores = np.array([[[[2.0, 0.0]], [[1.0, 0.0]], [[0.0, 3.0]]],
                       [[[0.5, 1.0]], [[0.5, 2.0]], [[-1.0, 0.0]]]])  # fmt: skip
    label = np.array([0.0, 2.0, 1.0, 1.9]).reshape(2, 1, 1, 2)  # 2 is ignored; 1.9 reads as 1
    logits = np.array([[1, 5, 2, 0, 0], [3, 1, 3, 0, 0], [0, 0, 0, 1, 2], [9, 0, 0, 0, 0.0]])
    klass = np.array([2.0, 0.0, 2.0, 4.0])  # the last is ignored by acc
    a = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    b = np.array([[0.5, 1.0], [0.0, 0.0], [2.0, 0.0]]).reshape(3, 2, 1, 1)
    sim = np.array([1.0, 0.0, 0.0])
    wlabel = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    feed = dict(scores=scores, label=label, logits=logits, klass=klass, a=a, b=b, sim=sim)
    feed["wlabel"] = wlabel
    out, _ = _run(net, feed)
    # SoftmaxWithLoss per position (n, w): -log(softmax(scores[n, :, 0, w])[label])
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    nll = [-np.log(max(p[0, 0, 0, 0], FLT_MIN)), -np.log(p[1, 1, 0, 0]), -np.log(p[1, 1, 0, 1])]
    _assert_close(out["valid"], sum(nll) / 3)  # VALID: the 3 positions not ignored
    _assert_close(out["batch"], sum(nll) / 2)  # normalize: false is BATCH_SIZE, N = 2
    _assert_close(out["full"], sum(nll) / 4)  # FULL: N * H * W
    _assert_close(out["prob"], p)
    # axis -1 (W): the classes run along W, one position per (n, c, h), labels in that order
    pw = np.exp(scores) / np.exp(scores).sum(axis=3, keepdims=True)
    _assert_close(out["by_w"], -np.log(pw.reshape(6, 2)[np.arange(6), [0, 1, 1, 0, 1, 0]]).mean())
    pl = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    _assert_close(out["plain"], -np.log(pl[[0, 1, 2, 3], [2, 0, 2, 4]]).sum())  # NONE: the sum
    # Accuracy top 2, ties against: row 0 (5 > 2) right; row 1 (two 3s, both >= 3) right;
    # row 2 (2 > 1 > 0) wrong; row 3 ignored: 2 of 3
    _assert_close(out["acc"], 2 / 3)
    # per position, top 1, nothing ignored: (0, 0) label 0 of scores (2, 1, 0) right; (0, 1)
    # label 2 of (0, 0, 3) right; (1, 0) label 1 of (0.5, 0.5, -1) a tie, wrong; (1, 1) label
    # 1.9 -> 1 of (1, 2, 0) right
    _assert_close(out["acc_px"], 3 / 4)
    bf = b.reshape(3, 2)
    _assert_close(out["l2"], ((a - bf) ** 2).sum() / (2 * 3))
    bce = np.maximum(a, 0) - a * bf + np.log1p(np.exp(-np.abs(a)))
    _assert_close(out["bce"], bce.sum() / 3)  # BATCH_SIZE by default
    d = np.sqrt(((a - bf) ** 2).sum(axis=1))
    pair = [d[0] ** 2, max(2 - d[1], 0) ** 2, max(2 - d[2], 0) ** 2]
    _assert_close(out["pair"], sum(pair) / 6)
    legacy = [d[0] ** 2, max(2 - d[1] ** 2, 0), max(2 - d[2] ** 2, 0)]
    _assert_close(out["legacy"], sum(legacy) / 6)
    # a loss layer without a top: Caffe's automatic top, in the loss but not an output
    assert "quiet (automatic)" not in net.outputs
    _assert_close(out["quiet (automatic)"], out["l2"])


def test_loss_gradient_reaches_the_scores_not_the_labels():
    net = load_net(LOSSES)
    feed = {
        "scores": jnp.ones((2, 1, 2, 3)), "label": jnp.zeros((2, 1, 2, 1)),
        "logits": jnp.ones((4, 5)), "klass": jnp.zeros((4,)), "a": jnp.ones((3, 2)),
        "b": jnp.zeros((3, 1, 1, 2)), "sim": jnp.ones((3,)), "wlabel": jnp.zeros((6,)),
    }  # fmt: skip

    def loss(scores):
        out, _ = net.model.apply(net.params, net.state, {**feed, "scores": scores})
        return out["valid"]

    g = jax.grad(loss)(feed["scores"])
    # (softmax - onehot) / 4 valid positions: class 0 gets (1/3 - 1) / 4, the others 1/12
    np.testing.assert_allclose(g[..., 0], -1 / 6)
    np.testing.assert_allclose(g[..., 1:], 1 / 12)


# ----------------------------------------------------------------------------- bad parameters

ONE = 'input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }\ninput: "y" input_shape { dim: 2 }\n'


@pytest.mark.parametrize(
    "layer, match",
    [
        ('type: "Log" bottom: "x" top: "t" log_param { base: 1 }', r"'bad' \(Log\).*base=1"),
        ('type: "Exp" bottom: "x" top: "t" exp_param { base: -2 }', r"'bad' \(Exp\).*base"),
        ('type: "Pooling" bottom: "x" top: "t" pooling_param { pool: MEDIAN kernel_size: 2 }',
         r"'bad' \(Pooling\).*pool='MEDIAN'"),
        ('type: "Pooling" bottom: "x" top: "t" '
         "pooling_param { pool: STOCHASTIC kernel_size: 3 pad: 1 }", "pad"),
        ('type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "t" '
         "loss_param { normalization: SOME }", "normalization='SOME'"),
        ('type: "Accuracy" bottom: "x" bottom: "y" top: "t" top: "per_class"',
         "per-class accuracies"),
        ('type: "SoftmaxWithLoss" bottom: "x" top: "t"', r"1 bottoms \['x'\]; .* takes 2"),
        ('type: "EuclideanLoss" bottom: "x" bottom: "x" top: "t" loss_weight: 1 loss_weight: 2',
         "loss_weight"),
        ('type: "ReLU" bottom: "x" top: "t" param { lr_mult: 1 }', "too many params"),
        ('type: "PReLU" bottom: "x" top: "t" prelu_param { filler { type: "magic" } }',
         "'magic'"),
        ('type: "Convolution" bottom: "x" top: "t" convolution_param { kernel_size: 3 }',
         "num_output is required"),
        ('type: "ArgMax" bottom: "x" top: "t" argmax_param { top_k: 0 }', "top_k=0"),
    ],
)  # fmt: skip
def test_bad_layer_parameters_name_the_layer(layer, match):
    with pytest.raises(ValueError, match=match) as err:
        load_net(ONE + 'layer { name: "bad" ' + layer + " }")
    assert "'bad'" in str(err.value)
