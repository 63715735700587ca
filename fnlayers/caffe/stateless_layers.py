"""Caffe's layers without learned blobs as fnlayers layers: Pooling (docs/caffe-semantics.md
§3, STOCHASTIC included), LRN (§4), Dropout (§6), the activations (§7) and the other
elementwise layers, and the layers that only move data: Concat, Eltwise, Split, Slice, Flatten,
Reshape, Crop, ArgMax and Silence, their axes read as Caffe's NCHW blob's.
:data:`STATELESS_BUILDERS` maps each type to its builder.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from fnlayers import catalogue as cat
from fnlayers import layers as L
from fnlayers import pooling as fl_pooling
from fnlayers import tensor_ops as ops
from fnlayers._checks import check_choice, check_positive_int
from fnlayers.caffe._layer_def import Built, _Def, _hw, _stateless
from fnlayers.caffe.prototxt import first
from fnlayers.graphs import Concat, Eltwise

__all__ = ["STATELESS_BUILDERS"]


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


# ----------------------------------------------------------------------------- the table

_ELEMENTWISE_TYPES = (
    "ReLU", "Sigmoid", "TanH", "ELU", "AbsVal", "BNLL", "Threshold", "Dropout", "Softmax", "Power",
    "Exp", "Log",
)  # fmt: skip

#: The builder of each stateless layer type, in the order :data:`SUPPORTED_TYPES
#: <fnlayers.caffe.builders.SUPPORTED_TYPES>` lists them.
STATELESS_BUILDERS: dict[str, Callable[[_Def], Built]] = {
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
}
