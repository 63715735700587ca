"""Pooling against hand-worked values, a numpy transliteration of docs/caffe-semantics.md §3 and
lax.reduce_window."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from fnlayers.pooling import (
    avg_pool,
    global_avg_pool,
    global_max_pool,
    max_pool,
    pool_output_shape,
    pool_output_size,
    stochastic_pool,
)

# ----------------------------------------------------------------------------- references


def caffe_size(i, k, s, p, rounding):
    """§3 size rule, with the clip of docs/caffe-semantics.md §3 applied for every padding."""
    rnd = math.ceil if rounding == "ceil" else math.floor
    out = int(rnd(float(i + 2 * p - k) / s)) + 1
    if (out - 1) * s >= i + p:
        out -= 1
    return out


def caffe_pool(x, k, s, p, mode, rounding="ceil"):
    """Transliteration of Caffe's Forward_cpu (MAX with mask, AVE) and MAX Backward_cpu.

    x: (N, H, W, C) float64. Returns (top, mask) where mask[n, oh, ow, c] = h*W + w.
    """
    n, h, w, c = x.shape
    oh, ow = caffe_size(h, k, s, p, rounding), caffe_size(w, k, s, p, rounding)
    top = np.zeros((n, oh, ow, c))
    mask = np.full((n, oh, ow, c), -1)
    for ni in range(n):
        for ci in range(c):
            for ph in range(oh):
                for pw in range(ow):
                    if mode == "max":
                        hs, ws = ph * s - p, pw * s - p
                        he, we = min(hs + k, h), min(ws + k, w)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best = -np.finfo(np.float32).max
                        for hh in range(hs, he):
                            for ww in range(ws, we):
                                if x[ni, hh, ww, ci] > best:
                                    best = x[ni, hh, ww, ci]
                                    mask[ni, ph, pw, ci] = hh * w + ww
                        top[ni, ph, pw, ci] = best
                    else:
                        hs, ws = ph * s - p, pw * s - p
                        he, we = min(hs + k, h + p), min(ws + k, w + p)
                        pool_size = (he - hs) * (we - ws)
                        hs, ws = max(hs, 0), max(ws, 0)
                        he, we = min(he, h), min(we, w)
                        top[ni, ph, pw, ci] = x[ni, hs:he, ws:we, ci].sum() / pool_size
    return top, mask


def caffe_max_backward(top_diff, mask, x_shape):
    w = x_shape[2]
    bottom = np.zeros(x_shape)
    for ni, ph, pw, ci in np.ndindex(*top_diff.shape):
        idx = mask[ni, ph, pw, ci]
        bottom[ni, idx // w, idx % w, ci] += top_diff[ni, ph, pw, ci]
    return bottom


# ----------------------------------------------------------------------------- output size


@pytest.mark.parametrize(
    ("i", "k", "s", "p", "rounding", "expected"),
    [
        (6, 3, 2, 0, "ceil", 3),  # ceil(3/2) + 1
        (6, 3, 2, 0, "floor", 2),  # floor(3/2) + 1
        (7, 3, 2, 1, "ceil", 4),  # ceil(6/2) + 1, last start 6 < 7 + 1
        (5, 2, 2, 1, "ceil", 3),  # ceil(5/2) + 1 = 4, clipped: 3*2 >= 5 + 1
        (5, 2, 2, 1, "floor", 3),  # floor(5/2) + 1
        (6, 1, 2, 0, "ceil", 3),  # Caffe says 4 (bug 6881); the clip rule at pad 0 gives 3
        (55, 3, 2, 0, "ceil", 27),  # AlexNet pool1
        (112, 3, 2, 0, "ceil", 56),  # GoogLeNet pool1: ceil(109/2) + 1
        (112, 3, 2, 0, "floor", 55),
        (32, 3, 2, 0, "ceil", 16),  # CIFAR10-quick pool1
        (4, 4, 1, 0, "ceil", 1),
    ],
)
def test_output_size_hand_worked(i, k, s, p, rounding, expected):
    assert pool_output_size((i, i), k, s, p, rounding) == (expected, expected)
    assert caffe_size(i, k, s, p, rounding) == expected


def test_output_shape_pairs_and_batch():
    assert pool_output_shape((-1, 6, 7, 3), (3, 2), stride=(2, 1), padding=(1, 0)) == (
        -1,
        4,
        6,
        3,
    )
    x = jnp.zeros((2, 6, 7, 3))
    assert max_pool(x, (3, 2), stride=(2, 1), padding=(1, 0)).shape == (2, 4, 6, 3)


def test_pad_zero_clip_rule_never_starts_past_the_image():
    x = jnp.arange(36.0).reshape(1, 6, 6, 1)
    y = max_pool(x, 1, stride=2)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0, 2, 4], [12, 14, 16], [24, 26, 28]])
    np.testing.assert_array_equal(avg_pool(x, 1, stride=2), y)


# ----------------------------------------------------------------------------- max pooling


def test_max_pool_hand_worked_with_padding_and_overhang():
    # 3x3 image, window 2, stride 2, pad 1: size ceil(3/2)+1 = 3, clipped to 2 (4 >= 3 + 1).
    x = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 9.0, 6.0], [7.0, 8.0, 5.0]]).reshape(1, 3, 3, 1)
    y = max_pool(x, 2, stride=2, padding=1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[1, 3], [7, 9]])
    # Negative values: padding never wins.
    np.testing.assert_array_equal(
        max_pool(-x, 2, stride=2, padding=1)[0, :, :, 0], [[-1, -2], [-4, -5]]
    )


def test_max_pool_gradient_goes_to_first_max_in_row_major_order():
    x = jnp.ones((1, 2, 2, 1))
    g = jax.grad(lambda x: max_pool(x, 2).sum())(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[1, 0], [0, 0]])
    # Tie between (0, 1) and (1, 0): row-major order picks (0, 1).
    x = jnp.asarray([[0.0, 5.0], [5.0, 1.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: max_pool(x, 2).sum())(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[0, 1], [0, 0]])


def test_max_pool_gradient_accumulates_over_overlapping_windows():
    x = jnp.asarray([1.0, 5.0, 2.0]).reshape(1, 1, 3, 1)
    g = jax.grad(lambda x: max_pool(x, (1, 2)).sum())(x)
    np.testing.assert_array_equal(g.ravel(), [0, 2, 0])
    # All equal: each 2x2 window (stride 1) sends its gradient to its own top-left element.
    g = jax.grad(lambda x: max_pool(x, 2).sum())(jnp.ones((1, 3, 3, 1)))
    np.testing.assert_array_equal(g[0, :, :, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


POOL_CONFIGS = [
    # (H, W, k, s, p, rounding)
    (5, 5, 3, 2, 1, "ceil"),
    (6, 7, 3, 2, 0, "ceil"),  # overhang at the bottom/right
    (5, 6, 2, 2, 1, "ceil"),  # clip rule with pad
    (7, 7, 3, 3, 2, "floor"),
    (4, 4, 3, 1, 0, "ceil"),
    (6, 6, 1, 2, 0, "ceil"),  # the pad-0 clip
]


@pytest.mark.parametrize(("h", "w", "k", "s", "p", "rounding"), POOL_CONFIGS)
def test_max_pool_and_gradient_match_caffe_loops_with_ties(rng, h, w, k, s, p, rounding):
    # Small integers make many ties, so the mask routing is exercised everywhere.
    x = rng.integers(-2, 3, size=(2, h, w, 3)).astype(np.float32)
    top, mask = caffe_pool(x.astype(np.float64), k, s, p, "max", rounding)
    y, vjp = jax.vjp(lambda x: max_pool(x, k, stride=s, padding=p, rounding=rounding), x)
    np.testing.assert_array_equal(y, top)
    dy = rng.normal(size=top.shape).astype(np.float32)
    (g,) = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(g, caffe_max_backward(dy, mask, x.shape), rtol=1e-6, atol=1e-6)


def test_max_pool_matches_reduce_window(rng):
    x = rng.normal(size=(2, 9, 8, 4)).astype(np.float32)
    # Rows: ceil((9 + 2 - 3)/2) + 1 = 5, no overhang: padding (1, 1). Columns: ceil(7/2) + 1 = 5,
    # whose last window needs one more column: padding (1, 2).
    expected = lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 2), (0, 0))
    )
    y = max_pool(x, 3, stride=2, padding=1)
    assert y.shape == (2, 5, 5, 4)
    np.testing.assert_array_equal(y, expected)


def test_max_pool_propagates_nan():
    x = jnp.asarray([[1.0, jnp.nan], [3.0, 2.0]]).reshape(1, 2, 2, 1)
    assert jnp.isnan(max_pool(x, 2)).all()
    assert jnp.isnan(global_max_pool(x)).all()


# ----------------------------------------------------------------------------- average pooling


def test_avg_pool_divisor_counts_pad_but_not_overhang():
    # 3x3 ones, window 2, stride 2, pad 1: windows start at -1 and 1; both divisors are 2*2.
    y = avg_pool(jnp.ones((1, 3, 3, 1)), 2, stride=2, padding=1)
    np.testing.assert_allclose(y[0, :, :, 0], [[1 / 4, 2 / 4], [2 / 4, 4 / 4]])
    # 4x4 arange, window 3, stride 2, pad 0: second window in each axis overhangs by one, and
    # its divisor counts only the two in-image rows/columns.
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    y = avg_pool(x, 3, stride=2)
    np.testing.assert_allclose(y[0, :, :, 0], [[45 / 9, 39 / 6], [66 / 6, 50 / 4]])
    # Pad 1 with overhang: windows start at -1, 1, 3; the last spans rows 3, 4 (pad), 5
    # (overhang): divisor 2 along that axis.
    y = avg_pool(jnp.ones((1, 4, 4, 1)), 3, stride=2, padding=1)
    assert y.shape == (1, 3, 3, 1)
    np.testing.assert_allclose(y[0, 0, 0, 0], 4 / 9)
    np.testing.assert_allclose(y[0, 1, 1, 0], 9 / 9)
    np.testing.assert_allclose(y[0, 2, 2, 0], 1 / 4)
    np.testing.assert_allclose(y[0, 0, 2, 0], 2 / 6)


@pytest.mark.parametrize(("h", "w", "k", "s", "p", "rounding"), POOL_CONFIGS)
def test_avg_pool_matches_caffe_loops(rng, h, w, k, s, p, rounding):
    x = rng.normal(size=(2, h, w, 3))
    top, _ = caffe_pool(x, k, s, p, "ave", rounding)
    y = avg_pool(x.astype(np.float32), k, stride=s, padding=p, rounding=rounding)
    np.testing.assert_allclose(y, top, rtol=1e-5, atol=1e-6)


def test_avg_pool_gradient_is_one_over_pool_size(rng):
    # Caffe's backward adds top_diff / pool_size to every in-image element of the window.
    g = jax.grad(lambda x: avg_pool(x, 2, stride=2, padding=1).sum())(jnp.ones((1, 3, 3, 1)))
    np.testing.assert_allclose(g[0, :, :, 0], np.full((3, 3), 0.25))


def test_avg_pool_matches_reduce_window_without_padding(rng):
    x = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
    expected = lax.reduce_window(x, 0.0, lax.add, (1, 2, 3, 1), (1, 2, 3, 1), "VALID") / 6
    np.testing.assert_allclose(avg_pool(x, (2, 3), stride=(2, 3)), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- global pooling


def test_global_pools(rng):
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(global_avg_pool(x), x.mean(axis=(1, 2), keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(global_max_pool(x), x.max(axis=(1, 2), keepdims=True))
    assert global_avg_pool(x).shape == global_max_pool(x).shape == (2, 1, 1, 5)
    g = jax.grad(lambda x: global_max_pool(x).sum())(jnp.ones((1, 2, 3, 2)))
    np.testing.assert_array_equal(g[0, :, :, 0], [[1, 0, 0], [0, 0, 0]])
    x = jnp.asarray([[0.0, 2.0, 1.0], [2.0, 0.0, 2.0]]).reshape(1, 2, 3, 1)
    g = jax.grad(lambda x: global_max_pool(x).sum())(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[0, 1, 0], [0, 0, 0]])
    g = jax.grad(lambda x: global_avg_pool(x).sum())(x)
    np.testing.assert_allclose(g, np.full((1, 2, 3, 1), 1 / 6))


# ----------------------------------------------------------------------------- stochastic pooling


def test_stochastic_pool_test_mode_hand_worked():
    x = jnp.asarray(
        [[1.0, 2.0, 0.0, 0.0, 5.0], [3.0, 4.0, 0.0, 2.0, 0.0]],
    ).reshape(1, 2, 5, 1)
    # 2x2 windows, stride 2: size ceil(3/2) + 1 = 3; the last window overhangs (column 4 only).
    y = stochastic_pool(x, 2, stride=2)
    np.testing.assert_allclose(y[0, 0, :, 0], [30 / 10, 4 / 2, 25 / 5])
    assert stochastic_pool(jnp.zeros((1, 2, 2, 1)), 2)[0, 0, 0, 0] == 0
    # Negative window sums give 0 in test mode (Caffe's sum > 0 test).
    assert stochastic_pool(-jnp.ones((1, 2, 2, 1)), 2)[0, 0, 0, 0] == 0
    np.testing.assert_allclose(
        stochastic_pool(jnp.asarray([3.0, -1.0, 0.0, 0.0]).reshape(1, 2, 2, 1), 2).ravel(), [5.0]
    )


def test_stochastic_pool_train_frequencies_over_many_keys(key):
    window = jnp.asarray([[1.0, 0.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    n = 4000
    keys = jax.random.split(key, n)
    sample = jax.jit(jax.vmap(lambda k: stochastic_pool(window, 2, key=k, train=True)))
    values = np.asarray(sample(keys)).ravel()
    assert set(np.unique(values)) <= {1.0, 3.0, 4.0}  # the zero is never picked
    for v, p in ((1.0, 1 / 8), (3.0, 3 / 8), (4.0, 4 / 8)):
        freq = np.mean(values == v)
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n), (v, freq, p)


def test_stochastic_pool_train_samples_per_window_and_routes_gradient(key, rng):
    x = jnp.asarray(rng.uniform(0.1, 1.0, size=(2, 5, 5, 2)).astype(np.float32))
    y = stochastic_pool(x, 2, stride=2, key=key, train=True)
    assert y.shape == (2, 3, 3, 2)
    np.testing.assert_array_equal(y, stochastic_pool(x, 2, stride=2, key=key, train=True))
    other = stochastic_pool(x, 2, stride=2, key=jax.random.split(key)[1], train=True)
    assert not np.array_equal(y, other)
    g = jax.grad(lambda x: stochastic_pool(x, 2, stride=2, key=key, train=True).sum())(x)
    # One element per window gets gradient 1, and it is the element that was picked.
    assert float(g.sum()) == y.size
    xg, g, y = np.asarray(x), np.asarray(g), np.asarray(y)
    for n, i, j, c in np.ndindex(*y.shape):
        win_g = g[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c]
        win_x = xg[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c]
        assert win_g.sum() == 1
        assert win_x[win_g == 1][0] == y[n, i, j, c]


def test_stochastic_pool_negative_inputs_stay_finite(key):
    x = -jnp.ones((64, 2, 2, 1))
    y = np.asarray(stochastic_pool(x, 2, key=key, train=True)).ravel()
    assert set(np.unique(y)) <= {0.0, -1.0}
    assert np.isfinite(y).all()


# ----------------------------------------------------------------------------- autodiff, jit, vmap


def _ops():
    return {
        "max": lambda x: max_pool(x, 3, stride=2, padding=1),
        "max_floor": lambda x: max_pool(x, (2, 3), stride=(1, 2), rounding="floor"),
        "avg": lambda x: avg_pool(x, 3, stride=2, padding=1),
        "stoch_test": lambda x: stochastic_pool(x * x + 0.1, 2, stride=2),
        "stoch_train": lambda x: stochastic_pool(
            x * x + 0.1, 2, stride=2, key=jax.random.key(3), train=True
        ),
        "global_avg": global_avg_pool,
        "global_max": global_max_pool,
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_check_grads_jit_vmap(rng, name):
    fn = _ops()[name]
    # Distinct values: no ties, so finite differences see a smooth function.
    x = rng.permutation(2 * 5 * 5 * 2).reshape(2, 5, 5, 2) / 10.0 + 0.05
    with jax.enable_x64():
        x = jnp.asarray(x)
        check_grads(fn, (x,), order=1, modes=["fwd", "rev"], eps=1e-4)
        y = fn(x)
        np.testing.assert_allclose(jax.jit(fn)(x), y, rtol=1e-12)
        yv = jax.vmap(fn)(jnp.stack([x, x[::-1]]))
        np.testing.assert_allclose(yv[0], y, rtol=1e-12)
        np.testing.assert_allclose(yv[1], fn(x[::-1]), rtol=1e-12)


def test_max_pool_second_order(rng):
    x = rng.permutation(16).reshape(1, 4, 4, 1) / 4.0
    with jax.enable_x64():
        fn = jax.jit(lambda x: max_pool(x, 2, stride=1, padding=1))
        check_grads(fn, (jnp.asarray(x),), order=2, modes=["fwd", "rev"], eps=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtype_is_kept(dtype):
    x = jax.ShapeDtypeStruct((1, 4, 4, 2), dtype)
    for fn in _ops().values():
        assert jax.eval_shape(fn, x).dtype == dtype
    y = avg_pool(jnp.full((1, 4, 4, 1), 3.0, dtype), 2, stride=2)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.astype(jnp.float32), np.full((1, 2, 2, 1), 3.0))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda x: max_pool(x, 3, padding=3), ValueError, r"padding=\(3, 3\) must be smaller"),
        (lambda x: avg_pool(x, 7), ValueError, "window height 7 is larger than the padded input"),
        (lambda x: max_pool(x, 2, rounding="round"), ValueError, "rounding='round' must be one"),
        (lambda x: max_pool(x, 0), ValueError, "window=0 must be positive"),
        (lambda x: max_pool(x, 2, stride=(1, 0)), ValueError, r"stride=\(1, 0\) must be positive"),
        (lambda x: avg_pool(x, 2.0), TypeError, "window=2.0 must be an int or a pair"),
        (lambda x: max_pool(x[0], 2), ValueError, "max_pool: x must have rank 4"),
        (lambda x: max_pool(x.astype(jnp.int32), 2), TypeError, "must have a floating dtype"),
        (lambda x: global_avg_pool(x[0]), ValueError, "global_avg_pool: x must have rank 4"),
        (lambda x: global_max_pool(x[0]), ValueError, "global_max_pool: x must have rank 4"),
        (
            lambda x: stochastic_pool(x, 2, train=True),
            ValueError,
            r"stochastic_pool: train=True .* pass key=jax.random.key\(seed\)",
        ),
        (lambda x: stochastic_pool(x, 2, train="yes"), TypeError, "train='yes' must be a Python"),
        (lambda x: stochastic_pool(x, 9), ValueError, "window height 9 is larger"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(jnp.ones((1, 5, 5, 2)))


def test_shape_helper_errors():
    with pytest.raises(ValueError, match="MaxPool: x must have rank 4"):
        pool_output_shape((5, 5, 2), 2, fn="MaxPool")
    with pytest.raises(ValueError, match="window width 4 is larger than the padded input width"):
        pool_output_size((5, 3), (2, 4))


# ----------------------------------------------------------------------------- custom JVPs


@pytest.mark.parametrize(
    "k, s, p, rounding",
    [(3, 2, 0, "ceil"), (3, 2, 1, "floor"), (2, 2, 0, "ceil"), (3, 1, 1, "ceil")],
)
def test_pool_gradients_match_autodiff_of_window_slices(k, s, p, rounding):
    """The custom JVPs (tangent through im2col, cotangent through col2im) give exactly the
    gradient of plain autodiff through the window slices, ties included."""
    from fnlayers import pooling as P

    x = jnp.asarray(np.random.default_rng(3).integers(0, 4, (2, 7, 6, 3)).astype(np.float32))
    out_hw = P.pool_output_size(x.shape[1:3], k, s, p, rounding)
    cfg = dict(window=(k, k), stride=(s, s), padding=(p, p), out_hw=out_hw)

    def ref_max(x):
        return P._first_max(P._window_slices(x, fill=-jnp.inf, **cfg))

    def ref_avg(x):
        total = P._sum(P._window_slices(x, fill=0.0, **cfg))
        return total / jnp.asarray(P._ave_divisor(x.shape[1:3], **cfg), x.dtype)[None, :, :, None]

    ct = jnp.asarray(np.random.default_rng(4).standard_normal((2, *out_hw, 3)), jnp.float32)
    for fn, ref in ((max_pool, ref_max), (avg_pool, ref_avg)):
        got = jax.vjp(lambda x, fn=fn: fn(x, k, stride=s, padding=p, rounding=rounding), x)
        want = jax.vjp(ref, x)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1](ct)[0], want[1](ct)[0], rtol=1e-6, atol=1e-6)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, fn=fn: fn(x, k, stride=s).sum()))(x))
        assert "fnlayers_col2im" in jaxpr and "select_and_scatter" not in jaxpr
