"""Initializers: Caffe's fillers (docs/caffe-semantics.md §11), as ``init_fn(key, shape, dtype)``.

Every constructor returns a function with the signature of ``jax.nn.initializers``, so the two
kinds mix freely.

Fans in fnlayers layouts. Caffe computes ``fan_in = count / shape(0)`` and ``fan_out = count /
shape(1)`` on its ``(out, in, kh, kw)`` conv blobs and ``(C_out, K)`` InnerProduct blobs. Our
layouts are those blobs transposed by ``(2, 3, 1, 0)`` (HWIO ``(KH, KW, C_in/G, C_out)``) and
``(K, C_out)``, so Caffe's axis 0 is our last axis and its axis 1 our second-to-last:

    fan_in  = count / shape[-1]   (conv: KH*KW*C_in/G;  dense: K)
    fan_out = count / shape[-2]   (conv: KH*KW*C_out;   dense: C_out)

A deconvolution weight ``(KH, KW, C_out/G, C_in)`` is Caffe's deconv blob ``(C_in, C_out/G, kh,
kw)`` transposed the same way, so the same rule gives Caffe's fans there too. A 1-D shape has
``fan_in = fan_out = count``, as Caffe. "Per output unit" (``positive_unitball``, ``sparse``)
likewise means per index of the last axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeAlias

import jax
import jax.numpy as jnp

from fnlayers._checks import check_choice
from fnlayers._typing import Array, DTypeLike, Shape

__all__ = [
    "bilinear",
    "constant",
    "fans",
    "gaussian",
    "msra",
    "positive_unitball",
    "uniform",
    "xavier",
]

_NORMS = ("fan_in", "fan_out", "average")

#: What every constructor returns: ``init(key, shape, dtype=jnp.float32) -> array``.
Initializer: TypeAlias = Callable[[Array, Shape, DTypeLike], Array]


def constant(value: float = 0.0) -> Initializer:
    """Every element equals ``value`` (Caffe ``constant``; its default value is 0)."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.full(shape, value, dtype)

    return init


def uniform(minval: float = 0.0, maxval: float = 1.0) -> Initializer:
    """``U(minval, maxval)`` (Caffe ``uniform``, defaults min=0, max=1)."""
    if not minval <= maxval:
        raise ValueError(f"uniform: minval={minval} must be <= maxval={maxval}")

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, minval, maxval).astype(dtype)

    return init


def gaussian(std: float = 1.0, mean: float = 0.0, *, sparse: int | None = None) -> Initializer:
    """``N(mean, std)`` (Caffe ``gaussian``). With ``sparse``, each element is kept with
    probability ``sparse / C_out`` (C_out = ``shape[-1]``, Caffe's ``shape(0)``) and zeroed
    otherwise."""
    if std < 0:
        raise ValueError(f"gaussian: std={std} must be >= 0")
    if sparse is not None and sparse < 0:
        raise ValueError(f"gaussian: sparse={sparse} must be >= 0")

    def init(key, shape, dtype=jnp.float32):
        k_val, k_mask = jax.random.split(key)
        w = mean + std * jax.random.normal(k_val, shape, jnp.float32)
        if sparse is not None:
            if len(shape) < 2:
                raise ValueError(f"gaussian: sparse needs a weight of rank >= 2, got {shape}")
            p = min(1.0, sparse / shape[-1])
            w = w * jax.random.bernoulli(k_mask, p, shape)
        return w.astype(dtype)

    return init


def positive_unitball() -> Initializer:
    """``U(0, 1)``, then every output unit's weights (all axes but the last) divided by their
    sum, so each sums to 1 (Caffe ``positive_unitball``)."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.uniform(key, shape, jnp.float32)
        if len(shape) > 1:
            w = w / jnp.sum(w, axis=tuple(range(len(shape) - 1)), keepdims=True)
        else:
            w = w / jnp.sum(w)
        return w.astype(dtype)

    return init


def xavier(variance_norm: str = "fan_in", distribution: str = "uniform") -> Initializer:
    """Caffe ``xavier``: ``U(-sqrt(3/n), sqrt(3/n))`` with ``n`` = fan_in, fan_out, or their
    average. ``distribution="normal"`` draws ``N(0, sqrt(1/n))`` instead (same variance, 1/n)."""
    check_choice(variance_norm, _NORMS, fn="xavier", name="variance_norm")
    check_choice(distribution, ("uniform", "normal"), fn="xavier", name="distribution")

    def init(key, shape, dtype=jnp.float32):
        n = _norm(shape, variance_norm)
        if distribution == "uniform":
            limit = math.sqrt(3.0 / n)
            w = jax.random.uniform(key, shape, jnp.float32, -limit, limit)
        else:
            w = math.sqrt(1.0 / n) * jax.random.normal(key, shape, jnp.float32)
        return w.astype(dtype)

    return init


def msra(variance_norm: str = "fan_in") -> Initializer:
    """Caffe ``msra`` (He et al.): ``N(0, sqrt(2/n))``, ``n`` as in :func:`xavier`."""
    check_choice(variance_norm, _NORMS, fn="msra", name="variance_norm")

    def init(key, shape, dtype=jnp.float32):
        n = _norm(shape, variance_norm)
        return (math.sqrt(2.0 / n) * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def bilinear() -> Initializer:
    """Caffe ``bilinear``: the bilinear-interpolation kernel for upsampling deconvolutions.

    ``shape`` is ``(K, K, I, O)`` (square kernel). With ``f = ceil(K/2)`` and
    ``c = (K-1)/(2f)``, ``w[y, x, :, :] = (1 - |x/f - c|) * (1 - |y/f - c|)``: every (in, out)
    slice is the same 2-D kernel, e.g. K=4 gives the 1-D profile ``[0.25, 0.75, 0.75, 0.25]``.
    The key is unused.
    """

    def init(key, shape, dtype=jnp.float32):
        if len(shape) != 4 or shape[0] != shape[1]:
            raise ValueError(f"bilinear: shape={tuple(shape)} must be (K, K, I, O), square")
        k = shape[0]
        f = math.ceil(k / 2)
        c = (k - 1) / (2.0 * f)
        profile = 1.0 - jnp.abs(jnp.arange(k, dtype=jnp.float32) / f - c)
        kernel = profile[:, None] * profile[None, :]
        return jnp.broadcast_to(kernel[:, :, None, None], shape).astype(dtype)

    return init


def fans(shape: Shape) -> tuple[float, float]:
    """``(fan_in, fan_out)`` of a weight shape by Caffe's rule translated to our layouts."""
    if len(shape) == 0:
        raise ValueError("fans: a scalar weight has no fans")
    count = math.prod(shape)
    if len(shape) == 1:
        return float(count), float(count)
    return count / shape[-1], count / shape[-2]


def _norm(shape, variance_norm) -> float:
    fan_in, fan_out = fans(shape)
    return {"fan_in": fan_in, "fan_out": fan_out, "average": (fan_in + fan_out) / 2.0}[
        variance_norm
    ]
