"""Dropout (§6): values, rate, determinism per key, gradients, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fnlayers.dropout import dropout

# One shape for most tests: the mask generator compiles once per shape.
SHAPE = (4, 50)


def test_test_mode_is_identity(rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(dropout(x, 0.5), x)
    np.testing.assert_array_equal(dropout(x, 0.9, key=jax.random.key(1), train=False), x)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_train_values_and_rate(key, rate):
    n = 20000
    x = jnp.arange(1.0, n + 1.0)
    y = np.asarray(dropout(x, rate, key=key, train=True))
    kept = y != 0
    # Every kept unit is scaled by 1/(1 - rate), every dropped unit is exactly 0.
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    dropped = 1 - kept.mean()
    assert abs(dropped - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)


def test_deterministic_per_key(key):
    x = jnp.ones(SHAPE)
    k1, k2 = jax.random.split(key)
    a = dropout(x, 0.5, key=k1, train=True)
    np.testing.assert_array_equal(a, dropout(x, 0.5, key=k1, train=True))
    assert not np.array_equal(a, dropout(x, 0.5, key=k2, train=True))
    # Raw uint32 keys work too.
    raw = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(
        dropout(x, 0.5, key=raw, train=True), dropout(x, 0.5, key=raw, train=True)
    )


def test_rate_zero_is_identity_in_train(key):
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(dropout(x, 0.0, key=key, train=True), x)


def test_gradient_is_mask_over_keep_probability(key):
    x = jnp.full(SHAPE, 2.0)
    y, vjp = jax.vjp(lambda x: dropout(x, 0.75, key=key, train=True), x)
    (g,) = vjp(jnp.ones_like(x))
    mask = np.asarray(y) != 0
    np.testing.assert_allclose(g, mask / 0.25)
    assert 0 < mask.sum() < mask.size
    with jax.enable_x64():
        fn = lambda x: dropout(x, 0.5, key=key, train=True)
        check_grads(
            fn, (jnp.linspace(-1.0, 1.0, 200).reshape(SHAPE),), order=1, modes=["fwd", "rev"]
        )


def test_jit_and_vmap_over_keys(key):
    x = jnp.ones(SHAPE)
    keys = jax.random.split(key, 4)
    ys = jax.jit(jax.vmap(lambda k: dropout(x, 0.5, key=k, train=True)))(keys)
    assert ys.shape == (4, *SHAPE)
    for i in range(4):
        np.testing.assert_array_equal(ys[i], dropout(x, 0.5, key=keys[i], train=True))
    assert not np.array_equal(ys[0], ys[1])


def test_dtype_is_kept(key):
    for dtype in (jnp.bfloat16, jnp.float16):
        y = dropout(jnp.ones(SHAPE, dtype), 0.5, key=key, train=True)
        assert y.dtype == dtype
        assert set(np.unique(np.asarray(y, np.float32))) <= {0.0, 2.0}


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            dict(rate=0.5, train=True),
            ValueError,
            r"dropout: train=True draws random numbers, so it needs a PRNG key: pass "
            r"key=jax.random.key\(seed\)",
        ),
        (dict(rate=1.0), ValueError, r"rate=1.0 is the drop probability and must be in \[0, 1\)"),
        (dict(rate=-0.1), ValueError, r"rate=-0.1 is the drop probability"),
        (dict(rate="0.5"), TypeError, "rate='0.5' must be a real number"),
        (dict(rate=True), TypeError, "rate=True must be a real number"),
        (dict(rate=0.5, train=None), TypeError, "train=None must be a Python bool"),
    ],
)
def test_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dropout(jnp.ones(3), **kwargs)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="dropout: x must have a floating dtype"):
        dropout(jnp.ones(3, jnp.int32), 0.5)
