"""Losses and accuracy with Caffe's semantics (docs/caffe-semantics.md §8).

Every loss returns a scalar in the dtype of its floating input (computed in float32 when that
input is float16/bfloat16; :func:`accuracy` returns float32) and is differentiable in its
floating inputs; integer labels are never differentiated. Class scores use the last axis
(NHWC): ``logits`` is ``(N, K)`` or, for per-pixel classification, ``(N, H, W, K)``, with
integer ``labels`` of shape ``(N,)`` / ``(N, H, W)``.

Normalization follows Caffe's ``LossParameter.normalization`` (``get_normalizer``); the summed
loss is divided by ``max(1, normalizer)``:

================  ===============================================================
``"full"``        every position, ignored or not: ``N`` times the spatial size
``"valid"``       the positions whose label is not ``ignore_label``
``"batch_size"``  ``N``
``"none"``        1 (the plain sum)
================  ===============================================================

Caffe leaves a label outside ``[0, K)`` undefined (it reads out of bounds). Here, a label outside
``[0, K)`` that is not ``ignore_label`` makes :func:`softmax_cross_entropy` and :func:`accuracy`
return NaN, so a training loop that checks for non-finite losses catches the bad batch; the
gradient stays finite.

Where fnlayers departs from Caffe (docs/caffe-semantics.md §13): :func:`softmax_cross_entropy`
works from log-softmax, so it reports the true loss for any finite logits instead of saturating at
``-ln(FLT_MIN) = 87.3365``; ``clamp=True`` reproduces Caffe's saturating value for comparison.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlayers._checks import (
    acc_dtype,
    check_bool,
    check_choice,
    check_float_array,
    check_int,
    check_real,
    check_same_dtype,
    is_int,
)
from fnlayers._typing import Array, ArrayLike

__all__ = [
    "FLT_MIN",
    "NORMALIZATIONS",
    "accuracy",
    "contrastive",
    "euclidean",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
]

NORMALIZATIONS = ("full", "valid", "batch_size", "none")

#: Caffe's floor on the true-class probability in SoftmaxWithLoss (float32 ``FLT_MIN``, used for
#: every Dtype); ``-ln(FLT_MIN) = 87.33654475`` is the largest loss Caffe can report per position.
FLT_MIN = float(np.finfo(np.float32).tiny)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    ignore_label: int | None = None,
    normalization: str = "valid",
    clamp: bool = False,
) -> Array:
    """Caffe's SoftmaxWithLoss: mean negative log-likelihood of the true class (§8).

    Args:
      logits: ``(N, K)`` or ``(N, H, W, K)`` floating array of unnormalised class scores.
      labels: ``(N,)`` or ``(N, H, W)`` integer class indices in ``[0, K)``.
      ignore_label: an int; positions with this label add nothing to the loss or the gradient
        (and are not counted by ``"valid"``). None: no label is ignored.
      normalization: ``"valid"`` (Caffe's default), ``"full"``, ``"batch_size"`` or ``"none"``;
        see the module docstring.
      clamp: False (default): the per-position loss is ``-log_softmax(logits)[label]``, exact
        for any finite logits (a logit gap of 200 gives a loss of 200). True: Caffe's value
        ``-log(max(softmax(logits)[label], FLT_MIN))``, which saturates at 87.3365 as soon as the
        true-class probability underflows float32. Either way the gradient is Caffe's
        ``(softmax - onehot) / normalizer`` (Caffe's clamp does not touch the gradient), finite
        for any finite logits.

    Returns:
      A scalar of ``logits.dtype``: the sum of the per-position losses over the non-ignored
      positions, divided by ``max(1, normalizer)``. NaN if a non-ignored label is outside
      ``[0, K)``.

    Raises:
      TypeError: ``logits`` is not floating, ``labels`` is not integer, ``ignore_label`` is not
        an int, ``clamp`` is not a bool.
      ValueError: the shapes do not fit, or ``normalization`` is unknown.
    """
    fn = "softmax_cross_entropy"
    logits, labels = _check_scores_and_labels(logits, labels, fn)
    ignore = _check_ignore_label(ignore_label, fn)
    check_choice(normalization, NORMALIZATIONS, fn=fn, name="normalization")
    clamp = check_bool(clamp, fn=fn, name="clamp")
    return _softmax_cross_entropy(logits, labels, ignore, normalization, clamp)


def sigmoid_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    ignore_label: int | None = None,
    normalization: str = "batch_size",
) -> Array:
    """Caffe's SigmoidCrossEntropyLoss: binary cross-entropy on logits, in the stable form (§8).

    Per element ``max(x, 0) - x*t + log(1 + exp(-|x|))`` (computed as ``softplus(x) - x*t``),
    which never overflows; its gradient is ``sigmoid(x) - t``.

    Args:
      logits: ``(N, ...)`` floating array, one independent logit per element.
      targets: the same shape; probabilities in ``[0, 1]``, floating with the dtype of
        ``logits``, or an integer/bool array (cast to that dtype).
      ignore_label: an int; elements with ``int(target) == ignore_label`` (C++ truncation, as
        Caffe) add nothing. None: nothing is ignored.
      normalization: ``"batch_size"`` (Caffe's default for this layer: divide by ``N``),
        ``"valid"``, ``"full"`` (every element) or ``"none"``.

    Returns:
      A scalar of ``logits.dtype``: the summed loss over non-ignored elements divided by
      ``max(1, normalizer)``.

    Raises:
      TypeError: non-floating ``logits``, ``targets`` of another floating dtype or a
        non-numeric dtype, a non-int ``ignore_label``.
      ValueError: ``logits`` is a scalar, the shapes differ, or ``normalization`` is unknown.
    """
    fn = "sigmoid_cross_entropy"
    logits, targets = _as_array(logits), _as_array(targets)
    _check_batch_pair(logits, targets, fn, ("logits", "targets"))
    if jnp.issubdtype(targets.dtype, jnp.floating):
        check_same_dtype(logits, targets, fn=fn, names=("logits", "targets"))
    elif not (jnp.issubdtype(targets.dtype, jnp.integer) or targets.dtype == jnp.bool_):
        raise TypeError(
            f"{fn}: targets must be floating (the dtype of logits), integer or bool, "
            f"got {targets.dtype}"
        )
    ignore = _check_ignore_label(ignore_label, fn)
    check_choice(normalization, NORMALIZATIONS, fn=fn, name="normalization")
    return _sigmoid_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), ignore, normalization)


def euclidean(pred: ArrayLike, target: ArrayLike) -> Array:
    """Caffe's EuclideanLoss: ``sum((pred - target)**2) / (2N)`` with N = ``pred.shape[0]`` (§8).

    Args:
      pred, target: ``(N, ...)`` floating arrays of the same shape and dtype.

    Returns:
      A scalar of ``pred.dtype``. Gradients are ``±(pred - target) / N``.

    Raises:
      TypeError: non-floating or mismatched dtypes.
      ValueError: a scalar input or different shapes (there is no broadcasting).
    """
    fn = "euclidean"
    pred, target = _as_array(pred), _as_array(target)
    _check_batch_pair(pred, target, fn, ("pred", "target"))
    check_same_dtype(pred, target, fn=fn, names=("pred", "target"))
    return _euclidean(jnp.asarray(pred), jnp.asarray(target))


def contrastive(
    a: ArrayLike,
    b: ArrayLike,
    similar: ArrayLike,
    *,
    margin: float = 1.0,
    legacy: bool = False,
) -> Array:
    """Caffe's ContrastiveLoss for Siamese networks (§8).

    With ``d² = ||a_i - b_i||²`` summed over every axis after the first, pair ``i`` adds ``d²``
    when similar, and when dissimilar ``max(margin - d, 0)²`` (default) or
    ``max(margin - d², 0)`` (``legacy=True``, Caffe's ``legacy_version``). The total is divided
    by ``2N``.

    Gradient: the exact derivative of that loss. Caffe's hand-written non-legacy backward
    divides by ``d + 1e-4`` instead of ``d``, so for a dissimilar pair inside the margin our
    gradient is Caffe's times ``(d + 1e-4) / d`` (a relative difference of ``1e-4 / d``). At
    ``d = 0`` the loss has no derivative (``d`` is not differentiable there); we return 0 for
    that pair, which is also what Caffe's formula gives there (``a - b = 0``), so the gradient
    is finite everywhere. A pair exactly at the margin gets 0, as in Caffe (strict ``>``).

    Args:
      a, b: ``(N, ...)`` floating arrays (at least 2 axes, e.g. ``(N, C)``), same shape and dtype.
      similar: ``(N,)`` bool or integer; nonzero marks a similar pair (Caffe's ``int(y) != 0``).
      margin: a real number, Caffe's default 1.0.
      legacy: use Caffe's ``legacy_version`` dissimilar term.

    Returns:
      A scalar of ``a.dtype``.

    Raises:
      TypeError: wrong dtypes, a non-number ``margin``, a non-bool ``legacy``.
      ValueError: shapes that do not fit, a non-finite ``margin``.
    """
    fn = "contrastive"
    a, b, similar = _as_array(a), _as_array(b), _as_array(similar)
    layout = "(N, C) or (N, ...) with at least 2 axes"
    _check_batch_pair(a, b, fn, ("a", "b"), min_rank=2, layout=layout)
    check_same_dtype(a, b, fn=fn, names=("a", "b"))
    if not (jnp.issubdtype(similar.dtype, jnp.integer) or similar.dtype == jnp.bool_):
        raise TypeError(
            f"{fn}: similar must be bool or integer (nonzero = similar pair), got {similar.dtype}"
        )
    if similar.shape != a.shape[:1]:
        raise ValueError(
            f"{fn}: similar shape {similar.shape} must be (N,) = {a.shape[:1]} for a of "
            f"shape {a.shape}"
        )
    margin = check_real(margin, fn=fn, name="margin")
    legacy = check_bool(legacy, fn=fn, name="legacy")
    return _contrastive(jnp.asarray(a), jnp.asarray(b), jnp.asarray(similar), margin, legacy)


def accuracy(
    logits: ArrayLike, labels: ArrayLike, *, top_k: int = 1, ignore_label: int | None = None
) -> Array:
    """Caffe's Accuracy: the fraction of positions whose true class is in the top ``top_k`` (§8).

    Caffe's rule, ties counting against: a position is correct iff
    ``#{k : logits[k] >= logits[label]} <= top_k`` (the true class counts itself). Two equal top
    scores therefore make a position wrong at ``top_k=1``.

    Args:
      logits: ``(N, K)`` or ``(N, H, W, K)`` floating scores (probabilities or logits alike).
      labels: ``(N,)`` or ``(N, H, W)`` integer class indices.
      top_k: int in ``[1, K]``.
      ignore_label: an int; those positions are skipped (neither correct nor counted).

    Returns:
      A float32 scalar ``correct / count`` over the non-ignored positions; 0 when every
      position is ignored; NaN if a non-ignored label is outside ``[0, K)``. A position with a
      NaN score counts as wrong (Caffe's comparison would count it correct). Not
      differentiable (its gradient is zero).

    Raises:
      TypeError: non-floating ``logits``, non-integer ``labels``/``top_k``/``ignore_label``.
      ValueError: shapes that do not fit, ``top_k`` outside ``[1, K]``.
    """
    fn = "accuracy"
    logits, labels = _check_scores_and_labels(logits, labels, fn)
    ignore = _check_ignore_label(ignore_label, fn)
    k = logits.shape[-1]
    top_k = check_int(top_k, fn=fn, name="top_k")
    if not 1 <= top_k <= k:
        raise ValueError(f"{fn}: top_k={top_k} must be in [1, K={k}] for logits {logits.shape}")
    return _accuracy(logits, labels, top_k, ignore)


# --------------------------------------------------------------------------------------------
# private: the computations, jitted (one compile per shape and setting, also when called eagerly)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _softmax_cross_entropy(logits, labels, ignore, normalization, clamp):
    x = logits.astype(acc_dtype(logits.dtype))
    valid, in_range, safe = _label_masks(labels, ignore, x.shape[-1])
    log_p = jax.nn.log_softmax(x, axis=-1)
    nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    if clamp:
        # Caffe's value with log-softmax's gradient, (p - onehot): the clamp is forward-only.
        p = jnp.take_along_axis(jax.nn.softmax(x, axis=-1), safe[..., None], axis=-1)[..., 0]
        caffe = -jnp.log(jnp.maximum(p, jnp.asarray(FLT_MIN, x.dtype)))
        nll = lax.stop_gradient(caffe) + (nll - lax.stop_gradient(nll))
    per = jnp.where(valid, jnp.where(in_range, nll, jnp.nan), 0.0)
    total = jnp.sum(per) / _normalizer(normalization, valid, x.shape[0], x.dtype)
    return total.astype(logits.dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sigmoid_cross_entropy(logits, targets, ignore, normalization):
    x = logits.astype(acc_dtype(logits.dtype))
    t = targets.astype(x.dtype)
    valid = jnp.ones(t.shape, bool) if ignore is None else jnp.trunc(t) != ignore
    per = jnp.where(valid, jax.nn.softplus(x) - x * t, 0.0)
    total = jnp.sum(per) / _normalizer(normalization, valid, x.shape[0], x.dtype)
    return total.astype(logits.dtype)


@jax.jit
def _euclidean(pred, target):
    acc = acc_dtype(pred.dtype)
    # Subtracted in float32: a difference of two close float16 values is exact there.
    diff = pred.astype(acc) - target.astype(acc)
    return (jnp.sum(diff * diff) / (2 * pred.shape[0])).astype(pred.dtype)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _contrastive(a, b, similar, margin, legacy):
    acc = acc_dtype(a.dtype)
    diff = a.astype(acc) - b.astype(acc)
    d2 = jnp.sum(diff * diff, axis=tuple(range(1, a.ndim)))
    if legacy:
        gap = margin - d2
        dissimilar = jnp.where(gap > 0, gap, 0.0)
    else:
        gap = margin - _safe_sqrt(d2)
        dissimilar = jnp.square(jnp.where(gap > 0, gap, 0.0))
    per = jnp.where(similar != 0, d2, dissimilar)
    return (jnp.sum(per) / (2 * a.shape[0])).astype(a.dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _accuracy(logits, labels, top_k, ignore):
    valid, in_range, safe = _label_masks(labels, ignore, logits.shape[-1])
    true_score = jnp.take_along_axis(logits, safe[..., None], axis=-1)
    at_least = jnp.sum(logits >= true_score, axis=-1)
    # NaN compares false with everything, so Caffe's count would call a NaN row correct; a
    # diverged network must not score 1.0, so a position with any NaN score is wrong.
    finite = ~jnp.any(jnp.isnan(logits), axis=-1)
    correct = jnp.sum(valid & finite & (at_least <= top_k)).astype(jnp.float32)
    count = jnp.sum(valid).astype(jnp.float32)
    acc = jnp.where(count > 0, correct / jnp.maximum(count, 1.0), 0.0)
    return jnp.where(jnp.any(valid & ~in_range), jnp.nan, acc)


# --------------------------------------------------------------------------------------------
# private helpers


def _check_scores_and_labels(logits, labels, fn):
    logits, labels = _as_array(logits), _as_array(labels)
    check_float_array(logits, fn=fn, name="logits")
    if logits.ndim not in (2, 4):
        raise ValueError(
            f"{fn}: logits must be (N, K) or (N, H, W, K), got shape {logits.shape} "
            f"(rank {logits.ndim})"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: labels must have an integer dtype (class indices), got {labels.dtype}; "
            "cast with labels.astype(jnp.int32)"
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{fn}: labels shape {labels.shape} does not fit logits shape {logits.shape}: "
            f"expected {logits.shape[:-1]}"
        )
    return jnp.asarray(logits), jnp.asarray(labels)


def _check_batch_pair(x, other, fn, names, *, min_rank=1, layout="(N, ...) with a batch axis"):
    """``x`` floating with at least ``min_rank`` axes, ``other`` of the same shape."""
    check_float_array(x, fn=fn, name=names[0])
    if x.ndim < min_rank:
        got = "a scalar" if x.ndim == 0 else x.shape
        raise ValueError(f"{fn}: {names[0]} must be {layout}, got {got}")
    if other.shape != x.shape:
        raise ValueError(
            f"{fn}: {names[1]} shape {other.shape} must equal {names[0]} shape {x.shape}"
        )


def _label_masks(labels, ignore, num_classes):
    # valid: counted positions; in_range: label is a class index; safe: an index to gather with.
    valid = jnp.ones(labels.shape, bool) if ignore is None else labels != ignore
    in_range = (labels >= 0) & (labels < num_classes)
    safe = jnp.where(in_range, labels, 0)
    return valid, in_range, safe


def _normalizer(mode, valid, batch, dtype):
    if mode == "full":
        n = jnp.asarray(math.prod(valid.shape), dtype)
    elif mode == "valid":
        n = jnp.sum(valid).astype(dtype)
    elif mode == "batch_size":
        n = jnp.asarray(batch, dtype)
    else:
        n = jnp.asarray(1, dtype)
    return jnp.maximum(n, 1)


def _safe_sqrt(x):
    # sqrt with derivative 0 (not inf) at x == 0, so 0 * inf never makes a NaN gradient.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _as_array(x):
    # Keeps the caller's dtype visible to the checks (numpy float64 stays float64).
    return x if hasattr(x, "dtype") and hasattr(x, "shape") else jnp.asarray(x)


def _check_ignore_label(ignore_label, fn):
    if ignore_label is None:
        return None
    if not is_int(ignore_label):
        raise TypeError(f"{fn}: ignore_label={ignore_label!r} must be an int or None")
    return int(ignore_label)
