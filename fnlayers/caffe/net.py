"""``load_net``: a Caffe prototxt (current or V1 format, deploy or train_test) and its
``.caffemodel`` as an :func:`fnlayers.graph` model; ``save_caffemodel`` and ``to_prototxt`` write
them back. The per-type layers are built by :mod:`fnlayers.caffe.builders`."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers import layers as L
from fnlayers._checks import is_int
from fnlayers.caffe import schema, wire
from fnlayers.caffe.builders import DATA_TYPES, Blobs, build_layer, data_top_shapes, loss_weights
from fnlayers.caffe.prototxt import first, parse, to_text
from fnlayers.graphs import graph
from fnlayers.tensor_ops import _from_caffe_shape

__all__ = ["CaffeNet", "included", "load_net", "save_caffemodel", "to_prototxt", "upgrade_v1"]


@dataclasses.dataclass
class CaffeNet:
    """A loaded Caffe net. ``model.apply(params, state, x, train=False)`` returns
    ``({top: array}, state)``; blobs of rank 3 and more are channels last (4-D: NHWC).

    Attributes:
      name: the NetParameter's name.
      model: the :func:`fnlayers.graph` Layer (node names = Caffe layer names). Its inputs are
        :attr:`inputs`; it returns :attr:`outputs`, and after them any top with a loss weight
        that is not one of them (a loss layer's automatic top, ``"<layer> (automatic)"``, when
        the prototxt gives it none; a weighted top a later layer reads).
      params, state: its trees (from the caffemodel where given, else the prototxt fillers).
      inputs: ``{blob: Caffe shape}`` (NCHW): the ``input``/``Input`` blobs and the tops of
        the data layers, in the prototxt's order.
      outputs: the net's output blobs in Caffe's order (``Net::Init``): the tops no later layer
        reads (a Silence layer reads its bottoms), sorted by name.
      layer_types: ``{layer name: Caffe type}`` of the layers kept for the phase (data layers
        included).
      loss_weights: ``{top: weight}``, every top with a nonzero weight in the net's loss
        (Caffe's rule: a loss layer's first top 1 unless ``loss_weight`` says otherwise); the
        loss Caffe minimises is ``sum(weight * sum(top))`` over them.
      data_layers: ``{layer name: parsed definition}`` of the data layers kept for the phase
        (Data, ImageData, HDF5Data, MemoryData, DummyData, WindowData), for building their
        sources.
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
    loss_weights: dict = dataclasses.field(default_factory=dict)
    data_layers: dict = dataclasses.field(default_factory=dict, repr=False)
    definition: dict | None = dataclasses.field(default=None, repr=False)
    _blobs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
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


def included(layer: dict, phase: str, stages: Collection[str], level: int) -> bool:
    """Whether a net in ``phase`` (``"TRAIN"`` or ``"TEST"``), ``stages`` and ``level`` keeps
    ``layer`` (a parsed ``LayerParameter``): Caffe's ``Net::FilterNet`` for one layer. With
    ``include`` rules, the layer is kept when the state meets one of them; with ``exclude``
    rules, when it meets none; with neither, always (a rule is met when its ``phase``,
    ``min_level``/``max_level``, ``stage`` and ``not_stage`` all fit, ``Net::StateMeetsRule``).

    Raises:
      ValueError: the layer has both ``include`` and ``exclude`` rules (naming it).
    """
    include, exclude = layer.get("include", []), layer.get("exclude", [])
    name = first(layer, "name")
    if include and exclude:
        raise ValueError(f"Caffe layer {name!r}: specify include or exclude rules, not both")
    if include:
        return any(_meets_rule(r, phase, stages, level) for r in include)
    return not any(_meets_rule(r, phase, stages, level) for r in exclude)


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


