"""Cold compile time of AlexNet's train step on the CPU: fnlayers im2col, fnlayers impl="xla"
and Flax, plus one-layer forward+backward steps at AlexNet's conv1..conv5 shapes.

Every measurement runs in a fresh process (XLA's compilation caches live in the process; no
persistent cache is enabled), the configurations alternate within each repetition, and the
tables give medians over the repetitions. For each compile: ``jax.jit(f).lower(...)`` time,
``.compile()`` time, and counts from the optimized HLO (``compiled.as_text()``): fusion
instructions (each is one generated kernel), instructions in the non-fused computations (the
entry, loop bodies and branches: what the runtime executes), and ENTRY instructions. The
whole-step children also time the step (median of steps after two warm-up steps), and the
one-layer children time forward+backward (median of 10 calls after two), so a change that trades
compile time for run time shows in the same run. ``cpu s`` is the process's CPU time over lowering
and compiling (XLA compiles kernels on several threads): less disturbed than the wall time when
other work shares the cores.

``--base DIR`` adds the fnlayers configurations once more with the package imported from DIR
(a checkout of an earlier commit, e.g. ``git worktree add /tmp/base HEAD~1``), alternating with
the others in every repetition, so a change is measured against its baseline in the same run.

Run with the interpreter that has Flax (the results of 2026-12-01 used /tmp/benchvenv):

    PYTHONPATH=. /tmp/benchvenv/bin/python benchmarks/compile_time.py [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

STEP_CONFIGS = ("fnlayers", "fnlayers-xla", "flax")
# AlexNet's convolutions at batch 16: input shape, (KH, KW, C_in/groups, C_out), stride,
# padding, groups. conv1 needs no input gradient in the network, so its step has none.
LAYERS = {
    "conv1": ((16, 227, 227, 3), (11, 11, 3, 96), 4, 0, 1),
    "conv2": ((16, 27, 27, 96), (5, 5, 48, 256), 1, 2, 2),
    "conv3": ((16, 13, 13, 256), (3, 3, 256, 384), 1, 1, 1),
    "conv4": ((16, 13, 13, 384), (3, 3, 192, 384), 1, 1, 2),
    "conv5": ((16, 13, 13, 384), (3, 3, 192, 256), 1, 1, 2),
}
LAYER_IMPLS = ("im2col", "xla")


def hlo_counts(text: str) -> dict:
    """Counts in an optimized HLO module's text (see the module docstring)."""
    fusions = 0
    executed = 0
    entry = 0
    in_fused = False
    in_entry = False
    for line in text.splitlines():
        s = line.strip()
        if s.endswith("{") and ("(" in s or s.startswith("ENTRY")):
            name = s.split()[1] if s.startswith("ENTRY") else s.split()[0]
            in_fused = "fused" in name or name.lstrip("%").startswith("fusion")
            in_entry = s.startswith("ENTRY")
            continue
        if s == "}":
            in_fused = in_entry = False
            continue
        if " = " not in s or in_fused:
            continue
        executed += 1
        entry += in_entry
        if re.search(r"\bfusion\(", s):
            fusions += 1
    return {"fusions": fusions, "executed_instructions": executed, "entry_instructions": entry}


def _time_compile(jitted, *args) -> dict:
    import jax

    jax.block_until_ready(args)
    c0 = time.process_time()
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
    out["cpu_s"] = time.process_time() - c0
    out.update(hlo_counts(compiled.as_text()))
    return out, compiled


def child_step(framework: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from fnlayers.bench import train

    if framework == "flax":
        import flax.linen  # noqa: F401  (imported before the clock, as fnlayers is)
    case = next(c for c in train.MODELS if c.name == "alexnet")
    step, state = train._build_jax(framework, case)
    x, y = (jnp.asarray(a) for a in train._data(case))
    out, compiled = _time_compile(step, state, x, y)
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, x, y)
        jax.block_until_ready((state, metrics))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    out["step_ms"] = 1e3 * statistics.median(times)
    return out


def child_layer(layer: str, impl: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fnlayers as fl

    x_shape, w_shape, stride, pad, groups = LAYERS[layer]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(0.01 * rng.standard_normal(w_shape, np.float32))
    b = jnp.zeros(w_shape[-1], jnp.float32)
    argnums = (1, 2) if layer == "conv1" else (0, 1, 2)

    def loss(x, w, b):
        y = fl.conv.conv2d(x, w, b, stride=stride, padding=pad, groups=groups, impl=impl)
        return jnp.sum(y * y)

    out, compiled = _time_compile(jax.jit(jax.grad(loss, argnums=argnums)), x, w, b)
    times = []
    for i in range(12):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, w, b))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    out["run_ms"] = 1e3 * statistics.median(times)
    return out


