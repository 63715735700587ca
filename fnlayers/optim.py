"""Caffe's SGD solver, written out: momentum, Nesterov, L2/L1 decay, lr_mult/decay_mult, clipping
(CAFFE_SEMANTICS.md §9, ``solvers/sgd_solver.cpp``, ``nesterov_solver.cpp``).

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

Per-parameter multipliers (``lr_mult``, ``decay_mult``; Caffe's ``ParamSpec``, default 1) come
as None, a pytree of Python floats with the structure of ``params``, or a function
``f(path, leaf) -> float`` called once per leaf at trace time. ``path`` is the key path of
``jax.tree_util.tree_flatten_with_path`` (a tuple such as ``(DictKey('conv1'), DictKey('w'))``);
:func:`path_str` turns it into ``"conv1/w"``, and :func:`by_path` builds such a function from
glob patterns over that string. ``leaf`` is the parameter (possibly a tracer: use its shape,
not its values).

A parameter whose ``lr_mult`` is 0 is frozen: it and its momentum stay bit-for-bit unchanged,
and its gradient, whatever it holds (even NaN), is ignored, also by the clipping norm (Caffe
computes no gradient for it, so its diff is 0).

Gradient accumulation (Caffe's ``iter_size``): :func:`accumulate_gradients` sums the gradients
of several micro-batches, and ``sgd(..., iter_size=k)`` divides that sum by ``k`` after
clipping, exactly Caffe's order.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import (
    DictKey,
    FlattenedIndexKey,
    GetAttrKey,
    SequenceKey,
    tree_flatten_with_path,
    tree_unflatten,
)

from fnlayers._checks import check_choice

__all__ = [
    "Optimizer",
    "SGDState",
    "accumulate_gradients",
    "by_path",
    "caffe_bias_mults",
    "path_str",
    "sgd",
]

Mults = None | Callable[[tuple, Any], float] | Any


class SGDState(NamedTuple):
    """The solver state, a pytree.

    Attributes:
      iteration: int32 scalar, Caffe's ``iter_``: the number of updates applied so far.
      momentum: Caffe's ``history_``: a pytree like ``params``, zeros at first; after an update
        it holds that update's ``v``.
    """

    iteration: jax.Array
    momentum: Any


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What :func:`sgd` returns: a pair of pure functions and what they were built with.

    Attributes:
      init: ``init(params) -> SGDState``.
      update: ``update(grads, state, params) -> (params, state)``; ``grads`` has the structure,
        shapes and dtypes of ``params`` (summed over ``iter_size`` micro-batches).
      learning_rate: ``learning_rate(iteration) -> float32``, the base rate before ``lr_mult``
        (a constant is wrapped); ``learning_rate(state.iteration)`` is the rate of the next
        update.
      iter_size: how many micro-batch gradients ``update`` expects summed in ``grads``.
    """

    init: Callable[[Any], SGDState]
    update: Callable[[Any, SGDState, Any], tuple[Any, SGDState]]
    learning_rate: Callable[[Any], jax.Array]
    iter_size: int = 1

    def learning_rate_at(self, state: SGDState) -> jax.Array:
        """The base rate the next ``update(grads, state, params)`` applies (before lr_mult)."""
        return jnp.asarray(self.learning_rate(state.iteration))


