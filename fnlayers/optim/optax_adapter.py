"""optax ``GradientTransformation`` s as fnlayers optimizers, without importing optax.

An optax transformation's ``update(updates, state, params) -> (updates, state)`` returns the
*updates* to add to the parameters (``optax.apply_updates``); an fnlayers optimizer's ``update``
returns the new *parameters*. :func:`from_optax` adds them::

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    solver = fl.optim.from_optax(tx, learning_rate=1e-3)
    fl.train.fit(model, loss_fn, solver, ...)

Compose optax transformations with ``optax.chain`` first and wrap the result; an fnlayers
optimizer does not go inside ``optax.chain``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import tree_flatten_with_path

from fnlayers.optim.base import (
    Optimizer,
    Schedule,
    as_schedule,
    check_state,
    has_init_and_update,
    rate_at,
)
from fnlayers.optim.trees import leaves_like

__all__ = ["OptaxState", "from_optax"]


class OptaxState(NamedTuple):
    """The state of a :func:`from_optax` optimizer, a pytree.

    Attributes:
      iteration: int32 scalar, the number of updates applied so far (the argument of the
        ``learning_rate`` schedule).
      inner: the transformation's own state, ``tx.init(params)`` at first.
    """

    iteration: jax.Array
    inner: Any


def from_optax(tx: Any, *, learning_rate: float | Schedule | None = None) -> Optimizer:
    """An fnlayers :class:`~fnlayers.optim.Optimizer` that applies ``tx`` 's updates.

    Args:
      tx: an optax-style gradient transformation: ``tx.init(params) -> state`` and
        ``tx.update(updates, state, params) -> (updates, state)`` (``optax.sgd(...)``,
        ``optax.chain(...)``, or any object with those two functions).
      learning_rate: what ``learning_rate_at`` reports, for the metrics only (``tx`` applies
        its own rate): a float >= 0, a schedule ``lr(iteration)`` (the one given to ``tx``), or
        None (the default): ``learning_rate_at`` is None.

    Returns:
      An :class:`~fnlayers.optim.Optimizer` whose state is an :class:`OptaxState` and whose
      ``update(grads, state, params)`` returns ``params + updates`` leaf by leaf, cast to each
      parameter's dtype (``optax.apply_updates``). ``grads`` must match ``params`` in
      structure, shapes and dtypes; ``tx`` 's updates in structure and shapes.

    Raises:
      TypeError: ``tx`` has no ``init``/``update`` functions, or is already an fnlayers
        optimizer; a bad ``learning_rate``.
      ValueError: a negative or non-finite ``learning_rate``.
    """
    fn = "from_optax"
    if isinstance(tx, Optimizer):
        raise TypeError(
            f"{fn}: tx is already an fnlayers optimizer ({type(tx).__name__}); use it as it is"
        )
    if not has_init_and_update(tx):
        raise TypeError(
            f"{fn}: tx must be an optax-style GradientTransformation with init(params) and "
            f"update(updates, state, params), got {type(tx).__name__}"
        )
    schedule = None if learning_rate is None else as_schedule(learning_rate, fn)

    def init(params: Any) -> OptaxState:
        return OptaxState(jnp.zeros((), jnp.int32), tx.init(params))

    def update(grads: Any, state: OptaxState, params: Any) -> tuple[Any, OptaxState]:
        where = f"{fn}.update"
        check_state(state, OptaxState, where)
        flat, treedef = tree_flatten_with_path(params)
        leaves_like(grads, flat, treedef, where, "grads")
        updates, inner = tx.update(grads, state.inner, params)
        leaves_like(updates, flat, treedef, where, "tx's updates", same_dtype=False)
        new_params = jax.tree.map(
            lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype), params, updates
        )
        return new_params, OptaxState(state.iteration + 1, inner)

    def learning_rate_at(state: OptaxState) -> jax.Array:
        return rate_at(schedule, state.iteration, f"{fn}.learning_rate_at")

    return Optimizer(init, update, None if schedule is None else learning_rate_at)
