"""Normalization: Caffe's LRN (docs/caffe-semantics.md §4) and BatchNorm (§5).

Channels are the last axis (NHWC). Both ops keep ``x.dtype`` and compute in float32 for lower
precisions.

Batch norm state mirrors Caffe's three blobs, all float32 and zero-initialised
(:func:`batch_norm_state`)::

    {"mean_acc": (C,), "var_acc": (C,), "scale_factor": (1,)}

Training updates them as Caffe does (``s <- momentum*s + 1``, ``mean_acc <- mu +
momentum*mean_acc``, ``var_acc <- m/(m-1)*var + momentum*var_acc``), and evaluation divides by
``s``, so evaluation after T steps equals Caffe's ``use_global_stats`` output after T iterations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fnlayers._checks import (
    acc_dtype,
    check_bool,
    check_choice,
    check_float_array,
    check_int,
    check_positive_int,
    check_real,
)
from fnlayers._typing import Array, ArrayLike, DTypeLike

__all__ = [
    "LRN_REGIONS",
    "batch_norm",
    "batch_norm_state",
    "lrn",
]

LRN_REGIONS = ("across_channels", "within_channel")
_STATE_KEYS = ("mean_acc", "var_acc", "scale_factor")


def lrn(
    x: ArrayLike,
    *,
    size: int = 5,
    alpha: float = 1.0,
    beta: float = 0.75,
    k: float = 1.0,
    region: str = "across_channels",
) -> Array:
    """Caffe's local response normalization (§4).

    Args:
      x: ``(N, H, W, C)`` floating array (any rank >= 1 with channels last for
        ``"across_channels"``).
      size: Caffe's ``local_size``, a positive odd int.
      alpha, beta, k: Caffe's parameters (defaults 1, 0.75, 1).
      region: ``"across_channels"`` or ``"within_channel"``.

    Returns:
      An array of ``x.shape``:

      * ``"across_channels"``: ``y = x * (k + alpha/size * sum_{|c'-c| <= size//2} x[c']^2)^-beta``,
        channels outside ``[0, C)`` counting as 0.
      * ``"within_channel"``: ``y = x * (1 + alpha/size^2 * sum_{size x size window} x^2)^-beta``
        over a window centred on the pixel with zero padding. As in Caffe, which builds this
        region from AVE pooling and a Power layer with shift 1, **k is ignored**.
    """
    fn = "lrn"
    check_float_array(x, fn=fn, name="x")
    x = jnp.asarray(x)
    check_lrn_args(size, alpha, beta, k, region, fn=fn)
    if x.ndim < 1:
        raise ValueError(f"{fn}: x must have a channel axis, got shape {x.shape}")
    if region == "within_channel" and x.ndim != 4:
        raise ValueError(
            f"{fn}: region='within_channel' needs x of rank 4 (NHWC), got shape {x.shape}"
        )
    return _lrn(x, size=size, alpha=alpha, beta=beta, k=k, region=region)


def batch_norm(
    x: ArrayLike,
    state: dict[str, Array],
    *,
    train: bool,
    momentum: float = 0.999,
    eps: float = 1e-5,
    axis_name: str | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Caffe's BatchNorm (§5), without the affine part (see ``layers.BatchNorm``).

    Args:
      x: ``(N, ..., C)`` floating array, channels last (``(N, H, W, C)`` or ``(N, C)``).
      state: ``{"mean_acc": (C,), "var_acc": (C,), "scale_factor": (1,)}``, as made by
        :func:`batch_norm_state`.
      train: True: normalise with this batch's statistics and return the updated state.
        False: normalise with the running averages and return ``state`` itself, unchanged.
      momentum: Caffe's ``moving_average_fraction`` λ in ``[0, 1]``.
      eps: added to the variance, >= 0.
      axis_name: when set (under ``pmap``/``shard_map``), the batch statistics are averaged
        over that mapped axis, so every device normalises with the global batch's mean and
        biased variance and counts ``m`` over the global batch. Devices must hold equal
        batches.

    Returns:
      ``(y, new_state)``: ``y`` of ``x.shape`` and ``x.dtype``, ``y = (x - mu) / sqrt(var + eps)``.

      * train: ``mu`` and ``var`` are the per-channel mean and biased variance over every axis
        but the last (variance clamped at >= 0). With ``m`` the number of elements per channel,
        ``s <- λ*s + 1``, ``mean_acc <- mu + λ*mean_acc``, ``var_acc <- m/(m-1)*var +
        λ*var_acc`` (factor 1 when ``m <= 1``). The gradient flows through ``mu`` and ``var``
        (Caffe's training backward); none flows into the new state.
      * eval: ``f = 0 if s == 0 else 1/s``, ``mu = f*mean_acc``, ``var = f*var_acc``; the
        gradient is ``dy / sqrt(var + eps)``.
    """
    fn = "batch_norm"
    check_float_array(x, fn=fn, name="x")
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must be (N, ..., C) with at least 2 axes, got shape {x.shape}")
    check_bool(train, fn=fn, name="train", what="a Python bool")
    check_batch_norm_args(momentum, eps, fn=fn)
    _check_state(state, x.shape[-1], fn)
    if train:
        return _batch_norm_train(x, state, momentum=momentum, eps=eps, axis_name=axis_name)
    return _batch_norm_eval(x, state, eps=eps), state