def sgd(
    learning_rate,
    *,
    momentum=0.0,
    weight_decay=0.0,
    regularization="l2",
    nesterov=False,
    clip_gradients=None,
    lr_mult: Mults = None,
    decay_mult: Mults = None,
    iter_size=1,
) -> Optimizer:
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
        shaped like params, or ``f(path, leaf) -> float`` (module docstring). A leaf with
        ``lr_mult`` 0 is frozen.
      iter_size: a positive int; ``update`` divides the (clipped) gradients by it, so pass the
        sum of ``iter_size`` micro-batch gradients (:func:`accumulate_gradients`).

    Returns:
      An :class:`Optimizer`. Structural problems are reported when ``update`` is traced: a
      ValueError naming the first path where ``grads`` (or the state, or a multiplier tree)
      differs from ``params``, a TypeError for a dtype that differs or is not floating.

    Raises:
      TypeError, ValueError: a hyperparameter of the wrong type or out of range.
    """
    fn = "sgd"
    lr_fn = _learning_rate(learning_rate, fn)
    mom = _real(momentum, fn, "momentum", minimum=0.0)
    if mom >= 1:
        raise ValueError(f"{fn}: momentum={momentum!r} must be < 1")
    decay = _real(weight_decay, fn, "weight_decay", minimum=0.0)
    check_choice(regularization, ("l2", "l1"), fn=fn, name="regularization")
    if not isinstance(nesterov, bool | np.bool_):
        raise TypeError(f"{fn}: nesterov={nesterov!r} must be a bool")
    clip = None
    if clip_gradients is not None:
        clip = _real(clip_gradients, fn, "clip_gradients", minimum=0.0)
    _check_mults_arg(lr_mult, fn, "lr_mult")
    _check_mults_arg(decay_mult, fn, "decay_mult")
    if not _is_int(iter_size):
        raise TypeError(f"{fn}: iter_size={iter_size!r} must be an int")
    if iter_size < 1:
        raise ValueError(f"{fn}: iter_size={iter_size!r} must be a positive int")
    iter_size = int(iter_size)
    rule = _Rule(decay, regularization, mom, bool(nesterov), iter_size)

    def init(params) -> SGDState:
        flat, treedef = tree_flatten_with_path(params)
        _check_float_leaves(flat, "sgd.init", "params")
        return SGDState(
            iteration=jnp.zeros((), jnp.int32),
            momentum=tree_unflatten(treedef, [jnp.zeros_like(w) for _, w in flat]),
        )

    def update(grads, state, params):
        where = "sgd.update"
        if not isinstance(state, SGDState):
            raise TypeError(
                f"{where}: state must be the SGDState from init(params), got {type(state).__name__}"
            )
        flat, treedef = tree_flatten_with_path(params)
        _check_float_leaves(flat, where, "params")
        ws = [w for _, w in flat]
        gs = _leaves_like(grads, flat, treedef, where, "grads")
        vs = _leaves_like(state.momentum, flat, treedef, where, "state.momentum")
        lr_ms = _resolve_mults(lr_mult, flat, treedef, where, "lr_mult")
        decay_ms = _resolve_mults(decay_mult, flat, treedef, where, "decay_mult")

        rate = _rate(lr_fn, state.iteration, where)
        # A frozen leaf's gradient is Caffe's zero diff: ignored, and out of the clipping norm.
        gs = [None if m == 0 else g for g, m in zip(gs, lr_ms, strict=True)]
        if clip is not None:
            gs = _clip_by_global_norm(gs, clip)

        new_ws, new_vs = [], []
        for w, g, v, lr_m, decay_m in zip(ws, gs, vs, lr_ms, decay_ms, strict=True):
            if g is None:
                new_ws.append(w)
                new_vs.append(v)
                continue
            w_new, v_new = rule.apply(w, g, v, rate * np.float32(lr_m), decay_m)
            new_ws.append(w_new)
            new_vs.append(v_new)
        new_state = SGDState(state.iteration + 1, tree_unflatten(treedef, new_vs))
        return tree_unflatten(treedef, new_ws), new_state

    return Optimizer(init=init, update=update, learning_rate=lr_fn, iter_size=iter_size)


def accumulate_gradients(grad_fn, params, micro_batches):
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


def path_str(path) -> str:
    """A key path from ``jax.tree_util.tree_flatten_with_path`` as ``"conv1/w"``.

    Dict keys and attribute names appear as themselves, sequence indices as numbers; ``""`` is
    the root (params that are a single array).
    """
    parts = []
    for key in path:
        if isinstance(key, DictKey):
            parts.append(str(key.key))
        elif isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def by_path(rules, default=1.0) -> Callable[[tuple, Any], float]:
    """A multiplier function for ``lr_mult``/``decay_mult`` from glob patterns over paths.

    Args:
      rules: a mapping (or sequence of pairs) ``pattern -> multiplier``. Patterns are
        ``fnmatch`` globs matched against :func:`path_str` of the leaf's path (``*`` also
        matches ``/``); the first pattern that matches wins.
      default: the multiplier of leaves that match no pattern.

    Example:
      ``sgd(0.01, lr_mult=by_path({"conv1/*": 0.0, "*/b": 2.0}))`` freezes conv1 and doubles
      the rate of every other bias.

    Raises:
      TypeError: a pattern that is not a string, a multiplier that is not a number.
      ValueError: a negative or non-finite multiplier.
    """
    fn = "by_path"
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    checked = []
    for item in pairs:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"{fn}: each rule must be a (pattern: str, multiplier) pair, got {item!r}"
            )
        checked.append((item[0], _real(item[1], fn, f"rules[{item[0]!r}]", minimum=0.0)))
    fallback = _real(default, fn, "default", minimum=0.0)

    def mult(path, leaf) -> float:
        name = path_str(path)
        for pattern, value in checked:
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return fallback

    return mult


def caffe_bias_mults(lr_mult=2.0, decay_mult=0.0, *, name="b") -> dict[str, Callable]:
    """The usual Caffe recipe: biases learn at twice the rate and are not decayed.

    Returns ``{"lr_mult": f, "decay_mult": g}`` for ``sgd(..., **caffe_bias_mults())``: leaves
    whose last path component is ``name`` (``params["conv1"]["b"]``) get ``lr_mult`` and
    ``decay_mult``, every other leaf 1.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"caffe_bias_mults: name={name!r} must be a non-empty string")
    patterns = (name, f"*/{name}")
    return {
        "lr_mult": by_path({p: lr_mult for p in patterns}),
        "decay_mult": by_path({p: decay_mult for p in patterns}),
    }


