"""Runs data-parallel checks in a fresh process with several (forced) CPU devices.

Not a test module: ``tests/test_distributed.py`` starts it with ``XLA_FLAGS`` set before jax
is imported, as ``python tests/_dp_worker.py MODE OUT_JSON [args]``, and reads the JSON it
writes. Modes:

* ``mesh``: one process, 4 devices: fit with a mesh against fit without, per-device batch
  norm against a loop over the slices, iterables against arrays, predict/evaluate, errors.
* ``process RANK PORT DIR``: one of two processes (2 devices each) of a multi-process run.
* ``die RANK PORT DIR``: as ``process``, but rank 1 exits abruptly in the middle of training.
"""

from __future__ import annotations

import json
import os
import sys


def _digits():
    import fnlayers as fl

    d = fl.data.load_digits(28)
    return d.x_train[:192], d.y_train[:192], d.x_test[:50], d.y_test[:50]


def _small_bn_net():
    import fnlayers as fl

    return fl.serial(
        fl.Conv2D(6, 3, name="conv1"),
        fl.BatchNorm(name="bn1"),
        fl.ReLU(),
        fl.MaxPool(2, stride=2),
        fl.Dropout(0.25, name="drop"),
        fl.Dense(10, name="ip1"),
    )


def _max_diff(a, b):
    import jax
    import numpy as np

    diffs = jax.tree.map(
        lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def _fit(model, data, **kw):
    import fnlayers as fl

    x, y, xt, yt = data
    kw.setdefault("batch_size", 32)
    kw.setdefault("iterations", 5)
    if kw.pop("evaluate", True):
        # batches of 20, 20 and 10 test examples: split over 4 devices, and run whole
        kw.update(eval_data=(xt, yt), eval_batch_size=20, eval_every=kw.pop("eval_every", 5))
    return fl.train.fit(
        model,
        fl.losses.softmax_cross_entropy,
        fl.optim.sgd(0.05, momentum=0.9, weight_decay=5e-4),
        kw.pop("train_data", (x, y)),
        metrics={"accuracy": fl.losses.accuracy},
        log_every=kw.pop("log_every", 5),
        progress=False,
        **kw,
    )


def mesh_checks():
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fnlayers as fl

    out = {"devices": jax.device_count()}
    mesh = jax.make_mesh((4,), ("data",))
    data = _digits()

    # fit with a mesh computes the single-device run (LeNet on 12x12 digits; a BN net)
    for name, make in (("lenet", fl.models.lenet), ("bn_dropout", _small_bn_net)):
        a, ha = _fit(make(), data)
        b, hb = _fit(make(), data, mesh=mesh)
        out[f"fit_{name}"] = {
            "params": _max_diff(a.params, b.params),
            "state": _max_diff(a.state, b.state),
            "loss": [r.get("loss") for r in ha.records] + [r.get("loss") for r in hb.records],
            "test_accuracy": [ha.records[-1]["test_accuracy"], hb.records[-1]["test_accuracy"]],
            "replicated": bool(jax.tree.leaves(b.params)[0].sharding.is_fully_replicated),
            "num_devices": len(jax.tree.leaves(b.params)[0].sharding.device_set),
        }

    # cifar10_bn from the model zoo: global batch-norm statistics by default
    rng = np.random.default_rng(0)
    xc = rng.normal(size=(64, 32, 32, 3)).astype(np.float32)
    yc = rng.integers(0, 10, 64).astype(np.int32)
    cdata = (xc, yc, xc[:16], yc[:16])
    cifar = dict(batch_size=16, iterations=3, evaluate=False)
    a, _ = _fit(fl.models.cifar10_bn(), cdata, **cifar)
    b, _ = _fit(fl.models.cifar10_bn(), cdata, mesh=mesh, **cifar)
    out["fit_cifar10_bn"] = {
        "params": _max_diff(a.params, b.params),
        "state": _max_diff(a.state, b.state),
        "scale": max(float(np.max(np.abs(v))) for v in jax.tree.leaves(a.params)),
    }

    # per-device batch norm: one step against a loop over the 4 slices on one device
    model = _small_bn_net()
    loss_fn = fl.losses.softmax_cross_entropy
    opt = fl.optim.sgd(0.1)
    x, y = data[0][:32], data[1][:32]
    ts = fl.train.create_train_state(model, opt, (-1, 28, 28, 1), jax.random.key(3))
    step = fl.train.make_train_step(
        model, loss_fn, opt, mesh=mesh, batch_norm="per_device", donate=False
    )
    got, metrics = step(ts, x, y)
    _, step_key = jax.random.split(ts.key)
    keys = jax.random.split(step_key, 4)

    def reference_loss(params):
        outs, states = [], []
        for i in range(4):
            o, s = model.apply(params, ts.state, x[8 * i : 8 * i + 8], key=keys[i], train=True)
            outs.append(o)
            states.append(s)
        mean_state = jax.tree.map(lambda *s: sum(s) / 4, *states)
        return loss_fn(jnp.concatenate(outs), y), mean_state

    (ref_loss, ref_state), grads = jax.value_and_grad(reference_loss, has_aux=True)(ts.params)
    ref_params, _ = opt.update(grads, ts.opt_state, ts.params)
    out["per_device"] = {
        "loss": [float(metrics["loss"]), float(ref_loss)],
        "params": _max_diff(got.params, ref_params),
        "state": _max_diff(got.state, ref_state),
    }
    # ... and it differs from the global statistics the default uses
    glob = fl.train.make_train_step(model, loss_fn, opt, mesh=mesh, donate=False)
    g_ts, g_metrics = glob(ts, x, y)
    out["per_device"]["vs_global"] = {
        "state": _max_diff(g_ts.state, got.state),
        "loss": abs(float(g_metrics["loss"]) - float(metrics["loss"])),
    }

    # a BatchNorm that names the data axis: global statistics, with or without a mesh
    def axis_net():
        return fl.serial(
            fl.Conv2D(6, 3, name="conv1"),
            fl.BatchNorm(axis_name="data", name="bn1"),
            fl.ReLU(),
            fl.Dense(10, name="ip1"),
        )

    def plain_net():
        return fl.serial(
            fl.Conv2D(6, 3, name="conv1"),
            fl.BatchNorm(name="bn1"),
            fl.ReLU(),
            fl.Dense(10, name="ip1"),
        )

    short = dict(iterations=3, evaluate=False)
    a, _ = _fit(plain_net(), data, **short)
    b, _ = _fit(axis_net(), data, **short)
    c, _ = _fit(axis_net(), data, mesh=mesh, **short)
    d, _ = _fit(axis_net(), data, mesh=mesh, batch_norm="per_device", **short)
    out["axis_name"] = {
        "no_mesh": _max_diff(a.params, b.params),
        "mesh": _max_diff(a.params, c.params),
        "per_device_mesh": _max_diff(a.state, d.state),
    }

    # an iterable of batches (fit's own order) equals the arrays
    x, y = data[0], data[1]

    def batches():
        epoch = 0
        while True:
            yield from fl.data.batches(x, y, 32, seed=0, epoch=epoch, drop_last=True)
            epoch += 1

    a, _ = _fit(fl.models.lenet(), data, iterations=8, mesh=mesh, evaluate=False)
    b, _ = _fit(
        fl.models.lenet(),
        data,
        iterations=8,
        mesh=mesh,
        evaluate=False,
        train_data=batches(),
        batch_size=None,
    )
    out["iterable_mesh"] = _max_diff(a.params, b.params)

    # predict and evaluate split their batches (and run an uneven last batch whole)
    model = fl.models.lenet()
    ts = fl.train.create_train_state(model, opt, (-1, 28, 28, 1), jax.random.key(0))
    p1 = fl.train.predict(model, ts.params, ts.state, data[2], batch_size=16)
    p2 = fl.train.predict(model, ts.params, ts.state, data[2], batch_size=16, mesh=mesh)
    out["predict"] = float(np.max(np.abs(p1 - p2)))
    # without a mesh; a step made with the mesh; a plain step placed by evaluate's mesh
    evaluations = [
        (fl.train.make_eval_step(model, loss_fn), None),
        (fl.train.make_eval_step(model, loss_fn, mesh=mesh), None),
        (fl.train.make_eval_step(model, loss_fn), mesh),
    ]
    out["evaluate"] = [
        fl.train.evaluate(step, ts.params, ts.state, data[2], data[3], batch_size=16, mesh=m)[
            "loss"
        ]
        for step, m in evaluations
    ]

    # errors name the argument and the value
    errors = {}
    for label, call in {
        "indivisible": lambda: _fit(fl.models.lenet(), data, batch_size=30, mesh=mesh),
        "axis": lambda: _fit(fl.models.lenet(), data, mesh=mesh, data_axis="batch"),
        "mode": lambda: _fit(fl.models.lenet(), data, mesh=mesh, batch_norm="local"),
        "not_a_mesh": lambda: _fit(fl.models.lenet(), data, mesh=jax.devices()),
    }.items():
        try:
            call()
            errors[label] = None
        except (TypeError, ValueError) as e:
            errors[label] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    return out


def process_run(rank, port, directory, die=False, disagree=False):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{port}", num_processes=2, process_id=rank, heartbeat_timeout_seconds=5
    )
    import numpy as np

    import fnlayers as fl

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    data = _digits()
    ckpt_dir = os.path.join(directory, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    ckpt = os.path.join(ckpt_dir, "run.ckpt")
    out = {"process_count": jax.process_count(), "devices": jax.device_count()}
    if disagree:
        # the same relative path names a file in process 0's working directory only
        os.chdir(os.path.join(directory, f"cwd-{rank}"))
        if rank == 0:
            fl.checkpoint.save("run.ckpt", {"x": np.zeros(1)}, iteration=1, history=[])
        try:
            _fit(fl.models.lenet(), data, iterations=2, mesh=mesh, checkpoint_path="run.ckpt")
        except ValueError as e:
            out["error"] = str(e)
        return out
    if die:

        def dying(xb, yb, rng):
            if rank == 1 and rng is not None and len(out.setdefault("calls", [])) == 3:
                os._exit(7)
            out.setdefault("calls", []).append(1)
            return xb, yb

        _fit(fl.models.lenet(), data, iterations=200, mesh=mesh, augment=dying, evaluate=False)
        return out
    # interrupted after 3 iterations, then resumed from process 0's checkpoint to 6
    _fit(
        fl.models.lenet(),
        data,
        iterations=6,
        mesh=mesh,
        checkpoint_path=ckpt,
        checkpoint_every=3,
        stop_after=3,
    )
    out["files_after_first_call"] = sorted(os.listdir(ckpt_dir))
    ts, history = _fit(
        fl.models.lenet(), data, iterations=6, mesh=mesh, checkpoint_path=ckpt, checkpoint_every=3
    )
    host = jax.tree.map(np.asarray, fl.distributed.data_parallel(mesh).to_host(ts.params))
    np.savez(
        os.path.join(directory, f"params-{rank}.npz"),
        **{str(i): a for i, a in enumerate(jax.tree.leaves(host))},
    )
    out["losses"] = [r.get("loss") for r in history.records]
    out["test_accuracy"] = history.records[-1]["test_accuracy"]
    jax.distributed.shutdown()
    return out


def single_process_reference(directory):
    """The same run as ``process_run`` in one process on one device, uninterrupted."""
    import jax
    import numpy as np

    import fnlayers as fl

    ts, history = _fit(fl.models.lenet(), _digits(), iterations=6)
    np.savez(
        os.path.join(directory, "params-reference.npz"),
        **{str(i): np.asarray(a) for i, a in enumerate(jax.tree.leaves(ts.params))},
    )
    return {
        "losses": [r.get("loss") for r in history.records],
        "test_accuracy": history.records[-1]["test_accuracy"],
    }


if __name__ == "__main__":
    mode, out_path = sys.argv[1], sys.argv[2]
    if mode == "mesh":
        result = mesh_checks()
    elif mode == "reference":
        result = single_process_reference(sys.argv[3])
    else:
        rank, port, directory = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        result = process_run(rank, port, directory, die=mode == "die", disagree=mode == "disagree")
    with open(out_path, "w") as f:
        json.dump(result, f)
