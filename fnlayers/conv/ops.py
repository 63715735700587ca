"""The public convolution ops: :func:`conv2d`, :func:`conv_transpose2d`, :func:`im2col`,
:func:`col2im`, and the convolution over blocks that ``conv2d(impl="im2col")`` runs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fnlayers._checks import (
    acc_dtype,
    as_pair,
    check_choice,
    check_float_array,
    check_rank,
    check_same_dtype,
)
from fnlayers._products import dot
from fnlayers._typing import Array, ArrayLike, IntPair
from fnlayers.conv import blocking, folding
from fnlayers.conv.blocking import partitioned_devices, plan_blocks
from fnlayers.conv.primitives import _col2im, _im2col, _pad_crop
from fnlayers.conv.shapes import (
    conv_output_shape,
    conv_output_size,
    conv_transpose_output_shape,
    pairs,
)

__all__ = ["IMPLS", "col2im", "conv2d", "conv_transpose2d", "im2col"]

IMPLS = ("im2col", "xla")


def conv2d(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    impl: str = "im2col",
) -> Array:
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
    stride, padding, dilation = pairs(stride, padding, dilation, fn)
    if impl == "xla":
        y = lax.conv_general_dilated(
            x,
            w,
            window_strides=stride,
            padding=[(padding[0], padding[0]), (padding[1], padding[1])],
            rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            preferred_element_type=acc_dtype(x.dtype),
        ).astype(x.dtype)
    else:
        conv = functools.partial(
            _conv_im2col, stride=stride, padding=padding, dilation=dilation, groups=groups
        )
        y = _per_example(conv, x, w)
    if y.shape[1:] != out_shape[1:]:  # pragma: no cover - guards the shape rule itself
        raise RuntimeError(f"conv2d: computed {y.shape}, expected {out_shape}")
    return _add_bias(y, b, fn)


def conv_transpose2d(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Array:
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
    stride, padding, dilation = pairs(stride, padding, dilation, fn)

    def deconv(x, w):
        kh, kw, c_out_g, c_in = w.shape
        n, h, wd = x.shape[:3]
        xg = x.reshape(n, h, wd, groups, c_in // groups)
        wg = w.reshape(kh * kw, c_out_g, groups, c_in // groups)
        # (G, KH*KW, C_out/G, N, H, W), operands in the order and layout jnp.einsum
        # ("nhwgm,kcgm->nhwkgc") chose when it computed this product, so float32 programs are as
        # they were.
        cols = dot(wg, xg, (((3,), (4,)), ((2,), (3,)))).transpose(3, 4, 5, 1, 0, 2)
        cols = cols.reshape(n, h, wd, kh * kw * c_out_g * groups)
        return _col2im(cols, out_shape[1:3], (kh, kw), stride, padding, dilation)

    return _add_bias(_per_example(deconv, x, w), b, fn)


def im2col(
    x: ArrayLike,
    kernel_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Array:
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
    stride, padding, dilation = pairs(stride, padding, dilation, fn)
    conv_output_size(x.shape[1:3], kernel, stride, padding, dilation, fn=fn)
    geometry = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    return _per_example(_im2col, x, **geometry)


def col2im(
    cols: ArrayLike,
    image_size: IntPair,
    kernel_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Array:
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
    stride, padding, dilation = pairs(stride, padding, dilation, fn)
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


def _check_arrays(x, w, b, fn):
    check_float_array(x, fn=fn, name="x")
    check_same_dtype(x, w, fn=fn, names=("x", "w"))
    if b is not None:
        check_same_dtype(x, b, fn=fn, names=("x", "b"))


def _add_bias(y, b, fn):
    if b is None:
        return y
    if b.shape != (y.shape[-1],):
        raise ValueError(f"{fn}: b has shape {b.shape}, expected (C_out,) = ({y.shape[-1]},)")
    # Added in the accumulation dtype: the bias gradient is the sum of dy over N*OH*OW
    # positions, and the transpose of this broadcast is that sum, in float32.
    acc = acc_dtype(y.dtype)
    return (y.astype(acc) + b.astype(acc).reshape(1, 1, 1, -1)).astype(y.dtype)


def _conv_im2col(x, w, *, stride, padding, dilation, groups):
    """``im2col`` then one product, over blocks when the columns are large (:func:`_conv_blocks`),
    after folding the stride into the channels where ``blocking._fold_stride`` says so.

    In a program partitioned over several devices (``fit(mesh=...)``), the batch is split into
    one slice per device first and the slices are a ``vmap`` axis: XLA does not partition a
    ``scan`` over blocks of a sharded batch (it would gather the whole batch onto every device
    and compute every block there), while it keeps a mapped axis split through the scan, so
    each device tiles its own slice as one device tiles its batch. A batch that does not split
    evenly is convolved untiled.
    """
    itemsize = x.dtype.itemsize
    if blocking._fold_stride(x.shape, w.shape[:2], stride, padding, dilation, groups, itemsize):
        x = folding.fold_input(x, w.shape[:2], stride, padding)
        w = folding.fold_weight(w, stride)
        stride, padding = (1, 1), (0, 0)
    cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    shards = partitioned_devices()
    if shards == 1:
        return _conv_blocks(x, w, **cfg)
    n = x.shape[0]
    if not blocking._tile_for_cache() or n % shards:
        return _conv_blocks(x, w, tile=False, **cfg)
    slices = x.reshape(shards, n // shards, *x.shape[1:])
    y = jax.vmap(lambda xs: _conv_blocks(xs, w, **cfg))(slices)
    return y.reshape(n, *y.shape[2:])


def _conv_blocks(x, w, *, stride, padding, dilation, groups, tile=None):
    """``im2col`` then one product; over blocks (a ``lax.scan``) when the columns are large
    (``blocking.plan_blocks``; ``tile=False`` never tiles).

    A block is a few examples, or a window of output rows of one example (the input rows it reads,
    halo included, are cut out beforehand and stacked along the batch axis). The block body is
    rematerialised (``jax.checkpoint``): the backward pass rebuilds each block's columns rather
    than keeping all of them, so per block it is ``im2col``, the two products ``dW += colsᵀ·dY``
    and ``dcols = dY·W``, and ``col2im`` -- Caffe's backward, in cache. Forward mode, higher
    orders and ``vmap`` go through ``scan``'s own rules.
    """
    n = x.shape[0]
    geometry = dict(kernel=w.shape[:2], stride=stride, dilation=dilation, groups=groups)
    plan = plan_blocks(x.shape, padding=padding, dtype=x.dtype, tile=tile, **geometry)
    # The weight matrix is formed once, outside the loop, so the loop accumulates its gradient in
    # the product's own layout, and any transpose back to HWIO (groups, low precision) happens
    # once.
    wm = _weight_matrix(w, groups)
    if not plan.tiled:
        # Untiled, the backward's col2im is isolated from its consumers (see the col2im notes in
        # primitives); in the blocks below the scan materialises it anyway.
        xg = _group_major(x, groups)
        return _conv_block(xg, wm, padding=padding, isolate_col2im=True, **geometry)
    oh, ow = conv_output_size(x.shape[1:3], w.shape[:2], stride, padding, dilation, fn="conv2d")
    if plan.rows < oh:
        x = _row_windows(x, plan.rows, oh, w.shape[0], stride[0], padding[0], dilation[0])
        padding = (0, padding[1])
    # One example or window per block: scanned without the unit block axis, which XLA:CPU would
    # lay out as a major axis and then copy to the loop's default layout.
    unit = plan.per_block == 1 and groups == 1

    # The loop closes over the weight in the accumulation dtype, so the backward pass sums the
    # blocks' weight gradients in float32 (a float16/bfloat16 carry would round every block's
    # partial sum); each block casts it back for its product.
    wm_acc = wm.astype(acc_dtype(wm.dtype))

    def body(carry, xb):
        wb = wm_acc.astype(wm.dtype)
        if unit:
            return carry, _conv_block(xb[None], wb, padding=padding, **geometry)[0]
        return carry, _conv_block(xb, wb, padding=padding, **geometry)

    body = jax.checkpoint(body, prevent_cse=False)
    xs = x if unit else x.reshape(plan.blocks, plan.per_block, *x.shape[1:])
    if groups > 1:  # blocks of (G, b, H, W, C/G), the group transpose done once for all blocks
        xs = xs.reshape(*xs.shape[:4], groups, -1).transpose(0, 4, 1, 2, 3, 5)
    _, y = lax.scan(body, None, xs)
    return y.reshape(n, oh, ow, y.shape[-1])


def _row_windows(x, rows, oh, kh, sh, ph, dh):
    """The input rows read by windows of ``rows`` of the ``oh`` output rows, stacked along the
    batch: ``(N * oh/rows, span, W, C)``. Window r holds rows ``[r*rows*sh, r*rows*sh + span)``
    of the height-padded image, so each is then convolved without height padding."""
    _, h, wd, c = x.shape
    span = (rows - 1) * sh + (kh - 1) * dh + 1
    windows = []
    for r in range(oh // rows):
        lo = r * rows * sh - ph  # first input row, counting the padding as negative rows
        cut = lax.slice_in_dim(x, max(lo, 0), min(lo + span, h), axis=1)
        windows.append(_pad_crop(cut, max(-lo, 0), max(lo + span - h, 0), 0, 0))
    return jnp.stack(windows, axis=1).reshape(-1, span, wd, c)


def _conv_block(x, wm, *, kernel, stride, padding, dilation, groups, isolate_col2im=False):
    """``im2col`` of ``x`` times ``_weight_matrix(w, groups)``: ``(N, OH, OW, C_out)``.

    With groups, ``x`` comes group-major, ``(G, N, H, W, C/G)`` (``_group_major``: a copy of the
    image, not of its KH*KW times larger columns, made once outside the block loop), so that one
    ``im2col`` yields each group's columns contiguously for one product batched over the groups.
    Forming the columns of all channels and splitting them by group would make XLA transpose the
    whole column matrix to bring the group axis forward.
    """
    geometry = (kernel, stride, padding, dilation, isolate_col2im)
    if groups == 1:
        cols = _im2col(x, *geometry)
        return dot(cols, wm, (((3,), (_k_axis(wm.dtype),)), ((), ())))
    g, n = x.shape[:2]
    cols = _im2col(x.reshape(g * n, *x.shape[2:]), *geometry)
    _, oh, ow, k_g = cols.shape
    cols = cols.reshape(g, n * oh * ow, k_g)
    y = dot(cols, wm, (((2,), (1 + _k_axis(wm.dtype),)), ((0,), (0,))))
    y = y.reshape(g, n, oh, ow, -1).transpose(1, 2, 3, 0, 4)  # the outputs: small
    return y.reshape(n, oh, ow, -1)


def _weight_matrix(w, groups):
    """The weight as the product wants it, contracted on axis :func:`_k_axis`.

    Float32 (and wider): ``(KH*KW*C, C_out)``, a free reshape of HWIO, so that neither the
    forward product ``cols·W`` nor the weight gradient ``colsᵀ·dY`` (already in HWIO order)
    needs a transposed copy of the weight: such a copy is a kernel of its own for XLA:CPU to
    compile and one more pass over the weight in every step. float16/bfloat16:
    ``(C_out, KH*KW*C)``, the gradient coming out as ``dYᵀ·cols``: XLA:CPU's dot runtime has no
    low-precision ``colsᵀ·dY`` with a float32 result ("Unsupported element type for
    DotThunk"). With groups, one such matrix per group, the group axis first."""
    kh, kw, c_g, c_out = w.shape
    wm = w.reshape(kh * kw * c_g, groups, c_out // groups)
    if _k_axis(w.dtype) == 0:
        return wm.reshape(kh * kw * c_g, c_out) if groups == 1 else wm.transpose(1, 0, 2)
    return wm.reshape(kh * kw * c_g, c_out).T if groups == 1 else wm.transpose(1, 2, 0)


def _k_axis(dtype) -> int:
    """The axis of the (per-group) weight matrix that the product contracts (see
    :func:`_weight_matrix`)."""
    return 0 if acc_dtype(dtype) == dtype else 1


def _group_major(x, groups):
    """``(N, H, W, C) -> (G, N, H, W, C/G)`` (unchanged for ``groups == 1``)."""
    if groups == 1:
        return x
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).transpose(3, 0, 1, 2, 4)
