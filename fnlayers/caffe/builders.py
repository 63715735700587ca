"""Caffe's layer types as fnlayers layers: one builder per ``LayerParameter`` type, mapping the
prototxt's parameters onto :mod:`fnlayers.layers`, :mod:`fnlayers.catalogue` and
:mod:`fnlayers.losses` with Caffe's semantics (docs/caffe-semantics.md).

:func:`build_layer` gives the layer and its :class:`Blobs` (where its Caffe blobs live in the
fnlayers trees, for ``.caffemodel`` import and export). Data layers (:data:`DATA_TYPES`) and
``Input`` are not built: their tops are the net's inputs, and :func:`data_top_shapes` reads the
shapes the prototxt gives them. :func:`loss_weights` is Caffe's rule for the weight of each top
in the net's loss.

Layout: every layer sees fnlayers arrays (channels last for rank >= 3, as
:func:`fnlayers.tensor_ops.to_caffe_blob` converts them) and reads Caffe's numbers (axes,
offsets, shapes) as Caffe's NCHW blob's (``caffe_axes=True``); labels are read in Caffe's element
order, as floats (truncated to int as Caffe's ``static_cast<int>``) or ints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from fnlayers import catalogue as cat
from fnlayers import init as fl_init
from fnlayers import layers as L
from fnlayers import losses
from fnlayers import pooling as fl_pooling
from fnlayers import tensor_ops as ops
from fnlayers._checks import check_choice, check_positive_int
from fnlayers.caffe.prototxt import first
from fnlayers.graphs import Concat, Eltwise

__all__ = [
    "DATA_TYPES",
    "SUPPORTED_TYPES",
    "Blobs",
    "Built",
    "build_layer",
    "data_top_shapes",
    "loss_weights",
]

#: Layer types whose tops are the net's inputs (fed by the caller, or by a data source built
#: from the layer's definition).
DATA_TYPES = ("Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData")


class Blobs(NamedTuple):
    """Where one layer's Caffe blobs live in fnlayers' trees.

    Attributes:
      names: the leaf names in Caffe's blob order (only the blobs this configuration has: no
        ``"b"`` without ``bias_term``).
      layout: the first blob's layout: ``"as_stored"`` (Caffe's shape), ``"conv"`` (HWIO here,
        Caffe's ``(out, in/g, kh, kw)``, or ``(in, out/g, kh, kw)`` for Deconvolution) or
        ``"dense"`` (``(K, out)`` here, Caffe's ``(out, K)``). Later blobs are as stored.
      tree: ``"params"`` or ``"state"`` (BatchNorm's statistics).
    """

    names: tuple[str, ...] = ()
    layout: str = "as_stored"
    tree: str = "params"


class Built(NamedTuple):
    """A built Caffe layer: the fnlayers :class:`~fnlayers.layers.Layer` and its :class:`Blobs`."""

    layer: L.Layer
    blobs: Blobs = Blobs()


def build_layer(layer: dict) -> Built:
    """The fnlayers layer of one parsed Caffe ``LayerParameter`` (not a data layer).

    The layer takes a tuple when Caffe's layer has several bottoms (always for Concat, Eltwise
    and Silence) and returns a tuple for several tops (always for Split and Slice); loss layers
    and Accuracy return a scalar ``()`` (SoftmaxWithLoss with a second top: ``(loss, prob)``).

    Raises:
      ValueError: an unsupported type (naming the layer and the type, listing the supported
        ones), a bad parameter or a wrong number of bottoms or tops (naming the layer, its
        type, the field and the value).
    """
    name, kind = first(layer, "name"), first(layer, "type")
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise ValueError(
            f"Caffe layer {name!r}: type {kind!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    d = _Def(name, kind, tuple(layer.get("bottom", [])), tuple(layer.get("top", [])), layer)
    try:
        _check_counts(d)
        built = builder(d)
        _check_param_specs(d, len(built.blobs.names))
        return built
    except (ValueError, TypeError) as err:
        raise ValueError(f"Caffe layer {name!r} ({kind}): {err}") from err


def data_top_shapes(layer: dict) -> dict[str, tuple[int, ...] | None]:
    """``{top: Caffe shape}`` of a data layer (:data:`DATA_TYPES`), None where the prototxt does
    not say (the shape comes from the data: Data's and WindowData's images, HDF5Data's
    datasets, ImageData's files without ``new_height``/``new_width`` or ``crop_size``).

    Input: ``input_param.shape``. DummyData: ``shape`` or the legacy ``num``/``channels``/
    ``height``/``width`` (one for every top, or one per top). MemoryData: ``(batch_size,
    channels, height, width)``. ImageData: ``(batch_size, 3 if is_color else 1, H, W)`` with
    ``transform_param.crop_size`` or else ``new_height``/``new_width``. The label (second top)
    of Data, ImageData, WindowData and MemoryData is ``(batch_size,)``, as Caffe shapes it.

    Raises:
      ValueError: shapes that do not fit the tops (naming the layer and the field).
    """
    name, kind = first(layer, "name"), first(layer, "type")
    tops = tuple(layer.get("top", []))
    try:
        shapes = _DATA_SHAPES[kind](layer, len(tops))
    except (ValueError, TypeError) as err:
        raise ValueError(f"Caffe layer {name!r} ({kind}): {err}") from err
    shapes = list(shapes) + [None] * (len(tops) - len(shapes))
    return dict(zip(tops, shapes, strict=True))


def loss_weights(layer: dict, tops: tuple[str, ...]) -> tuple[float, ...]:
    """Caffe's weight of each top in the net's loss (``Layer::SetLossWeights``): the layer's
    ``loss_weight`` values, one per top; without them 1 for the first top of a loss layer (a
    type ending in ``Loss``, Caffe's ``LossLayer``) and 0 for every other top.

    Raises:
      ValueError: ``loss_weight`` given, but not once per top.
    """
    given = tuple(float(w) for w in layer.get("loss_weight", []))
    if given:
        if len(given) != len(tops):
            name, kind = first(layer, "name"), first(layer, "type")
            raise ValueError(
                f"Caffe layer {name!r} ({kind}): loss_weight={list(given)!r} gives "
                f"{len(given)} weights for the {len(tops)} tops {list(tops)}; give one per top "
                "or none"
            )
        return given
    if str(first(layer, "type", "")).endswith("Loss") and tops:
        return (1.0,) + (0.0,) * (len(tops) - 1)
    return (0.0,) * len(tops)


# ----------------------------------------------------------------------------- the definition


class _Def(NamedTuple):
    name: str
    kind: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    raw: dict

    def param(self, field: str) -> dict:
        return first(self.raw, field, {})


# (min, max) bottoms and tops per type; max None is unbounded. Others take one and give one.
_COUNTS = {
    "Concat": ((1, None), (1, 1)),
    "Eltwise": ((2, None), (1, 1)),
    "Split": ((1, 1), (1, None)),
    "Slice": ((1, 1), (1, None)),
    "Silence": ((1, None), (0, 0)),
    "Scale": ((1, 2), (1, 1)),
    "Bias": ((1, 2), (1, 1)),
    "Crop": ((2, 2), (1, 1)),
    "SoftmaxWithLoss": ((2, 2), (0, 2)),
    "SigmoidCrossEntropyLoss": ((2, 2), (0, 1)),
    "EuclideanLoss": ((2, 2), (0, 1)),
    "ContrastiveLoss": ((3, 3), (0, 1)),
    "Accuracy": ((2, 2), (1, 2)),
}


def _check_counts(d: _Def) -> None:
    for what, blobs, (low, high) in zip(
        ("bottoms", "tops"), (d.bottoms, d.tops), _COUNTS.get(d.kind, ((1, 1), (1, 1))), strict=True
    ):
        if len(blobs) < low or (high is not None and len(blobs) > high):
            wanted = f"{low}" if low == high else f"{low} to {high if high is not None else 'any'}"
            raise ValueError(f"{len(blobs)} {what} {list(blobs)}; this type takes {wanted}")


# ----------------------------------------------------------------------------- fillers, params


def _filler(f: dict | None):
    """Caffe's ``FillerParameter`` as an fnlayers initializer (None: Caffe's default filler,
    constant 0)."""
    if f is None:
        return fl_init.constant(0.0)
    kind = first(f, "type", "constant")
    variance_norms = {"FAN_IN": "fan_in", "FAN_OUT": "fan_out", "AVERAGE": "average"}
    variance_norm = first(f, "variance_norm", "FAN_IN")
    check_choice(variance_norm, tuple(variance_norms), fn="filler", name="variance_norm")
    norm = variance_norms[variance_norm]
    if kind == "constant":
        return fl_init.constant(float(first(f, "value", 0.0)))
    if kind == "uniform":
        return fl_init.uniform(float(first(f, "min", 0.0)), float(first(f, "max", 1.0)))
    if kind == "gaussian":
        sparse = first(f, "sparse", -1)
        return fl_init.gaussian(
            float(first(f, "std", 1.0)),
            float(first(f, "mean", 0.0)),
            sparse=None if sparse < 0 else sparse,
        )
    if kind == "xavier":
        return fl_init.xavier(norm)
    if kind == "msra":
        return fl_init.msra(norm)
    if kind == "bilinear":
        return fl_init.bilinear()
    if kind == "positive_unitball":
        return fl_init.positive_unitball()
    raise ValueError(f"filler type {kind!r} is not supported")


def _mults(d: _Def, n_blobs: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``lr_mult``/``decay_mult`` of each of the layer's ``n_blobs`` blobs, from its
    ``param { }`` specs in order (1 for a blob without one, as Caffe's ``ParamSpec``)."""
    specs = d.raw.get("param", [])
    _check_param_specs(d, n_blobs)
    pad = (1.0,) * (n_blobs - len(specs))
    lr = tuple(float(first(p, "lr_mult", 1.0)) for p in specs) + pad
    decay = tuple(float(first(p, "decay_mult", 1.0)) for p in specs) + pad
    return lr, decay


def _check_param_specs(d: _Def, n_blobs: int) -> None:
    n_specs = len(d.raw.get("param", []))
    if n_specs > n_blobs:
        raise ValueError(
            f"{n_specs} param specs for a layer with {n_blobs} blobs (Caffe: too many params)"
        )


def _required(p: dict, field: str, message: str):
    value = first(p, field)
    if value is None:
        raise ValueError(f"{message}.{field} is required")
    return value


def _dilation(p: dict):
    values = [int(d) for d in p.get("dilation", [1])]
    if len(values) > 2:
        raise ValueError(f"dilation: {values!r} has more than two spatial values")
    return (values[0], values[-1])


def _hw(p: dict, base: str, default):
    """Caffe's ``kernel_size``/``kernel_h``+``kernel_w`` (likewise pad, stride) as (h, w)."""
    if f"{base}_h" in p or f"{base}_w" in p:
        return (int(first(p, f"{base}_h")), int(first(p, f"{base}_w")))
    name = {"kernel": "kernel_size"}.get(base, base)
    values = p.get(name, [])
    if not values:
        return (default, default)
    if len(values) == 1:
        return (int(values[0]), int(values[0]))
    if len(values) == 2:
        return (int(values[0]), int(values[1]))
    raise ValueError(f"{name}: {values!r} has more than two spatial values")


def _weighted(d: _Def, p: dict) -> tuple[dict, tuple[str, ...]]:
    """The arguments of a layer with a weight and an optional bias (Convolution,
    Deconvolution, InnerProduct), and its blob names."""
    bias = bool(first(p, "bias_term", True))
    names = ("w", "b") if bias else ("w",)
    lr, decay = _mults(d, len(names))
    cfg = dict(
        bias=bias,
        w_init=_filler(first(p, "weight_filler")),
        b_init=_filler(first(p, "bias_filler")),
        lr_mult=lr,
        decay_mult=decay,
        name=d.name,
    )
    return cfg, names


# ----------------------------------------------------------------------------- learned layers


def _convolution(d: _Def) -> Built:
    p = d.param("convolution_param")
    if first(p, "axis", 1) != 1:
        raise ValueError(f"convolution_param.axis={first(p, 'axis')!r}: only axis 1 is supported")
    cfg, names = _weighted(d, p)
    make = L.Conv2D if d.kind == "Convolution" else L.Deconv2D
    conv = make(
        int(_required(p, "num_output", "convolution_param")),
        _hw(p, "kernel", None),
        stride=_hw(p, "stride", 1),
        padding=_hw(p, "pad", 0),
        dilation=_dilation(p),
        groups=int(first(p, "group", 1)),
        **cfg,
    )
    return Built(conv, Blobs(names, "conv"))


def _inner_product(d: _Def) -> Built:
    """Axis 1 without ``transpose``: a Dense with the weight ``(K, out)`` (Caffe's blob
    transposed), its input flattened in Caffe's ``(C, H, W)`` order; otherwise the catalogue's
    InnerProduct, weight as Caffe stores it (with ``transpose``, ``(K, out)`` too)."""
    p = d.param("inner_product_param")
    cfg, names = _weighted(d, p)
    n = int(_required(p, "num_output", "inner_product_param"))
    axis = int(first(p, "axis", 1))
    transpose = bool(first(p, "transpose", False))
    if axis == 1 and not transpose:
        return Built(_inner_product_nchw(n, **cfg), Blobs(names, "dense"))
    ip = cat.InnerProduct(n, axis=axis, transpose=transpose, caffe_axes=True, **cfg)
    return Built(ip, Blobs(names))


def _inner_product_nchw(num_output, *, bias, w_init, b_init, lr_mult, decay_mult, name):
    dense = L.Dense(
        num_output, bias=bias, w_init=w_init, b_init=b_init, lr_mult=lr_mult,
        decay_mult=decay_mult, name=name,
    )  # fmt: skip

    def flat(x):
        x = ops.to_caffe_blob(x)
        return jnp.reshape(x, (x.shape[0], -1))

    def init(key, in_shape):
        s = tuple(in_shape)
        return dense.init(key, (s[0], math.prod(s[1:])))

    def apply(params, state, x, *, key=None, train=False):
        return dense.apply(params, state, flat(x), key=key, train=train)

    return L.Layer(init, apply, name=name, kind="inner_product", mults=dense.mults)


def _scale(d: _Def) -> Built:
    """One bottom: a learned scale (filler default 1); two: the second bottom is the scale.
    ``bias_term`` adds a learned bias shaped like the scale."""
    p = d.param("scale_param")
    bias = bool(first(p, "bias_term", False))
    two = len(d.bottoms) == 2
    names = (() if two else ("scale",)) + (("bias",) if bias else ())
    lr, decay = _mults(d, len(names))
    if two:  # the catalogue's Scale lists (scale, bias) multipliers in either form
        lr, decay = (1.0, *lr), (1.0, *decay)
    sc = cat.Scale(
        axis=int(first(p, "axis", 1)),
        num_axes=int(first(p, "num_axes", 1)),
        bias=bias,
        scale_init=_filler(first(p, "filler", {"type": ["constant"], "value": [1.0]})),
        bias_init=_filler(first(p, "bias_filler")),
        caffe_axes=True,
        lr_mult=lr,
        decay_mult=decay,
        name=d.name,
    )
    return Built(sc, Blobs(names))


def _bias(d: _Def) -> Built:
    """One bottom: a learned bias (filler default 0); two: the second bottom is the bias."""
    p = d.param("bias_param")
    names = () if len(d.bottoms) == 2 else ("bias",)
    lr, decay = _mults(d, len(names))
    b = cat.Bias(
        axis=int(first(p, "axis", 1)),
        num_axes=int(first(p, "num_axes", 1)),
        bias_init=_filler(first(p, "filler")),
        caffe_axes=True,
        lr_mult=lr or 1.0,
        decay_mult=decay or 1.0,
        name=d.name,
    )
    return Built(b, Blobs(names))


def _prelu(d: _Def) -> Built:
    """The slope blob is ``(C,)``, or a scalar ``()`` with ``channel_shared``; Caffe's default
    filler is the constant 0.25."""
    p = d.param("prelu_param")
    lr, decay = _mults(d, 1)
    filler = first(p, "filler")
    layer = L.PReLU(
        channel_shared=bool(first(p, "channel_shared", False)),
        alpha_init=None if filler is None else _filler(filler),
        lr_mult=lr,
        decay_mult=decay,
        name=d.name,
    )
    return Built(layer, Blobs(("alpha",)))


def _batch_norm(d: _Def) -> Built:
    """Caffe's three statistics blobs are the state. ``use_global_stats: true`` normalises with
    the stored statistics even when ``train=True``, ``false`` with the batch's (and updates
    them) even when ``train=False``; unset, ``train`` decides, as Caffe's default
    (``phase == TEST``) with ``train`` in the phase's place."""
    p = d.param("batch_norm_param")
    _mults(d, 3)  # Caffe's limit on param specs; the statistics are not learned
    bn = L.BatchNorm(
        momentum=float(first(p, "moving_average_fraction", 0.999)),
        eps=float(first(p, "eps", 1e-5)),
        affine=False,
        name=d.name,
    )
    use_global_stats = first(p, "use_global_stats")
    if use_global_stats is not None:
        bn = _fixed_mode(bn, train=not bool(use_global_stats))
    return Built(bn, Blobs(("mean_acc", "var_acc", "scale_factor"), tree="state"))


def _fixed_mode(layer: L.Layer, *, train: bool) -> L.Layer:
    """``layer`` run with ``train`` fixed, whatever the caller passes."""
    fixed = train

    def apply(params, state, x, *, key=None, train=False):
        return layer.apply(params, state, x, key=key, train=fixed)

    config = (*layer.config, ("use_global_stats", not fixed))
    return dataclasses.replace(layer, apply=apply, config=config)


# ----------------------------------------------------------------------------- stateless layers


def _pooling(d: _Def) -> Built:
    p = d.param("pooling_param")
    pool = first(p, "pool", "MAX")
    check_choice(pool, ("MAX", "AVE", "STOCHASTIC"), fn="pooling_param", name="pool")
    round_mode = first(p, "round_mode", "CEIL")
    check_choice(round_mode, ("CEIL", "FLOOR"), fn="pooling_param", name="round_mode")
    rounding = round_mode.lower()
    is_global = bool(first(p, "global_pooling", False))
    stride, pad = _hw(p, "stride", 1), _hw(p, "pad", 0)
    if pool == "STOCHASTIC":
        if pad != (0, 0):
            raise ValueError(
                f"pooling_param: pad={pad} with pool STOCHASTIC; Caffe pads only MAX and AVE"
            )
        if rounding != "ceil":
            raise ValueError("pooling_param: round_mode FLOOR is not supported with STOCHASTIC")
        if is_global:
            return Built(_global_stochastic_pool(d.name))
        window = _hw(p, "kernel", None)
        return Built(L.StochasticPool(window, stride=stride, name=d.name))
    if is_global:
        make = L.GlobalMaxPool if pool == "MAX" else L.GlobalAvgPool
        return Built(make(name=d.name))
    make = L.MaxPool if pool == "MAX" else L.AvgPool
    window = _hw(p, "kernel", None)
    return Built(make(window, stride=stride, padding=pad, rounding=rounding, name=d.name))


def _global_stochastic_pool(name):
    """STOCHASTIC pooling over each whole channel plane: ``(N, H, W, C) -> (N, 1, 1, C)``."""

    def init(key, in_shape):
        s = tuple(in_shape)
        return (s[0], 1, 1, s[-1]), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        if train and key is None:
            raise L.missing_key_error(name or "StochasticPool")
        window = tuple(jnp.shape(x)[1:3])
        return fl_pooling.stochastic_pool(x, window, key=key, train=train), state

    return L.Layer(init, apply, name=name, kind="stochastic_pool", needs_key=True)


def _concat(d: _Def) -> Built:
    p = d.param("concat_param")
    axis = int(first(p, "axis", first(p, "concat_dim", 1)))

    def make(ndim):
        return Concat(ops.caffe_axis(axis, ndim), name=d.name)

    def init(key, in_shape):
        return make(len(in_shape[0])).init(key, in_shape)

    def apply(params, state, x, *, key=None, train=False):
        return make(jnp.ndim(x[0])).apply(params, state, x, key=key, train=train)

    return Built(L.Layer(init, apply, name=d.name, kind="concat"))


def _eltwise(d: _Def) -> Built:
    p = d.param("eltwise_param")
    operation = first(p, "operation", "SUM")
    check_choice(operation, ("SUM", "PROD", "MAX"), fn="eltwise_param", name="operation")
    coeffs = tuple(float(c) for c in p.get("coeff", [])) or None
    return Built(Eltwise(operation.lower(), coeffs, name=d.name))


def _slice(d: _Def) -> Built:
    p = d.param("slice_param")
    axis = int(first(p, "axis", first(p, "slice_dim", 1)))
    points = tuple(int(s) for s in p.get("slice_point", []))
    sl = cat.Slice(
        points,
        axis=axis,
        num_outputs=None if points else len(d.tops),
        caffe_axes=True,
        name=d.name,
    )
    return Built(sl)


def _flatten(d: _Def) -> Built:
    p = d.param("flatten_param")
    fl_ = cat.Flatten(
        axis=int(first(p, "axis", 1)),
        end_axis=int(first(p, "end_axis", -1)),
        caffe_axes=True,
        name=d.name,
    )
    return Built(fl_)


def _reshape(d: _Def) -> Built:
    p = d.param("reshape_param")
    dims = tuple(int(x) for x in first(p, "shape", {}).get("dim", []))
    rs = cat.Reshape(
        dims,
        axis=int(first(p, "axis", 0)),
        num_axes=int(first(p, "num_axes", -1)),
        caffe_axes=True,
        name=d.name,
    )
    return Built(rs)


def _crop(d: _Def) -> Built:
    p = d.param("crop_param")
    offset = tuple(int(o) for o in p.get("offset", []))
    return Built(
        cat.Crop(axis=int(first(p, "axis", 2)), offset=offset, caffe_axes=True, name=d.name)
    )


def _argmax(d: _Def) -> Built:
    """With ``axis``, the catalogue's ArgMax. Without, Caffe's top is a table ``(N, 1 or 2,
    top_k, ...)``, not an image; it is handed back channels last like every other blob, so
    that ``to_caffe_blob`` of the output is Caffe's top."""
    p = d.param("argmax_param")
    axis = first(p, "axis")
    top_k = check_positive_int(first(p, "top_k", 1), fn="argmax_param", name="top_k")
    out_max_val = bool(first(p, "out_max_val", False))
    if axis is not None:
        am = cat.ArgMax(
            top_k, out_max_val=out_max_val, axis=int(axis), caffe_axes=True, name=d.name
        )
        return Built(am)

    def op(x):
        table = ops.argmax(x, top_k, out_max_val=out_max_val, caffe_axes=True)
        return ops.from_caffe_blob(table)

    cfg = dict(top_k=top_k, out_max_val=out_max_val)
    return Built(_stateless(op, "argmax", d.name, **cfg))


def _lrn(d: _Def) -> Built:
    p = d.param("lrn_param")
    regions = {"ACROSS_CHANNELS": "across_channels", "WITHIN_CHANNEL": "within_channel"}
    region = first(p, "norm_region", "ACROSS_CHANNELS")
    check_choice(region, tuple(regions), fn="lrn_param", name="norm_region")
    lrn = L.LRN(
        int(first(p, "local_size", 5)),
        alpha=float(first(p, "alpha", 1.0)),
        beta=float(first(p, "beta", 0.75)),
        k=float(first(p, "k", 1.0)),
        region=regions[region],
        name=d.name,
    )
    return Built(lrn)


def _elementwise(d: _Def) -> Built:
    """The one-bottom, parameter-free layers, their ``*_param`` fields mapped one to one."""
    kind, name = d.kind, d.name
    if kind == "ReLU":
        return Built(L.ReLU(float(first(d.param("relu_param"), "negative_slope", 0.0)), name=name))
    if kind == "Sigmoid":
        return Built(L.Sigmoid(name=name))
    if kind == "TanH":
        return Built(L.Tanh(name=name))
    if kind == "ELU":
        return Built(L.ELU(float(first(d.param("elu_param"), "alpha", 1.0)), name=name))
    if kind == "AbsVal":
        return Built(cat.AbsVal(name=name))
    if kind == "BNLL":
        return Built(cat.BNLL(name=name))
    if kind == "Threshold":
        t = float(first(d.param("threshold_param"), "threshold", 0.0))
        return Built(cat.Threshold(t, name=name))
    if kind == "Dropout":
        return Built(
            L.Dropout(float(first(d.param("dropout_param"), "dropout_ratio", 0.5)), name=name)
        )
    if kind == "Softmax":
        axis = int(first(d.param("softmax_param"), "axis", 1))
        return Built(cat.Softmax(axis=axis, caffe_axes=True, name=name))
    p = d.param({"Power": "power_param", "Exp": "exp_param", "Log": "log_param"}[kind])
    cfg = dict(scale=float(first(p, "scale", 1.0)), shift=float(first(p, "shift", 0.0)), name=name)
    if kind == "Power":
        return Built(cat.Power(float(first(p, "power", 1.0)), **cfg))
    make = cat.Exp if kind == "Exp" else cat.Log
    return Built(make(base=float(first(p, "base", -1.0)), **cfg))


def _split(d: _Def) -> Built:
    return Built(cat.Split(len(d.tops), name=d.name))


def _silence(d: _Def) -> Built:
    return Built(cat.Silence(name=d.name))


# ----------------------------------------------------------------------------- losses, accuracy


def _softmax_loss(d: _Def) -> Built:
    """``loss_param { ignore_label normalization normalize }`` (``normalize`` only when
    ``normalization`` is unset: true VALID, false BATCH_SIZE), ``softmax_param { axis }``; a
    second top is the softmax."""
    lp = d.param("loss_param")
    axis = int(first(d.param("softmax_param"), "axis", 1))
    normalization = _normalization(lp, "VALID")
    ignore = _ignore_label(lp, "loss_param")
    with_prob = len(d.tops) == 2

    def op(xs):
        scores, labels = xs
        logits = _class_positions(scores, axis)
        loss = losses.softmax_cross_entropy(
            logits,
            _labels(labels, logits.shape[:3]),
            ignore_label=ignore,
            normalization=normalization,
        )
        return (loss, ops.softmax(scores, axis, caffe_axes=True)) if with_prob else loss

    cfg = dict(axis=axis, normalization=normalization, ignore_label=ignore)
    return Built(_stateless(op, "softmax_loss", d.name, **cfg))


def _accuracy(d: _Def) -> Built:
    """``accuracy_param { top_k axis ignore_label }``; one top (Caffe's optional second top,
    the per-class accuracies, is not supported)."""
    if len(d.tops) == 2:
        raise ValueError(
            f"tops {list(d.tops)}: the second top (Caffe's per-class accuracies) is not "
            "supported; give Accuracy one top"
        )
    p = d.param("accuracy_param")
    top_k = int(first(p, "top_k", 1))
    axis = int(first(p, "axis", 1))
    ignore = _ignore_label(p, "accuracy_param")

    def op(xs):
        scores, labels = xs
        logits = _class_positions(scores, axis)
        return losses.accuracy(
            logits, _labels(labels, logits.shape[:3]), top_k=top_k, ignore_label=ignore
        )

    cfg = dict(top_k=top_k, axis=axis, ignore_label=ignore)
    return Built(_stateless(op, "accuracy", d.name, **cfg))


def _euclidean_loss(d: _Def) -> Built:
    """``sum((a - b)**2) / (2 N)``; ``b`` may have another shape with the same count."""

    def op(xs):
        a, b = (ops.to_caffe_blob(x) for x in xs)
        return losses.euclidean(a, _like(b, a, "the second bottom"))

    return Built(_stateless(op, "euclidean_loss", d.name))


def _sigmoid_cross_entropy_loss(d: _Def) -> Built:
    """``loss_param { ignore_label normalization normalize }``, BATCH_SIZE by default (Caffe's
    default for this layer)."""
    lp = d.param("loss_param")
    normalization = _normalization(lp, "BATCH_SIZE")
    ignore = _ignore_label(lp, "loss_param")

    def op(xs):
        x, t = (ops.to_caffe_blob(v) for v in xs)
        # integer targets stay integer (the loss casts them); float ones take x's dtype
        targets = _like(t, x, "the targets", cast=jnp.issubdtype(t.dtype, jnp.floating))
        return losses.sigmoid_cross_entropy(
            x, targets, ignore_label=ignore, normalization=normalization
        )

    cfg = dict(normalization=normalization, ignore_label=ignore)
    return Built(_stateless(op, "sigmoid_cross_entropy_loss", d.name, **cfg))


def _contrastive_loss(d: _Def) -> Built:
    """``contrastive_loss_param { margin legacy_version }``; bottoms ``(a, b, y)``: the pair's
    features ``(N, C)`` (or ``(N, C, 1, 1)``) and the similarity ``y`` (N values)."""
    p = d.param("contrastive_loss_param")
    margin = float(first(p, "margin", 1.0))
    legacy = bool(first(p, "legacy_version", False))

    def op(xs):
        a, b, y = (ops.to_caffe_blob(v) for v in xs)
        n = a.shape[0]
        a, b = a.reshape(n, -1), _like(b, a, "the second bottom").reshape(n, -1)
        return losses.contrastive(a, b, _labels(y, (n,)), margin=margin, legacy=legacy)

    cfg = dict(margin=margin, legacy_version=legacy)
    return Built(_stateless(op, "contrastive_loss", d.name, **cfg))


def _normalization(lp: dict, default: str) -> str:
    modes = {"FULL": "full", "VALID": "valid", "BATCH_SIZE": "batch_size", "NONE": "none"}
    if "normalization" in lp:
        mode = first(lp, "normalization")
    elif "normalize" in lp:
        mode = "VALID" if first(lp, "normalize") else "BATCH_SIZE"
    else:
        mode = default
    check_choice(mode, tuple(modes), fn="loss_param", name="normalization")
    return modes[mode]


def _ignore_label(p: dict, message: str) -> int | None:
    value = first(p, "ignore_label")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{message}.ignore_label={value!r} must be an int")
    return value


def _class_positions(scores, axis: int):
    """Caffe's scores blob with its class axis ``axis`` last, as ``(outer, inner, 1, K)``
    (positions in Caffe's order: ``outer`` the axes before ``axis``, ``inner`` those after)."""
    s = ops.to_caffe_blob(scores)
    if not -s.ndim <= axis < s.ndim:
        raise ValueError(f"axis={axis} is out of range for a bottom of rank {s.ndim}")
    a = axis % s.ndim
    outer, inner = math.prod(s.shape[:a]), math.prod(s.shape[a + 1 :])
    return jnp.moveaxis(s, a, -1).reshape(outer, inner, 1, s.shape[a])


def _labels(labels, shape):
    """The label blob's values in Caffe's order as ints of ``shape`` (the positions); float
    labels truncated toward zero, as Caffe's ``static_cast<int>``."""
    blob = ops.to_caffe_blob(labels)
    if blob.size != math.prod(shape):
        raise ValueError(
            f"the label bottom has {blob.size} values (shape {tuple(jnp.shape(labels))}), "
            f"one per position needs {math.prod(shape)}"
        )
    if not jnp.issubdtype(blob.dtype, jnp.integer):
        blob = blob.astype(jnp.int32)
    return blob.reshape(shape)


def _like(b, a, what: str, *, cast: bool = True):
    """``b`` (a Caffe blob) with ``a``'s shape (and dtype, with ``cast``); Caffe needs only the
    counts equal."""
    if b.size != a.size:
        raise ValueError(
            f"{what} has {b.size} values (Caffe shape {tuple(b.shape)}), the first bottom "
            f"{a.size} ({tuple(a.shape)}); Caffe needs the same count"
        )
    b = b.reshape(a.shape)
    return b.astype(a.dtype) if cast else b


def _stateless(op, kind: str, name, **config) -> L.Layer:
    """A layer without params or state, ``y = op(x)``, its output shape traced from ``op``;
    ``config`` is what its repr shows."""

    def init(key, in_shape):
        return cat._out_shape(op, in_shape, kind), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return op(x), state

    shown = tuple((k, v) for k, v in config.items() if v is not None)
    return L.Layer(init, apply, name=name, kind=kind, config=shown)


# ----------------------------------------------------------------------------- data layers


def _input_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "input_param", {})
    shapes = [_dims(s) for s in p.get("shape", [])]
    return _once_or_per_top(shapes, n_tops, "input_param.shape")


def _dummy_data_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "dummy_data_param", {})
    legacy = ("num", "channels", "height", "width")
    if any(f in p for f in legacy):
        if "shape" in p:
            raise ValueError("dummy_data_param: give shape or num/channels/height/width, not both")
        columns = [_once_or_per_top(p.get(f, []), n_tops, f"dummy_data_param.{f}") for f in legacy]
        return [tuple(int(v) for v in dims) for dims in zip(*columns, strict=True)]
    shapes = [_dims(s) for s in p.get("shape", [])]
    return _once_or_per_top(shapes, n_tops, "dummy_data_param.shape")


def _memory_data_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "memory_data_param", {})
    dims = tuple(int(first(p, f, 0)) for f in ("batch_size", "channels", "height", "width"))
    if min(dims) <= 0:
        raise ValueError(
            f"memory_data_param: batch_size, channels, height and width must all be positive, "
            f"got {dims}"
        )
    return [dims, dims[:1]]


