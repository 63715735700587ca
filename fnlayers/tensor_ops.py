"""The rest of Caffe's layer catalogue as ops: tensor plumbing (Slice, Split, Crop, Flatten,
Reshape), Softmax, Scale and Bias, the elementwise Power, AbsVal, BNLL, Exp, Log and Threshold,
ArgMax, InnerProduct with ``axis``/``transpose``, and Silence. The layers are in
:mod:`fnlayers.catalogue`.

Axes: NHWC numbering by default, Caffe's with ``caffe_axes=True``
-----------------------------------------------------------------

fnlayers' arrays are channels last (``(N, H, W, C)``); Caffe's blobs are channels first
(``(N, C, H, W)``). The two are one transposition apart: an array's **Caffe blob** is
:func:`to_caffe_blob` ``(x)``, the last axis moved to position 1 (arrays of rank 2 or less,
``(N, C)``, are their own blob). In general, for rank ``r >= 3``::

    Caffe axis   0   1        2   3   ...  r-1
    array axis   0   r-1      1   2   ...  r-2       (4-D: N->0, C->3, H->1, W->2)

:func:`caffe_axis` is that mapping for one axis.

* By default (``caffe_axes=False``) every ``axis`` argument numbers the array's own axes, as in
  NumPy (negative counts from the end), and every op works on the array in its own element order.
  Where Caffe's default axis is 1 (the channels), the default here is ``-1`` (the channels,
  last); Caffe's spatial axes 2, 3 are 1, 2 here. ``flatten_axes(x)`` of an NHWC image therefore
  flattens in ``(H, W, C)`` order, like :func:`fnlayers.flatten`.
* With ``caffe_axes=True`` the op reads its input as Caffe's blob: axis arguments are Caffe's
  numbers (1 = channels), element orders are Caffe's (flattening, reshaping and InnerProduct's
  ``K`` run over ``(C, H, W)``), parameters and offsets are given in Caffe's order, and the result
  is handed back channels last (:func:`from_caffe_blob`). So
  ``to_caffe_blob(op(x, ..., caffe_axes=True))`` equals Caffe's top **element for element** for
  the bottom ``to_caffe_blob(x)``, and weights and prototxt numbers carry over unchanged. Ops that
  act along one axis (softmax, slice, argmax with an axis) just map the axis; the others
  transpose, apply Caffe's arithmetic, and transpose back.

Both conventions compute the same function when the axes involved map to one another, e.g.
``softmax(x, axis=-1)`` is ``softmax(x, axis=1, caffe_axes=True)`` on an NHWC ``x``.

Errors: a ValueError or TypeError naming the function, the argument and the value, raised at
trace time from static shapes and Python values, like every fnlayers op.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlayers import linear as _linear
from fnlayers._checks import (
    acc_dtype,
    check_bool,
    check_float_array,
    check_int,
    check_positive_int,
    check_real,
    check_same_dtype,
    is_int,
)
from fnlayers._typing import Array, ArrayLike

__all__ = [
    "absval",
    "argmax",
    "bias",
    "bnll",
    "caffe_axis",
    "crop",
    "exp",
    "flatten_axes",
    "from_caffe_blob",
    "inner_product",
    "log",
    "power",
    "reshape",
    "reshape_shape",
    "scale",
    "silence",
    "slice_axis",
    "softmax",
    "split_copies",
    "threshold",
    "to_caffe_blob",
]


# ----------------------------------------------------------------------------- layouts


def caffe_axis(axis: int, ndim: int) -> int:
    """The array axis (channels last) of Caffe's axis ``axis`` (channels first) for an array of
    rank ``ndim``: 0 -> 0, 1 -> ndim - 1, k -> k - 1 for k >= 2 (4-D: N, C, H, W -> 0, 3, 1, 2).
    Negative ``axis`` counts from the end of Caffe's blob. Rank <= 2 maps every axis to itself.

    Raises:
      TypeError: ``axis`` is not an int.
      ValueError: ``axis`` is outside ``[-ndim, ndim)``.
    """
    a = _axis(axis, ndim, fn="caffe_axis")
    if ndim < 3 or a == 0:
        return a
    return ndim - 1 if a == 1 else a - 1


def to_caffe_blob(x: ArrayLike) -> Array:
    """Caffe's channels-first blob of a channels-last array: ``(N, H, W, C) -> (N, C, H, W)``
    (in general the last axis moved to position 1); arrays of rank <= 2 unchanged."""
    x = jnp.asarray(x)
    return jnp.moveaxis(x, -1, 1) if x.ndim >= 3 else x


def from_caffe_blob(blob: ArrayLike) -> Array:
    """The channels-last array of a Caffe blob (the inverse of :func:`to_caffe_blob`):
    ``(N, C, H, W) -> (N, H, W, C)``; rank <= 2 unchanged."""
    blob = jnp.asarray(blob)
    return jnp.moveaxis(blob, 1, -1) if blob.ndim >= 3 else blob


def _caffe_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return (shape[0], shape[-1], *shape[1:-1]) if len(shape) >= 3 else shape


def _from_caffe_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return (shape[0], *shape[2:], shape[1]) if len(shape) >= 3 else shape


# ----------------------------------------------------------------------------- plumbing


def slice_axis(
    x: ArrayLike,
    slice_point: Sequence[int] = (),
    *,
    axis: int = -1,
    num_outputs: int | None = None,
    caffe_axes: bool = False,
) -> tuple[Array, ...]:
    """Caffe's Slice: cuts ``x`` along ``axis`` into a tuple of arrays (Caffe's tops).

    Args:
      x: any array.
      slice_point: strictly increasing indices in ``(0, x.shape[axis])``; ``len + 1`` outputs,
        ``x[..., 0:p0]``, ``x[..., p0:p1]``, ..., ``x[..., p_last:]``.
      axis: the axis to cut (default -1, the channels; Caffe's default 1 with ``caffe_axes``).
      num_outputs: without ``slice_point``, the number of equal parts (must divide the axis);
        with it, optional and must equal ``len(slice_point) + 1``.
      caffe_axes: ``axis`` is Caffe's NCHW number (see the module docstring).

    Returns:
      A tuple of arrays (one element when there is one output: Caffe then shares the bottom).
    """
    fn = "slice_axis"
    x = jnp.asarray(x)
    a = _any_axis(axis, x.ndim, caffe_axes, fn)
    dim = x.shape[a]
    points = _slice_points(slice_point, num_outputs, dim, fn)
    bounds = (0, *points, dim)
    return tuple(lax.slice_in_dim(x, lo, hi, axis=a) for lo, hi in itertools.pairwise(bounds))


def _slice_points(slice_point, num_outputs, dim: int, fn: str) -> tuple[int, ...]:
    if not isinstance(slice_point, Sequence) or isinstance(slice_point, str):
        raise TypeError(f"{fn}: slice_point={slice_point!r} must be a sequence of ints")
    points = tuple(check_int(p, fn=fn, name="slice_point") for p in slice_point)
    if num_outputs is not None:
        num_outputs = check_positive_int(num_outputs, fn=fn, name="num_outputs")
    if points:
        if num_outputs is not None and num_outputs != len(points) + 1:
            raise ValueError(
                f"{fn}: num_outputs={num_outputs} disagrees with slice_point={points!r}, "
                f"which makes {len(points) + 1} outputs"
            )
        bounds = (0, *points, dim)
        if any(lo >= hi for lo, hi in itertools.pairwise(bounds)):
            raise ValueError(
                f"{fn}: slice_point={points!r} must be strictly increasing within (0, {dim}), "
                f"the size of the sliced axis"
            )
        return points
    if num_outputs is None:
        raise ValueError(f"{fn}: give slice_point or num_outputs (the number of equal parts)")
    if dim % num_outputs:
        raise ValueError(
            f"{fn}: num_outputs={num_outputs} does not divide the sliced axis of size {dim}"
        )
    step = dim // num_outputs
    return tuple(step * i for i in range(1, num_outputs))


def split_copies(x: ArrayLike, num_outputs: int = 2) -> tuple[Array, ...]:
    """Caffe's Split: ``num_outputs`` identical copies of ``x`` (not NumPy's split; for cutting
    an array see :func:`slice_axis`). Under autodiff the copies' gradients add up, as Caffe's
    Split backward sums its tops' diffs."""
    n = check_positive_int(num_outputs, fn="split_copies", name="num_outputs")
    x = jnp.asarray(x)
    return (x,) * n


