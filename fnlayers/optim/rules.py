"""Per-leaf update rules lifted to parameter pytrees.

A solver's arithmetic is written for one parameter array, as a *rule*::

    rule(g, w, *slots, rate, decay_mult) -> (new_w, new_slots)

``g`` is the parameter's gradient, ``w`` the parameter, ``slots`` its entries of the solver's
per-parameter state (momentum, squared-gradient history, ...), ``rate`` the parameter's local
learning rate (the base rate times its ``lr_mult``) and ``decay_mult`` its weight-decay
multiplier (a Python float). It returns the new parameter and a tuple of the new slots, one per
slot. ``g``, ``w``, the slots and ``rate`` come in the parameter's compute dtype (float32, or
float64 for float64 parameters); the results are cast back to the dtypes of ``w`` and the slots.

:func:`apply_rule` lifts a rule over the parameter pytree, with everything that is the same for
every solver done once: the structure, shape and dtype checks of ``grads`` and the slot trees
against ``params`` (:mod:`fnlayers.optim.trees`), the multipliers
(:mod:`fnlayers.optim.mults`), frozen parameters (``lr_mult`` 0: left bit-for-bit unchanged with
their slots, their gradients ignored) and clipping by the global gradient norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten_with_path, tree_unflatten

from fnlayers.optim.mults import Mults, resolve_mults
from fnlayers.optim.trees import check_float_leaves, leaves_like

__all__ = ["LeafRule", "apply_rule"]

#: ``rule(g, w, *slots, rate, decay_mult) -> (new_w, new_slots)`` (module docstring).
LeafRule = Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]


def apply_rule(
    rule: LeafRule,
    grads: Any,
    params: Any,
    slots: Mapping[str, Any] | None = None,
    *,
    rate: jax.Array,
    lr_mult: Mults = None,
    decay_mult: Mults = None,
    clip_gradients: float | None = None,
    where: str,
) -> tuple[Any, tuple[Any, ...]]:
    """Applies ``rule`` to every parameter: one solver step over the pytree.

    Args:
      rule: the per-array rule (module docstring).
      grads: the gradients, a pytree with the structure, shapes and dtypes of ``params``.
      params: the parameters, a pytree of floating arrays.
      slots: ``name -> tree`` for each per-parameter state tree, each shaped like ``params``;
        the names appear in error messages (``"state.momentum"``).
      rate: the base learning rate, a floating scalar; each rule call gets
        ``rate * lr_mult`` of its parameter.
      lr_mult, decay_mult: the per-parameter multipliers (:mod:`fnlayers.optim.mults`). A
        parameter whose ``lr_mult`` is 0 is frozen: the rule is not called for it, and its
        gradient is left out of the clipping norm.
      clip_gradients: None, or the largest global L2 norm of the (live) gradients: above it,
        every gradient is scaled by ``clip_gradients / norm`` before the rule sees it.
      where: the caller, for messages (``"sgd.update"``).

    Returns:
      ``(new_params, new_slots)``, ``new_slots`` a tuple of trees in the order of ``slots``.

    Raises:
      ValueError: ``grads``, a slot tree or a multiplier tree does not match ``params`` (the
        message names the first differing path), a negative multiplier.
      TypeError: a dtype that differs from the parameter's or is not floating; a rule that
        returns the wrong number of slots.
    """
    flat, treedef = tree_flatten_with_path(params)
    check_float_leaves(flat, where, "params")
    slots = dict(slots or {})
    gs = leaves_like(grads, flat, treedef, where, "grads")
    slot_leaves = [leaves_like(tree, flat, treedef, where, name) for name, tree in slots.items()]
    lr_ms = resolve_mults(lr_mult, flat, treedef, where, "lr_mult")
    decay_ms = resolve_mults(decay_mult, flat, treedef, where, "decay_mult")

    # A frozen leaf's gradient is Caffe's zero diff: ignored, and out of the clipping norm.
    gs = [None if m == 0 else g for g, m in zip(gs, lr_ms, strict=True)]
    if clip_gradients is not None:
        gs = _clip_by_global_norm(gs, clip_gradients)

    new_ws, new_slots = [], [[] for _ in slots]
    for i, (_, w) in enumerate(flat):
        ss = [leaves[i] for leaves in slot_leaves]
        if gs[i] is not None:
            local_rate = rate * np.float32(lr_ms[i])
            w, ss = _apply_leaf(rule, gs[i], w, ss, local_rate, decay_ms[i], where)
        new_ws.append(w)
        for column, s in zip(new_slots, ss, strict=True):
            column.append(s)
    return (
        tree_unflatten(treedef, new_ws),
        tuple(tree_unflatten(treedef, column) for column in new_slots),
    )


def _apply_leaf(rule, g, w, ss, local_rate, decay_mult, where):
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    new_w, new_ss = rule(
        g.astype(dtype),
        w.astype(dtype),
        *(s.astype(dtype) for s in ss),
        rate=local_rate.astype(dtype),
        decay_mult=decay_mult,
    )
    if not isinstance(new_ss, tuple) or len(new_ss) != len(ss):
        got = f"a tuple of {len(new_ss)}" if isinstance(new_ss, tuple) else type(new_ss).__name__
        raise TypeError(
            f"{where}: the update rule must return (new_w, new_slots) with a tuple of "
            f"{len(ss)} slots, got {got}"
        )
    return new_w.astype(w.dtype), [n.astype(s.dtype) for n, s in zip(new_ss, ss, strict=True)]


def _clip_by_global_norm(gs, clip):
    live = [g for g in gs if g is not None]
    if not live:
        return gs
    sumsq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in live)
    norm = jnp.sqrt(sumsq)
    scale = jnp.where(norm > clip, clip / jnp.where(norm > clip, norm, 1.0), 1.0)
    return [None if g is None else g * scale.astype(g.dtype) for g in gs]
