"""Caffe's own LeNet project, unchanged, trained, scored and timed with the ``fnlayers`` command.

It builds in ``--out`` the tree Caffe's MNIST example runs in (from Caffe's root):

    examples/mnist/lenet_solver.prototxt      Caffe's file as shipped (examples/caffe_mnist/)
    examples/mnist/lenet_train_test.prototxt  Caffe's file as shipped
    examples/mnist/mnist_train_lmdb           an LMDB of Datums, as convert_mnist_data writes:
    examples/mnist/mnist_test_lmdb            here the 28x28 handwritten digits of
                                              fl.data.load_digits (1438 / 359), not MNIST

and then runs, in ``--out``, the three commands a Caffe user types::

    fnlayers train --solver examples/mnist/lenet_solver.prototxt
    fnlayers test --model examples/mnist/lenet_train_test.prototxt \\
        --weights examples/mnist/lenet_iter_N.caffemodel --iterations 4
    fnlayers time --model examples/mnist/lenet_train_test.prototxt --iterations 10

The solver's ``max_iter`` is 10000; ``--iterations`` stops earlier (``--quick``: 100, and 2
timed runs). Run::

    python examples/caffe_lenet.py --out /tmp/lenet [--quick]
"""

import argparse
import contextlib
import io
import os
import shutil
import sys

import numpy as np

import fnlayers as fl
from fnlayers.caffe import cli

HERE = os.path.dirname(os.path.abspath(__file__))


def write_project(root: str) -> None:
    """Caffe's two prototxts and the digits as Caffe's MNIST LMDBs, under ``root``."""
    mnist = os.path.join(root, "examples", "mnist")
    os.makedirs(mnist, exist_ok=True)
    for name in ("lenet_solver.prototxt", "lenet_train_test.prototxt"):
        shutil.copy(os.path.join(HERE, "caffe_mnist", name), mnist)
    digits = fl.data.load_digits(28)
    for split, x, y in (
        ("train", digits.x_train, digits.y_train),
        ("test", digits.x_test, digits.y_test),
    ):
        path = os.path.join(mnist, f"mnist_{split}_lmdb")
        if os.path.exists(path):
            shutil.rmtree(path)
        # uint8 pixels, one channel, as convert_mnist_data stores MNIST
        pixels = np.round(x[..., 0] * 255).astype(np.uint8)[:, None]
        datums = (fl.caffe.Datum.from_array(p, int(c)) for p, c in zip(pixels, y, strict=True))
        fl.caffe.write_lmdb(path, datums)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the directory to build and run in")
    parser.add_argument("--iterations", type=int, default=None, help="stop training here")
    parser.add_argument("--quick", action="store_true", help="100 iterations, 2 timed runs")
    args = parser.parse_args(argv)
    iterations = 100 if args.quick and args.iterations is None else args.iterations
    timed = "2" if args.quick else "10"
    write_project(args.out)
    os.chdir(args.out)  # Caffe's paths are relative to where the command runs
    solver = "examples/mnist/lenet_solver.prototxt"
    model = "examples/mnist/lenet_train_test.prototxt"
    train = ["train", "--solver", solver]
    if iterations is not None:
        train += ["--iterations", str(iterations)]
    reached = iterations or 10000
    weights = f"examples/mnist/lenet_iter_{reached}.caffemodel"
    for command in (
        train,
        ["time", "--model", model, "--iterations", timed],
        ["test", "--model", model, "--weights", weights, "--iterations", "4"],
    ):
        print("$ fnlayers " + " ".join(command), flush=True)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            status = cli.main(command)
        print(log.getvalue(), end="", flush=True)
        if status != 0:
            return status
    accuracy = next(ln for ln in log.getvalue().splitlines() if ln.startswith("accuracy = "))
    print(f"fnlayers test accuracy after {reached} iterations: {float(accuracy.split()[2]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