def crop(
    x: ArrayLike,
    reference,
    *,
    axis: int = 1,
    end_axis: int | None = None,
    offset: int | Sequence[int] = 0,
    caffe_axes: bool = False,
) -> Array:
    """Caffe's Crop: ``x`` cut to ``reference``'s size on the axes ``axis..end_axis``.

    Caffe crops bottom[0] to bottom[1]'s shape on every axis from ``axis`` (default 2, H) to the
    last; the other axes keep bottom[0]'s sizes. Caffe's axes ``2..3`` (H, W) are ``1..2`` here,
    not ``1..3``, so the range takes an end: the default ``axis=1, end_axis=-2`` crops H and W
    of an NHWC image and leaves C alone, like Caffe's default. With ``caffe_axes=True`` the range
    is Caffe's, ``axis`` to the end of Caffe's blob (``end_axis`` must stay None), and offsets are
    in Caffe's axis order.

    Args:
      x: any array.
      reference: an array or a shape, of x's rank. Only its shape is used (Caffe's Crop sends no
        gradient to bottom[1]).
      axis, end_axis: the first and last cropped axis (inclusive; negative counts from the end).
        ``end_axis=None`` is -2 (or Caffe's last axis with ``caffe_axes``).
      offset: Caffe's ``offset``: one int for every cropped axis, or one per cropped axis in
        order (an empty sequence means 0).
      caffe_axes: see the module docstring.

    Returns:
      ``x[..., offset_i : offset_i + reference.shape[i], ...]`` on the cropped axes.
    """
    fn = "crop"
    x = jnp.asarray(x)
    ref_shape = _shape_of(reference, fn, "reference")
    if len(ref_shape) != x.ndim:
        raise ValueError(
            f"crop: x has shape {x.shape} (rank {x.ndim}) but reference has shape {ref_shape} "
            f"(rank {len(ref_shape)}); Caffe's Crop needs the same rank"
        )
    caffe_axes = check_bool(caffe_axes, fn=fn, name="caffe_axes")
    if caffe_axes:
        if end_axis is not None:
            raise ValueError(
                f"crop: end_axis={end_axis!r} with caffe_axes=True; Caffe crops from axis to the "
                "last axis of its blob, so leave end_axis None"
            )
        xb, ref_shape = to_caffe_blob(x), _caffe_shape(ref_shape)
        start, end = _axis(axis, x.ndim, fn=fn), x.ndim - 1
    else:
        xb = x
        start = _axis(axis, x.ndim, fn=fn)
        end = _axis(-2 if end_axis is None else end_axis, x.ndim, fn=fn, name="end_axis")
        if end < start:
            raise ValueError(
                f"crop: end_axis={end_axis!r} comes before axis={axis!r} for an input of rank "
                f"{x.ndim}; nothing would be cropped"
            )
    offsets = _offsets(offset, end - start + 1, fn)
    starts, sizes = [], []
    for i, d in enumerate(xb.shape):
        if start <= i <= end:
            off, size = offsets[i - start], ref_shape[i]
            if off + size > d:
                raise ValueError(
                    f"crop: offset {off} plus the reference size {size} on axis {i} runs past "
                    f"x's size {d} there (x {tuple(xb.shape)}, reference {tuple(ref_shape)}"
                    f"{', Caffe order' if caffe_axes else ''})"
                )
            starts.append(off)
            sizes.append(size)
        else:
            starts.append(0)
            sizes.append(d)
    y = lax.slice(xb, starts, [s + n for s, n in zip(starts, sizes, strict=True)])
    return from_caffe_blob(y) if caffe_axes else y


