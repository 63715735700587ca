"""The matrix products alone of a whole CIFAR10-quick train step, against PyTorch's whole step.

For each convolution of Caffe's CIFAR10-quick at batch 100 this times, with
``fnlayers.bench.floor``, only the matrix products that ``conv2d(impl="im2col")`` runs in a train
step (forward ``cols·W``; backward ``colsᵀ·dY`` and, except for conv1 whose input is the data,
``dY·Wᵀ``) at the block shapes it runs them, with ``jnp`` and with ``torch.matmul``; then
PyTorch's whole train step of the same network (``fnlayers.bench.train``). If the products alone
take longer than PyTorch's whole step, an im2col network cannot reach it on this machine.

    python benchmarks/floor_step.py [--out benchmarks/results/YYYY-MM-DD-cpu-floor-step.json]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from fnlayers.bench import floor, train
from fnlayers.bench._harness import environment, markdown_table, publish, time_callable, time_jax
from fnlayers.bench.conv import ConvCase

BATCH = 100
LAYERS = (
    # name, case, whether the input gradient (dY·Wᵀ and col2im) is needed
    ("conv1", ConvCase("conv1", BATCH, 32, 32, 3, 32, 5, padding=2), False),
    ("conv2", ConvCase("conv2", BATCH, 16, 16, 32, 32, 5, padding=2), True),
    ("conv3", ConvCase("conv3", BATCH, 8, 8, 32, 64, 5, padding=2), True),
)


def _jax_products(case, with_dx, reps):
    shape = floor.block_shapes(case)
    g, m, k, o = shape["groups"], shape["m"], shape["k"], shape["o"]
    r = np.random.default_rng(0)
    cols, w, dy = (
        jnp.asarray(r.standard_normal(s).astype(np.float32))
        for s in ((g, m, k), (g, k, o), (g, m, o))
    )

    def products(cols, w, dy):
        out = [jnp.einsum("gmk,gko->gmo", cols, w), jnp.einsum("gmo,gmk->gok", dy, cols)]
        if with_dx:
            out.append(jnp.einsum("gmo,gko->gmk", dy, w))
        return out

    t = time_jax(products, cols, w, dy, reps=reps, warmup=2, min_time_s=0.5)
    return shape["blocks"] * t.median_s, shape


def _torch_products(torch, case, with_dx, reps, threads):
    shape = floor.block_shapes(case)
    torch.set_num_threads(threads)
    g, m, k, o = shape["groups"], shape["m"], shape["k"], shape["o"]
    cols, w, dy = (torch.randn(*s) for s in ((g, m, k), (g, k, o), (g, m, o)))

    def call():
        with torch.inference_mode():
            torch.matmul(cols, w)
            torch.matmul(dy.transpose(1, 2), cols)
            if with_dx:
                torch.matmul(dy, w.transpose(1, 2))

    t = time_callable(call, reps=reps, warmup=2, min_time_s=0.5)
    return shape["blocks"] * t.median_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON path (a .md table is written beside it)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    import torch

    case = next(m for m in train.MODELS if m.name == "cifar10_quick")
    torch_step, cfg = train.time_torch_step(torch, case, args.reps, 1.0, [2, 1])
    rows, layers = [], []
    for name, conv_case, with_dx in LAYERS:
        jax_s, shape = _jax_products(conv_case, with_dx, args.reps)
        torch_s = _torch_products(torch, conv_case, with_dx, args.reps, cfg["threads"])
        layers.append(
            {"layer": name, "blocks": shape, "jnp_ms": 1e3 * jax_s, "torch_ms": 1e3 * torch_s}
        )
        rows.append([name, str(shape), 1e3 * jax_s, 1e3 * torch_s])
    total_jax = sum(x["jnp_ms"] for x in layers)
    total_torch = sum(x["torch_ms"] for x in layers)
    step_ms = torch_step.median_ms
    rows.append(["**all convolutions**", "", total_jax, total_torch])
    rows.append(["PyTorch's whole step", cfg, step_ms, step_ms])
    rows.append(["products / PyTorch step", "", total_jax / step_ms, total_torch / step_ms])
    payload = {
        "suite": "floor-step",
        "model": "cifar10_quick",
        "batch": BATCH,
        "layers": layers,
        "products_ms": {"jnp": total_jax, "torch": total_torch},
        "torch_step_ms": step_ms,
        "torch_step_times_ms": torch_step.as_dict()["times_ms"],
        "torch_config": cfg,
        "environment": environment({"torch": torch.__version__}),
    }
    table = "CIFAR10-quick, batch 100: matrix products of the im2col convolutions alone (ms)\n\n"
    table += markdown_table(["layer", "blocks", "jnp", "torch.matmul"], rows)
    publish(payload, table, args.out, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
