"""Every op's value and gradients under jit, vmap, pmap and shard_map on 4 devices (issue 13).

The checks run in tests/_transforms_worker.py, in subprocesses: the 4 CPU devices must be asked
for (``--xla_force_host_platform_device_count``) before jax starts, and this process's jax has
started with one. Two workers split the cases and run side by side (compiling is most of the
time, and single-threaded); each prints ``{case: {transform: outcome}}`` and every test here
asserts on its own case's entry, so a failure names the op, the path and the transform.
The worker's docstring says what each transform computes and what it is compared with.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import _transforms_worker as worker
import pytest

HERE = Path(__file__).resolve().parent
WORKERS = 2
TIMEOUT_S = 600

# What every case is checked under. "tiling_*" entries come with the conv2d cases whose tiling
# is part of the case; "*_params" (gradients in the params alone) with the cases with params.
TRANSFORMS = {
    "one_device",
    "vmap",
    "pmap",
    "shard_map_vma",
    "shard_map_novma",
    "shard_map_inner_vma",
    "shard_map_inner_novma",
    "shard_map_auto",
    "global_explicit",
    "global_auto",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Runs the workers (every case, once per module); returns ``{case: {transform: outcome}}``."""
    out = tmp_path_factory.mktemp("transforms")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    names = list(worker.CASES)
    procs = []
    for i in range(WORKERS):
        # Files, not pipes: a pipe nobody reads yet could fill up and stall the worker.
        with open(out / f"stdout{i}.txt", "w") as so, open(out / f"stderr{i}.txt", "w") as se:
            cmd = [sys.executable, str(HERE / "_transforms_worker.py"), *names[i::WORKERS]]
            procs.append(subprocess.Popen(cmd, cwd=HERE.parent, env=env, stdout=so, stderr=se))
    merged = {}
    try:
        for i, proc in enumerate(procs):
            try:
                proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"transforms worker {i} ran past {TIMEOUT_S} s")
            stdout = (out / f"stdout{i}.txt").read_text()
            stderr = (out / f"stderr{i}.txt").read_text()
            lines = stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                pytest.fail(f"transforms worker {i} exited {proc.returncode}\n{stderr[-4000:]}")
            merged.update(json.loads(lines[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return merged


@pytest.mark.parametrize("name", list(worker.CASES))
def test_op_under_transforms(report, name):
    outcomes = report[name]
    missing = TRANSFORMS - set(outcomes)
    failed = {t: outcome for t, outcome in sorted(outcomes.items()) if outcome != "ok"}
    assert not missing and not failed, f"{name}: not checked under {sorted(missing)}" + "".join(
        f"\n  {t}: {outcome}" for t, outcome in failed.items()
    )


def test_every_op_has_a_case():
    """The public differentiable ops of these modules each appear in some case."""
    import fnlayers as fl

    covered = " ".join(worker.CASES)
    ops = [
        *fl.conv.__all__,
        *fl.pooling.__all__,
        *fl.normalization.__all__,
        *fl.activations.__all__,
        *fl.losses.__all__,
        "dropout",
        "dense",
    ]
    helpers = {"IMPLS", "ROUNDINGS", "LRN_REGIONS", "NORMALIZATIONS", "FLT_MIN"}
    shape_rules = {n for n in ops if n.endswith(("_size", "_shape", "_state"))}
    missing = [n for n in ops if n not in helpers | shape_rules and n not in covered]
    assert not missing, f"no transforms case for {missing}"
