"""Caffe's layers with learned blobs as fnlayers layers: Convolution and Deconvolution
(docs/caffe-semantics.md §1, §2), InnerProduct (§12), Scale, Bias, PReLU and BatchNorm (§5, its
statistics as the layer's state), with their ``param { lr_mult decay_mult }`` specs and Caffe's
fillers (§11). :data:`LEARNED_BUILDERS` maps each type to its builder; each builder gives the
layer and its :class:`~fnlayers.caffe.builders.Blobs`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp

from fnlayers import catalogue as cat
from fnlayers import init as fl_init
from fnlayers import layers as L
from fnlayers import tensor_ops as ops
from fnlayers._checks import check_choice
from fnlayers.caffe._layer_def import Blobs, Built, _check_param_specs, _Def, _hw
from fnlayers.caffe.prototxt import first

__all__ = ["LEARNED_BUILDERS"]


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


# ----------------------------------------------------------------------------- the table

#: The builder of each learned layer type, in the order :data:`SUPPORTED_TYPES
#: <fnlayers.caffe.builders.SUPPORTED_TYPES>` lists them.
LEARNED_BUILDERS: dict[str, Callable[[_Def], Built]] = {
    "Convolution": _convolution,
    "Deconvolution": _convolution,
    "InnerProduct": _inner_product,
    "Scale": _scale,
    "Bias": _bias,
    "PReLU": _prelu,
    "BatchNorm": _batch_norm,
}
