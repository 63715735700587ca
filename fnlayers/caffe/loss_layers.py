"""Caffe's loss layers and Accuracy as fnlayers layers (docs/caffe-semantics.md §8):
SoftmaxWithLoss, SigmoidCrossEntropyLoss, EuclideanLoss, ContrastiveLoss and Accuracy, with
``loss_param``'s ``ignore_label`` and ``normalization``, and the labels read in Caffe's element
order (floats truncated toward zero, as Caffe's ``static_cast<int>``). Each returns a scalar.
:data:`LOSS_BUILDERS` maps each type to its builder; :func:`loss_weights` is Caffe's weight of
each top in the net's loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp

from fnlayers import losses
from fnlayers import tensor_ops as ops
from fnlayers._checks import check_choice
from fnlayers.caffe._layer_def import Built, _Def, _stateless
from fnlayers.caffe.prototxt import first

__all__ = ["LOSS_BUILDERS", "loss_weights"]


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


# ----------------------------------------------------------------------------- label helpers


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


# ----------------------------------------------------------------------------- the table

#: The builder of each loss type and Accuracy, in the order :data:`SUPPORTED_TYPES
#: <fnlayers.caffe.builders.SUPPORTED_TYPES>` lists them.
LOSS_BUILDERS: dict[str, Callable[[_Def], Built]] = {
    "SoftmaxWithLoss": _softmax_loss,
    "SigmoidCrossEntropyLoss": _sigmoid_cross_entropy_loss,
    "EuclideanLoss": _euclidean_loss,
    "ContrastiveLoss": _contrastive_loss,
    "Accuracy": _accuracy,
}
