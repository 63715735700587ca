"""Input validation shared by the public entry points.

Every check raises a ValueError or TypeError whose message names the function, the argument, the
value and what was expected, e.g. ``conv2d: stride=(0, 1) must be positive``. Checks run at trace
time on static shapes and Python values only; they never touch array data.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = [
    "as_pair",
    "check_choice",
    "check_float_array",
    "check_rank",
    "check_same_dtype",
]


def as_pair(value, *, fn: str, name: str, minimum: int = 0) -> tuple[int, int]:
    """Normalises an int or an ``(h, w)`` pair to a tuple of two Python ints >= ``minimum``.

    Raises:
      TypeError: ``value`` is not an int or a pair of ints (bools are rejected).
      ValueError: a component is below ``minimum``.
    """
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{fn}: {name}={value!r} must be an int or a pair of ints (h, w)")
    if min(pair) < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        shown = value if _is_int(value) else pair
        raise ValueError(f"{fn}: {name}={shown!r} must be {what}")
    return pair


def check_rank(shape: Sequence[int], rank: int, *, fn: str, name: str, layout: str = "") -> None:
    """Raises ValueError unless ``len(shape) == rank``."""
    if len(shape) != rank:
        hint = f" ({layout})" if layout else ""
        raise ValueError(
            f"{fn}: {name} must have rank {rank}{hint}, got shape {tuple(shape)} "
            f"(rank {len(shape)})"
        )


def check_float_array(x, *, fn: str, name: str) -> None:
    """Raises TypeError unless ``x`` has a floating dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must have a floating dtype, got {dtype}")


def check_same_dtype(a, b, *, fn: str, names: tuple[str, str]) -> None:
    """Raises TypeError when two arrays have different dtypes (no silent promotion)."""
    da, db = _dtype(a), _dtype(b)
    if da != db:
        raise TypeError(
            f"{fn}: {names[0]} has dtype {da} but {names[1]} has dtype {db}; cast one of them"
        )


def check_choice(value, choices: Sequence, *, fn: str, name: str) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{fn}: {name}={value!r} must be one of {tuple(choices)!r}")


def _dtype(x):
    # The array's own dtype, before jax canonicalises float64 to float32 (x64 off): a float64
    # weight next to a float32 input is a mistake worth reporting even when jax would hide it.
    return np.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)
