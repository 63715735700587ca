"""End-to-end training: fit on real digits, exact resume, non-finite stop, label checks."""

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import checkpoint, data, losses, models, optim, schedules, train


@pytest.fixture(scope="module")
def digits12():
    d = data.load_digits(12)
    return d


def small_net():
    return fl.serial(
        fl.Conv2D(8, 3, name="conv1"),
        fl.MaxPool(2, stride=2, name="pool1"),
        fl.ReLU(name="relu1"),
        fl.Dropout(0.2, name="drop1"),
        fl.Dense(10, name="ip1"),
    )


def test_lenet_learns_digits(tmp_path):
    d = data.load_digits(28)
    model = models.lenet()
    lr_mult, decay_mult = fl.param_mults(model)
    solver = optim.sgd(
        schedules.inv(0.01, gamma=1e-4, power=0.75),
        momentum=0.9,
        weight_decay=5e-4,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )
    _, history = train.fit(
        model,
        losses.softmax_cross_entropy,
        solver,
        (d.x_train, d.y_train),
        batch_size=64,
        epochs=4,
        metrics={"accuracy": losses.accuracy},
        eval_data=(d.x_test, d.y_test),
        progress=False,
    )
    tests = [r["test_accuracy"] for r in history.records if "test_accuracy" in r]
    assert len(tests) == 4
    assert tests[-1] >= 0.9
    first = history.records[0]
    assert first["lr"] == pytest.approx(0.01 * (1 + 1e-4 * 0) ** -0.75, rel=1e-3)
    history.save_json(tmp_path / "h.json")
    history.save_csv(tmp_path / "h.csv")
    assert json.loads((tmp_path / "h.json").read_text())[-1]["test_accuracy"] == tests[-1]
    header = (tmp_path / "h.csv").read_text().splitlines()[0].split(",")
    assert {"iteration", "loss", "accuracy", "test_accuracy"} <= set(header)


def _fit(digits12, **kw):
    model = small_net()
    solver = optim.sgd(0.05, momentum=0.9, weight_decay=1e-4)
    return train.fit(
        model,
        losses.softmax_cross_entropy,
        solver,
        (digits12.x_train, digits12.y_train),
        batch_size=50,
        iterations=60,  # 28 steps per epoch: the run crosses two epoch boundaries
        seed=3,
        progress=False,
        log_every=5,
        eval_every=20,
        eval_data=(digits12.x_test, digits12.y_test),
        augment=data.random_shift(1),
        **kw,
    )


def test_resume_is_bit_identical(digits12, tmp_path):
    ts_full, hist_full = _fit(digits12)
    path = tmp_path / "run.npz"
    _fit(digits12, checkpoint_path=path, checkpoint_every=10, stop_after=37)
    assert checkpoint.load_metadata(path)["iteration"] == 37
    ts_resumed, hist_resumed = _fit(digits12, checkpoint_path=path, checkpoint_every=10)
    jax.tree.map(np.testing.assert_array_equal, ts_resumed.params, ts_full.params)
    jax.tree.map(np.testing.assert_array_equal, ts_resumed.opt_state, ts_full.opt_state)
    np.testing.assert_array_equal(
        jax.random.key_data(ts_resumed.key), jax.random.key_data(ts_full.key)
    )
    assert [r["iteration"] for r in hist_resumed.records] == [
        r["iteration"] for r in hist_full.records
    ]
    # evaluations see identical params; the training-loss window right after the resume
    # averages only the steps run since, so only the evaluations are compared exactly
    assert hist_resumed.records[-1]["test_loss"] == hist_full.records[-1]["test_loss"]
    assert checkpoint.load_metadata(path)["iteration"] == 60


def test_non_finite_loss_stops_and_keeps_last_checkpoint(digits12, tmp_path):
    # The learning rate explodes at iteration 12: the loss goes non-finite a step or two later.
    blow_up = lambda it: jnp.where(it < 12, 0.05, 1e30).astype(jnp.float32)
    path = tmp_path / "run.npz"
    with pytest.raises(
        train.NonFiniteLossError, match=r"became (nan|inf) at iteration 1[2-9]"
    ) as e:
        train.fit(
            small_net(),
            losses.softmax_cross_entropy,
            optim.sgd(blow_up, momentum=0.9),
            (digits12.x_train, digits12.y_train),
            batch_size=50,
            iterations=40,
            checkpoint_path=path,
            checkpoint_every=5,
            progress=False,
        )
    assert e.value.checkpoint == path and str(path) in str(e.value)
    iteration = checkpoint.load_metadata(path)["iteration"]
    assert iteration == 5 * (e.value.iteration // 5) and iteration <= e.value.iteration
    restored = checkpoint.load(path)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(restored["params"]))
    assert not os.path.exists(str(path) + ".tmp")


