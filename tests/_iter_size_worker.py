"""Runs iter_size on a mesh of 2 forced CPU devices, in a fresh process.

Not a test module: ``tests/test_iter_size.py`` starts it as ``python tests/_iter_size_worker.py
OUT_JSON`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` set before jax is
imported, and reads the JSON it writes: the largest differences between fit with the mesh and
without, the error of a mesh step given a batch that is not stacked, and the shapes of the
devices' pieces of stacked batches as make_train_step and fit place them.
"""

from __future__ import annotations

import json
import sys


def main(out_path: str) -> None:
    import jax
    import numpy as np

    import fnlayers as fl
    from fnlayers import _sources, distributed, losses, optim, train

    d = fl.data.load_digits(10)
    x, y = d.x_train[:128], d.y_train[:128]
    mesh = jax.make_mesh((2,), ("data",))
    model = fl.serial(
        fl.Dense(16, name="ip1"), fl.BatchNorm(name="bn1"), fl.ReLU(), fl.Dense(10, name="ip2")
    )
    opt = optim.sgd(0.1, momentum=0.9, iter_size=2)
    kw = dict(batch_size=16, iterations=3, seed=2, progress=False, log_every=3)
    runs = {
        where: train.fit(model, losses.softmax_cross_entropy, opt, (x, y), mesh=m, **kw)
        for where, m in (("one", None), ("mesh", mesh))
    }

    step = train.make_train_step(model, losses.softmax_cross_entropy, opt, mesh=mesh)
    try:  # a batch that is not stacked is refused before it is placed
        step(None, x[:16], y[:16])
        refused = ""
    except ValueError as e:
        refused = str(e)

    dp = distributed.data_parallel(mesh)
    placed = _sources.shard_micro(dp, x[:32].reshape(2, 16, 10, 10, 1))  # make_train_step's
    source = _sources.batch_source((x, y), 16, 2, None, dp, 2)  # fit's
    _, xb, yb, _ = next(source.batches(0, 1))
    result = {
        "devices": jax.device_count(),
        "fit_params": _max_diff(runs["one"][0].params, runs["mesh"][0].params),
        "fit_state": _max_diff(runs["one"][0].state, runs["mesh"][0].state),
        "fit_loss": [r["loss"] for r in runs["one"][1].records + runs["mesh"][1].records],
        "iterations": int(np.asarray(runs["mesh"][0].opt_state.iteration)),
        "refused": refused,
        "pieces": [
            sorted(list(s.data.shape) for s in a.addressable_shards) for a in (placed, xb, yb)
        ],
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


def _max_diff(a, b):
    import jax
    import numpy as np

    diffs = jax.tree.map(
        lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


if __name__ == "__main__":
    main(sys.argv[1])
