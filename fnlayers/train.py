"""Jit-compiled training: one train step, one eval step, and the ``fit`` loop.

A training run is a :class:`TrainState` pytree (params, state, opt_state, key) plus the data
position (iteration). :func:`make_train_step` builds one ``jax.jit`` function that donates the
train state's buffers, threads the PRNG key (split once per step) and returns the metrics;
:func:`fit` loops it over shuffled minibatches with a progress bar, periodic evaluation, a
history, atomic checkpoints, and exact resume.

Gradient health (:mod:`fnlayers.diagnostics`): ``make_train_step(..., grad_norms=True)`` adds
the per-layer gradient norms to the step's metrics, computed inside the same compiled step;
``fit(..., diagnostics_every=N)`` records them in the history, and every ``fit`` step also
returns which layers' gradients are finite (a few bits, read only when the loss is not), so a
:class:`NonFiniteLossError` names the layer whose gradient went non-finite first.

The batch order is a pure function of ``(seed, epoch)``: iteration ``i`` reads batch ``i %
steps_per_epoch`` of the permutation of epoch ``i // steps_per_epoch``. Together with the key
and the optimizer's iteration counter stored in the checkpoint, a run resumed from iteration
``k`` computes exactly what the uninterrupted run computed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from fnlayers import _plot
from fnlayers import checkpoint as _checkpoint
from fnlayers import data as _data
from fnlayers import diagnostics as _diagnostics
from fnlayers.layers import Layer, _abstract_init

__all__ = [
    "History",
    "NonFiniteLossError",
    "TrainState",
    "create_train_state",
    "evaluate",
    "fit",
    "make_eval_step",
    "make_train_step",
    "predict",
]

LossFn = Callable[[Any, Any], jax.Array]
MetricFn = Callable[[Any, Any], jax.Array]

#: Metric-name prefixes of the per-layer entries of :func:`make_train_step`.
GRAD_NORM = "grad_norm/"
GRAD_FINITE = "grad_finite/"


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree).

    Attributes:
      params: the model's parameters.
      state: the model's running state (batch norm statistics), ``{}``-leaved if none.
      opt_state: the optimizer's state, including its iteration counter.
      key: the PRNG key; every step splits it into the next key and the step's key.
    """

    params: Any
    state: Any
    opt_state: Any
    key: jax.Array


class NonFiniteLossError(RuntimeError):
    """Raised by :func:`fit` when the training loss becomes NaN or infinite.

    Attributes:
      iteration: the iteration whose loss was not finite.
      history: the :class:`History` up to that point.
      checkpoint: the path of the last good checkpoint, or None.
      layer: the layer whose gradient went non-finite first (the earliest iteration, and
        within it the layer the backward pass reached first: the one nearest the loss), or
        None when every gradient stayed finite.
      layer_iteration: the iteration at which ``layer``'s gradient went non-finite, or None.
    """

    def __init__(
        self, message, *, iteration, history, checkpoint, layer=None, layer_iteration=None
    ):
        super().__init__(message)
        self.iteration = iteration
        self.history = history
        self.checkpoint = checkpoint
        self.layer = layer
        self.layer_iteration = layer_iteration


def create_train_state(model: Layer, optimizer, in_shape, key) -> TrainState:
    """Initialises params, state and optimizer state for ``model`` on inputs of ``in_shape``.

    ``key`` is split: one part initialises the model, the other becomes the run's key.
    """
    k_init, k_run = jax.random.split(key)

    def init(k):
        _, params, state = model.init(k, in_shape)
        return params, state, optimizer.init(params)

    # One compiled program instead of one dispatch per initializer (seconds for a deep net);
    # the random bits are the same as an eager init's.
    params, state, opt_state = jax.jit(init)(k_init)
    return TrainState(params, state, opt_state, k_run)


