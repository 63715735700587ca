"""How ``conv2d(impl="im2col")`` blocks a convolution on the CPU: :func:`plan_blocks`.

A layer's whole column matrix is tens to hundreds of MB; built in one piece it runs out of cache
and, above glibc's mmap threshold, into freshly page-faulted memory on every call. Above
``_TILE_ABOVE_BYTES`` of columns the convolution therefore runs over blocks of about
``_BLOCK_BYTES`` of columns: blocks of the batch, and blocks of output rows when one example
alone is larger. Below ``_TILE_ABOVE_BYTES`` the loop and the rebuilt columns cost more than they
save. Both sizes were chosen by measurement on a 2-core x86 CPU with 2 MB of L2 per core
(docs/performance.md). Two-stage column builds, which write their pieces and then copy them,
take blocks of half the size: they ran faster in 4 MB blocks than in 8 MB, where the one-pass
build gains from the larger block. On accelerators blocks would only serialise the work, so
tiling is for the CPU backend alone.

The convolution (``ops._conv_im2col``) and the floor benchmark (``fnlayers.bench.floor``) both
take their blocks from :func:`plan_blocks`, so the benchmark times the products at the shapes
the convolution runs them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fnlayers._checks import as_pair, check_positive_int, check_rank
from fnlayers._typing import DTypeLike, IntPair, Shape
from fnlayers.conv import folding
from fnlayers.conv.shapes import conv_output_size, pairs

__all__ = ["BlockPlan", "plan_blocks"]

_BLOCK_BYTES = 8 << 20
_TILE_ABOVE_BYTES = 16 << 20

# The two-stage im2col (primitives._im2col_two_stage): with many taps and narrow pieces, the
# one-stage build copies KH*KW slices of a few bytes each; concatenating every input row's KW
# taps first leaves KH slices of KW times wider pieces.
_TWO_STAGE_MIN_TAPS = 16
_TWO_STAGE_MAX_PIECE_BYTES = 64
# Stride folding (fnlayers.conv.folding) adds products by zero taps: at most this factor.
# AlexNet's conv1 (144/121 = 1.19) folded ran forward+backward in about the same time (within
# 10% either way between runs) and compiled in less than half the time; the ResNet/GoogLeNet
# conv1, 7x7/2 on 3 channels (64/49 = 1.31, its 12-channel pieces still two-stage), ran 1.6x
# slower folded.
_FOLD_MAX_WORK = 1.25


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """How one convolution is computed: its blocks, and how each block builds its columns.

    Attributes:
      tiled: whether the convolution runs as a ``lax.scan`` over blocks (False: one block, the
        whole batch).
      rows: output rows per window: ``OH`` when a block holds whole examples, fewer when one
        example's columns alone exceed the block budget.
      per_block: windows per block: examples when ``rows == OH``, row windows otherwise.
      blocks: blocks per call (``lax.scan``'s length; 1 when not tiled).
      cols_shape: one block's column matrix as the products see it, ``(G, M, KH*KW*C_in/G)``:
        ``M = per_block * rows * OW`` rows for each of the ``G`` groups (for a 1x1 convolution,
        the image itself).
      two_stage: whether ``im2col`` builds the columns in two stages.
      block_bytes: the budget of one block's columns.
      folded: whether the stride is folded into the channels first
        (:mod:`fnlayers.conv.folding`); the other attributes are then those of the folded,
        stride-1 convolution.
    """

    tiled: bool
    rows: int
    per_block: int
    blocks: int
    cols_shape: tuple[int, int, int]
    two_stage: bool
    block_bytes: int
    folded: bool = False


def plan_blocks(
    x_shape: Shape,
    kernel: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    dtype: DTypeLike = jnp.float32,
    tile: bool | None = None,
) -> BlockPlan:
    """The blocks of ``conv2d(x, w, impl="im2col", ...)`` for ``x`` of shape ``x_shape`` (NHWC)
    and dtype ``dtype`` and a ``kernel = w.shape[:2]``, traced now. ``tile``: whether large
    column matrices may be tiled at all (default :func:`_tile_for_cache`: on the CPU)."""
    fn = "plan_blocks"
    check_rank(x_shape, 4, fn=fn, name="x_shape", layout="NHWC")
    kernel = as_pair(kernel, fn=fn, name="kernel", minimum=1)
    stride, padding, dilation = pairs(stride, padding, dilation, fn)
    groups = check_positive_int(groups, fn=fn, name="groups")
    conv_output_size(x_shape[1:3], kernel, stride, padding, dilation, fn=fn)
    itemsize = jnp.dtype(dtype).itemsize
    folded = _fold_stride(x_shape, kernel, stride, padding, dilation, groups, itemsize)
    if folded:
        x_shape, kernel = folding.folded_shapes(x_shape, kernel, stride, padding)
        stride, padding = (1, 1), (0, 0)
    n, h, w, c = x_shape
    oh, ow = conv_output_size((h, w), kernel, stride, padding, dilation, fn=fn)
    taps = kernel[0] * kernel[1]
    two_stage = not _space_to_depth(kernel, stride, dilation) and _two_stage(
        kernel, stride, dilation, c // groups, itemsize
    )
    block_bytes = _BLOCK_BYTES // 2 if two_stage else _BLOCK_BYTES
    rows, per_block = _tiling(n, oh, ow * taps * c * itemsize, block_bytes, tile)
    # A 1x1 convolution has no columns to keep in cache.
    tiled = (rows, per_block) != (oh, n) and not _is_1x1(kernel, stride, padding)
    if not tiled:
        rows, per_block = oh, n
    blocks = n * (oh // rows) // per_block
    cols_shape = (groups, per_block * rows * ow, taps * c // groups)
    return BlockPlan(tiled, rows, per_block, blocks, cols_shape, two_stage, block_bytes, folded)


def _tile_for_cache() -> bool:
    """Whether convolutions traced now are tiled: on the CPU backend."""
    return jax.default_backend() == "cpu"


def partitioned_devices() -> int:
    """How many devices the program traced now is partitioned over: the size of the
    ``jax.set_mesh`` mesh (as ``fit(mesh=...)`` traces its step) without its manual axes (the
    body of a ``shard_map`` computes one device's shard); 1 outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(n for a, n in mesh.shape.items() if a not in mesh.manual_axes)


def _tiling(
    n: int, oh: int, row_bytes: int, block_bytes: int | None = None, tile: bool | None = None
) -> tuple[int, int]:
    """``(rows, batch)``: output rows per window and windows per block, for ``n`` examples of
    ``oh`` output rows with ``row_bytes`` of columns each, in blocks of about ``block_bytes``
    (default ``_BLOCK_BYTES``); ``(oh, n)`` means no tiling. ``tile`` as for :func:`plan_blocks`."""
    tile = _tile_for_cache() if tile is None else tile
    if n * oh * row_bytes <= _TILE_ABOVE_BYTES or not tile:
        return oh, n
    block_bytes = _BLOCK_BYTES if block_bytes is None else block_bytes
    rows = _largest_divisor(oh, block_bytes // row_bytes)
    windows = n * (oh // rows)
    return rows, _largest_divisor(windows, block_bytes // (rows * row_bytes))


def _largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _two_stage(kernel, stride, dilation, channels, itemsize) -> bool:
    """Whether im2col builds its columns in two stages: many taps, narrow pieces (a piece is
    ``channels`` wide, ``stride`` taps of them when the width stride folds into phases)."""
    fold = stride[1] if stride[1] > 1 and dilation[1] == 1 else 1
    piece = fold * channels * itemsize  # bytes per one-stage piece
    return kernel[0] * kernel[1] >= _TWO_STAGE_MIN_TAPS and piece < _TWO_STAGE_MAX_PIECE_BYTES


def _fold_stride(x_shape, kernel, stride, padding, dilation, groups, itemsize) -> bool:
    """Whether ``conv2d`` folds the stride into the channels (:mod:`fnlayers.conv.folding`):
    a strided convolution without groups or dilation whose columns would be built in two
    stages while the folded ones would not, at most ``_FOLD_MAX_WORK`` times the products."""
    if groups != 1 or dilation != (1, 1) or stride == (1, 1):
        return False
    if _space_to_depth(kernel, stride, dilation):
        return False
    c = x_shape[3]
    if not _two_stage(kernel, stride, dilation, c, itemsize):
        return False
    folded_x, folded_kernel = folding.folded_shapes(x_shape, kernel, stride, padding)
    work = math.prod(q * s for q, s in zip(folded_kernel, stride, strict=True)) / math.prod(kernel)
    one = (1, 1)
    return work <= _FOLD_MAX_WORK and not _two_stage(folded_kernel, one, one, folded_x[3], itemsize)


def _space_to_depth(kernel, stride, dilation) -> bool:
    """Non-overlapping windows: the columns are the image cut into tiles, one reshape."""
    return stride == kernel and dilation == (1, 1)


def _is_1x1(kernel, stride, padding) -> bool:
    """Caffe's ``is_1x1``: the columns are the image itself."""
    return kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)
