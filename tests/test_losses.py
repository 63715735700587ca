"""Losses and accuracy (docs/caffe-semantics.md §8) against hand-worked values and numpy
transliterations of Caffe's Forward_cpu/Backward_cpu loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fnlayers.losses import (
    FLT_MIN,
    accuracy,
    contrastive,
    euclidean,
    sigmoid_cross_entropy,
    softmax_cross_entropy,
)

MODES = ("full", "valid", "batch_size", "none")


# ---------------------------------------------------------------------------------------------
# numpy transliterations of Caffe (NCHW loops rewritten over NHWC: outer = N, inner = H*W)


def caffe_normalizer(mode, outer, inner, valid_count):
    n = {"full": outer * inner, "valid": valid_count, "batch_size": outer, "none": 1}[mode]
    return max(1.0, float(n))


def caffe_softmax_loss(logits, labels, ignore_label, mode, dtype=np.float64):
    """SoftmaxWithLossLayer::Forward_cpu and Backward_cpu; ``dtype`` is Caffe's Dtype."""
    n, k = logits.shape[0], logits.shape[-1]
    x = np.asarray(logits, dtype).reshape(n, -1, k)
    lab = np.asarray(labels).reshape(n, -1)
    loss, count = dtype(0), 0
    diff = np.zeros_like(x)
    for i in range(n):
        for j in range(x.shape[1]):
            row = x[i, j]
            p = np.exp(row - row.max())
            p = p / p.sum()
            diff[i, j] = p
            label = int(lab[i, j])
            if ignore_label is not None and label == ignore_label:
                diff[i, j] = 0
                continue
            loss -= np.log(max(p[label], dtype(FLT_MIN)))
            diff[i, j, label] -= 1
            count += 1
    norm = caffe_normalizer(mode, n, x.shape[1], count)
    return loss / norm, (diff / norm).reshape(logits.shape)


def caffe_sigmoid_loss(x, t, ignore_label, mode):
    """SigmoidCrossEntropyLossLayer::Forward_cpu / Backward_cpu in float64."""
    x, t = np.asarray(x, np.float64).ravel(), np.asarray(t, np.float64).ravel()
    loss, valid = 0.0, 0
    diff = 1 / (1 + np.exp(-x)) - t
    for i in range(x.size):
        if ignore_label is not None and int(t[i]) == ignore_label:
            diff[i] = 0
            continue
        pos = float(x[i] >= 0)
        loss -= x[i] * (t[i] - pos) - np.log(1 + np.exp(x[i] - 2 * x[i] * pos))
        valid += 1
    return loss, diff, valid


