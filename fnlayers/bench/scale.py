"""The ``scale`` suite: images/s of a data-parallel train step on 1, 2, 4, ... devices.

The step is the ``train`` suite's (forward, softmax cross-entropy loss, backward, SGD with
momentum 0.9 and weight decay 5e-4, Caffe's ``lr_mult``/``decay_mult``) for
``fnlayers.models.<name>()``, built with ``fnlayers.train.make_train_step(..., mesh=mesh)`` on
``jax.sharding.Mesh(np.array(jax.devices()[:k]), ("data",))`` for each device count ``k``: the
global batch is split over the first ``k`` devices, parameters and optimizer state are
replicated, and XLA inserts the all-reduce of the gradients.

Two scaling modes, each with its own 1-device baseline:

* **weak**: a fixed batch per device (``batch``), so the global batch is ``batch * k``;
* **strong**: a fixed global batch (``global_batch``, by default ``batch`` times the largest
  device count), so each device gets ``global_batch / k``.

Reported per row: median step time after compilation and warm-up, images/s, speedup (images/s
over the same mode's 1-device images/s), scaling efficiency (speedup / k; 1.0 is perfect in
both modes), and the all-reduce volume of one step: the gradient is the size of the parameters
(``bytes = number of parameters x 4`` for float32), and a ring all-reduce sends
``2 (k - 1) / k`` of it from every device (and receives as much).

The suite also measures what the mesh path itself costs on one device: the same step with
``mesh=`` a 1-device mesh against the plain step without a mesh, at the weak batch, timed in
the same process with alternating repetitions, at least 20 of each (target: at most 5%
slower).

On a CPU, JAX sees one device unless ``XLA_FLAGS`` has ``--xla_force_host_platform_device_count
=N``; :func:`fnlayers.bench.cli.main` reruns the suite in a subprocess with that flag when
more devices are asked for. Such host devices share the machine's cores, so CPU numbers measure
the partitioned program's overhead (collectives, smaller per-device work, the convolutions'
per-device slices), not a speedup.

One process only: the meshes are over this process's first ``k`` devices.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import numpy as np

import fnlayers as fl
from fnlayers.bench._harness import environment, markdown_table, publish, time_callable
from fnlayers.bench.train import LEARNING_RATE, MOMENTUM, WEIGHT_DECAY

__all__ = [
    "FORCE_FLAG",
    "MODELS",
    "OVERHEAD_TARGET",
    "QUICK_MODELS",
    "TINY_MODELS",
    "ScaleCase",
    "default_devices",
    "ring_allreduce_bytes",
    "run",
]

#: The XLA flag that gives a CPU process ``N`` host devices.
FORCE_FLAG = "--xla_force_host_platform_device_count"
#: The 1-device mesh step may take at most this times the plain step's time.
OVERHEAD_TARGET = 1.05
CPU_NOTE = (
    "host devices forced with XLA_FLAGS=--xla_force_host_platform_device_count share this "
    "machine's {cores} cores: the CPU rows measure the overhead of the partitioned step "
    "(collectives, smaller per-device products, the convolutions' per-device slices), not a "
    "speedup"
)


@dataclasses.dataclass(frozen=True)
class ScaleCase:
    """One network: ``batch`` is the per-device batch of weak scaling, ``global_batch`` the
    fixed global batch of strong scaling (None: ``batch`` times the largest device count)."""

    name: str  # lenet | cifar10_quick | alexnet
    batch: int
    hw: int
    channels: int
    classes: int
    global_batch: int | None = None

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.hw, self.hw, self.channels)


MODELS = (
    ScaleCase("cifar10_quick", 100, 32, 3, 10),
    ScaleCase("alexnet", 16, 227, 3, 1000),
)
#: Every model ``--models`` may name (LeNet is for smoke tests).
KNOWN = (ScaleCase("lenet", 64, 28, 1, 10), *MODELS)
QUICK_MODELS = (ScaleCase("cifar10_quick", 16, 32, 3, 10),)
# For the smoke test: the smallest batches, every code path, a few seconds per program.
TINY_MODELS = (ScaleCase("lenet", 2, 28, 1, 10),)


def default_devices(available: int) -> list[int]:
    """1, 2, 4, ... up to ``available`` (and ``available`` itself)."""
    counts, k = [], 1
    while k <= available:
        counts.append(k)
        k *= 2
    if counts[-1] != available:
        counts.append(available)
    return counts


def ring_allreduce_bytes(grad_bytes: int, k: int) -> float:
    """Bytes each of ``k`` devices sends (and receives) in a ring all-reduce of ``grad_bytes``:
    ``2 (k - 1) / k`` of it (a reduce-scatter and an all-gather, ``k - 1`` chunks each)."""
    return 2.0 * (k - 1) / k * grad_bytes


def _data(case: ScaleCase, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape(batch)).astype(np.float32)
    y = rng.integers(0, case.classes, batch).astype(np.int32)
    return x, y


def _model_and_solver(case: ScaleCase):
    model = getattr(fl.models, case.name)(case.classes)
    lr_mult, decay_mult = fl.param_mults(model)
    solver = fl.optim.sgd(
        LEARNING_RATE,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )
    return model, solver


def _mesh(k: int):
    return jax.sharding.Mesh(np.array(jax.devices()[:k]), ("data",))


class _Stepper:
    """Calls a donating train step repeatedly, threading its state; waits for the results."""

    def __init__(self, step, state, x, y):
        self.step, self.state, self.x, self.y = step, state, x, y

    def __call__(self):
        self.state, out = self.step(self.state, self.x, self.y)
        jax.block_until_ready((self.state, out))


def build(case: ScaleCase, batch: int, k: int | None):
    """A :class:`_Stepper` for ``case`` at global ``batch``: on a mesh over the first ``k``
    devices (data placed on it once, as a data loader would before the step), or without a
    mesh when ``k`` is None. Returns ``(stepper, gradient bytes)``."""
    model, solver = _model_and_solver(case)
    mesh = None if k is None else _mesh(k)
    key = jax.random.key(0)
    ts = fl.train.create_train_state(model, solver, case.shape(batch), key, mesh=mesh)
    step = fl.train.make_train_step(model, fl.losses.softmax_cross_entropy, solver, mesh=mesh)
    x, y = _data(case, batch)
    if mesh is None:
        x, y = jax.device_put((x, y))
    else:
        x, y = fl.distributed.data_parallel(mesh).shard((x, y))
    jax.block_until_ready((ts, x, y))
    grad_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(ts.params))
    return _Stepper(step, ts, x, y), int(grad_bytes)


def _timing_dict(t, batch: int) -> dict:
    return t.as_dict() | {"images_per_s": batch / t.median_s}


def time_overhead(case: ScaleCase, reps: int) -> dict:
    """The plain step and the 1-device mesh step at ``case.batch``, warmed up, then timed in
    alternating order (plain, mesh, mesh, plain, ...), ``reps`` times each."""
    plain, _ = build(case, case.batch, None)
    mesh1, _ = build(case, case.batch, 1)
    first = {}
    for name, stepper in (("plain", plain), ("mesh1", mesh1)):
        t0 = time.perf_counter()
        stepper()
        first[name] = time.perf_counter() - t0
        stepper()
    times: dict[str, list[float]] = {"plain": [], "mesh1": []}
    for i in range(reps):
        order = (("plain", plain), ("mesh1", mesh1))
        for name, stepper in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            stepper()
            times[name].append(time.perf_counter() - t0)
    out = {"model": case.name, "batch": case.batch, "reps": reps}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_ms": 1e3 * med,
            "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts),
            "first_call_s": first[name],
            "images_per_s": case.batch / med,
            "times_ms": [1e3 * t for t in ts],
        }
    out["ratio"] = out["mesh1"]["median_ms"] / out["plain"]["median_ms"]
    out["target"] = OVERHEAD_TARGET
    out["within_target"] = out["ratio"] <= OVERHEAD_TARGET
    return out


def run(
    *,
    quick: bool = False,
    models=None,
    devices=None,
    reps: int | None = None,
    overhead: bool = True,
    out: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict:
    """Runs the suite; returns (and, with ``out``, writes as JSON plus a ``.md`` table) the
    results. ``devices``: the device counts (default 1, 2, 4, ... up to ``jax.device_count()``);
    counts above the devices JAX sees are skipped and recorded as such."""
    models = (QUICK_MODELS if quick else MODELS) if models is None else tuple(models)
    reps = reps or (3 if quick else 5)
    min_time_s = 0.0 if quick else 1.0
    available = jax.device_count()
    asked = sorted(set(devices or default_devices(available)))
    counts = [k for k in asked if k <= available]
    skipped = [k for k in asked if k > available]
    if 1 not in counts:
        counts.insert(0, 1)  # every ratio is against one device
    top = max(counts)
    t_start = time.perf_counter()
    load_before = _loadavg()

    def log(msg):
        if verbose:
            print(msg, flush=True)

    platform = jax.devices()[0].platform
    note = CPU_NOTE.format(cores=os.cpu_count()) if platform == "cpu" and top > 1 else None
    if note:
        log(f"note: {note}")
    if skipped:
        log(f"skipping device counts {skipped}: JAX sees {available} device(s)")

    results, params = [], {}
    overheads = []
    for case in models:
        global_batch = case.global_batch or case.batch * top
        bad = [k for k in counts if global_batch % k]
        if bad:
            raise ValueError(
                f"scale: {case.name}'s strong-scaling global batch {global_batch} does not split "
                f"over {bad} devices"
            )
        measured: dict[tuple[int, int], dict] = {}  # (devices, global batch) -> timing
        for mode in ("weak", "strong"):
            for k in counts:
                batch = case.batch * k if mode == "weak" else global_batch
                if (k, batch) not in measured:
                    stepper, grad_bytes = build(case, batch, k)
                    t = time_callable(stepper, reps=reps, warmup=2, min_time_s=min_time_s)
                    measured[k, batch] = _timing_dict(t, batch)
                    params[case.name] = {
                        "parameters": grad_bytes // 4,
                        "gradient_bytes": grad_bytes,
                    }
                    del stepper
                d = measured[k, batch]
                row = {
                    "model": case.name,
                    "mode": mode,
                    "devices": k,
                    "global_batch": batch,
                    "per_device_batch": batch // k,
                    **d,
                    "images_per_s_per_device": d["images_per_s"] / k,
                    "allreduce_bytes_per_device": ring_allreduce_bytes(
                        params[case.name]["gradient_bytes"], k
                    ),
                }
                results.append(row)
                log(
                    f"{case.name:14s} {mode:6s} {k:3d} dev  batch {batch:5d} "
                    f"({batch // k:4d}/dev) {d['median_ms']:9.1f} ms  "
                    f"{d['images_per_s']:8.1f} img/s  first call {d['first_call_s']:.2f} s"
                )
        for mode in ("weak", "strong"):
            rows = [r for r in results if r["model"] == case.name and r["mode"] == mode]
            base = next(r for r in rows if r["devices"] == 1)["images_per_s"]
            for r in rows:
                r["speedup"] = r["images_per_s"] / base
                r["efficiency"] = r["speedup"] / r["devices"]
        if overhead:
            o = time_overhead(case, max(4 * reps, 20))
            overheads.append(o)
            log(
                f"{case.name:14s} overhead: plain {o['plain']['median_ms']:.1f} ms, 1-device "
                f"mesh {o['mesh1']['median_ms']:.1f} ms, ratio {o['ratio']:.3f} "
                f"(target <= {OVERHEAD_TARGET})"
            )
    payload = {
        "suite": "scale",
        "quick": quick,
        "reps": reps,
        "devices": counts,
        "skipped_devices": skipped,
        "note": note,
        "step": {
            "loss": "softmax cross-entropy",
            "optimizer": f"SGD momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}",
            "api": "fl.train.make_train_step(..., mesh=Mesh(devices[:k], ('data',))), "
            "train state from fl.train.create_train_state(..., mesh=), batch placed once with "
            "fl.distributed.data_parallel(mesh).shard",
            "allreduce": "gradient bytes = parameters x 4 (float32); a ring all-reduce sends "
            "2(k-1)/k of them from each device per step",
            "efficiency": "images/s on k devices / (k x images/s on 1 device), same mode",
        },
        "models": params,
        "environment": environment(
            {"load_average_before": load_before, "load_average_after": _loadavg()}
        ),
        "results": results,
        "overhead": overheads,
        "wall_s": time.perf_counter() - t_start,
    }
    publish(payload, format_table(payload), out, log)
    return payload


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None


def format_table(payload: dict) -> str:
    env = payload["environment"]
    lines = [
        f"scale suite, {env['device']['platform']} ({env['device']['kind']}, "
        f"{env['processor']}, {env['cpu_count']} cores, {env['device']['count']} devices), "
        f"jax {env['jax']}, jaxlib {env['jaxlib']}; medians of {payload['reps']}+ steps after "
        "compilation and 2 warm-up steps; speedup = images/s over the same mode's 1-device "
        "images/s, efficiency = speedup / devices; all-reduce = ring all-reduce bytes sent per "
        f"device per step; load average {env.get('load_average_before')} before, "
        f"{env.get('load_average_after')} after; env {env['env'] or '{}'}",
    ]
    if payload.get("note"):
        lines += ["", f"Note: {payload['note']}."]
    header = [
        "model",
        "mode",
        "devices",
        "global batch",
        "batch/device",
        "step ms",
        "images/s",
        "images/s/device",
        "speedup",
        "efficiency",
        "all-reduce MB/device",
        "first call s",
    ]
    rows = [
        [
            r["model"],
            r["mode"],
            r["devices"],
            r["global_batch"],
            r["per_device_batch"],
            r["median_ms"],
            r["images_per_s"],
            r["images_per_s_per_device"],
            r["speedup"],
            r["efficiency"],
            r["allreduce_bytes_per_device"] / 1e6,
            r["first_call_s"],
        ]
        for r in payload["results"]
    ]
    lines += ["", markdown_table(header, rows)]
    models = payload.get("models") or {}
    if models:
        lines += [
            "",
            markdown_table(
                ["model", "parameters", "gradient MB (float32)"],
                [[m, d["parameters"], d["gradient_bytes"] / 1e6] for m, d in models.items()],
            ),
        ]
    if payload.get("overhead"):
        lines += [
            "",
            "Mesh-path overhead on one device (alternating repetitions in the same process; "
            f"target ratio <= {OVERHEAD_TARGET}):",
            "",
            markdown_table(
                ["model", "batch", "reps", "plain ms", "1-device mesh ms", "ratio", "within"],
                [
                    [
                        o["model"],
                        o["batch"],
                        o["reps"],
                        o["plain"]["median_ms"],
                        o["mesh1"]["median_ms"],
                        f"{o['ratio']:.3f}",
                        "yes" if o["within_target"] else "no",
                    ]
                    for o in payload["overhead"]
                ],
            ),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from fnlayers.bench.cli import main

    sys.exit(main(["scale", *sys.argv[1:]]))