# --------------------------------------------------------------------------------------------
# private helpers


@dataclasses.dataclass(frozen=True)
class _Rule:
    decay: float
    regularization: str
    momentum: float
    nesterov: bool
    iter_size: int

    def apply(self, w, g, v, local_rate, decay_mult):
        # One leaf of ApplyUpdate after clipping: Normalize, Regularize, ComputeUpdateValue, Update.
        dtype = jnp.promote_types(w.dtype, jnp.float32)
        w32, g32, v32 = w.astype(dtype), g.astype(dtype), v.astype(dtype)
        if self.iter_size != 1:
            g32 = g32 * np.float32(1.0 / self.iter_size)
        local_decay = np.float32(self.decay) * np.float32(decay_mult)
        if local_decay != 0:
            reg = w32 if self.regularization == "l2" else jnp.sign(w32)
            g32 = g32 + local_decay * reg
        m = np.float32(self.momentum)
        v_new = local_rate.astype(dtype) * g32 + m * v32
        step = (np.float32(1) + m) * v_new - m * v32 if self.nesterov else v_new
        return (w32 - step).astype(w.dtype), v_new.astype(v.dtype)


def _clip_by_global_norm(gs, clip):
    live = [g for g in gs if g is not None]
    if not live:
        return gs
    sumsq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in live)
    norm = jnp.sqrt(sumsq)
    scale = jnp.where(norm > clip, clip / jnp.where(norm > clip, norm, 1.0), 1.0)
    return [None if g is None else g * scale.astype(g.dtype) for g in gs]


def _rate(lr_fn, iteration, where):
    rate = jnp.asarray(lr_fn(iteration))
    if rate.shape != ():
        raise ValueError(
            f"{where}: learning_rate(iteration) must be a scalar, got shape {rate.shape}"
        )
    if not jnp.issubdtype(rate.dtype, jnp.floating):
        rate = rate.astype(jnp.float32)
    return rate


