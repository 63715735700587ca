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

Gradient accumulation (Caffe's ``iter_size``, §9): with an optimizer whose ``iter_size`` is k > 1
one iteration is one update from k micro-batches: the step runs them in order inside the same
compiled program (a ``lax.scan``), sums their gradients and hands the sum to the optimizer, which
clips it and divides it by k; the loss and metrics are the means over the micro-batches.

Data parallelism: ``make_train_step``, ``make_eval_step``, ``predict`` and ``fit`` take a
``mesh`` (:mod:`fnlayers.distributed`); the global batch is split over the mesh's ``"data"``
axis and the step is the single-device step on that batch, partitioned by XLA. ``fit`` also
reads batches from any iterable (a generator, a PyTorch ``DataLoader``) instead of arrays.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fnlayers import _records, _sources
from fnlayers import checkpoint as _checkpoint
from fnlayers import diagnostics as _diagnostics
from fnlayers import distributed as _dist
from fnlayers import optim as _optim
from fnlayers import precision as _precision
from fnlayers._checks import check_choice, check_positive_int, is_int
from fnlayers._records import GRAD_NORM, History
from fnlayers._typing import DTypeLike
from fnlayers.layers import Layer, _abstract_init
from fnlayers.optim import Optimizer

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
#: ``loss_scale``: None, a positive number (static), ``"dynamic"`` or a DynamicLossScale.
LossScale = float | str | _precision.DynamicLossScale | None
MetricFn = Callable[[Any, Any], jax.Array]

#: The key of the per-layer gradient finiteness flags in a step's metrics (``{layer: bool}``).
GRAD_FINITE = "grad_finite"


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree).

    Attributes:
      params: the model's parameters.
      state: the model's running state (batch norm statistics), ``{}``-leaved if none.
      opt_state: the optimizer's state, including its iteration counter.
      key: the PRNG key; every step splits it into the next key and the step's key.
      loss_scale: a dynamic loss scale's :class:`fnlayers.precision.LossScaleState` (the scale
        and its count of finite steps), or None without one.
    """

    params: Any
    state: Any
    opt_state: Any
    key: jax.Array
    loss_scale: _precision.LossScaleState | None = None


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


def create_train_state(
    model: Layer,
    optimizer: Optimizer,
    in_shape: Any,
    key: jax.Array,
    *,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    loss_scale: LossScale = None,
) -> TrainState:
    """Initialises params, state and optimizer state for ``model`` on inputs of ``in_shape``.

    ``key`` is split: one part initialises the model, the other becomes the run's key. With a
    ``mesh`` (see :func:`make_train_step`) every leaf is replicated on every device of it.
    ``loss_scale``: as for :func:`make_train_step`; a dynamic one starts its
    :class:`fnlayers.precision.LossScaleState` in ``TrainState.loss_scale``. The parameters are
    created in the dtypes the layers give them (float32 unless a layer's ``param_dtype`` says
    otherwise), whatever the compute dtype the steps later run in.
    """
    optimizer = _optim.check_optimizer(optimizer, fn="create_train_state")
    dp = _data_parallel(mesh, data_axis, "create_train_state")
    scale_state = _precision.loss_scale_state(
        _precision.check_loss_scale(loss_scale, fn="create_train_state")
    )
    k_init, k_run = jax.random.split(key)

    def init(k):
        _, params, state = model.init(k, in_shape)
        return params, state, optimizer.init(params)

    # One compiled program instead of one dispatch per initializer (seconds for a deep net);
    # the random bits are the same as an eager init's.
    params, state, opt_state = jax.jit(init)(k_init)
    train_state = TrainState(params, state, opt_state, k_run, scale_state)
    return train_state if dp is None else dp.replicate(train_state)


def predict(
    model: Layer,
    params: Any,
    state: Any,
    x: Any,
    *,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    compute_dtype: DTypeLike | None = None,
):
    """``model``'s outputs on ``x`` in evaluation mode (``train=False``), in batches.

    Args:
      x: ``(N, ...)`` array, or a tuple of such arrays for multi-input models.
      batch_size: examples per call of the jit-compiled forward pass.
      mesh, data_axis: as for :func:`make_train_step`: each batch is split over the devices
        (a batch that does not split evenly, such as the last one, runs whole on every device).
      compute_dtype: as for :func:`make_train_step`: the forward pass runs in it, and the
        outputs come back float32.

    Returns:
      The outputs for all N examples, in order (a tuple of arrays for multi-output models), as
      numpy arrays.
    """
    n = _sources.num_examples(x, (), "predict")
    check_positive_int(batch_size, fn="predict", name="batch_size")
    dp = _data_parallel(mesh, data_axis, "predict")
    policy = _precision.policy(compute_dtype, None, fn="predict")

    def run(params, state, xb):
        outputs = model.apply(policy.cast_in(params), state, policy.cast_in(xb), train=False)[0]
        return policy.cast_out(outputs)

    forward = _on_mesh(dp, run)
    if dp is not None:
        params, state = dp.replicate((params, state))
    outs = [
        _to_host(dp, forward(params, state, _sources.take(x, np.arange(i, min(i + batch_size, n)))))
        for i in range(0, n, batch_size)
    ]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def make_train_step(
    model: Layer,
    loss_fn: LossFn,
    optimizer: Optimizer,
    *,
    metrics: Mapping[str, MetricFn] | None = None,
    donate: bool = True,
    grad_norms: bool = False,
    grad_finite: bool = False,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    batch_norm: str = "global",
    compute_dtype: DTypeLike | None = None,
    loss_scale: LossScale = None,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, Any]]]:
    """Builds ``step(train_state, x, y) -> (train_state, metrics)``, one jit-compiled function.

    Args:
      model: the network; ``model.apply(params, state, x, key=k, train=True)``.
      loss_fn: ``loss_fn(outputs, y) -> scalar``, e.g. ``fl.losses.softmax_cross_entropy``.
      optimizer: an :class:`fnlayers.optim.Optimizer` (``fl.optim.sgd(...)``, or an optax
        transformation wrapped by ``fl.optim.from_optax(tx)``): ``update(grads, opt_state,
        params) -> (params, opt_state)``; its ``learning_rate_at`` gives the ``lr`` metric.
        An optimizer with ``iter_size`` k > 1 (``fl.optim.sgd(..., iter_size=k)``, Caffe's
        gradient accumulation) makes the step take ``x`` and ``y`` stacked as k micro-batches,
        every leaf ``(k, batch, ...)`` (any other leading axis is a ValueError): it runs them in
        order, threading the model state (batch norm statistics) through them, each with its
        own PRNG key split from the step's key, and hands the **sum** of their gradients to the
        optimizer, which clips the sum and divides it by k (Caffe's order). An optimizer
        without ``iter_size`` (``from_optax``) counts as 1: one plain batch per step.
      metrics: extra ``name -> fn(outputs, y)`` computed on the training batch (with
        ``iter_size`` k > 1: the mean over the k micro-batches, as the loss is, Caffe's
        ``loss /= iter_size``).
      donate: donate the incoming train state's buffers (they must not be used afterwards).
      grad_norms: also return ``metrics["grad_norm"]``, ``{layer: L2 norm of the layer's
        gradient}`` (:func:`fnlayers.diagnostics.grad_norms`; layers with parameters only; with
        ``iter_size`` k, of the summed gradient divided by k).
      grad_finite: also return ``metrics["grad_finite"]``, ``{layer: bool scalar}`` for the
        layers with parameters: whether the layer's whole gradient is finite.
      mesh: None (one device), or a :class:`jax.sharding.Mesh` with an axis named
        ``data_axis``: every batch ``x, y`` (the global batch) is split along its first axis
        over that axis's devices, and the train state is replicated on every device
        (:mod:`fnlayers.distributed`). ``x`` and ``y`` may be host arrays (the whole batch, the
        same in every process) or global ``jax.Array`` s already split that way (stacked
        micro-batches: each one split, along axis 1). The step is
        the single-device step on the global batch, partitioned by XLA; the mesh changes only
        the order of floating-point sums.
      data_axis: the mesh axis the batch is split over. Inside the step a layer that uses this
        axis name finds it bound, so a ``BatchNorm(axis_name=data_axis)`` (or a collective in
        a custom layer) works with or without a mesh (its statistics are those of the global
        batch either way). A model that never names the axis is traced without binding it
        (binding it costs a ``vmap`` of the whole model, in tracing and in compiling).
      batch_norm: ``"global"`` (default): batch norm normalises with the statistics of the
        whole global batch, exactly as on one device. ``"per_device"``: Caffe's multi-GPU
        behaviour: the model runs on each device's slice of the batch on its own (a
        ``vmap`` over the slices, partitioned over the devices), so batch norm normalises each
        slice with that slice's statistics (a ``BatchNorm(axis_name=data_axis)`` still
        averages over the slices); the running statistics are averaged over the slices, each
        slice gets its own PRNG key, and the loss and metrics are those of the global batch.
        Without a mesh there is one slice, and the two modes agree.
      compute_dtype: None (default): the model runs in the dtypes of the parameters and the
        inputs, as given. ``jnp.bfloat16`` or ``jnp.float16`` (mixed precision,
        docs/mixed-precision.md): the parameters, the optimizer state and the model state
        (batch norm statistics) stay as they are (float32: the master weights); every step
        casts the floating parameters and the floating leaves of ``x`` to ``compute_dtype``
        and runs the forward and backward passes there (the ops accumulate in float32), then
        casts the model's outputs to float32 for ``loss_fn`` and the metrics. The gradients
        come back in the parameters' dtypes (the cast is differentiated) and the optimizer
        updates the parameters in them. ``y`` is not cast.
      loss_scale: None (default): the loss is differentiated as it is. A positive number: a
        static scale; the backward pass differentiates ``loss * loss_scale`` and the gradients
        are divided by it before the optimizer sees them. ``"dynamic"`` or a
        :class:`fnlayers.precision.DynamicLossScale`: the scale is
        ``train_state.loss_scale.scale`` (a :class:`fnlayers.precision.LossScaleState`, from
        ``create_train_state(..., loss_scale=...)``); a step whose gradients are not all
        finite is skipped: the parameters, the optimizer state (its iteration counter
        included, so the learning-rate schedule does not advance) and the model state stay
        as they were; only the key and the loss scale move on. The scale is halved after
        such a step and doubled after ``growth_interval`` finite steps in a row
        (:func:`fnlayers.precision.update_loss_scale`). With ``iter_size`` k every
        micro-batch's loss is scaled and the summed gradient unscaled once.

    Returns:
      The jitted step. Its metrics dict holds ``loss``, ``lr`` (when the optimizer reports
      it), every extra metric, and the per-layer dicts asked for, as device scalars
      (replicated on every device with a mesh). With a dynamic loss scale also
      ``loss_scale`` (the scale after this step) and ``skipped_steps`` (1 if this step was
      skipped, else 0). ``loss`` is the unscaled loss; ``grad_norm`` and ``grad_finite`` are
      of the unscaled gradient.
    """
    fn = "make_train_step"
    metrics = dict(metrics or {})
    policy = _precision.policy(compute_dtype, loss_scale, fn=fn)
    for name, flag in (("grad_norms", grad_norms), ("grad_finite", grad_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name}={flag!r} must be a bool")
    check_choice(batch_norm, _dist.BATCH_NORM_MODES, fn=fn, name="batch_norm")
    optimizer = _optim.check_optimizer(optimizer, fn=fn)
    iter_size = _iter_size(optimizer, fn)
    dp = _data_parallel(mesh, data_axis, fn)
    slices = dp.size if dp is not None and batch_norm == "per_device" else 1
    forward = _train_forward(model, data_axis, slices)

    def loss_and_outputs(params, state, key, x, y, scale):
        outputs, new_state = forward(policy.cast_in(params), state, key, policy.cast_in(x))
        outputs = policy.cast_out(outputs)
        loss = loss_fn(outputs, y)
        scaled = loss if scale is None else loss * scale
        return scaled, (loss, outputs, new_state)

    grad_fn = jax.value_and_grad(loss_and_outputs, has_aux=True)

    def forward_backward(params, state, key, x, y, *, scale):
        (_, (loss, outputs, new_state)), grads = grad_fn(params, state, key, x, y, scale)
        values = {"loss": loss}
        for name, metric in metrics.items():
            values[name] = metric(outputs, y)
        return values, new_state, grads

    def step(ts: TrainState, x, y):
        key, step_key = jax.random.split(ts.key)
        scale = policy.scale(ts.loss_scale, fn)
        run = functools.partial(forward_backward, scale=scale)
        if iter_size > 1:
            run = _micro_batches(run, iter_size, fn)
        values, new_state, grads = run(ts.params, ts.state, step_key, x, y)
        grads = policy.unscale(grads, scale)
        params, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        out = {"loss": values.pop("loss")}
        if optimizer.learning_rate_at is not None:
            out["lr"] = optimizer.learning_rate_at(ts.opt_state)
        out.update(values)
        scale_state = ts.loss_scale
        if policy.dynamic:
            finite = _precision.all_finite(grads)
            # A skipped step leaves everything it would have trained as it was: new batch norm
            # statistics from a forward pass that overflowed would poison the running averages.
            params, opt_state, new_state = _where(
                finite, (params, opt_state, new_state), (ts.params, ts.opt_state, ts.state)
            )
            scale_state = _precision.update_loss_scale(policy.loss_scale, scale_state, finite)
            out[_records.LOSS_SCALE] = scale_state.scale
            out[_records.SKIPPED_STEPS] = jnp.where(finite, 0, 1).astype(jnp.int32)
        if grad_norms:
            mean = grads if iter_size == 1 else jax.tree.map(lambda g: g / iter_size, grads)
            out[GRAD_NORM] = _diagnostics.grad_norms(model, mean)
        if grad_finite:
            out[GRAD_FINITE] = _diagnostics.finite(model, grads)
        return TrainState(params, new_state, opt_state, key, scale_state), out

    jitted = jax.jit(
        step,
        donate_argnums=(0,) if donate else (),
        out_shardings=None if dp is None else dp.replicated,
    )
    if dp is None:
        return jitted

    return _MeshStep(dp, jitted, fn, iter_size)


class _MeshStep:
    """A train step on a mesh: ``step(train_state, x, y)`` places its arguments (the train state
    replicated, the batch split; stacked micro-batches each split) and runs the compiled step in
    the mesh's context; ``step.placed`` skips the placement, for callers whose arguments are
    placed already (``fit``: the placement checks cost tens of microseconds a step, a tenth of a
    small GPU step)."""

    def __init__(self, dp, jitted, fn, iter_size=1):
        self.dp, self.jitted, self.fn, self.iter_size = dp, jitted, fn, iter_size

    def __call__(self, ts: TrainState, x, y):
        stacked = self.iter_size > 1
        if stacked:
            _check_stacked((x, y), self.iter_size, self.fn)
        for leaf in jax.tree.leaves((x, y)):
            size = int(np.shape(leaf)[int(stacked)])
            self.dp.check_batch_size(size, fn=self.fn, name="the batch's size")
        batch = _sources.shard_micro(self.dp, (x, y)) if stacked else self.dp.shard((x, y))
        return self.placed(self.dp.replicate(ts), *batch)

    def placed(self, ts: TrainState, x, y):
        with self.dp.context():
            return self.jitted(ts, x, y)


def make_eval_step(
    model: Layer,
    loss_fn: LossFn,
    *,
    metrics: Mapping[str, MetricFn] | None = None,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    compute_dtype: DTypeLike | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """Builds ``eval_step(params, state, x, y) -> metrics`` (jit-compiled, ``train=False``).

    The state is not updated: evaluation never changes running statistics. With a ``mesh``
    (see :func:`make_train_step`) a batch that splits evenly over the devices is split, any
    other (the last batch of :func:`evaluate`) runs whole on every device. ``compute_dtype``:
    as for :func:`make_train_step` (the model runs in it; the loss and metrics see float32
    outputs).
    """
    metrics = dict(metrics or {})
    policy = _precision.policy(compute_dtype, None, fn="make_eval_step")

    def step(params, state, x, y):
        outputs, _ = model.apply(policy.cast_in(params), state, policy.cast_in(x), train=False)
        outputs = policy.cast_out(outputs)
        out = {"loss": loss_fn(outputs, y)}
        for name, fn in metrics.items():
            out[name] = fn(outputs, y)
        return out

    return _on_mesh(_data_parallel(mesh, data_axis, "make_eval_step"), step)


def evaluate(
    eval_step: Callable[..., Mapping[str, jax.Array]],
    params: Any,
    state: Any,
    x: Any,
    y: Any,
    *,
    batch_size: int = 100,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> dict[str, float]:
    """Runs ``eval_step`` over ``(x, y)`` in order and averages each metric, weighting every
    batch by its size (the last batch may be smaller). ``x``/``y`` may be pytrees of arrays.

    With a ``mesh`` (see :func:`make_train_step`) every batch that splits evenly is split over
    the devices of its ``data_axis`` and ``eval_step`` (any jitted function, e.g. from
    :func:`make_eval_step` without a mesh) runs partitioned; an ``eval_step`` made with a mesh
    does this itself."""
    n = _sources.num_examples(x, y, "evaluate")
    dp = _data_parallel(mesh, data_axis, "evaluate")
    run = eval_step if dp is None else functools.partial(_placed, dp, eval_step)
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        out = run(params, state, _sources.take(x, idx), _sources.take(y, idx))
        for name, value in out.items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(idx)
    return {name: total / n for name, total in totals.items()}


def fit(
    model: Layer,
    loss_fn: LossFn,
    optimizer: Optimizer,
    train_data: Any,
    *,
    batch_size: int | None = None,
    iterations: int | None = None,
    epochs: int | None = None,
    train_state: TrainState | None = None,
    key: jax.Array | None = None,
    seed: int = 0,
    metrics: Mapping[str, MetricFn] | None = None,
    eval_data: tuple[Any, Any] | None = None,
    eval_every: int | None = None,
    eval_batch_size: int = 100,
    num_classes: int | None = None,
    log_every: int = 10,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    augment: Callable | None = None,
    diagnostics_every: int | None = None,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    batch_norm: str = "global",
    compute_dtype: DTypeLike | None = None,
    loss_scale: LossScale = None,
) -> tuple[TrainState, History]:
    """Trains ``model`` on ``train_data`` with ``optimizer``.

    Args:
      model, loss_fn, optimizer, metrics: as for :func:`make_train_step`.
      train_data: either arrays ``(x, y)``, a tuple: each a numpy/jax array with the example
        axis first, or a tuple of such arrays (Siamese pairs); batches are drawn without
        replacement, reshuffled every epoch from ``(seed, epoch)``; a last partial batch is
        dropped. Or an iterable of ``(x_batch, y_batch)`` batches of numpy-convertible arrays
        (a generator, a ``torch.utils.data.DataLoader``, a grain loader): one batch per
        iteration, in the order it yields them. An iterable that can be iterated again (a
        DataLoader, a list) starts a new pass when one ends, and ``len()`` of it, if defined,
        is the epoch; a one-shot iterator that runs out ends the run there (with a warning,
        and the final record, evaluation and checkpoint). A batch smaller than the first (a
        DataLoader's last) is skipped. On resume the first ``iteration`` batches are read and
        skipped, so a resumed run continues exactly when the iterable yields the same batches
        again. In a multi-process run each process's iterable yields its own rows of each
        global batch (``batch_size / jax.process_count()`` of them).
      batch_size: examples per forward/backward pass: the global batch, split over the mesh's
        devices (and processes) when there is a mesh. Required for arrays; for an iterable it
        is implied by its first batch (and checked if given). With an optimizer whose
        ``iter_size`` is k > 1 (Caffe's gradient accumulation) it is the micro-batch: every
        iteration (one update) reads k batches of ``batch_size``, from arrays the k slices of
        one batch of ``k * batch_size`` (so the data order, the epochs and, for a model without
        batch statistics or dropout, the training are those of ``batch_size=k * batch_size``
        with ``iter_size=1``), from an iterable k consecutive batches; ``augment`` sees the k
        batches as one. See :func:`make_train_step` for the step.
      iterations / epochs: how long to train (exactly one of them; ``epochs`` needs arrays or
        an iterable with a ``len()``). An iteration is one update, whatever ``iter_size``; an
        epoch is ``len(x) // (iter_size * batch_size)`` iterations (``len(train_data) //
        iter_size`` for an iterable).
      train_state: where to start; by default a fresh one from ``key`` (default
        ``jax.random.key(seed)``) and the shape of ``x``.
      eval_data: optional ``(x, y)`` arrays evaluated every ``eval_every`` iterations (default:
        once per epoch, or only at the end when the epoch is unknown) and at the end, with the
        same loss and metrics, prefixed ``test_``.
      num_classes: when ``y`` holds integer class labels, labels outside ``[0, num_classes)``
        are rejected before training starts (arrays only). Defaults to the model's last output
        axis when the model has a single output.
      log_every: iterations between history records (and progress-bar updates); each record
        averages the training metrics over the steps since the previous record (after a
        resume, over the steps run since the resume).
      checkpoint_path: write the train state, iteration and history there (atomically) every
        ``checkpoint_every`` iterations (default: with every evaluation) and at the end. In a
        multi-process run only process 0 writes; every process resumes from the file.
      resume: if ``checkpoint_path`` exists, continue from it exactly.
      progress: show a progress bar (tqdm when installed, else a line per record), in process
        0 only.
      stop_after: stop (with a checkpoint) after this many iterations of *this call*, as if the
        process were interrupted there; for tests and time-boxed runs.
      augment: optional ``augment(x_batch, y_batch, rng) -> (x_batch, y_batch)`` applied to
        every training batch on the host (Caffe's ``transform_param``), with a numpy
        ``Generator`` seeded by ``(seed, iteration)``, so resumed runs see the same batches.
        With arrays it sees the whole global batch in every process (so a multi-process run
        augments exactly as one process does). :func:`fnlayers.data.random_shift` is one.
      diagnostics_every: None (off), or an int N >= 1: the step that completes iteration 1
        and every iteration that is a multiple of N also computes each layer's gradient norm
        (inside the compiled step; a second compiled variant of the step, so the others run
        exactly as without diagnostics) and that iteration's record gets
        ``"grad_norm/<layer>"`` entries. See :func:`fnlayers.diagnostics.plot_grad_norms`.
      mesh, data_axis, batch_norm: data parallelism, as for :func:`make_train_step`:
        ``mesh=jax.make_mesh((jax.device_count(),), ("data",))`` trains on every device, and
        after ``jax.distributed.initialize`` on every device of every process (each process
        calls ``fit`` with the same arguments; docs/scale-out.md).
      compute_dtype, loss_scale: mixed precision, as for :func:`make_train_step`
        (docs/mixed-precision.md); the evaluations run in ``compute_dtype`` too. A dynamic
        ``loss_scale`` starts a :class:`fnlayers.precision.LossScaleState` in a train state
        that has none, resumes the checkpointed one, and a step it skips (non-finite
        gradients) is not a stop: the records count them as ``skipped_steps`` (the skipped
        steps since the record before) and show the ``loss_scale`` after their last step. A
        non-finite *loss* still raises :class:`NonFiniteLossError`.

    Returns:
      ``(train_state, history)``; with a mesh the train state is replicated on its devices.

    Raises:
      ValueError: bad arguments or labels out of range.
      NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays intact.
        The message names the layer whose gradient went non-finite first (this iteration or
        the one before), or says that every gradient stayed finite.
    """
    optimizer = _optim.check_optimizer(optimizer, fn="fit")
    policy = _precision.policy(compute_dtype, loss_scale, fn="fit")
    iter_size = _iter_size(optimizer, "fit")
    dp = _data_parallel(mesh, data_axis, "fit")
    source = _sources.batch_source(train_data, batch_size, seed, augment, dp, iter_size)
    total = _run_length(iterations, epochs, source.steps_per_epoch)
    eval_every = eval_every or source.steps_per_epoch or total
    checkpoint_every = checkpoint_every or eval_every
    _check_diagnostics_every(diagnostics_every)
    if train_state is None:
        key = jax.random.key(seed) if key is None else key
        train_state = create_train_state(
            model,
            optimizer,
            source.input_shape,
            key,
            mesh=mesh,
            data_axis=data_axis,
            loss_scale=policy.loss_scale,
        )
    else:
        if policy.dynamic and train_state.loss_scale is None:
            train_state = train_state._replace(
                loss_scale=_precision.loss_scale_state(policy.loss_scale)
            )
        if dp is not None:
            train_state = dp.replicate(train_state)
    if source.arrays is not None:
        _check_labels(model, *source.arrays, num_classes, eval_data)

    checkpointer = _Checkpointer(checkpoint_path, dp)
    history, start = History(), 0
    if resume and checkpointer.exists():
        train_state, start, history = checkpointer.load(train_state)

    options = dict(
        metrics=metrics,
        mesh=mesh,
        data_axis=data_axis,
        batch_norm=batch_norm,
        compute_dtype=policy.compute_dtype,
        loss_scale=policy.loss_scale,
    )
    step = make_train_step(model, loss_fn, optimizer, grad_finite=True, **options)
    diag_step = None
    if diagnostics_every is not None:
        diag_step = make_train_step(
            model, loss_fn, optimizer, grad_finite=True, grad_norms=True, **options
        )
    evaluator = _Evaluator(
        model, loss_fn, metrics, eval_data, eval_batch_size, mesh, data_axis, policy.compute_dtype
    )
    layer_order = _diagnostics.param_layers(model, train_state.params)
    end = total if stop_after is None else min(total, start + stop_after)
    show = progress and _dist.is_main_process()
    recorder = _records.Recorder(
        history, source.steps_per_epoch, _records.Progress(total, start, enabled=show)
    )
    previous = None  # (iteration, per-layer gradient finiteness) of the step before
    try:
        for it, xb, yb, exhausted in source.batches(start, end):
            diagnose = diag_step is not None and (it == 0 or (it + 1) % diagnostics_every == 0)
            train_state, out = _placed_step(diag_step if diagnose else step)(train_state, xb, yb)
            flags = out.pop(GRAD_FINITE)
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise _non_finite_error(
                    loss, it, previous, flags, layer_order, history, dp, checkpointer.last
                )
            # A skipped step left the parameters as they were: its non-finite gradients
            # poisoned nothing, so they are not the cause of a later non-finite loss.
            skipped = policy.dynamic and int(out[_records.SKIPPED_STEPS]) > 0
            previous = None if skipped else (it, flags)
            norms = _to_host(dp, out.pop(GRAD_NORM, {}))
            done = it + 1
            recorder.add_step(done, out, source.batch_size * iter_size, norms)
            if done % log_every == 0 or done == total or exhausted:
                recorder.log(done)
            if evaluator.enabled and (done % eval_every == 0 or done == total or exhausted):
                recorder.add_evaluation(done, evaluator(train_state))
            recorder.flush(done)
            if done % checkpoint_every == 0 or done == end or exhausted:
                checkpointer.save(train_state, done, history)
    finally:
        recorder.close()
    return train_state, history


# ----------------------------------------------------------------------------- helpers


def _iter_size(optimizer, fn):
    """The optimizer's ``iter_size`` (Caffe's, :class:`fnlayers.optim.Solver`), 1 if it has
    none."""
    return check_positive_int(getattr(optimizer, "iter_size", 1), fn=fn, name="optimizer.iter_size")


def _micro_batches(forward_backward, iter_size, fn):
    """Caffe's ``iter_size`` loop around ``forward_backward(params, state, key, x, y) -> (values,
    new_state, grads)``: the same function on ``x, y`` stacked ``(iter_size, batch, ...)``, the
    micro-batches run in order (a ``lax.scan``: one copy of the model in the compiled program),
    the state threaded through them, each with its own key; the gradients summed (Caffe's
    accumulated diffs, ``((g_0 + g_1) + g_2) + ...``), the values averaged."""

    def run(params, state, key, x, y):
        _check_stacked((x, y), iter_size, fn)
        keys = jax.random.split(key, iter_size)
        first = jax.tree.map(lambda a: a[0], (x, y))
        values, _, grads = jax.eval_shape(forward_backward, params, state, keys[0], *first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (values, grads))

        def body(carry, micro):
            sums, state = carry
            values, state, grads = forward_backward(params, state, *micro)
            return (jax.tree.map(jnp.add, sums, (values, grads)), state), None

        ((values, grads), state), _ = lax.scan(body, (zeros, state), (keys, x, y))
        # Caffe's displayed loss: loss /= iter_size.
        return {name: v / iter_size for name, v in values.items()}, state, grads

    return run


def _check_stacked(batch, iter_size, fn):
    for leaf in jax.tree.leaves(batch):
        shape = tuple(np.shape(leaf))
        if len(shape) < 2 or shape[0] != iter_size:
            raise ValueError(
                f"{fn}: the optimizer's iter_size={iter_size} makes one step run {iter_size} "
                "micro-batches: pass x and y stacked as (iter_size, batch, ...), got a leaf of "
                f"shape {shape} (fit stacks them itself)"
            )


def _data_parallel(mesh, data_axis, fn):
    return None if mesh is None else _dist.data_parallel(mesh, data_axis, fn=fn)


def _on_mesh(dp, fn):
    """``fn`` jit-compiled; with a mesh, its arguments placed (:func:`_placed`) and its
    results replicated."""
    jitted = jax.jit(fn, out_shardings=None if dp is None else dp.replicated)
    if dp is None:
        return jitted
    return functools.partial(_placed, dp, jitted)


def _placed(dp, fn, params, state, *batch):
    """``fn(params, state, *batch)`` in the mesh's context, with ``params`` and ``state``
    replicated and the batch split over the devices when it splits evenly (else replicated:
    the last, smaller batch of an evaluation)."""
    sizes = {int(np.shape(leaf)[0]) for leaf in jax.tree.leaves(batch)}
    placed = dp.shard(batch) if all(map(dp.splits_evenly, sizes)) else dp.replicate(batch)
    with dp.context():
        return fn(*dp.replicate((params, state)), *placed)


def _to_host(dp, tree):
    return tree if dp is None else dp.to_host(tree)


def _train_forward(model, axis, slices):
    """``forward(params, state, key, x) -> (outputs, new_state)`` in training mode, with the
    mesh axis ``axis`` bound when the model uses it (a ``vmap`` over ``slices`` slices of the
    batch: one slice, the whole batch, is the plain forward pass; ``slices`` > 1 is Caffe's
    per-device batch norm)."""

    def forward(params, state, key, x):
        def run(xs, k):
            return model.apply(params, state, xs, key=k, train=True)

        if slices == 1:
            # Most models never name the axis, and tracing them through a vmap of one slice
            # costs: every op goes through its batching rule, which doubled the time to trace
            # AlexNet's step and added reshapes for XLA to compile. So the model is traced
            # plainly first; a layer that uses the axis (BatchNorm(axis_name=axis), a
            # collective in a custom layer) raises JAX's NameError for an unbound axis name,
            # and the model is then traced again with the axis bound. Any other NameError is
            # raised again by that second trace.
            try:
                return run(x, key)
            except NameError:
                pass
            outputs, new_state = jax.vmap(run, in_axes=(0, None), axis_name=axis)(
                jax.tree.map(lambda a: a[None], x), key
            )
            return jax.tree.map(lambda a: a[0], (outputs, new_state))
        xs = jax.tree.map(lambda a: a.reshape(slices, a.shape[0] // slices, *a.shape[1:]), x)
        keys = jax.random.split(key, slices)
        outputs, new_state = jax.vmap(run, axis_name=axis, spmd_axis_name=axis)(xs, keys)
        outputs = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), outputs)
        return outputs, jax.tree.map(_slice_mean, new_state)

    return forward


def _slice_mean(a):
    if jax.numpy.issubdtype(a.dtype, jax.numpy.inexact):
        return a.mean(axis=0).astype(a.dtype)
    return a[0]


def _where(condition, new, old):
    """``new`` where the scalar ``condition`` holds, else ``old`` (two trees alike)."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def _run_length(iterations, epochs, steps_per_epoch):
    if (iterations is None) == (epochs is None):
        raise ValueError(f"fit: give exactly one of iterations={iterations} and epochs={epochs}")
    if epochs is not None and steps_per_epoch is None:
        raise ValueError(
            f"fit: epochs={epochs} needs to know the epoch's length: train_data is an iterable "
            "without len(); pass iterations instead"
        )
    total = iterations if iterations is not None else epochs * steps_per_epoch
    if not is_int(total) or total < 1:
        raise ValueError(f"fit: the run must have at least one iteration, got {total!r}")
    return total


