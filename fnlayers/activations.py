"""Activations (docs/caffe-semantics.md §7), with Caffe's conventions for the gradient at 0.

All are elementwise except :func:`maxout`; all keep ``x.shape`` and ``x.dtype``. Channels are
the last axis (NHWC). For float16 and bfloat16 inputs the transcendental ones (ELU, sigmoid,
tanh) compute in float32 and round once: their derivatives are formed from the float32 output
(``1 - tanh(x)**2`` from a bfloat16 ``tanh(x)`` near 1 would lose most of its digits).
"""

from __future__ import annotations

import jax.numpy as jnp

from fnlayers._checks import (
    acc_dtype,
    check_float_array,
    check_positive_int,
    check_real,
    check_same_dtype,
)
from fnlayers._typing import Array, ArrayLike

__all__ = ["elu", "maxout", "prelu", "relu", "sigmoid", "tanh"]


def relu(x: ArrayLike, negative_slope: float = 0.0) -> Array:
    """Caffe's ReLU (§7): ``y = max(x, 0) + negative_slope * min(x, 0)``.

    The derivative is ``1`` for ``x > 0`` and ``negative_slope`` for ``x <= 0`` (so 0 at
    ``x = 0`` for the plain ReLU), as Caffe's backward.
    """
    fn = "relu"
    x = _check_x(x, fn)
    check_real(negative_slope, fn=fn, name="negative_slope")
    if negative_slope == 0:
        # +0 (not -0) for negative inputs, and NaN passes through as in Caffe's std::max.
        return jnp.where((x > 0) | jnp.isnan(x), x, jnp.zeros((), x.dtype))
    return jnp.where(x > 0, x, x * jnp.asarray(negative_slope, x.dtype))


def prelu(x: ArrayLike, alpha: ArrayLike) -> Array:
    """Caffe's PReLU (§7): ``y = max(x, 0) + alpha_c * min(x, 0)``.

    Args:
      x: ``(N, ..., C)`` floating array, channels last.
      alpha: ``(C,)`` (one slope per channel) or a scalar ``()`` (Caffe's ``channel_shared``),
        the same dtype as ``x``.

    Returns:
      ``x.shape``. The derivative is ``1`` for ``x > 0`` and ``alpha_c`` for ``x <= 0``;
      ``d alpha_c = sum(dy * x * (x <= 0))`` over every position of channel c.
    """
    fn = "prelu"
    x = _check_x(x, fn)
    check_float_array(alpha, fn=fn, name="alpha")
    check_same_dtype(x, alpha, fn=fn, names=("x", "alpha"))
    alpha = jnp.asarray(alpha)
    if alpha.ndim == 1:
        if x.ndim < 1 or alpha.shape[0] != x.shape[-1]:
            raise ValueError(
                f"prelu: alpha has shape {alpha.shape} but x has shape {x.shape}; expected "
                f"(C,) with C = x.shape[-1], or a scalar () shared by all channels"
            )
        alpha = alpha.reshape((1,) * (x.ndim - 1) + alpha.shape)
    elif alpha.ndim != 0:
        raise ValueError(
            f"prelu: alpha has shape {alpha.shape}; expected (C,) with C = x.shape[-1], or a "
            "scalar () shared by all channels"
        )
    # The slope's gradient sums dy * x over every position of its channel: the product is
    # formed in the accumulation dtype, so that sum (the transpose of the broadcast) is float32.
    acc = acc_dtype(x.dtype)
    negative = (alpha.astype(acc) * x.astype(acc)).astype(x.dtype)
    return jnp.where(x > 0, x, negative)


def elu(x: ArrayLike, alpha: float = 1.0) -> Array:
    """Caffe's ELU (§7): ``y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)``.

    The derivative is ``1`` for ``x > 0`` and ``y + alpha`` (= ``alpha * exp(x)``) for
    ``x <= 0``, so ``alpha`` at ``x = 0``, as Caffe's backward. ``exp(.) - 1`` is computed with
    ``expm1``: the same function, more accurate near 0.
    """
    fn = "elu"
    x = _check_x(x, fn)
    check_real(alpha, fn=fn, name="alpha")
    xa = x.astype(acc_dtype(x.dtype))
    positive = xa > 0
    # where(), not min(): the derivative of min(x, 0) at a tie would be split in half.
    negative_part = jnp.where(positive, jnp.zeros((), xa.dtype), xa)
    y = jnp.where(positive, xa, jnp.asarray(alpha, xa.dtype) * jnp.expm1(negative_part))
    return y.astype(x.dtype)


def sigmoid(x: ArrayLike) -> Array:
    """Caffe's Sigmoid (§7), computed as Caffe does: ``0.5 * tanh(0.5 * x) + 0.5``."""
    x = _check_x(x, "sigmoid")
    xa = x.astype(acc_dtype(x.dtype))
    half = jnp.asarray(0.5, xa.dtype)
    return (half * jnp.tanh(half * xa) + half).astype(x.dtype)


def tanh(x: ArrayLike) -> Array:
    """Caffe's TanH (§7): ``tanh(x)``."""
    x = _check_x(x, "tanh")
    return jnp.tanh(x.astype(acc_dtype(x.dtype))).astype(x.dtype)


def maxout(x: ArrayLike, pieces: int) -> Array:
    """Maxout (not in Caffe; docs/caffe-semantics.md §13): ``(..., C) -> (..., C // pieces)``.

    The channels are split as ``(C // pieces, pieces)`` (output channel j takes the maximum of
    input channels ``j*pieces .. j*pieces + pieces - 1``). As in max pooling, the maximum is
    scanned with a strict ``>``, so the gradient goes to the first of tied pieces; a NaN
    piece makes the output NaN.

    Raises:
      TypeError: ``pieces`` is not an int.
      ValueError: ``pieces`` is not positive or does not divide C.
    """
    fn = "maxout"
    x = _check_x(x, fn)
    pieces = check_positive_int(pieces, fn=fn, name="pieces")
    if x.ndim < 1 or x.shape[-1] % pieces:
        c = x.shape[-1] if x.ndim else None
        raise ValueError(f"{fn}: pieces={pieces} does not divide the channel count C={c}")
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // pieces, pieces)
    best = grouped[..., 0]
    for i in range(1, pieces):
        piece = grouped[..., i]
        best = jnp.where((piece > best) | jnp.isnan(piece), piece, best)
    return best


# ----------------------------------------------------------------------------- internals


def _check_x(x, fn):
    check_float_array(x, fn=fn, name="x")
    return jnp.asarray(x)
