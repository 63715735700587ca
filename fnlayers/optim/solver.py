"""What every Caffe solver shares around its own update (``SGDSolver::ApplyUpdate``, §9).

A Caffe solver (SGD and Nesterov in :mod:`~fnlayers.optim.sgd_solver`; AdaGrad, RMSProp,
AdaDelta and Adam in :mod:`~fnlayers.optim.adaptive`) differs from the others only in
``ComputeUpdateValue``; the rest of ``ApplyUpdate`` is common:

1. ``rate = learning_rate(iteration)`` (``GetLearningRate``).
2. ``ClipGradients``: the global L2 norm of the gradients as given (the sum over ``iter_size``
   micro-batches), every gradient scaled by ``clip / norm`` when it exceeds ``clip``.
3. Per parameter: ``Normalize`` (``g /= iter_size``), ``Regularize`` (``g += weight_decay *
   decay_mult * w`` for L2, ``* sign(w)`` for L1, ``sign(0) = 0``), then the solver's rule with
   the local rate ``rate * lr_mult``, which returns the new parameter and history.
4. ``iteration += 1``.

:class:`SolverSettings` holds the shared hyperparameters (validated once), and
:func:`make_solver` turns a solver's rule into a :class:`Solver`. A Caffe rule is::

    rule(g, w, *history, rate, iteration) -> (new_w, new_history)

with ``g`` already normalised and regularised, ``rate`` the local rate, ``iteration`` the int32
scalar count of updates before this one (Adam's bias correction uses ``iteration + 1``), and
the arrays in the compute dtype of :mod:`fnlayers.optim.rules`. The solver's state is a
``NamedTuple`` whose first field is ``iteration`` and whose other fields are the history trees,
in the rule's order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers._checks import check_choice, check_positive_int, check_real
from fnlayers.optim.base import Optimizer, Schedule, check_state, rate_at
from fnlayers.optim.mults import Mults, check_mults_arg
from fnlayers.optim.rules import apply_rule
from fnlayers.optim.trees import zeros_like_params

__all__ = ["CaffeRule", "Solver", "SolverSettings", "make_solver"]

#: ``rule(g, w, *history, rate, iteration) -> (new_w, new_history)`` (module docstring).
CaffeRule = Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Solver(Optimizer):
    """An :class:`~fnlayers.optim.Optimizer` for one of Caffe's solvers.

    Attributes:
      learning_rate: ``learning_rate(iteration) -> float32``, the base rate before ``lr_mult``
        (a constant is wrapped); ``learning_rate(state.iteration)`` is the rate of the next
        update, which ``learning_rate_at(state)`` returns.
      iter_size: how many micro-batch gradients ``update`` expects summed in ``grads``.
    """

    learning_rate: Schedule
    iter_size: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class SolverSettings:
    """The hyperparameters every Caffe solver applies the same way (module docstring).

    Build it with :meth:`checked`, which validates them.
    """

    weight_decay: float = 0.0
    regularization: str = "l2"
    clip_gradients: float | None = None
    lr_mult: Mults = None
    decay_mult: Mults = None
    iter_size: int = 1

    @classmethod
    def checked(
        cls,
        fn: str,
        *,
        weight_decay: float,
        regularization: str,
        clip_gradients: float | None,
        lr_mult: Mults,
        decay_mult: Mults,
        iter_size: int,
    ) -> SolverSettings:
        """Validates the arguments of solver ``fn`` (see :func:`fnlayers.optim.sgd`).

        Raises:
          TypeError, ValueError: an argument of the wrong type or out of range.
        """
        decay = check_real(weight_decay, fn=fn, name="weight_decay", minimum=0.0)
        check_choice(regularization, ("l2", "l1"), fn=fn, name="regularization")
        clip = None
        if clip_gradients is not None:
            clip = check_real(clip_gradients, fn=fn, name="clip_gradients", minimum=0.0)
        check_mults_arg(lr_mult, fn, "lr_mult")
        check_mults_arg(decay_mult, fn, "decay_mult")
        size = check_positive_int(iter_size, fn=fn, name="iter_size")
        return cls(decay, regularization, clip, lr_mult, decay_mult, size)

    def gradient(self, g: jax.Array, w: jax.Array, decay_mult: float) -> jax.Array:
        """Caffe's ``Normalize`` and ``Regularize`` of one parameter's (clipped) gradient."""
        if self.iter_size != 1:
            g = g * np.float32(1.0 / self.iter_size)
        local_decay = np.float32(self.weight_decay) * np.float32(decay_mult)
        if local_decay != 0:
            reg = w if self.regularization == "l2" else jnp.sign(w)
            g = g + local_decay * reg
        return g


def make_solver(
    fn: str,
    learning_rate: Schedule,
    settings: SolverSettings,
    state_type: type[NamedTuple],
    rule: CaffeRule,
) -> Solver:
    """A :class:`Solver` from a Caffe rule (module docstring).

    Args:
      fn: the solver's name, for messages (``"sgd"`` gives ``"sgd.update: ..."``).
      learning_rate: the schedule (:func:`fnlayers.optim.base.as_schedule`).
      settings: the shared hyperparameters.
      state_type: a ``NamedTuple`` type ``(iteration, *history)``; ``init`` fills each history
        field with zeros shaped like the parameters.
      rule: the solver's ``ComputeUpdateValue`` on one parameter.
    """
    history = state_type._fields[1:]

    def init(params: Any) -> Any:
        where = f"{fn}.init"
        zeros = [zeros_like_params(params, where) for _ in history]
        return state_type(jnp.zeros((), jnp.int32), *zeros)

    def update(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        where = f"{fn}.update"
        check_state(state, state_type, where)
        base_rate = rate_at(learning_rate, state.iteration, where)

        def leaf_rule(g, w, *slots, rate, decay_mult):
            g = settings.gradient(g, w, decay_mult)
            return rule(g, w, *slots, rate=rate, iteration=state.iteration)

        new_params, new_history = apply_rule(
            leaf_rule,
            grads,
            params,
            {f"state.{name}": getattr(state, name) for name in history},
            rate=base_rate,
            lr_mult=settings.lr_mult,
            decay_mult=settings.decay_mult,
            clip_gradients=settings.clip_gradients,
            where=where,
        )
        return new_params, state_type(state.iteration + 1, *new_history)

    def learning_rate_at(state: Any) -> jax.Array:
        return rate_at(learning_rate, state.iteration, f"{fn}.learning_rate_at")

    return Solver(
        init=init,
        update=update,
        learning_rate_at=learning_rate_at,
        learning_rate=learning_rate,
        iter_size=settings.iter_size,
    )