def _check_diagnostics_every(value):
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"fit: diagnostics_every={value!r} must be None or an int >= 1")


class _Evaluator:
    """``evaluator(train_state) -> {metric: value}`` on ``eval_data``, or disabled."""

    def __init__(
        self, model, loss_fn, metrics, eval_data, batch_size, mesh, data_axis, compute_dtype
    ):
        self.enabled = eval_data is not None
        if self.enabled:
            self.x, self.y = _unpack(eval_data, "eval_data")
            self.step = make_eval_step(
                model,
                loss_fn,
                metrics=metrics,
                mesh=mesh,
                data_axis=data_axis,
                compute_dtype=compute_dtype,
            )
            self.batch_size = batch_size

    def __call__(self, ts):
        return evaluate(self.step, ts.params, ts.state, self.x, self.y, batch_size=self.batch_size)


def _placed_step(step):
    """The step's entry for arguments ``fit`` has placed already (see :class:`_MeshStep`)."""
    return step.placed if isinstance(step, _MeshStep) else step


class _Checkpointer:
    """Writes and reads the run's checkpoint (process 0 writes; every process reads).

    Its directory is made up front, so that a bad path fails before training rather than at the
    first save (where, in a multi-process run, the other processes would wait on the failed one
    until JAX's shutdown timeout). Every process must see the same file: whether the run
    resumes is agreed between the processes, and a disagreement is an error."""

    def __init__(self, path, dp):
        self.path, self.dp = path, dp
        if path is not None and _dist.is_main_process():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._exists = self._agreed_exists()
        self.last = path if self._exists else None

    def exists(self):
        return self._exists

    def _agreed_exists(self):
        if self.path is None:
            return False
        here = os.path.exists(self.path)
        if jax.process_count() == 1:
            return here
        flags = np.asarray(multihost_utils.process_allgather(np.asarray(here)))
        if flags.all() or not flags.any():
            return here
        raise ValueError(
            f"fit: checkpoint_path={os.fspath(self.path)!r} exists in processes "
            f"{np.flatnonzero(flags).tolist()} but not in {np.flatnonzero(~flags).tolist()}: "
            "every process resumes from process 0's file, so it must be on a filesystem they share"
        )

    def load(self, template):
        train_state, start, history = _load_run(self.path, _to_host(self.dp, template))
        if self.dp is not None:
            train_state = self.dp.replicate(train_state)
        return train_state, start, history

    def save(self, train_state, iteration, history):
        if self.path is None:
            return
        if _dist.is_main_process():
            _save_run(self.path, _to_host(self.dp, train_state), iteration, history)
        if jax.process_count() > 1:
            # Every process returns only once the file is whole: one that resumes (or lists the
            # directory) straight after would otherwise see process 0's temporary file.
            multihost_utils.sync_global_devices(f"fnlayers-checkpoint-{iteration}")
        self.last = self.path


def _non_finite_error(loss, it, previous, flags, layer_order, history, dp, last_ckpt):
    layer, layer_it, where = _first_nonfinite_gradient(
        _to_host(dp, previous), (it, _to_host(dp, flags)), layer_order
    )
    return NonFiniteLossError(
        f"fit: the training loss became {loss} at iteration {it}; training stopped. {where} "
        + (
            f"The last good checkpoint is {last_ckpt}."
            if last_ckpt
            else "No checkpoint was written."
        ),
        iteration=it,
        history=history,
        checkpoint=last_ckpt,
        layer=layer,
        layer_iteration=layer_it,
    )


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


def _check_labels(model, x, y, num_classes, eval_data):
    if not all(np.issubdtype(np.asarray(a).dtype, np.integer) for a in jax.tree.leaves(y)):
        return
    if num_classes is None:
        out_shape, _ = _abstract_init(model, _sources.input_shape(x))
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
