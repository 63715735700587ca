"""The SGD solver against a numpy (float64) transliteration of Caffe's SGDSolver::ApplyUpdate
(docs/caffe-semantics.md §9) and hand-worked updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers.optim as optim
import fnlayers.schedules as schedules

PATHS = ("conv1/b", "conv1/w", "ip1/b", "ip1/w")  # sorted, as tree_flatten orders dict keys
SHAPES = {"conv1/b": (2,), "conv1/w": (3, 3, 1, 2), "ip1/b": (3,), "ip1/w": (4, 3)}


class CaffeSGD:
    """SGDSolver / NesterovSolver, one learnable blob per entry of ``PATHS``."""

    def __init__(self, params, rate, *, momentum=0.0, weight_decay=0.0, regularization="L2",
                 lr_mult=None, decay_mult=None, clip_gradients=-1.0, iter_size=1,
                 nesterov=False):  # fmt: skip
        self.w = {p: np.array(v, np.float64) for p, v in params.items()}
        self.history = {p: np.zeros_like(v) for p, v in self.w.items()}
        self.rate, self.momentum, self.weight_decay = rate, momentum, weight_decay
        self.regularization, self.clip, self.iter_size = regularization, clip_gradients, iter_size
        self.lr_mult = lr_mult or dict.fromkeys(PATHS, 1.0)
        self.decay_mult = decay_mult or dict.fromkeys(PATHS, 1.0)
        self.nesterov = nesterov
        self.iter = 0

    def step(self, diffs):
        """ApplyUpdate on the accumulated (summed over iter_size) diffs."""
        diff = {p: np.array(d, np.float64) for p, d in diffs.items()}
        rate = self.rate(self.iter)  # GetLearningRate
        if self.clip >= 0:  # ClipGradients
            l2norm = np.sqrt(sum(np.sum(d * d) for d in diff.values()))
            if l2norm > self.clip:
                for p in diff:
                    diff[p] = diff[p] * (self.clip / l2norm)
        for p in PATHS:
            if self.iter_size != 1:  # Normalize
                diff[p] = diff[p] * (1.0 / self.iter_size)
            local_decay = self.weight_decay * self.decay_mult[p]  # Regularize
            if local_decay:
                if self.regularization == "L2":
                    diff[p] = diff[p] + local_decay * self.w[p]
                else:
                    diff[p] = diff[p] + local_decay * np.sign(self.w[p])
            local_rate = rate * self.lr_mult[p]  # ComputeUpdateValue
            prev = self.history[p].copy()
            self.history[p] = local_rate * diff[p] + self.momentum * self.history[p]
            if self.nesterov:
                update = (1 + self.momentum) * self.history[p] - self.momentum * prev
            else:
                update = self.history[p]
            self.w[p] = self.w[p] - update  # Blob::Update
        self.iter += 1


def nest(flat):
    out = {}
    for path, value in flat.items():
        layer, name = path.split("/")
        out.setdefault(layer, {})[name] = jnp.asarray(value, jnp.float32)
    return out


def flat_of(tree):
    return {p: np.asarray(tree[p.split("/")[0]][p.split("/")[1]]) for p in PATHS}


def random_params(rng):
    params = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    params["conv1/w"][0, 0, 0, :] = 0.0  # sign(0) = 0 for L1
    return params


def random_grads(rng, steps, scale=1.0):
    return [
        {p: (scale * rng.standard_normal(s)).astype(np.float32) for p, s in SHAPES.items()}
        for _ in range(steps)
    ]


def run_both(opt, ref, params, grads_seq, jit=True):
    update = jax.jit(opt.update) if jit else opt.update
    p, state = nest(params), opt.init(nest(params))
    for grads in grads_seq:
        p, state = update(nest(grads), state, p)
        ref.step(grads)
    return p, state


def assert_close_to_ref(p, state, ref, rtol=2e-5, atol=1e-6):
    for path in PATHS:
        np.testing.assert_allclose(flat_of(p)[path], ref.w[path], rtol=rtol, atol=atol)
        np.testing.assert_allclose(
            flat_of(state.momentum)[path], ref.history[path], rtol=rtol, atol=atol
        )
    assert int(state.iteration) == ref.iter


# ---------------------------------------------------------------------------------------------


def test_hand_worked_momentum_and_nesterov():
    # w = 1, g = 0.5, lr = 0.1, momentum = 0.9: v = 0.05, 0.095; w = 0.95, 0.855
    g, w = jnp.array([0.5]), jnp.array([1.0])
    opt = optim.sgd(0.1, momentum=0.9)
    state = opt.init(w)
    w1, state = opt.update(g, state, w)
    w2, state = opt.update(g, state, w1)
    np.testing.assert_allclose([w1[0], w2[0]], [0.95, 0.855], rtol=1e-6)
    np.testing.assert_allclose(state.momentum, [0.095], rtol=1e-6)
    # Nesterov: diff = 1.9 v - 0.9 v_prev = 0.095, then 1.9*0.095 - 0.9*0.05 = 0.1355
    opt = optim.sgd(0.1, momentum=0.9, nesterov=True)
    state = opt.init(w)
    w1, state = opt.update(g, state, w)
    w2, state = opt.update(g, state, w1)
    np.testing.assert_allclose([w1[0], w2[0]], [0.905, 0.7695], rtol=1e-6)
    # L2 decay 0.1 adds 0.1 * w to the gradient; L1 adds 0.1 * sign(w)
    w = jnp.array([2.0, -3.0, 0.0])
    for reg, want in (("l2", [2 - 0.1 * 0.7, -3 + 0.1 * 0.8, 0.0]), ("l1", [1.94, -2.94, 0.0])):
        opt = optim.sgd(0.1, weight_decay=0.1, regularization=reg)
        got, _ = opt.update(jnp.array([0.5, -0.5, 0.0]), opt.init(w), w)
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("regularization", ["l2", "l1"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_caffe_momentum_decay_schedule(rng, regularization, nesterov):
    params = random_params(rng)
    grads = random_grads(rng, 5)
    lr = schedules.step(0.1, gamma=0.5, stepsize=2)
    opt = optim.sgd(
        lr, momentum=0.9, weight_decay=0.01, regularization=regularization, nesterov=nesterov
    )
    ref = CaffeSGD(
        params,
        lambda it: 0.1 * 0.5 ** (it // 2),
        momentum=0.9,
        weight_decay=0.01,
        regularization=regularization.upper(),
        nesterov=nesterov,
    )
    p, state = run_both(opt, ref, params, grads)
    assert_close_to_ref(p, state, ref)


def test_matches_caffe_with_mults_pytree_function_and_bias_helper(rng):
    params = random_params(rng)
    grads = random_grads(rng, 4)
    lr_mult = {"conv1/b": 2.0, "conv1/w": 1.0, "ip1/b": 2.0, "ip1/w": 0.5}
    decay_mult = {"conv1/b": 0.0, "conv1/w": 1.0, "ip1/b": 0.0, "ip1/w": 3.0}
    ref_args = dict(momentum=0.8, weight_decay=0.05, lr_mult=lr_mult, decay_mult=decay_mult)
    ref = CaffeSGD(params, lambda it: 0.05, **ref_args)
    lr_tree = {"conv1": {"b": 2.0, "w": 1.0}, "ip1": {"b": 2.0, "w": 0.5}}
    as_tree = optim.sgd(
        0.05, momentum=0.8, weight_decay=0.05, lr_mult=lr_tree, decay_mult=nest(decay_mult)
    )
    p, state = run_both(as_tree, ref, params, grads)
    assert_close_to_ref(p, state, ref)

    ref = CaffeSGD(params, lambda it: 0.05, **ref_args)
    as_fn = optim.sgd(
        0.05,
        momentum=0.8,
        weight_decay=0.05,
        lr_mult=lambda path, leaf: lr_mult[optim.path_str(path)],
        decay_mult=optim.by_path({"*/b": 0.0, "ip1/*": 3.0}),
    )
    p, state = run_both(as_fn, ref, params, grads)
    assert_close_to_ref(p, state, ref)

    # the one-line Caffe recipe: biases at lr_mult 2, decay_mult 0
    bias = {p: (2.0 if p.endswith("/b") else 1.0) for p in PATHS}
    no_decay = {p: (0.0 if p.endswith("/b") else 1.0) for p in PATHS}
    ref = CaffeSGD(params, lambda it: 0.05, momentum=0.8, weight_decay=0.05, lr_mult=bias,
                   decay_mult=no_decay)  # fmt: skip
    opt = optim.sgd(0.05, momentum=0.8, weight_decay=0.05, **optim.caffe_bias_mults())
    p, state = run_both(opt, ref, params, grads)
    assert_close_to_ref(p, state, ref)


def test_matches_caffe_with_clipping(rng):
    params = random_params(rng)
    # steps 0 and 2 have a large gradient (clipped), the others a tiny one (left alone)
    grads = random_grads(rng, 4, scale=0.01)
    grads[0] = {p: g * 500 for p, g in grads[0].items()}
    grads[2] = {p: g * 500 for p, g in grads[2].items()}
    norms = [np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs.values())) for gs in grads]
    assert norms[0] > 1.0 > norms[1]
    opt = optim.sgd(0.1, momentum=0.9, weight_decay=0.01, clip_gradients=1.0)
    ref = CaffeSGD(params, lambda it: 0.1, momentum=0.9, weight_decay=0.01, clip_gradients=1.0)
    p, state = run_both(opt, ref, params, grads)
    assert_close_to_ref(p, state, ref)


def test_iter_size_accumulates_then_clips_then_normalises(rng):
    # A linear least-squares model; grads by hand in numpy, accumulated over 3 micro-batches.
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    b0 = rng.standard_normal(3).astype(np.float32)
    xs = rng.standard_normal((3, 5, 4)).astype(np.float32)
    ys = rng.standard_normal((3, 5, 3)).astype(np.float32)

    def loss(params, batch):
        x, y = batch
        r = x @ params["ip1"]["w"] + params["ip1"]["b"][None, :] - y
        return 0.5 * jnp.sum(r * r)

    def numpy_grads(w, b):
        total = {"ip1/w": 0.0, "ip1/b": 0.0}
        for x, y in zip(xs.astype(np.float64), ys, strict=True):
            r = x @ w + b - y
            total["ip1/w"] = total["ip1/w"] + x.T @ r
            total["ip1/b"] = total["ip1/b"] + r.sum(0)
        return total

    params = {"ip1": {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}}
    summed = optim.accumulate_gradients(jax.grad(loss), params, (xs, ys))
    want = numpy_grads(w0.astype(np.float64), b0.astype(np.float64))
    np.testing.assert_allclose(summed["ip1"]["w"], want["ip1/w"], rtol=1e-5)
    np.testing.assert_allclose(summed["ip1"]["b"], want["ip1/b"], rtol=1e-5)
    value, _ = optim.accumulate_gradients(jax.value_and_grad(loss), params, (xs, ys))
    losses = [loss(params, (x, y)) for x, y in zip(xs, ys, strict=True)]
    np.testing.assert_allclose(value, sum(losses), rtol=1e-5)

    clip = 0.5 * float(np.sqrt(sum(np.sum(g**2) for g in want.values())))  # clips the sum
    opt = optim.sgd(0.01, momentum=0.9, weight_decay=0.1, clip_gradients=clip, iter_size=3)
    assert opt.iter_size == 3

    @jax.jit
    def train_step(params, state):
        grads = optim.accumulate_gradients(jax.grad(loss), params, (xs, ys))
        return opt.update(grads, state, params)

    ref_w = {"ip1/w": w0.astype(np.float64), "ip1/b": b0.astype(np.float64)}
    ref_v = {p: np.zeros_like(v) for p, v in ref_w.items()}
    state = opt.init(params)
    for _ in range(3):
        params, state = train_step(params, state)
        # Caffe: sum over iter_size, ClipGradients on the sum, then Normalize by 1/iter_size
        g = numpy_grads(ref_w["ip1/w"], ref_w["ip1/b"])
        norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
        scale = clip / norm if norm > clip else 1.0
        for p in ref_w:
            d = g[p] * scale / 3 + 0.1 * ref_w[p]
            ref_v[p] = 0.01 * d + 0.9 * ref_v[p]
            ref_w[p] = ref_w[p] - ref_v[p]
    np.testing.assert_allclose(params["ip1"]["w"], ref_w["ip1/w"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(params["ip1"]["b"], ref_w["ip1/b"], rtol=2e-5, atol=1e-6)


def test_lr_mult_zero_is_frozen_exactly_even_with_nan_grads(rng):
    params = random_params(rng)
    grads = random_grads(rng, 3, scale=3.0)
    for g in grads:
        g["conv1/w"] = np.full(SHAPES["conv1/w"], np.nan, np.float32)
        g["conv1/b"] = np.full(SHAPES["conv1/b"], 1e30, np.float32)
    lr_mult = optim.by_path({"conv1/*": 0.0})
    opt = optim.sgd(0.1, momentum=0.9, weight_decay=0.01, clip_gradients=2.0, lr_mult=lr_mult)
    # Caffe computes no diff for a frozen blob: zeros, which is what the reference sees
    caffe_grads = [{**g, "conv1/w": np.zeros(SHAPES["conv1/w"]), "conv1/b": np.zeros(2)}
                   for g in grads]  # fmt: skip
    mults = {p: (0.0 if p.startswith("conv1") else 1.0) for p in PATHS}
    ref = CaffeSGD(params, lambda it: 0.1, momentum=0.9, weight_decay=0.01, clip_gradients=2.0,
                   lr_mult=mults)  # fmt: skip
    p, state = nest(params), opt.init(nest(params))
    update = jax.jit(opt.update)
    for g, cg in zip(grads, caffe_grads, strict=True):
        p, state = update(nest(g), state, p)
        ref.step(cg)
    assert_close_to_ref(p, state, ref)
    np.testing.assert_array_equal(p["conv1"]["w"], params["conv1/w"])
    np.testing.assert_array_equal(p["conv1"]["b"], params["conv1/b"])
    np.testing.assert_array_equal(state.momentum["conv1"]["w"], 0.0)


def test_state_structure_stable_and_one_trace(rng):
    params = nest(random_params(rng))
    opt = optim.sgd(schedules.inv(0.01, 1e-4, 0.75), momentum=0.9, nesterov=True)
    traces = []

    def step(grads, state, params):
        traces.append(1)
        return opt.update(grads, state, params)

    jitted = jax.jit(step)
    state = opt.init(params)
    assert isinstance(state, optim.SGDState)
    assert state.iteration.dtype == jnp.int32
    assert state.iteration.shape == ()
    structure = jax.tree.structure(state)
    avals = jax.tree.map(lambda a: (a.shape, a.dtype), state)
    for grads in random_grads(rng, 4):
        params, state = jitted(nest(grads), state, params)
        assert jax.tree.structure(state) == structure
        assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == avals
    assert len(traces) == 1
    assert int(state.iteration) == 4
    np.testing.assert_allclose(opt.learning_rate(state.iteration), 0.01 * 1.0004**-0.75, rtol=1e-6)
    np.testing.assert_allclose(opt.learning_rate_at(state), 0.01 * 1.0004**-0.75, rtol=1e-6)
    np.testing.assert_allclose(optim.sgd(0.5).learning_rate_at(state), 0.5)


def test_eager_and_jit_agree_and_bfloat16_params_keep_dtype(rng):
    params, grads = random_params(rng), random_grads(rng, 2)
    opt = optim.sgd(0.1, momentum=0.9, weight_decay=1e-3)
    eager, _ = run_both(opt, CaffeSGD(params, lambda it: 0.1), params, grads, jit=False)
    jitted, _ = run_both(opt, CaffeSGD(params, lambda it: 0.1), params, grads, jit=True)
    for path in PATHS:
        np.testing.assert_allclose(flat_of(eager)[path], flat_of(jitted)[path], rtol=1e-6)
    w = jnp.ones(3, jnp.bfloat16)
    new, state = opt.update(jnp.ones(3, jnp.bfloat16), opt.init(w), w)
    assert new.dtype == jnp.bfloat16
    assert state.momentum.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new, np.float32), 1 - 0.1 * 1.001, rtol=1e-2)


def test_path_str_and_by_path():
    tree = {"conv1": {"w": 1, "b": 2}, "blocks": [{"w": 3}], "t": (4,)}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    assert [optim.path_str(p) for p, _ in flat] == ["blocks/0/w", "conv1/b", "conv1/w", "t/0"]
    assert optim.path_str(()) == ""
    rule = optim.by_path([("conv1/*", 0.0), ("*w", 3.0)], default=0.5)
    assert [rule(p, leaf) for p, leaf in flat] == [3.0, 0.0, 0.0, 0.5]


def test_sgd_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"sgd: momentum=1.0 must be < 1"):
        optim.sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"sgd: momentum=-0.5 must be >= 0"):
        optim.sgd(0.1, momentum=-0.5)
    with pytest.raises(ValueError, match=r"sgd: weight_decay=-1 must be >= 0"):
        optim.sgd(0.1, weight_decay=-1)
    with pytest.raises(ValueError, match=r"sgd: regularization='L2' must be one of \('l2', 'l1'\)"):
        optim.sgd(0.1, regularization="L2")
    with pytest.raises(TypeError, match=r"sgd: nesterov='yes' must be a bool"):
        optim.sgd(0.1, nesterov="yes")
    with pytest.raises(ValueError, match=r"sgd: clip_gradients=-1 must be >= 0"):
        optim.sgd(0.1, clip_gradients=-1)
    with pytest.raises(ValueError, match=r"sgd: learning_rate=-0.1 must be >= 0"):
        optim.sgd(-0.1)
    with pytest.raises(TypeError, match=r"sgd: learning_rate='0.1' must be a real number or a"):
        optim.sgd("0.1")
    with pytest.raises(ValueError, match=r"sgd: learning_rate=nan must be finite"):
        optim.sgd(float("nan"))
    with pytest.raises(ValueError, match=r"sgd: iter_size=0 must be a positive int"):
        optim.sgd(0.1, iter_size=0)
    with pytest.raises(TypeError, match=r"sgd: iter_size=2.0 must be an int"):
        optim.sgd(0.1, iter_size=2.0)
    with pytest.raises(TypeError, match=r"sgd: lr_mult=2.0 must be None, a pytree of floats"):
        optim.sgd(0.1, lr_mult=2.0)
    with pytest.raises(TypeError, match=r"by_path: each rule must be a \(pattern: str, multi"):
        optim.by_path([(1, 2.0)])
    with pytest.raises(ValueError, match=r"by_path: rules\['\*/b'\]=-2.0 must be >= 0"):
        optim.by_path({"*/b": -2.0})
    with pytest.raises(TypeError, match=r"caffe_bias_mults: name='' must be a non-empty string"):
        optim.caffe_bias_mults(name="")


def test_update_reports_where_trees_differ():
    params = {"conv1": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}, "ip1": {"w": jnp.ones(3)}}
    opt = optim.sgd(0.1, momentum=0.9)
    state = opt.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    missing = {"conv1": {"w": jnp.ones((2, 2))}, "ip1": {"w": jnp.ones(3)}}
    with pytest.raises(ValueError, match=r"sgd.update: grads does not match params: grads has no "
                       r"leaf at 'conv1/b' \(found 'conv1/w'\)"):  # fmt: skip
        opt.update(missing, state, params)
    extra = {**grads, "ip2": {"w": jnp.ones(1)}}
    with pytest.raises(ValueError, match=r"grads has an extra leaf at 'ip2/w'"):
        opt.update(extra, state, params)
    wrong_shape = {**grads, "ip1": {"w": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"grads does not match params at 'ip1/w': shape \(4,\) "
                       r"vs \(3,\)"):  # fmt: skip
        jax.jit(opt.update)(wrong_shape, state, params)
    wrong_dtype = {**grads, "ip1": {"w": jnp.ones(3, jnp.bfloat16)}}
    with pytest.raises(TypeError, match=r"grads at 'ip1/w' has dtype bfloat16 but params has "
                       r"float32"):  # fmt: skip
        opt.update(wrong_dtype, state, params)
    stale = optim.sgd(0.1).init({"conv1": params["conv1"]})
    with pytest.raises(ValueError, match=r"state.momentum does not match params: state.momentum "
                       r"has no leaf at 'ip1/w'"):  # fmt: skip
        opt.update(grads, stale, params)
    with pytest.raises(TypeError, match=r"sgd.update: state must be the SGDState from init"):
        opt.update(grads, {"iteration": 0}, params)
    with pytest.raises(TypeError, match=r"sgd.init: params at 'ip1/w' must be floating"):
        opt.init({"ip1": {"w": jnp.ones(3, jnp.int32)}})


def test_update_reports_bad_multipliers_and_schedules():
    params = {"conv1": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}}
    grads = jax.tree.map(jnp.zeros_like, params)
    bad_tree = optim.sgd(0.1, lr_mult={"conv1": {"w": 1.0}})
    with pytest.raises(ValueError, match=r"lr_mult does not match params: lr_mult has no leaf "
                       r"at 'conv1/b'"):  # fmt: skip
        bad_tree.update(grads, bad_tree.init(params), params)
    negative = optim.sgd(0.1, decay_mult=lambda path, leaf: -1.0)
    with pytest.raises(ValueError, match=r"decay_mult at 'conv1/b'=-1.0 must be >= 0"):
        negative.update(grads, negative.init(params), params)
    not_number = optim.sgd(0.1, lr_mult=lambda path, leaf: "2")
    with pytest.raises(TypeError, match=r"lr_mult at 'conv1/b'='2' must be a real number"):
        not_number.update(grads, not_number.init(params), params)
    vector_lr = optim.sgd(lambda it: jnp.ones(2) * 0.1)
    with pytest.raises(ValueError, match=r"learning_rate\(iteration\) must be a scalar, got shape"):
        vector_lr.update(grads, vector_lr.init(params), params)


def test_accumulate_gradients_bad_micro_batches():
    params = jnp.ones(2)

    def grad_fn(p, b):
        return p * b[0]

    with pytest.raises(ValueError, match=r"'1' has 2, '0' has 3|'0' has 3, '1' has 2"):
        optim.accumulate_gradients(grad_fn, params, (jnp.ones((3, 2)), jnp.ones((2, 2))))
    with pytest.raises(ValueError, match=r"micro_batches has no arrays"):
        optim.accumulate_gradients(grad_fn, params, ())
    with pytest.raises(ValueError, match=r"micro_batches leaf 'x' is a scalar"):
        optim.accumulate_gradients(grad_fn, params, {"x": jnp.float32(1.0)})
    with pytest.raises(ValueError, match=r"micro_batches has 0 micro-batches"):
        optim.accumulate_gradients(grad_fn, params, jnp.ones((0, 2)))