def _offsets(offset, count: int, fn: str) -> tuple[int, ...]:
    if is_int(offset):
        values = (int(offset),) * count
    elif isinstance(offset, Sequence) and not isinstance(offset, str):
        values = tuple(check_int(o, fn=fn, name="offset") for o in offset)
        if len(values) == 0:
            values = (0,) * count
        elif len(values) == 1:
            values = values * count
        elif len(values) != count:
            raise ValueError(
                f"{fn}: offset={tuple(offset)!r} gives {len(values)} offsets for the {count} "
                "cropped axes (give one, or one per cropped axis)"
            )
    else:
        raise TypeError(f"{fn}: offset={offset!r} must be an int or a sequence of ints")
    if any(v < 0 for v in values):
        raise ValueError(f"{fn}: offset={offset!r} must be >= 0")
    return values


def flatten_axes(
    x: ArrayLike, axis: int = 1, end_axis: int = -1, *, caffe_axes: bool = False
) -> Array:
    """Caffe's Flatten: the axes ``axis..end_axis`` (inclusive) merged into one.

    ``(d0, ..., d_axis, ..., d_end, ...) -> (d0, ..., d_axis * ... * d_end, ...)``. The defaults
    flatten everything after the batch axis. By default the elements keep the array's own order
    (``(H, W, C)`` for an NHWC image, as :func:`fnlayers.flatten`); with ``caffe_axes=True`` the
    input is read as Caffe's NCHW blob and flattened in Caffe's ``(C, H, W)`` order, so the output
    equals Caffe's Flatten top element for element (and an InnerProduct weight imported from Caffe
    that follows it needs no permutation).

    Raises:
      ValueError: an axis out of range, or ``end_axis`` before ``axis``.
    """
    fn = "flatten_axes"
    x = jnp.asarray(x)
    caffe_axes = check_bool(caffe_axes, fn=fn, name="caffe_axes")
    xb = to_caffe_blob(x) if caffe_axes else x
    start = _axis(axis, x.ndim, fn=fn)
    end = _axis(end_axis, x.ndim, fn=fn, name="end_axis")
    if end < start:
        raise ValueError(
            f"{fn}: end_axis={end_axis!r} comes before axis={axis!r} for an input of rank {x.ndim}"
        )
    s = xb.shape
    y = xb.reshape(*s[:start], math.prod(s[start : end + 1]), *s[end + 1 :])
    return from_caffe_blob(y) if caffe_axes else y


