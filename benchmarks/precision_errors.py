"""Per-op error of bfloat16 and float16 against float32:
``python benchmarks/precision_errors.py [--out path.md] [--docs docs/mixed-precision.md]``.

A thin wrapper of fnlayers/bench/precision.py; see ``--help``. Without arguments it writes
benchmarks/results/2026-12-01-cpu-precision-errors.md and the summary in
docs/mixed-precision.md.
"""

import os
import sys

from fnlayers.bench.precision import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = [
    "--out",
    os.path.join(ROOT, "benchmarks", "results", "2026-12-01-cpu-precision-errors.md"),
    "--docs",
    os.path.join(ROOT, "docs", "mixed-precision.md"),
]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