def load_net(
    prototxt,
    weights=None,
    *,
    phase: str = "test",
    stages=(),
    level: int = 0,
    input_shapes: Mapping | None = None,
    key=None,
) -> CaffeNet:
    """A Caffe net from its prototxt (a path or the text), in fnlayers.

    Args:
      prototxt: a ``.prototxt`` path or its text: the current ``layer { }`` format or the
        deprecated V1 ``layers { }`` one (upgraded as Caffe's ``UpgradeV1Net`` does); a deploy
        net or a train_test one, whose data layers' tops become the net's inputs.
      weights: None (params from the prototxt's fillers, drawn with ``key``), or a
        ``.caffemodel``: a path or its bytes. Layers are matched by name, as Caffe's
        ``CopyTrainedLayersFrom``; caffemodel layers absent from the net are ignored; a
        parameter shared by ``param { name }`` takes the blob of the last layer in the file
        that holds it, as Caffe copies through the shared blob. V1 caffemodels (``layers``
        entries) are read too.
      phase, stages, level: Caffe's NetState; layers are kept by their include/exclude rules.
        A ``state { }`` block in the prototxt adds its stages to ``stages``; its phase and
        level give way to the arguments (Caffe's ``Net(file, phase, level, stages)``).
      input_shapes: ``{blob: Caffe shape}`` (NCHW) for net inputs whose shape the prototxt
        does not give: a Data layer's images, an HDF5Data layer's datasets (a label's shape
        ``(batch_size,)`` is read from the prototxt where it says, as is an ImageData layer's
        ``new_height``/``new_width``/``crop_size``, a MemoryData or DummyData shape and an
        ``Input`` shape); a shape given here also replaces the prototxt's.
      key: the PRNG key for the fillers (default ``jax.random.key(0)``).

    Returns:
      A :class:`CaffeNet`. Its params are initialised for the inputs' Caffe shapes (their batch
      size too); ``model.apply`` takes any batch size. ``apply``'s ``train`` plays the part of
      Caffe's phase at run time: Dropout, STOCHASTIC pooling and a BatchNorm without
      ``use_global_stats`` follow it (``use_global_stats: true``/``false`` fixes a BatchNorm
      to the stored/the batch's statistics in either mode).

    Raises:
      ValueError: an unsupported layer type (naming the layer and type), a bad layer
        parameter (naming the layer, its type and the field), an input whose shape is neither
        in the prototxt nor in ``input_shapes`` (naming the layer, its type and the top), no
        input at all, a caffemodel blob that does not fit, V1 ``layers`` mixed with ``layer``.
    """
    if phase not in _PHASES:
        raise ValueError(f"load_net: phase={phase!r} must be 'train' or 'test'")
    if isinstance(stages, str):
        raise ValueError(f"load_net: stages={stages!r} must be a sequence of stage names")
    net = upgrade_v1(parse(_read_text(prototxt)))
    stages = (*first(net, "state", {}).get("stage", []), *stages)
    plan = _Plan()
    plan.add_legacy_inputs(net)
    for layer in net.get("layer", []):
        if included(layer, _PHASES[phase], stages, level):
            plan.add(layer)
    inputs = plan.input_shapes(input_shapes)
    if not inputs:
        raise ValueError(
            "load_net: the prototxt declares no input (input/input_shape, Input or a data layer)"
        )
    outputs = tuple(sorted(plan.available))  # Caffe collects them in a std::set
    returned = outputs + tuple(t for t in plan.loss_weights if t not in outputs)
    names = tuple(inputs)
    model = graph(
        names if len(names) > 1 else names[0],
        plan.nodes,
        outputs=returned,
        shared_params=plan.shared_groups() or None,
        name=first(net, "name"),
    )
    shapes = {n: _from_caffe_shape(s) for n, s in inputs.items()}
    key = jax.random.key(0) if key is None else key
    _, params, state = model.init(key, shapes if len(names) > 1 else shapes[names[0]])
    shared = plan.shared_owners()
    if weights is not None:
        _, stored = wire.read_net(_read_bytes(weights))
        for entry in stored:
            if entry.name in plan.types:
                where = f"Caffe layer {entry.name!r} ({plan.types[entry.name]})"
                spec = plan.blobs.get(entry.name, Blobs())
                _load_blobs(spec, entry.name, entry.blobs, params, state, shared, where)
    return CaffeNet(
        name=first(net, "name"),
        model=model,
        params=params,
        state=state,
        inputs=inputs,
        outputs=outputs,
        layer_types=plan.types,
        loss_weights=plan.loss_weights,
        data_layers=plan.data_layers,
        definition=net,
        _blobs=plan.blobs,
        _shared=shared,
    )


