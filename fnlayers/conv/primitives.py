"""The linear primitives ``im2col_p`` and ``col2im_p`` and their rules.

Each is the transpose of the other (``ad.deflinear2``), so autodiff of a convolution written with
them is two matrix products and one ``col2im``, never autodiff of the slices that build the
columns. Both are per-example NHWC ops: ``vmap`` folds the mapped axis into the batch, and the
output type is the operand's with a new shape (dtype, sharding and, under ``shard_map``, the
manual axes it varies over carried over). Typed afresh as ``ShapedArray(shape, dtype)``, the
columns of a per-device shard were "the same on every device", so ``dW = colsᵀ·dY`` was not
summed over the devices and the transposes failed on the cotangent's type.

Every im2col path returns the same matrix; which one is used depends on the geometry only:

* stride == kernel, no dilation: one reshape + transpose (space-to-depth; no overlap).
* 16+ taps, pieces under 64 bytes: two stages (``blocking._two_stage``): the KW width taps of
  every input row are concatenated first (width phases when the width stride is > 1), then KH
  row slices of that.
* otherwise: KH*KW strided slices stacked as ``(N, OH, OW, KH, KW, C)``, a free reshape from the
  columns; with a width stride (no width dilation) ceil(KW/sw) slices of the image folded into
  width phases per kernel row, sw taps each, the taps past KW cut off.

col2im is the adjoint of each path:

* stride == kernel, no dilation: one transpose + reshape (depth-to-space).
* stride > 1: by stride phase, dense sums of shifted slices, interleaved.
* stride 1: the sum of KH*KW shifted slices (one fused loop).

The sums run in float32 for float16 and bfloat16 columns (each piece converted as it is read,
the image rounded once at the end): a pixel of a convolution's input gradient sums KH*KW
products, and bfloat16's 8-bit significand would stop a sum of ones at 256.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fnlayers._checks import acc_dtype
from fnlayers.conv.blocking import _is_1x1, _space_to_depth, _two_stage
from fnlayers.conv.shapes import conv_output_size

__all__ = ["col2im_p", "im2col_p"]

# XLA:CPU fuses a concatenation only when it has at most 8 operands and does not run along the
# minor axis (unless that is under 128 wide; cpu_instruction_fusion.cc). Otherwise each piece is
# materialised by a kernel of its own and copied again by the concatenation: KH*KW + 1 kernels
# to compile and two passes over memory. _stack therefore concatenates along new major axes, at
# most 8 operands per concatenation, each level of the tree on an axis of its own, so that the
# column matrix is one fused loop. The two-stage path keeps its concatenations: with pieces this
# narrow the stacked loop ran slower.
_FUSED_CONCAT_MAX_OPERANDS = 8
# The channels of a stacked piece as (C/4, 4), a free reshape: with C innermost LLVM unrolls the
# channel loop of each of the KH*KW pieces into straight-line code, which takes long to compile
# for wide kernels and runs no faster.
_CHANNEL_SPLIT = 4


def _im2col(x, kernel, stride, padding, dilation, isolate_col2im=False):
    """The columns of ``x`` (``(N, H, W, C)``, pairs of ints), through ``im2col_p``."""
    if _is_1x1(kernel, stride, padding):
        return x  # Caffe's is_1x1 fast path: the columns are the image itself
    return im2col_p.bind(
        x,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        image=x.shape[1:3],
        isolate_col2im=isolate_col2im,
    )


def _col2im(cols, image, kernel, stride, padding, dilation, isolate_col2im=False):
    """The image of ``cols`` (the adjoint of :func:`_im2col`), through ``col2im_p``."""
    if _is_1x1(kernel, stride, padding):
        return cols
    return col2im_p.bind(
        cols,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        image=tuple(image),
        isolate_col2im=isolate_col2im,
    )


# ----------------------------------------------------------------------------- im2col


def _im2col_impl(x, *, kernel, stride, padding, dilation, image, isolate_col2im=False):
    del isolate_col2im  # a parameter of the pair, for the transposed col2im only
    oh, ow = conv_output_size(x.shape[1:3], kernel, stride, padding, dilation, fn="im2col")
    if _space_to_depth(kernel, stride, dilation):
        return _im2col_space_to_depth(x, kernel, padding, (oh, ow))
    geometry = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    if _two_stage(kernel, stride, dilation, x.shape[3], x.dtype.itemsize):
        return _im2col_two_stage(x, out_hw=(oh, ow), **geometry)
    return _im2col_stacked(x, out_hw=(oh, ow), **geometry)


def _im2col_two_stage(x, *, kernel, stride, padding, dilation, out_hw):
    """The width taps of every input row (``_width_taps``), then KH row slices of those."""
    (kh, _), (sh, _), (dh, _), (oh, ow) = kernel, stride, dilation, out_hw
    rows = _width_taps(x, kernel, stride, padding, dilation, ow)  # (N, H + 2*ph, OW, KW*C)
    pieces = [
        lax.slice_in_dim(rows, i * dh, i * dh + (oh - 1) * sh + 1, sh, axis=1) for i in range(kh)
    ]
    return jnp.concatenate(pieces, axis=-1)


def _im2col_stacked(x, *, kernel, stride, padding, dilation, out_hw):
    """KH*KW strided slices (width phases of sw taps each with a width stride), stacked."""
    n, _, _, c = x.shape
    (kh, kw), (ph, pw), (sh, sw), (dh, dw), (oh, ow) = kernel, padding, stride, dilation, out_hw
    if sw > 1 and dw == 1 and kw > 1:
        # Width phases: tap q of a kernel row is folded column q, the image's taps q*sw ..
        # q*sw + sw - 1; the last one may run past KW, cut off below.
        xr, nq = _fold_width(x, kernel, stride, padding, ow)  # (N, Hp, WQ, sw*C)
        starts, width, step = range(nq), ow, 1
    else:
        xr = _pad_crop(x, ph, ph, pw, pw)
        starts, width, step = range(0, kw * dw, dw), (ow - 1) * sw + 1, sw
    p = xr.shape[3]  # piece width: C, or sw*C for width phases
    grid = [
        [
            lax.slice(
                xr,
                (0, i * dh, w0, 0),
                (n, i * dh + (oh - 1) * sh + 1, w0 + width, p),
                (1, sh, step, 1),
            )
            for w0 in starts
        ]
        for i in range(kh)
    ]
    if len(starts) * p == kw * c:  # (N, OH, OW, KH, KW, C): one reshape away
        split = (p // _CHANNEL_SPLIT, _CHANNEL_SPLIT) if p % _CHANNEL_SPLIT == 0 else (p,)
        grid = [[t.reshape(n, oh, ow, *split) for t in row] for row in grid]
        trail = len(split)
        return _stack([_stack(row, trail) for row in grid], trail + 1).reshape(n, oh, ow, -1)
    rows = [_stack(row, trail=1).reshape(n, oh, ow, -1)[..., : kw * c] for row in grid]
    return _stack(rows, trail=1).reshape(n, oh, ow, -1)


def _stack(items, trail):
    """The equal arrays ``items`` stacked along a new axis before their last ``trail`` axes, as
    one fusable expression: a concatenation of at most 8 operands; more items are stacked in
    groups first (the list padded with zeros to equal groups, cut off afterwards), each level
    along an axis of its own: XLA flattens nested concatenations along one axis back into one
    with too many operands."""
    axis = items[0].ndim - trail
    most = _FUSED_CONCAT_MAX_OPERANDS
    if len(items) <= most:
        return jnp.concatenate([jnp.expand_dims(t, axis) for t in items], axis)
    lo = -(-len(items) // most)
    groups = next((m for m in range(lo, most + 1) if len(items) % m == 0), lo)
    size = -(-len(items) // groups)
    padded = items + [jnp.zeros_like(items[0])] * (groups * size - len(items))
    parts = [_stack(padded[k * size : (k + 1) * size], trail) for k in range(groups)]
    stacked = _stack(parts, trail + 1)  # (..., groups, size, <trail axes>)
    merged = stacked.reshape(*stacked.shape[:axis], groups * size, *stacked.shape[axis + 2 :])
    return lax.slice_in_dim(merged, 0, len(items), axis=axis)


def _width_taps(x, kernel, stride, padding, dilation, ow):
    """``(N, H + 2*ph, OW, KW*C)``: for every (height-padded) input row and output column, the
    ``KW`` width taps side by side -- the first stage of the two-stage im2col. With a width
    stride and no width dilation the row is folded into width phases first (``_fold_width``),
    so each piece is ``sw`` taps long."""
    c = x.shape[3]
    (_, kw), (ph, pw), (_, sw), (_, dw) = kernel, padding, stride, dilation
    if sw > 1 and dw == 1:
        xf, nq = _fold_width(x, kernel, stride, padding, ow)
        pieces = [
            lax.slice_in_dim(xf[..., : min(sw, kw - q * sw) * c], q, q + ow, axis=2)
            for q in range(nq)
        ]
    else:
        xp = _pad_crop(x, ph, ph, pw, pw)
        pieces = [
            lax.slice_in_dim(xp, j * dw, j * dw + (ow - 1) * sw + 1, sw, axis=2) for j in range(kw)
        ]
    return jnp.concatenate(pieces, axis=-1)


def _fold_width(x, kernel, stride, padding, ow):
    """The height-padded image as ``(N, H + 2*ph, WQ, sw*C)`` (a free reshape of the padded
    image): folded column ``q`` holds pixels ``q*sw .. q*sw + sw - 1``. Returns it and the
    number ``ceil(KW / sw)`` of folded columns one kernel row spans."""
    n, h, w, c = x.shape
    (_, kw), (ph, pw), (_, sw) = kernel, padding, stride
    nq = -(-kw // sw)
    wq = ow - 1 + nq  # folded columns read
    xf = _pad_crop(x, ph, ph, pw, wq * sw - w - pw).reshape(n, h + 2 * ph, wq, sw * c)
    return xf, nq


def _im2col_space_to_depth(x, kernel, padding, out_hw):
    """Non-overlapping windows: the columns are the padded image cut into ``KH x KW`` tiles."""
    n, h, w, c = x.shape
    (kh, kw), (ph, pw), (oh, ow) = kernel, padding, out_hw
    xp = _pad_crop(x, ph, oh * kh - h - ph, pw, ow * kw - w - pw)
    tiles = xp.reshape(n, oh, kh, ow, kw, c).transpose(0, 1, 3, 2, 4, 5)
    return tiles.reshape(n, oh, ow, kh * kw * c)


# ----------------------------------------------------------------------------- col2im
# The primitives carry ``isolate_col2im``, true for an untiled convolution. Untiled, XLA:CPU
# fuses the sum of KH*KW pieces into whatever consumes the image gradient (e.g. the transposed
# copy of the previous layer's output gradient that its weight-gradient product reads) and
# evaluates the whole sum in that transposed order, or materialises each piece as a fusion of its
# own. On the CPU an isolated col2im (``_isolated``) is computed as a unit, which runs and
# compiles faster. Inside the blocks of a tiled layer the scan materialises each block's result
# anyway; pooling, conv_transpose2d and the public col2im are not isolated.


def _col2im_impl(
    cols, *, kernel, stride, padding, dilation, image, isolate_col2im=False, cpu=False
):
    if cpu and isolate_col2im and cols.size:
        params = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation)
        return _isolated(functools.partial(_col2im_impl, image=image, **params), cols)
    if _space_to_depth(kernel, stride, dilation):
        return _col2im_depth_to_space(cols, kernel, padding, image)
    if stride != (1, 1):
        return _col2im_phases(cols, kernel, stride, padding, dilation, image)
    _, oh, ow, kkc = cols.shape
    c = kkc // (kernel[0] * kernel[1])
    (h, w), (ph, pw) = image, padding
    dtype = acc_dtype(cols.dtype)
    acc = None
    for idx, (h0, w0) in enumerate(_offsets(kernel, dilation)):
        piece = cols[..., idx * c : (idx + 1) * c].astype(dtype)
        # piece[oh, ow] lands on pixel (h0 + oh, w0 + ow) of the padded image, then the padding
        # is cropped: one padded (or cropped) shifted copy per kernel offset, summed.
        placed = _pad_crop(piece, h0 - ph, h + ph - h0 - oh, w0 - pw, w + pw - w0 - ow)
        acc = placed if acc is None else acc + placed
    return acc.astype(cols.dtype)


def _isolated(f, x):
    """``f(x)`` as the branch of an XLA conditional whose predicate is true for every value but
    unknown when compiling, so XLA:CPU compiles ``f`` as a unit: its result is a buffer no
    consumer can fuse (``lax.optimization_barrier`` would not do: XLA:CPU removes it before
    fusion). Both branches are ``f``; the check reads one element of ``x``."""
    v = x.reshape(-1)[0]
    return lax.cond(jnp.logical_or(v == v, jnp.isnan(v)), f, f, x)


def _col2im_depth_to_space(cols, kernel, padding, image):
    n, oh, ow, kkc = cols.shape
    (kh, kw), (ph, pw), (h, w) = kernel, padding, image
    c = kkc // (kh * kw)
    tiles = cols.reshape(n, oh, ow, kh, kw, c).transpose(0, 1, 3, 2, 4, 5)
    full = tiles.reshape(n, oh * kh, ow * kw, c)
    return _pad_crop(full, -ph, h + ph - oh * kh, -pw, w + pw - ow * kw)


def _col2im_phases(cols, kernel, stride, padding, dilation, image):
    """col2im for stride > 1, by stride phase: padded pixel ``o*s + i*d`` receives tap ``i`` of
    output ``o``; writing ``i*d = q*s + r``, that is pixel ``(o + q)*s + r``. For each phase
    ``(r_h, r_w)`` the taps are a dense sum of shifted (not strided) copies of size
    ``(OH + q_max, OW + q_max)``; the ``s_h * s_w`` phase images are then interleaved by one
    transpose and reshape. Each output element sums ``~KH*KW / (s_h*s_w)`` terms instead of
    evaluating ``KH*KW`` strided placements.
    """
    n, oh, ow, kkc = cols.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    c = kkc // (kh * kw)
    h, w = image
    lh = oh + ((kh - 1) * dh) // sh
    lw = ow + ((kw - 1) * dw) // sw
    dtype = acc_dtype(cols.dtype)
    phases = {}
    for i in range(kh):
        qi, ri = divmod(i * dh, sh)
        for j in range(kw):
            qj, rj = divmod(j * dw, sw)
            idx = i * kw + j
            piece = cols[..., idx * c : (idx + 1) * c].astype(dtype)
            placed = _pad_crop(piece, qi, lh - oh - qi, qj, lw - ow - qj)
            key = (ri, rj)
            phases[key] = placed if key not in phases else phases[key] + placed
    # Each phase rounded once; the interleaving below only moves elements.
    phases = {key: phase.astype(cols.dtype) for key, phase in phases.items()}
    # Interleaved as (N, LH, sh, LW, sw, C) by stacking (_stack: one fused loop, where a stack of
    # the sh*sw phases and a transpose compiled to a kernel per phase).
    zeros = jnp.zeros((n, lh, lw, c), cols.dtype)
    rows = [_stack([phases.get((ri, rj), zeros) for rj in range(sw)], 1) for ri in range(sh)]
    full = _stack(rows, trail=3).reshape(n, lh * sh, lw * sw, c)
    # Crop the padding and cut (or zero-fill) the far edge to the image.
    return _pad_crop(full, -ph, ph + h - lh * sh, -pw, pw + w - lw * sw)


def _offsets(kernel, dilation):
    return [(i * dilation[0], j * dilation[1]) for i in range(kernel[0]) for j in range(kernel[1])]


def _pad_crop(x, low_h, high_h, low_w, high_w):
    """Zero-pads (positive) or crops (negative) the two spatial axes of an NHWC array."""
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (low_h, high_h, 0), (low_w, high_w, 0), (0, 0, 0)))


# ----------------------------------------------------------------------------- the primitives


def _im2col_abstract(x, *, kernel, stride, padding, dilation, image, isolate_col2im):
    oh, ow = conv_output_size(image, kernel, stride, padding, dilation, fn="im2col")
    return x.update(shape=(x.shape[0], oh, ow, kernel[0] * kernel[1] * x.shape[3]))


def _col2im_abstract(cols, *, kernel, stride, padding, dilation, image, isolate_col2im):
    c = cols.shape[3] // (kernel[0] * kernel[1])
    return cols.update(shape=(cols.shape[0], *image, c))


def _batch_rule(prim):
    """vmap over a per-example rank-4 op: fold the mapped axis into the batch axis."""

    def rule(args, dims, **params):
        (x,), (d,) = args, dims
        x = jnp.moveaxis(x, d, 0)
        b, n = x.shape[:2]
        y = prim.bind(x.reshape(b * n, *x.shape[2:]), **params)
        return y.reshape(b, n, *y.shape[1:]), 0

    return rule


def _define(name, impl, abstract, cpu_impl=None):
    """A primitive lowered as ``impl`` (as ``cpu_impl`` on the CPU when given); eager calls go
    through ``jit`` of the primitive itself, so they take the same lowering."""
    prim = Primitive(name)
    static = ("kernel", "stride", "padding", "dilation", "image", "isolate_col2im")
    prim.def_impl(jax.jit(lambda x, **params: prim.bind(x, **params), static_argnames=static))
    prim.def_abstract_eval(abstract)
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))
    if cpu_impl is not None:
        mlir.register_lowering(
            prim, mlir.lower_fun(cpu_impl, multiple_results=False), platform="cpu"
        )
    batching.primitive_batchers[prim] = _batch_rule(prim)
    return prim


im2col_p = _define("fnlayers_im2col", _im2col_impl, _im2col_abstract)
col2im_p = _define(
    "fnlayers_col2im",
    _col2im_impl,
    _col2im_abstract,
    cpu_impl=functools.partial(_col2im_impl, cpu=True),
)
ad.deflinear2(im2col_p, lambda ct, x, **params: [col2im_p.bind(ct, **params)])
ad.deflinear2(col2im_p, lambda ct, cols, **params: [im2col_p.bind(ct, **params)])
