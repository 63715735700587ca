"""Caffe's remaining layers (fnlayers.tensor_ops ops, fnlayers.catalogue Layers): values against
numpy transliterations of Caffe's formulas on NCHW blobs, gradients, the init/apply shape
contract, the axis conventions, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import fnlayers as fl
from fnlayers import catalogue as C
from fnlayers import tensor_ops as T


def _nchw(x):
    return np.moveaxis(np.asarray(x), -1, 1)


def _nhwc(b):
    return np.moveaxis(np.asarray(b), 1, -1)


# ----------------------------------------------------------------------------- the contract

LAYERS = [
    (C.Slice((1, 3)), (2, 3, 4, 5)),
    (C.Slice(num_outputs=2, axis=1, caffe_axes=True), (2, 3, 4, 6)),
    (C.Split(3), (2, 5)),
    (C.Crop(offset=(1, 2)), ((2, 6, 7, 3), (2, 4, 4, 9))),
    (C.Crop(axis=1, offset=(0, 1, 2), caffe_axes=True), ((2, 6, 7, 5), (2, 4, 4, 3))),
    (C.Flatten(), (2, 3, 4, 5)),
    (C.Flatten(axis=1, end_axis=2, caffe_axes=True), (2, 3, 4, 5)),
    (C.Reshape((0, -1, 4)), (2, 3, 4, 4)),
    (C.Reshape((2, -1), axis=1, num_axes=1, caffe_axes=True), (2, 3, 4, 6)),
    (C.Softmax(), (2, 3, 4, 5)),
    (C.Scale(bias=True), (2, 3, 4, 5)),
    (C.Scale(axis=1, num_axes=2, caffe_axes=True), (2, 3, 4, 5)),
    (C.Scale(axis=1, bias=True), ((2, 3, 4, 5), (3, 4))),
    (C.Bias(), (2, 3, 4, 5)),
    (C.Bias(axis=1), ((2, 3, 4, 5), (3, 4, 5))),
    (C.Power(2.0, scale=0.5, shift=1.0), (2, 3)),
    (C.AbsVal(), (2, 3)),
    (C.BNLL(), (2, 3)),
    (C.Exp(base=2.0), (2, 3)),
    (C.Log(shift=10.0), (2, 3)),
    (C.Threshold(0.5), (2, 3)),
    (C.ArgMax(2, out_max_val=True), (2, 3, 4, 5)),
    (C.ArgMax(3), (2, 7)),
    (C.ArgMax(2, axis=-1), (2, 3, 4, 5)),
    (C.InnerProduct(6), (2, 3, 4, 5)),
    (C.InnerProduct(6, axis=-1, transpose=True, bias=False), (2, 3, 4, 5)),
    (C.InnerProduct(6, axis=2, caffe_axes=True), (2, 3, 4, 5)),
    (C.Input((-1, 3, 4)), (2, 3, 4)),
]


def _ones(shape):
    if isinstance(shape[0], tuple):
        return tuple(jnp.ones(s) + 1 for s in shape)
    return jnp.ones(shape) + 1


def _with_unknown_batch(shape):
    if isinstance(shape[0], tuple):  # the second input (a scale, a reference) keeps its shape
        return ((-1, *shape[0][1:]), *shape[1:])
    return (-1, *shape[1:])


def _unknown(out):
    if isinstance(out, tuple) and out and isinstance(out[0], tuple):
        return tuple(_unknown(o) for o in out)
    return (-1, *out[1:])


@pytest.mark.parametrize(
    "layer,in_shape", LAYERS, ids=lambda v: repr(v) if hasattr(v, "init") else ""
)
def test_apply_shape_equals_init_shape(key, layer, in_shape):
    out_shape, params, state = layer.init(key, in_shape)
    y, new_state = layer.apply(params, state, _ones(in_shape))
    assert jax.tree.map(lambda a: tuple(a.shape), y) == out_shape
    assert new_state == state
    # the batch may be unknown at init time
    out_unknown, p2, _ = layer.init(key, _with_unknown_batch(in_shape))
    assert out_unknown == _unknown(out_shape)
    assert jax.tree.map(jnp.shape, p2) == jax.tree.map(jnp.shape, params)


def test_silence_consumes_and_returns_nothing(key):
    layer = C.Silence()
    out_shape, params, state = layer.init(key, ((2, 3), (4,)))
    assert out_shape is None and params == {} and state == {}
    assert layer.apply(params, state, (jnp.ones((2, 3)), jnp.ones(4)))[0] is None
    assert T.silence(jnp.ones(3)) is None


def test_input_declares_its_shape(key):
    layer = C.Input((-1, 28, 28, 1))
    assert layer.init(key)[0] == (-1, 28, 28, 1)
    assert layer.init(key, (64, 28, 28, 1))[0] == (64, 28, 28, 1)
    assert layer.init(key, (-1, 28, 28, 1))[0] == (-1, 28, 28, 1)
    x = jnp.ones((3, 28, 28, 1))
    assert layer.apply({}, {}, x)[0] is x
    with pytest.raises(ValueError, match=r"Input: the input of shape \(3, 28, 28, 2\) does not"):
        layer.apply({}, {}, jnp.ones((3, 28, 28, 2)))
    with pytest.raises(ValueError, match="Input: in_shape=.* does not match"):
        layer.init(key, (64, 27, 28, 1))
    two = C.Input(((-1, 4), (-1,)))
    assert two.init(key)[0] == ((-1, 4), (-1,))


def test_repr_and_serial(key):
    net = fl.serial(
        C.Input((-1, 4, 4, 3)),
        C.InnerProduct(5, transpose=True, name="ip"),
        C.Softmax(),
    )
    assert repr(C.InnerProduct(5, transpose=True)) == "InnerProduct(5, transpose=True)"
    assert repr(C.Slice((1, 2), axis=1)) == "Slice((1, 2), axis=1)"
    assert repr(C.Exp(base=2.0)) == "Exp(base=2.0)"
    assert "ip: InnerProduct(5, transpose=True)" in repr(net)
    out, params, state = net.init(key, (-1, 4, 4, 3))
    assert out == (-1, 5) and params["ip"]["w"].shape == (48, 5)
    y, _ = net.apply(params, state, jnp.ones((2, 4, 4, 3)))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- axis conventions


def test_caffe_axis_mapping():
    assert [T.caffe_axis(a, 4) for a in range(4)] == [0, 3, 1, 2]
    assert [T.caffe_axis(a, 5) for a in range(5)] == [0, 4, 1, 2, 3]
    assert [T.caffe_axis(a, 2) for a in range(2)] == [0, 1]
    assert T.caffe_axis(-1, 4) == 2  # Caffe's last axis, W
    x = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    blob = np.asarray(T.to_caffe_blob(x))
    assert blob.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(blob[1, 4, 2, 3], x[1, 2, 3, 4])
    np.testing.assert_array_equal(T.from_caffe_blob(blob), x)
    # every axis of Caffe's blob is the mapped axis of the array
    for a in range(4):
        assert blob.shape[a] == x.shape[T.caffe_axis(a, 4)]
    with pytest.raises(
        ValueError, match=r"caffe_axis: axis=4 is out of range for an input of rank 4"
    ):
        T.caffe_axis(4, 4)


def test_flatten_in_caffes_order_equals_caffe_element_for_element(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # NHWC
    caffe_top = _nchw(x).reshape(2, -1)  # Caffe's Flatten of the NCHW blob
    np.testing.assert_array_equal(T.flatten_axes(x, caffe_axes=True), caffe_top)
    # by default the array's own order, as fl.flatten
    np.testing.assert_array_equal(T.flatten_axes(x), np.asarray(fl.flatten(jnp.asarray(x))))
    # a partial range: Caffe's axes 2..3 (H, W) of (N, C, H, W) -> (N, C, H*W)
    y = T.flatten_axes(x, 2, 3, caffe_axes=True)
    np.testing.assert_array_equal(T.to_caffe_blob(y), _nchw(x).reshape(2, 5, 12))
    assert T.flatten_axes(x, 1, 2).shape == (2, 12, 5)


def test_reshape_semantics(rng):
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    assert T.reshape(x, (0, -1)).shape == (2, 72)
    assert T.reshape(x, (0, 0, -1)).shape == (2, 3, 24)
    assert T.reshape(x, (-1,), axis=1, num_axes=2).shape == (2, 12, 6)
    assert T.reshape(x, (1,), axis=1, num_axes=0).shape == (2, 1, 3, 4, 6)  # insert an axis
    assert T.reshape(x, (1, 1), axis=-1, num_axes=0).shape == (2, 3, 4, 6, 1, 1)  # append
    np.testing.assert_array_equal(T.reshape(x, (0, -1)), x.reshape(2, -1))
    # Caffe's order: reshape the NCHW blob, hand back channels last
    y = T.reshape(x, (0, 2, 3, -1), caffe_axes=True)
    np.testing.assert_array_equal(T.to_caffe_blob(y), _nchw(x).reshape(2, 2, 3, 12))
    assert T.reshape_shape((2, 3, 4), (0, -1, 2)) == (2, 6, 2)


def test_slice(rng):
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    a, b, c = T.slice_axis(x, (1, 4))
    np.testing.assert_array_equal(a, x[..., :1])
    np.testing.assert_array_equal(b, x[..., 1:4])
    np.testing.assert_array_equal(c, x[..., 4:])
    parts = T.slice_axis(x, num_outputs=3)
    assert [p.shape[-1] for p in parts] == [2, 2, 2]
    # Caffe's axis 1 (channels) is the last axis here; Caffe's axis 2 (H) is axis 1
    for p, q in zip(
        T.slice_axis(x, (2,), axis=1, caffe_axes=True), T.slice_axis(x, (2,)), strict=True
    ):
        np.testing.assert_array_equal(p, q)
    blob_parts = np.split(_nchw(x), [1], axis=2)
    for p, q in zip(T.slice_axis(x, (1,), axis=2, caffe_axes=True), blob_parts, strict=True):
        np.testing.assert_array_equal(T.to_caffe_blob(p), q)
    assert len(T.slice_axis(x, num_outputs=1)) == 1


def test_split_copies_and_sums_gradients():
    x = jnp.arange(3.0)
    ys = T.split_copies(x, 3)
    assert len(ys) == 3 and all((y == x).all() for y in ys)
    g = jax.grad(
        lambda x: sum(
            (w * y).sum() for w, y in zip((1.0, 2.0, 4.0), T.split_copies(x, 3), strict=True)
        )
    )(x)
    np.testing.assert_array_equal(g, [7.0, 7.0, 7.0])


def test_crop(rng):
    x = rng.standard_normal((2, 6, 7, 3)).astype(np.float32)
    ref = np.zeros((5, 4, 4, 9), np.float32)
    y = T.crop(x, ref, offset=(1, 2))  # H and W, channels and batch kept
    np.testing.assert_array_equal(y, x[:, 1:5, 2:6, :])
    np.testing.assert_array_equal(T.crop(x, ref.shape, offset=1), x[:, 1:5, 1:5, :])
    # Caffe: crop the NCHW blob from axis 2 (its default) with Caffe's offsets
    ref2 = np.zeros((2, 3, 4, 5), np.float32)  # NHWC (N, H, W, C): Caffe blob (2, 5, 3, 4)
    x2 = rng.standard_normal((2, 6, 7, 5)).astype(np.float32)
    y2 = T.crop(x2, ref2, axis=2, offset=(2, 1), caffe_axes=True)
    np.testing.assert_array_equal(T.to_caffe_blob(y2), _nchw(x2)[:, :, 2:5, 1:5])
    np.testing.assert_array_equal(y2, T.crop(x2, ref2, axis=1, end_axis=2, offset=(2, 1)))
    # no gradient to the reference; the gradient to x is the crop's scatter
    g = jax.grad(lambda x: T.crop(x, ref, offset=(1, 2)).sum())(jnp.asarray(x))
    expect = np.zeros_like(x)
    expect[:, 1:5, 2:6, :] = 1
    np.testing.assert_array_equal(g, expect)


# ----------------------------------------------------------------------------- softmax, scale, bias


def test_softmax(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(
        T.softmax(x.astype(np.float32)), e / e.sum(-1, keepdims=True), rtol=1e-5
    )
    # Caffe's axis 1 is the channels; Caffe's axis 2 is H (axis 1 here)
    np.testing.assert_allclose(T.softmax(x, 1, caffe_axes=True), T.softmax(x, -1), rtol=1e-6)
    np.testing.assert_allclose(T.softmax(x, 2, caffe_axes=True), T.softmax(x, 1), rtol=1e-6)
    big = jnp.asarray([[1000.0, 0.0]])
    np.testing.assert_allclose(T.softmax(big), [[1.0, 0.0]])
    check_grads(
        lambda x: T.softmax(x, 1), (jnp.asarray(x, jnp.float32),), order=2, atol=1e-2, rtol=1e-2
    )


def test_scale_and_bias(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    s = rng.standard_normal(5).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    np.testing.assert_allclose(T.scale(x, s, b), x * s + b, rtol=1e-6)
    np.testing.assert_allclose(T.bias(x, b), x + b, rtol=1e-6)
    np.testing.assert_allclose(T.scale(x, np.float32(3.0)), 3 * x, rtol=1e-6)  # num_axes 0
    # second-bottom form over (H, W): axis 1 here
    hw = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(T.scale(x, hw, axis=1), x * hw[None, :, :, None], rtol=1e-6)
    # Caffe's axis 1, num_axes 2 on the NCHW blob: a (C, H) scale
    ch = rng.standard_normal((5, 3)).astype(np.float32)
    caffe_top = _nchw(x) * ch[None, :, :, None]
    np.testing.assert_allclose(
        T.to_caffe_blob(T.scale(x, ch, axis=1, caffe_axes=True)), caffe_top, rtol=1e-6
    )
    np.testing.assert_allclose(
        T.to_caffe_blob(T.bias(x, ch, axis=1, caffe_axes=True)),
        _nchw(x) + ch[None, :, :, None],
        rtol=1e-6,
    )
    check_grads(
        lambda x, s, b: T.scale(x, s, b, axis=1), (x, hw, hw), order=2, atol=1e-2, rtol=1e-2
    )
    check_grads(lambda x, b: T.bias(x, b), (x, b), order=1, atol=1e-2, rtol=1e-2)


def test_scale_layer_forms(key, rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
    layer = C.Scale(bias=True)
    _, params, state = layer.init(key, x.shape)
    np.testing.assert_array_equal(params["scale"], np.ones(5))
    np.testing.assert_array_equal(params["bias"], np.zeros(5))
    np.testing.assert_allclose(layer.apply(params, state, x)[0], x)
    # the second input is the scale; bias_term still learned, shaped like it
    two = C.Scale(axis=1, bias=True)
    s = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    _, p2, _ = two.init(key, (x.shape, s.shape))
    assert list(p2) == ["bias"] and p2["bias"].shape == (3, 4)
    y, _ = two.apply(p2, {}, (x, s))
    np.testing.assert_allclose(y, x * s[None, :, :, None], rtol=1e-6)
    # Bias, two inputs: no params
    _, p3, _ = C.Bias(axis=1).init(key, (x.shape, (3, 4, 5)))
    assert p3 == {}
    # Caffe's ParamSpec order (scale, bias)
    net = fl.serial(C.Scale(bias=True, lr_mult=(1, 2), name="sc"))
    lr, _ = fl.param_mults(net)
    _, params, _ = net.init(key, x.shape)
    assert jax.tree_util.tree_map_with_path(lr, params) == {"sc": {"bias": 2.0, "scale": 1.0}}


# ----------------------------------------------------------------------------- elementwise


X = np.asarray([-3.0, -1.5, -0.25, 0.5, 1.0, 2.5], np.float32)


def test_power():
    np.testing.assert_allclose(T.power(X, 2.0, 0.5, 1.0), (1 + 0.5 * X) ** 2, rtol=1e-6)
    np.testing.assert_allclose(T.power(X, 3.0), X**3, rtol=1e-6)
    np.testing.assert_allclose(T.power(X, 1.0, -2.0, 1.0), 1 - 2 * X, rtol=1e-6)
    np.testing.assert_array_equal(T.power(X, 0.0, 3.0, 2.0), np.ones(6))  # power 0: 1
    np.testing.assert_array_equal(T.power(X, 2.0, 0.0, 3.0), np.full(6, 9.0))  # scale 0: shift^p
    assert np.isnan(T.power(np.float32([-1.0]), 0.5)).all()  # std::pow
    check_grads(lambda x: T.power(x, 2.0, 0.5, 1.0), (jnp.asarray(X),), order=2, rtol=1e-2)
    check_grads(lambda x: T.power(x, 1.5, 1.0, 4.0), (jnp.asarray(X),), order=2, rtol=1e-2)
    assert float(jax.grad(lambda x: T.power(x, 0.0, 2.0, 1.0).sum())(jnp.float32(1.0))) == 0.0


def test_absval():
    np.testing.assert_array_equal(T.absval(X), np.abs(X))
    g = jax.grad(lambda x: T.absval(x).sum())(jnp.asarray([-2.0, 0.0, 3.0]))
    np.testing.assert_array_equal(g, [-1.0, 0.0, 1.0])  # Caffe: sign(x), 0 at 0


def test_bnll_matches_caffe_and_is_stable():
    x = X.astype(np.float64)
    caffe = np.where(x > 0, x + np.log(1 + np.exp(-x)), np.log(1 + np.exp(x)))
    np.testing.assert_allclose(T.bnll(X), caffe, rtol=1e-6)
    big = jnp.asarray([-200.0, -100.0, 0.0, 100.0, 200.0])
    y = T.bnll(big)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(y, [0.0, 0.0, np.log(2.0), 100.0, 200.0], atol=1e-6)
    g = jax.grad(lambda x: T.bnll(x).sum())(big)
    np.testing.assert_allclose(g, 1 / (1 + np.exp(-np.asarray(big, np.float64))), atol=1e-6)
    check_grads(T.bnll, (jnp.asarray(X),), order=2, rtol=1e-2)


def test_exp_and_log():
    np.testing.assert_allclose(T.exp(X), np.exp(X), rtol=1e-6)
    np.testing.assert_allclose(T.exp(X, 2.0, 0.5, 1.0), 2.0 ** (1 + 0.5 * X), rtol=1e-6)
    np.testing.assert_allclose(T.exp(X, -1.0, 2.0, -1.0), np.exp(-1 + 2 * X), rtol=1e-6)
    pos = np.asarray([0.5, 1.0, 2.0, 8.0], np.float32)
    np.testing.assert_allclose(T.log(pos), np.log(pos), rtol=1e-6)
    np.testing.assert_allclose(T.log(pos, 2.0), np.log2(pos), rtol=1e-6)
    np.testing.assert_allclose(T.log(X, 10.0, 2.0, 7.0), np.log10(7 + 2 * X), rtol=1e-6)
    assert float(T.log(np.float32([0.0]))[0]) == -np.inf
    check_grads(lambda x: T.exp(x, 2.0, 0.5, 1.0), (jnp.asarray(X),), order=2, rtol=1e-2)
    check_grads(lambda x: T.log(x, 10.0, 2.0, 7.0), (jnp.asarray(X),), order=2, rtol=1e-2)


def test_threshold():
    np.testing.assert_array_equal(T.threshold(X), (X > 0).astype(np.float32))
    np.testing.assert_array_equal(T.threshold(X, 0.5), [0, 0, 0, 0, 1, 1])  # x > t, not >=
    assert T.threshold(X.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- argmax


def test_argmax_caffe_layout_and_ties():
    x = jnp.asarray([[1.0, 5.0, 5.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    y = T.argmax(x, 2, out_max_val=True)
    assert y.shape == (2, 2, 2)  # (N, indices/values, top_k)
    # ties go to the larger index, as std::greater on (value, index) pairs
    np.testing.assert_array_equal(y[0], [[2.0, 1.0], [5.0, 5.0]])
    np.testing.assert_array_equal(y[1], [[4.0, 3.0], [0.0, 0.0]])
    np.testing.assert_array_equal(T.argmax(x), [[[2.0]], [[4.0]]])
    # 4-D: Caffe's top has the input's rank, (N, 2, top_k, 1); indices in the flattening order
    img = jnp.zeros((1, 2, 2, 3)).at[0, 0, 1, 2].set(1.0)  # NHWC (h=0, w=1, c=2)
    assert T.argmax(img, 1, out_max_val=True).shape == (1, 2, 1, 1)
    assert float(T.argmax(img)[0, 0, 0, 0]) == (0 * 2 + 1) * 3 + 2  # (H, W, C) order
    assert float(T.argmax(img, caffe_axes=True)[0, 0, 0, 0]) == (2 * 2 + 0) * 2 + 1  # (C, H, W)


def test_argmax_along_an_axis(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    idx = T.argmax(x, 2, axis=-1)
    order = np.argsort(-x, axis=-1)[..., :2]
    np.testing.assert_array_equal(idx, order.astype(np.float32))
    vals = T.argmax(x, 2, axis=1, out_max_val=True)
    np.testing.assert_array_equal(vals, -np.sort(-x, axis=1)[:, :2])
    np.testing.assert_array_equal(T.argmax(x, axis=1, caffe_axes=True), T.argmax(x, axis=-1))


# ----------------------------------------------------------------------------- inner product


def test_inner_product_matches_caffe(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    w = rng.standard_normal((6, 60)).astype(np.float32)  # Caffe's blob (N_out, K)
    b = rng.standard_normal(6).astype(np.float32)
    # Caffe on the NCHW blob: K in (C, H, W) order, y = x_flat @ W^T + b
    caffe_top = _nchw(x).reshape(2, 60) @ w.T + b
    y = T.inner_product(x, w, b, caffe_axes=True)
    np.testing.assert_allclose(y, caffe_top, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        T.inner_product(x, w.T, b, transpose=True, caffe_axes=True), y, rtol=1e-6
    )
    # default: the array's own order, = fl.dense with the (K, C_out) weight
    np.testing.assert_allclose(
        T.inner_product(x, w, b),
        fl.dense(jnp.asarray(x), jnp.asarray(w.T), jnp.asarray(b)),
        rtol=1e-6,
    )
    # axis: keep the leading axes, per-position product over the channels
    wc = rng.standard_normal((7, 5)).astype(np.float32)
    np.testing.assert_allclose(T.inner_product(x, wc, axis=-1), x @ wc.T, rtol=1e-5, atol=1e-5)
    # Caffe's axis 2 of (N, C, H, W): K = H*W, output blob (N, C, N_out)
    w2 = rng.standard_normal((7, 12)).astype(np.float32)
    y2 = T.inner_product(x, w2, axis=2, caffe_axes=True)
    np.testing.assert_allclose(
        T.to_caffe_blob(y2), _nchw(x).reshape(2, 5, 12) @ w2.T, rtol=1e-5, atol=1e-5
    )
    check_grads(
        lambda x, w, b: T.inner_product(x, w, b, caffe_axes=True),
        (x, w, b),
        order=1,
        atol=1e-2,
        rtol=1e-2,
    )


def test_inner_product_layer_stores_caffes_blob(key):
    _, p, _ = C.InnerProduct(10).init(key, (-1, 4, 4, 3))
    assert p["w"].shape == (10, 48) and p["b"].shape == (10,)
    _, pt, _ = C.InnerProduct(10, transpose=True).init(key, (-1, 4, 4, 3))
    assert pt["w"].shape == (48, 10)
    # xavier on Caffe's blob: fan_in = count / shape[0] = K (limit sqrt(3 / 48))
    assert float(jnp.abs(p["w"]).max()) <= np.sqrt(3 / 48) + 1e-6
    assert float(jnp.abs(p["w"]).max()) > np.sqrt(3 / 48) * 0.8


# ----------------------------------------------------------------------------- bad inputs

A = jnp.ones((2, 3, 4, 5))

BAD = [
    (
        lambda: T.slice_axis(A, (2, 2)),
        ValueError,
        r"slice_axis: slice_point=\(2, 2\) must be strictly increasing within \(0, 5\)",
    ),
    (
        lambda: T.slice_axis(A, (6,)),
        ValueError,
        r"slice_axis: slice_point=\(6,\) must be strictly increasing",
    ),
    (
        lambda: T.slice_axis(A, num_outputs=2),
        ValueError,
        "slice_axis: num_outputs=2 does not divide the sliced axis of size 5",
    ),
    (lambda: T.slice_axis(A), ValueError, "slice_axis: give slice_point or num_outputs"),
    (
        lambda: T.slice_axis(A, (1,), num_outputs=3),
        ValueError,
        r"num_outputs=3 disagrees with slice_point=\(1,\)",
    ),
    (
        lambda: T.slice_axis(A, (1,), axis=4),
        ValueError,
        "slice_axis: axis=4 is out of range for an input of rank 4",
    ),
    (lambda: T.slice_axis(A, (1.5,)), TypeError, "slice_axis: slice_point=1.5 must be an int"),
    (
        lambda: T.split_copies(A, 0),
        ValueError,
        "split_copies: num_outputs=0 must be a positive int",
    ),
    (
        lambda: T.crop(A, (2, 4, 4, 5)),
        ValueError,
        "crop: offset 0 plus the reference size 4 on axis 1 runs past x's size 3",
    ),
    (
        lambda: T.crop(A, (2, 3)),
        ValueError,
        r"crop: x has shape \(2, 3, 4, 5\) \(rank 4\) but reference has shape \(2, 3\)",
    ),
    (
        lambda: T.crop(A, (2, 1, 1, 5), offset=(1, 2, 3)),
        ValueError,
        r"crop: offset=\(1, 2, 3\) gives 3 offsets for the 2 cropped axes",
    ),
    (lambda: T.crop(A, (2, 1, 1, 5), offset=-1), ValueError, "crop: offset=-1 must be >= 0"),
    (
        lambda: T.crop(A, (2, 1, 1, 5), end_axis=2, caffe_axes=True),
        ValueError,
        "crop: end_axis=2 with caffe_axes=True",
    ),
    (lambda: T.crop(A, "x"), TypeError, "crop: reference must be an array or a shape, got str"),
    (lambda: T.flatten_axes(A, 2, 1), ValueError, "flatten_axes: end_axis=1 comes before axis=2"),
    (
        lambda: T.flatten_axes(A, 1, caffe_axes=1),
        TypeError,
        "flatten_axes: caffe_axes=1 must be a bool",
    ),
    (
        lambda: T.reshape(A, (7, -1)),
        ValueError,
        "reshape: the input's 120 elements .* are not divisible by 7",
    ),
    (lambda: T.reshape(A, (-1, -1)), ValueError, "more than one -1"),
    (
        lambda: T.reshape(A, (2, 60, 2)),
        ValueError,
        r"reshape: shape=\(2, 60, 2\) makes \(2, 60, 2\) \(240 elements\)",
    ),
    (
        lambda: T.reshape(A, (0, 0, 0, 0, 0)),
        ValueError,
        "has a 0 at position 4 but the input .* has no axis 4 to copy",
    ),
    (lambda: T.reshape(A, (-2,)), ValueError, r"reshape: shape=\(-2,\): dims must be"),
    (
        lambda: T.reshape(A, (1,), axis=2, num_axes=3),
        ValueError,
        "reshape: axis=2, num_axes=3 run past the input's rank 4",
    ),
    (
        lambda: T.softmax(jnp.ones(3, jnp.int32)),
        TypeError,
        "softmax: x must have a floating dtype, got int32",
    ),
    (lambda: T.softmax(A, axis=-5), ValueError, "softmax: axis=-5 is out of range"),
    (lambda: T.scale(A, jnp.ones(4)), ValueError, r"scale: s has shape \(4,\) but x has \(5,\)"),
    (
        lambda: T.scale(A, jnp.ones(5), jnp.ones(4)),
        ValueError,
        r"scale: b has shape \(4,\), expected s's shape \(5,\)",
    ),
    (
        lambda: T.scale(A, jnp.ones(5, jnp.bfloat16)),
        TypeError,
        "scale: x has dtype float32 but s has dtype bfloat16",
    ),
    (
        lambda: T.bias(A, jnp.ones((4, 5)), axis=1),
        ValueError,
        r"bias: b has shape \(4, 5\) but x has \(3, 4\)",
    ),
    (lambda: T.power(A, "2"), TypeError, "power: power='2' must be a real number"),
    (lambda: T.power(A, 2.0, scale=float("nan")), ValueError, "power: scale=nan must be finite"),
    (lambda: T.exp(A, base=0.0), ValueError, r"exp: base=0.0 must be -1 \(for e\) or positive"),
    (lambda: T.log(A, base=1.0), ValueError, "log: base=1.0 must not be 1"),
    (lambda: T.threshold(A, True), TypeError, "threshold: threshold=True must be a real number"),
    (
        lambda: T.argmax(A, 61),
        ValueError,
        "argmax: top_k=61 is more than the 60 entries per example",
    ),
    (lambda: T.argmax(A, 6, axis=-1), ValueError, "argmax: top_k=6 is more than axis 3 of size 5"),
    (lambda: T.argmax(A, 0), ValueError, "argmax: top_k=0 must be a positive int"),
    (
        lambda: T.inner_product(A, jnp.ones((6, 59))),
        ValueError,
        r"inner_product: w has shape \(6, 59\), expected \(C_out, K\) with K=60",
    ),
    (
        lambda: T.inner_product(A, jnp.ones((6, 60)), transpose=True),
        ValueError,
        r"expected \(K, C_out\) with transpose=True with K=60",
    ),
    (
        lambda: T.inner_product(A, jnp.ones((6, 60)), jnp.ones(5)),
        ValueError,
        r"inner_product: b has shape \(5,\), expected \(6,\)",
    ),
    (
        lambda: T.inner_product(A, jnp.ones((6, 60), jnp.bfloat16)),
        TypeError,
        "inner_product: x has dtype float32 but w has dtype bfloat16",
    ),
    (lambda: C.Slice(), ValueError, "Slice: give slice_point or num_outputs"),
    (lambda: C.Slice(num_outputs=0), ValueError, "Slice: num_outputs=0 must be a positive int"),
    (lambda: C.Slice("12"), TypeError, "Slice: slice_point='12' must be a sequence of ints"),
    (lambda: C.Split(0), ValueError, "Split: copies=0 must be a positive int"),
    (lambda: C.Crop(axis=1.0), TypeError, "Crop: axis=1.0 must be an int"),
    (
        lambda: C.Reshape((2, -3)),
        ValueError,
        r"Reshape: shape=-3 must be >= -1 \(0 copies, -1 infers\)",
    ),
    (lambda: C.Softmax(axis=None), TypeError, "Softmax: axis=None must be an int"),
    (lambda: C.Scale(num_axes=-2), ValueError, "Scale: num_axes=-2 must be >= -1"),
    (lambda: C.Scale(bias=1), TypeError, "Scale: bias=1 must be a bool"),
    (lambda: C.Power(scale="x"), TypeError, "Power: scale='x' must be a real number"),
    (lambda: C.Exp(base=-2.0), ValueError, r"Exp: base=-2.0 must be -1 \(for e\) or positive"),
    (lambda: C.Log(base=1), ValueError, "Log: base=1 must not be 1"),
    (lambda: C.Threshold("0"), TypeError, "Threshold: threshold='0' must be a real number"),
    (lambda: C.ArgMax(0), ValueError, "ArgMax: top_k=0 must be a positive int"),
    (lambda: C.InnerProduct(0), ValueError, "InnerProduct: num_output=0 must be a positive int"),
    (
        lambda: C.InnerProduct(3, transpose="yes"),
        TypeError,
        "InnerProduct: transpose='yes' must be a bool",
    ),
    (lambda: C.Input("x"), TypeError, "Input: shape='x' must be a shape"),
    (lambda: C.Input((-2, 3)), ValueError, "Input: shape=.*dims must be >= 0, or -1"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_layer_init_and_apply_errors(key):
    with pytest.raises(ValueError, match="Crop: in_shape=.* must be a pair of shapes"):
        C.Crop().init(key, (2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"Scale: axis=1, num_axes=4 run past the input's rank 4"):
        C.Scale(axis=1, num_axes=4).init(key, (2, 3, 4, 5))
    with pytest.raises(ValueError, match="Scale: the parameter would cover the unknown batch axis"):
        C.Scale(axis=0).init(key, (-1, 3))
    with pytest.raises(ValueError, match="InnerProduct: axis=0 puts the unknown batch axis"):
        C.InnerProduct(3, axis=0).init(key, (-1, 3))
    with pytest.raises(
        ValueError, match="Reshape: with an unknown batch.*depends on the batch size"
    ):
        C.Reshape((2, -1)).init(key, (-1, 4, 5))
    # parameter shapes are checked against the input at apply, with the parameter's path
    _, p, s = C.InnerProduct(4).init(key, (2, 3))
    with pytest.raises(ValueError, match=r"w: InnerProduct: expected shape \(4, 5\) \(C_out, K\)"):
        C.InnerProduct(4).apply(p, s, jnp.ones((2, 5)))
    net = fl.serial(C.Scale(name="sc"))
    _, p, s = net.init(key, (2, 3))
    with pytest.raises(ValueError, match=r"sc/scale: Scale: expected shape \(4,\)"):
        net.apply(p, s, jnp.ones((2, 4)))
    with pytest.raises(
        ValueError,
        match=r"Crop: expects the input \(x, reference\), got ArrayImpl",
    ):
        C.Crop().apply({}, {}, jnp.ones((2, 3)))
