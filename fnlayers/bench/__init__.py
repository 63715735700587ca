"""Benchmarks for fnlayers: ``fnlayers-bench conv`` (``python -m fnlayers.bench.cli conv``).

The suites use only the public fnlayers API plus jax and numpy; PyTorch is imported lazily, as an
optional peer, when it is installed. Every run prints a Markdown table and writes a JSON file with
the environment, per-case medians of repeated runs after compilation and warm-up, and ratios to the
baselines measured in the same run.
"""

from fnlayers.bench._harness import Timing, environment, gemm_peak, markdown_table, time_jax

__all__ = ["Timing", "environment", "gemm_peak", "markdown_table", "time_jax"]
