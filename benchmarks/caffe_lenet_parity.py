"""Caffe's LeNet solver run by the real Caffe and by ``fnlayers train``, from the same weights on
the same data in the same order; prints both runs' test accuracy and loss at every test pass.

    python benchmarks/caffe_lenet_parity.py --caffe-python /path/to/python-with-pycaffe --out DIR

The project is examples/caffe_lenet.py's (Caffe's two LeNet prototxts, LMDBs of the 28x28
digits). The real Caffe here is a build without LMDB, so its half reads the same pixels from
HDF5 (``HDF5Data`` layers in place of the ``Data`` layers, the pixels already multiplied by
the transform's scale 0.00390625, which is what the Data layer computes); rows and LMDB records
are read in the same order. Both start from one ``init.caffemodel`` that Caffe wrote from the
prototxt's fillers.
"""

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

CAFFE_HALF = r"""
import sys, re, numpy as np, h5py, caffe
caffe.set_mode_cpu()
iterations = int(sys.argv[1])
net_text = open("examples/mnist/lenet_train_test.prototxt").read()
for split in ("train", "test"):
    x, y = np.load(f"{split}_pixels.npy"), np.load(f"{split}_labels.npy")
    with h5py.File(f"{split}.h5", "w") as f:
        f["data"] = (x * np.float32(0.00390625)).astype(np.float32)
        f["label"] = y.astype(np.float32)
    open(f"{split}_h5.txt", "w").write(f"{split}.h5\n")
def hdf5(match):
    block = match.group(0)
    split = "train" if "mnist_train_lmdb" in block else "test"
    batch = re.search(r"batch_size: (\d+)", block).group(1)
    phase = re.search(r"phase: (\w+)", block).group(1)
    return ('layer { name: "mnist" type: "HDF5Data" top: "data" top: "label" '
            f'include {{ phase: {phase} }} hdf5_data_param {{ source: "{split}_h5.txt" '
            f'batch_size: {batch} }} }}')
net_text = re.sub(r'layer \{\s*name: "mnist".*?\n\}\n', hdf5, net_text, flags=re.S)
open("caffe_train_test.prototxt", "w").write(net_text)
solver_text = open("examples/mnist/lenet_solver.prototxt").read()
solver_text = solver_text.replace(
    "examples/mnist/lenet_train_test.prototxt", "caffe_train_test.prototxt")
solver_text = solver_text.replace(
    'snapshot_prefix: "examples/mnist/lenet"', 'snapshot_prefix: "caffe_lenet"')
solver_text = solver_text.replace("solver_mode: GPU", "solver_mode: CPU")
solver_text = solver_text.replace("test_interval: 500", "test_interval: 100000000")
# the harness scores the test net itself (below), at the iterations Caffe would, so that the
# test data cursor advances as in a plain `caffe train` run
solver_text += f"test_initialization: false\nmax_iter: {iterations}\n"
solver_text = re.sub(r"max_iter: 10000\n", "", solver_text)
open("caffe_solver.prototxt", "w").write(solver_text)
caffe.Net("caffe_train_test.prototxt", caffe.TRAIN).save("init.caffemodel")
solver = caffe.get_solver("caffe_solver.prototxt")
solver.net.copy_from("init.caffemodel")
test = solver.test_nets[0]
def score():
    test.share_with(solver.net)  # as Caffe's Solver::Test does before each test pass
    acc = loss = 0.0
    for _ in range(100):
        out = test.forward()
        acc += float(out["accuracy"]); loss += float(out["loss"])
    return acc / 100, loss / 100
rows = [(0, *score())]
while solver.iter < iterations:
    solver.step(500)
    rows.append((solver.iter, *score()))
for it, acc, loss in rows:
    print(f"caffe {it} {acc:.6f} {loss:.6f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--caffe-python", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--iterations", type=int, default=10000)
    args = parser.parse_args()
    import caffe_lenet

    import fnlayers as fl
    from fnlayers.caffe import cli

    caffe_lenet.write_project(args.out)
    os.chdir(args.out)
    digits = fl.data.load_digits(28)
    for split, x, y in (
        ("train", digits.x_train, digits.y_train),
        ("test", digits.x_test, digits.y_test),
    ):
        pixels = np.round(x[..., 0] * 255).astype(np.uint8)[:, None]
        np.save(f"{split}_pixels.npy", pixels)
        np.save(f"{split}_labels.npy", y)
    env = dict(os.environ, GLOG_minloglevel="2")
    caffe_out = subprocess.run(
        [args.caffe_python, "-c", CAFFE_HALF, str(args.iterations)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    caffe_rows = [ln.split()[1:] for ln in caffe_out.splitlines() if ln.startswith("caffe ")]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        status = cli.main(
            ["train", "--solver", "examples/mnist/lenet_solver.prototxt",
             "--weights", "init.caffemodel", "--iterations", str(args.iterations)]
        )  # fmt: skip
    if status:
        print(log.getvalue())
        return status
    text = log.getvalue()
    ours = {}
    for it, acc, loss in re.findall(
        r"Iteration (\d+), Testing net \(#0\)\n.*accuracy = (\S+)\n.*loss = (\S+)", text
    ):
        ours[int(it)] = (float(acc), float(loss))
    print("| iteration | Caffe accuracy | fnlayers accuracy | Caffe loss | fnlayers loss |")
    print("|---:|---:|---:|---:|---:|")
    for it, acc, loss in caffe_rows:
        mine = ours.get(int(it), (float("nan"), float("nan")))
        print(f"| {it} | {float(acc):.4f} | {mine[0]:.4f} | {float(loss):.5f} | {mine[1]:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
