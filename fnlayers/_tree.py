"""Key paths of pytrees as strings, the one spelling every module uses (``"conv1/w"``)."""

from __future__ import annotations

from collections.abc import Sequence

from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

__all__ = ["path_str"]


def path_str(path: Sequence) -> str:
    """A key path from ``jax.tree_util.tree_flatten_with_path`` as ``"conv1/w"``.

    Dict keys and attribute names appear as themselves, sequence indices as numbers; ``""`` is
    the root (a tree that is a single array).

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, {"b": 2}]})[0]]
    ['a/0', 'a/1/b']
    """
    return "/".join(_segment(key) for key in path)


def _segment(key) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)
