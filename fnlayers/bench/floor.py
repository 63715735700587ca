"""The matrix products alone: a floor under any im2col + GEMM convolution.

For one conv case this times only the products that ``conv2d(impl="im2col")`` runs, at the
block shapes it runs them (``fnlayers.conv.blocking.plan_blocks``, the plan the convolution
itself follows), with no columns built: the forward product ``cols · W`` and, for
forward+backward, also ``colsᵀ · dY`` and ``dY · Wᵀ``. Random operands of those shapes stand in
for the real ones; the time of one block is multiplied by the number of blocks. The same
products are timed with ``torch.matmul`` (MKL/oneDNN GEMM) where PyTorch is importable. In a
``dtype`` other than float32 the operands are in it and the ``jnp`` products accumulate in
float32 (``preferred_element_type``), as the convolution's own products do.

If these products alone take longer than PyTorch's whole layer, no column construction can make
im2col + GEMM match it on that machine: the products are the part of the method that is left
when the columns cost nothing.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from fnlayers.bench._harness import time_callable, time_jax, torch_device, torch_sync
from fnlayers.conv.blocking import plan_blocks

if TYPE_CHECKING:
    from fnlayers.bench._harness import Timing
    from fnlayers.bench.conv import ConvCase

__all__ = ["block_shapes", "time_products_jax", "time_products_torch"]


def block_shapes(case: ConvCase, dtype: str = "float32") -> dict[str, int]:
    """``{"m", "k", "o", "groups", "blocks"}``: each block's column rows ``m``, the product's
    depth ``k`` and outputs ``o`` per group, and how many blocks one call runs in ``dtype``
    (the blocks are sized in bytes, so a 2-byte dtype gets twice the rows)."""
    plan = plan_blocks(
        (case.n, case.h, case.w, case.c_in),
        case.kernel,
        stride=case.stride,
        padding=case.padding,
        groups=case.groups,
        dtype=jnp.dtype(dtype),
    )
    groups, m, k = plan.cols_shape
    return {"m": m, "k": k, "o": case.c_out // groups, "groups": groups, "blocks": plan.blocks}


def _operands(shape, mode, seed=0):
    r = np.random.default_rng(seed)
    g, m, k, o = shape["groups"], shape["m"], shape["k"], shape["o"]
    cols = r.standard_normal((g, m, k)).astype(np.float32)
    w = r.standard_normal((g, k, o)).astype(np.float32)
    dy = r.standard_normal((g, m, o)).astype(np.float32)
    return (cols, w) if mode == "fwd" else (cols, w, dy)


def time_products_jax(
    case: ConvCase, mode: str, *, reps: int, min_time_s: float, dtype: str = "float32"
) -> tuple[Timing, dict[str, int]]:
    """``Timing`` of one call's products with ``jnp`` (batched over groups) on JAX's device,
    operands in ``dtype``."""
    shape = block_shapes(case, dtype)
    ops = [jnp.asarray(a, dtype) for a in _operands(shape, mode)]

    def einsum(spec, a, b):
        out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
        return out.astype(a.dtype)

    def products(cols, w, dy=None):
        y = einsum("gmk,gko->gmo", cols, w)
        if dy is None:
            return y
        dw = einsum("gmk,gmo->gko", cols, dy)  # colsᵀ·dY, as conv2d computes it
        dcols = einsum("gmo,gko->gmk", dy, w)
        return y, dw, dcols

    t = time_jax(products, *ops, reps=reps, warmup=2, min_time_s=min_time_s)
    return _scaled(t, shape["blocks"]), shape


def time_products_torch(
    torch: ModuleType,
    case: ConvCase,
    mode: str,
    *,
    reps: int,
    min_time_s: float,
    threads: int,
    dtype: str = "float32",
) -> Timing:
    """The same products with ``torch.matmul`` (``threads`` threads on the CPU), operands in
    ``dtype``."""
    shape = block_shapes(case, dtype)
    device = torch_device(torch)
    torch.set_num_threads(threads)
    tdtype = getattr(torch, dtype)
    ops = [torch.from_numpy(a).to(device, tdtype) for a in _operands(shape, mode)]

    def call():
        with torch.inference_mode():
            cols, w = ops[0], ops[1]
            out = [torch.matmul(cols, w)]
            if mode != "fwd":
                dy = ops[2]
                out.append(torch.matmul(dy.transpose(1, 2), cols))
                out.append(torch.matmul(dy, w.transpose(1, 2)))
        torch_sync(torch, device)
        return out

    t = time_callable(call, reps=reps, warmup=2, min_time_s=min_time_s)
    return _scaled(t, shape["blocks"])


def _scaled(timing, blocks):
    timing.times_s = [blocks * s for s in timing.times_s]
    timing.first_s *= blocks
    return timing
