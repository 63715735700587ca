"""The rest of Caffe's layer catalogue as Layers, over the ops of :mod:`fnlayers.tensor_ops`.

Slice, Split, Crop, Flatten, Reshape, Softmax, Scale, Bias, Power, AbsVal, BNLL, Exp, Log,
Threshold, ArgMax, InnerProduct, Silence and Input, each following the :class:`fnlayers.Layer`
contract: ``init(key, in_shape)`` from shapes alone (the op traced abstractly; an unknown batch
``-1`` is traced as 1 and as 2 and comes back ``-1``), ``apply(params, state, x, *, key=None,
train=False) -> (y, state)``, and a ``repr`` showing the non-default configuration.

Axes: every ``axis`` numbers the array's own (NHWC, channels-last) axes by default, negative
counting from the end; Caffe's default axis 1 (channels) is ``-1`` here and Caffe's spatial axes
2, 3 are 1, 2. ``caffe_axes=True`` makes a layer read its input as Caffe's NCHW blob: Caffe's
axis numbers, Caffe's element order for Flatten/Reshape/InnerProduct, parameters in Caffe's blob
shapes, output handed back channels last. See :mod:`fnlayers.tensor_ops` for the full rule and
:func:`fnlayers.tensor_ops.caffe_axis` for the one mapping between the numberings.

Several bottoms are a tuple input (``in_shape`` a tuple of shapes), several tops a tuple output:
``Crop`` and the two-input forms of ``Scale``/``Bias`` take ``(x, second)``; ``Slice`` and
``Split`` return tuples; ``Silence`` returns None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fnlayers import init as _init
from fnlayers import tensor_ops as _ops
from fnlayers._checks import (
    check_bool,
    check_int,
    check_positive_int,
    check_real,
)
from fnlayers.layers import Layer, _check_param, _configured, _is_shape, _mults

__all__ = [
    "BNLL",
    "AbsVal",
    "ArgMax",
    "Bias",
    "Crop",
    "Exp",
    "Flatten",
    "InnerProduct",
    "Input",
    "Log",
    "Power",
    "Reshape",
    "Scale",
    "Silence",
    "Slice",
    "Softmax",
    "Split",
    "Threshold",
]


# ----------------------------------------------------------------------------- plumbing


@_configured
def Slice(
    slice_point: Sequence[int] = (),
    *,
    axis: int = -1,
    num_outputs: int | None = None,
    caffe_axes: bool = False,
    name: str | None = None,
) -> Layer:
    """Caffe's Slice layer: :func:`fnlayers.tensor_ops.slice_axis`; the output is a tuple (the
    tops). ``slice_point=()`` with ``num_outputs=n`` cuts ``n`` equal parts."""
    fn = "Slice"
    _check_sequence(slice_point, fn, "slice_point")
    if num_outputs is None and not slice_point:
        raise ValueError(f"{fn}: give slice_point or num_outputs (the number of equal parts)")
    if num_outputs is not None:
        check_positive_int(num_outputs, fn=fn, name="num_outputs")
    _check_axis_arg(axis, fn)
    cfg = dict(axis=axis, num_outputs=num_outputs, caffe_axes=caffe_axes)
    return _stateless(lambda x: _ops.slice_axis(x, slice_point, **cfg), "slice", name, fn)


@_configured
def Split(copies: int = 2, *, name: str | None = None) -> Layer:
    """Caffe's Split layer: a tuple of ``copies`` identical outputs
    (:func:`fnlayers.tensor_ops.split_copies`); their gradients add up."""
    check_positive_int(copies, fn="Split", name="copies")
    return _stateless(lambda x: _ops.split_copies(x, copies), "split", name, "Split")


@_configured
def Crop(
    *,
    axis: int = 1,
    end_axis: int | None = None,
    offset: int | Sequence[int] = 0,
    caffe_axes: bool = False,
    name: str | None = None,
) -> Layer:
    """Caffe's Crop layer: input ``(x, reference)``, output ``x`` cut to ``reference``'s size
    on the axes ``axis..end_axis`` (:func:`fnlayers.tensor_ops.crop`). The default crops H and W
    of NHWC images (Caffe's default ``axis: 2``); ``caffe_axes=True`` takes Caffe's ``axis`` and
    crops from it to the end of Caffe's blob."""
    fn = "Crop"
    _check_axis_arg(axis, fn)
    if end_axis is not None:
        _check_axis_arg(end_axis, fn, "end_axis")
    check_bool(caffe_axes, fn=fn, name="caffe_axes")
    cfg = dict(axis=axis, end_axis=end_axis, offset=offset, caffe_axes=caffe_axes)

    def op(xs):
        x, reference = _pair(xs, fn, "(x, reference)")
        return _ops.crop(x, jnp.shape(reference), **cfg)

    return _stateless(op, "crop", name, fn, pair=True)


@_configured
def Flatten(
    *, axis: int = 1, end_axis: int = -1, caffe_axes: bool = False, name: str | None = None
) -> Layer:
    """Caffe's Flatten layer: :func:`fnlayers.tensor_ops.flatten_axes`, the axes
    ``axis..end_axis`` merged. The defaults give ``(N, ...) -> (N, prod(...))`` in the array's
    order (as ``fnlayers.layers.Flatten``); ``caffe_axes=True`` flattens in Caffe's ``(C, H, W)``
    order, equal to Caffe's top element for element."""
    _check_axis_arg(axis, "Flatten")
    _check_axis_arg(end_axis, "Flatten", "end_axis")
    cfg = dict(axis=axis, end_axis=end_axis, caffe_axes=caffe_axes)
    return _stateless(lambda x: _ops.flatten_axes(x, **cfg), "flatten", name, "Flatten")


@_configured
def Reshape(
    shape: Sequence[int],
    *,
    axis: int = 0,
    num_axes: int = -1,
    caffe_axes: bool = False,
    name: str | None = None,
) -> Layer:
    """Caffe's Reshape layer: :func:`fnlayers.tensor_ops.reshape` (``0`` copies a dim, one
    ``-1`` is inferred). Without ``caffe_axes`` the array is reshaped in its own (NHWC) element
    order; with it, Caffe's NCHW blob is reshaped and the result returned channels last."""
    fn = "Reshape"
    _check_sequence(shape, fn, "shape")
    for d in shape:
        check_int(d, fn=fn, name="shape", minimum=-1, what=">= -1 (0 copies, -1 infers)")
    check_int(axis, fn=fn, name="axis")
    check_int(num_axes, fn=fn, name="num_axes", minimum=-1)
    cfg = dict(axis=axis, num_axes=num_axes, caffe_axes=caffe_axes)
    return _stateless(lambda x: _ops.reshape(x, shape, **cfg), "reshape", name, fn)


@_configured
def Silence(*, name: str | None = None) -> Layer:
    """Caffe's Silence layer: takes any input (an array or a tuple) and produces nothing; the
    output and the output shape are None."""

    def init(key, in_shape):
        return None, {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return _ops.silence(x), state

    return Layer(init, apply, name=name, kind="silence")


@_configured
def Input(shape, *, name: str | None = None) -> Layer:
    """Caffe's Input layer: declares the shape of the data fed to the network (``-1`` for an
    unknown batch), or a tuple of shapes for several tops.

    ``init(key, in_shape=None)`` returns the declared shape; an ``in_shape`` given must agree
    with it (``-1`` matching anything) and fills in its ``-1`` dims. ``apply`` checks that
    ``x`` has that shape and returns it unchanged.
    """
    fn = "Input"
    shapes = jax.tree.leaves(shape, is_leaf=_is_shape)
    if not shapes or not all(_is_shape(s) for s in shapes):
        raise TypeError(
            f"{fn}: shape={shape!r} must be a shape (a tuple of ints) or a tuple of them"
        )
    for s in shapes:
        if any(d < -1 for d in s):
            raise ValueError(f"{fn}: shape={shape!r}: dims must be >= 0, or -1 for unknown")
    declared = jax.tree.map(lambda s: tuple(int(d) for d in s), shape, is_leaf=_is_shape)

    def agree(actual, what):
        ok = jax.tree.structure(actual, is_leaf=_is_shape) == jax.tree.structure(
            declared, is_leaf=_is_shape
        ) and all(
            len(a) == len(d) and all(u == v or -1 in (u, v) for u, v in zip(a, d, strict=True))
            for a, d in zip(
                jax.tree.leaves(actual, is_leaf=_is_shape),
                jax.tree.leaves(declared, is_leaf=_is_shape),
                strict=True,
            )
        )
        if not ok:
            raise ValueError(f"{fn}: {what} does not match the declared shape {declared}")

    def init(key, in_shape=None):
        if in_shape is None:
            return declared, {}, {}
        agree(in_shape, f"in_shape={in_shape!r}")
        known = jax.tree.map(
            lambda d, a: tuple(u if u != -1 else v for u, v in zip(d, a, strict=True)),
            declared,
            in_shape,
            is_leaf=_is_shape,
        )
        return known, {}, {}

    def apply(params, state, x, *, key=None, train=False):
        actual = jax.tree.map(lambda a: tuple(jnp.shape(a)), x)
        agree(actual, f"the input of shape {actual}")
        return x, state

    return Layer(init, apply, name=name, kind="input")


# ----------------------------------------------------------------------------- along an axis


@_configured
def Softmax(*, axis: int = -1, caffe_axes: bool = False, name: str | None = None) -> Layer:
    """Caffe's Softmax layer: :func:`fnlayers.tensor_ops.softmax` along ``axis`` (default -1,
    the channels, Caffe's default axis 1)."""
    _check_axis_arg(axis, "Softmax")
    check_bool(caffe_axes, fn="Softmax", name="caffe_axes")
    return _stateless(
        lambda x: _ops.softmax(x, axis, caffe_axes=caffe_axes), "softmax", name, "Softmax"
    )


@_configured
def ArgMax(
    top_k: int = 1,
    *,
    out_max_val: bool = False,
    axis: int | None = None,
    caffe_axes: bool = False,
    name: str | None = None,
) -> Layer:
    """Caffe's ArgMax layer: :func:`fnlayers.tensor_ops.argmax`. Without ``axis`` the output is
    Caffe's ``(N, 1 or 2, top_k)`` table (indices, then values with ``out_max_val``), padded to
    x's rank with trailing 1s as Caffe's top; with ``axis`` it is x's shape with that axis
    ``top_k`` long (indices, or values with ``out_max_val``)."""
    fn = "ArgMax"
    check_positive_int(top_k, fn=fn, name="top_k")
    check_bool(out_max_val, fn=fn, name="out_max_val")
    if axis is not None:
        _check_axis_arg(axis, fn)
    cfg = dict(out_max_val=out_max_val, axis=axis, caffe_axes=caffe_axes)
    return _stateless(lambda x: _ops.argmax(x, top_k, **cfg), "argmax", name, fn)


@_configured
def Scale(
    *,
    axis: int = -1,
    num_axes: int = 1,
    bias: bool = False,
    scale_init=None,
    bias_init=None,
    caffe_axes: bool = False,
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's Scale layer: ``y = x * scale (+ bias)`` (:func:`fnlayers.tensor_ops.scale`).

    One input ``x``: the scale is a learned parameter ``{"scale": x.shape[axis : axis +
    num_axes]}`` (``num_axes=-1``: to the last axis; 0: a scalar), initialised to 1 (Caffe's
    default filler); the default ``axis=-1, num_axes=1`` is per channel, Caffe's ``axis: 1``.
    Two inputs ``(x, s)``: Caffe's second-bottom form, ``s`` is the scale, covering ``x``'s axes
    from ``axis`` on (``num_axes`` is ignored, as in Caffe). ``bias=True`` (Caffe's
    ``bias_term``) adds a learned ``{"bias": ...}`` shaped like the scale, initialised to 0.
    With ``caffe_axes``, ``axis``/``num_axes`` are Caffe's and the parameters have Caffe's blob
    shapes (a two-input ``s`` is an array like any other and is read as its Caffe blob).
    ``lr_mult``/``decay_mult``: one number, or one per parameter in Caffe's order
    ``(scale, bias)`` (only ``bias`` in the two-input form).
    """
    return _affine_layer(
        "Scale", axis, num_axes, bias, scale_init, bias_init, caffe_axes, lr_mult, decay_mult, name
    )


@_configured
def Bias(
    *,
    axis: int = -1,
    num_axes: int = 1,
    bias_init=None,
    caffe_axes: bool = False,
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's Bias layer: ``y = x + bias`` (:func:`fnlayers.tensor_ops.bias`): a learned
    ``{"bias": x.shape[axis : axis + num_axes]}`` initialised to 0, or, for two inputs
    ``(x, b)``, Caffe's second-bottom form with ``b`` as the bias (no params). Axes as
    :func:`Scale`."""
    return _affine_layer(
        "Bias", axis, num_axes, True, None, bias_init, caffe_axes, lr_mult, decay_mult, name
    )


def _affine_layer(
    fn, axis, num_axes, bias_term, scale_init, bias_init, caffe_axes, lr_mult, decay_mult, name
):
    is_scale = fn == "Scale"
    _check_axis_arg(axis, fn)
    check_int(num_axes, fn=fn, name="num_axes", minimum=-1)
    check_bool(bias_term, fn=fn, name="bias")
    check_bool(caffe_axes, fn=fn, name="caffe_axes")
    scale_init = scale_init or _init.constant(1.0)
    bias_init = bias_init or _init.constant(0.0)
    as_blob = _ops.to_caffe_blob if caffe_axes else jnp.asarray

    def param_shape(in_shape):
        """The learned scale/bias shape of the one-input form."""
        shape = _ops._caffe_shape(in_shape) if caffe_axes else tuple(in_shape)
        start = _ops._axis(axis, len(shape), fn=fn)
        end = len(shape) if num_axes == -1 else start + num_axes
        if end > len(shape):
            raise ValueError(
                f"{fn}: axis={axis}, num_axes={num_axes} run past the input's rank {len(shape)} "
                f"(input shape {tuple(in_shape)})"
            )
        if -1 in shape[start:end]:
            raise ValueError(
                f"{fn}: the parameter would cover the unknown batch axis of {tuple(in_shape)}; "
                "init needs a concrete batch size there"
            )
        return shape[start:end]

    def op(params, xs):
        two = isinstance(xs, tuple | list)
        if two:
            x, other = _pair(xs, fn, "(x, second input) or one array")
            other = as_blob(other)
        else:
            x, other = xs, params["scale" if is_scale else "bias"]
        cfg = dict(axis=axis, caffe_axes=caffe_axes)
        if is_scale:
            b = params["bias"] if bias_term else None
            return _ops.scale(x, other, b, **cfg)
        return _ops.bias(x, other, **cfg)

    def names(two: bool) -> tuple[str, ...]:
        if is_scale:
            return (("scale",) if not two else ()) + (("bias",) if bias_term else ())
        return () if two else ("bias",)

    def init(key, in_shape):
        two = _is_pair_of_shapes(in_shape)
        if two:
            shape = _ops._caffe_shape(in_shape[1]) if caffe_axes else tuple(in_shape[1])
            if -1 in shape and names(two):
                raise ValueError(
                    f"{fn}: the second input's shape {tuple(in_shape[1])} has an unknown axis; "
                    "the learned bias takes its shape, so init needs it concrete"
                )
        else:
            shape = param_shape(in_shape)
        k_scale, k_bias = jax.random.split(key)
        inits = {"scale": (scale_init, k_scale), "bias": (bias_init, k_bias)}
        params = {}
        for nm in names(two):
            fill, k = inits[nm]
            params[nm] = fill(k, shape, jnp.float32)
        return _out_shape(lambda xs: op(params, xs), in_shape, fn), params, {}

    def apply(params, state, x, *, key=None, train=False):
        two = isinstance(x, tuple | list)
        if two:
            other = _pair(x, fn, "(x, second input) or one array")[1]
            expected = tuple(as_blob(other).shape)
        else:
            expected = param_shape(jnp.shape(x))
        for nm in names(two):
            _check_param(params, nm, expected, fn, f" for an input of shape {_shapes(x)}")
        return op(params, x), state

    # Caffe's blobs: Scale (scale, bias), Bias (bias); lr_mult/decay_mult follow that order.
    # The declared names cover the one-input form; the two-input form has only "bias".
    mults = _mults(names(False), lr_mult, decay_mult, fn)
    return Layer(init, apply, name=name, kind=fn.lower(), mults=mults)


@_configured
def InnerProduct(
    num_output: int,
    *,
    axis: int = 1,
    transpose: bool = False,
    bias: bool = True,
    w_init=None,
    b_init=None,
    caffe_axes: bool = False,
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's InnerProduct layer with ``axis`` and ``transpose``
    (:func:`fnlayers.tensor_ops.inner_product`): the axes from ``axis`` on are flattened into
    ``K``, ``(..., K) -> (..., num_output)``.

    Params are Caffe's blobs as stored, so weights carry over unchanged: ``{"w": (num_output,
    K)}``, or ``(K, num_output)`` with ``transpose=True``, and ``{"b": (num_output,)}``.
    (:class:`fnlayers.Dense` is the ``axis=1`` case with the weight always ``(K, num_output)``.)
    ``K`` runs over ``(H, W, C)`` for NHWC images, or Caffe's ``(C, H, W)`` with
    ``caffe_axes=True``. Defaults ``w_init=init.xavier()``, ``b_init=init.constant(0)``; the
    filler sees Caffe's fans of the stored blob (``fan_in = count / shape[0]``), as Caffe does,
    including with ``transpose``.
    """
    fn = "InnerProduct"
    check_positive_int(num_output, fn=fn, name="num_output")
    _check_axis_arg(axis, fn)
    check_bool(transpose, fn=fn, name="transpose")
    check_bool(bias, fn=fn, name="bias")
    check_bool(caffe_axes, fn=fn, name="caffe_axes")
    w_init = w_init or _init.xavier()
    b_init = b_init or _init.constant(0.0)

    def w_shape_for(in_shape) -> tuple[int, int]:
        shape = _ops._caffe_shape(in_shape) if caffe_axes else tuple(in_shape)
        a = _ops._axis(axis, len(shape), fn=fn)
        if -1 in shape[a:]:
            raise ValueError(
                f"{fn}: axis={axis} puts the unknown batch axis of {tuple(in_shape)} into K; "
                "init needs a concrete batch size there"
            )
        k = math.prod(shape[a:])
        return (k, num_output) if transpose else (num_output, k)

    def op(params, x):
        return _ops.inner_product(
            x, params["w"], params.get("b"), axis=axis, transpose=transpose, caffe_axes=caffe_axes
        )

    def init(key, in_shape):
        w_shape = w_shape_for(in_shape)
        kw, kb = jax.random.split(key)
        # fnlayers' fillers read fan_in from the last axis (its (K, C_out) layout); filling the
        # reversed shape and transposing gives Caffe's fans of the stored blob.
        params = {"w": w_init(kw, w_shape[::-1], jnp.float32).T}
        if bias:
            params["b"] = b_init(kb, (num_output,), jnp.float32)
        return _out_shape(lambda x: op(params, x), in_shape, fn), params, {}

    def apply(params, state, x, *, key=None, train=False):
        layout = "(K, C_out)" if transpose else "(C_out, K)"
        context = f" {layout} for an input of shape {jnp.shape(x)}"
        if jnp.ndim(x) >= 1:  # else the op reports the axis
            _check_param(params, "w", w_shape_for(jnp.shape(x)), fn, context)
        if bias:
            _check_param(params, "b", (num_output,), fn)
        return op(params, x), state

    mults = _mults(("w", "b") if bias else ("w",), lr_mult, decay_mult, fn)
    return Layer(init, apply, name=name, kind="inner_product", mults=mults)


# ----------------------------------------------------------------------------- elementwise


@_configured
def Power(
    power: float = 1.0, *, scale: float = 1.0, shift: float = 0.0, name: str | None = None
) -> Layer:
    """Caffe's Power layer: ``y = (shift + scale * x) ** power``
    (:func:`fnlayers.tensor_ops.power`)."""
    for arg, value in (("power", power), ("scale", scale), ("shift", shift)):
        check_real(value, fn="Power", name=arg)
    return _stateless(lambda x: _ops.power(x, power, scale, shift), "power", name, "Power")


@_configured
def AbsVal(*, name: str | None = None) -> Layer:
    """Caffe's AbsVal layer: ``|x|`` (:func:`fnlayers.tensor_ops.absval`)."""
    return _stateless(_ops.absval, "absval", name, "AbsVal")


@_configured
def BNLL(*, name: str | None = None) -> Layer:
    """Caffe's BNLL layer: ``log(1 + exp(x))``, computed stably
    (:func:`fnlayers.tensor_ops.bnll`)."""
    return _stateless(_ops.bnll, "bnll", name, "BNLL")


@_configured
def Exp(
    *, base: float = -1.0, scale: float = 1.0, shift: float = 0.0, name: str | None = None
) -> Layer:
    """Caffe's Exp layer: ``y = base ** (shift + scale * x)``, ``base=-1`` for e
    (:func:`fnlayers.tensor_ops.exp`)."""
    _check_base("Exp", base, scale, shift)
    return _stateless(lambda x: _ops.exp(x, base, scale, shift), "exp", name, "Exp")


@_configured
def Log(
    *, base: float = -1.0, scale: float = 1.0, shift: float = 0.0, name: str | None = None
) -> Layer:
    """Caffe's Log layer: ``y = log_base(shift + scale * x)``, ``base=-1`` for e
    (:func:`fnlayers.tensor_ops.log`)."""
    _check_base("Log", base, scale, shift)
    if base == 1:
        raise ValueError(f"Log: base={base!r} must not be 1 (log base 1 is undefined)")
    return _stateless(lambda x: _ops.log(x, base, scale, shift), "log", name, "Log")


@_configured
def Threshold(threshold: float = 0.0, *, name: str | None = None) -> Layer:
    """Caffe's Threshold layer: ``1 if x > threshold else 0``
    (:func:`fnlayers.tensor_ops.threshold`)."""
    check_real(threshold, fn="Threshold", name="threshold")
    return _stateless(lambda x: _ops.threshold(x, threshold), "threshold", name, "Threshold")


# ----------------------------------------------------------------------------- helpers


def _stateless(op, kind: str, name, where: str, *, pair: bool = False) -> Layer:
    """A layer without params or state: ``y = op(x)``, the output shape traced from ``op``;
    ``where`` names it in errors."""

    def init(key, in_shape):
        if pair and not _is_pair_of_shapes(in_shape):
            raise ValueError(f"{where}: in_shape={in_shape!r} must be a pair of shapes")
        return _out_shape(op, in_shape, where), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return op(x), state

    return Layer(init, apply, name=name, kind=kind)


def _out_shape(fn, in_shape, where: str):
    """``fn``'s output shape (or tree of shapes) for ``in_shape`` (a shape or a tuple of
    shapes), traced abstractly. An unknown batch (-1 in front of a shape) is traced as 1 and as
    2: the output axes that follow it come back -1; an output that depends on the batch in any
    other way is a ValueError (init needs a concrete batch size)."""
    shapes = jax.tree.leaves(in_shape, is_leaf=_is_shape)
    if not shapes or not all(_is_shape(s) for s in shapes):
        raise ValueError(f"{where}: in_shape={in_shape!r} must be a shape or a tuple of shapes")

    def trace(batch: int):
        structs = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(
                tuple(batch if (i == 0 and d == -1) else d for i, d in enumerate(s)), jnp.float32
            ),
            in_shape,
            is_leaf=_is_shape,
        )
        return jax.eval_shape(fn, structs)

    if not any(s and s[0] == -1 for s in shapes):
        return jax.tree.map(lambda o: tuple(o.shape), trace(1))

    def merge(one, two):
        a, b = tuple(one.shape), tuple(two.shape)
        if a == b:
            return a
        if len(a) == len(b) and a[1:] == b[1:] and b[0] == 2 * a[0]:
            return (-1, *a[1:])
        raise ValueError(
            f"{where}: with an unknown batch, in_shape={in_shape!r}, the output shape depends on "
            f"the batch size beyond its first axis ({a} for batch 1, {b} for batch 2); give init "
            "a concrete batch size"
        )

    return jax.tree.map(merge, trace(1), trace(2))


def _is_pair_of_shapes(in_shape) -> bool:
    return (
        isinstance(in_shape, tuple | list)
        and len(in_shape) == 2
        and all(_is_shape(s) for s in in_shape)
    )


def _pair(xs, fn: str, what: str):
    if not isinstance(xs, tuple | list) or len(xs) != 2:
        got = f"a tuple of {len(xs)}" if isinstance(xs, tuple | list) else type(xs).__name__
        raise ValueError(f"{fn}: expects the input {what}, got {got}")
    return xs[0], xs[1]


def _shapes(x):
    return tuple(tuple(jnp.shape(a)) for a in x) if isinstance(x, tuple | list) else jnp.shape(x)


def _check_axis_arg(axis, fn: str, name: str = "axis") -> None:
    check_int(axis, fn=fn, name=name)


def _check_sequence(value, fn: str, name: str) -> None:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{fn}: {name}={value!r} must be a sequence of ints")
    for v in value:
        check_int(v, fn=fn, name=name)


def _check_base(fn: str, base, scale, shift) -> None:
    check_real(base, fn=fn, name="base")
    if base != -1 and base <= 0:
        raise ValueError(f"{fn}: base={base!r} must be -1 (for e) or positive")
    check_real(scale, fn=fn, name="scale")
    check_real(shift, fn=fn, name="shift")