class _Plan:
    """The graph of a filtered net, layer by layer: the nodes, the inputs with the layers that
    declare them, and what Caffe's ``Net::Init`` tracks (the tops no later layer reads, the
    loss weights, the parameters shared by name)."""

    def __init__(self):
        self.declared: dict[str, tuple | None] = {}  # input blob -> Caffe shape, if known
        self.origin: dict[str, tuple[str, str]] = {}  # input blob -> (layer name, type)
        self.nodes: list = []
        self.blobs: dict[str, Blobs] = {}
        self.types: dict[str, str] = {}
        self.data_layers: dict[str, dict] = {}
        self.loss_weights: dict[str, float] = {}
        self.shared: dict[str, list[tuple[str, str]]] = {}  # label -> [(layer, leaf)]
        self.available: set[str] = set()  # Caffe's available_blobs: the outputs so far

    def add_legacy_inputs(self, net: dict) -> None:
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
        for top, shape in zip(names, shapes, strict=True):
            self._add_input(top, shape, ("input", "input"))

    def add(self, layer: dict) -> None:
        name, kind = first(layer, "name"), first(layer, "type")
        if name in self.types:
            raise ValueError(f"Caffe layer {name!r}: two layers of the phase have this name")
        self.types[name] = kind
        if kind in DATA_TYPES:
            for top, shape in data_top_shapes(layer).items():
                self._add_input(top, shape, (name, kind))
            if kind != "Input":
                self.data_layers[name] = layer
            return
        built = build_layer(layer)
        bottoms, tops = tuple(layer.get("bottom", [])), tuple(layer.get("top", []))
        if kind == "Silence":
            node_tops = (f"{name} (silenced)",)  # no blob; the graph needs a name for None
        elif not tops and kind.endswith("Loss"):
            node_tops = (f"{name} (automatic)",)  # Caffe's anonymous top of a loss layer
        else:
            node_tops = tops
        for top, weight in zip(node_tops, loss_weights(layer, node_tops), strict=True):
            if weight:
                self.loss_weights[top] = weight
        self.available.difference_update(bottoms)
        self.available.update(tops)
        self.blobs[name] = built.blobs
        if built.blobs.tree == "params":
            for spec, leaf in zip(layer.get("param", []), built.blobs.names, strict=False):
                label = first(spec, "name")
                if label:
                    self.shared.setdefault(label, []).append((name, leaf))
        many_in = len(bottoms) > 1 or kind in ("Concat", "Eltwise", "Silence")
        many_out = len(node_tops) > 1 or kind in ("Split", "Slice")
        self.nodes.append(
            (
                built.layer,
                bottoms if many_in else bottoms[0],
                node_tops if many_out else node_tops[0],
            )
        )

    def _add_input(self, top: str, shape, origin: tuple[str, str]) -> None:
        if top in self.declared:
            raise ValueError(
                f"Caffe layer {origin[0]!r} ({origin[1]}): top {top!r} is already an input, "
                f"declared by {self.origin[top][0]!r}"
            )
        self.declared[top], self.origin[top] = shape, origin
        self.available.add(top)

    def input_shapes(self, given: Mapping | None) -> dict[str, tuple[int, ...]]:
        """Each input's Caffe shape: ``given``'s, else the prototxt's."""
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            raise ValueError(
                f"load_net: input_shapes={given!r} must be a dict {{blob: Caffe shape}}"
            )
        for top, shape in given.items():
            if top not in self.declared:
                raise ValueError(
                    f"load_net: input_shapes names {top!r}, which is not an input of the net "
                    f"(inputs: {list(self.declared)})"
                )
            ok = isinstance(shape, tuple | list) and len(shape) > 0
            if not ok or not all(is_int(d) and (d > 0 or (i == 0 and d == -1))
                                 for i, d in enumerate(shape)):  # fmt: skip
                raise ValueError(
                    f"load_net: input_shapes[{top!r}]={shape!r} must be a Caffe shape: positive "
                    "ints (the batch may be -1), NCHW for images"
                )
        shapes = {}
        for top, declared in self.declared.items():
            shape = given.get(top, declared)
            if shape is None:
                layer, kind = self.origin[top]
                raise ValueError(
                    f"Caffe layer {layer!r} ({kind}): the prototxt does not give the shape of "
                    f"its top {top!r}; pass load_net(..., input_shapes={{{top!r}: (N, C, H, W)}})"
                    " with its Caffe shape"
                )
            shapes[top] = tuple(int(d) for d in shape)
        return shapes

    def shared_groups(self) -> dict[str, list[tuple[str, str]]]:
        """``graph``'s ``shared_params``: the labels more than one layer uses."""
        return {label: paths for label, paths in self.shared.items() if len(paths) > 1}

    def shared_owners(self) -> dict[tuple[str, str], tuple[str, str]]:
        """``{(layer, leaf): (owner layer, owner leaf)}`` for every reader of a shared leaf."""
        return {path: paths[0] for paths in self.shared_groups().values() for path in paths[1:]}


