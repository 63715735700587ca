"""Caffe's SGD solver, written out: momentum, Nesterov, L2/L1 decay, lr_mult/decay_mult, clipping
(docs/caffe-semantics.md §9, ``solvers/sgd_solver.cpp``, ``nesterov_solver.cpp``).

Usage::

    opt = optim.sgd(schedules.inv(0.01, gamma=1e-4, power=0.75), momentum=0.9,
                    weight_decay=5e-4, **optim.caffe_bias_mults())
    opt_state = opt.init(params)
    params, opt_state = opt.update(grads, opt_state, params)     # pure; jit it

One ``update`` is one Caffe iteration's ``ApplyUpdate``, for iteration ``it`` =
``opt_state.iteration`` (0 for the first update):

1. ``rate = learning_rate(it)``.
2. With ``clip_gradients=c``: when the global L2 norm of all gradients exceeds ``c``, every
   gradient is scaled by ``c / norm``. The norm is taken on the gradients as given, i.e. on the
   sum over ``iter_size`` micro-batches, before step 3.
3. Per parameter: ``g /= iter_size``; ``g += weight_decay*decay_mult * w`` (L2) or
   ``* sign(w)`` (L1, ``sign(0) = 0``); ``v = momentum*v + rate*lr_mult*g``; ``w -= v``, or with
   Nesterov ``w -= (1+momentum)*v - momentum*v_prev``.
4. ``iteration += 1``.

Per-parameter multipliers (``lr_mult``, ``decay_mult``; Caffe's ``ParamSpec``, default 1) are
described in :mod:`fnlayers.optim.mults`. A parameter whose ``lr_mult`` is 0 is frozen: it and
its momentum stay bit-for-bit unchanged, and its gradient, whatever it holds (even NaN), is
ignored, also by the clipping norm (Caffe computes no gradient for it, so its diff is 0).

Gradient accumulation (Caffe's ``iter_size``): ``sgd(..., iter_size=k)`` divides the gradients
it is given by ``k`` after clipping, exactly Caffe's order, so it takes the sum over k
micro-batches: ``fit`` and ``make_train_step`` form that sum themselves (k stacked batches per
step), :func:`fnlayers.optim.accumulate_gradients` does it for a loop of one's own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from fnlayers._checks import check_bool, check_real
from fnlayers.optim.base import Schedule, as_schedule
from fnlayers.optim.mults import Mults
from fnlayers.optim.solver import CaffeRule, Solver, SolverSettings, make_solver

__all__ = ["SGDState", "sgd"]


class SGDState(NamedTuple):
    """The solver state, a pytree.

    Attributes:
      iteration: int32 scalar, Caffe's ``iter_``: the number of updates applied so far.
      momentum: Caffe's ``history_``: a pytree like ``params``, zeros at first; after an update
        it holds that update's ``v``.
    """

    iteration: jax.Array
    momentum: Any


def sgd(
    learning_rate: float | Schedule,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    regularization: str = "l2",
    nesterov: bool = False,
    clip_gradients: float | None = None,
    lr_mult: Mults = None,
    decay_mult: Mults = None,
    iter_size: int = 1,
) -> Solver:
    """Caffe's SGDSolver (or NesterovSolver), §9; see the module docstring for the update.

    Args:
      learning_rate: a float >= 0, or a schedule ``lr(iteration)`` (see ``fnlayers.schedules``)
        that returns a scalar for an int32 scalar iteration.
      momentum: in ``[0, 1)``.
      weight_decay: >= 0; each parameter decays by ``weight_decay * decay_mult``.
      regularization: ``"l2"`` (adds ``decay * w`` to the gradient) or ``"l1"`` (``decay *
        sign(w)``); Caffe's ``regularization_type`` "L2"/"L1".
      nesterov: use Caffe's NesterovSolver update.
      clip_gradients: None (Caffe's default -1: off) or a float >= 0, the largest global L2
        norm of the gradient.
      lr_mult, decay_mult: per-parameter multipliers >= 0: None (all 1), a pytree of floats
        shaped like params, or ``f(path, leaf) -> float`` (:mod:`fnlayers.optim.mults`). A leaf
        with ``lr_mult`` 0 is frozen.
      iter_size: a positive int; ``update`` divides the (clipped) gradients by it, so pass the
        sum of ``iter_size`` micro-batch gradients (:func:`fnlayers.optim.accumulate_gradients`).

    Returns:
      A :class:`~fnlayers.optim.Solver` (an :class:`~fnlayers.optim.Optimizer`) whose state is
      an :class:`SGDState`. Structural problems are reported when ``update`` is traced: a
      ValueError naming the first path where ``grads`` (or the state, or a multiplier tree)
      differs from ``params``, a TypeError for a dtype that differs or is not floating.

    Raises:
      TypeError, ValueError: a hyperparameter of the wrong type or out of range.
    """
    fn = "sgd"
    lr_fn = as_schedule(learning_rate, fn)
    mom = check_real(momentum, fn=fn, name="momentum", minimum=0.0)
    if mom >= 1:
        raise ValueError(f"{fn}: momentum={momentum!r} must be < 1")
    nesterov = check_bool(nesterov, fn=fn, name="nesterov")
    settings = SolverSettings.checked(
        fn,
        weight_decay=weight_decay,
        regularization=regularization,
        clip_gradients=clip_gradients,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
        iter_size=iter_size,
    )
    return make_solver(fn, lr_fn, settings, SGDState, _momentum_rule(mom, nesterov))


def _momentum_rule(momentum: float, nesterov: bool) -> CaffeRule:
    # ComputeUpdateValue of SGDSolver / NesterovSolver; Blob::Update subtracts the step.
    m = np.float32(momentum)

    def rule(g, w, v, *, rate, iteration):
        v_new = rate * g + m * v
        step = (np.float32(1) + m) * v_new - m * v if nesterov else v_new
        return w - step, (v_new,)

    return rule
