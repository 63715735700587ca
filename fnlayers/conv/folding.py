"""Stride folding: a strided convolution as a stride-1 convolution of the image cut into
``stride``-by-``stride`` tiles (space-to-depth).

With ``sh x sw`` strides, padded pixel ``(o*s + i)`` of kernel tap ``i = q*s + r`` is pixel
``r`` of tile ``o + q``. Folding every tile of the padded image into the channels,
``(N, HF, sh, WF, sw, C) -> (N, HF, WF, sh*sw*C)``, and the weight alike (zero-padded to whole
tiles: ``(QH*sh, QW*sw)`` taps with ``Q = ceil(K / s)``), turns the layer into a ``QH x QW``
convolution with stride 1 and no padding, with the same sums plus products by the zero taps.

It pays where the strided column build is slow to compile and run: many taps of a few channels
(AlexNet's conv1: 121 taps of 3 channels, 12-byte pieces), built in two stages. Folded, the
same layer is 9 taps of 48 channels, one fused copy, at 144/121 of the products' work
(``blocking._fold_stride`` decides; docs/performance.md has the measurements).
"""

from __future__ import annotations

from jax import lax

from fnlayers._typing import Array, IntPair, Shape
from fnlayers.conv.shapes import conv_output_size

__all__ = ["fold_input", "fold_weight", "folded_shapes"]


def folded_shapes(
    x_shape: Shape, kernel: IntPair, stride: IntPair, padding: IntPair
) -> tuple[Shape, IntPair]:
    """The folded image's shape ``(N, HF, WF, sh*sw*C)`` and the folded kernel ``(QH, QW)``
    for an NHWC ``x_shape`` (pairs of ints; no dilation). ``HF = OH - 1 + QH``: the tiles the
    output rows read."""
    n, h, w, c = x_shape
    oh, ow = conv_output_size((h, w), kernel, stride, padding, fn="conv2d")
    qh, qw = _tiles(kernel, stride)
    return (n, oh - 1 + qh, ow - 1 + qw, stride[0] * stride[1] * c), (qh, qw)


def fold_input(x: Array, kernel: IntPair, stride: IntPair, padding: IntPair) -> Array:
    """``(N, H, W, C) -> (N, HF, WF, sh*sw*C)``: the image padded (or cut) to the tiles the
    output reads, each tile's pixels in the channels, ordered ``(row in tile, column, c)``."""
    n, h, w, c = x.shape
    (_, hf, wf, _), _ = folded_shapes(x.shape, kernel, stride, padding)
    (sh, sw), (ph, pw) = stride, padding
    # lax.pad crops where a side is negative: the rows and columns no output reads.
    spatial = ((ph, hf * sh - h - ph, 0), (pw, wf * sw - w - pw, 0))
    xp = lax.pad(x, lax.full((), 0, x.dtype), ((0, 0, 0), *spatial, (0, 0, 0)))
    tiles = xp.reshape(n, hf, sh, wf, sw, c).transpose(0, 1, 3, 2, 4, 5)
    return tiles.reshape(n, hf, wf, sh * sw * c)


def fold_weight(w: Array, stride: IntPair) -> Array:
    """``(KH, KW, C, C_out) -> (QH, QW, sh*sw*C, C_out)``: the taps zero-padded to whole tiles
    and folded in :func:`fold_input`'s channel order."""
    kh, kw, c, c_out = w.shape
    (sh, sw), (qh, qw) = stride, _tiles((kh, kw), stride)
    zero = lax.full((), 0, w.dtype)
    wp = lax.pad(w, zero, ((0, qh * sh - kh, 0), (0, qw * sw - kw, 0), (0, 0, 0), (0, 0, 0)))
    tiles = wp.reshape(qh, sh, qw, sw, c, c_out).transpose(0, 2, 1, 3, 4, 5)
    return tiles.reshape(qh, qw, sh * sw * c, c_out)


def _tiles(kernel, stride):
    """``(QH, QW)``: the tiles a window spans, ``ceil(K / s)`` per axis."""
    return -(-kernel[0] // stride[0]), -(-kernel[1] // stride[1])
