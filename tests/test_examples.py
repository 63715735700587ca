"""Smoke tests of the runnable examples: each runs in its quick mode, as a user would run it.

Each example is a subprocess (``sys.executable``, the repository root as working directory,
``--out`` in a temporary directory). The test checks the exit status and the format and range
of the number on the last line the example prints.

Almost all of the time is XLA compilation, not training, so two things keep the file fast:
all examples are started at once (compilation is single-threaded, so two cores run two
compilations side by side) and they run with ``--xla_backend_optimization_level=0``, which
halves compile time at the price of slower steps, of which quick modes take only a few.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300

# name -> (command-line arguments after the script, the last line's pattern)
EXAMPLES = {
    "siamese_digits": (
        ["examples/siamese_digits.py", "--quick"],
        r"embedding nearest-centroid test accuracy: (\d\.\d{3})",
    ),
    "fcn_segmentation": (
        ["examples/fcn_segmentation.py", "--quick"],
        r"test mean IoU: (\d\.\d{3}) \(all-background baseline (\d\.\d{3})\)",
    ),
    "cifar10_quick": (
        ["examples/cifar10_quick.py", "--quick"],
        r"final test accuracy: (\d\.\d{3}) on the generated stand-in, not CIFAR-10",
    ),
    "train_lenet": (
        ["examples/train_lenet.py", "--epochs", "1"],
        r"final test accuracy: (\d\.\d{3})",
    ),
    "data_parallel": (
        ["examples/data_parallel.py", "--epochs", "1"],
        r"final test accuracy: (\d\.\d{3}) on (\d+) devices",
    ),
    "import_caffe": (
        ["examples/import_caffe.py"],
        r"max \|fnlayers - numpy\| = (\d\.\de-\d\d) \(tolerance 1e-05\); export round trip exact",
    ),
    "caffe_lenet": (
        ["examples/caffe_lenet.py", "--quick"],
        r"fnlayers test accuracy after 100 iterations: (\d\.\d{3})",
    ),
    "conv_demo": (
        ["examples/conv_demo.py"],
        r"output \(8, 10\) \(init predicted \(-1, 10\)\)",
    ),
}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Starts every example at once; yields name -> (Popen, out_dir)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env["PYTHONUNBUFFERED"] = "1"
    # The examples run side by side: on a GPU each would otherwise grab 75% of its memory.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    procs = {}
    for name, (args, _) in EXAMPLES.items():
        out = tmp_path_factory.mktemp(name)
        outputs = [] if name == "conv_demo" else ["--out", str(out)]  # conv_demo writes nothing
        # Files, not pipes: a pipe nobody reads yet could fill up and stall the example.
        with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
            proc = subprocess.Popen(
                [sys.executable, *args, *outputs], cwd=ROOT, env=env, stdout=so, stderr=se
            )
        procs[name] = (proc, out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(started, name):
    """Waits for the example; returns (its last printed line, its out dir)."""
    proc, out = started[name]
    try:
        proc.wait(timeout=TIMEOUT_S)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    stdout = (out / "stdout.txt").read_text()
    stderr = (out / "stderr.txt").read_text()
    if timed_out:
        pytest.fail(f"{name} ran past {TIMEOUT_S} s\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{stdout}\n{stderr[-4000:]}"
    lines = stdout.strip().splitlines()
    assert lines, f"{name} printed nothing\n{stderr[-4000:]}"
    return lines[-1], out


def parse_last_line(started, name):
    last, out = finish(started, name)
    pattern = EXAMPLES[name][1]
    match = re.fullmatch(pattern, last)
    assert match, f"{name}: last line {last!r} does not match {pattern!r}"
    return [float(g) for g in match.groups()], out


def test_siamese_digits(started):
    (accuracy,), out = parse_last_line(started, "siamese_digits")
    assert 0.0 <= accuracy <= 1.0
    for name in ("embedding.png", "history.json", "embeddings.npz"):
        assert (out / name).is_file(), name


def test_fcn_segmentation(started):
    (miou, baseline), out = parse_last_line(started, "fcn_segmentation")
    assert 0.0 <= miou <= 1.0
    # Quick mode's 100 test images are about 83% background, so the baseline (background IoU
    # over the four classes) is near 0.2.
    assert 0.1 < baseline < 0.25
    for name in ("predictions.png", "history.json"):
        assert (out / name).is_file(), name


def test_cifar10_quick_stand_in(started):
    (accuracy,), out = parse_last_line(started, "cifar10_quick")
    assert 0.0 <= accuracy <= 1.0
    for name in ("curves.png", "history.json", "history.csv"):
        assert (out / name).is_file(), name


def test_train_lenet_one_epoch(started):
    (accuracy,), out = parse_last_line(started, "train_lenet")
    assert 0.0 <= accuracy <= 1.0
    assert (out / "checkpoint.npz").is_file()


def test_conv_demo(started):
    parse_last_line(started, "conv_demo")


def test_data_parallel_matches_one_device(started):
    import jax

    (accuracy, devices), out = parse_last_line(started, "data_parallel")
    assert 0.0 <= accuracy <= 1.0
    if jax.devices()[0].platform == "cpu" and "host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        assert devices == 4  # the example's --cpu-devices default
    stdout = (out / "stdout.txt").read_text()
    match = re.search(r"max \|mesh - one device\| = (\S+)", stdout)
    assert match, stdout
    assert float(match.group(1)) < 1e-5  # the same numbers, summed in another order
    for name in ("checkpoint.npz", "history.json"):
        assert (out / name).is_file(), name


def test_import_caffe(started):
    (err,), out = parse_last_line(started, "import_caffe")
    assert err <= 1e-5
    for name in (
        "inception_residual.prototxt",
        "inception_residual.caffemodel",
        "exported.caffemodel",
    ):
        assert (out / name).is_file(), name


def test_caffe_lenet_project_with_the_fnlayers_command(started):
    (accuracy,), out = parse_last_line(started, "caffe_lenet")
    assert 0.0 <= accuracy <= 1.0
    stdout = (out / "stdout.txt").read_text()
    for line in (
        "Iteration 0, loss = ",
        "Test net output #0: accuracy = ",
        "Average Forward pass: ",
    ):
        assert line in stdout, line
    assert (out / "examples/mnist/lenet_iter_100.solverstate").is_file()
