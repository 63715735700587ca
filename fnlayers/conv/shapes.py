"""Caffe's shape rules for convolution and deconvolution (docs/caffe-semantics.md §1, §2),
from shapes alone, and the normalisation of the spatial arguments they share with the ops."""

from __future__ import annotations

from fnlayers._checks import as_pair, check_positive_int, check_rank
from fnlayers._typing import IntPair, Shape

__all__ = ["conv_output_shape", "conv_output_size", "conv_transpose_output_shape"]


def conv_output_size(
    image_size: IntPair,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    fn: str = "conv",
) -> tuple[int, int]:
    """Caffe's convolution output size ``(OH, OW)`` for an ``(H, W)`` image (§1).

    Raises ValueError when the dilated kernel is larger than the padded input.
    """
    image = as_pair(image_size, fn=fn, name="image_size", minimum=1)
    kernel = as_pair(kernel_size, fn=fn, name="kernel_size", minimum=1)
    stride, padding, dilation = pairs(stride, padding, dilation, fn)
    out = []
    for axis, (i, k, s, p, d) in enumerate(
        zip(image, kernel, stride, padding, dilation, strict=True)
    ):
        extent = d * (k - 1) + 1
        if extent > i + 2 * p:
            what = "height" if axis == 0 else "width"
            raise ValueError(
                f"{fn}: kernel {what} {k} (dilation {d}, extent {extent}) is larger than the "
                f"padded input {what} {i} + 2*{p} = {i + 2 * p}"
            )
        out.append((i + 2 * p - extent) // s + 1)
    return out[0], out[1]


def conv_output_shape(
    x_shape: Shape,
    w_shape: Shape,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    fn: str = "conv2d",
) -> tuple[int, ...]:
    """Output shape of :func:`conv2d` from shapes alone; validates them.

    Args:
      x_shape: ``(N, H, W, C_in)``; N may be -1.
      w_shape: ``(KH, KW, C_in // groups, C_out)``.

    Returns:
      ``(N, OH, OW, C_out)``.
    """
    c_in = _check_shapes(x_shape, w_shape, groups, fn, "HWIO: KH, KW, C_in // groups, C_out")
    kh, kw, w_in, c_out = w_shape
    if c_out % groups:
        raise ValueError(f"{fn}: groups={groups} does not divide C_out={c_out}")
    if w_in * groups != c_in:
        raise ValueError(
            f"{fn}: w has {w_in} input channels per group but x has C_in={c_in} with "
            f"groups={groups} (expected w.shape[2] == {c_in // groups})"
        )
    oh, ow = conv_output_size(x_shape[1:3], (kh, kw), stride, padding, dilation, fn=fn)
    return (x_shape[0], oh, ow, c_out)


def conv_transpose_output_shape(
    x_shape: Shape,
    w_shape: Shape,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    fn: str = "conv_transpose2d",
) -> tuple[int, ...]:
    """Output shape of :func:`conv_transpose2d` from shapes alone; validates them.

    Args:
      x_shape: ``(N, H, W, C_in)``; N may be -1.
      w_shape: ``(KH, KW, C_out // groups, C_in)``.

    Returns:
      ``(N, stride*(H-1) + dilation*(KH-1) + 1 - 2*pad, ..., C_out)``.
    """
    c_in = _check_shapes(x_shape, w_shape, groups, fn, "KH, KW, C_out // groups, C_in")
    kh, kw, c_out_g, w_in = w_shape
    if w_in != c_in:
        raise ValueError(f"{fn}: w.shape[3]={w_in} must equal the C_in={c_in} of x")
    stride, padding, dilation = pairs(stride, padding, dilation, fn)
    out = []
    for i, k, s, p, d in zip(x_shape[1:3], (kh, kw), stride, padding, dilation, strict=True):
        size = s * (i - 1) + d * (k - 1) + 1 - 2 * p
        if size < 1:
            raise ValueError(
                f"{fn}: padding={p} crops the whole output (size {size}) for input size {i}, "
                f"kernel {k}, stride {s}, dilation {d}"
            )
        out.append(size)
    return (x_shape[0], out[0], out[1], c_out_g * groups)


def _check_shapes(x_shape, w_shape, groups, fn, w_layout) -> int:
    """Checks the ranks of an NHWC input and an HWIO-like weight and that ``groups`` divides
    the input's channels; returns C_in."""
    check_rank(x_shape, 4, fn=fn, name="x", layout="NHWC")
    check_rank(w_shape, 4, fn=fn, name="w", layout=w_layout)
    check_positive_int(groups, fn=fn, name="groups")
    c_in = x_shape[3]
    if c_in % groups:
        raise ValueError(f"{fn}: groups={groups} does not divide C_in={c_in}")
    return c_in


def pairs(
    stride: IntPair, padding: IntPair, dilation: IntPair, fn: str
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(stride, padding, dilation)`` as pairs of ints: stride, dilation >= 1, padding >= 0."""
    return (
        as_pair(stride, fn=fn, name="stride", minimum=1),
        as_pair(padding, fn=fn, name="padding", minimum=0),
        as_pair(dilation, fn=fn, name="dilation", minimum=1),
    )