def _read_bytes(weights) -> bytes:
    if isinstance(weights, bytes | bytearray | memoryview):
        return bytes(weights)
    with open(weights, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- weights


def _load_blobs(spec: Blobs, name: str, blobs, params, state, shared, where: str) -> None:
    """Puts one caffemodel layer's blobs into ``params``/``state`` (their ``name`` entries
    replaced). A leaf shared with an earlier layer is written where it is stored, the owner's
    entry: Caffe copies each layer's blobs in turn through the one shared blob."""
    if len(blobs) != len(spec.names):
        expected = ", ".join(spec.names) or "none"
        raise ValueError(
            f"{where}: the caffemodel has {len(blobs)} blobs, the layer has {len(spec.names)} "
            f"({expected})"
        )
    tree = state if spec.tree == "state" else params
    for i, (leaf, blob) in enumerate(zip(spec.names, blobs, strict=True)):
        node, key = shared.get((name, leaf), (name, leaf))
        old = tree[node][key]
        value = _from_caffe(blob, spec.layout if i == 0 else "as_stored", old.shape, where)
        tree[node] = {**tree[node], key: jnp.asarray(value, dtype=old.dtype)}


def _from_caffe(blob: np.ndarray, layout: str, shape, where: str) -> np.ndarray:
    """A Caffe blob in fnlayers' layout of ``shape`` (Caffe's legacy 4-D blob shapes read by
    their element count)."""
    if layout == "conv":  # Caffe (out, in/g, kh, kw), Deconvolution (in, out/g, kh, kw)
        kh, kw, ci, co = shape
        return _fit(blob, (co, ci, kh, kw), where).transpose(2, 3, 1, 0)
    if layout == "dense":  # Caffe (out, K)
        return _fit(blob, tuple(shape)[::-1], where).T
    return _fit(blob, shape, where)


def _to_caffe(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return value.transpose(3, 2, 0, 1)  # HWIO -> (out, in/g, kh, kw)
    if layout == "dense":
        return value.T  # (K, out) -> (out, K); K already in Caffe's (C, H, W) order
    return value


def _fit(blob: np.ndarray, shape, where: str) -> np.ndarray:
    if blob.size != math.prod(shape):
        raise ValueError(f"{where}: the caffemodel blob of shape {blob.shape} does not fit {shape}")
    return blob.reshape(shape)


# ----------------------------------------------------------------------------- export


def save_caffemodel(path, net: CaffeNet, params=None, state=None) -> bytes:
    """Write ``net``'s weights as a binary ``.caffemodel`` (a NetParameter of ``layer`` entries
    with name, type and blobs: Caffe's layouts, the inverse of :func:`load_net`'s), so that
    ``load_net(prototxt, path)`` gives ``params`` and ``state`` back exactly. Every layer of
    the phase is written, data layers and parameter-free ones with no blobs, a shared
    parameter under each layer that uses it, as Caffe writes them.

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
        spec = net._blobs.get(name, Blobs())
        tree = state if spec.tree == "state" else params
        blobs = []
        for i, leaf in enumerate(spec.names):
            node, key = net._shared.get((name, leaf), (name, leaf))
            value = np.asarray(tree[node][key], np.float32)
            blobs.append(_to_caffe(value, spec.layout if i == 0 else "as_stored"))
        layers.append((name, kind, blobs))
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
