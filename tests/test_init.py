"""Initializers against Caffe's filler rules (docs/caffe-semantics.md §11)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import init


def test_fans_translate_caffe_layouts():
    # Caffe conv blob (M=96, C/G=3, 11, 11) -> HWIO (11, 11, 3, 96)
    assert init.fans((11, 11, 3, 96)) == (3 * 11 * 11, 96 * 11 * 11)
    # Caffe InnerProduct (N_out=500, K=800) -> (800, 500)
    assert init.fans((800, 500)) == (800, 500)
    # Deconv: Caffe blob (C_in=21, C_out/G=1, 4, 4) -> (4, 4, 1, 21): fan_in = 1*4*4
    assert init.fans((4, 4, 1, 21)) == (16, 21 * 16)
    assert init.fans((7,)) == (7, 7)
    with pytest.raises(ValueError, match="scalar weight has no fans"):
        init.fans(())


@pytest.mark.parametrize(
    "norm,n", [("fan_in", 5 * 5 * 20), ("fan_out", 5 * 5 * 50), ("average", 5 * 5 * 35)]
)
def test_xavier_uniform_bounds_and_variance(key, norm, n):
    w = init.xavier(norm)(key, (5, 5, 20, 50))
    limit = math.sqrt(3.0 / n)
    assert w.shape == (5, 5, 20, 50) and w.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(w))) <= limit
    assert float(jnp.max(jnp.abs(w))) > 0.98 * limit
    # U(-a, a) has variance a^2/3 = 1/n
    np.testing.assert_allclose(float(jnp.var(w)), 1.0 / n, rtol=0.05)
    np.testing.assert_allclose(float(jnp.mean(w)), 0.0, atol=0.05 * limit)


def test_xavier_normal_and_msra_moments(key):
    shape = (3, 3, 64, 128)
    fan_in = 3 * 3 * 64
    w = init.xavier(distribution="normal")(key, shape)
    np.testing.assert_allclose(float(jnp.std(w)), math.sqrt(1.0 / fan_in), rtol=0.03)
    w = init.msra()(key, shape)
    np.testing.assert_allclose(float(jnp.std(w)), math.sqrt(2.0 / fan_in), rtol=0.03)
    w = init.msra("fan_out")(key, (800, 500))
    np.testing.assert_allclose(float(jnp.std(w)), math.sqrt(2.0 / 500), rtol=0.03)


def test_constant_uniform_gaussian(key):
    np.testing.assert_array_equal(init.constant(0.25)(key, (2, 3)), np.full((2, 3), 0.25))
    u = init.uniform(-2.0, 3.0)(key, (10000,))
    assert float(u.min()) >= -2.0 and float(u.max()) < 3.0
    np.testing.assert_allclose(float(u.mean()), 0.5, atol=0.05)
    g = init.gaussian(std=0.01, mean=1.0)(key, (100, 100))
    np.testing.assert_allclose(float(g.mean()), 1.0, atol=1e-3)
    np.testing.assert_allclose(float(g.std()), 0.01, rtol=0.03)


def test_gaussian_sparse_keeps_sparse_over_outputs(key):
    # Caffe: non-zero probability sparse / num_outputs, num_outputs = our last axis.
    w = init.gaussian(std=1.0, sparse=15)(key, (400, 100))
    np.testing.assert_allclose(float(jnp.mean(w != 0)), 0.15, atol=0.01)


def test_positive_unitball_rows_sum_to_one(key):
    w = init.positive_unitball()(key, (3, 3, 4, 8))
    assert float(w.min()) >= 0
    np.testing.assert_allclose(jnp.sum(w, axis=(0, 1, 2)), np.ones(8), rtol=1e-5)


def test_bilinear_exact_values(key):
    w4 = init.bilinear()(key, (4, 4, 1, 3))
    p4 = np.array([0.25, 0.75, 0.75, 0.25])
    for o in range(3):
        np.testing.assert_allclose(w4[:, :, 0, o], np.outer(p4, p4), rtol=1e-7)
    w3 = init.bilinear()(key, (3, 3, 2, 2))
    np.testing.assert_allclose(w3[:, :, 1, 0], np.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))
    with pytest.raises(ValueError, match="must be \\(K, K, I, O\\), square"):
        init.bilinear()(key, (4, 3, 1, 1))


def test_bilinear_deconv_upsamples_linearly(key):
    # FCN recipe: factor F=2 -> k=4, s=2, pad=1, group=C. A linear ramp stays a ramp inside.
    x = jnp.arange(6.0).reshape(1, 1, 6, 1) * jnp.ones((1, 6, 1, 1))
    w = init.bilinear()(key, (4, 4, 1, 1))
    y = fl.conv_transpose2d(x, w, stride=2, padding=1)
    assert y.shape == (1, 12, 12, 1)
    row = np.asarray(y[0, 5, 1:-1, 0])
    np.testing.assert_allclose(np.diff(row), 0.5, rtol=1e-6)


def test_dtype_argument_and_jax_nn_mix(key):
    assert init.xavier()(key, (3, 3), jnp.bfloat16).dtype == jnp.bfloat16
    layer = fl.Dense(4, w_init=jax.nn.initializers.lecun_normal())
    _, params, _ = layer.init(key, (-1, 3))
    assert params["w"].shape == (3, 4)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="variance_norm='fanin' must be one of"):
        init.xavier("fanin")
    with pytest.raises(ValueError, match="distribution='gauss' must be one of"):
        init.xavier(distribution="gauss")
    with pytest.raises(ValueError, match="minval=2 must be <= maxval=1"):
        init.uniform(2, 1)
    with pytest.raises(ValueError, match="std=-1 must be >= 0"):
        init.gaussian(-1)
