"""Mixed precision: every op in bfloat16 and float16 against float32, float32 accumulation shown
exactly, master weights, loss scaling, and the layers' param_dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import checkpoint, init, losses, optim, precision, train
from fnlayers.bench import precision as bench
from fnlayers.conv import blocking

LOW = [jnp.bfloat16, jnp.float16]

# The error of an op in a low precision against float32 on the same (rounded) inputs, normwise
# (fnlayers.bench.precision): at most two units of roundoff (2**-8 for bfloat16, 2**-11 for
# float16), what rounding the op's float32 result, and for some ops one intermediate, costs.
TOLERANCE = {jnp.bfloat16: 2 * 2.0**-8, jnp.float16: 2 * 2.0**-11}

# fnlayers.tensor_ops (Caffe's Scale, Bias, BNLL, ...) sum their broadcast gradients in the
# input's dtype: measured in the benchmark, not held to the tolerance here. Nor are three
# variants whose code paths the exact tests below run (stride-phase col2im, two-stage im2col;
# the leaky ReLU is the ReLU's other branch): each case costs three compilations.
SKIPPED = {"conv2d 3x3 stride 2", "conv2d 5x5 (two-stage im2col)", "relu leaky 0.1"}
OPS = [case for case in bench.CASES if not case.tensor_op and case.name not in SKIPPED]


def test_every_op_in_low_precision_is_float32_rounded():
    errors = bench.op_errors(LOW, cases=OPS)
    for dtype in LOW:
        tolerance, by_op = TOLERANCE[dtype], errors[jnp.dtype(dtype).name]
        bad = {name: e for name, e in by_op.items() if max(e) > tolerance}
        assert not bad, f"{jnp.dtype(dtype).name}: (forward, backward) errors > {tolerance}: {bad}"
        # Not vacuous: the ops that round at all differ from float32.
        assert max(max(e) for e in by_op.values()) > tolerance / 16


# ----------------------------------------------------------------------------- exact sums
# Inputs 1 + k/128 (k < 128) are exact in bfloat16, and so are their sums of up to 2**17 terms,
# or of up to 255 products, in float32. An op that accumulates in float32 and rounds once
# therefore returns exactly the float64 result rounded to bfloat16; one that accumulated in
# bfloat16 would round every partial sum.


def _grid(rng, *shape, sign=1.0):
    return sign * (1 + rng.integers(0, 128, shape) / 128)


def _windows(k, stride, out_hw):
    """``(a, b, view)`` for each kernel offset: the index of the strided ``(N, OH, OW, C)``
    view of the (padded) image that offset reads."""
    (oh, ow), s = out_hw, stride
    for a in range(k):
        for b in range(k):
            rows, cols = slice(a, a + s * (oh - 1) + 1, s), slice(b, b + s * (ow - 1) + 1, s)
            yield a, b, (slice(None), rows, cols)


def _conv_ones(x, dy, b, k, stride, pad):
    """conv2d of x with a ``(k, k, C, 1)`` weight of ones and bias ``b``: the output, and the
    gradients of the input, the weight and the bias for the output gradient ``dy``."""
    _, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_hw = dy.shape[1:3]
    y, dxp, dw = np.zeros(dy.shape), np.zeros_like(xp), np.zeros((k, k, c, 1))
    for a, bb, view in _windows(k, stride, out_hw):
        y[..., 0] += xp[view].sum(-1)
        dxp[view] += dy
        dw[a, bb, :, 0] = (xp[view] * dy).sum((0, 1, 2))
    return y + b, (dxp[:, pad : pad + h, pad : pad + w], dw, dy.sum((0, 1, 2)))


def _pool_reference(x, dy, k, kind):
    """Stride-1, unpadded AVE or MAX pooling of x and its input gradient for ``dy``."""
    out_hw = dy.shape[1:3]
    if kind == "ave":
        y, dx = np.zeros(dy.shape), np.zeros_like(x)
        for _, _, view in _windows(k, 1, out_hw):
            y += x[view] / k**2
            dx[view] += dy / k**2
        return y, (dx,)
    n, oh, ow, c = dy.shape
    y, dx = np.zeros(dy.shape), np.zeros_like(x)
    for i in range(oh):
        for j in range(ow):
            window = x[:, i : i + k, j : j + k, :].reshape(n, k * k, c)
            first = window.argmax(1)  # the first maximum in row-major order, as Caffe
            y[:, i, j] = window.max(1)
            for m in range(n):
                for ch in range(c):
                    a, b = divmod(first[m, ch], k)
                    dx[m, i + a, j + b, ch] += dy[m, i, j, ch]
    return y, (dx,)


def _exact_cases():
    """``name -> (fn, inputs, cotangent, (output, gradients))``, references in float64."""
    rng = np.random.default_rng(0)
    g = lambda *s: _grid(rng, *s)
    cases = {}
    x, w, b, dy = g(100, 100), g(100, 100), g(100), g(100, 100)
    # every output and gradient element sums 100 products (the bias gradient 100 values)
    cases["dense"] = (fl.dense, (x, w, b), dy, (x @ w + b, (dy @ w.T, x.T @ dy, dy.sum(0))))
    for impl in ("im2col", "xla"):
        # outputs sum 200 inputs, input gradients 25 output gradients (col2im), weight
        # gradients 128 products
        x, dy = g(2, 8, 8, 8), g(2, 8, 8, 1)
        conv = lambda x, w, impl=impl: fl.conv2d(x, w, padding=2, impl=impl)
        y, (dx, dw, _) = _conv_ones(x, dy, 0.0, 5, 1, 2)
        cases[f"conv2d {impl}"] = (conv, (x, np.ones((5, 5, 8, 1))), dy, (y, (dx, dw)))
    # col2im by stride phase, and the bias gradient. (The bias is added to the rounded product,
    # so this output is rounded twice: not compared.)
    x, b, dy = g(2, 9, 9, 4), g(1), g(2, 5, 5, 1)
    conv = lambda x, w, b: fl.conv2d(x, w, b, stride=2, padding=3)
    _, grads = _conv_ones(x, dy, b, 7, 2, 3)
    cases["conv2d stride 2"] = (conv, (x, np.ones((7, 7, 4, 1)), b), dy, (None, grads))
    # the transposed convolution of x is the input gradient of a convolution with output x
    x, dy = g(2, 6, 6, 1), g(2, 12, 12, 1)
    img = np.zeros((2, 12, 12, 1))
    y, (dx_conv, _, _) = _conv_ones(img, x, 0.0, 7, 1, 0)
    deconv_dx, _ = _conv_ones(dy, np.zeros((2, 6, 6, 1)), 0.0, 7, 1, 0)
    cases["conv_transpose2d"] = (
        lambda x, w: fl.conv_transpose2d(x, w),
        (x, np.ones((7, 7, 1, 1))),
        dy,
        (dx_conv, (deconv_dx,)),
    )
    x, dy = g(2, 12, 12, 3), g(2, 5, 5, 3)
    cases["avg_pool 8"] = (lambda x: fl.avg_pool(x, 8), (x,), dy, _pool_reference(x, dy, 8, "ave"))
    x, dy = g(2, 10, 10, 3), g(2, 6, 6, 3)
    x[:, 4, 5, :] = 4.0  # a peak inside 25 windows: its gradient sums 25 values
    cases["max_pool 5"] = (lambda x: fl.max_pool(x, 5), (x,), dy, _pool_reference(x, dy, 5, "max"))
    x = g(2, 8, 8, 3)
    cases["global_avg_pool"] = (fl.global_avg_pool, (x,), None, (x.mean((1, 2), keepdims=True), ()))
    x, alpha, dy = _grid(rng, 2, 6, 6, 3, sign=-1.0), g(3), g(2, 6, 6, 3)
    prelu_grads = (dy * alpha, (dy * x).sum((0, 1, 2)))
    cases["prelu"] = (fl.prelu, (x, alpha), dy, (alpha * x, prelu_grads))
    # BatchNorm in evaluation with a running mean 0 and variance 1 is the identity, so its
    # output is x * scale + shift and the parameter gradients sum 72 products and values.
    bn = fl.BatchNorm(eps=0.0)
    state = {"mean_acc": np.zeros(3), "var_acc": np.ones(3), "scale_factor": np.ones(1)}
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state)
    affine = lambda x, s, t: bn.apply({"scale": s, "shift": t}, state, x)[0]
    x, scale, shift, dy = g(2, 6, 6, 3), g(3), g(3), g(2, 6, 6, 3)
    bn_grads = (dy * scale, (dy * x).sum((0, 1, 2)), dy.sum((0, 1, 2)))
    cases["BatchNorm affine"] = (affine, (x, scale, shift), dy, (x * scale + shift, bn_grads))
    pred, target = g(8, 16), g(8, 16)
    loss = ((pred - target) ** 2).sum() / 16
    grads = ((pred - target) / 8, (target - pred) / 8)
    cases["euclidean"] = (fl.euclidean, (pred, target), None, (loss, grads))
    return cases


EXACT = _exact_cases()


def test_sums_accumulate_in_float32_and_round_once():
    # bfloat16, whose 8-bit significand shows any low-precision partial sum; float16 takes the
    # same code paths (fnlayers._checks.acc_dtype).
    dtype = jnp.bfloat16
    names = list(EXACT)

    @jax.jit
    def run(inputs, cotangents):
        results = []
        for name, xs, ct in zip(names, inputs, cotangents, strict=True):
            out, vjp = jax.vjp(EXACT[name][0], *xs)
            results.append((out, vjp(jnp.ones(out.shape, out.dtype) if ct is None else ct)))
        return results

    low = lambda a: None if a is None else jnp.asarray(a, dtype)
    inputs = [[low(a) for a in EXACT[n][1]] for n in names]
    results = run(inputs, [low(EXACT[n][2]) for n in names])
    wrong = []
    for name, (out, grads) in zip(names, results, strict=True):
        want_out, *want_grads = EXACT[name][3]
        # the gradients listed (a case may leave out some inputs' gradients)
        pairs = [] if want_out is None else [("output", out, want_out)]
        pairs += [(f"gradient {i}", grads[i], g) for i, g in enumerate(*want_grads)]
        for what, got, want in pairs:
            assert got.dtype == dtype, (name, what)
            rounded = np.asarray(want, np.float32).astype(dtype).astype(np.float32)
            mismatches = int(np.sum(np.asarray(got, np.float32) != rounded))
            if mismatches:
                wrong.append(f"{name} {what}: {mismatches} of {rounded.size} elements")
    assert not wrong, "not the exact sum rounded once: " + "; ".join(wrong)


def test_tiled_convolution_sums_its_blocks_weight_gradients_in_float32(monkeypatch):
    # 16 examples, half an example per block: the weight gradient is 32 blocks' partial sums
    # (each rounded once to bfloat16) added in float32, within 1.5 units in the last place of
    # the exact sum; a bfloat16 running sum would round 32 times.
    rng = np.random.default_rng(1)
    x, w, dy = _grid(rng, 16, 8, 8, 8), _grid(rng, 5, 5, 8, 4), _grid(rng, 16, 8, 8, 4)
    monkeypatch.setattr(blocking, "_tile_for_cache", lambda: True)
    monkeypatch.setattr(blocking, "_TILE_ABOVE_BYTES", 0)
    monkeypatch.setattr(blocking, "_BLOCK_BYTES", 8 * 8 * 25 * 8 * 2)
    plan = blocking.plan_blocks(x.shape, 5, padding=2, dtype=jnp.bfloat16)
    assert plan.tiled and plan.blocks == 32
    xb, wb, dyb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, dy))
    _, vjp = jax.vjp(lambda w: fl.conv2d(xb, w, padding=2), wb)
    (dw,) = vjp(dyb)
    xp = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    exact = np.zeros(w.shape)
    for a, b, view in _windows(5, 1, (8, 8)):
        exact[a, b] = np.einsum("nhwc,nhwo->co", xp[view], dy)
    ulp = 2.0 ** (np.floor(np.log2(exact)) - 7)
    assert np.max(np.abs(np.asarray(dw, np.float64) - exact) / ulp) <= 1.5


def test_float32_params_with_low_precision_inputs_are_still_an_error(key):
    # Outside a policy nothing casts silently: the op names both dtypes.
    net = fl.serial(fl.Conv2D(4, 3, name="conv1"))
    _, params, state = net.init(key, (-1, 8, 8, 2))
    x = jnp.zeros((1, 8, 8, 2), jnp.bfloat16)
    with pytest.raises(
        TypeError,
        match=r"conv1: conv2d: x has dtype bfloat16 but w has dtype "
        r"float32; cast one of them",
    ):
        net.apply(params, state, x)
    with pytest.raises(TypeError, match="dense: x has dtype float16 but w has dtype float32"):
        fl.dense(jnp.zeros((2, 3), jnp.float16), jnp.zeros((3, 4)))


# ----------------------------------------------------------------------------- param_dtype


def test_layers_create_their_params_in_param_dtype(key, tmp_path):
    bf16 = jnp.bfloat16
    net = fl.serial(
        fl.Conv2D(4, 3, param_dtype=bf16, name="conv"),
        fl.BatchNorm(param_dtype=bf16, name="bn"),
        fl.PReLU(param_dtype=bf16, name="prelu"),
        fl.Deconv2D(2, 2, stride=2, param_dtype="bfloat16", name="deconv"),
        fl.Dense(3, param_dtype=bf16, name="ip"),
    )
    _, params, state = net.init(key, (-1, 6, 6, 2))
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(bf16)}
    # the running statistics stay float32 (BatchNorm's docstring says why)
    assert {a.dtype for a in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
    y, _ = jax.jit(net.apply, static_argnames="train")(
        params, state, jnp.ones((2, 6, 6, 2), bf16), key=key, train=True
    )
    assert y.dtype == bf16
    assert "param_dtype=bfloat16" in repr(net)
    # checkpoints keep the dtype, with or without a template
    checkpoint.save(tmp_path / "p.npz", params)
    for loaded in (
        checkpoint.load(tmp_path / "p.npz"),
        checkpoint.load(tmp_path / "p.npz", like=params),
    ):
        assert {a.dtype for a in jax.tree.leaves(loaded)} == {jnp.dtype(bf16)}
        jax.tree.map(np.testing.assert_array_equal, loaded, params)
    _, default, _ = fl.Dense(3).init(key, (-1, 4))
    assert {a.dtype for a in jax.tree.leaves(default)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("bad", [jnp.int32, "int8", object()])
def test_param_dtype_must_be_floating(bad):
    with pytest.raises(TypeError, match=r"Dense: param_dtype=.* must be a floating dtype"):
        fl.Dense(3, param_dtype=bad)


# ----------------------------------------------------------------------------- master weights


def _tiny(w0=1.0):
    return fl.serial(fl.Dense(1, bias=False, w_init=init.constant(w0), name="ip"))


def _sum_loss(outputs, y):
    return jnp.mean((outputs[:, 0] - y) ** 2)


def test_master_weights_stay_float32_and_take_updates_below_bfloat16s_resolution(key):
    # w = 1 has bfloat16 neighbours 1 - 2**-8 and 1 + 2**-7; an SGD step of about 1e-4 is lost
    # in a bfloat16 weight and kept in the float32 master weight.
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, (8, 4)), jnp.float32)
    y = jnp.zeros((8,), jnp.float32)
    lr = 1e-5
    opt = optim.sgd(lr)
    model = _tiny()
    ts = train.create_train_state(model, opt, (-1, 4), key)
    step = train.make_train_step(model, _sum_loss, opt, compute_dtype=jnp.bfloat16, donate=False)
    new, out = step(ts, x, y)
    assert out["loss"].dtype == jnp.float32
    for tree in (new.params, new.opt_state, new.state):
        for a in jax.tree.leaves(tree):
            if jnp.issubdtype(a.dtype, jnp.floating):
                assert a.dtype == jnp.float32

    # The gradient the step used: d loss / d w through the bfloat16 forward pass, in float32.
    def policy_loss(w):
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        return _sum_loss(fl.dense(xb, wb).astype(jnp.float32), y)

    grad = jax.grad(policy_loss)(ts.params["ip"]["w"])
    assert grad.dtype == jnp.float32
    w_new = new.params["ip"]["w"]
    np.testing.assert_array_equal(w_new, ts.params["ip"]["w"] - np.float32(lr) * grad)
    change = np.abs(np.asarray(w_new) - 1.0)
    assert np.all(change > 0) and np.all(change < 2.0**-9)
    # A static scale of a power of two changes no bit: the backward pass computes 2**12 times
    # the same values, and the division is exact.
    scaled = train.make_train_step(
        model, _sum_loss, opt, compute_dtype=jnp.bfloat16, loss_scale=2.0**12, donate=False
    )
    new_scaled, out_scaled = scaled(ts, x, y)
    np.testing.assert_array_equal(new_scaled.params["ip"]["w"], w_new)
    assert "loss_scale" not in out_scaled and new_scaled.loss_scale is None
    # The same step on bfloat16 weights rounds the update away.
    model16 = fl.serial(
        fl.Dense(1, bias=False, w_init=init.constant(1.0), param_dtype=jnp.bfloat16, name="ip")
    )
    ts16 = train.create_train_state(model16, opt, (-1, 4), key)
    step16 = train.make_train_step(model16, _sum_loss, opt, compute_dtype=jnp.bfloat16)
    new16, _ = step16(ts16, x, y)
    np.testing.assert_array_equal(np.asarray(new16.params["ip"]["w"], np.float32), 1.0)


def test_evaluation_and_predict_run_in_the_compute_dtype(key):
    model = fl.serial(fl.Dense(8, name="ip1"), fl.Tanh(), fl.Dense(3, name="ip2"))
    _, params, state = model.init(key, (-1, 5))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = rng.integers(0, 3, 6).astype(np.int32)
    bf16 = precision.cast_floating
    by_hand, _ = model.apply(bf16(params, jnp.bfloat16), state, jnp.asarray(x, jnp.bfloat16))
    by_hand = np.asarray(by_hand, np.float32)
    out = train.predict(model, params, state, x, batch_size=4, compute_dtype=jnp.bfloat16)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, by_hand)
    step = train.make_eval_step(model, losses.softmax_cross_entropy, compute_dtype="bfloat16")
    metrics = step(params, state, x, y)
    assert metrics["loss"].dtype == jnp.float32
    want = losses.softmax_cross_entropy(jnp.asarray(by_hand), jnp.asarray(y))
    np.testing.assert_array_equal(metrics["loss"], want)


# ----------------------------------------------------------------------------- loss scaling


def test_update_loss_scale_halves_on_overflow_and_grows_after_the_interval():
    rule = precision.DynamicLossScale(init_scale=8.0, growth_interval=3)
    state = precision.loss_scale_state(rule)
    scales = []
    for finite in [True, True, False, True, True, True, True, False, False]:
        state = precision.update_loss_scale(rule, state, jnp.bool_(finite))
        scales.append((float(state.scale), int(state.good_steps)))
    assert scales == [(8, 1), (8, 2), (4, 0), (4, 1), (4, 2), (8, 0), (8, 1), (4, 0), (2, 0)]
    # growth stops short of float32's overflow
    top = precision.LossScaleState(jnp.float32(2.0**127), jnp.int32(2))
    assert float(precision.update_loss_scale(rule, top, jnp.bool_(True)).scale) == 2.0**127


def test_dynamic_scaling_skips_an_overflowing_step_and_recovers(key):
    # float16 backward of d(loss)/dw = x * scale / N: x = 1e4 with a scale of 1024 overflows
    # float16 (65504); x ~ 1 does not.
    rule = precision.DynamicLossScale(init_scale=1024.0, growth_interval=3)
    opt = optim.sgd(0.01, momentum=0.9)
    model = _tiny(0.5)
    ts = train.create_train_state(model, opt, (-1, 4), key, loss_scale=rule)
    step = train.make_train_step(
        model, _sum_loss, opt, compute_dtype=jnp.float16, loss_scale=rule, donate=False
    )
    rng = np.random.default_rng(0)
    normal = lambda: jnp.asarray(rng.uniform(0.5, 1.0, (4, 4)), jnp.float32)
    y = jnp.zeros((4,), jnp.float32)
    ts, out = step(ts, normal(), y)
    assert int(out["skipped_steps"]) == 0 and float(out["loss_scale"]) == 1024
    before = ts
    ts, out = step(ts, jnp.full((4, 4), 1e4, jnp.float32), y)
    assert int(out["skipped_steps"]) == 1 and np.isfinite(float(out["loss"]))
    assert float(ts.loss_scale.scale) == 512 and int(ts.loss_scale.good_steps) == 0
    for new, old in ((ts.params, before.params), (ts.opt_state, before.opt_state)):
        jax.tree.map(np.testing.assert_array_equal, new, old)  # the counter included
    assert not np.array_equal(jax.random.key_data(ts.key), jax.random.key_data(before.key))
    for expected in (512, 512, 1024):  # three finite steps: the scale doubles
        ts, out = step(ts, normal(), y)
        assert int(out["skipped_steps"]) == 0 and float(out["loss_scale"]) == expected
    assert int(ts.opt_state.iteration) == 4  # four updates in five steps


def test_a_dynamic_scale_needs_its_state_in_the_train_state(key):
    opt = optim.sgd(0.1)
    model = _tiny()
    ts = train.create_train_state(model, opt, (-1, 4), key)
    step = train.make_train_step(model, _sum_loss, opt, loss_scale="dynamic")
    with pytest.raises(
        ValueError,
        match=r"loss_scale=DynamicLossScale.* keeps its scale in the "
        r"train state, and this one has loss_scale=None",
    ):
        step(ts, jnp.ones((2, 4)), jnp.zeros((2,)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(compute_dtype=jnp.int8), ValueError, r"compute_dtype=.*int8.* must be one of"),
        (dict(compute_dtype="half-ish"), TypeError, r"compute_dtype='half-ish' must be a dtype"),
        (dict(loss_scale="auto"), ValueError, r"loss_scale='auto' must be 'dynamic' or a number"),
        (dict(loss_scale=0.0), ValueError, r"loss_scale=0.0 must be positive"),
        (dict(loss_scale=True), TypeError, r"loss_scale=True must be None, 'dynamic'"),
        (dict(loss_scale=float("inf")), ValueError, r"loss_scale=inf must be finite"),
    ],
)
def test_policy_arguments_are_checked_at_the_entry(kwargs, error, match):
    with pytest.raises(error, match="make_train_step: " + match):
        train.make_train_step(_tiny(), _sum_loss, optim.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(init_scale=0.0), "init_scale=0.0 must be positive"),
        (dict(growth_interval=0), "growth_interval=0 must be >= 1"),
        (dict(growth_factor=1.0), "growth_factor=1.0 must be > 1"),
        (dict(backoff_factor=1.0), r"backoff_factor=1.0 must be in \(0, 1\)"),
    ],
)
def test_dynamic_loss_scale_checks_its_rule(kwargs, match):
    with pytest.raises(ValueError, match="DynamicLossScale: " + match):
        precision.DynamicLossScale(**kwargs)


def test_cast_floating_leaves_integers_and_keys_alone(key):
    tree = {"w": jnp.ones(2), "n": jnp.arange(2), "k": key, "h": np.ones(2, np.float32)}
    cast = precision.cast_floating(tree, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["h"].dtype == jnp.bfloat16
    assert cast["n"].dtype == jnp.int32 and cast["k"] is key
    assert bool(precision.all_finite(tree))
    assert not bool(precision.all_finite({"a": jnp.array([1.0, jnp.inf]), "n": jnp.arange(2)}))
