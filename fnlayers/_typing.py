"""Type aliases for the signatures of the public functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import jax

__all__ = ["Array", "ArrayLike", "DTypeLike", "IntPair", "Shape"]

#: What an op returns.
Array: TypeAlias = jax.Array
#: What an op accepts: a jax array, a NumPy array, or a scalar where a shape is not needed.
ArrayLike: TypeAlias = jax.typing.ArrayLike
DTypeLike: TypeAlias = jax.typing.DTypeLike
#: One int for both spatial axes, or an ``(h, w)`` pair.
IntPair: TypeAlias = int | tuple[int, int]
Shape: TypeAlias = Sequence[int]
