"""Data parallelism: fit/make_train_step with a mesh, several processes, iterables of batches.

The multi-device checks run in subprocesses (``tests/_dp_worker.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before jax is imported; this
process keeps its single CPU device.
"""

import json
import os
import socket
import subprocess
import sys
import time
import warnings

import chex
import jax
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import data, losses, models, optim, train

WORKER = os.path.join(os.path.dirname(__file__), "_dp_worker.py")
# Survivors of a dead peer are stopped by JAX's coordination service within about the
# heartbeat timeout the worker passes to jax.distributed.initialize (5 s); the bound leaves
# room for start-up and compilation on a loaded 2-core machine.
DEATH_BOUND_S = 90


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__))), env.get("PYTHONPATH", "")]
    )
    return env


def _run_worker(tmp_path, mode, *args, devices=4, timeout=600):
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run(
        [sys.executable, WORKER, mode, str(out), *map(str, args)],
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("mesh"), "mesh")


def test_worker_sees_four_devices(mesh_results):
    assert mesh_results["devices"] == 4


@pytest.mark.parametrize("name", ["lenet", "bn_dropout"])
def test_fit_on_a_four_device_mesh_equals_one_device(mesh_results, name):
    r = mesh_results[f"fit_{name}"]
    # Sums run in another order across devices (differences ~1e-8 after a step); a max-pooling
    # window whose two largest inputs are that close can then pick the other one, which moves
    # one weight-gradient entry by a little more (LeNet: 3e-5 against weights of 0.09).
    assert r["params"] < 1e-4 and r["state"] < 1e-5
    half = len(r["loss"]) // 2
    np.testing.assert_allclose(r["loss"][:half], r["loss"][half:], rtol=1e-5)
    assert r["test_accuracy"][0] == pytest.approx(r["test_accuracy"][1], abs=1e-6)
    assert r["replicated"] and r["num_devices"] == 4


def test_cifar10_bn_uses_global_batch_statistics_on_a_mesh(mesh_results):
    r = mesh_results["fit_cifar10_bn"]
    assert r["params"] <= 1e-5 * max(1.0, r["scale"])
    assert r["state"] < 1e-4


def test_per_device_batch_norm_is_a_loop_over_the_device_slices(mesh_results):
    r = mesh_results["per_device"]
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5)
    assert r["params"] < 1e-5 and r["state"] < 1e-5
    # the option really changes the statistics: the slices' variances, and so the loss (the
    # mean of the slices' means is the global mean, so the running mean agrees)
    assert r["vs_global"]["state"] > 1e-4 and r["vs_global"]["loss"] > 1e-4


def test_batch_norm_naming_the_data_axis_works_in_fit(mesh_results):
    r = mesh_results["axis_name"]
    assert r["no_mesh"] < 1e-5 and r["mesh"] < 1e-5
    # with per-device slices the named axis still averages them: global statistics again
    assert r["per_device_mesh"] < 1e-4


def test_iterable_on_a_mesh_equals_arrays(mesh_results):
    assert mesh_results["iterable_mesh"] < 1e-6


def test_predict_and_evaluate_on_a_mesh(mesh_results):
    assert mesh_results["predict"] < 1e-5
    a, b, c = mesh_results["evaluate"]
    assert a == pytest.approx(b, rel=1e-5) and a == pytest.approx(c, rel=1e-5)


def test_mesh_errors_name_the_argument(mesh_results):
    e = mesh_results["errors"]
    assert e["indivisible"].startswith("ValueError") and "batch_size=30" in e["indivisible"]
    assert "multiple of the 4 devices" in e["indivisible"]
    assert e["axis"].startswith("ValueError") and "data_axis='batch'" in e["axis"]
    assert e["mode"].startswith("ValueError") and "batch_norm='local'" in e["mode"]
    assert e["not_a_mesh"].startswith("TypeError") and "jax.sharding.Mesh" in e["not_a_mesh"]