def _learning_rate(learning_rate, fn):
    if callable(learning_rate):
        return learning_rate
    base = _real(
        learning_rate, fn, "learning_rate", minimum=0.0, what="a real number or a schedule"
    )
    base32 = np.float32(base)

    def constant(iteration):
        return jnp.full(jnp.shape(iteration), base32, jnp.float32)

    return constant


def _leaves_like(tree, ref_flat, ref_def, where, name):
    flat, treedef = tree_flatten_with_path(tree)
    if treedef != ref_def:
        diff = _first_difference(ref_flat, ref_def, flat, treedef, name)
        raise ValueError(f"{where}: {name} does not match params: {diff}")
    for (path, ref), (_, leaf) in zip(ref_flat, flat, strict=True):
        if np.shape(leaf) != np.shape(ref):
            raise ValueError(
                f"{where}: {name} does not match params at {path_str(path)!r}: shape "
                f"{np.shape(leaf)} vs {np.shape(ref)}"
            )
        if jnp.result_type(leaf) != jnp.result_type(ref):
            raise TypeError(
                f"{where}: {name} at {path_str(path)!r} has dtype {jnp.result_type(leaf)} but "
                f"params has {jnp.result_type(ref)}"
            )
    return [leaf for _, leaf in flat]


def _first_difference(ref_flat, ref_def, flat, treedef, name):
    ref_paths = [p for p, _ in ref_flat]
    paths = [p for p, _ in flat]
    for ref_path, path in zip(ref_paths, paths, strict=False):
        if ref_path != path:
            if ref_path not in set(paths):
                return f"{name} has no leaf at {path_str(ref_path)!r} (found {path_str(path)!r})"
            return f"{name} has an extra leaf at {path_str(path)!r}"
    if len(ref_paths) > len(paths):
        return f"{name} has no leaf at {path_str(ref_paths[len(paths)])!r}"
    if len(paths) > len(ref_paths):
        return f"{name} has an extra leaf at {path_str(paths[len(ref_paths)])!r}"
    return f"the same leaf paths in different containers: params {ref_def}, {name} {treedef}"


def _resolve_mults(mults, flat, treedef, where, name) -> list[float]:
    if mults is None:
        return [1.0] * len(flat)
    if callable(mults):
        values = [(path, mults(path, leaf)) for path, leaf in flat]
    else:
        given, given_def = tree_flatten_with_path(mults)
        if given_def != treedef:
            diff = _first_difference(flat, treedef, given, given_def, name)
            raise ValueError(f"{where}: {name} does not match params: {diff}")
        values = list(given)
    out = []
    for path, value in values:
        what = f"{name} at {path_str(path)!r}"
        if isinstance(value, jax.core.Tracer):
            raise TypeError(f"{where}: {what} must be a concrete number, not a traced value")
        if isinstance(value, np.ndarray | jax.Array) and value.shape == ():
            value = value.item()  # a concrete 0-d array (e.g. from jnp.asarray)
        out.append(_real(value, where, what, minimum=0.0))
    return out


def _check_mults_arg(mults, fn, name):
    if isinstance(mults, int | float | np.number) and not isinstance(mults, bool):
        raise TypeError(
            f"{fn}: {name}={mults!r} must be None, a pytree of floats shaped like params or a "
            "function (path, leaf) -> float; a single number would apply to every parameter, "
            "use the learning rate or weight_decay instead"
        )


def _check_float_leaves(flat, where, name):
    for path, leaf in flat:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}: {name} at {path_str(path)!r} must be floating to be trained, got {dtype}"
            )


def _real(value, fn, name, minimum=None, what="a real number") -> float:
    if not isinstance(value, int | float | np.integer | np.floating) or isinstance(
        value, bool | np.bool_
    ):
        raise TypeError(f"{fn}: {name}={value!r} must be {what}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name}={value!r} must be finite")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name}={value!r} must be >= {minimum:g}")
    return float(value)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)
