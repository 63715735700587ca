"""Per-op error of bfloat16 and float16 against float32: ``python benchmarks/precision_errors.py``.

Every public op (:data:`CASES`: the convolution paths, deconvolution, the poolings, LRN, batch
norm, the activations, dropout, dense, the Caffe tensor ops that compute, and the losses) runs on
the same inputs in float32 and in a lower precision, forward and backward (a ``jax.vjp`` with
one random cotangent, the same values in both). The error of an output or a gradient is
normwise: ``max|low - f32| / max|f32|`` over its elements (0 when both are all zero), the
largest over the op's outputs, and over its floating inputs for the backward pass.

Two references:

* *op*: the inputs are first rounded to bfloat16 (which float16 holds exactly, once values
  under ``2**-14`` are flushed to zero) and the float32 run sees those same values, so the error
  is the op's own arithmetic (its float32 accumulation and the rounding of its results);
* *end to end*: the float32 run sees the original float32 inputs, so the error also holds the
  rounding of the inputs, as a user switching a model to a low precision sees it.

The report is a Markdown table per dtype, written to ``--out`` (and printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fnlayers as fl
from fnlayers import tensor_ops
from fnlayers.bench._harness import environment, markdown_table

__all__ = [
    "CASES",
    "LOW_DTYPES",
    "OpCase",
    "main",
    "op_errors",
    "relative_error",
    "replace_block",
    "report",
    "summary",
]

#: The precisions measured against float32.
LOW_DTYPES = (jnp.bfloat16, jnp.float16)

_KEY = jax.random.key(7)
_OPS_PER_PROGRAM = 8


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op on fixed shapes.

    Attributes:
      name: the row's name.
      fn: ``fn(*inputs) -> output`` (an array, a scalar or a tuple); its non-floating arguments
        (labels, keys, configuration) are closed over.
      inputs: ``inputs(rng) -> tuple of float32 arrays``, the floating inputs, differentiated.
      tensor_op: whether the op is one of :mod:`fnlayers.tensor_ops` (Caffe's catalogue).
    """

    name: str
    fn: Callable[..., Any]
    inputs: Callable[[np.random.Generator], tuple[np.ndarray, ...]]
    tensor_op: bool = False


def _tensor_op(name, fn, inputs):
    return OpCase(name, fn, inputs, tensor_op=True)


def _normal(*shapes, scale=1.0, positive=False):
    def make(rng):
        arrays = [scale * rng.standard_normal(s).astype(np.float32) for s in shapes]
        return tuple(np.abs(a) if positive else a for a in arrays)

    return make


def _conv(**cfg):
    return lambda x, w, b: fl.conv2d(x, w, b, **cfg)


def _bn_train(x):
    return fl.batch_norm(x, fl.batch_norm_state(x.shape[-1]), train=True)[0]


def _bn_eval(x):
    c = x.shape[-1]
    state = {
        "mean_acc": jnp.linspace(-1.0, 1.0, c) * 3,
        "var_acc": jnp.linspace(0.5, 2.0, c) * 3,
        "scale_factor": jnp.full((1,), 3.0),
    }
    return fl.batch_norm(x, state, train=False)[0]


_LABELS = np.random.default_rng(1).integers(0, 10, 16).astype(np.int32)
_SIMILAR = np.random.default_rng(2).integers(0, 2, 16).astype(np.int32)


def _targets(rng):
    logits = 2 * rng.standard_normal((16, 10)).astype(np.float32)
    return logits, rng.uniform(0, 1, (16, 10)).astype(np.float32)


