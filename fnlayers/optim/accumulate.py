"""Caffe's ``iter_size``: gradients summed over micro-batches (docs/caffe-semantics.md §9)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import tree_flatten_with_path

from fnlayers._tree import path_str

__all__ = ["accumulate_gradients"]


def accumulate_gradients(
    grad_fn: Callable[[Any, Any], Any], params: Any, micro_batches: Any
) -> Any:
    """Caffe's ``iter_size``: the leafwise sum of ``grad_fn(params, batch)`` over micro-batches.

    Args:
      grad_fn: ``grad_fn(params, batch) -> pytree`` (e.g. ``jax.grad(loss)``, or
        ``jax.value_and_grad(loss)``, whose losses are then summed too).
      params: passed unchanged to every call.
      micro_batches: a pytree whose leaves all have the same leading axis ``k >= 1``;
        ``batch`` is its ``i``-th slice.

    Returns:
      The sum over ``i`` of ``grad_fn(params, slice_i)``, accumulated in order as Caffe's diffs
      are (a ``lax.scan``: one copy of ``grad_fn`` in the compiled program whatever ``k``).
      Pass it to the update of ``sgd(..., iter_size=k)``, which clips the sum and then divides
      by ``k`` (§9). Caffe's displayed loss is the sum divided by ``k``.

    Raises:
      ValueError: ``micro_batches`` has no leaves, or leaves whose leading axes differ.
    """
    fn = "accumulate_gradients"
    flat, _ = tree_flatten_with_path(micro_batches)
    if not flat:
        raise ValueError(f"{fn}: micro_batches has no arrays")
    sizes = []
    for path, leaf in flat:
        shape = np.shape(leaf)
        if len(shape) < 1:
            raise ValueError(
                f"{fn}: micro_batches leaf {path_str(path)!r} is a scalar; every leaf needs a "
                "leading micro-batch axis"
            )
        sizes.append((shape[0], path))
    k, first_path = sizes[0]
    for size, path in sizes:
        if size != k:
            raise ValueError(
                f"{fn}: micro_batches leaves disagree on the micro-batch count: "
                f"{path_str(first_path)!r} has {k}, {path_str(path)!r} has {size}"
            )
    if k < 1:
        raise ValueError(f"{fn}: micro_batches has 0 micro-batches")
    batches = jax.tree.map(jnp.asarray, micro_batches)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], batches))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(total, batch):
        return jax.tree.map(jnp.add, total, grad_fn(params, batch)), None

    # 0 + g_0 == g_0 exactly, so the sum is Caffe's ((g_0 + g_1) + g_2) + ...
    total, _ = lax.scan(body, zeros, batches)
    return total
