"""Optimizers: Caffe's solvers written out, the optimizer protocol, and an optax adapter.

An optimizer is an :class:`Optimizer`: ``init(params) -> state``, ``update(grads, state,
params) -> (new_params, new_state)`` (the new parameters, Caffe's way, not optax's updates) and
``learning_rate_at(state)`` (the base rate of the next update, or None);
:func:`check_optimizer` tells an optimizer from anything else, with a pointer to
:func:`from_optax` for optax transformations. Usage::

    opt = optim.sgd(schedules.inv(0.01, gamma=1e-4, power=0.75), momentum=0.9,
                    weight_decay=5e-4, **optim.caffe_bias_mults())
    opt_state = opt.init(params)
    params, opt_state = opt.update(grads, opt_state, params)     # pure; jit it

Modules:

- :mod:`~fnlayers.optim.base`: the :class:`Optimizer` protocol and :func:`check_optimizer`.
- :mod:`~fnlayers.optim.sgd_solver`: :func:`sgd`, Caffe's SGD and Nesterov solvers.
- :mod:`~fnlayers.optim.adaptive`: :func:`adagrad`, :func:`rmsprop`, :func:`adadelta` and
  :func:`adam`, Caffe's adaptive-rate solvers.
- :mod:`~fnlayers.optim.solver`: what Caffe's solvers share (clipping, ``iter_size``, weight
  decay) and :func:`~fnlayers.optim.solver.make_solver`, which builds a solver from a rule.
- :mod:`~fnlayers.optim.rules`: per-array update rules lifted to parameter pytrees.
- :mod:`~fnlayers.optim.mults`: ``lr_mult``/``decay_mult`` (:func:`by_path`,
  :func:`caffe_bias_mults`).
- :mod:`~fnlayers.optim.trees`: checks of a pytree against the parameters.
- :mod:`~fnlayers.optim.accumulate`: :func:`accumulate_gradients` (Caffe's ``iter_size``).
- :mod:`~fnlayers.optim.optax_adapter`: :func:`from_optax`.
"""

from fnlayers._tree import path_str
from fnlayers.optim.accumulate import accumulate_gradients
from fnlayers.optim.adaptive import (
    AdaDeltaState,
    AdaGradState,
    AdamState,
    RMSPropState,
    adadelta,
    adagrad,
    adam,
    rmsprop,
)
from fnlayers.optim.base import Optimizer, check_optimizer
from fnlayers.optim.mults import by_path, caffe_bias_mults
from fnlayers.optim.optax_adapter import OptaxState, from_optax
from fnlayers.optim.sgd_solver import SGDState, sgd
from fnlayers.optim.solver import Solver

__all__ = [
    "AdaDeltaState",
    "AdaGradState",
    "AdamState",
    "OptaxState",
    "Optimizer",
    "RMSPropState",
    "SGDState",
    "Solver",
    "accumulate_gradients",
    "adadelta",
    "adagrad",
    "adam",
    "by_path",
    "caffe_bias_mults",
    "check_optimizer",
    "from_optax",
    "path_str",
    "rmsprop",
    "sgd",
]
