"""``load_net``: a Caffe prototxt (current or V1 format) and ``.caffemodel`` as an
:func:`fnlayers.graph` model; ``save_caffemodel`` and ``to_prototxt`` write them back."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers import catalogue as cat
from fnlayers import init as fl_init
from fnlayers import layers as L
from fnlayers.caffe import schema, wire
from fnlayers.caffe.prototxt import first, parse, to_text
from fnlayers.graphs import Concat, Eltwise, graph
from fnlayers.tensor_ops import _from_caffe_shape, to_caffe_blob

__all__ = ["CaffeNet", "load_net", "save_caffemodel", "to_prototxt", "upgrade_v1"]

SUPPORTED_TYPES = (
    "Input", "Convolution", "Deconvolution", "Pooling", "InnerProduct", "ReLU", "Sigmoid",
    "TanH", "LRN", "Dropout", "Softmax", "Concat", "Eltwise", "Flatten", "BatchNorm", "Scale",
    "Split", "Slice",
)  # fmt: skip


@dataclasses.dataclass
class CaffeNet:
    """A loaded Caffe net. ``model.apply(params, state, x, train=False)`` returns
    ``({top: array}, state)``; 4-D blobs are NHWC.

    Attributes:
      name: the NetParameter's name.
      model: the :func:`fnlayers.graph` Layer (node names = Caffe layer names).
      params, state: its trees (from the caffemodel where given, else the prototxt fillers).
      inputs: ``{blob: Caffe shape}`` (NCHW as the prototxt writes it).
      outputs: the net's output blobs, Caffe's order (tops no later layer reads).
      layer_types: ``{layer name: Caffe type}`` of the layers kept for the phase.
      definition: the parsed prototxt (:func:`fnlayers.caffe.parse`'s dicts), a V1 net
        upgraded to the current ``layer`` form; :func:`to_prototxt` writes it back.
    """

    name: str | None
    model: L.Layer
    params: Any
    state: Any
    inputs: dict
    outputs: tuple
    layer_types: dict
    definition: dict | None = dataclasses.field(default=None, repr=False)
    _tags: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _shared: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def _is_file(text) -> bool:
    return isinstance(text, str) and "\n" not in text and os.path.isfile(text)


def _read_text(prototxt) -> str:
    looks_like_path = isinstance(prototxt, str) and not any(c in prototxt for c in "\n{:")
    if isinstance(prototxt, os.PathLike) or looks_like_path or _is_file(prototxt):
        with open(prototxt, encoding="utf-8") as f:
            return f.read()
    if isinstance(prototxt, bytes):
        return prototxt.decode("utf-8")
    return prototxt


# ----------------------------------------------------------------------------- phase rules

_PHASES = {"train": "TRAIN", "test": "TEST"}


def _meets_rule(rule: dict, phase: str, stages, level: int) -> bool:
    """Caffe's ``Net::StateMeetsRule``."""
    if "phase" in rule and first(rule, "phase") != phase:
        return False
    if "min_level" in rule and level < first(rule, "min_level"):
        return False
    if "max_level" in rule and level > first(rule, "max_level"):
        return False
    if any(s not in stages for s in rule.get("stage", [])):
        return False
    if any(s in stages for s in rule.get("not_stage", [])):
        return False
    return True


def _included(layer: dict, phase: str, stages, level: int) -> bool:
    """Caffe's ``Net::FilterNet`` for one layer."""
    include, exclude = layer.get("include", []), layer.get("exclude", [])
    name = first(layer, "name")
    if include and exclude:
        raise ValueError(f"Caffe layer {name!r}: specify include or exclude rules, not both")
    if include:
        return any(_meets_rule(r, phase, stages, level) for r in include)
    return not any(_meets_rule(r, phase, stages, level) for r in exclude)


# ----------------------------------------------------------------------------- fillers


def _filler(f: dict | None):
    if f is None:
        return fl_init.constant(0.0)  # Caffe's FillerParameter default: constant 0
    kind = first(f, "type", "constant")
    norm = {"FAN_IN": "fan_in", "FAN_OUT": "fan_out", "AVERAGE": "average"}[
        first(f, "variance_norm", "FAN_IN")
    ]
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
    raise ValueError(f"Caffe filler type {kind!r} is not supported")


def _learned(layer, p, name) -> dict:
    """The arguments every layer with a weight and a bias takes (Convolution, Deconvolution,
    InnerProduct): ``bias_term``, the two fillers, Caffe's ``param`` multipliers, the name."""
    lr, decay = _mults(layer)
    return dict(
        bias=bool(first(p, "bias_term", True)),
        w_init=_filler(first(p, "weight_filler")),
        b_init=_filler(first(p, "bias_filler")),
        lr_mult=lr,
        decay_mult=decay,
        name=name,
    )


def _mults(layer: dict):
    specs = layer.get("param", [])
    lr = tuple(float(first(p, "lr_mult", 1.0)) for p in specs)
    decay = tuple(float(first(p, "decay_mult", 1.0)) for p in specs)
    return (lr or 1.0), (decay or 1.0)


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


# ----------------------------------------------------------------------------- layers


def _inner_product_nchw(num_output, *, bias, w_init, b_init, lr_mult, decay_mult, name):
    """Caffe's InnerProduct (axis 1) as a :func:`fnlayers.Dense` that flattens its input in
    Caffe's ``(C, H, W)`` order: weight ``(K, num_output)`` = Caffe's blob transposed."""
    dense = L.Dense(
        num_output, bias=bias, w_init=w_init, b_init=b_init, lr_mult=lr_mult,
        decay_mult=decay_mult, name=name,
    )  # fmt: skip

    def flat(x):
        x = to_caffe_blob(x)
        return jnp.reshape(x, (x.shape[0], -1))

    def init(key, in_shape):
        s = tuple(in_shape)
        return dense.init(key, (s[0], math.prod(s[1:])))

    def apply(params, state, x, *, key=None, train=False):
        return dense.apply(params, state, flat(x), key=key, train=train)

    return L.Layer(init, apply, name=name, kind="inner_product", mults=dense.mults)


def _global_pool(op, name):
    def init(key, in_shape):
        s = tuple(in_shape)
        return (s[0], 1, 1, s[3]), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return op(x, axis=(1, 2), keepdims=True), state

    return L.Layer(init, apply, name=name, kind="global_pool")


def _array_axis(axis: int, ndim: int) -> int:
    """The NHWC array axis of Caffe's NCHW ``axis``."""
    axis %= ndim
    if ndim < 3:
        return axis
    return ndim - 1 if axis == 1 else (0 if axis == 0 else axis - 1)


def _concat(axis: int, name):
    def make(ndim):
        return Concat(_array_axis(axis, ndim), name=name)

    def init(key, in_shape):
        return make(len(in_shape[0])).init(key, in_shape)

    def apply(params, state, x, *, key=None, train=False):
        return make(jnp.ndim(x[0])).apply(params, state, x, key=key, train=train)

    return L.Layer(init, apply, name=name, kind="concat")


def _build(layer: dict):
    """``(fl layer, kind tag)`` for one Caffe LayerParameter."""
    name = first(layer, "name")
    kind = first(layer, "type")
    tops = layer.get("top", [])
    if kind in ("Convolution", "Deconvolution"):
        p = first(layer, "convolution_param", {})
        if first(p, "axis", 1) != 1:
            raise ValueError(f"Caffe layer {name!r} ({kind}): only axis 1 is supported")
        kw = dict(
            stride=_hw(p, "stride", 1),
            padding=_hw(p, "pad", 0),
            dilation=_dilation(p),
            groups=int(first(p, "group", 1)),
            **_learned(layer, p, name),
        )
        make = L.Conv2D if kind == "Convolution" else L.Deconv2D
        return make(int(first(p, "num_output")), _hw(p, "kernel", None), **kw), "conv"
    if kind == "Pooling":
        p = first(layer, "pooling_param", {})
        pool = first(p, "pool", "MAX")
        if pool not in ("MAX", "AVE"):
            raise ValueError(f"Caffe layer {name!r} (Pooling): pool {pool!r} is not supported")
        if first(p, "global_pooling", False):
            return _global_pool(jnp.max if pool == "MAX" else jnp.mean, name), None
        make = L.MaxPool if pool == "MAX" else L.AvgPool
        window = _hw(p, "kernel", None)
        return make(window, stride=_hw(p, "stride", 1), padding=_hw(p, "pad", 0), name=name), None
    if kind == "InnerProduct":
        p = first(layer, "inner_product_param", {})
        cfg = _learned(layer, p, name)
        n = int(first(p, "num_output"))
        transpose = bool(first(p, "transpose", False))
        if first(p, "axis", 1) == 1:
            return _inner_product_nchw(n, **cfg), ("ip_dense", transpose)
        ip = cat.InnerProduct(
            n, axis=int(first(p, "axis")), transpose=transpose, caffe_axes=True, **cfg
        )
        return ip, "as_stored"
    if kind == "ReLU":
        p = first(layer, "relu_param", {})
        return L.ReLU(float(first(p, "negative_slope", 0.0)), name=name), None
    if kind == "Sigmoid":
        return L.Sigmoid(name=name), None
    if kind == "TanH":
        return L.Tanh(name=name), None
    if kind == "LRN":
        p = first(layer, "lrn_param", {})
        region = {"ACROSS_CHANNELS": "across_channels", "WITHIN_CHANNEL": "within_channel"}
        lrn = L.LRN(
            int(first(p, "local_size", 5)),
            alpha=float(first(p, "alpha", 1.0)),
            beta=float(first(p, "beta", 0.75)),
            k=float(first(p, "k", 1.0)),
            region=region[first(p, "norm_region", "ACROSS_CHANNELS")],
            name=name,
        )
        return lrn, None
    if kind == "Dropout":
        p = first(layer, "dropout_param", {})
        return L.Dropout(float(first(p, "dropout_ratio", 0.5)), name=name), None
    if kind == "Softmax":
        p = first(layer, "softmax_param", {})
        return cat.Softmax(axis=int(first(p, "axis", 1)), caffe_axes=True, name=name), None
    if kind == "Concat":
        p = first(layer, "concat_param", {})
        axis = first(p, "axis", first(p, "concat_dim", 1))
        return _concat(int(axis), name), None
    if kind == "Eltwise":
        p = first(layer, "eltwise_param", {})
        op = {"SUM": "sum", "PROD": "prod", "MAX": "max"}[first(p, "operation", "SUM")]
        coeffs = tuple(float(c) for c in p.get("coeff", [])) or None
        return Eltwise(op, coeffs, name=name), None
    if kind == "Flatten":
        p = first(layer, "flatten_param", {})
        fl_ = cat.Flatten(
            axis=int(first(p, "axis", 1)),
            end_axis=int(first(p, "end_axis", -1)),
            caffe_axes=True,
            name=name,
        )
        return fl_, None
    if kind == "BatchNorm":
        p = first(layer, "batch_norm_param", {})
        if first(p, "use_global_stats") is not None:
            raise ValueError(
                f"Caffe layer {name!r} (BatchNorm): use_global_stats is not supported "
                "(train=False uses the stored statistics, train=True the batch's)"
            )
        bn = L.BatchNorm(
            momentum=float(first(p, "moving_average_fraction", 0.999)),
            eps=float(first(p, "eps", 1e-5)),
            affine=False,
            name=name,
        )
        return bn, "batch_norm"
    if kind == "Scale":
        p = first(layer, "scale_param", {})
        lr, decay = _mults(layer)
        sc = cat.Scale(
            axis=int(first(p, "axis", 1)),
            num_axes=int(first(p, "num_axes", 1)),
            bias=bool(first(p, "bias_term", False)),
            scale_init=_filler(first(p, "filler", {"type": ["constant"], "value": [1.0]})),
            bias_init=_filler(first(p, "bias_filler")),
            caffe_axes=True,
            lr_mult=lr,
            decay_mult=decay,
            name=name,
        )
        return sc, "scale"
    if kind == "Split":
        return cat.Split(len(tops), name=name), None
    if kind == "Slice":
        p = first(layer, "slice_param", {})
        axis = int(first(p, "axis", first(p, "slice_dim", 1)))
        points = tuple(int(s) for s in p.get("slice_point", []))
        sl = cat.Slice(
            points,
            axis=axis,
            num_outputs=None if points else len(tops),
            caffe_axes=True,
            name=name,
        )
        return sl, None
    raise ValueError(
        f"Caffe layer {name!r}: type {kind!r} is not supported "
        f"(supported: {', '.join(SUPPORTED_TYPES)})"
    )


# ----------------------------------------------------------------------------- weights


def _param_names(tag) -> tuple[str, ...]:
    """The fnlayers names of a layer's parameters in Caffe's blob order."""
    if tag == "conv" or tag == "as_stored" or (isinstance(tag, tuple) and tag[0] == "ip_dense"):
        return ("w", "b")
    if tag == "scale":
        return ("scale", "bias")
    return ()


def _fit(blob: np.ndarray, shape, where: str) -> np.ndarray:
    if blob.size != math.prod(shape):
        raise ValueError(f"{where}: the caffemodel blob of shape {blob.shape} does not fit {shape}")
    return blob.reshape(shape)


def _load_blobs(tag, blobs, params, state, where):
    """The layer's params and state with Caffe's blobs in place of the initial values. A
    parameter shared with an earlier layer (``param { name: ... }``) is absent from this
    layer's params: the earlier layer's blob is the one kept, as in Caffe."""
    params, state = dict(params), dict(state)

    def put(tree, key, value):
        tree[key] = jnp.asarray(value, dtype=tree[key].dtype)

    if tag == "batch_norm":
        names = ("mean_acc", "var_acc", "scale_factor")
        if len(blobs) != 3:
            raise ValueError(f"{where}: BatchNorm needs 3 blobs, the caffemodel has {len(blobs)}")
        for nm, b in zip(names, blobs, strict=True):
            put(state, nm, _fit(b, state[nm].shape, where))
        return params, state
    names = _param_names(tag)
    if not names:
        if blobs:
            raise ValueError(f"{where}: {len(blobs)} blobs in the caffemodel for a layer without")
        return params, state
    has_bias = len(blobs) > 1
    if len(blobs) not in (1, 2) or (names[1] in params and not has_bias):
        raise ValueError(f"{where}: {len(blobs)} blobs in the caffemodel do not fit the layer")
    first_name = names[0]
    if first_name in params:
        shape = params[first_name].shape
        if tag == "conv":
            # Convolution (out, in/g, kh, kw); Deconvolution (in, out/g, kh, kw): both -> HWIO
            kh, kw, ci, co = shape
            value = _fit(blobs[0], (co, ci, kh, kw), where).transpose(2, 3, 1, 0)
        elif isinstance(tag, tuple) and not tag[1]:  # InnerProduct: Caffe (out, K) -> (K, out)
            value = _fit(blobs[0], shape[::-1], where).T
        else:  # transposed InnerProduct, the catalogue's InnerProduct, Scale: as stored
            value = _fit(blobs[0], shape, where)
        put(params, first_name, value)
    if has_bias and names[1] in params:
        put(params, names[1], _fit(blobs[1], params[names[1]].shape, where))
    return params, state


# ----------------------------------------------------------------------------- V1 upgrade

_V1_TYPE_BY_NAME = {enum: kind for enum, kind in schema.V1_LAYER_TYPES.values()}
_V1_COPIED = ("bottom", "top", "name", "include", "exclude", "blobs", "loss_weight")
_V1_PARAM_SPEC = {"param": "name", "blob_share_mode": "share_mode", "blobs_lr": "lr_mult",
                  "weight_decay": "decay_mult"}  # fmt: skip


def _upgrade_v1_type(kind, name):
    if isinstance(kind, int) and not isinstance(kind, bool):
        if kind in schema.V1_LAYER_TYPES:
            return schema.V1_LAYER_TYPES[kind][1]
    elif isinstance(kind, str) and kind in _V1_TYPE_BY_NAME:
        return _V1_TYPE_BY_NAME[kind]
    raise ValueError(f"V1 layer {name!r}: unknown V1 layer type {kind!r}")


def _upgrade_v1_layer(v1: dict) -> dict:
    """Caffe's ``UpgradeV1LayerParameter`` on a parsed V1 ``layers { }`` entry."""
    name = first(v1, "name")
    unknown = set(v1) - set(_V1_COPIED) - set(_V1_PARAM_SPEC) - {"type", "layer"}
    unknown -= set(schema.V1_PARAM_MESSAGES)
    if unknown:
        raise ValueError(f"V1 layer {name!r}: unknown fields {sorted(unknown)}")
    if "layer" in v1:
        raise ValueError(f"V1 layer {name!r}: V0 'layer' parameters are not supported")
    layer: dict = {}
    for field in ("bottom", "top", "name", "include", "exclude"):
        if field in v1:
            layer[field] = list(v1[field])
    if "type" in v1:
        layer["type"] = [_upgrade_v1_type(first(v1, "type"), name)]
    if "blobs" in v1:
        layer["blobs"] = list(v1["blobs"])
    specs: list[dict] = []
    for field, spec_field in _V1_PARAM_SPEC.items():
        for i, value in enumerate(v1.get(field, [])):
            while len(specs) <= i:
                specs.append({})
            specs[i][spec_field] = [value]
    if specs:
        layer["param"] = specs
    if "loss_weight" in v1:
        layer["loss_weight"] = list(v1["loss_weight"])
    for field in schema.V1_PARAM_MESSAGES:
        if field in v1:
            layer[field] = list(v1[field])
    return layer


def upgrade_v1(net: dict) -> dict:
    """A parsed NetParameter with V1 ``layers`` upgraded to ``layer`` (Caffe's
    ``UpgradeV1Net``: type enums to type strings, ``blobs_lr``/``weight_decay``/``param``/
    ``blob_share_mode`` to ``param { lr_mult decay_mult name share_mode }``, the rules and the
    per-type parameter messages kept); a net without ``layers`` is returned as is.

    Raises:
      ValueError: both ``layer`` and ``layers`` (Caffe refuses them too), an unknown type.
    """
    if "layers" not in net:
        return net
    if "layer" in net:
        raise ValueError(
            "prototxt: both 'layer' and V1 'layers' fields; Caffe refuses to upgrade such a net"
        )
    out = {k: v for k, v in net.items() if k != "layers"}
    out["layer"] = [_upgrade_v1_layer(v1) for v1 in net["layers"]]
    return out


# ----------------------------------------------------------------------------- load_net


def _input_shapes(net: dict) -> dict:
    names = net.get("input", [])
    shapes = [tuple(int(d) for d in s.get("dim", [])) for s in net.get("input_shape", [])]
    dims = [int(d) for d in net.get("input_dim", [])]
    if names and not shapes:
        if len(dims) != 4 * len(names):
            raise ValueError(
                f"prototxt: {len(names)} inputs need 4 input_dim each, got {len(dims)}"
            )
        shapes = [tuple(dims[4 * i : 4 * i + 4]) for i in range(len(names))]
    if len(shapes) != len(names):
        raise ValueError(f"prototxt: {len(names)} inputs but {len(shapes)} input shapes")
    return dict(zip(names, shapes, strict=True))


def load_net(
    prototxt,
    weights=None,
    *,
    phase: str = "test",
    stages=(),
    level: int = 0,
    key=None,
) -> CaffeNet:
    """A Caffe net from its prototxt (a path or the text), in fnlayers.

    Args:
      prototxt: a ``.prototxt`` path or its text: the current ``layer { }`` format or the
        deprecated V1 ``layers { }`` one (upgraded as Caffe's ``UpgradeV1Net`` does).
      weights: None (params from the prototxt's fillers, drawn with ``key``), or a
        ``.caffemodel``: a path or its bytes. Layers are matched by name, as Caffe's
        ``CopyTrainedLayersFrom``; caffemodel layers absent from the net are ignored. V1
        caffemodels (``layers`` entries) are read too.
      phase, stages, level: Caffe's NetState; layers are kept by their include/exclude rules.
      key: the PRNG key for the fillers (default ``jax.random.key(0)``).

    Returns:
      A :class:`CaffeNet`.

    Raises:
      ValueError: an unsupported layer type (naming the layer and type), no input, a
        caffemodel blob that does not fit, V1 ``layers`` mixed with ``layer``.
    """
    if phase not in _PHASES:
        raise ValueError(f"load_net: phase={phase!r} must be 'train' or 'test'")
    net = upgrade_v1(parse(_read_text(prototxt)))
    caffe_phase = _PHASES[phase]
    stages = tuple(stages)
    inputs = _input_shapes(net)
    nodes, tags, types = [], {}, {}
    shared: dict[str, list] = {}
    for layer in net.get("layer", []):
        if not _included(layer, caffe_phase, stages, level):
            continue
        name, kind = first(layer, "name"), first(layer, "type")
        tops = tuple(layer.get("top", []))
        bottoms = tuple(layer.get("bottom", []))
        if kind == "Input":
            p = first(layer, "input_param", {})
            shapes = [tuple(int(d) for d in s.get("dim", [])) for s in p.get("shape", [])]
            if len(shapes) == 1:
                shapes = shapes * len(tops)
            if len(shapes) != len(tops):
                raise ValueError(
                    f"Caffe layer {name!r} (Input): {len(tops)} tops, {len(shapes)} shapes"
                )
            inputs.update(zip(tops, shapes, strict=True))
            types[name] = kind
            continue
        fl_layer, tag = _build(layer)
        types[name] = kind
        tags[name] = tag
        for spec, pname in zip(layer.get("param", []), _param_names(tag), strict=False):
            label = first(spec, "name")
            if label:
                shared.setdefault(label, []).append((name, pname))
        many_in = len(bottoms) > 1 or kind in ("Concat", "Eltwise")
        many_out = len(tops) > 1 or kind in ("Split", "Slice")
        nodes.append((fl_layer, bottoms if many_in else bottoms[0], tops if many_out else tops[0]))
    if not inputs:
        raise ValueError("load_net: the prototxt declares no input (input/input_shape or Input)")
    names = tuple(inputs)
    shared = {label: paths for label, paths in shared.items() if len(paths) > 1}
    model = graph(
        names if len(names) > 1 else names[0],
        nodes,
        shared_params=shared or None,
        name=first(net, "name"),
    )
    shapes = {n: _from_caffe_shape((-1, *s[1:])) if len(s) else s for n, s in inputs.items()}
    in_shape = shapes if len(names) > 1 else shapes[names[0]]
    key = jax.random.key(0) if key is None else key
    out_shapes, params, state = model.init(key, in_shape)
    if weights is not None:
        if isinstance(weights, bytes | bytearray | memoryview):
            buf = bytes(weights)
        else:
            with open(weights, "rb") as f:
                buf = f.read()
        _, stored = wire.read_net(buf)
        for entry in stored:
            if entry.name not in tags:
                continue
            where = f"Caffe layer {entry.name!r} ({types[entry.name]})"
            params[entry.name], state[entry.name] = _load_blobs(
                tags[entry.name], entry.blobs, params[entry.name], state[entry.name], where
            )
    return CaffeNet(
        name=first(net, "name"),
        model=model,
        params=params,
        state=state,
        inputs=dict(inputs),
        outputs=tuple(out_shapes),
        layer_types=types,
        definition=net,
        _tags=tags,
        _shared={path: paths[0] for paths in shared.values() for path in paths[1:]},
    )


# ----------------------------------------------------------------------------- export


def _layer_blobs(tag, name, params, state, shared) -> list:
    """Caffe's blobs of one layer (the inverse of :func:`_load_blobs`)."""
    if tag == "batch_norm":
        return [np.asarray(state[name][k]) for k in ("mean_acc", "var_acc", "scale_factor")]
    blobs = []
    for i, pname in enumerate(_param_names(tag)):
        if pname in params[name]:
            value = params[name][pname]
        elif (name, pname) in shared:  # shared: the owner's value, as Caffe's blobs hold it
            owner, owner_pname = shared[(name, pname)]
            value = params[owner][owner_pname]
        else:  # no bias term
            continue
        value = np.asarray(value, np.float32)
        if i == 0 and tag == "conv":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> Caffe's (out, in/g, kh, kw)
        elif i == 0 and isinstance(tag, tuple) and not tag[1]:
            value = value.T  # (K, out) -> Caffe's (out, K); K already in (C, H, W) order
        blobs.append(value)
    return blobs


def save_caffemodel(path, net: CaffeNet, params=None, state=None) -> bytes:
    """Write ``net``'s weights as a binary ``.caffemodel`` (a NetParameter of ``layer`` entries
    with name, type and blobs: Caffe's layouts, the inverse of :func:`load_net`'s), so that
    ``load_net(prototxt, path)`` gives ``params`` and ``state`` back exactly.

    Args:
      path: a file to write, or None (only return the bytes).
      net: a :class:`CaffeNet` from :func:`load_net` (its layers' Caffe types and layouts).
      params, state: the trees to write (default ``net.params``, ``net.state``), e.g. after
        training ``net.model``.

    Returns:
      The serialized bytes.
    """
    params = net.params if params is None else params
    state = net.state if state is None else state
    layers = []
    for name, kind in net.layer_types.items():
        tag = net._tags.get(name)
        layers.append((name, kind, _layer_blobs(tag, name, params, state, net._shared)))
    buf = wire.write_net(net.name, layers)
    if path is not None:
        with open(path, "wb") as f:
            f.write(buf)
    return buf


def to_prototxt(net) -> str:
    """The net definition as prototxt text (a :class:`CaffeNet`'s ``definition``, or a dict
    from :func:`fnlayers.caffe.parse`); ``parse(to_prototxt(net)) == net.definition``. A V1
    net comes out in the current ``layer`` format."""
    definition = net.definition if isinstance(net, CaffeNet) else net
    if definition is None:
        raise ValueError("to_prototxt: the CaffeNet has no definition")
    return to_text(definition)