def reshape_shape(
    in_shape: Sequence[int],
    shape: Sequence[int],
    *,
    axis: int = 0,
    num_axes: int = -1,
    fn: str = "reshape_shape",
) -> tuple[int, ...]:
    """The output shape of Caffe's Reshape for an input of shape ``in_shape`` (see
    :func:`reshape`); pure Python, for shapes only."""
    in_shape = tuple(int(d) for d in in_shape)
    ndim = len(in_shape)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise TypeError(f"{fn}: shape={shape!r} must be a sequence of ints")
    dims = tuple(check_int(d, fn=fn, name="shape") for d in shape)
    if any(d < -1 for d in dims):
        raise ValueError(f"{fn}: shape={dims!r}: dims must be >= 0, 0 (copy) or -1 (infer)")
    if dims.count(-1) > 1:
        raise ValueError(f"{fn}: shape={dims!r} has more than one -1; at most one dim is inferred")
    axis = check_int(axis, fn=fn, name="axis")
    start = axis if axis >= 0 else ndim + axis + 1  # Caffe: -1 is after the last axis
    if not 0 <= start <= ndim:
        raise ValueError(f"{fn}: axis={axis} is out of range for an input of rank {ndim}")
    num_axes = check_int(num_axes, fn=fn, name="num_axes", minimum=-1)
    end = ndim if num_axes == -1 else start + num_axes
    if end > ndim:
        raise ValueError(f"{fn}: axis={axis}, num_axes={num_axes} run past the input's rank {ndim}")
    new = list(dims)
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= ndim:
                raise ValueError(
                    f"{fn}: shape={dims!r} has a 0 at position {i} but the input (rank {ndim}) "
                    f"has no axis {start + i} to copy"
                )
            new[i] = in_shape[start + i]
    count = math.prod(in_shape)
    out = [*in_shape[:start], *new, *in_shape[end:]]
    if -1 in new:
        explicit = math.prod(d for d in out if d != -1)
        if explicit == 0 or count % explicit:
            raise ValueError(
                f"{fn}: the input's {count} elements (shape {in_shape}) are not divisible by "
                f"{explicit}, the product of the other output dims {tuple(out)}"
            )
        out[out.index(-1)] = count // explicit
    if math.prod(out) != count:
        raise ValueError(
            f"{fn}: shape={dims!r} makes {tuple(out)} ({math.prod(out)} elements) from an input "
            f"of shape {in_shape} ({count} elements)"
        )
    return tuple(out)


