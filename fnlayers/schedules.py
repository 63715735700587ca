"""Caffe's seven learning-rate policies (docs/caffe-semantics.md §10,
``SGDSolver::GetLearningRate``).

Each constructor takes ``base_lr`` and the policy's hyperparameters under Caffe's names and
returns a :class:`Schedule`, a callable ``lr(iteration) -> float32 array``:

=============  ======================================================================
``fixed``      ``base_lr``
``step``       ``base_lr * gamma ** floor(it / stepsize)``
``exp``        ``base_lr * gamma ** it``
``inv``        ``base_lr * (1 + gamma * it) ** (-power)``
``multistep``  ``base_lr * gamma ** (number of stepvalues <= it)``
``poly``       ``base_lr * (1 - it / max_iter) ** power``
``sigmoid``    ``base_lr / (1 + exp(-gamma * (it - stepsize)))``
=============  ======================================================================

``iteration`` is Caffe's ``iter_``: the number of updates already applied, 0 for the first one.
It is an integer scalar or array (a Python int, or a traced ``int32`` inside ``jit``); the
result has its shape. Every schedule is a pure function of the iteration, so it gives the same
value whether or not it was called at earlier iterations (Caffe's multistep is stateful; see
:func:`multistep`).

Arithmetic is float32, as in Caffe, whose ``SolverParameter`` stores ``base_lr``, ``gamma`` and
``power`` as protobuf ``float``: hyperparameters are rounded to float32 first, and the result
agrees with the float64 evaluation of the formula on those rounded values to about 1e-6
relative (exactly representable iterations: ``|it| < 2**24``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlayers._checks import check_int, check_real, is_int
from fnlayers._typing import Array, ArrayLike

__all__ = ["Schedule", "exp", "fixed", "inv", "multistep", "poly", "sigmoid", "step"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A learning-rate policy: ``schedule(iteration) -> lr`` (float32, ``iteration``'s shape).

    Attributes:
      policy: Caffe's ``lr_policy`` name (``"step"``, ``"inv"``, ...).
      hyperparams: the arguments it was built with, as a tuple of ``(name, value)`` pairs.
    """

    policy: str
    hyperparams: tuple[tuple[str, object], ...]
    fn: Callable[[jax.Array], jax.Array] = dataclasses.field(repr=False, compare=False)

    def __call__(self, iteration: ArrayLike) -> Array:
        return self.fn(_iteration(iteration, self.policy))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams)
        return f"schedules.{self.policy}({args})"


def fixed(base_lr: float) -> Schedule:
    """``lr(it) = base_lr``."""
    base = _real(base_lr, "fixed", "base_lr", minimum=0.0)
    return Schedule(
        "fixed", (("base_lr", base_lr),), lambda it: jnp.full(it.shape, base, jnp.float32)
    )


