"""``fnlayers-bench``: command-line entry point of the benchmark suites.

fnlayers-bench conv [--quick] [--out results.json] [--cases a,b] [--impls im2col,xla]
                    [--no-torch] [--torch-threads N] [--reps N] [--floor]
                    [--dtype float32|bfloat16|float16]
fnlayers-bench train [--quick | --tiny] [--out results.json] [--models a,b]
                     [--frameworks fnlayers,fnlayers-xla,flax,torch] [--batch NAME=N]
                     [--no-memory | --memory] [--torch-threads N] [--reps N]
                     [--dtype float32|bfloat16|float16]
fnlayers-bench scale [--quick | --tiny] [--out results.json] [--devices 1,2,4] [--models a,b]
                     [--batch NAME=N] [--global-batch NAME=N] [--reps N] [--no-overhead]

On a CPU where JAX sees fewer devices than ``scale --devices`` asks for, and ``XLA_FLAGS`` does
not force a host device count, ``scale`` reruns itself in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=<largest count>`` (host devices share the
machine's cores: such runs measure overhead, not speedup).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

from fnlayers.bench._harness import DTYPES

__all__ = ["main"]


def _default_out(suite: str, quick: bool, dtype: str | None = None) -> str:
    import jax

    # Named by date and device, like every file in benchmarks/results/, and by dtype where
    # the suite takes one.
    now = datetime.datetime.now()
    tag = ("" if dtype is None else f"-{dtype}") + ("-quick" if quick else "")
    platform = jax.devices()[0].platform
    return f"benchmarks/results/{now:%Y-%m-%d}-{platform}-{suite}{tag}-{now:%H%M%S}.json"


def _conv(args) -> int:
    from fnlayers.bench import conv

    pool = conv.CASES + conv.TINY_CASES
    if args.tiny:
        cases = conv.TINY_CASES
    elif args.cases:
        names = args.cases.split(",")
        unknown = [n for n in names if n not in {c.name for c in pool}]
        if unknown:
            print(f"unknown case(s) {unknown}; known: {[c.name for c in pool]}", file=sys.stderr)
            return 2
        cases = [c for n in names for c in pool if c.name == n]
    else:
        cases = conv.CASES
    quick = args.quick or args.tiny
    out = None if args.no_out else (args.out or _default_out("conv", quick, args.dtype))
    conv.run(
        quick=args.quick or args.tiny,
        cases=cases,
        impls=tuple(args.impls.split(",")),
        modes=tuple(args.modes.split(",")),
        torch=not args.no_torch,
        torch_threads=args.torch_threads,
        reps=args.reps,
        gemm_n=256 if args.tiny else None,
        floor=args.floor,
        dtype=args.dtype,
        out=out,
    )
    return 0


def _train(args) -> int:
    import dataclasses

    from fnlayers.bench import train

    if args.tiny:
        models = train.TINY_MODELS
    elif args.models:
        names = args.models.split(",")
        known = {m.name: m for m in train.MODELS}
        unknown = [n for n in names if n not in known]
        if unknown:
            print(f"unknown model(s) {unknown}; known: {list(known)}", file=sys.stderr)
            return 2
        models = [known[n] for n in names]
    else:
        models = train.QUICK_MODELS if args.quick else train.MODELS
    for spec in args.batch or []:
        name, _, value = spec.partition("=")
        models = [dataclasses.replace(m, batch=int(value)) if m.name == name else m for m in models]
    frameworks = tuple(args.frameworks.split(","))
    unknown = [f for f in frameworks if f not in train.FRAMEWORKS]
    if unknown:
        print(f"unknown framework(s) {unknown}; known: {train.FRAMEWORKS}", file=sys.stderr)
        return 2
    quick = args.quick or args.tiny
    out = None if args.no_out else (args.out or _default_out("train", quick, args.dtype))
    train.run(
        quick=quick,
        models=models,
        frameworks=frameworks,
        torch_threads=args.torch_threads,
        reps=args.reps,
        memory=args.memory,
        dtype=args.dtype,
        gemm_n=256 if args.tiny else None,
        out=out,
    )
    return 0


def _scale(args) -> int:
    import dataclasses

    from fnlayers.bench import scale

    try:
        devices = [int(k) for k in args.devices.split(",")] if args.devices else None
    except ValueError:
        print(f"--devices {args.devices!r}: expected counts like 1,2,4", file=sys.stderr)
        return 2
    if devices is not None and min(devices) < 1:
        print(f"--devices {args.devices!r}: counts must be >= 1", file=sys.stderr)
        return 2
    if args.tiny:
        models = list(scale.TINY_MODELS)
    elif args.models:
        names = args.models.split(",")
        known = {m.name: m for m in scale.KNOWN}
        unknown = [n for n in names if n not in known]
        if unknown:
            print(f"unknown model(s) {unknown}; known: {list(known)}", file=sys.stderr)
            return 2
        models = [known[n] for n in names]
        if args.quick:  # the quick suite's small batch
            models = [dataclasses.replace(m, batch=scale.QUICK_MODELS[0].batch) for m in models]
    else:
        models = list(scale.QUICK_MODELS if args.quick else scale.MODELS)
    for field, specs in (("batch", args.batch), ("global_batch", args.global_batch)):
        for spec in specs or []:
            name, _, value = spec.partition("=")
            models = [
                dataclasses.replace(m, **{field: int(value)}) if m.name == name else m
                for m in models
            ]
    rerun = _rerun_with_host_devices(args.argv, max(devices) if devices else 4)
    if rerun is not None:
        return rerun
    quick = args.quick or args.tiny
    out = None if args.no_out else (args.out or _default_out("scale", quick))
    scale.run(
        quick=quick,
        models=models,
        devices=devices,
        reps=args.reps,
        overhead=not args.no_overhead,
        out=out,
    )
    return 0


def _rerun_with_host_devices(argv, wanted: int) -> int | None:
    """On a CPU with fewer than ``wanted`` devices and no forced host device count in
    ``XLA_FLAGS``: runs ``argv`` again in a subprocess whose ``XLA_FLAGS`` forces ``wanted``
    host devices (JAX fixes its device count when its backend starts, so this process cannot
    change it) and returns its exit status; else None."""
    import jax

    from fnlayers.bench.scale import FORCE_FLAG

    flags = os.environ.get("XLA_FLAGS", "")
    if jax.devices()[0].platform != "cpu" or jax.device_count() >= wanted or FORCE_FLAG in flags:
        return None
    env = dict(os.environ, XLA_FLAGS=f"{flags} {FORCE_FLAG}={wanted}".strip())
    print(
        f"JAX sees {jax.device_count()} CPU device(s); running again with "
        f"XLA_FLAGS={env['XLA_FLAGS']!r} ({wanted} host devices sharing {os.cpu_count()} cores)",
        flush=True,
    )
    cmd = [sys.executable, "-m", "fnlayers.bench.cli", *argv]
    return subprocess.run(cmd, env=env, check=False).returncode


def _dtype_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help=f"{what}; TFLOP/s are compared with a matrix product measured in it (default float32)",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fnlayers-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="suite", required=True)
    c = sub.add_parser("conv", help="conv2d forward and forward+backward per layer shape")
    c.add_argument("--quick", action="store_true", help="3 repetitions, small GEMM: < 1 minute")
    c.add_argument("--tiny", action="store_true", help="tiny shapes, 1-2 s: a smoke test")
    c.add_argument("--out", help="JSON path (a .md table is written beside it)")
    c.add_argument("--no-out", action="store_true", help="print only, write no files")
    c.add_argument("--cases", help="comma-separated case names (default: all six layers)")
    c.add_argument("--impls", default="im2col,xla", help="fnlayers impls to time")
    c.add_argument("--modes", default="fwd,fwd+bwd")
    c.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    c.add_argument(
        "--torch-threads", type=int, help="PyTorch threads (default: best of all cores and 1)"
    )
    c.add_argument("--reps", type=int, help="timed repetitions per case")
    c.add_argument(
        "--floor",
        action="store_true",
        help="also time the matrix products alone (jnp and torch.matmul) at im2col's blocks",
    )
    _dtype_argument(c, "the input's and the weight's dtype (the products accumulate in float32)")
    c.set_defaults(func=_conv)

    t = sub.add_parser("train", help="images/s of a full train step: fnlayers vs Flax vs PyTorch")
    t.add_argument("--quick", action="store_true", help="LeNet + CIFAR10-quick, 3 reps: < 1 min")
    t.add_argument("--tiny", action="store_true", help="batch 2, a few seconds: a smoke test")
    t.add_argument("--out", help="JSON path (a .md table is written beside it)")
    t.add_argument("--no-out", action="store_true", help="print only, write no files")
    t.add_argument("--models", help="comma-separated: lenet,cifar10_quick,alexnet")
    t.add_argument("--batch", action="append", help="NAME=N, e.g. alexnet=32 (repeatable)")
    t.add_argument(
        "--frameworks",
        default="fnlayers,fnlayers-xla,flax,torch",
        help="fnlayers (im2col), fnlayers-xla, flax, torch (skipped when not importable)",
    )
    m = t.add_mutually_exclusive_group()
    m.add_argument(
        "--memory", action="store_true", default=None, help="peak-memory probes (default: full)"
    )
    m.add_argument("--no-memory", dest="memory", action="store_false", help="no memory probes")
    t.add_argument(
        "--torch-threads", type=int, help="PyTorch threads (default: best of all cores and 1)"
    )
    t.add_argument("--reps", type=int, help="timed steps per case")
    _dtype_argument(t, "the compute dtype of every framework's step (parameters stay float32)")
    t.set_defaults(func=_train)

    s = sub.add_parser(
        "scale", help="images/s of the data-parallel train step on 1, 2, 4, ... devices"
    )
    s.add_argument(
        "--quick", action="store_true", help="CIFAR10-quick only, batch 16/device, 3 reps"
    )
    s.add_argument("--tiny", action="store_true", help="LeNet, batch 2/device: a smoke test")
    s.add_argument("--out", help="JSON path (a .md table is written beside it)")
    s.add_argument("--no-out", action="store_true", help="print only, write no files")
    s.add_argument(
        "--devices",
        help="comma-separated device counts (default: 1,2,4,... up to the devices JAX sees; "
        "1,2,4 on a CPU with one device)",
    )
    s.add_argument("--models", help="comma-separated: cifar10_quick,alexnet (or lenet)")
    s.add_argument(
        "--batch", action="append", help="NAME=N: per-device batch of weak scaling (repeatable)"
    )
    s.add_argument(
        "--global-batch",
        action="append",
        help="NAME=N: global batch of strong scaling (default: batch x the largest count)",
    )
    s.add_argument("--reps", type=int, help="timed steps per case")
    s.add_argument(
        "--no-overhead", action="store_true", help="skip the 1-device mesh vs plain step timing"
    )
    s.set_defaults(func=_scale)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
