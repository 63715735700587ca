"""Input validation shared by the public entry points.

Every check raises a ValueError or TypeError whose message names the function, the argument, the
value and what was expected, e.g. ``conv2d: stride=(0, 1) must be positive``. Checks run at trace
time on static shapes and Python values only; they never touch array data.

One rule for numbers throughout: an int is a Python or NumPy integer, a real number an int or a
Python or NumPy float; ``True`` and ``False`` are neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = [
    "acc_dtype",
    "as_pair",
    "check_bool",
    "check_choice",
    "check_float_array",
    "check_int",
    "check_key",
    "check_positive_int",
    "check_rank",
    "check_real",
    "check_same_dtype",
    "is_int",
    "is_real",
    "missing_key_error",
]


def is_int(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer (bools are not)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_real(value) -> bool:
    """Whether ``value`` is a Python or NumPy int or float (bools are not)."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def as_pair(value, *, fn: str, name: str, minimum: int = 0) -> tuple[int, int]:
    """Normalises an int or an ``(h, w)`` pair to a tuple of two Python ints >= ``minimum``.

    Raises:
      TypeError: ``value`` is not an int or a pair of ints (bools are rejected).
      ValueError: a component is below ``minimum``.
    """
    if is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{fn}: {name}={value!r} must be an int or a pair of ints (h, w)")
    if min(pair) < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        shown = value if is_int(value) else pair
        raise ValueError(f"{fn}: {name}={shown!r} must be {what}")
    return pair


def check_int(value, *, fn: str, name: str, minimum: int | None = None, what: str = "") -> int:
    """Returns ``value`` as a Python int, >= ``minimum`` when given.

    Raises:
      TypeError: ``value`` is not an int (bools and floats such as ``2.0`` are rejected).
      ValueError: ``value`` is below ``minimum``; the message says it must be ``what``
        (default ``">= minimum"``).
    """
    if not is_int(value):
        raise TypeError(f"{fn}: {name}={value!r} must be an int")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name}={value!r} must be {what or f'>= {minimum}'}")
    return int(value)


def check_positive_int(value, *, fn: str, name: str) -> int:
    """:func:`check_int` with ``minimum=1``: ``"{fn}: {name}=0 must be a positive int"``."""
    return check_int(value, fn=fn, name=name, minimum=1, what="a positive int")


def check_real(
    value, *, fn: str, name: str, minimum: float | None = None, what: str = "a real number"
) -> float:
    """Returns ``value`` as a Python float: a finite int or float, >= ``minimum`` when given.

    Raises:
      TypeError: ``value`` is not an int or a float (bools are rejected); the message says it
        must be ``what``.
      ValueError: ``value`` is NaN or infinite, or below ``minimum``.
    """
    if not is_real(value):
        raise TypeError(f"{fn}: {name}={value!r} must be {what}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name}={value!r} must be finite")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name}={value!r} must be >= {minimum:g}")
    return float(value)


def check_bool(value, *, fn: str, name: str, what: str = "a bool") -> bool:
    """Returns ``value`` as a Python bool; raises TypeError (``must be {what}``) unless it is a
    Python or NumPy bool (``1`` and ``None`` are rejected)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{fn}: {name}={value!r} must be {what}")
    return bool(value)


def missing_key_error(fn: str, *, needs: str = "it") -> ValueError:
    """The error for ``train=True`` without a PRNG key: ``"{fn}: train=True draws random
    numbers, so {needs} needs a PRNG key: pass key=jax.random.key(seed) ..."``."""
    return ValueError(
        f"{fn}: train=True draws random numbers, so {needs} needs a PRNG key: pass "
        "key=jax.random.key(seed) (and split a fresh one for every step, e.g. "
        "key, step_key = jax.random.split(key))"
    )


def check_key(key, *, fn: str) -> None:
    """Raises :func:`missing_key_error` when ``key`` is None."""
    if key is None:
        raise missing_key_error(fn)


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


def acc_dtype(dtype) -> np.dtype:
    """The dtype that sums and products of ``dtype`` accumulate in: float32 for lower-precision
    floats (float16, bfloat16), ``dtype`` itself otherwise."""
    return jnp.promote_types(dtype, jnp.float32)


def _dtype(x):
    # The array's own dtype, before jax canonicalises float64 to float32 (x64 off): a float64
    # weight next to a float32 input is a mistake worth reporting even when jax would hide it.
    return np.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)