def step(base_lr: float, gamma: float, stepsize: int) -> Schedule:
    """``lr(it) = base_lr * gamma ** floor(it / stepsize)``: multiply by ``gamma`` every
    ``stepsize`` iterations.

    Args:
      base_lr: the rate for iterations ``[0, stepsize)``, >= 0.
      gamma: the factor per step, >= 0 (Caffe's ``CHECK_GE(gamma, 0)``).
      stepsize: a positive int (Caffe's ``CHECK_GT(stepsize, 0)``).
    """
    fn = "step"
    base = _real(base_lr, fn, "base_lr", minimum=0.0)
    g = _real(gamma, fn, "gamma", minimum=0.0)
    size = _positive_int(stepsize, fn, "stepsize")
    return Schedule(
        fn,
        (("base_lr", base_lr), ("gamma", gamma), ("stepsize", stepsize)),
        lambda it: base * _pow(g, it // size),
    )


def exp(base_lr: float, gamma: float) -> Schedule:
    """``lr(it) = base_lr * gamma ** it``; ``base_lr >= 0``, ``gamma >= 0``."""
    fn = "exp"
    base = _real(base_lr, fn, "base_lr", minimum=0.0)
    g = _real(gamma, fn, "gamma", minimum=0.0)
    return Schedule(fn, (("base_lr", base_lr), ("gamma", gamma)), lambda it: base * _pow(g, it))


def inv(base_lr: float, gamma: float, power: float) -> Schedule:
    """``lr(it) = base_lr * (1 + gamma * it) ** (-power)`` (Caffe's LeNet recipe:
    ``inv(0.01, gamma=1e-4, power=0.75)``); ``base_lr >= 0``, ``gamma >= 0``, ``power`` finite.
    """
    fn = "inv"
    base = _real(base_lr, fn, "base_lr", minimum=0.0)
    g = _real(gamma, fn, "gamma", minimum=0.0)
    p = _real(power, fn, "power")
    return Schedule(
        fn,
        (("base_lr", base_lr), ("gamma", gamma), ("power", power)),
        lambda it: base * lax.pow(1 + g * it.astype(jnp.float32), -p),
    )


def multistep(base_lr: float, gamma: float, stepvalues: Sequence[int]) -> Schedule:
    """``lr(it) = base_lr * gamma ** n(it)`` with ``n(it)`` the number of ``stepvalues <= it``.

    Caffe keeps ``current_step_`` as solver state and raises it by at most one per call, when
    ``it >= stepvalue[current_step_]``. Called once per iteration from 0 with strictly increasing
    step values, as Caffe's solver does, that count is exactly ``n(it)``; this function of the
    iteration alone is the same value without the state, and stays right when a run resumes at
    any iteration.

    Args:
      base_lr: >= 0.
      gamma: the factor per step, >= 0.
      stepvalues: a sequence of non-negative ints in strictly increasing order (may be empty:
        a constant rate).
    """
    fn = "multistep"
    base = _real(base_lr, fn, "base_lr", minimum=0.0)
    g = _real(gamma, fn, "gamma", minimum=0.0)
    values = _stepvalues(stepvalues, fn)
    table = np.asarray(values, np.int32)

    def lr(it):
        if not values:
            return jnp.full(it.shape, base, jnp.float32)
        n = jnp.searchsorted(jnp.asarray(table), it.astype(jnp.int32), side="right")
        return base * _pow(g, n)

    return Schedule(fn, (("base_lr", base_lr), ("gamma", gamma), ("stepvalues", tuple(values))), lr)


def poly(base_lr: float, power: float, max_iter: int) -> Schedule:
    """``lr(it) = base_lr * (1 - it / max_iter) ** power``, reaching 0 at ``max_iter``.

    Caffe's solver stops at ``max_iter`` and never evaluates later iterations (the formula
    would give NaN or a rising rate there); this schedule holds the value of ``max_iter`` for
    every later iteration (0 when ``power > 0``).

    Args:
      base_lr: >= 0.
      power: >= 0 (1 is linear decay).
      max_iter: a positive int.
    """
    fn = "poly"
    base = _real(base_lr, fn, "base_lr", minimum=0.0)
    p = _real(power, fn, "power", minimum=0.0)
    last = _positive_int(max_iter, fn, "max_iter")
    last32 = np.float32(last)

    def lr(it):
        # (max_iter - it) / max_iter: equal to Caffe's 1 - it/max_iter, and exactly 0 at max_iter
        # even when XLA turns the division into a multiply-add by the reciprocal.
        left = (last - jnp.minimum(it, last)).astype(jnp.float32) / last32
        return base * lax.pow(left, p)

    return Schedule(fn, (("base_lr", base_lr), ("power", power), ("max_iter", max_iter)), lr)


def sigmoid(base_lr: float, gamma: float, stepsize: int) -> Schedule:
    """``lr(it) = base_lr / (1 + exp(-gamma * (it - stepsize)))``: a ramp up that is centred on
    ``stepsize`` (half of ``base_lr`` there).

    Args:
      base_lr: >= 0.
      gamma: the steepness, >= 0 (Caffe's ``CHECK_GE(gamma, 0)``: the rate can only rise).
      stepsize: a positive int (Caffe's ``CHECK_GT(stepsize, 0)``).
    """
    fn = "sigmoid"
    base = _real(base_lr, fn, "base_lr", minimum=0.0)
    g = _real(gamma, fn, "gamma", minimum=0.0)
    centre = np.float32(_positive_int(stepsize, fn, "stepsize"))

    def lr(it):
        return base * (1 / (1 + jnp.exp(-g * (it.astype(jnp.float32) - centre))))

    return Schedule(fn, (("base_lr", base_lr), ("gamma", gamma), ("stepsize", stepsize)), lr)


# --------------------------------------------------------------------------------------------
# private helpers


def _pow(base32, exponent):
    # lax.pow on a float exponent: jnp.power with an integer array exponent is a
    # repeated-squaring loop whose error grows with the exponent (3e-4 at 1e5 in float32).
    return lax.pow(base32, exponent.astype(jnp.float32))


def _iteration(iteration, policy):
    if isinstance(iteration, jax.Array):
        it = iteration
    else:
        it = np.asarray(iteration)
        # Only host values are checked here; a traced iteration is counted by the solver.
        if jnp.issubdtype(it.dtype, jnp.integer) and np.any(it < 0):
            raise ValueError(f"schedules.{policy}: iteration={iteration!r} must be >= 0")
    if not jnp.issubdtype(it.dtype, jnp.integer):
        raise TypeError(
            f"schedules.{policy}: iteration must be an integer (Caffe's iter_), got "
            f"{iteration!r} of dtype {it.dtype}"
        )
    return jnp.asarray(it)


def _real(value, fn, name, minimum=None) -> np.float32:
    """A hyperparameter as Caffe's ``SolverParameter`` stores it: a float32."""
    return np.float32(check_real(value, fn=f"schedules.{fn}", name=name, minimum=minimum))


def _positive_int(value, fn, name) -> int:
    return check_int(value, fn=f"schedules.{fn}", name=name, minimum=1, what="positive")


def _stepvalues(stepvalues, fn) -> list[int]:
    if not isinstance(stepvalues, Sequence | np.ndarray) or isinstance(stepvalues, str):
        raise TypeError(f"schedules.{fn}: stepvalues={stepvalues!r} must be a sequence of ints")
    values = list(stepvalues)
    for v in values:
        if not is_int(v):
            raise TypeError(f"schedules.{fn}: stepvalues={stepvalues!r} must hold ints, got {v!r}")
        if v < 0:
            raise ValueError(f"schedules.{fn}: stepvalues={stepvalues!r} must be >= 0, got {v}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"schedules.{fn}: stepvalues={stepvalues!r} must be strictly increasing")
    return [int(v) for v in values]
