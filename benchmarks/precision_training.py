"""Mixed-precision training on the digits: ``python benchmarks/precision_training.py [--epochs N]
[--out path.md] [--docs docs/mixed-precision.md]``.

Two experiments, LeNet (``fl.models.lenet``, Caffe's LeNet solver) on ``fl.data.load_digits(28)``:

1. float32, bfloat16 and float16 (dynamic loss scale) runs of ``fit`` from the same seed for
   the same epochs: test accuracy, test loss, skipped steps, throughput.
2. Gradient underflow: the loss multiplied by ``2**-16`` (the learning rate and weight decay
   rescaled so that float32 trains exactly as without the factor). The gradients of the first
   batch are measured (the fraction of entries that are exactly zero: float32, float16
   unscaled, float16 with the initial dynamic scale ``2**15``), then float32, float16 unscaled
   and float16 with a dynamic scale are trained.

Every run is evaluated once per epoch; a run that a non-finite loss stops reports where, with
its last evaluation. Without arguments the script writes
benchmarks/results/2026-12-01-cpu-precision-training.md and the summary in
docs/mixed-precision.md. It measures accuracy, not speed.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fnlayers as fl
from fnlayers import data, losses, models, optim, precision, schedules, train
from fnlayers.bench._harness import environment, markdown_table
from fnlayers.bench.precision import replace_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "2026-12-01-cpu-precision-training.md")
DOCS = os.path.join(ROOT, "docs", "mixed-precision.md")
FACTOR = 2.0**-16  # the underflow experiment's loss factor
BATCH = 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--docs", default=DOCS)
    args = parser.parse_args(argv)
    d = data.load_digits(28)
    comparison = [
        _run(d, args.epochs, name, dtype, scale)
        for name, dtype, scale in (
            ("float32", None, None),
            ("bfloat16", jnp.bfloat16, None),
            ("float16, dynamic loss scale", jnp.float16, "dynamic"),
        )
    ]
    zeros = _zero_fractions(d)
    underflow = [
        _run(d, args.epochs, name, dtype, scale, factor=FACTOR)
        for name, dtype, scale in (
            ("float32", None, None),
            ("float16, no loss scale", jnp.float16, None),
            ("float16, dynamic loss scale", jnp.float16, "dynamic"),
        )
    ]
    env = environment()
    steps = args.epochs * (len(d.x_train) // BATCH)
    text = _report(steps, args.epochs, comparison, zeros, underflow, env)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    link = os.path.relpath(args.out, os.path.dirname(os.path.abspath(args.docs)))
    summary = _summary(steps, args.epochs, comparison, zeros, underflow, link)
    replace_block(args.docs, "precision_training", summary)
    return 0


def _solver(model, factor):
    """Caffe's LeNet solver; with a loss factor f the rate is divided and the decay multiplied
    by f, so that float32 makes the same updates as without it."""
    lr_mult, decay_mult = fl.param_mults(model)
    return optim.sgd(
        schedules.inv(0.01 / factor, gamma=1e-4, power=0.75),
        momentum=0.9,
        weight_decay=5e-4 * factor,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )


def _loss(factor):
    if factor == 1.0:
        return losses.softmax_cross_entropy
    return lambda outputs, y: losses.softmax_cross_entropy(outputs, y) * factor


def _run(d, epochs, name, dtype, scale, *, factor=1.0):
    """One run of ``fit``, evaluated every epoch; a run stopped by a non-finite loss reports
    where, with its last evaluation."""
    model = models.lenet()
    stopped = None
    try:
        ts, history = train.fit(
            model,
            _loss(factor),
            _solver(model, factor),
            (d.x_train, d.y_train),
            batch_size=BATCH,
            epochs=epochs,
            seed=0,
            metrics={"accuracy": losses.accuracy},
            eval_data=(d.x_test, d.y_test),
            progress=False,
            compute_dtype=dtype,
            loss_scale=scale,
        )
    except train.NonFiniteLossError as err:
        ts, history, stopped = None, err.history, err.iteration
    tested = [r for r in history.records if "test_accuracy" in r]
    last = tested[-1] if tested else {}
    skipped = sum(int(r.get("skipped_steps", 0)) for r in history.records)
    return {
        "name": name,
        "stopped": stopped,
        "tested_at": last.get("iteration"),
        "test_accuracy": last.get("test_accuracy", float("nan")),
        "test_loss": last.get("test_loss", float("nan")) / factor,
        "skipped": skipped if scale == "dynamic" else None,
        "loss_scale": None if ts is None or ts.loss_scale is None else float(ts.loss_scale.scale),
    }


def _zero_fractions(d):
    """The fraction of exactly-zero entries in the gradient of the first batch of the
    underflow experiment (the loss times FACTOR): float32, float16 unscaled, float16 times the
    initial dynamic scale. The same computation as a train step's (fnlayers.train)."""
    model = models.lenet()
    _, params, state = model.init(jax.random.key(0), (-1, 28, 28, 1))
    x, y = jnp.asarray(d.x_train[:BATCH]), jnp.asarray(d.y_train[:BATCH])
    key = jax.random.key(1)
    rows = []
    for name, dtype, scale in (
        ("float32", jnp.float32, 1.0),
        ("float16, no loss scale", jnp.float16, 1.0),
        ("float16, scale 2^15", jnp.float16, precision.DynamicLossScale().init_scale),
    ):

        def loss(p, dtype=dtype, scale=scale):
            out, _ = model.apply(
                precision.cast_floating(p, dtype),
                state,
                precision.cast_floating(x, dtype),
                key=key,
                train=True,
            )
            return _loss(FACTOR)(out.astype(jnp.float32), y) * scale

        grads = jax.tree.map(lambda g, scale=scale: g / scale, jax.grad(loss)(params))
        leaves = [np.asarray(g).ravel() for g in jax.tree.leaves(grads)]
        flat = np.concatenate(leaves)
        per_layer = {
            path: float(np.mean(np.asarray(g) == 0)) for path, g in _layer_leaves(grads).items()
        }
        rows.append((name, float(np.mean(flat == 0)), per_layer, float(np.median(np.abs(flat)))))
    return rows