def _image_data_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "image_data_param", {})
    batch = int(first(p, "batch_size", 1))
    crop = int(first(first(layer, "transform_param", {}), "crop_size", 0))
    height, width = int(first(p, "new_height", 0)), int(first(p, "new_width", 0))
    channels = 3 if first(p, "is_color", True) else 1
    if crop:
        data = (batch, channels, crop, crop)
    elif height and width:
        data = (batch, channels, height, width)
    else:
        data = None  # each image's own size
    return [data, (batch,)]


def _batched_label(param_field: str):
    """Data and WindowData: the images' shape comes from the data; the label is (batch,)."""

    def shapes(layer: dict, n_tops: int) -> list:
        batch = first(first(layer, param_field, {}), "batch_size")
        return [None, None if batch is None else (int(batch),)]

    return shapes


def _unknown_shapes(layer: dict, n_tops: int) -> list:
    return []


_DATA_SHAPES = {
    "Input": _input_shapes,
    "DummyData": _dummy_data_shapes,
    "MemoryData": _memory_data_shapes,
    "ImageData": _image_data_shapes,
    "Data": _batched_label("data_param"),
    "WindowData": _batched_label("window_data_param"),
    "HDF5Data": _unknown_shapes,
}


def _dims(blob_shape: dict) -> tuple[int, ...]:
    return tuple(int(d) for d in blob_shape.get("dim", []))


