"""Checks that a pytree matches the parameters, with messages that name the first difference.

Every optimizer checks its inputs against ``params`` here, at trace time, on structure, shapes
and dtypes only: a ValueError names the first path where a tree differs from ``params``
(``grads has no leaf at 'conv1/b' (found 'conv1/w')``), a TypeError a dtype that differs or is
not floating.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten_with_path, tree_unflatten

from fnlayers._tree import path_str

__all__ = ["check_float_leaves", "first_difference", "leaves_like", "zeros_like_params"]


def leaves_like(
    tree: Any, ref_flat: list, ref_def, where: str, name: str, *, same_dtype: bool = True
) -> list:
    """The leaves of ``tree``, checked against ``ref_flat, ref_def = tree_flatten_with_path(
    params)``: same structure, and per leaf the same shape and (with ``same_dtype``) dtype.

    Raises:
      ValueError: the structure or a shape differs (the message names the first path).
      TypeError: a leaf's dtype differs from the parameter's.
    """
    flat, treedef = tree_flatten_with_path(tree)
    if treedef != ref_def:
        diff = first_difference(ref_flat, ref_def, flat, treedef, name)
        raise ValueError(f"{where}: {name} does not match params: {diff}")
    for (path, ref), (_, leaf) in zip(ref_flat, flat, strict=True):
        if np.shape(leaf) != np.shape(ref):
            raise ValueError(
                f"{where}: {name} does not match params at {path_str(path)!r}: shape "
                f"{np.shape(leaf)} vs {np.shape(ref)}"
            )
        if same_dtype and jnp.result_type(leaf) != jnp.result_type(ref):
            raise TypeError(
                f"{where}: {name} at {path_str(path)!r} has dtype {jnp.result_type(leaf)} but "
                f"params has {jnp.result_type(ref)}"
            )
    return [leaf for _, leaf in flat]


def first_difference(ref_flat: list, ref_def, flat: list, treedef, name: str) -> str:
    """Says where ``flat`` (the leaves of ``name``) first differs from ``ref_flat`` (params)."""
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


def check_float_leaves(flat: list, where: str, name: str) -> None:
    """Raises TypeError unless every leaf of ``flat`` has a floating dtype."""
    for path, leaf in flat:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}: {name} at {path_str(path)!r} must be floating to be trained, got {dtype}"
            )


def zeros_like_params(params: Any, where: str) -> Any:
    """A tree of zeros shaped like ``params`` (a solver's history at iteration 0).

    Raises:
      TypeError: a parameter that is not floating.
    """
    flat, treedef = tree_flatten_with_path(params)
    check_float_leaves(flat, where, "params")
    return tree_unflatten(treedef, [jnp.zeros_like(w) for _, w in flat])
