"""Caffe's adaptive-rate solvers: AdaGrad, RMSProp, AdaDelta and Adam (docs/caffe-semantics.md
§9, ``solvers/{adagrad,rmsprop,adadelta,adam}_solver.cpp``).

Usage::

    opt = optim.adam(0.001, momentum=0.9, momentum2=0.999, weight_decay=5e-4)
    opt_state = opt.init(params)
    params, opt_state = opt.update(grads, opt_state, params)     # pure; jit it

Each is an :class:`~fnlayers.optim.Solver` built by :func:`~fnlayers.optim.solver.make_solver`,
so one ``update`` is one Caffe ``ApplyUpdate`` exactly as for :func:`~fnlayers.optim.sgd`: the
rate of the learning-rate schedule at ``iteration``, clipping of the summed gradients,
``g /= iter_size``, L2/L1 weight decay with ``decay_mult``, frozen ``lr_mult`` 0 parameters.
Only ``ComputeUpdateValue`` differs. With ``g`` the normalised, regularised gradient, ``r`` the
local rate (``rate * lr_mult``), and every history zero at first, each solver computes, in the
order of Caffe's CPU code (float32, or the parameter's dtype if wider; ``w -= step`` is
``Blob::Update``):

=============  =================================================================================
``adagrad``    ``h += g^2;  step = r * (g / (sqrt(h) + delta))``
``rmsprop``    ``h = (1-rms_decay)*g^2 + rms_decay*h;  step = r * (g / (sqrt(h) + delta))``
``adadelta``   ``h = (1-momentum)*g^2 + momentum*h;  u = g * sqrt((delta + hu) / (delta + h));``
               ``hu = (1-momentum)*u^2 + momentum*hu;  step = r * u``
``adam``       ``m = (1-momentum)*g + momentum*m;  v = (1-momentum2)*g^2 + momentum2*v;``
               ``step = (r * c) * (m / (sqrt(v) + delta))``, with ``t = iteration + 1`` and
               ``c = sqrt(1 - momentum2^t) / (1 - momentum^t)``
=============  =================================================================================

Hyperparameters are rounded to float32 first, as Caffe's ``SolverParameter`` stores them.
Adam's bias correction ``c`` is Caffe's double-precision expression rounded to float32; here it
is evaluated in float32 as ``-expm1(t * log1p(beta - 1))``, within a few ulps of it without
the cancellation of ``1 - beta^t`` in float32. Caffe's GPU kernels group ``r * g`` first and so
round differently from its CPU code, by an ulp or so.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers._checks import check_real
from fnlayers.optim.base import Schedule, as_schedule
from fnlayers.optim.mults import Mults
from fnlayers.optim.solver import Solver, SolverSettings, make_solver

__all__ = [
    "AdaDeltaState",
    "AdaGradState",
    "AdamState",
    "RMSPropState",
    "adadelta",
    "adagrad",
    "adam",
    "rmsprop",
]


class AdaGradState(NamedTuple):
    """The state of :func:`adagrad`, a pytree.

    Attributes:
      iteration: int32 scalar, Caffe's ``iter_``: the number of updates applied so far.
      history: Caffe's ``history_``, the sum of the squared gradients; a pytree like
        ``params``, zeros at first.
    """

    iteration: jax.Array
    history: Any


class RMSPropState(NamedTuple):
    """The state of :func:`rmsprop`, a pytree.

    Attributes:
      iteration: int32 scalar, the number of updates applied so far.
      history: Caffe's ``history_``, the running mean of the squared gradients; a pytree like
        ``params``, zeros at first.
    """

    iteration: jax.Array
    history: Any


class AdaDeltaState(NamedTuple):
    """The state of :func:`adadelta`, a pytree.

    Attributes:
      iteration: int32 scalar, the number of updates applied so far.
      history: the running mean of the squared gradients (Caffe's ``history_[i]``).
      update_history: the running mean of the squared updates before the learning rate
        (Caffe's ``history_[N + i]``). Both are pytrees like ``params``, zeros at first.
    """

    iteration: jax.Array
    history: Any
    update_history: Any


class AdamState(NamedTuple):
    """The state of :func:`adam`, a pytree.

    Attributes:
      iteration: int32 scalar, the number of updates applied so far (``t - 1``).
      m: the running mean of the gradients (Caffe's ``val_m``, ``history_[i]``).
      v: the running mean of the squared gradients (Caffe's ``val_v``, ``history_[N + i]``).
        Both are pytrees like ``params``, zeros at first.
    """

    iteration: jax.Array
    m: Any
    v: Any


def adagrad(
    learning_rate: float | Schedule,
    *,
    delta: float = 1e-8,
    weight_decay: float = 0.0,
    regularization: str = "l2",
    clip_gradients: float | None = None,
    lr_mult: Mults = None,
    decay_mult: Mults = None,
    iter_size: int = 1,
) -> Solver:
    """Caffe's AdaGradSolver (§9); see the module docstring for the update.

    Args:
      learning_rate: a float >= 0, or a schedule ``lr(iteration)`` (``fnlayers.schedules``).
      delta: > 0, added to ``sqrt(history)`` (Caffe's ``delta``, default 1e-8).
      weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size: as for
        :func:`fnlayers.optim.sgd`. Caffe's AdaGrad takes no momentum (it CHECKs momentum 0).

    Returns:
      A :class:`~fnlayers.optim.Solver` whose state is an :class:`AdaGradState`.

    Raises:
      TypeError, ValueError: a hyperparameter of the wrong type or out of range.
    """
    fn = "adagrad"
    lr_fn = as_schedule(learning_rate, fn)
    d = _check_delta(delta, fn)
    settings = _settings(
        fn, weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size
    )

    def rule(g, w, h, *, rate, iteration):
        h = jnp.square(g) + h
        step = rate * (g / (jnp.sqrt(h) + _cast(d, g)))
        return w - step, (h,)

    return make_solver(fn, lr_fn, settings, AdaGradState, rule)


def rmsprop(
    learning_rate: float | Schedule,
    *,
    rms_decay: float = 0.99,
    delta: float = 1e-8,
    weight_decay: float = 0.0,
    regularization: str = "l2",
    clip_gradients: float | None = None,
    lr_mult: Mults = None,
    decay_mult: Mults = None,
    iter_size: int = 1,
) -> Solver:
    """Caffe's RMSPropSolver (§9); see the module docstring for the update.

    Args:
      learning_rate: a float >= 0, or a schedule ``lr(iteration)`` (``fnlayers.schedules``).
      rms_decay: in ``[0, 1)``, the decay of the running mean of ``g^2`` (Caffe's default
        0.99).
      delta: > 0, added to ``sqrt(history)`` (Caffe's default 1e-8).
      weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size: as for
        :func:`fnlayers.optim.sgd`. Caffe's RMSProp takes no momentum (it CHECKs momentum 0).

    Returns:
      A :class:`~fnlayers.optim.Solver` whose state is an :class:`RMSPropState`.

    Raises:
      TypeError, ValueError: a hyperparameter of the wrong type or out of range.
    """
    fn = "rmsprop"
    lr_fn = as_schedule(learning_rate, fn)
    decay = _check_fraction(rms_decay, fn, "rms_decay")
    d = _check_delta(delta, fn)
    settings = _settings(
        fn, weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size
    )

    def rule(g, w, h, *, rate, iteration):
        rho = _cast(decay, g)
        h = (1 - rho) * jnp.square(g) + rho * h
        step = rate * (g / (jnp.sqrt(h) + _cast(d, g)))
        return w - step, (h,)

    return make_solver(fn, lr_fn, settings, RMSPropState, rule)


def adadelta(
    learning_rate: float | Schedule,
    *,
    momentum: float = 0.9,
    delta: float = 1e-8,
    weight_decay: float = 0.0,
    regularization: str = "l2",
    clip_gradients: float | None = None,
    lr_mult: Mults = None,
    decay_mult: Mults = None,
    iter_size: int = 1,
) -> Solver:
    """Caffe's AdaDeltaSolver (§9); see the module docstring for the update.

    Unlike Zeiler's AdaDelta, Caffe's multiplies the step by the learning rate (its example
    uses ``base_lr: 1.0``).

    Args:
      learning_rate: a float >= 0, or a schedule ``lr(iteration)`` (``fnlayers.schedules``).
      momentum: in ``[0, 1)``, the decay of both running means (Zeiler's rho; Caffe's
        ``momentum``, whose SolverParameter default is 0; its example uses 0.95).
      delta: > 0, Zeiler's epsilon (Caffe's default 1e-8).
      weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size: as for
        :func:`fnlayers.optim.sgd`.

    Returns:
      A :class:`~fnlayers.optim.Solver` whose state is an :class:`AdaDeltaState`.

    Raises:
      TypeError, ValueError: a hyperparameter of the wrong type or out of range.
    """
    fn = "adadelta"
    lr_fn = as_schedule(learning_rate, fn)
    mom = _check_fraction(momentum, fn, "momentum")
    d = _check_delta(delta, fn)
    settings = _settings(
        fn, weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size
    )

    def rule(g, w, h, hu, *, rate, iteration):
        rho, eps = _cast(mom, g), _cast(d, g)
        h = (1 - rho) * jnp.square(g) + rho * h
        u = g * jnp.sqrt((eps + hu) / (eps + h))
        hu = (1 - rho) * jnp.square(u) + rho * hu
        return w - rate * u, (h, hu)

    return make_solver(fn, lr_fn, settings, AdaDeltaState, rule)


def adam(
    learning_rate: float | Schedule,
    *,
    momentum: float = 0.9,
    momentum2: float = 0.999,
    delta: float = 1e-8,
    weight_decay: float = 0.0,
    regularization: str = "l2",
    clip_gradients: float | None = None,
    lr_mult: Mults = None,
    decay_mult: Mults = None,
    iter_size: int = 1,
) -> Solver:
    """Caffe's AdamSolver (§9); see the module docstring for the update.

    Weight decay is Caffe's: added to the gradient before the moments (L2 regularisation, as
    ``torch.optim.Adam(weight_decay=...)``, not AdamW's decoupled decay).

    Args:
      learning_rate: a float >= 0, or a schedule ``lr(iteration)`` (``fnlayers.schedules``).
      momentum: in ``[0, 1)``, beta1 (Caffe's ``momentum``, whose SolverParameter default is
        0; its example and the paper use 0.9).
      momentum2: in ``[0, 1)``, beta2 (Caffe's default 0.999).
      delta: > 0, epsilon, added to ``sqrt(v)`` (Caffe's default 1e-8).
      weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size: as for
        :func:`fnlayers.optim.sgd`.

    Returns:
      A :class:`~fnlayers.optim.Solver` whose state is an :class:`AdamState`.

    Raises:
      TypeError, ValueError: a hyperparameter of the wrong type or out of range.
    """
    fn = "adam"
    lr_fn = as_schedule(learning_rate, fn)
    beta1 = _check_fraction(momentum, fn, "momentum")
    beta2 = _check_fraction(momentum2, fn, "momentum2")
    d = _check_delta(delta, fn)
    settings = _settings(
        fn, weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size
    )

    def rule(g, w, m, v, *, rate, iteration):
        b1, b2 = _cast(beta1, g), _cast(beta2, g)
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * (g * g) + b2 * v
        t = (iteration + 1).astype(g.dtype)
        correction = jnp.sqrt(_one_minus_power(b2, t)) / _one_minus_power(b1, t)
        step = (rate * correction) * (m / (jnp.sqrt(v) + _cast(d, g)))
        return w - step, (m, v)

    return make_solver(fn, lr_fn, settings, AdamState, rule)


# ----------------------------------------------------------------------------- helpers


def _settings(fn, weight_decay, regularization, clip_gradients, lr_mult, decay_mult, iter_size):
    return SolverSettings.checked(
        fn,
        weight_decay=weight_decay,
        regularization=regularization,
        clip_gradients=clip_gradients,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
        iter_size=iter_size,
    )


def _check_fraction(value, fn: str, name: str) -> np.float32:
    checked = check_real(value, fn=fn, name=name, minimum=0.0)
    if checked >= 1:
        raise ValueError(f"{fn}: {name}={value!r} must be in [0, 1)")
    return np.float32(checked)


def _check_delta(value, fn: str) -> np.float32:
    checked = check_real(value, fn=fn, name="delta", minimum=0.0)
    # Caffe would divide 0 by 0 where a gradient and its history are 0.
    if checked == 0 or np.float32(checked) == 0:
        raise ValueError(f"{fn}: delta={value!r} must be > 0 (and not 0 in float32)")
    return np.float32(checked)


def _cast(value: np.float32, like: jax.Array) -> jax.Array:
    # Caffe's Dtype(value) of a float hyperparameter: float32-rounded, then widened for float64.
    return jnp.asarray(value, like.dtype)


def _one_minus_power(beta: jax.Array, t: jax.Array) -> jax.Array:
    # 1 - beta^t without float32's cancellation (Caffe evaluates it in double); beta = 0 gives 1.
    return -jnp.expm1(t * jnp.log1p(beta - 1))