def _start(mode, rank, port, directory):
    out = directory / f"{mode}-{rank}.json"
    proc = subprocess.Popen(
        [sys.executable, WORKER, mode, str(out), str(rank), str(port), str(directory)],
        env=_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, out


def test_two_processes_match_one_process_and_resume_from_process_0s_checkpoint(tmp_path):
    port = _free_port()
    procs = [_start("process", rank, port, tmp_path) for rank in (0, 1)]
    reference = _run_worker(tmp_path, "reference", tmp_path, devices=1)
    results = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.read_text()))
    for r in results:
        assert r["process_count"] == 2 and r["devices"] == 4
        # only process 0 writes the checkpoint (and no temporary file is left)
        assert r["files_after_first_call"] == ["run.ckpt"]
        np.testing.assert_allclose(r["losses"], results[0]["losses"], rtol=0, atol=0)
        assert r["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-6)
    # the last record averages the last step alone in both runs (a record after a resume
    # averages only the steps run since the resume)
    assert results[0]["losses"][-1] == pytest.approx(reference["losses"][-1], rel=1e-5)
    with np.load(tmp_path / "params-0.npz") as p0, np.load(tmp_path / "params-1.npz") as p1:
        with np.load(tmp_path / "params-reference.npz") as ref:
            for k in ref.files:
                np.testing.assert_array_equal(p0[k], p1[k])  # identical in both processes
                # Sums run in another order than on one device, and over 6 steps a max-pooling
                # window whose two largest inputs are that close may pick the other one, or a
                # ReLU input that close to 0 change sign: each moves one row or column of a
                # weight gradient a little (up to 1.2e-4 here, against weights of 0.05) while
                # the losses above still agree to 1e-5.
                np.testing.assert_allclose(p0[k], ref[k], rtol=0, atol=5e-4)


def test_a_killed_peer_makes_the_survivor_exit_non_zero_within_the_bound(tmp_path):
    port = _free_port()
    start = time.monotonic()
    procs = [_start("die", rank, port, tmp_path) for rank in (0, 1)]
    codes = []
    for proc, _ in procs:
        try:
            proc.communicate(timeout=DEATH_BOUND_S)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            pytest.fail(f"a process still ran {DEATH_BOUND_S} s after its peer died")
        codes.append(proc.returncode)
    assert codes[1] == 7  # the peer that died
    assert codes[0] != 0  # the survivor stopped with an error instead of hanging
    assert time.monotonic() - start < DEATH_BOUND_S


def test_processes_that_disagree_about_the_checkpoint_stop_before_training(tmp_path):
    port = _free_port()
    for rank in (0, 1):
        (tmp_path / f"cwd-{rank}").mkdir()
    procs = [_start("disagree", rank, port, tmp_path) for rank in (0, 1)]
    for proc, out in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        error = json.loads(out.read_text())["error"]
        assert "exists in processes [0] but not in [1]" in error
        assert "filesystem they share" in error


# --------------------------------------------------------------- one device, in this process


@pytest.fixture(scope="module")
def digits():
    d = data.load_digits(28)
    return d.x_train[:160], d.y_train[:160]


def _fit(train_data, **kw):
    kw.setdefault("iterations", 7)
    return train.fit(
        models.lenet(),
        losses.softmax_cross_entropy,
        optim.sgd(0.05, momentum=0.9),
        train_data,
        progress=False,
        log_every=3,
        **kw,
    )


def _epoch_batches(x, y, batch_size, epoch):
    return list(data.batches(x, y, batch_size, seed=0, epoch=epoch, drop_last=True))


def test_fit_on_a_generator_equals_fit_on_the_arrays(digits):
    x, y = digits

    def generator():
        epoch = 0
        while True:
            yield from data.batches(x, y, 32, seed=0, epoch=epoch, drop_last=True)
            epoch += 1

    a, ha = _fit((x, y), batch_size=32)
    b, hb = _fit(generator())
    chex.assert_trees_all_equal(a.params, b.params)
    assert [r["loss"] for r in ha.records] == [r["loss"] for r in hb.records]
    assert "epoch" not in hb.records[0]  # a generator has no len(): no epoch to report


def test_a_reiterable_with_len_repeats_its_passes_and_counts_epochs(digits):
    x, y = digits
    one_pass = _epoch_batches(x, y, 32, 0)  # a list: iterated again for every pass
    b, hb = _fit(one_pass, epochs=2, iterations=None)
    assert hb.records[-1]["iteration"] == 10 and hb.records[-1]["epoch"] == 2.0
    # the same as feeding the pass twice by hand
    a, _ = _fit(iter(one_pass + one_pass), iterations=10)
    chex.assert_trees_all_equal(a.params, b.params)


def test_a_one_shot_iterator_that_runs_out_ends_the_run_with_a_warning(digits, tmp_path):
    x, y = digits
    ckpt = tmp_path / "c.ckpt"
    with pytest.warns(RuntimeWarning, match="ran out after 5 iterations"):
        _, history = _fit(iter(_epoch_batches(x, y, 32, 0)), iterations=9, checkpoint_path=ckpt)
    assert history.records[-1]["iteration"] == 5
    assert fl.checkpoint.load_metadata(ckpt)["iteration"] == 5


def test_smaller_batches_are_skipped_and_larger_ones_rejected(digits):
    x, y = digits
    batches = _epoch_batches(x, y, 32, 0)
    short = [batches[0], (x[:5], y[:5]), *batches[1:3]]
    a, _ = _fit(short, iterations=3)
    b, _ = _fit(batches[:3], iterations=3)
    chex.assert_trees_all_equal(a.params, b.params)
    with pytest.raises(ValueError, match="batch 1 of train_data has 64 examples"):
        _fit([batches[0], (x[:64], y[:64])], iterations=2)
    with pytest.raises(ValueError, match="batch_size=16 disagrees"):
        _fit(batches, batch_size=16)
    with pytest.raises(ValueError, match="epochs=1 needs to know the epoch's length"):
        _fit(iter(batches), epochs=1, iterations=None)
    with pytest.raises(ValueError, match="yielded no batch"):
        _fit(iter([]))


def test_resume_from_a_checkpoint_skips_the_batches_already_seen(digits, tmp_path):
    x, y = digits
    batches = _epoch_batches(x, y, 32, 0) * 2
    whole, _ = _fit(list(batches), iterations=8)
    ckpt = tmp_path / "r.ckpt"
    _fit(list(batches), iterations=8, checkpoint_path=ckpt, stop_after=3)
    resumed, _ = _fit(list(batches), iterations=8, checkpoint_path=ckpt)
    chex.assert_trees_all_equal(whole.params, resumed.params)


def test_the_checkpoint_directory_is_made_before_training(digits, tmp_path):
    x, y = digits
    path = tmp_path / "new" / "dir" / "run.ckpt"
    _fit((x, y), batch_size=32, iterations=2, checkpoint_path=path)
    assert fl.checkpoint.load_metadata(path)["iteration"] == 2


def test_a_one_device_mesh_changes_nothing(digits):
    x, y = digits
    mesh = jax.make_mesh((1,), ("data",))
    a, ha = _fit((x, y), batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b, hb = _fit((x, y), batch_size=32, mesh=mesh)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a.params, b.params
    )
    assert [r["loss"] for r in ha.records] == pytest.approx([r["loss"] for r in hb.records])