def predict(model: Layer, params, state, x, *, batch_size: int = 256):
    """``model``'s outputs on ``x`` in evaluation mode (``train=False``), in batches.

    Args:
      x: ``(N, ...)`` array, or a tuple of such arrays for multi-input models.
      batch_size: examples per call of the jit-compiled forward pass.

    Returns:
      The outputs for all N examples, in order (a tuple of arrays for multi-output models).
    """
    n = _num_examples(x, (), "predict")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"predict: batch_size={batch_size!r} must be a positive int")
    forward = jax.jit(lambda p, s, xb: model.apply(p, s, xb, train=False)[0])
    outs = [
        forward(params, state, _take(x, np.arange(i, min(i + batch_size, n))))
        for i in range(0, n, batch_size)
    ]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def make_train_step(
    model: Layer,
    loss_fn: LossFn,
    optimizer,
    *,
    metrics: Mapping[str, MetricFn] | None = None,
    donate: bool = True,
    grad_norms: bool = False,
    grad_finite: bool = False,
):
    """Builds ``step(train_state, x, y) -> (train_state, metrics)``, one jit-compiled function.

    Args:
      model: the network; ``model.apply(params, state, x, key=k, train=True)``.
      loss_fn: ``loss_fn(outputs, y) -> scalar``, e.g. ``fl.losses.softmax_cross_entropy``.
      optimizer: an object with ``update(grads, opt_state, params) -> (params, opt_state)``
        (``fl.optim.sgd``); it may expose ``learning_rate_at(opt_state)`` for the metrics.
      metrics: extra ``name -> fn(outputs, y)`` computed on the training batch.
      donate: donate the incoming train state's buffers (they must not be used afterwards).
      grad_norms: also return ``"grad_norm/<layer>"``, the L2 norm of each layer's gradient
        (:func:`fnlayers.diagnostics.grad_norms`; layers with parameters only).
      grad_finite: also return ``"grad_finite/<layer>"``, a bool scalar per layer with
        parameters: whether its whole gradient is finite.

    Returns:
      The jitted step. Its metrics dict holds ``loss``, ``lr`` (when the optimizer reports
      it), every extra metric, and the per-layer entries asked for, as device scalars.
    """
    metrics = dict(metrics or {})
    for name, flag in (("grad_norms", grad_norms), ("grad_finite", grad_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"make_train_step: {name}={flag!r} must be a bool")

    def loss_and_outputs(params, state, key, x, y):
        outputs, new_state = model.apply(params, state, x, key=key, train=True)
        return loss_fn(outputs, y), (outputs, new_state)

    grad_fn = jax.value_and_grad(loss_and_outputs, has_aux=True)

    def step(ts: TrainState, x, y):
        key, step_key = jax.random.split(ts.key)
        (loss, (outputs, new_state)), grads = grad_fn(ts.params, ts.state, step_key, x, y)
        params, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        out = {"loss": loss}
        if hasattr(optimizer, "learning_rate_at"):
            out["lr"] = optimizer.learning_rate_at(ts.opt_state)
        for name, fn in metrics.items():
            out[name] = fn(outputs, y)
        if grad_norms:
            norms = _diagnostics.grad_norms(model, grads)
            out |= {f"{GRAD_NORM}{layer}": v for layer, v in norms.items()}
        if grad_finite:
            flags = _diagnostics.finite(model, grads)
            out |= {f"{GRAD_FINITE}{layer}": v for layer, v in flags.items()}
        return TrainState(params, new_state, opt_state, key), out

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(model: Layer, loss_fn: LossFn, *, metrics: Mapping[str, MetricFn] | None = None):
    """Builds ``eval_step(params, state, x, y) -> metrics`` (jit-compiled, ``train=False``).

    The state is not updated: evaluation never changes running statistics.
    """
    metrics = dict(metrics or {})

    def step(params, state, x, y):
        outputs, _ = model.apply(params, state, x, train=False)
        out = {"loss": loss_fn(outputs, y)}
        for name, fn in metrics.items():
            out[name] = fn(outputs, y)
        return out

    return jax.jit(step)


def evaluate(eval_step, params, state, x, y, *, batch_size: int = 100) -> dict[str, float]:
    """Runs ``eval_step`` over ``(x, y)`` in order and averages each metric, weighting every
    batch by its size (the last batch may be smaller). ``x``/``y`` may be pytrees of arrays."""
    n = _num_examples(x, y, "evaluate")
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        out = eval_step(params, state, _take(x, idx), _take(y, idx))
        for name, value in out.items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(idx)
    return {name: total / n for name, total in totals.items()}


@dataclasses.dataclass
class History:
    """Per-iteration records of a run: a list of dicts with ``iteration``, ``epoch``, ``loss``,
    ``lr``, ``images_per_s``, the training metrics, and ``test_*`` entries where an evaluation
    ran. ``save_json``/``save_csv`` write it; :meth:`column` reads one quantity."""

    records: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def column(self, name: str) -> tuple[list[int], list[float]]:
        """``(iterations, values)`` of the records that have ``name``."""
        rows = [r for r in self.records if name in r]
        return [int(r["iteration"]) for r in rows], [float(r[name]) for r in rows]

    def save_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.records, f, indent=1)

    def save_csv(self, path) -> None:
        names: list[str] = []
        for r in self.records:
            names += [k for k in r if k not in names]
        with open(path, "w") as f:
            f.write(",".join(names) + "\n")
            for r in self.records:
                f.write(",".join("" if k not in r else repr(r[k]) for k in names) + "\n")

    def plot(self, path, *, title: str = "") -> None:
        """Saves loss and accuracy curves as a PNG (needs matplotlib, the ``examples`` extra)."""
        plt = _plot.pyplot()

        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, ax in (("loss", ax_loss), ("test_loss", ax_loss)):
            it, v = self.column(name)
            if it:
                ax.plot(it, v, label=name, marker="o" if name.startswith("test") else None)
        for name in ("accuracy", "test_accuracy"):
            it, v = self.column(name)
            if it:
                ax_acc.plot(it, v, label=name, marker="o" if name.startswith("test") else None)
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log")
        ax_acc.set_xlabel("iteration")
        ax_acc.set_ylabel("accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def fit(
    model: Layer,
    loss_fn: LossFn,
    optimizer,
    train_data,
    *,
    batch_size: int,
    iterations: int | None = None,
    epochs: int | None = None,
    train_state: TrainState | None = None,
    key=None,
    seed: int = 0,
    metrics: Mapping[str, MetricFn] | None = None,
    eval_data=None,
    eval_every: int | None = None,
    eval_batch_size: int = 100,
    num_classes: int | None = None,
    log_every: int = 10,
    checkpoint_path=None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    augment: Callable | None = None,
    diagnostics_every: int | None = None,
) -> tuple[TrainState, History]:
    """Trains ``model`` on ``train_data = (x, y)`` with ``optimizer``.

    Args:
      model, loss_fn, optimizer, metrics: as for :func:`make_train_step`.
      train_data: ``(x, y)``; each a numpy/jax array with the example axis first, or a tuple of
        such arrays (Siamese pairs). Batches are drawn without replacement, reshuffled every
        epoch from ``(seed, epoch)``; a last partial batch is dropped.
      batch_size: examples per step.
      iterations / epochs: how long to train (exactly one of them).
      train_state: where to start; by default a fresh one from ``key`` (default
        ``jax.random.key(seed)``) and the shape of ``x``.
      eval_data: optional ``(x, y)`` evaluated every ``eval_every`` iterations (default: once
        per epoch) and at the end, with the same loss and metrics, prefixed ``test_``.
      num_classes: when ``y`` holds integer class labels, labels outside ``[0, num_classes)``
        are rejected before training starts. Defaults to the model's last output axis when the
        model has a single output.
      log_every: iterations between history records (and progress-bar updates); each record
        averages the training metrics over the steps since the previous record (after a
        resume, over the steps run since the resume).
      checkpoint_path: write the train state, iteration and history there (atomically) every
        ``checkpoint_every`` iterations (default: with every evaluation) and at the end.
      resume: if ``checkpoint_path`` exists, continue from it exactly.
      progress: show a progress bar (tqdm when installed, else a line per record).
      stop_after: stop (with a checkpoint) after this many iterations of *this call*, as if the
        process were interrupted there; for tests and time-boxed runs.
      augment: optional ``augment(x_batch, y_batch, rng) -> (x_batch, y_batch)`` applied to
        every training batch on the host (Caffe's ``transform_param``), with a numpy
        ``Generator`` seeded by ``(seed, iteration)``, so resumed runs see the same batches.
        :func:`fnlayers.data.random_shift` is one.
      diagnostics_every: None (off), or an int N >= 1: the step that completes iteration 1
        and every iteration that is a multiple of N also computes each layer's gradient norm
        (inside the compiled step; a second compiled variant of the step, so the others run
        exactly as without diagnostics) and that iteration's record gets
        ``"grad_norm/<layer>"`` entries. See :func:`fnlayers.diagnostics.plot_grad_norms`.

    Returns:
      ``(train_state, history)``.

    Raises:
      ValueError: bad arguments or labels out of range.
      NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays intact.
        The message names the layer whose gradient went non-finite first (this iteration or
        the one before), or says that every gradient stayed finite.
    """
    x, y = _unpack(train_data, "train_data")
    n = _num_examples(x, y, "train_data")
    if not isinstance(batch_size, int) or not 0 < batch_size <= n:
        raise ValueError(f"fit: batch_size={batch_size!r} must be an int in [1, {n}]")
    steps_per_epoch = n // batch_size
    if (iterations is None) == (epochs is None):
        raise ValueError(f"fit: give exactly one of iterations={iterations} and epochs={epochs}")
    total = iterations if iterations is not None else epochs * steps_per_epoch
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"fit: the run must have at least one iteration, got {total!r}")
    eval_every = eval_every or steps_per_epoch
    checkpoint_every = checkpoint_every or eval_every
    metrics = dict(metrics or {})
    if diagnostics_every is not None and (
        not isinstance(diagnostics_every, int)
        or isinstance(diagnostics_every, bool)
        or diagnostics_every < 1
    ):
        raise ValueError(
            f"fit: diagnostics_every={diagnostics_every!r} must be None or an int >= 1"
        )

    if train_state is None:
        key = jax.random.key(seed) if key is None else key
        train_state = create_train_state(model, optimizer, _input_shape(x), key)
    _check_labels(model, x, y, num_classes, eval_data)

    history, start = History(), 0
    if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
        train_state, start, history = _load_run(checkpoint_path, train_state)

    step = make_train_step(model, loss_fn, optimizer, metrics=metrics, grad_finite=True)
    diag_step = None
    if diagnostics_every is not None:
        diag_step = make_train_step(
            model, loss_fn, optimizer, metrics=metrics, grad_norms=True, grad_finite=True
        )
    layer_order = _diagnostics.param_layers(model, train_state.params)
    prev_flags: tuple[int, dict] | None = None
    eval_step = make_eval_step(model, loss_fn, metrics=metrics) if eval_data is not None else None
    end = total if stop_after is None else min(total, start + stop_after)
    bar = _Progress(total, start, enabled=progress)
    last_ckpt = checkpoint_path if checkpoint_path and os.path.exists(checkpoint_path) else None
    window: dict[str, list[float]] = {}
    t_window, n_window = time.perf_counter(), 0
    perm_epoch, perm = -1, None
    it = start
    try:
        while it < end:
            epoch = it // steps_per_epoch
            if epoch != perm_epoch:
                perm, perm_epoch = _data.epoch_order(n, seed=seed, epoch=epoch), epoch
            b = it % steps_per_epoch
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb, yb = _take(x, idx), _take(y, idx)
            if augment is not None:
                xb, yb = augment(xb, yb, np.random.default_rng([seed, it, 1]))
            run_diag = diag_step is not None and (it == 0 or (it + 1) % diagnostics_every == 0)
            train_state, out = (diag_step if run_diag else step)(train_state, xb, yb)
            flags = {
                k[len(GRAD_FINITE) :]: out.pop(k) for k in list(out) if k.startswith(GRAD_FINITE)
            }
            norms = {k: out.pop(k) for k in list(out) if k.startswith(GRAD_NORM)}
            loss = float(out["loss"])
            it += 1
            if not math.isfinite(loss):
                layer, layer_it, where = _first_nonfinite_gradient(
                    prev_flags, (it - 1, flags), layer_order
                )
                raise NonFiniteLossError(
                    f"fit: the training loss became {loss} at iteration {it - 1}; training "
                    f"stopped. {where} "
                    + (
                        f"The last good checkpoint is {last_ckpt}."
                        if last_ckpt
                        else "No checkpoint was written."
                    ),
                    iteration=it - 1,
                    history=history,
                    checkpoint=last_ckpt,
                    layer=layer,
                    layer_iteration=layer_it,
                )
            prev_flags = (it - 1, flags)
            for name, value in out.items():
                window.setdefault(name, []).append(float(value))
            n_window += batch_size
            record = None
            if norms:
                record = {"iteration": it, "epoch": it / steps_per_epoch}
                record |= {k: float(v) for k, v in jax.device_get(norms).items()}
            if it % log_every == 0 or it == total:
                elapsed = time.perf_counter() - t_window
                record = record or {"iteration": it, "epoch": it / steps_per_epoch}
                record |= {k: float(np.mean(v)) for k, v in window.items()}
                record["images_per_s"] = n_window / max(elapsed, 1e-9)
                window, t_window, n_window = {}, time.perf_counter(), 0
            if eval_step is not None and (it % eval_every == 0 or it == total):
                ex, ey = _unpack(eval_data, "eval_data")
                result = evaluate(
                    eval_step,
                    train_state.params,
                    train_state.state,
                    ex,
                    ey,
                    batch_size=eval_batch_size,
                )
                record = record or {"iteration": it, "epoch": it / steps_per_epoch}
                record |= {f"test_{k}": v for k, v in result.items()}
                t_window = time.perf_counter()  # evaluation time is not training throughput
            if record is not None:
                history.records.append(record)
                bar.update(it, record)
            if checkpoint_path is not None and (it % checkpoint_every == 0 or it == end):
                _save_run(checkpoint_path, train_state, it, history)
                last_ckpt = checkpoint_path
    finally:
        bar.close()
    return train_state, history