def _layer_leaves(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _report(steps, epochs, comparison, zeros, underflow, env) -> str:
    lines = [
        "# Mixed-precision training of LeNet on the digits",
        "",
        f"Written by `python benchmarks/precision_training.py` on {env['device']['platform']} "
        f"({env['device']['kind']}, {env['processor']}), jax {env['jax']}, {env['date']}.",
        "",
        _summary(steps, epochs, comparison, zeros, underflow, None),
        "",
        "## Zero gradient entries per parameter (the underflow experiment's first batch)",
        "",
    ]
    names = list(zeros[0][2])
    rows = [[name, *(f"{per[n]:.3f}" for n in names)] for name, _, per, _ in zeros]
    lines += [markdown_table(["run", *names], rows), ""]
    return "\n".join(lines)


def _summary(steps, epochs, comparison, zeros, underflow, link) -> str:
    head = [
        "run",
        "iterations",
        "test accuracy",
        "test loss",
        "skipped steps",
        "final loss scale",
    ]

    def table(runs):
        rows = [
            [
                r["name"],
                f"{steps}"
                if r["stopped"] is None
                else f"stopped at {r['stopped']}: non-finite loss (tested at {r['tested_at']})",
                f"{r['test_accuracy']:.4f}",
                f"{r['test_loss']:.4f}",
                "—" if r["skipped"] is None else str(r["skipped"]),
                "—" if r["loss_scale"] is None else f"2^{int(np.log2(r['loss_scale']))}",
            ]
            for r in runs
        ]
        return markdown_table(head, rows)

    zero_rows = [[name, f"{frac:.3f}", f"{med:.1e}"] for name, frac, _, med in zeros]
    where = f" Per-parameter numbers: [{os.path.basename(link)}]({link})." if link else ""
    return "\n".join(
        [
            f"LeNet on `fl.data.load_digits(28)` (1437 training and 360 test images), Caffe's "
            f"LeNet solver, batch {BATCH}, {epochs} epochs ({steps} iterations), seed 0, the "
            f"same for every run; written by `python benchmarks/precision_training.py`.{where}",
            "",
            "**Precisions compared.**",
            "",
            table(comparison),
            "",
            "**Gradient underflow.** The loss times 2^-16, the learning rate divided and the "
            "weight decay multiplied by it (float32 then makes the same updates as without "
            "it). The gradients of the first batch:",
            "",
            markdown_table(["run", "zero entries", "median abs gradient"], zero_rows),
            "",
            "Trained:",
            "",
            table(underflow),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
