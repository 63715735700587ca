"""Caffe's iter_size in fit and make_train_step: one update from k micro-batches (§9)."""

import json
import os
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import data, losses, optim, train

N = 256  # examples: 4 iterations of 64 per epoch
WORKER = os.path.join(os.path.dirname(__file__), "_iter_size_worker.py")


@pytest.fixture(scope="module")
def digits():
    d = data.load_digits(10)
    return d.x_train[:N], d.y_train[:N]


def mlp():
    return fl.serial(fl.Dense(16, name="ip1"), fl.ReLU(), fl.Dense(10, name="ip2"))


def bn_net():
    return fl.serial(
        fl.Dense(16, name="ip1"), fl.BatchNorm(name="bn1"), fl.ReLU(), fl.Dense(10, name="ip2")
    )


def solver(clip, iter_size=1):
    return optim.sgd(0.2, momentum=0.9, weight_decay=1e-3, clip_gradients=clip, iter_size=iter_size)


def _fit(train_data, opt, **kw):
    kw = dict(iterations=6, seed=1, progress=False, log_every=3, **kw)
    return train.fit(mlp(), losses.softmax_cross_entropy, opt, train_data, **kw)


def test_iter_size_4_of_16_trains_as_batches_of_64(digits):
    # Six iterations cross an epoch boundary. Caffe clips the *sum* of the k micro-batch
    # gradients, k times the mean gradient, so the same clipping needs a k times larger
    # threshold; 0.52 clips about half the iterations (global gradient norms 0.43 to 0.61).
    big, big_history = _fit(digits, solver(0.52), batch_size=64)
    acc, acc_history = _fit(digits, solver(2.08, iter_size=4), batch_size=16)

    # The same four micro-batches, read from an iterable: big-batch order, 16 at a time.
    def micro_batches():
        x, y = digits
        for it in range(6):
            epoch, b = divmod(it, N // 64)
            idx = data.epoch_order(N, seed=1, epoch=epoch)[b * 64 : (b + 1) * 64]
            for i in range(4):
                yield x[idx[16 * i : 16 * (i + 1)]], y[idx[16 * i : 16 * (i + 1)]]

    streamed, _ = _fit(micro_batches(), solver(2.08, iter_size=4))

    for other in (acc, streamed):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6),
            other.params,
            big.params,
        )
        assert int(other.opt_state.iteration) == 6  # one iteration is one update
    assert [r["iteration"] for r in acc_history.records] == [3, 6]
    assert [r["epoch"] for r in acc_history.records] == [r["epoch"] for r in big_history.records]
    np.testing.assert_allclose(
        [r["loss"] for r in acc_history.records],
        [r["loss"] for r in big_history.records],
        rtol=1e-5,
    )
    # the clipping threshold mattered: without scaling it, the runs differ
    unscaled, _ = _fit(digits, solver(0.52, iter_size=4), batch_size=16)
    assert not np.allclose(unscaled.params["ip1"]["w"], big.params["ip1"]["w"], atol=1e-5)


def test_micro_batches_thread_the_state_and_sum_the_gradients(rng, key):
    # Batch norm's running statistics go through the two micro-batches in order; the update
    # is plain SGD on the mean of their gradients; the loss is the mean of their losses.
    model, loss_fn = bn_net(), losses.softmax_cross_entropy
    x = rng.standard_normal((2, 8, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 10, (2, 8)).astype(np.int32)
    opt = optim.sgd(0.1, iter_size=2)
    ts = train.create_train_state(model, opt, (-1, 6, 6, 1), key)
    params, state = ts.params, ts.state

    grads, losses_, s = [], [], state
    for i in range(2):

        def micro_loss(p, s=s, i=i):
            out, new_s = model.apply(p, s, x[i], train=True)
            return loss_fn(out, y[i]), new_s

        (value, s), g = jax.jit(jax.value_and_grad(micro_loss, has_aux=True))(params)
        grads.append(g)
        losses_.append(value)
    want = jax.tree.map(lambda w, g0, g1: w - 0.1 * ((g0 + g1) / 2), params, *grads)

    step = train.make_train_step(model, loss_fn, opt, metrics={"n": lambda o, t: t.shape[0]})
    new, out = step(ts, x, y)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.params, want
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new.state, s)
    np.testing.assert_allclose(out["loss"], np.mean(losses_), rtol=1e-6)
    assert float(out["n"]) == 8.0  # metrics are means over the micro-batches too
    assert int(new.opt_state.iteration) == 1


def test_a_batch_not_stacked_by_iter_size_is_an_error(rng, key):
    model = mlp()
    opt = optim.sgd(0.1, iter_size=2)
    ts = train.create_train_state(model, opt, (-1, 6, 6, 1), key)
    step = train.make_train_step(model, losses.softmax_cross_entropy, opt, donate=False)
    x = rng.standard_normal((8, 6, 6, 1)).astype(np.float32)
    y = np.zeros(8, np.int32)
    message = r"make_train_step: the optimizer's iter_size=2 .* stacked as \(iter_size, batch"
    with pytest.raises(ValueError, match=message + r".*shape \(8, 6, 6, 1\)"):
        step(ts, x, y)
    with pytest.raises(ValueError, match=message + r".*shape \(4, 2, 6, 6, 1\)"):
        step(ts, x.reshape(4, 2, 6, 6, 1), y.reshape(4, 2))


def test_fit_needs_iter_size_batches_in_the_data(digits):
    with pytest.raises(ValueError, match=r"fit: batch_size=100 times the optimizer's iter_size=3"):
        _fit(digits, optim.sgd(0.1, iter_size=3), batch_size=100)


class _OptaxStyle(NamedTuple):
    init: Any
    update: Any


def test_an_optimizer_without_iter_size_takes_plain_batches(rng, key):
    # from_optax has no iter_size: one plain (batch, ...) batch per step, as iter_size=1.
    tx = _OptaxStyle(lambda p: (), lambda g, s, p=None: (jax.tree.map(lambda a: -0.1 * a, g), s))
    model, loss_fn = mlp(), losses.softmax_cross_entropy
    x = rng.standard_normal((8, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    plain = optim.sgd(0.1)
    ts = train.create_train_state(model, plain, (-1, 6, 6, 1), key)
    want, want_out = train.make_train_step(model, loss_fn, plain, donate=False)(ts, x, y)
    adapted = optim.from_optax(tx)
    ts = ts._replace(opt_state=adapted.init(ts.params))
    got, out = train.make_train_step(model, loss_fn, adapted, donate=False)(ts, x, y)
    np.testing.assert_allclose(out["loss"], want_out["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got.params, want.params)
    assert jnp.shape(out["loss"]) == ()


def test_iter_size_on_a_two_device_mesh_equals_one_device(tmp_path):
    # Each micro-batch is split over the data axis; batch norm sees each micro-batch whole.
    out = tmp_path / "iter_size.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, WORKER, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 2 and r["iterations"] == 3
    # only the order of floating-point sums differs
    assert r["fit_params"] < 1e-5 and r["fit_state"] < 1e-5
    np.testing.assert_allclose(r["fit_loss"][:1], r["fit_loss"][1:], rtol=1e-5)
    assert "iter_size=2 makes one step run 2 micro-batches" in r["refused"]
    # every device holds its half of each of the 2 micro-batches of 16
    x_pieces, y_pieces = [[2, 8, 10, 10, 1]] * 2, [[2, 8]] * 2
    assert r["pieces"] == [x_pieces, x_pieces, y_pieces]
