"""matplotlib, for the functions and examples that write PNGs (an optional dependency)."""

from __future__ import annotations

MISSING = (
    "matplotlib is not installed, so no plot is written "
    "(pip install 'fnlayers[examples]' or pip install matplotlib)"
)


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend; ``ImportError`` (with
    :data:`MISSING` as its message) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(MISSING) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pyplot_or_none():
    """:func:`pyplot`, or ``None`` after printing :data:`MISSING`."""
    try:
        return pyplot()
    except ImportError:
        print(MISSING)
        return None
