"""Per-parameter multipliers: Caffe's ``ParamSpec`` ``lr_mult`` and ``decay_mult``.

A multiplier argument is None (every parameter 1), a pytree of Python floats with the
structure of ``params``, or a function ``f(path, leaf) -> float`` called once per leaf at trace
time. ``path`` is the key path of ``jax.tree_util.tree_flatten_with_path`` (a tuple such as
``(DictKey('conv1'), DictKey('w'))``); :func:`path_str` turns it into ``"conv1/w"``, and
:func:`by_path` builds such a function from glob patterns over that string. ``leaf`` is the
parameter (possibly a tracer: use its shape, not its values).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.tree_util import tree_flatten_with_path

from fnlayers._checks import check_real, is_real
from fnlayers._tree import path_str
from fnlayers.optim.trees import first_difference

__all__ = ["Mults", "by_path", "caffe_bias_mults", "check_mults_arg", "resolve_mults"]

#: None, a pytree of floats shaped like params, or ``f(path, leaf) -> float``.
Mults = None | Callable[[tuple, Any], float] | Any


def by_path(
    rules: Mapping[str, float] | Sequence[tuple[str, float]], default: float = 1.0
) -> Callable[[tuple, Any], float]:
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
        value = check_real(item[1], fn=fn, name=f"rules[{item[0]!r}]", minimum=0.0)
        checked.append((item[0], value))
    fallback = check_real(default, fn=fn, name="default", minimum=0.0)

    def mult(path, leaf) -> float:
        name = path_str(path)
        for pattern, value in checked:
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return fallback

    return mult


def caffe_bias_mults(
    lr_mult: float = 2.0, decay_mult: float = 0.0, *, name: str = "b"
) -> dict[str, Callable]:
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


def check_mults_arg(mults: Mults, fn: str, name: str) -> None:
    """Rejects a bare number as a multiplier argument (the rest is checked by
    :func:`resolve_mults` once the parameters are known).

    Raises:
      TypeError: ``mults`` is a number.
    """
    if is_real(mults):
        raise TypeError(
            f"{fn}: {name}={mults!r} must be None, a pytree of floats shaped like params or a "
            "function (path, leaf) -> float; a single number would apply to every parameter, "
            "use the learning rate or weight_decay instead"
        )


def resolve_mults(mults: Mults, flat: list, treedef, where: str, name: str) -> list[float]:
    """One float >= 0 per leaf of ``flat`` (``tree_flatten_with_path(params)``).

    Raises:
      ValueError: a multiplier tree that does not match the parameters, a negative multiplier.
      TypeError: a multiplier that is not a concrete number.
    """
    if mults is None:
        return [1.0] * len(flat)
    if callable(mults):
        values = [(path, mults(path, leaf)) for path, leaf in flat]
    else:
        given, given_def = tree_flatten_with_path(mults)
        if given_def != treedef:
            diff = first_difference(flat, treedef, given, given_def, name)
            raise ValueError(f"{where}: {name} does not match params: {diff}")
        values = list(given)
    out = []
    for path, value in values:
        what = f"{name} at {path_str(path)!r}"
        if isinstance(value, jax.core.Tracer):
            raise TypeError(f"{where}: {what} must be a concrete number, not a traced value")
        if isinstance(value, np.ndarray | jax.Array) and value.shape == ():
            value = value.item()  # a concrete 0-d array (e.g. from jnp.asarray)
        out.append(check_real(value, fn=where, name=what, minimum=0.0))
    return out