#: The ops measured: every public op that computes (plumbing such as flatten or crop only
#: moves elements, exactly).
CASES: tuple[OpCase, ...] = (
    OpCase("conv2d 3x3 pad 1", _conv(padding=1), _normal((2, 9, 9, 8), (3, 3, 8, 6), (6,))),
    OpCase(
        "conv2d 3x3 stride 2",
        _conv(stride=2, padding=1),
        _normal((2, 9, 9, 8), (3, 3, 8, 6), (6,)),
    ),
    OpCase(
        "conv2d groups 2 dilation 2",
        _conv(groups=2, dilation=2, padding=2),
        _normal((2, 9, 9, 8), (3, 3, 4, 6), (6,)),
    ),
    OpCase(
        "conv2d 2x2 stride 2 (space to depth)",
        _conv(stride=2),
        _normal((2, 8, 8, 8), (2, 2, 8, 6), (6,)),
    ),
    OpCase("conv2d 5x5 (two-stage im2col)", _conv(), _normal((2, 9, 9, 2), (5, 5, 2, 6), (6,))),
    OpCase(
        "conv2d impl=xla", _conv(padding=1, impl="xla"), _normal((2, 9, 9, 8), (3, 3, 8, 6), (6,))
    ),
    OpCase(
        "conv_transpose2d stride 2",
        lambda x, w, b: fl.conv_transpose2d(x, w, b, stride=2, padding=1),
        _normal((2, 5, 5, 8), (4, 4, 6, 8), (6,)),
    ),
    OpCase("max_pool 3/2", lambda x: fl.max_pool(x, 3, stride=2), _normal((2, 9, 9, 4))),
    OpCase(
        "avg_pool 3/2 pad 1",
        lambda x: fl.avg_pool(x, 3, stride=2, padding=1),
        _normal((2, 9, 9, 4)),
    ),
    OpCase("global_avg_pool", fl.global_avg_pool, _normal((2, 6, 6, 4))),
    OpCase("global_max_pool", fl.global_max_pool, _normal((2, 6, 6, 4))),
    OpCase(
        "stochastic_pool (test)",
        lambda x: fl.stochastic_pool(x, 3, stride=2),
        _normal((2, 9, 9, 4), positive=True),
    ),
    OpCase(
        "stochastic_pool (train)",
        lambda x: fl.stochastic_pool(x, 3, stride=2, key=_KEY, train=True),
        _normal((2, 9, 9, 4), positive=True),
    ),
    OpCase("lrn across channels", lambda x: fl.lrn(x, alpha=1e-1), _normal((2, 5, 5, 8))),
    OpCase(
        "lrn within channel",
        lambda x: fl.lrn(x, size=3, alpha=1e-1, region="within_channel"),
        _normal((2, 6, 6, 4)),
    ),
    OpCase("batch_norm (train)", _bn_train, _normal((8, 4, 4, 6), scale=3.0)),
    OpCase("batch_norm (eval)", _bn_eval, _normal((8, 4, 4, 6), scale=3.0)),
    OpCase("relu", fl.relu, _normal((4, 64))),
    OpCase("relu leaky 0.1", lambda x: fl.relu(x, 0.1), _normal((4, 64))),
    OpCase("prelu", fl.prelu, _normal((4, 6, 6, 8), (8,), scale=0.5)),
    OpCase("elu", fl.elu, _normal((4, 64))),
    OpCase("sigmoid", fl.sigmoid, _normal((4, 64), scale=3.0)),
    OpCase("tanh", fl.tanh, _normal((4, 64), scale=2.0)),
    OpCase("maxout 2", lambda x: fl.maxout(x, 2), _normal((4, 64))),
    OpCase("dropout 0.5", lambda x: fl.dropout(x, 0.5, key=_KEY, train=True), _normal((4, 64))),
    OpCase("dense", fl.dense, _normal((8, 3, 3, 16), (144, 10), (10,))),
    _tensor_op(
        "tensor_ops.inner_product", tensor_ops.inner_product, _normal((8, 48), (10, 48), (10,))
    ),
    _tensor_op("tensor_ops.softmax", tensor_ops.softmax, _normal((8, 10), scale=3.0)),
    _tensor_op("tensor_ops.scale (with bias)", tensor_ops.scale, _normal((4, 5, 5, 6), (6,), (6,))),
    _tensor_op("tensor_ops.bias", tensor_ops.bias, _normal((4, 5, 5, 6), (6,))),
    _tensor_op(
        "tensor_ops.power 2, scale 0.5",
        lambda x: tensor_ops.power(x, 2.0, 0.5, 1.0),
        _normal((4, 64)),
    ),
    _tensor_op("tensor_ops.bnll", tensor_ops.bnll, _normal((4, 64), scale=2.0)),
    _tensor_op("tensor_ops.exp", tensor_ops.exp, _normal((4, 64))),
    _tensor_op("tensor_ops.log", tensor_ops.log, _normal((4, 64), positive=True)),
    _tensor_op("tensor_ops.absval", tensor_ops.absval, _normal((4, 64))),
    OpCase(
        "softmax_cross_entropy",
        lambda z: fl.softmax_cross_entropy(z, _LABELS),
        _normal((16, 10), scale=3.0),
    ),
    OpCase("sigmoid_cross_entropy", fl.sigmoid_cross_entropy, _targets),
    OpCase("euclidean", fl.euclidean, _normal((16, 10), (16, 10))),
    OpCase(
        "contrastive",
        lambda a, b: fl.contrastive(a, b, _SIMILAR, margin=4.0),
        _normal((16, 10), (16, 10), scale=0.5),
    ),
)