def test_labels_outside_the_classes_are_rejected_before_training(digits12):
    y = digits12.y_train.copy()
    y[7] = 10
    with pytest.raises(ValueError, match=r"label 10 at index 7, outside the model's 10 classes"):
        train.fit(
            small_net(),
            losses.softmax_cross_entropy,
            optim.sgd(0.1),
            (digits12.x_train, y),
            batch_size=50,
            iterations=1,
            progress=False,
        )


def test_fit_argument_errors(digits12):
    args = (small_net(), losses.softmax_cross_entropy, optim.sgd(0.1))
    xy = (digits12.x_train, digits12.y_train)
    with pytest.raises(ValueError, match="exactly one of iterations"):
        train.fit(*args, xy, batch_size=10, progress=False)
    with pytest.raises(ValueError, match="batch_size=0 must be an int"):
        train.fit(*args, xy, batch_size=0, iterations=1, progress=False)
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        train.fit(*args, (digits12.x_train, digits12.y_train[:-1]), batch_size=10, iterations=1)


def test_train_step_donates_and_threads_the_key(digits12, key):
    model = small_net()
    solver = optim.sgd(0.1)
    ts = train.create_train_state(model, solver, (-1, 12, 12, 1), key)
    step = train.make_train_step(model, losses.softmax_cross_entropy, solver)
    x, y = digits12.x_train[:8], digits12.y_train[:8]
    old_key = jax.random.key_data(ts.key)
    ts2, metrics = step(ts, x, y)
    assert ts.params["conv1"]["w"].is_deleted()  # donated
    assert not np.array_equal(jax.random.key_data(ts2.key), old_key)
    assert set(metrics) == {"loss", "lr"} and np.isfinite(metrics["loss"])
    evaluate = train.make_eval_step(
        model, losses.softmax_cross_entropy, metrics={"acc": losses.accuracy}
    )
    result = train.evaluate(
        evaluate, ts2.params, ts2.state, digits12.x_test, digits12.y_test, batch_size=64
    )
    assert set(result) == {"loss", "acc"} and 0.0 <= result["acc"] <= 1.0


def _in_training(fn, name):
    """A parameter-free layer that applies ``fn`` to its input in training mode only (its
    init traces nothing, so ``fn`` may use a mesh axis name)."""

    def init(key, in_shape):
        return in_shape, {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return (fn(x) if train else x), state

    return fl.layers.Layer(init, apply, name=name, kind="custom")


def _one_step(model, digits12, key):
    solver = optim.sgd(0.1)
    ts = train.create_train_state(model, solver, (-1, 12, 12, 1), key)
    step = train.make_train_step(model, losses.softmax_cross_entropy, solver)
    _, metrics = step(ts, digits12.x_train[:8], digits12.y_train[:8])
    return float(metrics["loss"])


def test_the_train_step_binds_the_data_axis_for_a_layer_that_uses_it(digits12, key):
    # psum of 1 over the axis is its size: 1 without a mesh, and only legal with the axis bound
    by_axis_size = _in_training(lambda x: x / jax.lax.psum(1, "data"), "scale")
    plain = _one_step(fl.serial(_in_training(lambda x: x, "scale"), small_net()), digits12, key)
    assert _one_step(fl.serial(by_axis_size, small_net()), digits12, key) == plain


def test_a_name_error_inside_a_layer_reaches_the_caller(digits12, key):
    def broken(x):
        return x * undefined_scale  # noqa: F821

    with pytest.raises(NameError, match="undefined_scale"):
        _one_step(fl.serial(_in_training(broken, "broken"), small_net()), digits12, key)


def test_train_step_reports_per_layer_gradient_norms_and_finiteness(digits12, key):
    model = small_net()
    solver = optim.sgd(0.1)
    loss_fn = losses.softmax_cross_entropy
    ts = train.create_train_state(model, solver, (-1, 12, 12, 1), key)
    x, y = digits12.x_train[:8], digits12.y_train[:8]
    # the step's own gradient: same params, same step key (dropout draws from it)
    _, step_key = jax.random.split(ts.key)
    grads = jax.jit(
        jax.grad(lambda p: loss_fn(model.apply(p, ts.state, x, key=step_key, train=True)[0], y))
    )(ts.params)
    step = train.make_train_step(model, loss_fn, solver, grad_norms=True, grad_finite=True)
    _, metrics = step(ts, x, y)
    assert set(metrics) == {"loss", "lr", "grad_norm", "grad_finite"}
    assert set(metrics["grad_norm"]) == set(metrics["grad_finite"]) == {"conv1", "ip1"}
    for layer in ("conv1", "ip1"):
        expected = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads[layer])))
        assert float(metrics["grad_norm"][layer]) == pytest.approx(float(expected), rel=1e-5)
        assert bool(metrics["grad_finite"][layer])
    with pytest.raises(TypeError, match="grad_norms='yes' must be a bool"):
        train.make_train_step(model, loss_fn, solver, grad_norms="yes")


