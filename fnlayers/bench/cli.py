"""``fnlayers-bench``: command-line entry point of the benchmark suites.

fnlayers-bench conv [--quick] [--out results.json] [--cases a,b] [--impls im2col,xla]
                    [--no-torch] [--torch-threads N] [--reps N] [--floor]
fnlayers-bench train [--quick | --tiny] [--out results.json] [--models a,b]
                     [--frameworks fnlayers,fnlayers-xla,flax,torch] [--batch NAME=N]
                     [--no-memory | --memory] [--torch-threads N] [--reps N]
"""

from __future__ import annotations

import argparse
import datetime
import sys

__all__ = ["main"]


def _default_out(suite: str, quick: bool) -> str:
    import jax

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "-quick" if quick else ""
    return f"benchmarks/results/{suite}-{jax.devices()[0].platform}{tag}-{stamp}.json"


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
    out = None if args.no_out else (args.out or _default_out("conv", args.quick or args.tiny))
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
    out = None if args.no_out else (args.out or _default_out("train", quick))
    train.run(
        quick=quick,
        models=models,
        frameworks=frameworks,
        torch_threads=args.torch_threads,
        reps=args.reps,
        memory=args.memory,
        out=out,
    )
    return 0


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
    t.set_defaults(func=_train)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
