"""Train-step benchmark: ``python benchmarks/train.py [--quick] [--out path.json]``.

A thin wrapper of ``fnlayers-bench train`` (fnlayers/bench/train.py); see ``--help``.
"""

import sys

from fnlayers.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
