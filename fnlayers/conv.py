"""Convolution as im2col followed by one matrix product (CAFFE_SEMANTICS.md §1, §2).

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
backward pass (docs/performance.md has the measurements).
``impl="xla"`` computes the same convolution with ``lax.conv_general_dilated``, the baseline
every benchmark compares against.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fnlayers._checks import as_pair, check_choice, check_float_array, check_rank, check_same_dtype

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

IMPLS = ("im2col", "xla")


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, impl="im2col"):
    """Caffe's Convolution (cross-correlation, no kernel flip), NHWC.

    Args:
      x: ``(N, H, W, C_in)`` floating array.
      w: ``(KH, KW, C_in // groups, C_out)`` of the same dtype as ``x``.
      b: optional ``(C_out,)`` bias.
      stride, padding, dilation: int or ``(h, w)`` pair; stride, dilation >= 1, padding >= 0
        (zero padding on both sides, as Caffe's ``pad``).
      groups: input and output channels are split into ``groups`` blocks; output block g sees
        input block g only. Must divide C_in and C_out.
      impl: ``"im2col"`` (columns then one matrix product per group) or ``"xla"``
        (``lax.conv_general_dilated``).

    Returns:
      ``(N, OH, OW, C_out)`` in ``x.dtype`` with ``OH = (H + 2*pad_h - (dilation_h*(KH-1)+1))
      // stride_h + 1`` (Caffe's rule) and likewise for OW. Products accumulate in float32 for
      lower-precision inputs.
    """
    fn = "conv2d"
    check_choice(impl, IMPLS, fn=fn, name="impl")
    _check_arrays(x, w, b, fn)
    out_shape = conv_output_shape(
        x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups, fn=fn
    )
    stride, padding, dilation = _pairs(stride, padding, dilation, fn)
    if impl == "xla":
        y = lax.conv_general_dilated(
            x,
            w,
            window_strides=stride,
            padding=[(padding[0], padding[0]), (padding[1], padding[1])],
            rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            preferred_element_type=_acc_dtype(x.dtype),
        ).astype(x.dtype)
    else:
        conv = functools.partial(
            _conv_im2col, stride=stride, padding=padding, dilation=dilation, groups=groups
        )
        y = _per_example(conv, x, w)
    if y.shape[1:] != out_shape[1:]:  # pragma: no cover - guards the shape rule itself
        raise RuntimeError(f"conv2d: computed {y.shape}, expected {out_shape}")
    return _add_bias(y, b, fn)


def conv_transpose2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Caffe's Deconvolution: the transpose (adjoint) of :func:`conv2d` with the same weight.

    Args:
      x: ``(N, H, W, C_in)``.
      w: ``(KH, KW, C_out // groups, C_in)``: the weight of the convolution that maps
        ``C_out`` channels to ``C_in``. Caffe's deconv blob ``(C_in, C_out/G, kh, kw)`` maps here
        by ``transpose(2, 3, 1, 0)``.
      b: optional ``(C_out,)`` bias.
      stride, padding, dilation, groups: as for the convolution being transposed; ``groups``
        must divide C_in (and C_out = ``w.shape[2] * groups``).

    Returns:
      ``(N, OH, OW, C_out)`` with ``OH = stride*(H-1) + dilation*(KH-1) + 1 - 2*pad`` (Caffe,
      no output padding). Computed as ``col2im(x @ Wᵀ)``: each input pixel scatters a weighted
      copy of the kernel, and whatever lands in the padding is dropped.
    """
    fn = "conv_transpose2d"
    _check_arrays(x, w, b, fn)
    out_shape = conv_transpose_output_shape(
        x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups, fn=fn
    )
    stride, padding, dilation = _pairs(stride, padding, dilation, fn)

    def deconv(x, w):
        kh, kw, c_out_g, c_in = w.shape
        n, h, wd = x.shape[:3]
        xg = x.reshape(n, h, wd, groups, c_in // groups)
        wg = w.reshape(kh * kw, c_out_g, groups, c_in // groups)
        acc = _acc_dtype(x.dtype)
        cols = jnp.einsum("nhwgm,kcgm->nhwkgc", xg, wg, preferred_element_type=acc)
        cols = cols.astype(x.dtype).reshape(n, h, wd, kh * kw * c_out_g * groups)
        return _col2im(cols, out_shape[1:3], (kh, kw), stride, padding, dilation)

    return _add_bias(_per_example(deconv, x, w), b, fn)


def im2col(x, kernel_size, *, stride=1, padding=0, dilation=1):
    """The column matrix of Caffe's ``im2col_cpu``, NHWC.

    Args:
      x: ``(N, H, W, C)``.
      kernel_size, stride, padding, dilation: int or ``(h, w)``.

    Returns:
      ``(N, OH, OW, KH*KW*C)``: ``cols[n, oh, ow, (i*KW + j)*C + c] = x[n, oh*s_h - p_h + i*d_h,
      ow*s_w - p_w + j*d_w, c]``, zero outside the image. Caffe orders rows ``(c, kh, kw)``;
      this order ``(kh, kw, c)`` differs by a reshape of the weight only.
    """
    fn = "im2col"
    check_rank(x.shape, 4, fn=fn, name="x", layout="NHWC")
    kernel = as_pair(kernel_size, fn=fn, name="kernel_size", minimum=1)
    stride, padding, dilation = _pairs(stride, padding, dilation, fn)
    conv_output_size(x.shape[1:3], kernel, stride, padding, dilation, fn=fn)
    pairs = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    return _per_example(_im2col, x, **pairs)


def col2im(cols, image_size, kernel_size, *, stride=1, padding=0, dilation=1):
    """The exact adjoint of :func:`im2col` (Caffe's ``col2im_cpu``): scatter-adds every column
    entry back to the pixel it was read from; entries that came from the padding are dropped.

    Args:
      cols: ``(N, OH, OW, KH*KW*C)``.
      image_size: ``(H, W)`` of the image the columns were taken from.
      kernel_size, stride, padding, dilation: as given to :func:`im2col`.

    Returns:
      ``(N, H, W, C)`` such that ``<im2col(x), cols> == <x, col2im(cols)>``.
    """
    fn = "col2im"
    check_rank(cols.shape, 4, fn=fn, name="cols", layout="N, OH, OW, KH*KW*C")
    kernel = as_pair(kernel_size, fn=fn, name="kernel_size", minimum=1)
    image = as_pair(image_size, fn=fn, name="image_size", minimum=1)
    stride, padding, dilation = _pairs(stride, padding, dilation, fn)
    oh, ow = conv_output_size(image, kernel, stride, padding, dilation, fn=fn)
    kk = kernel[0] * kernel[1]
    if cols.shape[1:3] != (oh, ow) or cols.shape[3] % kk:
        raise ValueError(
            f"col2im: cols shape {cols.shape} does not fit image_size={image} with "
            f"kernel_size={kernel}: expected (N, {oh}, {ow}, {kernel[0]}*{kernel[1]}*C)"
        )
    return _per_example(
        _col2im, cols, image=image, kernel=kernel, stride=stride, padding=padding, dilation=dilation
    )


def conv_output_size(image_size, kernel_size, stride=1, padding=0, dilation=1, *, fn="conv"):
    """Caffe's convolution output size ``(OH, OW)`` for an ``(H, W)`` image (§1).

    Raises ValueError when the dilated kernel is larger than the padded input.
    """
    image = as_pair(image_size, fn=fn, name="image_size", minimum=1)
    kernel = as_pair(kernel_size, fn=fn, name="kernel_size", minimum=1)
    stride, padding, dilation = _pairs(stride, padding, dilation, fn)
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
    return tuple(out)


def conv_output_shape(
    x_shape, w_shape, *, stride=1, padding=0, dilation=1, groups=1, fn="conv2d"
) -> tuple[int, ...]:
    """Output shape of :func:`conv2d` from shapes alone; validates them.

    Args:
      x_shape: ``(N, H, W, C_in)``; N may be -1.
      w_shape: ``(KH, KW, C_in // groups, C_out)``.

    Returns:
      ``(N, OH, OW, C_out)``.
    """
    check_rank(x_shape, 4, fn=fn, name="x", layout="NHWC")
    check_rank(w_shape, 4, fn=fn, name="w", layout="HWIO: KH, KW, C_in // groups, C_out")
    _check_groups(groups, fn)
    c_in, (kh, kw, w_in, c_out) = x_shape[3], w_shape
    if c_in % groups:
        raise ValueError(f"{fn}: groups={groups} does not divide C_in={c_in}")
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
    x_shape, w_shape, *, stride=1, padding=0, dilation=1, groups=1, fn="conv_transpose2d"
) -> tuple[int, ...]:
    """Output shape of :func:`conv_transpose2d` from shapes alone; validates them.

    Args:
      x_shape: ``(N, H, W, C_in)``; N may be -1.
      w_shape: ``(KH, KW, C_out // groups, C_in)``.

    Returns:
      ``(N, stride*(H-1) + dilation*(KH-1) + 1 - 2*pad, ..., C_out)``.
    """
    check_rank(x_shape, 4, fn=fn, name="x", layout="NHWC")
    check_rank(w_shape, 4, fn=fn, name="w", layout="KH, KW, C_out // groups, C_in")
    _check_groups(groups, fn)
    kh, kw, c_out_g, w_in = w_shape
    c_in = x_shape[3]
    if w_in != c_in:
        raise ValueError(f"{fn}: w.shape[3]={w_in} must equal the C_in={c_in} of x")
    if c_in % groups:
        raise ValueError(f"{fn}: groups={groups} does not divide C_in={c_in}")
    stride, padding, dilation = _pairs(stride, padding, dilation, fn)
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


# ----------------------------------------------------------------------------- internals


def _per_example(op, x, *arrays, **static):
    """``op(x, *arrays, **static)`` for an op that computes every example of ``x`` (axis 0) on
    its own, with ``arrays`` (weights) shared by all examples; ``static`` are Python values.

    Under ``jax.set_mesh`` of a mesh with Explicit axes (shardings in the types), the op runs
    with those axes made Auto (``jax.sharding.auto_axes``): the index arithmetic of im2col and
    col2im (reshapes that fold the width into stride phases, cut the image into tiles, or merge
    the groups into the batch) has no sharding rule in the types, while XLA partitions it as it
    does any other program. The result has ``x``'s sharding of the batch axis. Without Explicit
    axes this is ``op(x, *arrays, **static)`` itself.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.explicit_axes:
        return op(x, *arrays, **static)
    spec = jax.typeof(x).sharding.spec
    batch = jax.sharding.PartitionSpec(spec[0] if len(spec) else None)
    return jax.sharding.auto_axes(
        functools.partial(op, **static), axes=mesh.explicit_axes, out_sharding=batch
    )(x, *arrays)


def _pairs(stride, padding, dilation, fn):
    return (
        as_pair(stride, fn=fn, name="stride", minimum=1),
        as_pair(padding, fn=fn, name="padding", minimum=0),
        as_pair(dilation, fn=fn, name="dilation", minimum=1),
    )


def _check_groups(groups, fn):
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{fn}: groups={groups!r} must be a positive int")


def _check_arrays(x, w, b, fn):
    check_float_array(x, fn=fn, name="x")
    check_same_dtype(x, w, fn=fn, names=("x", "w"))
    if b is not None:
        check_same_dtype(x, b, fn=fn, names=("x", "b"))


def _acc_dtype(dtype):
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _add_bias(y, b, fn):
    if b is None:
        return y
    if b.shape != (y.shape[-1],):
        raise ValueError(f"{fn}: b has shape {b.shape}, expected (C_out,) = ({y.shape[-1]},)")
    return y + b.reshape(1, 1, 1, -1)


def _weight_matrix(w, groups):
    """The weight as the product wants it: ``(C_out, KH*KW*C)`` for ``groups == 1`` (contracted
    on its last axis, so that dW comes out of the backward pass as ``dYᵀ·cols``, which XLA:CPU runs
    ~1.4x faster than ``colsᵀ·dY``); ``(G, C_out/G, KH*KW*C/G)`` otherwise, one such matrix per
    group."""
    kh, kw, c_g, c_out = w.shape
    if groups == 1:
        return w.reshape(kh * kw * c_g, c_out).T
    wm = w.reshape(kh * kw * c_g, groups, c_out // groups)
    return wm.transpose(1, 2, 0)


def _group_major(x, groups):
    """``(N, H, W, C) -> (G, N, H, W, C/G)`` (unchanged for ``groups == 1``)."""
    if groups == 1:
        return x
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).transpose(3, 0, 1, 2, 4)


def _conv_block(x, wm, kernel, stride, padding, dilation, groups, isolate_col2im):
    """``im2col`` of ``x`` times ``_weight_matrix(w, groups)``: ``(N, OH, OW, C_out)``.

    With groups, ``x`` comes group-major, ``(G, N, H, W, C/G)`` (``_group_major``: a copy of the
    image, not of its KH*KW times larger columns, made once outside the block loop), so that one
    ``im2col`` yields each group's columns contiguously for one product batched over the groups.
    Forming the columns of all channels and splitting them by group makes XLA transpose the
    whole column matrix to bring the group axis forward (AlexNet conv4 at batch 16: forward
    38 ms with that transpose, 25 ms without).
    """
    acc = _acc_dtype(x.dtype)
    if groups == 1:
        cols = _im2col(x, kernel, stride, padding, dilation, isolate_col2im)
        y = lax.dot_general(cols, wm, (((3,), (1,)), ((), ())), preferred_element_type=acc)
        return y.astype(x.dtype)
    g, n = x.shape[:2]
    xg = x.reshape(g * n, *x.shape[2:])
    cols = _im2col(xg, kernel, stride, padding, dilation, isolate_col2im)
    _, oh, ow, k_g = cols.shape
    cols = cols.reshape(g, n * oh * ow, k_g)
    y = lax.dot_general(cols, wm, (((2,), (2,)), ((0,), (0,))), preferred_element_type=acc)
    y = y.reshape(g, n, oh, ow, -1).transpose(1, 2, 3, 0, 4)  # the outputs: small
    return y.reshape(n, oh, ow, -1).astype(x.dtype)


# Tiling of the column matrix. A layer's whole column matrix is tens to hundreds of MB; built in
# one piece it runs out of cache and, above glibc's mmap threshold, into freshly page-faulted
# memory on every call. Above _TILE_ABOVE_BYTES the convolution runs over blocks of about
# _BLOCK_BYTES of columns: blocks of the batch, and blocks of output rows when one example alone
# is larger. Both sizes were chosen by measurement on a 2-core x86 CPU with 2 MB of L2 per core
# (docs/performance.md); below _TILE_ABOVE_BYTES the loop and the rebuilt columns cost more than
# they save. Two-stage column builds (below), which write their pieces and then copy them, take
# blocks of half the size: with 8 MB blocks AlexNet conv1 ran 6-15% slower than with 4 MB, while
# the one-pass stacked build gained up to 18% (CIFAR10-quick conv2) from 4 to 8 MB. On
# accelerators the blocks would only serialise the work, so tiling is for the CPU backend alone
# (decided when the function is traced, from JAX's default backend and mesh: _tile_for_cache).
_BLOCK_BYTES = 8 << 20
_TILE_ABOVE_BYTES = 16 << 20


def _tile_for_cache():
    """Whether convolutions traced now are tiled: on the CPU backend, and not inside a step
    partitioned over several devices (``jax.set_mesh``, as ``fit(mesh=...)`` traces it): a
    ``scan`` over blocks of a sharded batch is not partitioned by XLA, which would gather the
    whole batch onto every device and compute every block there. The body of a ``shard_map``
    is no such step: over its manual axes each device runs it on its own shard, which is
    tiled as on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    partitioned = math.prod(n for a, n in mesh.shape.items() if a not in mesh.manual_axes)
    return jax.default_backend() == "cpu" and partitioned <= 1


def _largest_divisor(n, cap):
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _tiling(n, oh, row_bytes, block_bytes=None):
    """``(rows, batch)``: output rows per window and windows per block, for ``n`` examples of
    ``oh`` output rows with ``row_bytes`` of columns each, in blocks of about ``block_bytes``
    (default ``_BLOCK_BYTES``); ``(oh, n)`` means no tiling."""
    if n * oh * row_bytes <= _TILE_ABOVE_BYTES or not _tile_for_cache():
        return oh, n
    block_bytes = _BLOCK_BYTES if block_bytes is None else block_bytes
    rows = _largest_divisor(oh, block_bytes // row_bytes)
    windows = n * (oh // rows)
    return rows, _largest_divisor(windows, block_bytes // (rows * row_bytes))


def _conv_im2col(x, w, *, stride, padding, dilation, groups):
    """``im2col`` then one product; over blocks (a ``lax.scan``) when the columns are large.

    A block is a few examples, or a window of output rows of one example (the input rows it reads,
    halo included, are cut out beforehand and stacked along the batch axis). The block body is
    rematerialised (``jax.checkpoint``): the backward pass rebuilds each block's columns rather
    than keeping all of them, so per block it is ``im2col``, the two products ``dW += dYᵀ·cols``
    and ``dcols = dY·W``, and ``col2im`` -- Caffe's backward, in cache. Forward mode, higher
    orders and ``vmap`` go through ``scan``'s own rules.
    """
    kernel = w.shape[:2]
    n, h, wd, c = x.shape
    (kh, _), (sh, _), (ph, pw), (dh, _) = kernel, stride, padding, dilation
    # The weight matrix is formed once, outside the loop, so the loop accumulates its gradient in
    # the product's own layout and the transpose back to HWIO happens once.
    wm = _weight_matrix(w, groups)

    def block(xb, wm, padding, isolate_col2im=False):
        return _conv_block(xb, wm, kernel, stride, padding, dilation, groups, isolate_col2im)

    oh, ow = conv_output_size((h, wd), kernel, stride, padding, dilation, fn="conv2d")
    itemsize = jnp.dtype(x.dtype).itemsize
    row_bytes = ow * kernel[0] * kernel[1] * c * itemsize
    two_stage = _two_stage(kernel, stride, dilation, c // groups, itemsize)
    rows, b = _tiling(n, oh, row_bytes, _BLOCK_BYTES // 2 if two_stage else _BLOCK_BYTES)
    if (rows == oh and b == n) or _is_1x1(kernel, stride, padding):
        # A 1x1 convolution has no columns to keep in cache. Untiled, the backward's col2im is
        # isolated from its consumers (see the col2im notes below); in the blocks below the
        # scan materialises it anyway.
        return block(_group_major(x, groups), wm, padding, isolate_col2im=True)
    if rows < oh:
        # Windows of `rows` output rows: input rows [r*rows*sh, r*rows*sh + span) of the
        # height-padded image, stacked along the batch; each is then convolved without height
        # padding.
        span = (rows - 1) * sh + (kh - 1) * dh + 1
        windows = []
        for r in range(oh // rows):
            lo = r * rows * sh - ph  # first input row, counting the padding as negative rows
            cut = lax.slice_in_dim(x, max(lo, 0), min(lo + span, h), axis=1)
            windows.append(_pad_crop(cut, max(-lo, 0), max(lo + span - h, 0), 0, 0))
        x = jnp.stack(windows, axis=1).reshape(-1, span, wd, c)
        padding = (0, pw)
    nb = x.shape[0] // b
    # One example or window per block: scanned without the unit block axis, which XLA:CPU would
    # lay out as a major axis and then copy to the loop's default layout.
    unit = b == 1 and groups == 1

    def body(carry, xb):
        return carry, (block(xb[None], wm, padding)[0] if unit else block(xb, wm, padding))

    body = jax.checkpoint(body, prevent_cse=False)
    xs = x if unit else x.reshape(nb, b, *x.shape[1:])
    if groups > 1:  # blocks of (G, b, H, W, C/G), the group transpose done once for all blocks
        xs = xs.reshape(*xs.shape[:4], groups, -1).transpose(0, 4, 1, 2, 3, 5)
    _, y = lax.scan(body, None, xs)
    return y.reshape(n, oh, ow, y.shape[-1])


def _is_1x1(kernel, stride, padding):
    return kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)


def _im2col(x, kernel, stride, padding, dilation, isolate_col2im=False):
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


def _offsets(kernel, dilation):
    return [(i * dilation[0], j * dilation[1]) for i in range(kernel[0]) for j in range(kernel[1])]


def _pad_crop(x, low_h, high_h, low_w, high_w):
    """Zero-pads (positive) or crops (negative) the two spatial axes of an NHWC array."""
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (low_h, high_h, 0), (low_w, high_w, 0), (0, 0, 0)))


# im2col. Every path returns the same matrix; which one is used depends on the geometry only:
#   stride == kernel, no dilation   -> one reshape + transpose (space-to-depth; no overlap)
#   16+ taps, pieces under 64 bytes -> two stages: the KW width taps of every input row are
#                                      concatenated first (width phases when the width stride
#                                      is > 1), then KH row slices of that
#   otherwise                       -> KH*KW strided slices stacked as (N, OH, OW, KH, KW, C),
#                                      a free reshape from the columns; with a width stride
#                                      (no width dilation) ceil(KW/sw) slices of the image
#                                      folded into width phases per kernel row, sw taps each,
#                                      the taps past KW cut off
# XLA:CPU fuses a concatenation only when it has at most 8 operands and does not run along the
# minor axis (unless that is under 128 wide; cpu_instruction_fusion.cc). Otherwise each piece is
# materialised by a kernel of its own and copied again by the concatenation: KH*KW + 1 kernels
# to compile (~10 ms each on the project's CPU) and two passes over memory. _stack therefore
# concatenates along new major axes, at most 8 operands per concatenation, each level of the tree
# on an axis of its own, and the column matrix is one fused loop. Measured per layer, forward +
# backward, against the one concatenation of KH*KW pieces (and the row loop it replaced for wide
# channels): CIFAR10-quick conv2 40-42 -> 31-33 ms, VGG 3x3x128 134 -> 111-114 ms, AlexNet conv4
# 58-60 -> 50-52 ms; compile of AlexNet conv2 1.05 -> 0.52 s, of the AlexNet train step 2.8 ->
# 2.2 s (docs/performance.md, session 5). The two-stage path keeps its concatenations: with pieces
# this narrow the stacked loop ran slower (AlexNet conv1 forward 26 -> 37 ms).
_FUSED_CONCAT_MAX_OPERANDS = 8
_CHANNEL_SPLIT = 4
_TWO_STAGE_MIN_TAPS = 16
_TWO_STAGE_MAX_PIECE_BYTES = 64


def _two_stage(kernel, stride, dilation, channels, itemsize):
    """Whether im2col builds its columns in two stages: many taps, narrow pieces."""
    fold = stride[1] if stride[1] > 1 and dilation[1] == 1 else 1
    piece = fold * channels * itemsize  # bytes per one-stage piece
    return kernel[0] * kernel[1] >= _TWO_STAGE_MIN_TAPS and piece < _TWO_STAGE_MAX_PIECE_BYTES


def _im2col_impl(x, *, kernel, stride, padding, dilation, image, isolate_col2im=False):
    del isolate_col2im  # a parameter of the pair, for the transposed col2im only
    n, h, w, c = x.shape
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel, padding, stride, dilation
    oh, ow = conv_output_size((h, w), kernel, stride, padding, dilation, fn="im2col")
    if stride == kernel and dilation == (1, 1):
        return _im2col_space_to_depth(x, kernel, padding, (oh, ow))
    if _two_stage(kernel, stride, dilation, c, x.dtype.itemsize):
        rows = _width_taps(x, kernel, stride, padding, dilation, ow)  # (N, H + 2*ph, OW, KW*C)
        pieces = [
            lax.slice_in_dim(rows, i * dh, i * dh + (oh - 1) * sh + 1, sh, axis=1)
            for i in range(kh)
        ]
        return jnp.concatenate(pieces, axis=-1)
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
        # The channels as (C/4, 4), a free reshape: with C innermost, LLVM unrolls the channel
        # loop of each of the KH*KW pieces into straight-line code. AlexNet conv2's 5x5 build on
        # 48 channels took 330 ms of LLVM code generation alone, 52 ms with (12, 4), and ran as
        # fast (docs/performance.md, session 5).
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


# col2im: the adjoint of each im2col path.
#   stride == kernel, no dilation -> one transpose + reshape (depth-to-space)
#   stride > 1                    -> by stride phase: dense sums of shifted slices, interleaved
#   stride 1                      -> sum of KH*KW shifted slices (one fused loop)
# The primitives carry ``isolate_col2im``, true for an untiled convolution. Untiled, XLA:CPU
# fuses the sum of KH*KW pieces into whatever consumes the image gradient, e.g. the transposed
# copy of the previous layer's output gradient that its weight-gradient product reads, and
# evaluates the whole sum in that transposed order (LeNet: one such fusion took 7.6 ms of a 21 ms
# step), or materialises each piece as a fusion of its own. On the CPU an isolated col2im is
# computed as a unit (``_isolated``): the LeNet step took 14.9-15.5 ms instead of 20.5-22.1, and
# with fewer fusions it compiles faster (LeNet 1.13-1.18 -> 0.91-0.97 s, CIFAR10-quick at batch
# 16 2.57-2.65 -> 1.49-1.56 s, its step 25.2-26.2 -> 22.6-22.9 ms; docs/performance.md).
# Inside the blocks of a tiled layer the scan materialises each block's result anyway; pooling,
# conv_transpose2d and the public col2im are not isolated.


def _col2im_impl(
    cols, *, kernel, stride, padding, dilation, image, isolate_col2im=False, cpu=False
):
    if cpu and isolate_col2im and cols.size:
        params = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation)
        return _isolated(functools.partial(_col2im_impl, image=image, **params), cols)
    if stride == kernel and dilation == (1, 1):
        return _col2im_depth_to_space(cols, kernel, padding, image)
    if stride != (1, 1):
        return _col2im_phases(cols, kernel, stride, padding, dilation, image)
    _, oh, ow, kkc = cols.shape
    c = kkc // (kernel[0] * kernel[1])
    (h, w), (ph, pw) = image, padding
    acc = None
    for idx, (h0, w0) in enumerate(_offsets(kernel, dilation)):
        piece = cols[..., idx * c : (idx + 1) * c]
        # piece[oh, ow] lands on pixel (h0 + oh, w0 + ow) of the padded image, then the padding
        # is cropped: one padded (or cropped) shifted copy per kernel offset, summed.
        placed = _pad_crop(piece, h0 - ph, h + ph - h0 - oh, w0 - pw, w + pw - w0 - ow)
        acc = placed if acc is None else acc + placed
    return acc


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
    phases = {}
    for i in range(kh):
        qi, ri = divmod(i * dh, sh)
        for j in range(kw):
            qj, rj = divmod(j * dw, sw)
            idx = i * kw + j
            placed = _pad_crop(
                cols[..., idx * c : (idx + 1) * c], qi, lh - oh - qi, qj, lw - ow - qj
            )
            key = (ri, rj)
            phases[key] = placed if key not in phases else phases[key] + placed
    # Interleaved as (N, LH, sh, LW, sw, C) by stacking (_stack: one fused loop, where a stack of
    # the sh*sw phases and a transpose compiled to a kernel per phase: AlexNet conv1's 16 phases
    # took 17 kernels and 261 ms of LLVM code generation).
    zeros = jnp.zeros((n, lh, lw, c), cols.dtype)
    rows = [_stack([phases.get((ri, rj), zeros) for rj in range(sw)], 1) for ri in range(sh)]
    full = _stack(rows, trail=3).reshape(n, lh * sh, lw * sw, c)
    # Crop the padding and cut (or zero-fill) the far edge to the image.
    return _pad_crop(full, -ph, ph + h - lh * sh, -pw, pw + w - lw * sw)


# The output type is the operand's with a new shape: dtype, sharding and the manual axes it
# varies over (shard_map's check_vma) carried over. Typed afresh as ShapedArray(shape, dtype),
# the columns of a per-device shard were "the same on every device", so dW = colsᵀ·dY was not
# summed over the devices (per-device weight gradients, silently) and the transposes failed on
# the cotangent's type.


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