def relative_error(value, reference) -> float:
    """``max|value - reference| / max|reference|``, in float64 (0 when both are all zero; inf
    when only the reference is)."""
    v = np.asarray(jnp.asarray(value, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(reference, jnp.float32), np.float64)
    err, size = float(np.max(np.abs(v - r), initial=0.0)), float(np.max(np.abs(r), initial=0.0))
    if size == 0:
        return 0.0 if err == 0 else float("inf")
    return err / size


def op_errors(dtypes=LOW_DTYPES, *, rounded_inputs: bool = True, seed: int = 0, cases=CASES):
    """``{dtype name: {case name: (forward error, backward error)}}`` of every case in each of
    ``dtypes`` against float32 (module docstring), on inputs drawn from ``seed``.

    With ``rounded_inputs`` the inputs are rounded to the coarsest of ``dtypes`` (values under
    float16's smallest normal, ``2**-14``, flushed to zero), so that every dtype holds them
    exactly and one float32 run is the reference of all. The cases run jit-compiled, a few ops
    side by side (forward and ``vjp``) per program.
    """
    rng = np.random.default_rng(seed)
    inputs = [case.inputs(rng) for case in cases]
    if rounded_inputs:
        coarsest = min(dtypes, key=lambda d: jnp.finfo(d).nmant)
        inputs = [[_representable(x, coarsest) for x in xs] for xs in inputs]
    lows = {jnp.dtype(d).name: [[jnp.asarray(x, d) for x in xs] for xs in inputs] for d in dtypes}
    ref_in = [[jnp.asarray(x, jnp.float32) for x in xs] for xs in inputs]
    fns = tuple(c.fn for c in cases)
    shapes = jax.eval_shape(functools.partial(_forward, fns), ref_in)
    # One cotangent per output (a loss's scalar gets 1), rounded like the inputs.
    cotangents = jax.tree.map(
        lambda o: _representable(rng.standard_normal(o.shape) if o.shape else 1.0, jnp.bfloat16),
        shapes,
    )
    lows["float32"] = ref_in
    results = {name: ([], []) for name in lows}
    # Eight ops per compiled program: XLA compiles a few mid-sized programs faster than one per
    # op, and much faster than one for every op.
    for lo in range(0, len(cases), _OPS_PER_PROGRAM):
        part = slice(lo, lo + _OPS_PER_PROGRAM)
        run = jax.jit(functools.partial(_forward_backward, fns[part]))
        for name, xs in lows.items():
            outs, grads = run(xs[part], cotangents[part])
            results[name][0].extend(outs)
            results[name][1].extend(grads)
    ref_out, ref_grads = results.pop("float32")
    return {
        name: {
            case.name: (_worst(out[i], ref_out[i]), _worst(grads[i], ref_grads[i]))
            for i, case in enumerate(cases)
        }
        for name, (out, grads) in results.items()
    }


def _representable(x, dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float32, tiny values flushed to zero."""
    x = np.asarray(np.asarray(x, np.float32).astype(dtype), np.float32)
    return np.where(np.abs(x) < 2.0**-14, np.float32(0), x)


def _forward(fns, inputs):
    return [fn(*xs) for fn, xs in zip(fns, inputs, strict=True)]


def _forward_backward(fns, inputs, cotangents):
    """``(outputs, input gradients)`` of every op on its inputs, for its cotangent."""
    outs, grads = [], []
    for fn, xs, ct in zip(fns, inputs, cotangents, strict=True):
        out, vjp = jax.vjp(fn, *xs)
        outs.append(out)
        grads.append(vjp(jax.tree.map(lambda c, o: jnp.asarray(c, o.dtype), ct, out)))
    return outs, grads


def main(argv: Sequence[str] | None = None) -> int:
    """Measures every case in every low precision; prints the Markdown report, writes it to
    ``--out`` and its summary into the ``precision_errors`` block of ``--docs``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the Markdown report there")
    parser.add_argument("--docs", help="a Markdown file whose precision_errors block to rewrite")
    args = parser.parse_args(argv)
    errors = {
        "op": op_errors(LOW_DTYPES, rounded_inputs=True),
        "end to end": op_errors(LOW_DTYPES, rounded_inputs=False),
    }
    text = report(errors, environment())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.docs:
        link = args.out and os.path.relpath(args.out, os.path.dirname(os.path.abspath(args.docs)))
        replace_block(args.docs, "precision_errors", summary(errors, link))
    return 0


def report(errors, env) -> str:
    """The Markdown report of ``{"op": op_errors(...), "end to end": op_errors(...)}``: the
    environment, then one table per low precision."""
    lines = [
        "# Per-op error of bfloat16 and float16 against float32",
        "",
        f"Written by `python benchmarks/precision_errors.py` (fnlayers/bench/precision.py) on "
        f"{env['device']['platform']} ({env['device']['kind']}, {env['processor']}), jax "
        f"{env['jax']}, {env['date']}.",
        "",
        "Error: `max|low - float32| / max|float32|` over the elements of an output (forward) or "
        "of the gradient of each floating input (backward; one random cotangent, the same values "
        "in both runs), the largest over the op's outputs or inputs. *op*: the float32 run sees "
        "the inputs rounded to bfloat16 (exact in float16 too, values under 2^-14 flushed to "
        "zero), so the error is the op's own arithmetic. *end to end*: the float32 run sees the "
        "float32 inputs, so the error also holds their rounding. For scale: the unit roundoff is "
        "2^-8 = 3.9e-3 for bfloat16 and 2^-11 = 4.9e-4 for float16. The `tensor_ops.*` rows "
        "are Caffe's catalogue ops (fnlayers.tensor_ops).",
        "",
    ]
    head = ["op", *(f"{d} ({ref})" for ref in errors for d in ("forward", "backward"))]
    for dtype in LOW_DTYPES:
        name = jnp.dtype(dtype).name
        rows = [
            [case.name, *(f"{e:.2e}" for ref in errors for e in errors[ref][name][case.name])]
            for case in CASES
        ]
        lines += [f"## {name}", "", markdown_table(head, rows), ""]
    return "\n".join(lines)


def summary(errors, link: str | None) -> str:
    """The docs' digest of the report: per dtype, the largest error over the ops of fnlayers
    (the layers' ops and the losses) and over Caffe's catalogue ops, with the op; ``link``: the
    report's path relative to the page."""
    rows = []
    for dtype in LOW_DTYPES:
        name = jnp.dtype(dtype).name
        for group, tensor_op in (("fnlayers ops", False), ("fnlayers.tensor_ops", True)):
            cells = [name, group]
            for ref in errors:
                for i in (0, 1):
                    by_op = {c.name: errors[ref][name][c.name][i] for c in CASES}
                    worst = max((c.name for c in CASES if c.tensor_op == tensor_op), key=by_op.get)
                    cells.append(f"{by_op[worst]:.1e} ({worst})")
            rows.append(cells)
    head = ["dtype", "ops", *(f"{d} ({ref})" for ref in errors for d in ("forward", "backward"))]
    where = f" Every op: [{os.path.basename(link)}]({link})." if link else ""
    return (
        "The largest error of any op (`max|low - float32| / max|float32|`; *op*: on inputs "
        "both precisions hold, *end to end*: from float32 inputs), written by "
        f"`python benchmarks/precision_errors.py`.{where}\n\n" + markdown_table(head, rows)
    )


def replace_block(path: str, name: str, text: str) -> None:
    """Rewrites the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in the file
    ``path`` (the generated numbers of a docs page)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(path) as f:
        page = f.read()
    if page.count(begin) != 1 or page.count(end) != 1:
        raise ValueError(f"{path} must hold {begin} and {end} once each")
    head, rest = page.split(begin)
    _, tail = rest.split(end)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")


def _worst(low, ref) -> float:
    pairs = zip(jax.tree.leaves(low), jax.tree.leaves(ref), strict=True)
    return max((relative_error(a, b) for a, b in pairs), default=0.0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