def reshape(
    x: ArrayLike,
    shape: Sequence[int],
    *,
    axis: int = 0,
    num_axes: int = -1,
    caffe_axes: bool = False,
) -> Array:
    """Caffe's Reshape: the axes ``[axis, axis + num_axes)`` replaced by ``shape``.

    Args:
      x: any array.
      shape: Caffe's ``shape.dim``: a positive dim as given, ``0`` copies the input dim at the
        same position (``axis + i``), one ``-1`` is inferred from the element count.
      axis: the first replaced axis; negative counts from the end with Caffe's rule (``-1`` is
        after the last axis, so ``num_axes=0`` appends axes there).
      num_axes: how many input axes are replaced; ``-1`` is all from ``axis`` on.
      caffe_axes: reshape Caffe's NCHW blob of ``x`` in Caffe's element order and return the
        result channels last, so that ``to_caffe_blob(y)`` equals Caffe's top; without it the
        array is reshaped in its own (row-major, NHWC) order. For an NHWC image the two differ
        whenever the channels are merged with or split from other axes.
    """
    fn = "reshape"
    x = jnp.asarray(x)
    caffe_axes = check_bool(caffe_axes, fn=fn, name="caffe_axes")
    xb = to_caffe_blob(x) if caffe_axes else x
    out = reshape_shape(xb.shape, shape, axis=axis, num_axes=num_axes, fn=fn)
    y = xb.reshape(out)
    return from_caffe_blob(y) if caffe_axes else y


def silence(*xs) -> None:
    """Caffe's Silence: consumes its inputs and produces nothing (returns None)."""
    return None


# ----------------------------------------------------------------------------- along an axis


def softmax(x: ArrayLike, axis: int = -1, *, caffe_axes: bool = False) -> Array:
    """Caffe's Softmax: ``exp(x - max) / sum(exp(x - max))`` along ``axis`` (default -1, the
    channels: Caffe's default axis 1). Lower-precision floats are computed in float32 and cast
    back."""
    fn = "softmax"
    x = _float(x, fn)
    a = _any_axis(axis, x.ndim, caffe_axes, fn)
    return jax.nn.softmax(x.astype(acc_dtype(x.dtype)), axis=a).astype(x.dtype)


def argmax(
    x: ArrayLike,
    top_k: int = 1,
    *,
    out_max_val: bool = False,
    axis: int | None = None,
    caffe_axes: bool = False,
) -> Array:
    """Caffe's ArgMax: the indices (or values) of the ``top_k`` largest entries.

    With ``axis`` set: the output is ``x``'s shape with that axis of size ``top_k``, holding
    the indices along it in decreasing order of value, or the values themselves when
    ``out_max_val``.

    With ``axis=None`` (Caffe's default): each example's entries (every axis after the first) are
    ranked together, and the output has Caffe's layout ``(N, 1, top_k)`` (indices) or
    ``(N, 2, top_k)`` (indices, then values, when ``out_max_val``), padded with trailing axes of
    size 1 to x's rank when x has more than 3 axes, exactly as Caffe's top (``(N, 2, top_k, 1)``
    for a 4-D input). That output is a table, not an image, and keeps Caffe's layout under both
    conventions. The indices count in the flattening order: ``(H, W, C)`` by default,
    Caffe's ``(C, H, W)`` with ``caffe_axes=True``.

    Indices are returned in x's dtype, as Caffe's blobs hold them (exact up to 2**24 in float32).
    Ties go to the larger index, as Caffe's ``std::partial_sort`` with ``std::greater`` on
    (value, index) pairs orders them. Caffe ranks NaN arbitrarily; here NaN ranks above every
    number.

    Raises:
      ValueError: ``top_k`` larger than the number of ranked entries, an axis out of range.
    """
    fn = "argmax"
    x = _float(x, fn)
    k = check_positive_int(top_k, fn=fn, name="top_k")
    out_max_val = check_bool(out_max_val, fn=fn, name="out_max_val")
    caffe_axes = check_bool(caffe_axes, fn=fn, name="caffe_axes")
    if axis is not None:
        a = _any_axis(axis, x.ndim, caffe_axes, fn)
        moved = jnp.moveaxis(x, a, -1)
        values, indices = _caffe_top_k(moved, k, fn, f"axis {a} of size {x.shape[a]}")
        out = values if out_max_val else indices.astype(x.dtype)
        return jnp.moveaxis(out, -1, a)
    if x.ndim < 1:
        raise ValueError(f"{fn}: x must have a batch axis, got shape {x.shape}")
    xb = to_caffe_blob(x) if caffe_axes else x
    flat = xb.reshape(x.shape[0], -1)
    values, indices = _caffe_top_k(flat, k, fn, f"the {flat.shape[1]} entries per example")
    rows = (indices.astype(x.dtype), values) if out_max_val else (indices.astype(x.dtype),)
    out = jnp.stack(rows, axis=1)  # (N, 1 or 2, top_k)
    return out.reshape(*out.shape, *(1,) * (x.ndim - 3))


