"""Dropout (docs/caffe-semantics.md §6), with explicit PRNG keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnlayers._checks import check_bool, check_float_array, check_key, check_real
from fnlayers._typing import Array, ArrayLike

__all__ = ["dropout"]


def dropout(x: ArrayLike, rate: float, *, key: Array | None = None, train: bool = False) -> Array:
    """Caffe's Dropout with inverted scaling (§6).

    Args:
      x: floating array of any shape.
      rate: the **drop** probability p (Caffe's ``dropout_ratio``), a number in ``[0, 1)``.
        (jax.example_libraries.stax's ``rate`` is the keep probability; this one is not.)
      key: a PRNG key; required when ``train=True``.
      train: a Python bool.

    Returns:
      An array of ``x.shape`` and ``x.dtype``. Train: ``y = x * mask / (1 - p)`` with
      ``mask ~ Bernoulli(1 - p)`` drawn elementwise from ``key`` (the same key gives the same
      mask), so the gradient is ``dy * mask / (1 - p)``. Test: ``y = x``. Under ``pmap`` or
      ``shard_map`` a key replicated over the devices draws the same mask on every device's
      shard; for independent masks fold in the device, e.g.
      ``jax.random.fold_in(key, lax.axis_index("data"))``.

    Raises:
      ValueError: ``rate`` outside ``[0, 1)``, or ``train=True`` without a key (the message
        says how to pass one).
      TypeError: ``rate`` not a real number, ``train`` not a bool, or ``x`` not floating.
    """
    fn = "dropout"
    check_float_array(x, fn=fn, name="x")
    p = check_real(rate, fn=fn, name="rate", what="a real number in [0, 1)")
    if not 0 <= p < 1:
        raise ValueError(f"{fn}: rate={rate!r} is the drop probability and must be in [0, 1)")
    check_bool(train, fn=fn, name="train", what="a Python bool")
    x = jnp.asarray(x)
    if not train:
        return x
    check_key(key, fn=fn)
    if p == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    # Caffe multiplies by scale = 1/(1 - p), computed once.
    scale = jnp.asarray(1.0 / (1.0 - p), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))
