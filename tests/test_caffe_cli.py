"""The ``fnlayers`` command (Caffe's ``caffe train/test/time``) end to end, against the real
Caffe: ``tests/data/caffe_oracle`` holds a tiny HDF5-fed net, six solver prototxts (one per
solver type) and the snapshots real Caffe wrote after training each from ``init.caffemodel``."""

import contextlib
import io
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("h5py")

from fnlayers.caffe import cli, wire

DATA = Path(__file__).parent / "data" / "caffe_oracle"
SOLVERS = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
PROJECT = ("train_net.prototxt", "train.h5", "train_h5.txt", "init.caffemodel")


def _project(tmp_path, monkeypatch, *solvers):
    for name in (*PROJECT, *(f"solver_{s}.prototxt" for s in solvers)):
        shutil.copy(DATA / name, tmp_path)
    monkeypatch.chdir(tmp_path)  # Caffe resolves the prototxts' paths from the working directory


def _run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _blobs(path) -> dict[str, list[np.ndarray]]:
    _, layers = wire.read_net(Path(path).read_bytes())
    return {layer.name: [np.asarray(b) for b in layer.blobs] for layer in layers if layer.blobs}


def _losses(log: str) -> list[float]:
    lines = [ln for ln in log.splitlines() if ln.startswith("Iteration") and ", loss = " in ln]
    return [float(ln.rsplit("= ", 1)[1]) for ln in lines]


@pytest.mark.parametrize("kind", SOLVERS)
def test_train_snapshot_equals_real_caffes(kind, tmp_path, monkeypatch):
    """Same initial weights, same data, 6 iterations: the weights real Caffe snapshotted.

    The solvers cover step/inv/fixed/exp/multistep/poly rates, momentum, L2 and L1 decay,
    lr_mult/decay_mult, clipping (SGD) and iter_size 2 (AdaGrad)."""
    _project(tmp_path, monkeypatch, kind)
    status, log, _ = _run(
        "train", f"-solver=solver_{kind}.prototxt", "--weights", "init.caffemodel"
    )
    assert status == 0
    mine, theirs = _blobs(f"{kind}_iter_6.caffemodel"), _blobs(DATA / f"{kind}_iter_6.caffemodel")
    assert list(mine) == list(theirs) == ["conv", "ip"]
    for name, blobs in theirs.items():
        for got, want in zip(mine[name], blobs, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert (tmp_path / f"{kind}_iter_3.caffemodel").is_file()
    # Caffe's per-iteration loss (its display of 1 iteration), then the final forward's
    if kind != "AdaGrad":  # with iter_size 2 Caffe's loss blob holds only the last micro-batch
        losses = _losses(log)
        np.testing.assert_allclose(losses[:6], np.load(DATA / f"{kind}_loss.npy"), rtol=1e-5)
        assert len(losses) == 7
    assert "Iteration 5, lr = " in log and log.rstrip().endswith("Optimization Done.")


def test_resuming_from_a_solverstate_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch, "Adam")
    assert _run("train", "--solver", "solver_Adam.prototxt", "--weights", "init.caffemodel")[0] == 0
    uninterrupted = _blobs("Adam_iter_6.caffemodel")
    (tmp_path / "Adam_iter_6.caffemodel").unlink()
    status, log, _ = _run(
        "train", "-solver", "solver_Adam.prototxt", "-snapshot", "Adam_iter_3.solverstate"
    )
    assert status == 0
    assert "Iteration 2," not in log and "Iteration 3, loss" in log
    for name, blobs in uninterrupted.items():
        for got, want in zip(_blobs("Adam_iter_6.caffemodel")[name], blobs, strict=True):
            np.testing.assert_array_equal(got, want)


def test_test_and_time_verbs(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch)
    status, log, _ = _run(
        "test", "--model", "train_net.prototxt", "--weights", "init.caffemodel", "-iterations", "3"
    )
    assert status == 0
    batches = [ln for ln in log.splitlines() if ln.startswith("Batch ")]
    assert [ln.split(",")[0] for ln in batches] == ["Batch 0", "Batch 1", "Batch 2"]
    values = [float(ln.rsplit("= ", 1)[1]) for ln in batches]
    mean_line = next(ln for ln in log.splitlines() if ln.startswith("loss = "))
    assert mean_line.endswith("loss)")  # "(* 1 = ... loss)"
    assert float(mean_line.split()[2]) == pytest.approx(np.mean(values), rel=1e-5)
    status, log, _ = _run("time", "--model", "train_net.prototxt", "--iterations", "2")
    assert status == 0
    for layer in ("conv", "relu", "ip", "loss"):
        assert f"{layer}\tforward: " in log and f"{layer}\tbackward: " in log
    for total in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward"):
        assert f"{total}: " in log
    assert "Total Time: " in log


def test_clear_errors(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch, "SGD")
    text = (tmp_path / "solver_SGD.prototxt").read_text()
    (tmp_path / "no_lr.prototxt").write_text(text.replace("base_lr: 0.05\n", ""))
    status, _, err = _run("train", "--solver", "no_lr.prototxt")
    assert status == 1 and "base_lr" in err
    (tmp_path / "train_h5.txt").write_text("missing.h5\n")
    status, _, err = _run("train", "--solver", "solver_SGD.prototxt")
    assert status == 1 and "missing.h5" in err and "'data'" in err
    status, _, err = _run("test", "--model", "train_net.prototxt")
    assert status == 1 and "--weights" in err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "fnlayers.caffe.cli", "train", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for flag in ("--solver", "-solver", "--weights", "--snapshot", "--iterations"):
        assert flag in out


def test_ctrl_c_snapshots_and_stops(tmp_path):
    for name in (*PROJECT, "solver_SGD.prototxt"):
        shutil.copy(DATA / name, tmp_path)
    solver = (tmp_path / "solver_SGD.prototxt").read_text()
    solver = solver.replace("max_iter: 6", "max_iter: 1000000").replace(
        "snapshot: 3", "snapshot: 0"
    )
    (tmp_path / "solver_SGD.prototxt").write_text(solver)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fnlayers.caffe.cli", "train", "-solver", "solver_SGD.prototxt"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("Iteration 20,"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Optimization Done." in out
    snaps = list(tmp_path.glob("SGD_iter_*.caffemodel"))
    assert len(snaps) == 1, (snaps, out[-500:])
    snap = snaps[0]  # the one written at the interrupt
    assert int(snap.name.removeprefix("SGD_iter_").removesuffix(".caffemodel")) > 20
    assert snap.with_suffix(".solverstate").is_file()