def _caffe_top_k(v, k: int, fn: str, what: str):
    """``lax.top_k`` along the last axis with Caffe's tie rule (the larger index first)."""
    dim = v.shape[-1]
    if k > dim:
        raise ValueError(f"{fn}: top_k={k} is more than {what}")
    values, rev_idx = lax.top_k(jnp.flip(v, -1), k)  # lax.top_k: ties to the lower index
    return values, (dim - 1) - rev_idx


def scale(
    x: ArrayLike,
    s: ArrayLike,
    b: ArrayLike | None = None,
    *,
    axis: int = -1,
    caffe_axes: bool = False,
) -> Array:
    """Caffe's Scale: ``y = x * s (+ b)``, ``s`` broadcast over the axes
    ``axis .. axis + s.ndim - 1`` of ``x``, whose sizes it must match.

    ``s`` is either the learned scale (the layer's parameter) or Caffe's second bottom; ``b`` is
    the optional bias of ``bias_term``, shaped like ``s``. A scalar ``s`` (shape ``()``) scales
    everything and ignores ``axis``. The default ``axis=-1`` with a ``(C,)`` scale is Caffe's
    per-channel default (axis 1). With ``caffe_axes=True``, ``axis`` is Caffe's number and ``s``,
    ``b`` are laid out like Caffe's blob (e.g. ``(C, H)`` for Caffe's ``axis: 1, num_axes: 2``).
    """
    return _broadcast_op("scale", x, s, b, axis, caffe_axes)


def bias(x: ArrayLike, b: ArrayLike, *, axis: int = -1, caffe_axes: bool = False) -> Array:
    """Caffe's Bias: ``y = x + b``, ``b`` broadcast over the axes ``axis .. axis + b.ndim - 1``
    of ``x`` (as :func:`scale`)."""
    return _broadcast_op("bias", x, None, b, axis, caffe_axes)


def _broadcast_op(fn, x, s, b, axis, caffe_axes):
    x = _float(x, fn)
    caffe_axes = check_bool(caffe_axes, fn=fn, name="caffe_axes")
    xb = to_caffe_blob(x) if caffe_axes else x
    ref_name = "s" if s is not None else "b"
    ref = jnp.asarray(s if s is not None else b)
    start = 0 if ref.ndim == 0 else _axis(axis, x.ndim, fn=fn)
    if xb.shape[start : start + ref.ndim] != ref.shape:
        order = " (Caffe order)" if caffe_axes else ""
        raise ValueError(
            f"{fn}: {ref_name} has shape {ref.shape} but x{order} has "
            f"{tuple(xb.shape[start : start + ref.ndim])} on the axes {start}.."
            f"{start + ref.ndim - 1} from axis={axis} (x{order} {tuple(xb.shape)})"
        )
    bshape = (1,) * start + ref.shape + (1,) * (x.ndim - start - ref.ndim)
    # In float32 for bfloat16/float16 inputs: one rounding of the result, and the parameters'
    # gradients (sums over the broadcast axes) summed in float32.
    acc = acc_dtype(x.dtype)
    y = xb.astype(acc)
    if s is not None:
        check_same_dtype(x, s, fn=fn, names=("x", "s"))
        y = y * ref.astype(acc).reshape(bshape)
    if b is not None:
        check_same_dtype(x, b, fn=fn, names=("x", "b"))
        b = jnp.asarray(b)
        if b.shape != ref.shape:
            raise ValueError(f"{fn}: b has shape {b.shape}, expected s's shape {ref.shape}")
        y = y + b.astype(acc).reshape(bshape)
    y = y.astype(x.dtype)
    return from_caffe_blob(y) if caffe_axes else y


