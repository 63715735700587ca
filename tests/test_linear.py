"""dense (Caffe InnerProduct, §12) and flatten."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import fnlayers as fl


def test_dense_hand_worked():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    w = jnp.array([[1.0, 0.0, -1.0], [0.5, 1.0, 2.0]])
    np.testing.assert_allclose(fl.dense(x, w, jnp.array([0.0, 1.0, -1.0])), [[2, 3, 2], [5, 5, 4]])


def test_dense_flattens_trailing_axes_like_caffe(rng):
    # Caffe: y = x.reshape(N, K) @ W_caffe.T with W_caffe (C_out, K) = our w.T
    x = rng.standard_normal((3, 4, 5, 2))
    w_caffe = rng.standard_normal((7, 40))
    want = x.reshape(3, 40) @ w_caffe.T
    got = fl.dense(x.astype(np.float32), w_caffe.T.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fl.flatten(jnp.zeros((3, 4, 5, 2))).shape == (3, 40)


def test_dense_grads_jit_vmap(rng):
    x, w, b = rng.standard_normal((4, 3, 2)), rng.standard_normal((6, 5)), rng.standard_normal(5)
    with jax.enable_x64():
        check_grads(fl.dense, (x, w, b), order=2, modes=["fwd", "rev"])
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    np.testing.assert_allclose(jax.jit(fl.dense)(x32, w32), fl.dense(x32, w32), rtol=1e-6)
    got = jax.vmap(lambda x: fl.dense(x, w32))(x32[:, None])
    np.testing.assert_allclose(got[:, 0], fl.dense(x32, w32), rtol=1e-5)


def test_dense_bfloat16_keeps_dtype(rng):
    x = jnp.asarray(rng.standard_normal((2, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((8, 3)), jnp.bfloat16)
    assert fl.dense(x, w).dtype == jnp.bfloat16


def test_dense_bad_input():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"w.shape\[0\]=10 must equal K=12"):
        fl.dense(x, np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match=r"b has shape \(4,\), expected \(5,\)"):
        fl.dense(x, np.zeros((12, 5), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="w must be \\(K, C_out\\)"):
        fl.dense(x, np.zeros((12,), np.float32))
    with pytest.raises(ValueError, match="at least 2 axes"):
        fl.dense(np.zeros(3, np.float32), np.zeros((3, 1), np.float32))
    with pytest.raises(TypeError, match="x has dtype float32 but w has dtype float16"):
        fl.dense(x, np.zeros((12, 5), np.float16))