def test_non_finite_loss_names_the_layer_nearest_the_loss(digits12):
    # a rate of 1e30 from iteration 12 makes the next forward pass overflow: every gradient of
    # that step is NaN, and the backward pass reaches ip1 (the classifier) first
    blow_up = lambda it: jnp.where(it < 12, 0.05, 1e30).astype(jnp.float32)
    with pytest.raises(train.NonFiniteLossError) as e:
        train.fit(
            small_net(),
            losses.softmax_cross_entropy,
            optim.sgd(blow_up, momentum=0.9),
            (digits12.x_train, digits12.y_train),
            batch_size=50,
            iterations=40,
            progress=False,
        )
    assert e.value.layer == "ip1"
    assert e.value.layer_iteration in (e.value.iteration - 1, e.value.iteration)
    assert "in layer 'ip1'" in str(e.value) and "non-finite in: ip1" in str(e.value)


def test_predict_matches_apply_in_batches(digits12, key):
    model = small_net()
    ts = train.create_train_state(model, optim.sgd(0.1), (-1, 12, 12, 1), key)
    x = digits12.x_test[:23]
    got = train.predict(model, ts.params, ts.state, x, batch_size=10)
    want, _ = model.apply(ts.params, ts.state, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        train.predict(model, ts.params, ts.state, x, batch_size=0)


def test_create_train_state_matches_an_eager_init(key):
    model = small_net()
    ts = train.create_train_state(model, optim.sgd(0.1, momentum=0.9), (-1, 12, 12, 1), key)
    k_init, _ = jax.random.split(key)
    _, params, _ = model.init(k_init, (-1, 12, 12, 1))
    jax.tree.map(np.testing.assert_array_equal, ts.params, params)


class _OptaxStyle(NamedTuple):
    """An optax-style GradientTransformation written by hand (optax is not a dependency):
    ``update`` returns updates to add to the parameters, not new parameters."""

    init: Any
    update: Any


def _optax_style_sgd(rate):
    def update(grads, state, params=None):
        return jax.tree.map(lambda g: -rate * g, grads), state

    return _OptaxStyle(lambda params: (), update)


def test_an_optax_style_transformation_trains_in_fit_when_wrapped(digits12):
    xy = (digits12.x_train, digits12.y_train)
    kw = dict(batch_size=50, iterations=12, progress=False, log_every=4)
    args = (small_net(), losses.softmax_cross_entropy)
    wrapped, hw = train.fit(
        *args, optim.from_optax(_optax_style_sgd(0.1), learning_rate=0.1), xy, **kw
    )
    plain, _ = train.fit(*args, optim.sgd(0.1), xy, **kw)
    # plain SGD without momentum is w - lr*g in both spellings
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        wrapped.params,
        plain.params,
    )
    assert hw.records[-1]["loss"] < hw.records[0]["loss"]
    assert hw.records[0]["lr"] == pytest.approx(0.1)


def test_an_optax_style_transformation_passed_bare_is_a_type_error(digits12):
    xy = (digits12.x_train, digits12.y_train)
    with pytest.raises(TypeError, match="from_optax"):
        train.fit(
            small_net(),
            losses.softmax_cross_entropy,
            _optax_style_sgd(0.1),
            xy,
            batch_size=50,
            iterations=2,
            progress=False,
        )
    with pytest.raises(TypeError, match="from_optax"):
        train.make_train_step(small_net(), losses.softmax_cross_entropy, _optax_style_sgd(0.1))