def inner_product(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    axis: int = 1,
    transpose: bool = False,
    caffe_axes: bool = False,
) -> Array:
    """Caffe's InnerProduct with its ``axis`` and ``transpose`` (docs/caffe-semantics.md §12).

    The axes from ``axis`` on are flattened into ``K`` features and the leading axes kept:
    ``(d0, ..., d_{axis-1}, K) -> (d0, ..., d_{axis-1}, C_out)``.

    Args:
      x: floating array. Default ``axis=1``: every axis after the batch, ``K = H*W*C`` in
        ``(H, W, C)`` order for an NHWC image; ``caffe_axes=True`` flattens Caffe's blob, ``K``
        in ``(C, H, W)`` order, so a Caffe weight needs no permutation.
      w: **Caffe's blob as stored**: ``(C_out, K)``, or ``(K, C_out)`` when ``transpose``
        (Caffe's ``transpose: true``). (:class:`fnlayers.Dense` stores ``(K, C_out)``.)
      b: optional ``(C_out,)``.

    Returns:
      ``x_flat @ w.T + b`` (``x_flat @ w + b`` when ``transpose``), via :func:`fnlayers.dense`
      (float32 accumulation for lower precisions).
    """
    fn = "inner_product"
    x = _float(x, fn)
    transpose = check_bool(transpose, fn=fn, name="transpose")
    caffe_axes = check_bool(caffe_axes, fn=fn, name="caffe_axes")
    w = jnp.asarray(w)
    check_same_dtype(x, w, fn=fn, names=("x", "w"))
    xb = to_caffe_blob(x) if caffe_axes else x
    a = _axis(axis, x.ndim, fn=fn)
    k = math.prod(xb.shape[a:])
    layout = "(K, C_out) with transpose=True" if transpose else "(C_out, K)"
    if w.ndim != 2 or w.shape[0 if transpose else 1] != k:
        raise ValueError(
            f"{fn}: w has shape {w.shape}, expected {layout} with K={k}, the product of x's axes "
            f"{a}.. {tuple(xb.shape[a:])}"
        )
    n_out = w.shape[1 if transpose else 0]
    if b is not None:
        b = jnp.asarray(b)
        check_same_dtype(x, b, fn=fn, names=("x", "b"))
        if b.shape != (n_out,):
            raise ValueError(f"{fn}: b has shape {b.shape}, expected ({n_out},)")
    m = math.prod(xb.shape[:a])
    y = _linear.dense(xb.reshape(m, k), w if transpose else w.T, b)
    y = y.reshape(*xb.shape[:a], n_out)
    return from_caffe_blob(y) if caffe_axes else y


# ----------------------------------------------------------------------------- elementwise


def power(x: ArrayLike, power: float = 1.0, scale: float = 1.0, shift: float = 0.0) -> Array:
    """Caffe's Power: ``y = (shift + scale * x) ** power``.

    As Caffe: when ``scale * power == 0`` the output is the constant ``1`` (power 0) or
    ``shift ** power`` (scale 0), with zero gradient; ``power == 1`` is the affine map (no
    ``pow``). A negative base with a non-integral power is NaN (``std::pow``)."""
    fn = "power"
    x = _float(x, fn)
    p = check_real(power, fn=fn, name="power")
    a = check_real(scale, fn=fn, name="scale")
    c = check_real(shift, fn=fn, name="shift")
    if a * p == 0:
        value = 1.0 if p == 0 else float(np.power(np.float64(c), p))
        return jnp.full(x.shape, value, x.dtype)
    y = x
    if a != 1:
        y = y * jnp.asarray(a, x.dtype)
    if c != 0:
        y = y + jnp.asarray(c, x.dtype)
    if p != 1:
        y = lax.pow(y, jnp.asarray(p, x.dtype))
    return y


def absval(x: ArrayLike) -> Array:
    """Caffe's AbsVal: ``|x|``; the derivative is ``sign(x)`` (0 at 0), as Caffe's."""
    x = _float(x, "absval")
    return x * jnp.sign(x)  # = |x|; jnp.abs's derivative at 0 would be 1


