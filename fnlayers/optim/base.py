"""The optimizer protocol: what ``fnlayers.train`` needs from an optimizer, and its check.

An fnlayers optimizer is an :class:`Optimizer`, three pure functions:

- ``init(params) -> state``: the optimizer state for ``params``, a pytree.
- ``update(grads, state, params) -> (new_params, new_state)``: one step. It returns the new
  **parameters**, Caffe's way (``Blob::Update`` writes the weights), not the updates an optax
  ``GradientTransformation`` returns for ``optax.apply_updates``.
- ``learning_rate_at(state) -> scalar``: the base learning rate the next ``update`` applies (a
  jit-safe function of the state, for the metrics), or None when the optimizer does not know it.

Wrap an optax transformation with :func:`fnlayers.optim.from_optax`; an fnlayers optimizer does
not go inside ``optax.chain`` (optax would add the new parameters to the parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers._checks import check_real

__all__ = ["Optimizer", "check_optimizer"]

Params = Any
State = Any
Schedule = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An fnlayers optimizer (the module docstring gives the contract).

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(grads, state, params) -> (new_params, new_state)``; ``grads`` has the
        structure, shapes and dtypes of ``params``.
      learning_rate_at: ``learning_rate_at(state) -> scalar``, the base rate of the next
        ``update(grads, state, params)``, or None when unknown.

    Build one from your own functions as ``Optimizer(init, update, learning_rate_at)``;
    :func:`fnlayers.optim.sgd` returns a :class:`fnlayers.optim.Solver`, a subclass.
    """

    init: Callable[[Params], State]
    update: Callable[[Params, State, Params], tuple[Params, State]]
    learning_rate_at: Callable[[State], jax.Array] | None = None

    def __post_init__(self) -> None:
        for name in ("init", "update"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Optimizer: {name}={getattr(self, name)!r} must be a function")
        if self.learning_rate_at is not None and not callable(self.learning_rate_at):
            raise TypeError(
                f"Optimizer: learning_rate_at={self.learning_rate_at!r} must be a function or None"
            )


def check_optimizer(optimizer: object, *, fn: str, name: str = "optimizer") -> Optimizer:
    """Returns ``optimizer`` when it is an fnlayers :class:`Optimizer`, else raises.

    Args:
      optimizer: the object to check.
      fn, name: the function and argument named in the message (``fit: optimizer ...``).

    Raises:
      TypeError: ``optimizer`` is not an :class:`Optimizer`. When it has ``init`` and
        ``update`` (an optax ``GradientTransformation``, say), the message says to wrap it with
        ``fl.optim.from_optax(tx)``, since its ``update`` returns updates where fnlayers expects
        the new parameters.
    """
    if isinstance(optimizer, Optimizer):
        return optimizer
    kind = type(optimizer).__name__
    if has_init_and_update(optimizer):
        raise TypeError(
            f"{fn}: {name} is a {kind} with init and update but not an fnlayers optimizer; it "
            "looks like an optax GradientTransformation, whose update returns the updates to "
            "add to the parameters, where an fnlayers optimizer's update returns the new "
            "parameters (so it would be trained wrongly). Wrap it: fl.optim.from_optax(tx), "
            "or, if its update already returns the new parameters, "
            "fl.optim.Optimizer(init, update, learning_rate_at)"
        )
    hint = " (a function: call it, e.g. fl.optim.sgd(0.01))" if callable(optimizer) else ""
    raise TypeError(
        f"{fn}: {name} must be an fnlayers optimizer (fl.optim.Optimizer, e.g. "
        f"fl.optim.sgd(0.01)), got {kind}{hint}"
    )


def as_schedule(learning_rate: float | Schedule, fn: str) -> Schedule:
    """A learning rate argument as a schedule ``lr(iteration)``.

    ``learning_rate`` is a real number >= 0 (a constant float32 rate) or already a schedule
    (returned as is, checked when it is called by :func:`rate_at`).

    Raises:
      TypeError, ValueError: neither a callable nor a finite real number >= 0.
    """
    if callable(learning_rate):
        return learning_rate
    base = check_real(
        learning_rate,
        fn=fn,
        name="learning_rate",
        minimum=0.0,
        what="a real number or a schedule",
    )
    base32 = np.float32(base)

    def constant(iteration):
        return jnp.full(jnp.shape(iteration), base32, jnp.float32)

    return constant


def rate_at(schedule: Schedule, iteration: jax.Array, where: str) -> jax.Array:
    """``schedule(iteration)`` as a floating scalar array (float32 unless it is floating already).

    Raises:
      ValueError: the schedule returned something that is not a scalar.
    """
    rate = jnp.asarray(schedule(iteration))
    if rate.shape != ():
        raise ValueError(
            f"{where}: learning_rate(iteration) must be a scalar, got shape {rate.shape}"
        )
    if not jnp.issubdtype(rate.dtype, jnp.floating):
        rate = rate.astype(jnp.float32)
    return rate


def check_state(state: Any, state_type: type, where: str) -> None:
    """Raises TypeError unless ``state`` is a ``state_type`` (the optimizer's own ``init``)."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"{where}: state must be the {state_type.__name__} from init(params), got "
            f"{type(state).__name__}"
        )


def has_init_and_update(obj: object) -> bool:
    """Whether ``obj`` has callable ``init`` and ``update`` attributes (an optimizer, or an
    optax ``GradientTransformation``)."""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))