BASE = "@base"  # suffix of a configuration run with the package from --base


def _run_child(spec: list[str], base: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    if any(a.endswith(BASE) for a in spec):
        env["PYTHONPATH"] = os.pathsep.join([base, env.get("PYTHONPATH", "")])
        spec = [a.removesuffix(BASE) for a in spec]
    r = subprocess.run(
        [sys.executable, __file__, "--child", *spec],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per step child")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--label", default="", help="a note on the code measured")
    ap.add_argument("--base", help="a checkout whose fnlayers is measured alongside (see above)")
    ap.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(__file__), "results", "2026-12-01-cpu-compile-time.md"
        ),
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        res = child_step(rest[0], args.steps) if kind == "step" else child_layer(*rest)
        print(json.dumps(res))
        return 0

    step_configs, layer_impls = STEP_CONFIGS, LAYER_IMPLS
    if args.base:
        step_configs = ("fnlayers" + BASE, *step_configs)
        layer_impls = ("im2col" + BASE, *layer_impls)
    specs = [["step", f] for f in step_configs]
    if not args.no_layers:
        specs += [["layer", ly, impl] for ly in LAYERS for impl in layer_impls]
    results: dict[str, list[dict]] = {" ".join(s): [] for s in specs}
    for rep in range(args.reps):
        # Alternate: each repetition runs every configuration once, in a rotated order.
        order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
        for s in order:
            r = _run_child([*s, "--steps", str(args.steps)] if s[0] == "step" else s, args.base)
            results[" ".join(s)].append(r)
            print(rep, " ".join(s), json.dumps(r), file=sys.stderr, flush=True)

    import jax

    lines = [
        "# CPU compile time: AlexNet train step (batch 16) and its convolutions",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"`{' '.join(['python', 'benchmarks/compile_time.py', *sys.argv[1:]])}`; "
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores. {args.label}"
        + (f" `{BASE}`: the package from `{args.base}`." if args.base else ""),
        "",
        f"Each cell: median of {args.reps} fresh processes, configurations alternating. lower: "
        "`jit(f).lower(...)`; compile: `.compile()`; fusions: fusion instructions in the "
        "optimized HLO (one generated kernel each); executed: instructions outside fused "
        "computations; entry: ENTRY instructions.",
        "",
        "| step | lower s | compile s | total s | vs flax | cpu s | cpu vs flax | fusions "
        "| executed | entry | step ms | step vs flax |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    flax = results["step flax"]
    for f in step_configs:
        rows = results[f"step {f}"]
        lines.append(
            f"| {f} | {_median(rows, 'lower_s'):.2f} | {_median(rows, 'compile_s'):.2f} | "
            f"{_median(rows, 'total_s'):.2f} | "
            f"{_median(rows, 'total_s') / _median(flax, 'total_s'):.2f}x | "
            f"{_median(rows, 'cpu_s'):.2f} | "
            f"{_median(rows, 'cpu_s') / _median(flax, 'cpu_s'):.2f}x | "
            f"{_median(rows, 'fusions'):.0f} | {_median(rows, 'executed_instructions'):.0f} | "
            f"{_median(rows, 'entry_instructions'):.0f} | {_median(rows, 'step_ms'):.0f} | "
            f"{_median(rows, 'step_ms') / _median(flax, 'step_ms'):.2f}x |"
        )
    lines += [
        "",
        "Per repetition (total s): "
        + "; ".join(
            f"{f} " + ", ".join(f"{r['total_s']:.2f}" for r in results[f"step {f}"])
            for f in step_configs
        ),
    ]
    if not args.no_layers:
        lines += [
            "",
            "One layer, `jit(grad(sum(conv2d(x, w, b)**2)))` at AlexNet's shapes (conv1: "
            "gradients of w and b only, as in the network):",
            "",
            "| layer | impl | lower s | compile s | cpu s | fusions | executed | fwd+bwd ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for ly in LAYERS:
            for impl in layer_impls:
                rows = results[f"layer {ly} {impl}"]
                lines.append(
                    f"| {ly} | {impl} | {_median(rows, 'lower_s'):.2f} | "
                    f"{_median(rows, 'compile_s'):.2f} | {_median(rows, 'cpu_s'):.2f} | "
                    f"{_median(rows, 'fusions'):.0f} | "
                    f"{_median(rows, 'executed_instructions'):.0f} | "
                    f"{_median(rows, 'run_ms'):.1f} |"
                )
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"argv": sys.argv[1:], "label": args.label, "results": results}, fh, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
