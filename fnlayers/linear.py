"""Fully connected layers: Caffe's InnerProduct (docs/caffe-semantics.md §12) and flatten."""

from __future__ import annotations

import math

from fnlayers._checks import acc_dtype, check_float_array, check_same_dtype
from fnlayers._products import dot
from fnlayers._typing import Array, ArrayLike

__all__ = ["dense", "flatten"]


def dense(x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None) -> Array:
    """Caffe's InnerProduct with axis=1: every axis after the first is flattened.

    Args:
      x: ``(N, d1, ..., dk)`` floating array; ``K = d1 * ... * dk``.
      w: ``(K, C_out)``, the same dtype as ``x``. Caffe's ``(C_out, K)`` blob is ``w.T``; with
        ``transpose: true`` Caffe stores ``(K, C_out)``, exactly this layout.
      b: optional ``(C_out,)``.

    Returns:
      ``(N, C_out)``: ``flatten(x) @ w + b``, accumulated in float32 for lower precisions.
    """
    fn = "dense"
    check_float_array(x, fn=fn, name="x")
    check_same_dtype(x, w, fn=fn, names=("x", "w"))
    if x.ndim < 2:
        raise ValueError(f"dense: x must be (N, ...) with at least 2 axes, got shape {x.shape}")
    if w.ndim != 2:
        raise ValueError(f"dense: w must be (K, C_out), got shape {w.shape}")
    k = math.prod(x.shape[1:])
    if w.shape[0] != k:
        raise ValueError(
            f"dense: w.shape[0]={w.shape[0]} must equal K={k}, the product of x's trailing "
            f"axes {x.shape[1:]}"
        )
    acc = acc_dtype(x.dtype)
    y = dot(flatten(x), w, (((1,), (0,)), ((), ())), out_dtype=acc)
    if b is None:
        return y.astype(x.dtype)
    check_same_dtype(x, b, fn=fn, names=("x", "b"))
    if b.shape != (w.shape[1],):
        raise ValueError(f"dense: b has shape {b.shape}, expected ({w.shape[1]},)")
    # The bias is added to the float32 product (one rounding), and its gradient, the sum of dy
    # over the batch, is summed in float32.
    return (y + b.astype(acc).reshape(1, -1)).astype(x.dtype)


def flatten(x: ArrayLike) -> Array:
    """``(N, d1, ..., dk) -> (N, d1*...*dk)``, row-major (NHWC order for images)."""
    if x.ndim < 1:
        raise ValueError(f"flatten: x must have a batch axis, got shape {x.shape}")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))
