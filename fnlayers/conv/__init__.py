"""Convolution as im2col followed by one matrix product (docs/caffe-semantics.md §1, §2).

Layouts: activations NHWC, weights HWIO ``(KH, KW, C_in // groups, C_out)``. The column matrix
of :func:`im2col` is ``(N, OH, OW, KH*KW*C)`` with columns ordered ``(kh, kw, c)``, so for
``groups=1``::

    conv2d(x, w) == im2col(x, w.shape[:2], ...) @ w.reshape(-1, C_out)

``im2col`` and ``col2im`` are registered as a pair of linear JAX primitives, each the transpose
of the other. Autodiff of ``conv2d`` therefore gives the backward pass the design asks for: two
matrix products (``dW = colsᵀ·dY``, ``dcols = dY·Wᵀ``) and one ``col2im``, never autodiff of
the slices that build the columns; forward mode, higher orders, ``jit``, ``vmap``, ``pmap`` and
``shard_map`` all work, as does a whole-batch program on a sharded batch under ``jax.set_mesh``.
When a layer's column matrix is large, ``conv2d`` runs that same im2col + product over blocks of
the batch (or of output rows) sized to stay in cache, rebuilding each block's columns in the
backward pass. The products go through :func:`fnlayers._products.dot`: float32 accumulation, and
for bfloat16/float16 operands backward products in that dtype too (reverse mode only: ``jax.jvp``
of a low-precision convolution raises). ``impl="xla"`` computes the same convolution with
``lax.conv_general_dilated``, the baseline every benchmark compares against.

Modules: :mod:`~fnlayers.conv.ops` (the public ops), :mod:`~fnlayers.conv.shapes` (Caffe's shape
rules), :mod:`~fnlayers.conv.primitives` (``im2col_p``, ``col2im_p``: their column builds and
rules), :mod:`~fnlayers.conv.blocking` (:func:`~fnlayers.conv.blocking.plan_blocks`, the CPU
blocking), :mod:`~fnlayers.conv.folding` (a strided layer of few channels as a stride-1
convolution of the image cut into stride tiles).
"""

from __future__ import annotations

import sys
import types

# Besides the public names: internals that pooling (_per_example, im2col_p) and tests import.
from fnlayers.conv import blocking
from fnlayers.conv.blocking import _tiling, _two_stage  # noqa: F401
from fnlayers.conv.ops import (
    IMPLS,
    _per_example,  # noqa: F401
    col2im,
    conv2d,
    conv_transpose2d,
    im2col,
)
from fnlayers.conv.primitives import col2im_p, im2col_p  # noqa: F401
from fnlayers.conv.shapes import conv_output_shape, conv_output_size, conv_transpose_output_shape

__all__ = [
    "IMPLS",
    "col2im",
    "conv2d",
    "conv_output_shape",
    "conv_output_size",
    "conv_transpose2d",
    "conv_transpose_output_shape",
    "im2col",
]


def _planner_attribute(name):
    return property(
        lambda module: getattr(blocking, name),
        lambda module, value: setattr(blocking, name, value),
    )


class _ConvModule(types.ModuleType):
    """``fnlayers.conv``: the planner's budgets and backend test read and assigned here are
    ``blocking``'s own, so assigning ``fnlayers.conv._BLOCK_BYTES`` (as tests that force tiling
    on small shapes do) changes the blocks ``conv2d`` runs."""

    _BLOCK_BYTES = _planner_attribute("_BLOCK_BYTES")
    _TILE_ABOVE_BYTES = _planner_attribute("_TILE_ABOVE_BYTES")
    _tile_for_cache = _planner_attribute("_tile_for_cache")


sys.modules[__name__].__class__ = _ConvModule
del sys, types
