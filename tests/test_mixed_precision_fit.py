"""fit with a compute dtype and loss scaling: LeNet learns in bfloat16, float16 with a dynamic
scale skips its overflowing steps and resumes exactly, iter_size on a mesh keeps working, and a
non-finite loss still stops the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import checkpoint, data, losses, models, optim, precision, train


@pytest.fixture(scope="module")
def digits10():
    d = data.load_digits(10)
    return d.x_train[:512], d.y_train[:512]


def mlp():
    return fl.serial(fl.Dense(32, name="ip1"), fl.ReLU(), fl.Dense(10, name="ip2"))


def _floats(tree):
    return {a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


def test_lenet_learns_the_digits_in_bfloat16():
    d = data.load_digits(28)
    ts, history = train.fit(
        models.lenet(),
        losses.softmax_cross_entropy,
        optim.sgd(0.01, momentum=0.9),
        (d.x_train, d.y_train),
        batch_size=64,
        epochs=1,
        metrics={"accuracy": losses.accuracy},
        eval_data=(d.x_test, d.y_test),
        eval_batch_size=len(d.x_test),  # one batch shape: one compilation
        progress=False,
        compute_dtype=jnp.bfloat16,
    )
    # One epoch (22 steps) in float32 reaches 0.85 from this seed; docs/mixed-precision.md
    # compares longer runs.
    assert history.records[-1]["test_accuracy"] >= 0.75
    assert _floats((ts.params, ts.opt_state)) == {jnp.dtype(jnp.float32)}
    assert ts.loss_scale is None and "loss_scale" not in history.records[-1]


def _fp16_run(digits10, **kw):
    # A first scale of 2**24 makes the float16 gradient of the logits (up to 2**24 / 32)
    # overflow: the run skips steps until the scale is small enough, then doubles it every 4
    # finite steps and overflows again now and then.
    rule = precision.DynamicLossScale(init_scale=2.0**24, growth_interval=4)
    return train.fit(
        mlp(),
        losses.softmax_cross_entropy,
        optim.sgd(0.3, momentum=0.9),
        digits10,
        batch_size=32,
        iterations=24,
        seed=2,
        log_every=4,
        progress=False,
        compute_dtype=jnp.float16,
        loss_scale=rule,
        **kw,
    )


def test_float16_with_a_dynamic_scale_skips_overflows_and_resumes_exactly(digits10, tmp_path):
    full, full_history = _fp16_run(digits10)
    skipped = sum(r["skipped_steps"] for r in full_history.records)
    assert 4 <= skipped < 12  # 24 iterations: some skipped, not a stop
    scales = [r["loss_scale"] for r in full_history.records]
    assert scales[0] < 2.0**24 and all(s == 2.0 ** round(np.log2(s)) for s in scales)
    losses_seen = [r["loss"] for r in full_history.records]
    assert losses_seen[-1] < 0.5 * losses_seen[0]
    # The optimizer counted only the updates it made.
    assert int(full.opt_state.iteration) == 24 - skipped
    assert _floats((full.params, full.opt_state)) == {jnp.dtype(jnp.float32)}

    path = tmp_path / "run.npz"
    _fp16_run(digits10, checkpoint_path=path, stop_after=12)
    assert checkpoint.load_metadata(path)["iteration"] == 12
    resumed, resumed_history = _fp16_run(digits10, checkpoint_path=path)
    for a, b in ((resumed, full),):
        jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
        jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
        jax.tree.map(np.testing.assert_array_equal, a.loss_scale, b.loss_scale)
    # The records' windows line up with the checkpoint (every 4 iterations): equal records.
    keep = ("iteration", "loss", "loss_scale", "skipped_steps")
    assert [{k: r[k] for k in keep} for r in resumed_history.records] == [
        {k: r[k] for k in keep} for r in full_history.records
    ]
    # The checkpoint keeps the dtypes of the state: float32 master weights, int32 count.
    stored = checkpoint.load(path)
    assert stored["loss_scale"]["scale"].dtype == np.float32
    assert stored["loss_scale"]["good_steps"].dtype == np.int32


def test_iter_size_micro_batches_on_a_mesh_in_bfloat16(digits10):
    # The bfloat16 run takes the mesh path (stacked micro-batches placed on a one-device mesh);
    # the float32 run without a mesh is the reference.
    results = {}
    for dtype, mesh in ((None, None), (jnp.bfloat16, jax.make_mesh((1,), ("data",)))):
        results[dtype] = train.fit(
            mlp(),
            losses.softmax_cross_entropy,
            optim.sgd(0.1, momentum=0.9, iter_size=2),
            digits10,
            batch_size=16,
            iterations=3,
            seed=1,
            progress=False,
            compute_dtype=dtype,
            loss_scale="dynamic" if dtype else None,
            mesh=mesh,
        )
    (f32, f32_history), (bf16, bf16_history) = results[None], results[jnp.bfloat16]
    assert _floats(bf16.params) == {jnp.dtype(jnp.float32)}
    assert bf16_history.records[-1]["skipped_steps"] == 0
    assert int(bf16.loss_scale.good_steps) == 3
    assert bf16_history.records[-1]["loss"] == pytest.approx(f32_history.records[-1]["loss"], 2e-2)
    for a, b in zip(jax.tree.leaves(bf16.params), jax.tree.leaves(f32.params), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 2e-2 * float(jnp.max(jnp.abs(b)))


def test_a_non_finite_loss_still_stops_a_dynamically_scaled_run(digits10):
    x, y = digits10
    x = x.copy()
    x[:, 3, 3, 0] = np.nan  # every batch: the loss itself is NaN, not only a gradient
    with pytest.raises(train.NonFiniteLossError, match="became nan at iteration 0"):
        train.fit(
            mlp(),
            losses.softmax_cross_entropy,
            optim.sgd(0.1),
            (x, y),
            batch_size=32,
            iterations=5,
            progress=False,
            compute_dtype=jnp.float16,
            loss_scale="dynamic",
        )