# ----------------------------------------------------------------------------- helpers


def _first_nonfinite_gradient(previous, current, order):
    """``(layer, iteration, sentence)``: the layer whose gradient went non-finite first. The
    previous step is looked at first: its gradient can poison the parameters while its own loss
    is still finite. Within a step, the backward pass reaches the last layer first."""
    for entry in (previous, current):
        if entry is None:
            continue
        iteration, flags = entry
        host = jax.device_get(flags)
        bad = [name for name in reversed(order) if name in host and not bool(host[name])]
        if bad:
            every = ""
            if len(bad) == len(host) and iteration == current[0]:
                every = (
                    " (every layer's gradient was non-finite, as when the loss itself is: the "
                    "forward pass overflowed)"
                )
            return (
                bad[0],
                iteration,
                f"The gradient first went non-finite at iteration {iteration} in layer "
                f"{bad[0]!r}, the first the backward pass reached{every}; non-finite in: "
                f"{', '.join(bad)}.",
            )
    return (
        None,
        None,
        "Every layer's gradient was finite up to this step: the loss itself is not (an "
        "overflow in the forward pass, or a NaN in the batch or its labels; "
        "fnlayers.diagnostics.diagnose shows each layer's output and parameter scale).",
    )


def _unpack(data, name):
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(f"fit: {name} must be a pair (x, y), got {type(data).__name__}")
    return data[0], data[1]


