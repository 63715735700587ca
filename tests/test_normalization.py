"""LRN (§4) and BatchNorm (§5) against hand-worked values and numpy transliterations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fnlayers.normalization import batch_norm, batch_norm_state, lrn

# ----------------------------------------------------------------------------- references


def lrn_across_ref(x, n, alpha, beta, k):
    """CrossChannelForward_cpu, NHWC, float64 loops."""
    c = x.shape[-1]
    pre_pad = (n - 1) // 2
    y = np.empty_like(x)
    for ci in range(c):
        acc = np.zeros(x.shape[:-1])
        for cj in range(ci - pre_pad, ci + pre_pad + 1):
            if 0 <= cj < c:
                acc += x[..., cj] ** 2
        y[..., ci] = x[..., ci] * (k + alpha / n * acc) ** (-beta)
    return y


def lrn_within_ref(x, n, alpha, beta):
    """Split -> Power(x^2) -> AVE pool (kernel n, pad (n-1)/2, stride 1, divisor n^2) ->
    Power(shift 1, scale alpha, power -beta) -> Eltwise PROD."""
    _, h, w, _ = x.shape
    p = (n - 1) // 2
    sq = x**2
    y = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = sq[:, max(i - p, 0) : min(i + p + 1, h), max(j - p, 0) : min(j + p + 1, w), :]
            avg = win.sum(axis=(1, 2)) / (n * n)
            y[:, i, j, :] = x[:, i, j, :] * (1 + alpha * avg) ** (-beta)
    return y


def caffe_bn_steps(batches, lam, eps):
    """BatchNormLayer::Forward_cpu in training, step by step; then the global-stats output."""
    c = batches[0].shape[-1]
    blob0, blob1, s = np.zeros(c), np.zeros(c), np.zeros(1)
    outs = []
    for x in batches:
        flat = x.reshape(-1, c)
        mu = flat.mean(axis=0)
        var = ((flat - mu) ** 2).mean(axis=0)
        outs.append((x - mu) / np.sqrt(var + eps))
        m = flat.shape[0]
        factor = m / (m - 1) if m > 1 else 1.0
        s = lam * s + 1
        blob0 = mu + lam * blob0
        blob1 = factor * var + lam * blob1
    return outs, blob0, blob1, s


def caffe_bn_global(x, blob0, blob1, s, eps):
    f = 0.0 if s[0] == 0 else 1.0 / s[0]
    return (x - f * blob0) / np.sqrt(f * blob1 + eps)


# ----------------------------------------------------------------------------- LRN


def test_lrn_hand_worked():
    # One channel: scale = k + alpha/size * x^2.
    y = lrn(jnp.full((1, 1, 1, 1), 2.0))
    np.testing.assert_allclose(y.ravel(), [2.0 * (1 + 4 / 5) ** -0.75], rtol=1e-6)
    # Channels [1, 2, 3], size 3: scale[0] = 1 + (1 + 4)/3, scale[1] = 1 + 14/3,
    # scale[2] = 1 + 13/3.
    y = lrn(jnp.asarray([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3), size=3, beta=1.0)
    np.testing.assert_allclose(y.ravel(), [1 / (8 / 3), 2 / (17 / 3), 3 / (16 / 3)], rtol=1e-6)
    # Within channel, one pixel: 1 + alpha/size^2 * x^2, and k plays no part.
    y = lrn(jnp.full((1, 1, 1, 1), 3.0), size=3, k=100.0, beta=1.0, region="within_channel")
    np.testing.assert_allclose(y.ravel(), [3.0 / (1 + 9 / 9)], rtol=1e-6)


@pytest.mark.parametrize(
    ("size", "alpha", "beta", "k", "c"),
    [(5, 1.0, 0.75, 1.0, 7), (3, 1e-4, 0.75, 2.0, 4), (1, 0.5, 0.5, 1.0, 3), (5, 2.0, 1.0, 1.0, 2)],
)
def test_lrn_across_channels_matches_caffe_loop(rng, size, alpha, beta, k, c):
    x = rng.normal(size=(2, 3, 3, c))
    y = lrn(x.astype(np.float32), size=size, alpha=alpha, beta=beta, k=k)
    np.testing.assert_allclose(y, lrn_across_ref(x, size, alpha, beta, k), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("size", "alpha", "beta"), [(3, 1.0, 0.75), (5, 0.3, 0.5)])
def test_lrn_within_channel_matches_caffe_loop_and_ignores_k(rng, size, alpha, beta):
    x = rng.normal(size=(2, 4, 5, 3))
    expected = lrn_within_ref(x, size, alpha, beta)
    for k in (1.0, 7.0):
        y = lrn(
            x.astype(np.float32), size=size, alpha=alpha, beta=beta, k=k, region="within_channel"
        )
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("region", ["across_channels", "within_channel"])
def test_lrn_grads_jit_vmap(rng, region):
    x = rng.normal(size=(1, 3, 3, 4))
    fn = jax.jit(lambda x: lrn(x, size=3, alpha=0.5, region=region))
    with jax.enable_x64():
        x = jnp.asarray(x)
        check_grads(fn, (x,), order=1, modes=["fwd", "rev"])
        yv = jax.vmap(fn)(jnp.stack([x, 2 * x]))
        np.testing.assert_allclose(yv[1], fn(2 * x), rtol=1e-12)


def test_lrn_keeps_dtype():
    y = lrn(jnp.ones((1, 2, 2, 3), jnp.bfloat16), region="within_channel", size=3)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        y.astype(jnp.float32),
        lrn(jnp.ones((1, 2, 2, 3)), region="within_channel", size=3),
        rtol=1e-2,
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(size=4), ValueError, "lrn: size=4 must be a positive odd int"),
        (dict(size=0), ValueError, "lrn: size=0 must be a positive odd int"),
        (dict(region="across"), ValueError, "lrn: region='across' must be one of"),
        (dict(alpha="1"), TypeError, "lrn: alpha='1' must be a real number"),
        (dict(beta=None), TypeError, "lrn: beta=None must be a real number"),
    ],
)
def test_lrn_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lrn(jnp.ones((1, 2, 2, 3)), **kwargs)


def test_lrn_errors_on_inputs():
    with pytest.raises(ValueError, match=r"region='within_channel' needs x of rank 4"):
        lrn(jnp.ones((2, 3)), region="within_channel")
    with pytest.raises(TypeError, match="lrn: x must have a floating dtype"):
        lrn(jnp.ones((1, 2, 2, 3), jnp.int32))
    with pytest.raises(ValueError, match="lrn: x must have a channel axis"):
        lrn(jnp.ones(()))


# ----------------------------------------------------------------------------- batch norm


def test_batch_norm_hand_worked_one_step():
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(4, 1)
    y, state = batch_norm(x, batch_norm_state(1), train=True)
    # mu = 2.5, biased var = 1.25; m = 4 so var_acc gets 4/3 * 1.25.
    np.testing.assert_allclose(y.ravel(), (np.arange(1, 5) - 2.5) / np.sqrt(1.25 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(state["mean_acc"], [2.5])
    np.testing.assert_allclose(state["var_acc"], [4 / 3 * 1.25], rtol=1e-6)
    np.testing.assert_allclose(state["scale_factor"], [1.0])
    # Eval after that one step: mu = 2.5, var = 5/3.
    y, same = batch_norm(x, state, train=False)
    assert same is state
    np.testing.assert_allclose(
        y.ravel(), (np.arange(1, 5) - 2.5) / np.sqrt(5 / 3 + 1e-5), rtol=1e-6
    )


def test_batch_norm_train_output_moments(rng):
    x = rng.normal(loc=3.0, scale=2.0, size=(8, 4, 4, 3)).astype(np.float32)
    y, _ = batch_norm(x, batch_norm_state(3), train=True, eps=1e-5)
    flat = np.asarray(y, np.float64).reshape(-1, 3)
    var = x.reshape(-1, 3).astype(np.float64).var(axis=0)
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.var(axis=0), var / (var + 1e-5), rtol=1e-4)


@pytest.mark.parametrize("momentum", [0.999, 0.9, 0.0])
def test_batch_norm_running_averages_match_caffe_recursion(rng, momentum):
    batches = [rng.normal(loc=i, scale=1 + i, size=(4, 3, 2, 5)) for i in range(4)]
    outs, blob0, blob1, s = caffe_bn_steps(batches, momentum, 1e-5)
    step = jax.jit(lambda x, st: batch_norm(x, st, train=True, momentum=momentum))
    state = batch_norm_state(5)
    for x, expected in zip(batches, outs, strict=True):
        y, state = step(jnp.asarray(x, jnp.float32), state)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state["mean_acc"], blob0, rtol=1e-5)
    np.testing.assert_allclose(state["var_acc"], blob1, rtol=1e-5)
    np.testing.assert_allclose(state["scale_factor"], s, rtol=1e-6)
    x = rng.normal(size=(3, 3, 2, 5))
    y, _ = batch_norm(jnp.asarray(x, jnp.float32), state, train=False, momentum=momentum)
    np.testing.assert_allclose(y, caffe_bn_global(x, blob0, blob1, s, 1e-5), rtol=1e-4, atol=1e-5)


def test_batch_norm_single_element_per_channel_uses_factor_one():
    x = jnp.asarray([[1.0, -2.0]])
    y, state = batch_norm(x, batch_norm_state(2), train=True)
    np.testing.assert_array_equal(y, [[0.0, 0.0]])
    np.testing.assert_array_equal(state["var_acc"], [0.0, 0.0])
    np.testing.assert_array_equal(state["mean_acc"], [1.0, -2.0])


def test_batch_norm_eval_with_fresh_state_and_never_changes_state(rng):
    x = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
    state = batch_norm_state(2)
    # s == 0: f = 0, so mu = 0 and var = 0.
    y, out_state = batch_norm(x, state, train=False, eps=1e-2)
    np.testing.assert_allclose(y, x / np.sqrt(1e-2), rtol=1e-6)
    assert out_state is state
    for k in state:
        np.testing.assert_array_equal(out_state[k], 0.0)
    _, trained = batch_norm(x, state, train=True)
    before = {k: np.asarray(v) for k, v in trained.items()}
    _, after = jax.jit(lambda x, s: batch_norm(x, s, train=False))(x, trained)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_batch_norm_gradients(rng):
    x = rng.normal(size=(4, 2, 2, 3))
    with jax.enable_x64():
        state = batch_norm_state(3, jnp.float64)
        x = jnp.asarray(x)
        check_grads(lambda x: batch_norm(x, state, train=True)[0], (x,), 1, modes=["fwd", "rev"])
        _, trained = batch_norm(x, state, train=True)
        evaluate = jax.jit(lambda x: batch_norm(x, trained, train=False)[0])
        # Eval backward is dy / sqrt(var + eps).
        g = jax.grad(lambda x: evaluate(x).sum())(x)
        var = trained["var_acc"] / trained["scale_factor"]
        np.testing.assert_allclose(g, np.broadcast_to(1 / np.sqrt(var + 1e-5), x.shape), rtol=1e-12)


def test_batch_norm_no_gradient_into_state(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    g = jax.grad(lambda x: batch_norm(x, batch_norm_state(3), train=True)[1]["mean_acc"].sum())(x)
    np.testing.assert_array_equal(g, 0.0)


def test_batch_norm_vmap_and_axis_name_match_the_whole_batch(rng):
    x = jnp.asarray(rng.normal(size=(8, 3, 2, 4)), jnp.float32)
    state = batch_norm_state(4)
    y_all, st_all = batch_norm(x, state, train=True)
    # Two "devices" of 4 examples each, statistics averaged over the mapped axis.
    shards = x.reshape(2, 4, 3, 2, 4)
    y, st = jax.vmap(lambda xs: batch_norm(xs, state, train=True, axis_name="d"), axis_name="d")(
        shards
    )
    np.testing.assert_allclose(y.reshape(x.shape), y_all, rtol=1e-5, atol=1e-6)
    for k in st_all:
        np.testing.assert_allclose(st[k][0], st_all[k], rtol=1e-5)
        np.testing.assert_allclose(st[k][1], st_all[k], rtol=1e-5)
    # Without axis_name, vmap normalises each group on its own.
    yg, _ = jax.vmap(lambda xs: batch_norm(xs, state, train=True))(shards)
    y0, _ = batch_norm(shards[0], state, train=True)
    np.testing.assert_allclose(yg[0], y0, rtol=1e-6)


def test_batch_norm_low_precision_keeps_dtype_and_float32_state():
    x = jnp.asarray(np.arange(8.0).reshape(4, 2), jnp.bfloat16)
    y, state = batch_norm(x, batch_norm_state(2), train=True)
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in state.values())
    np.testing.assert_allclose(state["mean_acc"], [3.0, 4.0])


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda x, s: batch_norm(x, batch_norm_state(4), train=True),
            ValueError,
            r"batch_norm: state\['mean_acc'\] has shape \(4,\), expected \(3,\)",
        ),
        (
            lambda x, s: batch_norm(x, {"mean_acc": s["mean_acc"]}, train=True),
            ValueError,
            "state must be a dict with keys",
        ),
        (
            lambda x, s: batch_norm(x, s, train=True, momentum=1.5),
            ValueError,
            "momentum=1.5 must be in",
        ),
        (lambda x, s: batch_norm(x, s, train=True, eps=-1.0), ValueError, "eps=-1.0 must be >= 0"),
        (
            lambda x, s: batch_norm(x, s, train=True, momentum="0.9"),
            TypeError,
            "batch_norm: momentum='0.9' must be a real number",
        ),
        (lambda x, s: batch_norm(x, s, train=True, eps=None), TypeError, "eps=None must be a real"),
        (lambda x, s: batch_norm(x, s, train=1), TypeError, "train=1 must be a Python bool"),
        (lambda x, s: batch_norm(x[0, 0, 0], s, train=True), ValueError, "at least 2 axes"),
        (
            lambda x, s: batch_norm(x.astype(jnp.int32), s, train=True),
            TypeError,
            "batch_norm: x must have a floating dtype",
        ),
        (lambda x, s: batch_norm_state(0), ValueError, "num_channels=0 must be a positive int"),
    ],
)
def test_batch_norm_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(jnp.ones((2, 2, 2, 3)), batch_norm_state(3))