def _once_or_per_top(values: list, n_tops: int, field: str) -> list:
    if len(values) == 1:
        return values * n_tops
    if len(values) != n_tops:
        raise ValueError(
            f"{field}: {len(values)} values for {n_tops} tops (give one, or one per top)"
        )
    return values


# ----------------------------------------------------------------------------- the table

_ELEMENTWISE_TYPES = (
    "ReLU", "Sigmoid", "TanH", "ELU", "AbsVal", "BNLL", "Threshold", "Dropout", "Softmax", "Power",
    "Exp", "Log",
)  # fmt: skip

_BUILDERS: dict[str, Any] = {
    "Convolution": _convolution,
    "Deconvolution": _convolution,
    "InnerProduct": _inner_product,
    "Scale": _scale,
    "Bias": _bias,
    "PReLU": _prelu,
    "BatchNorm": _batch_norm,
    "Pooling": _pooling,
    "LRN": _lrn,
    "Concat": _concat,
    "Eltwise": _eltwise,
    "Split": _split,
    "Slice": _slice,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Crop": _crop,
    "ArgMax": _argmax,
    "Silence": _silence,
    **dict.fromkeys(_ELEMENTWISE_TYPES, _elementwise),
    "SoftmaxWithLoss": _softmax_loss,
    "SigmoidCrossEntropyLoss": _sigmoid_cross_entropy_loss,
    "EuclideanLoss": _euclidean_loss,
    "ContrastiveLoss": _contrastive_loss,
    "Accuracy": _accuracy,
}

#: Every layer type :func:`fnlayers.caffe.load_net` imports: the built ones, then the data
#: layers.
SUPPORTED_TYPES = (*_BUILDERS, *DATA_TYPES)
