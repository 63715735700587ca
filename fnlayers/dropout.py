"""Dropout (CAFFE_SEMANTICS.md §6), with explicit PRNG keys."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers._checks import check_float_array

__all__ = ["dropout"]


def dropout(x, rate, *, key=None, train=False):
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
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool):
        raise TypeError(f"{fn}: rate={rate!r} must be a real number in [0, 1)")
    if not 0 <= rate < 1:
        raise ValueError(f"{fn}: rate={rate!r} is the drop probability and must be in [0, 1)")
    if not isinstance(train, bool | np.bool_):
        raise TypeError(f"{fn}: train={train!r} must be a Python bool")
    x = jnp.asarray(x)
    if not train:
        return x
    if key is None:
        raise ValueError(
            f"{fn}: train=True draws random numbers, so it needs a PRNG key: pass "
            "key=jax.random.key(seed) (and split a fresh one for every step, e.g. "
            "key, step_key = jax.random.split(key))"
        )
    if rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - float(rate), x.shape)
    # Caffe multiplies by scale = 1/(1 - p), computed once.
    scale = jnp.asarray(1.0 / (1.0 - float(rate)), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))