def _num_examples(x, y, name) -> int:
    sizes = {int(np.shape(a)[0]) for a in jax.tree.leaves((x, y))}
    if len(sizes) != 1:
        raise ValueError(f"{name}: x and y disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def _take(tree, idx):
    return jax.tree.map(lambda a: np.asarray(a)[idx], tree)


def _input_shape(x):
    """The model's in_shape for data ``x``: ``(-1, ...)``, or a tuple of those for a tuple."""
    if isinstance(x, tuple | list):
        return tuple((-1, *np.shape(a)[1:]) for a in x)
    return (-1, *np.shape(x)[1:])


def _check_labels(model, x, y, num_classes, eval_data):
    if not all(np.issubdtype(np.asarray(a).dtype, np.integer) for a in jax.tree.leaves(y)):
        return
    if num_classes is None:
        out_shape, _ = _abstract_init(model, _input_shape(x))
        if not (isinstance(out_shape, tuple) and all(isinstance(d, int) for d in out_shape)):
            return
        num_classes = out_shape[-1]
    sets = [("train_data", y)] + ([("eval_data", eval_data[1])] if eval_data is not None else [])
    for name, labels in sets:
        labels = np.asarray(labels)
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            first = int(np.flatnonzero(bad.ravel())[0])
            raise ValueError(
                f"fit: {name} has label {int(labels.ravel()[first])} at index {first}, outside "
                f"the model's {num_classes} classes [0, {num_classes})"
            )


def _save_run(path, train_state, iteration, history):
    _checkpoint.save(path, train_state, iteration=iteration, history=history.records)


def _load_run(path, template):
    train_state = _checkpoint.load(path, like=template)
    meta = _checkpoint.load_metadata(path)
    return TrainState(*train_state), int(meta["iteration"]), History(list(meta["history"]))


class _Progress:
    """tqdm when available, else one printed line per record."""

    def __init__(self, total, start, *, enabled):
        self.bar = None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, leave=True)

    def update(self, it, record):
        if not self.enabled:
            return
        shown = {
            k: f"{record[k]:.4g}"
            for k in ("loss", "accuracy", "lr", "test_accuracy", "images_per_s")
            if k in record
        }
        if self.bar is not None:
            self.bar.n = it
            self.bar.set_postfix(shown, refresh=True)
        else:
            print(
                f"iteration {it}: " + " ".join(f"{k}={v}" for k, v in shown.items()),
                file=sys.stderr,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()
