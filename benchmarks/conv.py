"""Conv benchmark: ``python benchmarks/conv.py [--quick] [--out path.json]``.

A thin wrapper of ``fnlayers-bench conv`` (fnlayers/bench/conv.py); see ``--help``.
"""

import sys

from fnlayers.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["conv", *sys.argv[1:]]))
