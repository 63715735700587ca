"""The optional-matplotlib helper behind every PNG the package and its examples write."""

import sys

import pytest

from fnlayers import _plot


def test_pyplot_uses_the_agg_backend():
    plt = _plot.pyplot()
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg" and hasattr(plt, "subplots")


def test_missing_matplotlib_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"fnlayers\[examples\]"):
        _plot.pyplot()
    assert _plot.pyplot_or_none() is None
    assert "no plot is written" in capsys.readouterr().out