def batch_norm_state(num_channels: int, dtype: DTypeLike = jnp.float32) -> dict[str, Array]:
    """A fresh batch norm state for ``num_channels`` channels: Caffe's three blobs, all zero.

    Returns:
      ``{"mean_acc": (C,), "var_acc": (C,), "scale_factor": (1,)}`` of ``dtype``.
    """
    c = check_positive_int(num_channels, fn="batch_norm_state", name="num_channels")
    return {
        "mean_acc": jnp.zeros((c,), dtype),
        "var_acc": jnp.zeros((c,), dtype),
        "scale_factor": jnp.zeros((1,), dtype),
    }


def check_lrn_args(size, alpha, beta, k, region, *, fn: str) -> None:
    """Validates :func:`lrn`'s configuration (also for the ``LRN`` layer, at construction)."""
    odd = "a positive odd int (Caffe's local_size)"
    if check_int(size, fn=fn, name="size", minimum=1, what=odd) % 2 == 0:
        raise ValueError(f"{fn}: size={size!r} must be {odd}")
    for name, value in (("alpha", alpha), ("beta", beta), ("k", k)):
        check_real(value, fn=fn, name=name)
    check_choice(region, LRN_REGIONS, fn=fn, name="region")


def check_batch_norm_args(momentum, eps, *, fn: str) -> None:
    """Validates :func:`batch_norm`'s configuration (also for the ``BatchNorm`` layer)."""
    if not 0 <= check_real(momentum, fn=fn, name="momentum") <= 1:
        raise ValueError(f"{fn}: momentum={momentum!r} must be in [0, 1]")
    check_real(eps, fn=fn, name="eps", minimum=0)


# ----------------------------------------------------------------------------- internals


# The kernels are jitted with their static configuration, so that eager calls compile one
# program per configuration instead of one per operation.


@functools.partial(jax.jit, static_argnames=("size", "alpha", "beta", "k", "region"))
def _lrn(x, *, size, alpha, beta, k, region):
    acc = acc_dtype(x.dtype)
    xa = x.astype(acc)
    sq = xa * xa
    half = size // 2
    if region == "across_channels":
        scale = k + (alpha / size) * _box_sum(sq, half, axes=(x.ndim - 1,))
    else:
        scale = 1 + (alpha / (size * size)) * _box_sum(sq, half, axes=(1, 2))
    return (xa * scale ** (-beta)).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("momentum", "eps", "axis_name"))
def _batch_norm_train(x, state, *, momentum, eps, axis_name):
    acc = acc_dtype(x.dtype)
    xa = x.astype(acc)
    bshape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    axes = tuple(range(x.ndim - 1))
    mean = _mean(xa, axes, axis_name)
    centred = xa - mean.reshape(bshape)
    var = jnp.maximum(_mean(centred * centred, axes, axis_name), 0)
    y = centred / jnp.sqrt(var + eps).reshape(bshape)
    m = math.prod(x.shape[:-1])
    if axis_name is not None:
        m = m * lax.axis_size(axis_name)  # a static int: the number of devices
    new_state = _update(state, lax.stop_gradient(mean), lax.stop_gradient(var), m, momentum)
    return y.astype(x.dtype), new_state


@functools.partial(jax.jit, static_argnames=("eps",))
def _batch_norm_eval(x, state, *, eps):
    acc = acc_dtype(x.dtype)
    bshape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    s = state["scale_factor"].astype(acc)
    f = jnp.where(s == 0, jnp.zeros_like(s), 1 / jnp.where(s == 0, jnp.ones_like(s), s))
    mean = f * state["mean_acc"].astype(acc)
    var = f * state["var_acc"].astype(acc)
    y = (x.astype(acc) - mean.reshape(bshape)) / jnp.sqrt(var + eps).reshape(bshape)
    return y.astype(x.dtype)


def _check_state(state, c, fn):
    if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{fn}: state must be a dict with keys {list(_STATE_KEYS)} (see batch_norm_state), "
            f"got {got}"
        )
    expected = {"mean_acc": (c,), "var_acc": (c,), "scale_factor": (1,)}
    for name, shape in expected.items():
        got = tuple(jnp.shape(state[name]))
        if got != shape:
            raise ValueError(
                f"{fn}: state[{name!r}] has shape {got}, expected {shape} for x with C={c} channels"
            )


def _mean(x, axes, axis_name):
    mean = jnp.mean(x, axis=axes)
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    return mean


def _update(state, mean, var, m, momentum):
    dtype = state["mean_acc"].dtype
    correction = m / (m - 1) if m > 1 else 1.0
    return {
        "mean_acc": (mean + momentum * state["mean_acc"]).astype(dtype),
        "var_acc": (correction * var + momentum * state["var_acc"]).astype(dtype),
        "scale_factor": (momentum * state["scale_factor"] + 1).astype(dtype),
    }


def _box_sum(x, half, axes):
    """Sum over a ``(2*half + 1)``-wide window centred on each element along each of ``axes``,
    zero padded: one shifted slice per offset, separably per axis."""
    for axis in axes:
        if half == 0:
            continue
        n = x.shape[axis]
        config = [(0, 0, 0)] * x.ndim
        config[axis] = (half, half, 0)
        padded = lax.pad(x, jnp.zeros((), x.dtype), config)
        total = None
        for offset in range(2 * half + 1):
            piece = lax.slice_in_dim(padded, offset, offset + n, axis=axis)
            total = piece if total is None else total + piece
        x = total
    return x
