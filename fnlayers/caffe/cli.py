"""The ``fnlayers`` command: Caffe's ``caffe`` tool (``train``, ``test``, ``time``) on JAX.

A Caffe project (solver and net prototxts, data in LMDB, HDF5 or image lists, caffemodels)
runs unchanged::

    fnlayers train --solver examples/mnist/lenet_solver.prototxt
    fnlayers test --model examples/mnist/lenet_train_test.prototxt \\
        --weights examples/mnist/lenet_iter_10000.caffemodel --iterations 100
    fnlayers time --model examples/mnist/lenet_train_test.prototxt --iterations 10

Flags are spelled as Caffe's gflags accept them: ``--solver X``, ``-solver X``,
``--solver=X`` and ``-solver=X`` are the same. Relative paths, in the flags and inside the
prototxts, are resolved from the current directory, as Caffe does. The device is whatever JAX
runs on (``--gpu`` is accepted and ignored, with a note).
"""

from __future__ import annotations

import argparse
import sys

import jax

__all__ = ["main"]

_VERBS = {
    "train": "train or finetune a model (Caffe's `caffe train`)",
    "test": "score a model over the TEST phase (Caffe's `caffe test`)",
    "time": "benchmark a model's layers, forward and backward (Caffe's `caffe time`)",
}


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 1
    if getattr(args, "gpu", None) is not None:
        print(
            f"note: --gpu {args.gpu} is ignored: fnlayers runs on JAX's default device "
            f"({jax.devices()[0].platform})",
            file=sys.stderr,
        )
    try:
        return {"train": _train, "test": _test, "time": _time}[args.verb](args)
    except (ValueError, OSError) as err:
        print(f"fnlayers {args.verb}: error: {err}", file=sys.stderr)
        return 1


def _train(args) -> int:
    from fnlayers.caffe.runner import run_train
    from fnlayers.caffe.solver import load_solver

    if args.solver is None:
        raise ValueError("train needs --solver")
    solver = load_solver(args.solver)
    if args.stage or args.level:
        raise ValueError(
            "train takes the stages and level from the solver's train_state/test_state, "
            "not --stage/--level (as Caffe)"
        )
    log = _logger()
    log(f"Using {jax.devices()[0].platform} device(s): {len(jax.devices())}")
    run_train(
        solver,
        weights=args.weights,
        snapshot=args.snapshot,
        iterations=args.iterations,
        log=log,
        progress=sys.stderr.isatty(),
    )
    return 0


def _test(args) -> int:
    from fnlayers.caffe.runner import run_test

    if args.model is None:
        raise ValueError("test needs --model")
    if args.weights is None:
        raise ValueError("test needs --weights (a .caffemodel to score)")
    run_test(
        args.model,
        args.weights,
        iterations=50 if args.iterations is None else args.iterations,
        stages=tuple(args.stage),
        level=args.level,
        log=_logger(),
    )
    return 0


def _time(args) -> int:
    from fnlayers.caffe.runner import _next_batches, open_net
    from fnlayers.caffe.timing import random_inputs, time_net

    if args.model is None:
        raise ValueError("time needs --model")
    net, sources = open_net(
        args.model, phase=args.phase, stages=tuple(args.stage), level=args.level,
        weights=args.weights,
    )  # fmt: skip
    if sources:
        x = _next_batches(sources, {name: 0 for name in sources}, 1)
    else:
        x = random_inputs(net)
    log = _logger()
    log(f"Timing {50 if args.iterations is None else args.iterations} iterations (medians)")
    time_net(
        net,
        x,
        iterations=50 if args.iterations is None else args.iterations,
        train=args.phase == "train",
        log=log,
    )
    return 0


def _logger():
    def log(line: str) -> None:
        print(line, flush=True)

    return log


def _flag(parser, name: str, **kw) -> None:
    """``--name`` and Caffe's ``-name`` spelling."""
    parser.add_argument(f"--{name}", f"-{name}", dest=name, **kw)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnlayers",
        description="Caffe's command line on JAX: train, test and time Caffe nets "
        "(solver and net prototxts, caffemodels, LMDB/HDF5/image-list data) unchanged.",
        epilog="Flags may be written --flag X, -flag X, --flag=X or -flag=X, as Caffe's.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="{train,test,time}")
    p = verbs.add_parser(
        "train",
        help=_VERBS["train"],
        description="Train as `caffe train`: logs `Iteration N, loss = L` every `display` "
        "iterations (the mean of the last `average_loss` losses) and the learning rate; at "
        "every `test_interval` (and iteration 0 with test_initialization) `Test net output "
        "#i: NAME = VALUE` for every TEST-net output; snapshots every `snapshot` iterations "
        "and after training as {snapshot_prefix}_iter_{N}.caffemodel (real Caffe loads it) "
        "and .solverstate (resume with --snapshot). Ctrl-C snapshots and stops.",
    )
    _flag(p, "solver", help="the solver prototxt (required)")
    _flag(p, "weights", help="a .caffemodel to start from (finetuning); layers matched by name")
    _flag(p, "snapshot", help="a .solverstate to resume from (exactly where it stopped)")
    _flag(p, "iterations", type=int, help="train to this iteration instead of max_iter")
    _common(p)
    p = verbs.add_parser(
        "test",
        help=_VERBS["test"],
        description="Score a model as `caffe test`: the TEST phase over --iterations batches, "
        "printing each batch's outputs (`Batch i, NAME = VALUE`), then the mean of each output "
        "blob (`NAME = VALUE`).",
    )
    _flag(p, "model", help="the net prototxt (required)")
    _flag(p, "weights", help="the .caffemodel to score (required)")
    _flag(p, "iterations", type=int, help="the number of batches (default 50)")
    _common(p)
    p = verbs.add_parser(
        "time",
        help=_VERBS["time"],
        description="Time a model as `caffe time`: per layer `NAME\\tforward: X ms.` and "
        "`NAME\\tbackward: Y ms.` (each layer compiled on its own: under jit XLA fuses layers, "
        "so a layer has no time of its own inside the net), then `Average Forward pass`, "
        "`Average Backward pass`, `Average Forward-Backward` (the whole net compiled as one "
        "program, as training runs it) and `Total Time`. Medians after compilation.",
    )
    _flag(p, "model", help="the net prototxt (required)")
    _flag(p, "weights", help="a .caffemodel (optional: times do not depend on the values)")
    _flag(p, "iterations", type=int, help="timed runs per measurement (default 50)")
    _flag(p, "phase", choices=("train", "test"), default="train", help="default train")
    _common(p)
    return parser


def _common(p) -> None:
    _flag(p, "stage", action="append", default=[], help="a NetState stage (repeatable)")
    _flag(p, "level", type=int, default=0, help="the NetState level (default 0)")
    _flag(p, "gpu", help="accepted for Caffe scripts; the device is JAX's default")


if __name__ == "__main__":
    raise SystemExit(main())