def bnll(x: ArrayLike) -> Array:
    """Caffe's BNLL: ``log(1 + exp(x))`` (softplus), computed stably as
    ``max(x, 0) + log1p(exp(-|x|))`` (Caffe: ``x + log(1 + exp(-x))`` for ``x > 0``,
    ``log(1 + exp(x))`` otherwise). The derivative is ``sigmoid(x)``."""
    x = _float(x, "bnll")
    acc = acc_dtype(x.dtype)
    return jnp.logaddexp(x.astype(acc), jnp.zeros((), acc)).astype(x.dtype)


def exp(x: ArrayLike, base: float = -1.0, scale: float = 1.0, shift: float = 0.0) -> Array:
    """Caffe's Exp: ``y = base ** (shift + scale * x)``; ``base=-1`` means e.

    Computed as Caffe does: ``y = base**shift * exp(log(base) * scale * x)``.

    Raises:
      ValueError: ``base`` is neither -1 nor positive.
    """
    fn = "exp"
    x = _float(x, fn)
    log_base = _log_base(base, fn)
    a = check_real(scale, fn=fn, name="scale")
    c = check_real(shift, fn=fn, name="shift")
    inner = log_base * a
    outer = 1.0 if c == 0 else math.exp(c) if base == -1 else float(base) ** c
    y = jnp.exp(x * jnp.asarray(inner, x.dtype)) if inner != 1 else jnp.exp(x)
    return y * jnp.asarray(outer, x.dtype) if outer != 1 else y


def log(x: ArrayLike, base: float = -1.0, scale: float = 1.0, shift: float = 0.0) -> Array:
    """Caffe's Log: ``y = log_base(shift + scale * x)``; ``base=-1`` means e. Computed as Caffe
    does: ``ln(shift + scale * x) / ln(base)``. A non-positive argument gives NaN or -inf.

    Raises:
      ValueError: ``base`` is neither -1 nor positive (or is 1).
    """
    fn = "log"
    x = _float(x, fn)
    log_base = _log_base(base, fn)
    if log_base == 0:
        raise ValueError(f"{fn}: base={base!r} must not be 1 (log base 1 is undefined)")
    a = check_real(scale, fn=fn, name="scale")
    c = check_real(shift, fn=fn, name="shift")
    y = x
    if a != 1:
        y = y * jnp.asarray(a, x.dtype)
    if c != 0:
        y = y + jnp.asarray(c, x.dtype)
    y = jnp.log(y)
    return y * jnp.asarray(1.0 / log_base, x.dtype) if log_base != 1 else y


def threshold(x: ArrayLike, threshold: float = 0.0) -> Array:
    """Caffe's Threshold: ``y = 1 if x > threshold else 0`` (in x's dtype; zero gradient —
    Caffe has no backward)."""
    fn = "threshold"
    x = _float(x, fn)
    t = check_real(threshold, fn=fn, name="threshold")
    return (x > jnp.asarray(t, x.dtype)).astype(x.dtype)


# ----------------------------------------------------------------------------- helpers


def _float(x, fn: str) -> Array:
    check_float_array(x, fn=fn, name="x")
    return jnp.asarray(x)


def _axis(axis, ndim: int, *, fn: str, name: str = "axis") -> int:
    """``axis`` checked against ``[-ndim, ndim)`` and made non-negative."""
    axis = check_int(axis, fn=fn, name=name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: {name}={axis} is out of range for an input of rank {ndim}")
    return axis % ndim


def _any_axis(axis, ndim: int, caffe_axes, fn: str) -> int:
    """The array axis of ``axis``: itself, or Caffe's (:func:`caffe_axis`) with ``caffe_axes``."""
    caffe_axes = check_bool(caffe_axes, fn=fn, name="caffe_axes")
    a = _axis(axis, ndim, fn=fn)
    return caffe_axis(a, ndim) if caffe_axes else a


def _log_base(base, fn: str) -> float:
    base = check_real(base, fn=fn, name="base")
    if base == -1:
        return 1.0
    if base <= 0:
        raise ValueError(f"{fn}: base={base!r} must be -1 (for e) or positive")
    return math.log(base)


def _shape_of(value, fn: str, name: str) -> tuple[int, ...]:
    if isinstance(value, tuple | list) and all(is_int(d) for d in value):
        return tuple(int(d) for d in value)
    if hasattr(value, "shape"):
        return tuple(value.shape)
    raise TypeError(f"{fn}: {name} must be an array or a shape, got {type(value).__name__}")
