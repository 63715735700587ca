"""Caffe's ``Solver::Solve`` and ``caffe test``, on a solver prototxt and its nets: what the
``fnlayers train`` and ``fnlayers test`` commands run.

The loop is Caffe's, step for step (``solver.cpp``), with one compiled update per iteration:

1. At ``iteration % test_interval == 0`` (iteration 0 only with ``test_initialization``), every
   test net runs ``test_iter`` batches with the train net's current weights (shared by layer
   name, as Caffe's ``ShareTrainedLayersWith``); each output blob's mean over the batches is
   logged as ``Test net output #i: NAME = VALUE`` (``(* w = w*VALUE loss)`` for a loss).
2. ``iter_size`` batches are read and their gradients summed, then the solver updates (it clips
   the sum and divides it by ``iter_size``); the iteration's loss is the mean of their losses,
   the sum of each loss top times its ``loss_weight``.
3. Every ``display`` iterations: ``Iteration N, loss = L`` with ``L`` the mean of the last
   ``average_loss`` iterations' losses, each train-net output, and ``Iteration N, lr = R``.
4. ``iteration += 1``; every ``snapshot`` iterations, and after the last one
   (``snapshot_after_train``), ``{snapshot_prefix}_iter_{N}.caffemodel`` (a binary NetParameter
   real Caffe loads) and ``{snapshot_prefix}_iter_{N}.solverstate`` (an fnlayers checkpoint:
   parameters, solver history, PRNG key and the data sources' positions, so a run resumed from
   it equals the uninterrupted run).

Ctrl-C (SIGINT) finishes the current iteration, snapshots and stops, as Caffe's default
``-sigint_effect stop``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers import checkpoint
from fnlayers.caffe import builders
from fnlayers.caffe import data as caffe_data
from fnlayers.caffe.net import CaffeNet, included, load_net, save_caffemodel, upgrade_v1
from fnlayers.caffe.prototxt import first, parse
from fnlayers.layers import param_mults
from fnlayers.train import TrainState, make_train_step

__all__ = ["TrainResult", "data_layers", "open_net", "run_test", "run_train", "total_loss"]

STATE_FORMAT = "fnlayers-caffe-solverstate"
#: The layer types whose tops are read from a source (the importer's data layers but Input,
#: whose tops the caller feeds).
DATA_TYPES = tuple(t for t in builders.DATA_TYPES if t != "Input")


@dataclasses.dataclass
class TrainResult:
    """What :func:`run_train` ends with.

    Attributes:
      net: the train net (its ``params``/``state`` are the final ones).
      iteration: the iteration count reached.
      losses: the loss of each iteration run, in order (the mean over ``iter_size`` batches).
      tests: ``[(iteration, test net index, {output: value})]`` for every test pass.
      snapshots: the ``.caffemodel`` paths written.
    """

    net: CaffeNet
    iteration: int
    losses: list[float]
    tests: list[tuple[int, int, dict[str, float]]]
    snapshots: list[str]


def open_net(
    path, *, phase: str, stages=(), level: int = 0, weights=None, seed: int | None = None
) -> tuple[CaffeNet, dict[str, Any]]:
    """A net and the data sources of its data layers.

    Returns:
      ``(net, sources)``: the :class:`~fnlayers.caffe.CaffeNet` (its data layers' tops are
      its inputs, shaped as the sources report) and ``{data layer name: batch iterator}``
      (each yields ``{top: array}``, from the source's first batch).
    """
    sources, shapes = {}, {}
    for name, layer in data_layers(path, phase=phase, stages=stages, level=level).items():
        src = caffe_data.data_source(layer, phase=phase, seed=seed)
        sources[name] = iter(src)
        shapes.update(src.shapes)
    net = load_net(
        path, weights, phase=phase, stages=stages, level=level, input_shapes=shapes or None
    )
    return net, sources


def run_train(
    solver,
    *,
    weights=None,
    snapshot=None,
    iterations: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> TrainResult:
    """Trains as ``caffe train`` does (module docstring).

    Args:
      solver: a :class:`~fnlayers.caffe.CaffeSolver` (:func:`~fnlayers.caffe.load_solver`).
      weights: a ``.caffemodel`` to start from (layers matched by name), or None.
      snapshot: a ``.solverstate`` written by an earlier run, to resume from.
      iterations: train to this iteration instead of the solver's ``max_iter``.
      log: where each log line goes.
      progress: draw a progress bar on stderr (for a terminal).
    """
    if weights is not None and snapshot is not None:
        raise ValueError("train: give weights or snapshot, not both")
    seed = solver.random_seed if solver.random_seed is not None and solver.random_seed >= 0 else 0
    train_path = solver.train_net_path()
    net, sources = open_net(
        train_path,
        phase="train",
        stages=solver.train_state.stages,
        level=solver.train_state.level,
        weights=weights,
        seed=seed,
    )
    tests = [
        open_net(path, phase="test", stages=st.stages, level=st.level, seed=seed)
        for path, st in zip(solver.test_net_paths(), solver.test_states(), strict=True)
    ]
    lr_mult, decay_mult = param_mults(net.model)
    optimizer = solver.optimizer(lr_mult=lr_mult, decay_mult=decay_mult)
    iter_size = solver.iter_size
    step = _make_step(net, optimizer, iter_size)
    loss_of = total_loss(net)
    final_loss = jax.jit(lambda p, s, x, k: loss_of(net.model.apply(p, s, x, key=k, train=True)[0]))
    ts = TrainState(net.params, net.state, optimizer.init(net.params), jax.random.key(seed))
    positions = {name: 0 for name in sources}
    start = 0
    if snapshot is not None:
        ts, start, positions = _restore(snapshot, ts)
        for name, src in sources.items():
            _skip(src, positions.get(name, 0))
    stop_iter = solver.max_iter if iterations is None else iterations
    losses: list[float] = []
    recent: deque[float] = deque(maxlen=max(1, solver.average_loss))
    test_log: list = []
    snaps: list[str] = []
    it = start
    stopping = _SigintFlag()
    evals = [_make_eval(t_net) for t_net, _ in tests]

    def do_tests(it, ts):
        for i, ((t_net, t_sources), run_eval) in enumerate(zip(tests, evals, strict=True)):
            log(f"Iteration {it}, Testing net (#{i})")
            params, state = _shared_weights(t_net, ts.params, ts.state)
            means = _mean_outputs(run_eval, params, state, t_sources, solver.test_iter[i])
            test_log.append((it, i, means))
            _log_outputs(log, "Test", t_net, means)

    def do_snapshot(it, ts):
        prefix = solver.snapshot_prefix or os.path.splitext(train_path)[0]
        model = f"{prefix}_iter_{it}.caffemodel"
        params, state = jax.device_get((ts.params, ts.state))
        save_caffemodel(model, net, params, state)
        state_path = f"{prefix}_iter_{it}.solverstate"
        _save_state(state_path, ts, it, positions, model)
        log(f"Snapshotting to binary proto file {model}")
        log(f"Snapshotting solver state to binary proto file {state_path}")
        snaps.append(model)

    with stopping:
        while it < stop_iter:
            if solver.test_interval and it % solver.test_interval == 0:
                if it > 0 or solver.test_initialization:
                    do_tests(it, ts)
            batch = _next_batches(sources, positions, iter_size)
            lr = float(optimizer.learning_rate_at(ts.opt_state))
            ts, metrics = step(ts, batch)
            loss = float(metrics["loss"])
            losses.append(loss)
            recent.append(loss)
            if solver.display and it % solver.display == 0:
                log(f"Iteration {it}, loss = {np.mean(recent):.6g}")
                outs = {k: float(v) for k, v in metrics.items() if k.startswith("out/")}
                _log_outputs(
                    log, "Train", net, {k.removeprefix("out/"): v for k, v in outs.items()}
                )
                log(f"Iteration {it}, lr = {lr:.6g}")
            it += 1
            if progress:
                _progress(it, stop_iter)
            if solver.snapshot and it % solver.snapshot == 0:
                do_snapshot(it, ts)
            if stopping.requested:
                log("Stopping at an interrupt; snapshotting")
                break
        if stopping.requested:
            if not (solver.snapshot and it % solver.snapshot == 0):
                do_snapshot(it, ts)
        else:
            if solver.snapshot_after_train and not (solver.snapshot and it % solver.snapshot == 0):
                do_snapshot(it, ts)
            if solver.display and it % solver.display == 0:
                # Caffe's Solve ends with one more forward pass, to log the final loss
                batch = _next_batches(sources, positions, 1)
                recent.append(float(final_loss(ts.params, ts.state, batch, ts.key)))
                log(f"Iteration {it}, loss = {np.mean(recent):.6g}")
            if solver.test_interval and it % solver.test_interval == 0:
                do_tests(it, ts)
    if progress:
        sys.stderr.write("\n")
    log("Optimization Done.")
    net = dataclasses.replace(net, params=ts.params, state=ts.state)
    return TrainResult(net, it, losses, test_log, snaps)


def run_test(
    model, weights, *, iterations: int = 50, stages=(), level: int = 0, log=print
) -> dict[str, float]:
    """``caffe test``: the TEST phase over ``iterations`` batches; logs each batch's outputs
    (``Batch i, NAME = VALUE``) and returns (and logs) each output's mean."""
    net, sources = open_net(model, phase="test", stages=stages, level=level, weights=weights)

    def each_batch(i, values):
        for name in net.outputs:
            log(f"Batch {i}, {name} = {values[name]:.6g}")

    means = _mean_outputs(
        _make_eval(net), net.params, net.state, sources, iterations, on_batch=each_batch
    )
    means = {name: means[name] for name in net.outputs}
    loss = sum(net.loss_weights.get(k, 0.0) * v for k, v in means.items())
    log(f"Loss: {loss:.6g}")
    for name, value in means.items():
        log(f"{name} = {value:.6g}{_loss_note(net, name, value)}")
    return means


# ----------------------------------------------------------------------------- pieces


def data_layers(path, *, phase: str, stages=(), level: int = 0) -> dict[str, dict]:
    """``{name: parsed layer}`` of the data layers a net keeps in ``phase`` (Caffe's
    NetStateRule filtering, as :func:`~fnlayers.caffe.load_net` applies it)."""
    with open(path, encoding="utf-8") as f:
        definition = upgrade_v1(parse(f.read()))
    caffe_phase = {"train": "TRAIN", "test": "TEST"}[phase]
    stages = tuple(stages) + tuple(first(definition, "state", {}).get("stage", []))
    return {
        first(layer, "name"): layer
        for layer in definition.get("layer", [])
        if first(layer, "type") in DATA_TYPES and included(layer, caffe_phase, stages, level)
    }


def total_loss(net: CaffeNet) -> Callable[[dict], jax.Array]:
    """``outputs -> sum over loss tops of loss_weight * sum(top)`` (Caffe's ``Net`` loss)."""
    weights = {k: w for k, w in net.loss_weights.items() if w}
    if not weights:
        raise ValueError("train: the train net has no loss (no top with a loss_weight)")

    def loss(outputs):
        return sum(np.float32(w) * jnp.sum(outputs[k]) for k, w in weights.items())

    return loss


def _make_step(net: CaffeNet, optimizer, iter_size: int):
    loss_of = total_loss(net)
    metrics = {f"out/{k}": (lambda o, y, k=k: jnp.mean(o[k])) for k in net.outputs}
    step = make_train_step(net.model, lambda outs, y: loss_of(outs), optimizer, metrics=metrics)

    def run(ts, batch):
        return step(ts, batch, None)

    return run


def _make_eval(net: CaffeNet):
    return jax.jit(lambda p, s, x: net.model.apply(p, s, x, train=False)[0])


def _shared_weights(test_net: CaffeNet, params, state):
    """The test net's params/state with the train net's for layers of the same name."""
    p = {k: params.get(k, v) for k, v in test_net.params.items()}
    s = {k: state.get(k, v) for k, v in test_net.state.items()}
    return p, s


def _mean_outputs(run_eval, params, state, sources, batches: int, on_batch=None):
    """Each output's mean over the next ``batches`` batches of ``sources`` (a test net's
    sources keep their position from one pass to the next, as Caffe's do);
    ``on_batch(i, {output: batch mean})`` sees each batch's values."""
    totals: dict[str, float] = {}
    for i in range(batches):
        outs = run_eval(params, state, _next_batches(sources, {}, 1, stack=False))
        values = {name: float(jnp.mean(value)) for name, value in outs.items()}
        if on_batch is not None:
            on_batch(i, values)
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value
    return {k: v / batches for k, v in totals.items()}


def _loss_note(net: CaffeNet, name: str, value: float) -> str:
    """Caffe's `` (* w = w*value loss)`` after an output with a loss weight."""
    w = net.loss_weights.get(name, 0.0)
    return f" (* {w:g} = {w * value:.6g} loss)" if w else ""


def _log_outputs(log, which: str, net: CaffeNet, values: dict[str, float]) -> None:
    for i, name in enumerate(net.outputs):
        if name in values:
            note = _loss_note(net, name, values[name])
            log(f"    {which} net output #{i}: {name} = {values[name]:.6g}{note}")


def _next_batches(sources, positions, count: int, *, stack: bool = True) -> dict:
    """The next ``count`` batches of every source, merged into one dict of tops (stacked on a
    new leading axis when ``stack``)."""
    batches = []
    for _ in range(count):
        merged = {}
        for name, src in sources.items():
            merged.update(next(src))
            positions[name] = positions.get(name, 0) + 1
        batches.append(merged)
    if not stack or count == 1:
        return batches[0]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _skip(source, batches: int) -> None:
    for _ in range(batches):
        next(source)


class _SigintFlag:
    """Within ``with``: SIGINT sets ``requested`` instead of raising (main thread only)."""

    requested = False

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():  # signal's requirement
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _progress(it: int, total: int) -> None:
    width = 30
    done = int(width * it / max(total, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {it}/{total}")
    sys.stderr.flush()


# ----------------------------------------------------------------------------- solverstate


def _save_state(path, ts: TrainState, iteration: int, positions, model_path) -> None:
    checkpoint.save(
        path,
        jax.device_get(ts),
        format=STATE_FORMAT,
        iteration=int(iteration),
        positions={k: int(v) for k, v in positions.items()},
        learned_net=os.path.basename(model_path),
    )


def _restore(path, template: TrainState):
    meta = checkpoint.load_metadata(path)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(
            f"train: snapshot={os.fspath(path)!r} is not a solverstate written by fnlayers train"
        )
    ts = checkpoint.load(path, like=template)
    return ts, int(meta["iteration"]), dict(meta["positions"])
