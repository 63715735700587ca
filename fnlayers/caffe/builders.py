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

The builders live by kind: :mod:`fnlayers.caffe.learned_layers` (layers with learned blobs),
:mod:`fnlayers.caffe.stateless_layers`, :mod:`fnlayers.caffe.loss_layers` (losses, Accuracy,
:func:`loss_weights`) and :mod:`fnlayers.caffe.data_shapes` (:data:`DATA_TYPES`,
:func:`data_top_shapes`), on what :mod:`fnlayers.caffe._layer_def` gives them all; this module
joins their tables and is the one to import from.
"""

from __future__ import annotations

from collections.abc import Callable

from fnlayers.caffe._layer_def import Blobs, Built, _check_param_specs, _Def
from fnlayers.caffe.data_shapes import DATA_TYPES, data_top_shapes
from fnlayers.caffe.learned_layers import LEARNED_BUILDERS
from fnlayers.caffe.loss_layers import LOSS_BUILDERS, loss_weights
from fnlayers.caffe.prototxt import first
from fnlayers.caffe.stateless_layers import STATELESS_BUILDERS

__all__ = [
    "DATA_TYPES",
    "SUPPORTED_TYPES",
    "Blobs",
    "Built",
    "build_layer",
    "data_top_shapes",
    "loss_weights",
]


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
    """The layer's number of bottoms and tops against its type's :data:`_COUNTS`."""
    for what, blobs, (low, high) in zip(
        ("bottoms", "tops"), (d.bottoms, d.tops), _COUNTS.get(d.kind, ((1, 1), (1, 1))), strict=True
    ):
        if len(blobs) < low or (high is not None and len(blobs) > high):
            wanted = f"{low}" if low == high else f"{low} to {high if high is not None else 'any'}"
            raise ValueError(f"{len(blobs)} {what} {list(blobs)}; this type takes {wanted}")


# ----------------------------------------------------------------------------- the table

_BUILDERS: dict[str, Callable[[_Def], Built]] = {
    **LEARNED_BUILDERS,
    **STATELESS_BUILDERS,
    **LOSS_BUILDERS,
}

#: Every layer type :func:`fnlayers.caffe.load_net` imports: the built ones, then the data
#: layers.
SUPPORTED_TYPES = (*_BUILDERS, *DATA_TYPES)