def caffe_contrastive(a, b, y, margin, legacy):
    """ContrastiveLossLayer::Forward_cpu / Backward_cpu in float64: (loss, d loss / d a)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = a.shape[0]
    diff = a - b
    loss = 0.0
    grad = np.zeros_like(a)
    alpha = 1.0 / num
    for j in range(num):
        d2 = float(diff[j] @ diff[j])
        if int(y[j]):
            loss += d2
            grad[j] = alpha * diff[j]
            continue
        if legacy:
            loss += max(margin - d2, 0.0)
            mdist, beta = margin - d2, -alpha
        else:
            dist = math.sqrt(d2)
            loss += max(margin - dist, 0.0) ** 2
            mdist = margin - dist
            beta = -alpha * mdist / (dist + 1e-4)
        grad[j] = beta * diff[j] if mdist > 0 else 0.0
    return loss / num / 2, grad


def caffe_accuracy(scores, labels, top_k, ignore_label):
    """AccuracyLayer::Forward_cpu."""
    n, k = scores.shape[0], scores.shape[-1]
    s = np.asarray(scores).reshape(n, -1, k)
    lab = np.asarray(labels).reshape(n, -1)
    correct = count = 0
    for i in range(n):
        for j in range(s.shape[1]):
            label = int(lab[i, j])
            if ignore_label is not None and label == ignore_label:
                continue
            better = -1
            for c in range(k):
                if better >= top_k:
                    break
                better += s[i, j, c] >= s[i, j, label]
            correct += better < top_k
            count += 1
    return correct / count if count else 0.0


# ---------------------------------------------------------------------------------------------
# softmax_cross_entropy


def test_softmax_hand_worked():
    # ln 2 for two equal logits; log(1 + e^-1 + e^-2) for [1, 2, 3] with label 2.
    got = softmax_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([0]))
    np.testing.assert_allclose(got, 0.6931471805599453, rtol=1e-6)
    got = softmax_cross_entropy(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([2]))
    np.testing.assert_allclose(got, 0.40760596444438013, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_matches_caffe_per_pixel_every_normalization(rng, mode):
    logits = rng.standard_normal((2, 2, 3, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, (2, 2, 3)).astype(np.int32)
    labels[0, 1, :2] = 255
    labels[1, 0, 2] = 255
    want, want_grad = caffe_softmax_loss(logits, labels, 255, mode)

    def loss(x):
        return softmax_cross_entropy(x, labels, ignore_label=255, normalization=mode)

    np.testing.assert_allclose(loss(logits), want, rtol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(logits), want_grad, rtol=1e-5, atol=1e-7)
    # the normalizers by hand: 12 positions, 3 ignored, N = 2
    norm = {"full": 12, "valid": 9, "batch_size": 2, "none": 1}[mode]
    total, _ = caffe_softmax_loss(logits, labels, 255, "none")
    np.testing.assert_allclose(loss(logits), total / norm, rtol=1e-5)


def test_softmax_default_is_valid_and_no_ignore_counts_all(rng):
    logits = rng.standard_normal((5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0], np.int32)
    want, _ = caffe_softmax_loss(logits, labels, None, "valid")
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels), want, rtol=1e-6)
    # a negative ignore_label works like any other int
    labels[3] = -1
    want, _ = caffe_softmax_loss(logits, labels, -1, "valid")
    np.testing.assert_allclose(
        softmax_cross_entropy(logits, labels, ignore_label=-1), want, rtol=1e-6
    )


def test_softmax_all_ignored_divides_by_one_not_zero():
    logits = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    labels = jnp.array([7, 7])
    loss = softmax_cross_entropy(logits, labels, ignore_label=7)
    assert float(loss) == 0.0
    grad = jax.grad(softmax_cross_entropy)(logits, labels, ignore_label=7)
    np.testing.assert_array_equal(grad, np.zeros((2, 2)))


def test_softmax_extreme_logits_where_caffe_reports_87_3365():
    # Row 0: true class 200 below the other, row 1: 300 below. p(true) underflows float32.
    logits = np.array([[0.0, 200.0], [300.0, 0.0]], np.float32)
    labels = np.array([0, 1], np.int32)
    caffe32, caffe_grad = caffe_softmax_loss(logits, labels, None, "valid", dtype=np.float32)
    np.testing.assert_allclose(caffe32, 87.33654475, rtol=1e-7)  # -ln(FLT_MIN), both rows
    np.testing.assert_allclose(-math.log(FLT_MIN), 87.33654475, rtol=1e-9)

    clamped = softmax_cross_entropy(logits, labels, clamp=True)
    np.testing.assert_allclose(clamped, caffe32, rtol=1e-7)

    ours = softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(ours, (200.0 + 300.0) / 2, rtol=1e-7)  # the true loss
    assert float(ours) > 87.34

    # gradients: finite and Caffe's (p - onehot) / normalizer, with or without the clamp
    np.testing.assert_allclose(caffe_grad, [[-0.5, 0.5], [0.5, -0.5]])
    for clamp in (False, True):
        grad = jax.grad(softmax_cross_entropy)(logits, labels, clamp=clamp)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, caffe_grad, atol=1e-7)


def test_softmax_huge_finite_logits_stay_finite():
    logits = jnp.array([[-1e30, 1e30, 0.0]], jnp.float32)
    loss, grad = jax.value_and_grad(softmax_cross_entropy)(logits, jnp.array([0]))
    np.testing.assert_allclose(loss, 2e30, rtol=1e-6)
    np.testing.assert_allclose(grad, [[-1.0, 1.0, 0.0]])


def test_softmax_clamp_agrees_for_moderate_logits(rng):
    logits = rng.standard_normal((4, 2, 2, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (4, 2, 2)).astype(np.int32)
    np.testing.assert_allclose(
        softmax_cross_entropy(logits, labels, clamp=True),
        softmax_cross_entropy(logits, labels),
        rtol=1e-6,
    )


def test_softmax_out_of_range_label_gives_nan_loss_finite_grad():
    logits = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    labels = jnp.array([0, 2])
    loss, grad = jax.value_and_grad(softmax_cross_entropy)(logits, labels)
    assert np.isnan(loss)
    assert np.all(np.isfinite(grad))
    assert np.isnan(softmax_cross_entropy(logits, jnp.array([-3, 1])))
    # ... unless it is the ignore_label
    assert np.isfinite(softmax_cross_entropy(logits, labels, ignore_label=2))


@pytest.mark.parametrize(("mode", "clamp", "order"), [("valid", False, 2), ("full", True, 1)])
def test_softmax_check_grads(rng, mode, clamp, order):
    logits = rng.standard_normal((2, 2, 2, 3))
    labels = np.array([[[0, 1], [2, -1]], [[-1, 0], [1, 1]]], np.int32)
    with jax.enable_x64():
        loss = jax.jit(
            lambda x: softmax_cross_entropy(
                x, labels, ignore_label=-1, normalization=mode, clamp=clamp
            )
        )
        check_grads(loss, (logits,), order=order, modes=["fwd", "rev"])


def test_softmax_jit_vmap_and_dtype(rng):
    logits = rng.standard_normal((3, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (3, 6)).astype(np.int32)
    f = jax.jit(softmax_cross_entropy, static_argnames=("normalization",))
    one = [softmax_cross_entropy(logits[i], labels[i]) for i in range(3)]
    np.testing.assert_allclose(jax.vmap(softmax_cross_entropy)(logits, labels), one, rtol=1e-6)
    np.testing.assert_allclose(f(logits[0], labels[0], normalization="none"), one[0] * 6, rtol=1e-6)
    bf = softmax_cross_entropy(jnp.asarray(logits[0], jnp.bfloat16), labels[0])
    assert bf.dtype == jnp.bfloat16
    assert bf.shape == ()
    np.testing.assert_allclose(float(bf), float(one[0]), rtol=2e-2)


def test_softmax_bad_input():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="labels must have an integer dtype.*got float32"):
        softmax_cross_entropy(x, np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="labels must have an integer dtype.*got bool"):
        softmax_cross_entropy(x, np.zeros(2, bool))
    with pytest.raises(ValueError, match=r"labels shape \(3,\) does not fit logits shape \(2, 3\)"):
        softmax_cross_entropy(x, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"logits must be \(N, K\) or \(N, H, W, K\), got shape"):
        softmax_cross_entropy(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int32))
    with pytest.raises(TypeError, match="softmax_cross_entropy: logits must have a floating"):
        softmax_cross_entropy(np.zeros((2, 3), np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"normalization='mean' must be one of"):
        softmax_cross_entropy(x, np.zeros(2, np.int32), normalization="mean")
    with pytest.raises(TypeError, match=r"ignore_label=0.5 must be an int or None"):
        softmax_cross_entropy(x, np.zeros(2, np.int32), ignore_label=0.5)
    with pytest.raises(TypeError, match=r"clamp=1 must be a bool"):
        softmax_cross_entropy(x, np.zeros(2, np.int32), clamp=1)


# ---------------------------------------------------------------------------------------------
# sigmoid_cross_entropy


def test_sigmoid_hand_worked_and_stable():
    logits = jnp.array([[0.0, 100.0, -100.0, 2.0]])
    targets = jnp.array([[1.0, 0.0, 1.0, 0.25]])
    # ln 2 + 100 + 100 + (softplus(2) - 0.5), N = 1
    want = math.log(2) + 200 + (math.log1p(math.exp(2)) - 0.5)
    np.testing.assert_allclose(sigmoid_cross_entropy(logits, targets), want, rtol=1e-6)
    grad = jax.grad(sigmoid_cross_entropy)(logits, targets)
    np.testing.assert_allclose(grad, [[-0.5, 1.0, -1.0, 1 / (1 + math.exp(-2)) - 0.25]], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_sigmoid_matches_caffe_every_normalization(rng, mode):
    x = (rng.standard_normal((3, 2, 5)) * 4).astype(np.float32)
    t = rng.uniform(0, 1, (3, 2, 5)).astype(np.float32)
    t[0, 0, :3] = -1.0
    t[2, 1, 4] = -1.7  # int(-1.7) == -1: ignored too, C++ truncation
    total, diff, valid = caffe_sigmoid_loss(x, t, -1, mode)
    assert valid == 26
    norm = caffe_normalizer(mode, 3, 10, valid)

    def loss(x):
        return sigmoid_cross_entropy(x, t, ignore_label=-1, normalization=mode)

    np.testing.assert_allclose(loss(x), total / norm, rtol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(x), (diff / norm).reshape(x.shape), atol=1e-6)


def test_sigmoid_default_batch_size_int_targets_and_check_grads(rng):
    x = rng.standard_normal((4, 3))
    t = rng.integers(0, 2, (4, 3)).astype(np.int32)
    total, _, _ = caffe_sigmoid_loss(x, t, None, "batch_size")
    np.testing.assert_allclose(sigmoid_cross_entropy(x.astype(np.float32), t), total / 4, rtol=1e-5)
    with jax.enable_x64():
        loss = jax.jit(lambda x: sigmoid_cross_entropy(x, t.astype(np.float64)))
        check_grads(loss, (x,), order=1, modes=["fwd", "rev"])
    got = jax.jit(sigmoid_cross_entropy)(x.astype(np.float32), t)
    np.testing.assert_allclose(got, total / 4, rtol=1e-5)


def test_sigmoid_bad_input():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"targets shape \(2, 4\) must equal logits shape \(2, 3\)"
    ):
        sigmoid_cross_entropy(x, np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="logits has dtype float32 but targets has dtype float16"):
        sigmoid_cross_entropy(x, np.zeros((2, 3), np.float16))
    with pytest.raises(TypeError, match="targets must be floating.*got complex64"):
        sigmoid_cross_entropy(x, np.zeros((2, 3), np.complex64))
    with pytest.raises(ValueError, match="logits must be \\(N, ...\\) with a batch axis"):
        sigmoid_cross_entropy(np.float32(1.0), np.float32(1.0))
    with pytest.raises(ValueError, match="normalization='VALID' must be one of"):
        sigmoid_cross_entropy(x, x, normalization="VALID")


# ---------------------------------------------------------------------------------------------
# euclidean


def test_euclidean_hand_worked_and_grads(rng):
    pred = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    target = jnp.zeros((2, 2))
    np.testing.assert_allclose(euclidean(pred, target), (1 + 4 + 9 + 16) / 4)
    ga, gb = jax.grad(euclidean, argnums=(0, 1))(pred, target)
    np.testing.assert_allclose(ga, pred / 2)  # (a - b) / N
    np.testing.assert_allclose(gb, -pred / 2)
    # N is shape[0] only, not the element count
    a, b = rng.standard_normal((3, 2, 2, 5)), rng.standard_normal((3, 2, 2, 5))
    np.testing.assert_allclose(
        euclidean(a.astype(np.float32), b.astype(np.float32)),
        np.sum((a - b) ** 2) / 6,
        rtol=1e-5,
    )
    with jax.enable_x64():
        check_grads(jax.jit(euclidean), (a, b), order=1, modes=["fwd", "rev"])


def test_euclidean_bad_input():
    with pytest.raises(ValueError, match=r"target shape \(2, 3\) must equal pred shape \(3, 2\)"):
        euclidean(np.zeros((3, 2), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="pred has dtype float32 but target has dtype float64"):
        euclidean(np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float64))
    with pytest.raises(TypeError, match="euclidean: pred must have a floating dtype"):
        euclidean(np.zeros(3, np.int32), np.zeros(3, np.int32))


# ---------------------------------------------------------------------------------------------
# contrastive


def test_contrastive_hand_worked():
    a = jnp.zeros((1, 2))
    b = jnp.array([[3.0, 4.0]])  # d = 5, d^2 = 25
    yes, no = jnp.array([1]), jnp.array([0])
    np.testing.assert_allclose(contrastive(a, b, yes), 25 / 2)
    np.testing.assert_allclose(contrastive(a, b, no), 0.0)  # d >= margin 1
    np.testing.assert_allclose(contrastive(a, b, no, margin=6.0), 1 / 2)  # (6 - 5)^2 / 2
    np.testing.assert_allclose(contrastive(a, b, no, margin=30.0, legacy=True), 5 / 2)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_matches_caffe(rng, legacy):
    a = rng.standard_normal((6, 3)).astype(np.float32)
    b = rng.standard_normal((6, 3)).astype(np.float32)
    y = np.array([1, 0, 0, 1, 0, 0], np.int32)
    margin = 2.0 if legacy else 1.5
    want, caffe_grad = caffe_contrastive(a, b, y, margin, legacy)
    d = np.sqrt(np.sum((a.astype(np.float64) - b) ** 2, axis=1))
    dist = d**2 if legacy else d
    # two dissimilar pairs inside the margin, two beyond it
    assert np.sum((y == 0) & (dist < margin)) == 2
    assert np.sum((y == 0) & (dist > margin)) == 2

    def loss(a):
        return contrastive(a, b, y, margin=margin, legacy=legacy)

    np.testing.assert_allclose(loss(a), want, rtol=1e-5)
    grad = np.asarray(jax.grad(loss)(a), np.float64)
    if legacy:
        np.testing.assert_allclose(grad, caffe_grad, rtol=1e-5, atol=1e-7)
    else:
        # ours is the exact derivative; Caffe divides by d + 1e-4 instead of d
        scale = np.where(y == 0, (d + 1e-4) / d, 1.0)[:, None]
        np.testing.assert_allclose(grad, caffe_grad * scale, rtol=1e-5, atol=1e-7)
    # grad wrt b is minus grad wrt a; bool labels work too
    gb = jax.grad(lambda b: contrastive(a, b, y.astype(bool), margin=margin, legacy=legacy))(b)
    np.testing.assert_allclose(gb, -grad, rtol=1e-5, atol=1e-7)


def test_contrastive_gradient_finite_at_zero_distance():
    a = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    b = jnp.array([[1.0, 2.0], [0.0, 0.0]])  # d = 0 for both pairs
    hessian = jax.jit(jax.hessian(contrastive))
    for y in (jnp.array([0, 0]), jnp.array([1, 0])):
        loss, grad = jax.value_and_grad(contrastive)(a, b, y)
        np.testing.assert_allclose(loss, float(jnp.sum(y == 0)) * 1.0 / 4)  # margin^2 / 2N
        np.testing.assert_array_equal(grad, np.zeros((2, 2)))  # Caffe's value there too
        assert np.all(np.isfinite(hessian(a, b, y)))
    _, caffe_grad = caffe_contrastive(a, b, np.array([0, 0]), 1.0, False)
    np.testing.assert_array_equal(caffe_grad, np.zeros((2, 2)))


def test_contrastive_check_grads_and_spatial_features(rng):
    a, b = rng.standard_normal((4, 1, 1, 3)), rng.standard_normal((4, 1, 1, 3))
    y = np.array([1, 0, 0, 1], np.int32)
    with jax.enable_x64():
        for legacy in (False, True):
            loss = jax.jit(
                lambda a, b, legacy=legacy: contrastive(a, b, y, margin=5.0, legacy=legacy)
            )
            check_grads(loss, (a, b), order=1, modes=["fwd", "rev"])
    flat = contrastive(a.reshape(4, 3).astype(np.float32), b.reshape(4, 3).astype(np.float32), y)
    np.testing.assert_allclose(
        jax.jit(contrastive)(a.astype(np.float32), b.astype(np.float32), y), flat, rtol=1e-6
    )


def test_contrastive_bad_input():
    a = np.zeros((3, 2), np.float32)
    with pytest.raises(TypeError, match="similar must be bool or integer.*got float32"):
        contrastive(a, a, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"similar shape \(3, 1\) must be \(N,\) = \(3,\)"):
        contrastive(a, a, np.zeros((3, 1), np.int32))
    with pytest.raises(ValueError, match=r"b shape \(3, 3\) must equal a shape \(3, 2\)"):
        contrastive(a, np.zeros((3, 3), np.float32), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"a must be \(N, C\).*got \(3,\)"):
        contrastive(np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="margin='1' must be a real number"):
        contrastive(a, a, np.zeros(3, np.int32), margin="1")
    with pytest.raises(ValueError, match="margin=inf must be finite"):
        contrastive(a, a, np.zeros(3, np.int32), margin=float("inf"))
    with pytest.raises(TypeError, match="legacy=None must be a bool"):
        contrastive(a, a, np.zeros(3, np.int32), legacy=None)


# ---------------------------------------------------------------------------------------------
# accuracy


def test_accuracy_hand_worked_ties_count_against():
    scores = jnp.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = jnp.array([0, 2, 0])
    # row 0: a tie with class 1 -> wrong at top-1; row 1: class 2 is second; row 2: correct
    np.testing.assert_allclose(accuracy(scores, labels), 1 / 3)
    np.testing.assert_allclose(accuracy(scores, labels, top_k=2), 1.0)
    np.testing.assert_allclose(accuracy(scores, labels, ignore_label=2), 1 / 2)
    assert float(accuracy(scores, labels, ignore_label=0)) == 0.0  # row 1 wrong
    assert float(accuracy(scores, jnp.array([5, 5, 5]), ignore_label=5)) == 0.0  # count 0
    assert np.isnan(accuracy(scores, jnp.array([0, 3, 0])))
    assert accuracy(scores, labels).dtype == jnp.float32


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_accuracy_matches_caffe(rng, top_k):
    # small integer scores make ties common
    scores = rng.integers(0, 3, (4, 3, 2, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (4, 3, 2)).astype(np.int32)
    labels[1, 2, 0] = -1
    want = caffe_accuracy(scores, labels, top_k, -1)
    got = jax.jit(accuracy, static_argnames=("top_k", "ignore_label"))(
        scores, labels, top_k=top_k, ignore_label=-1
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_accuracy_bad_input():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"top_k=4 must be in \[1, K=3\]"):
        accuracy(x, np.zeros(2, np.int32), top_k=4)
    with pytest.raises(ValueError, match=r"top_k=0 must be in \[1, K=3\]"):
        accuracy(x, np.zeros(2, np.int32), top_k=0)
    with pytest.raises(TypeError, match="top_k=1.0 must be an int"):
        accuracy(x, np.zeros(2, np.int32), top_k=1.0)
    with pytest.raises(TypeError, match="accuracy: labels must have an integer dtype"):
        accuracy(x, np.zeros(2, np.float64))
    with pytest.raises(ValueError, match=r"accuracy: labels shape \(2, 1\) does not fit"):
        accuracy(x, np.zeros((2, 1), np.int32))


def test_losses_under_vmap_and_jit(rng):
    # an extra leading axis (an ensemble of models, say) maps over the whole loss
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    t = rng.uniform(0, 1, (2, 3, 4)).astype(np.float32)
    y = np.array([[1, 0, 0], [0, 1, 0]], np.int32)
    labels = rng.integers(0, 4, (2, 3)).astype(np.int32)
    cases = [
        (sigmoid_cross_entropy, (x, t)),
        (euclidean, (x, t)),
        (contrastive, (x, t, y)),
        (accuracy, (x, labels)),
    ]
    for f, args in cases:
        one = [f(*(a[i] for a in args)) for i in range(2)]
        np.testing.assert_allclose(jax.vmap(f)(*args), one, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(f)(*(a[1] for a in args)), one[1], rtol=1e-6)


def test_accuracy_counts_nan_scores_as_wrong():
    logits = jnp.array([[jnp.nan, jnp.nan, jnp.nan], [0.1, 2.0, 0.3]])
    labels = jnp.array([0, 1])
    assert float(accuracy(logits, labels)) == 0.5
