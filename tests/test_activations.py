"""Activations (§7) with Caffe's gradient conventions, and maxout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fnlayers.activations import elu, maxout, prelu, relu, sigmoid, tanh

X = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])


def test_relu_values_and_gradient_at_zero():
    np.testing.assert_array_equal(relu(jnp.asarray(X)), [0, 0, 0, 0.5, 3])
    np.testing.assert_allclose(relu(jnp.asarray(X), 0.1), [-0.2, -0.05, 0, 0.5, 3], rtol=1e-6)
    g = jax.vmap(jax.grad(relu))(jnp.asarray(X))
    np.testing.assert_array_equal(g, [0, 0, 0, 1, 1])
    g = jax.vmap(jax.grad(lambda x: relu(x, 0.1)))(jnp.asarray(X))
    np.testing.assert_allclose(g, [0.1, 0.1, 0.1, 1, 1], rtol=1e-6)  # slope ns at x = 0
    assert not np.signbit(relu(jnp.asarray([-1.0]))).any()  # +0, as max(x, 0)
    assert jnp.isnan(relu(jnp.asarray([jnp.nan]))).all()


def test_prelu_per_channel_and_shared():
    x = jnp.asarray([[-1.0, -2.0, 3.0], [4.0, 0.0, -6.0]])
    alpha = jnp.asarray([0.1, 0.2, 0.3])
    np.testing.assert_allclose(prelu(x, alpha), [[-0.1, -0.4, 3.0], [4.0, 0.0, -1.8]], rtol=1e-6)
    np.testing.assert_allclose(
        prelu(x, jnp.asarray(0.5)), [[-0.5, -1.0, 3.0], [4.0, 0.0, -3.0]], rtol=1e-6
    )
    # NHWC: alpha applies to the last axis.
    x4 = -jnp.ones((2, 3, 3, 3))
    np.testing.assert_allclose(prelu(x4, alpha)[1, 2, 0], -alpha, rtol=1e-6)


def test_prelu_gradients_follow_caffe(rng):
    x = jnp.asarray([[-1.0, 0.0, 2.0], [3.0, -4.0, 0.0]])
    alpha = jnp.asarray([0.25, 0.5, 0.75])
    dy = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    _, vjp = jax.vjp(prelu, x, alpha)
    gx, ga = vjp(dy)
    # dx = dy * ((x > 0) + alpha * (x <= 0)); dalpha_c = sum dy * x * (x <= 0).
    xn, an, dn = np.asarray(x), np.asarray(alpha), np.asarray(dy)
    np.testing.assert_allclose(gx, dn * ((xn > 0) + an * (xn <= 0)))
    np.testing.assert_allclose(ga, (dn * xn * (xn <= 0)).sum(axis=0))
    _, vjp = jax.vjp(prelu, x, jnp.asarray(0.25))
    np.testing.assert_allclose(vjp(dy)[1], (dn * xn * (xn <= 0)).sum())


def test_elu_values_and_gradient():
    x = jnp.asarray(X)
    expected = np.where(X > 0, X, 2.0 * (np.exp(np.minimum(X, 0)) - 1))
    np.testing.assert_allclose(elu(x, 2.0), expected, rtol=1e-6)
    g = jax.vmap(jax.grad(lambda x: elu(x, 2.0)))(x)
    # Caffe: 1 for x > 0, y + alpha for x <= 0 (alpha at 0).
    np.testing.assert_allclose(g, np.where(X > 0, 1.0, expected + 2.0), rtol=1e-6)
    assert float(g[2]) == 2.0


def test_sigmoid_and_tanh():
    x = jnp.linspace(-8.0, 8.0, 17)
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-np.asarray(x, np.float64))), atol=1e-6)
    np.testing.assert_allclose(tanh(x), np.tanh(np.asarray(x, np.float64)), atol=1e-6)
    assert float(sigmoid(jnp.asarray(0.0))) == 0.5


def test_maxout_values_and_first_max_gradient():
    x = jnp.asarray([[1.0, 5.0, 3.0, 2.0, 7.0, 7.0]])
    np.testing.assert_array_equal(maxout(x, 2), [[5.0, 3.0, 7.0]])
    np.testing.assert_array_equal(maxout(x, 3), [[5.0, 7.0]])
    g = jax.grad(lambda x: maxout(x, 2).sum())(x)
    np.testing.assert_array_equal(g, [[0, 1, 1, 0, 1, 0]])  # the tie goes to the first piece
    x4 = jnp.arange(2 * 3 * 3 * 8.0).reshape(2, 3, 3, 8)
    y = maxout(x4, 4)
    assert y.shape == (2, 3, 3, 2)
    np.testing.assert_array_equal(y, np.asarray(x4).reshape(2, 3, 3, 2, 4).max(axis=-1))
    assert jnp.isnan(maxout(jnp.asarray([1.0, jnp.nan]), 2)).all()


def _ops():
    return {
        "relu": lambda x: relu(x, 0.1),
        "prelu": lambda x: prelu(x, jnp.linspace(0.1, 0.4, 4).astype(x.dtype)),
        "elu": lambda x: elu(x, 1.5),
        "sigmoid": sigmoid,
        "tanh": tanh,
        "maxout": lambda x: maxout(x, 2),
    }


def test_check_grads_jit_vmap(rng):
    # All activations in one jitted function (one compilation); check_grads compares every
    # output of the dict. Inputs stay away from the kinks at 0 and from maxout ties.
    ops = _ops()
    fn = jax.jit(lambda x: {name: op(x) for name, op in ops.items()})
    x = rng.permutation(24).reshape(2, 3, 4) / 8.0 - 1.4
    with jax.enable_x64():
        x = jnp.asarray(x)
        check_grads(fn, (x,), order=1, modes=["fwd", "rev"])
        yv = jax.vmap(fn)(jnp.stack([x, -x]))
        for name, y in fn(-x).items():
            np.testing.assert_allclose(yv[name][1], y, rtol=1e-12, err_msg=name)


def test_second_order_of_the_smooth_activations():
    fn = jax.jit(lambda x: elu(x, 1.5) + sigmoid(x) * tanh(x))
    with jax.enable_x64():
        check_grads(fn, (jnp.linspace(-2.0, 2.0, 8) + 0.01,), order=2, modes=["rev"])


@pytest.mark.parametrize("name", list(_ops()))
def test_dtype_is_kept(name):
    fn = _ops()[name]
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        assert jax.eval_shape(fn, jax.ShapeDtypeStruct((2, 3, 4), dtype)).dtype == dtype


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: maxout(jnp.ones((2, 5)), 2), ValueError, "pieces=2 does not divide .* C=5"),
        (lambda: maxout(jnp.ones((2, 4)), 0), ValueError, "pieces=0 must be a positive int"),
        (lambda: prelu(jnp.ones((2, 4)), jnp.ones(3)), ValueError, r"alpha has shape \(3,\)"),
        (
            lambda: prelu(jnp.ones((2, 4)), jnp.ones((1, 4))),
            ValueError,
            r"alpha has shape \(1, 4\)",
        ),
        (
            lambda: prelu(jnp.ones((2, 4)), jnp.ones(4, jnp.float16)),
            TypeError,
            "x has dtype float32 but alpha has dtype float16",
        ),
        (lambda: relu(jnp.ones(2), "0.1"), TypeError, "negative_slope='0.1' must be a real"),
        (
            lambda: prelu(jnp.ones((2, 4)), jnp.ones(4, jnp.int32)),
            TypeError,
            "prelu: alpha must have a floating dtype",
        ),
        (lambda: maxout(jnp.ones(4, jnp.int32), 2), TypeError, "maxout: x must have a floating"),
        (lambda: elu(jnp.ones(2), None), TypeError, "alpha=None must be a real number"),
        (lambda: relu(jnp.ones(2, jnp.int32)), TypeError, "relu: x must have a floating dtype"),
        (lambda: sigmoid(jnp.ones(2, jnp.int32)), TypeError, "sigmoid: x must have a floating"),
        (lambda: tanh(jnp.ones(2, jnp.int32)), TypeError, "tanh: x must have a floating dtype"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
