"""Pooling: Caffe's MAX, AVE and STOCHASTIC pooling and global pooling (docs/caffe-semantics.md §3).

Layout NHWC: ``x`` is ``(N, H, W, C)`` and every op returns ``(N, OH, OW, C)`` in ``x.dtype``.
``window``, ``stride`` and ``padding`` take an int or an ``(h, w)`` pair.

Output size (§3, :func:`pool_output_size`)::

    OH = ceil((H + 2*pad_h - window_h) / stride_h) + 1      # rounding="ceil", Caffe's default
    OH = floor((H + 2*pad_h - window_h) / stride_h) + 1     # rounding="floor"
    if (OH - 1)*stride_h >= H + pad_h: OH -= 1              # the last window must start inside

Caffe applies the last line only when the padding is non-zero; fnlayers applies it for every
padding (docs/caffe-semantics.md §3, Caffe issue 6881), so no window ever starts past the image.

Every window here is a set of strided slices of the (padded) input, one slice per kernel offset,
so each op is plain slices and elementwise selects: max pooling never goes through
``lax.reduce_window``'s ``select_and_scatter`` gradient, which is slow on CPU. The derivatives
of MAX and AVE pooling are custom JVPs whose tangent maps go through ``fnlayers.conv``'s linear
``im2col`` primitive (a mask of the first maximum, or the divisor, times the window columns), so
reverse mode transposes them into one ``col2im`` (summed by stride phase) instead of one padded,
full-size copy per kernel offset; forward mode, higher orders and ``vmap`` keep working.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlayers._checks import (
    acc_dtype,
    as_pair,
    check_bool,
    check_choice,
    check_float_array,
    check_key,
    check_rank,
)
from fnlayers._typing import Array, ArrayLike, IntPair, Shape
from fnlayers.conv import _per_example
from fnlayers.conv import im2col_p as _im2col_p

__all__ = [
    "ROUNDINGS",
    "avg_pool",
    "global_avg_pool",
    "global_max_pool",
    "max_pool",
    "pool_output_shape",
    "pool_output_size",
    "stochastic_pool",
]

ROUNDINGS = ("ceil", "floor")


def max_pool(
    x: ArrayLike,
    window: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    rounding: str = "ceil",
) -> Array:
    """Caffe's MAX pooling (§3), NHWC.

    Args:
      x: ``(N, H, W, C)`` floating array.
      window: int or ``(h, w)``, >= 1.
      stride: int or ``(h, w)``, >= 1.
      padding: int or ``(h, w)``, >= 0 and smaller than ``window`` (Caffe's check). Padded
        positions never win: they hold ``-inf``.
      rounding: ``"ceil"`` (Caffe's default) or ``"floor"``, see :func:`pool_output_size`.

    Returns:
      ``(N, OH, OW, C)``: the maximum of each window. The window is scanned in row-major order
      with a strict ``>``, as Caffe's kernel does, so the gradient goes only to the **first**
      maximum of the window in row-major order; overlapping windows add their gradients. A NaN
      in a window makes the output NaN (Caffe's ``>`` would skip it), so divergence stays
      visible. Differentiable in forward and reverse mode, to any order.
    """
    fn = "max_pool"
    x, window, stride, padding, out_hw = _prepare(x, window, stride, padding, rounding, fn)
    cfg = dict(window=window, stride=stride, padding=padding, out_hw=out_hw)
    return _per_example(_max_pool, x, **cfg)


def avg_pool(
    x: ArrayLike,
    window: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    rounding: str = "ceil",
) -> Array:
    """Caffe's AVE pooling (§3), NHWC.

    Args:
      x, window, stride, padding, rounding: as for :func:`max_pool`.

    Returns:
      ``(N, OH, OW, C)``: the sum of the in-image elements of each window divided by Caffe's
      ``pool_size``: the window's area clipped to the *padded* image, so padding counts in the
      divisor but the overhang of a ceil-mode window past ``H + pad`` does not. With
      ``hstart = oh*s - p`` and ``hend = min(hstart + k, H + p)`` the divisor is
      ``(hend - hstart) * (wend - wstart)``. Sums are accumulated in float32 for lower
      precisions.
    """
    fn = "avg_pool"
    x, window, stride, padding, out_hw = _prepare(x, window, stride, padding, rounding, fn)
    cfg = dict(window=window, stride=stride, padding=padding, out_hw=out_hw)
    return _per_example(_avg_pool, x, **cfg)


def stochastic_pool(
    x: ArrayLike,
    window: IntPair,
    *,
    stride: IntPair = 1,
    key: Array | None = None,
    train: bool = False,
) -> Array:
    """Caffe's STOCHASTIC pooling (§3), NHWC, on every backend (Caffe has it on GPU only).

    There is no padding (Caffe forbids it); the output size is the ceil-mode rule with the
    last-window clip, and windows that overhang the image are clipped to it.

    Args:
      x: ``(N, H, W, C)`` floating array, meant to be non-negative (e.g. after a ReLU).
      window, stride: int or ``(h, w)``, >= 1.
      key: a PRNG key; required when ``train=True``.
      train: sample (True) or take the probability-weighted average (False).

    Returns:
      ``(N, OH, OW, C)``.

      * ``train=True``: per window, ``u ~ U(0, 1]`` and ``thres = u * sum(a)``; walking the
        window in row-major order, the output is the first element whose running sum reaches
        ``thres``. For ``a >= 0`` that picks element i with probability ``a_i / sum(a)`` (an
        all-zero window gives 0). The gradient goes to the picked element only.
      * ``train=False``: ``sum(a^2) / sum(a)`` where ``sum(a) > 0``, else 0.

    As for :func:`fnlayers.dropout`, under ``pmap`` or ``shard_map`` a replicated key draws the
    same numbers on every device's shard.

    Negative inputs are not a distribution, but both modes still run Caffe's arithmetic
    literally and stay finite: in test mode a window whose sum is <= 0 gives 0, and one whose
    sum is positive gives ``sum(a^2)/sum(a)`` even though that may exceed every element; in
    train mode a window whose running sum never reaches ``thres`` (possible only when its sum
    is negative, where Caffe leaves the output unwritten) gives 0 with zero gradient.

    Raises:
      ValueError: ``train=True`` without a key (the message says how to pass one).
    """
    fn = "stochastic_pool"
    check_bool(train, fn=fn, name="train", what="a Python bool")
    x, window, stride, _, out_hw = _prepare(x, window, stride, 0, "ceil", fn)
    if train:
        check_key(key, fn=fn)
    cfg = dict(window=window, stride=stride, out_hw=out_hw)
    if not train:
        return _stochastic_test(x, **cfg)
    acc = acc_dtype(x.dtype)
    # u in float32 on (0, 1], as curand's uniform: a zero-valued element is never picked. Drawn
    # outside the kernel, so that differentiating the kernel never recompiles the generator.
    u = 1 - jax.random.uniform(key, (x.shape[0], *out_hw, x.shape[3])).astype(acc)
    return _stochastic_train(x, u, **cfg)


def global_avg_pool(x: ArrayLike) -> Array:
    """Caffe's AVE pooling with ``global_pooling: true`` (§3): ``(N, H, W, C) -> (N, 1, 1, C)``,
    the mean over H and W (divisor ``H*W``, accumulated in float32 for lower precisions)."""
    fn = "global_avg_pool"
    x = _check_x(x, fn)
    acc = acc_dtype(x.dtype)
    return jnp.mean(x.astype(acc), axis=(1, 2), keepdims=True).astype(x.dtype)


def global_max_pool(x: ArrayLike) -> Array:
    """Caffe's MAX pooling with ``global_pooling: true`` (§3): ``(N, H, W, C) -> (N, 1, 1, C)``.

    The gradient goes to the first maximum of each channel plane in row-major order, as in
    :func:`max_pool`; a NaN in the plane makes the output NaN.
    """
    return _global_max_pool(_check_x(x, "global_max_pool"))


def pool_output_size(
    image_size: IntPair,
    window: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    rounding: str = "ceil",
    *,
    fn: str = "pool",
) -> tuple[int, int]:
    """Caffe's pooling output size ``(OH, OW)`` for an ``(H, W)`` image (§3).

    ``out = ceil((in + 2*pad - window) / stride) + 1`` (``floor`` for ``rounding="floor"``),
    then ``out -= 1`` if ``(out - 1)*stride >= in + pad``, for every padding
    (docs/caffe-semantics.md §3).

    Raises:
      ValueError: ``padding >= window`` (Caffe's ``CHECK_LT(pad, kernel)``), a window larger than
        the padded input, or an unknown ``rounding``.
      TypeError: an argument that is not an int or a pair of ints.
    """
    image = as_pair(image_size, fn=fn, name="image_size", minimum=1)
    window, stride, padding = _pairs(window, stride, padding, fn)
    check_choice(rounding, ROUNDINGS, fn=fn, name="rounding")
    out = []
    for axis, (i, k, s, p) in enumerate(zip(image, window, stride, padding, strict=True)):
        what = "height" if axis == 0 else "width"
        if k > i + 2 * p:
            raise ValueError(
                f"{fn}: window {what} {k} is larger than the padded input {what} "
                f"{i} + 2*{p} = {i + 2 * p}"
            )
        span = i + 2 * p - k
        size = (-(-span // s) if rounding == "ceil" else span // s) + 1
        if (size - 1) * s >= i + p:
            size -= 1
        out.append(size)
    return tuple(out)


def pool_output_shape(
    x_shape: Shape,
    window: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    rounding: str = "ceil",
    fn: str = "pool",
) -> tuple[int, ...]:
    """Output shape of :func:`max_pool` / :func:`avg_pool` from shapes alone; validates them.

    Args:
      x_shape: ``(N, H, W, C)``; N may be -1.

    Returns:
      ``(N, OH, OW, C)`` with ``(OH, OW) = pool_output_size((H, W), ...)``.
    """
    check_rank(x_shape, 4, fn=fn, name="x", layout="NHWC")
    oh, ow = pool_output_size(x_shape[1:3], window, stride, padding, rounding, fn=fn)
    return (x_shape[0], oh, ow, x_shape[3])


# ----------------------------------------------------------------------------- internals


def _pairs(window, stride, padding, fn):
    window = as_pair(window, fn=fn, name="window", minimum=1)
    stride = as_pair(stride, fn=fn, name="stride", minimum=1)
    padding = as_pair(padding, fn=fn, name="padding", minimum=0)
    if padding[0] >= window[0] or padding[1] >= window[1]:
        raise ValueError(f"{fn}: padding={padding} must be smaller than window={window}")
    return window, stride, padding


def _check_x(x, fn):
    check_float_array(x, fn=fn, name="x")
    x = jnp.asarray(x)
    check_rank(x.shape, 4, fn=fn, name="x", layout="NHWC")
    return x


def _prepare(x, window, stride, padding, rounding, fn):
    x = _check_x(x, fn)
    out_hw = pool_output_size(x.shape[1:3], window, stride, padding, rounding, fn=fn)
    window, stride, padding = _pairs(window, stride, padding, fn)
    return x, window, stride, padding, out_hw


# Each kernel is jitted with its static configuration, so that eager calls compile one program
# per configuration instead of one per slice.
_pool_kernel = functools.partial(jax.jit, static_argnames=("window", "stride", "padding", "out_hw"))
_stochastic_kernel = functools.partial(jax.jit, static_argnames=("window", "stride", "out_hw"))


@_pool_kernel
def _max_pool(x, *, window, stride, padding, out_hw):
    return _max_pool_core(x, window, stride, padding, out_hw)


@_pool_kernel
def _avg_pool(x, *, window, stride, padding, out_hw):
    return _avg_pool_core(x, window, stride, padding, out_hw)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_core(x, window, stride, padding, out_hw):
    return _first_max(_window_slices(x, window, stride, padding, out_hw, -jnp.inf))


@_max_pool_core.defjvp
def _max_pool_jvp(window, stride, padding, out_hw, primals, tangents):
    """The tangent of each output is the tangent of its window's first maximum: ``sum_k
    [first_max == k] * im2col(t)[k]``, linear in ``t``; its transpose is ``col2im`` of the
    masked cotangent."""
    (x,), (t,) = primals, tangents
    pieces = _window_slices(x, window, stride, padding, out_hw, -jnp.inf)
    y, first = _first_max(pieces), _first_max_index(pieces)
    # `first % (KH*KW)` is `first` (0 <= first < KH*KW), but XLA:CPU counts an integer remainder
    # as expensive and will not fuse it into a consumer that reads its elements repeatedly: the
    # index is computed once, in a kernel of its own. Without it XLA re-evaluates the select
    # chain for every tap inside the backward's col2im kernel.
    first = lax.rem(first, jnp.asarray(window[0] * window[1], first.dtype))
    cols = _window_columns(t, window, stride, padding, out_hw)
    taps = lax.broadcasted_iota(first.dtype, (1, 1, 1, window[0] * window[1], 1), 3)
    mask = first[..., None, :] == taps
    return y, jnp.sum(jnp.where(mask, cols, jnp.zeros((), t.dtype)), axis=3)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _avg_pool_core(x, window, stride, padding, out_hw):
    acc = acc_dtype(x.dtype)
    total = _sum(_window_slices(x.astype(acc), window, stride, padding, out_hw, 0.0))
    divisor = _ave_divisor_array(x.shape[1:3], window, stride, padding, out_hw, acc)
    return (total / divisor).astype(x.dtype)


@_avg_pool_core.defjvp
def _avg_pool_jvp(window, stride, padding, out_hw, primals, tangents):
    """AVE pooling is linear: its tangent is itself, written as ``sum_k im2col(t)[k] / pool_size``
    so that reverse mode gets ``col2im`` of the scaled cotangent."""
    (x,), (t,) = primals, tangents
    acc = acc_dtype(x.dtype)
    divisor = _ave_divisor_array(x.shape[1:3], window, stride, padding, out_hw, acc)
    cols = _window_columns(t.astype(acc), window, stride, padding, out_hw)
    dy = (jnp.sum(cols, axis=3) / divisor).astype(x.dtype)
    return _avg_pool_core(x, window, stride, padding, out_hw), dy


def _ave_divisor_array(image, window, stride, padding, out_hw, acc):
    """Caffe's ``pool_size`` as an ``(1, OH, OW, 1)`` constant of dtype ``acc``."""
    divisor = _ave_divisor(image, window, stride, padding, out_hw)
    return jnp.asarray(divisor, acc)[None, :, :, None]


def _window_columns(t, window, stride, padding, out_hw):
    """``(N, OH, OW, KH*KW, C)``: the windows of ``t`` zero-padded as the pooling pads, through
    the linear ``im2col`` primitive (whose transpose is the fast ``col2im``)."""
    n, h, w, c = t.shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = window, stride, padding, out_hw
    zero = jnp.zeros((), t.dtype)
    hp, wp = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    tp = lax.pad(t, zero, ((0, 0, 0), (ph, hp - h - ph, 0), (pw, wp - w - pw, 0), (0, 0, 0)))
    cols = _im2col_p.bind(
        tp,
        kernel=window,
        stride=stride,
        padding=(0, 0),
        dilation=(1, 1),
        image=(hp, wp),
        isolate_col2im=False,
    )
    return cols.reshape(n, oh, ow, kh * kw, c)


@_stochastic_kernel
def _stochastic_test(x, *, window, stride, out_hw):
    acc = acc_dtype(x.dtype)
    pieces = _window_slices(x.astype(acc), window, stride, (0, 0), out_hw, 0.0)
    total = _sum(pieces)
    positive = total > 0
    safe = jnp.where(positive, total, 1)
    y = jnp.where(positive, _sum([p * p for p in pieces]) / safe, 0)
    return y.astype(x.dtype)


@_stochastic_kernel
def _stochastic_train(x, u, *, window, stride, out_hw):
    acc = acc_dtype(x.dtype)
    # Overhanging positions hold 0: they add nothing to the sums, and since every window
    # starts inside the image, the walk below reaches its threshold on an in-image element.
    pieces = _window_slices(x.astype(acc), window, stride, (0, 0), out_hw, 0.0)
    total = _sum(pieces)
    thres = u * total
    running = jnp.zeros_like(total)
    taken = jnp.zeros(total.shape, bool)
    y = jnp.zeros_like(total)
    for piece in pieces:
        running = running + piece
        hit = (running >= thres) & ~taken
        y = jnp.where(hit, piece, y)
        taken = taken | hit
    return y.astype(x.dtype)


@jax.jit
def _global_max_pool(x):
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    # jnp.argmax returns the first occurrence (and treats NaN as the maximum).
    first = jnp.argmax(flat, axis=1)
    hit = lax.broadcasted_iota(first.dtype, (1, h * w, 1), 1) == first[:, None, :]
    y = jnp.sum(jnp.where(hit, flat, jnp.zeros((), x.dtype)), axis=1)
    return y.reshape(n, 1, 1, c)


def _window_slices(x, window, stride, padding, out_hw, fill):
    """One ``(N, OH, OW, C)`` strided slice per kernel offset, in row-major offset order.

    ``x`` is padded with ``fill`` by ``padding`` on the top/left and by as much as the last
    (ceil-mode) window needs on the bottom/right.
    """
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = window, stride, padding, out_hw
    high_h = max(0, (oh - 1) * sh + kh - h - ph)
    high_w = max(0, (ow - 1) * sw + kw - w - pw)
    config = ((0, 0, 0), (ph, high_h, 0), (pw, high_w, 0), (0, 0, 0))
    if any(lo or hi for lo, hi, _ in config):
        x = lax.pad(x, jnp.asarray(fill, x.dtype), config)
    return [
        lax.slice(
            x, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _first_max(pieces):
    """Caffe's scan: a later element replaces the running maximum only if strictly greater, so
    ties keep the first in row-major order and the derivative follows that element alone."""
    best = pieces[0]
    for piece in pieces[1:]:
        take = (piece > best) | jnp.isnan(piece)
        best = jnp.where(take, piece, best)
    return best


def _first_max_index(pieces):
    """The offset ``k`` (row-major in the window) that :func:`_first_max` picks."""
    dtype = jnp.int8 if len(pieces) <= 127 else jnp.int32
    best, first = pieces[0], jnp.zeros(pieces[0].shape, dtype)
    for k, piece in enumerate(pieces[1:], start=1):
        take = (piece > best) | jnp.isnan(piece)
        best = jnp.where(take, piece, best)
        first = jnp.where(take, jnp.asarray(k, dtype), first)
    return first


def _sum(pieces):
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return total


def _ave_divisor(image, window, stride, padding, out_hw):
    """Caffe's ``pool_size`` for every output position, a static ``(OH, OW)`` array."""
    sizes = []
    for i, k, s, p, o in zip(image, window, stride, padding, out_hw, strict=True):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, i + p)
        sizes.append(end - start)
    return np.outer(sizes[0], sizes[1]).astype(np.float64)
