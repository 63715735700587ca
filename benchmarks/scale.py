"""Data-parallel scaling benchmark: ``python benchmarks/scale.py [--quick] [--devices 1,2,4]``.

A thin wrapper of ``fnlayers-bench scale`` (fnlayers/bench/scale.py); see ``--help``.
"""

import sys

from fnlayers.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["scale", *sys.argv[1:]]))
