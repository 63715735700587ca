"""AdaGrad, RMSProp, AdaDelta and Adam against a numpy float32 transliteration of Caffe's CPU
``SGDSolver::ApplyUpdate`` and each solver's ``ComputeUpdateValue`` (docs/caffe-semantics.md §9)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers.optim as optim
import fnlayers.schedules as schedules

f32 = np.float32
SHAPES = {"conv1/w": (2, 1, 3, 3), "conv1/b": (2,), "ip1/w": (4, 3), "ip1/b": (3,)}


# ------------------------------------------------------------------ Caffe, transliterated


def caffe_adagrad(delta=1e-8):
    delta = f32(delta)

    def compute(diff, h, local_rate, it):
        update = diff**2  # caffe_powx(diff, 2)
        h[0] = update + h[0]  # caffe_add(update, history)
        update = np.sqrt(h[0])
        update = update + delta  # caffe_add_scalar
        update = diff / update  # caffe_div
        return local_rate * update  # caffe_cpu_axpby(local_rate, update, 0, diff)

    return compute, 1


def caffe_rmsprop(rms_decay=0.99, delta=1e-8):
    rms_decay, delta = f32(rms_decay), f32(delta)

    def compute(diff, h, local_rate, it):
        update = diff**2
        h[0] = (f32(1) - rms_decay) * update + rms_decay * h[0]  # caffe_cpu_axpby
        update = np.sqrt(h[0]) + delta
        update = diff / update
        return local_rate * update

    return compute, 1


def caffe_adadelta(momentum=0.9, delta=1e-8):
    momentum, delta = f32(momentum), f32(delta)

    def compute(diff, h, local_rate, it):
        update = diff**2
        h[0] = (f32(1) - momentum) * update + momentum * h[0]
        temp = np.full_like(diff, delta)  # caffe_set
        update = temp + h[1]  # history of updates
        temp = temp + h[0]
        update = update / temp
        update = np.sqrt(update)  # caffe_powx(update, 0.5)
        diff = diff * update  # caffe_mul
        update = diff**2
        h[1] = (f32(1) - momentum) * update + momentum * h[1]
        return local_rate * diff  # caffe_cpu_scale

    return compute, 2


def caffe_adam(momentum=0.9, momentum2=0.999, delta=1e-8):
    beta1, beta2, eps_hat = f32(momentum), f32(momentum2), f32(delta)

    def compute(diff, h, local_rate, it):
        t = it + 1
        # std::pow(float, int) is evaluated in double; the quotient is stored as Dtype.
        correction = f32(math.sqrt(1.0 - float(beta2) ** t) / (1.0 - float(beta1) ** t))
        h[0] = (f32(1) - beta1) * diff + beta1 * h[0]  # val_m
        val_t = diff * diff  # caffe_mul
        h[1] = (f32(1) - beta2) * val_t + beta2 * h[1]  # val_v
        val_t = np.sqrt(h[1])
        val_t = val_t + eps_hat
        val_t = h[0] / val_t
        return (local_rate * correction) * val_t  # caffe_cpu_scale

    return compute, 2


class CaffeSolver:
    """One learnable blob per entry of SHAPES; every array and scalar float32, as Dtype."""

    def __init__(self, params, solver, rate, *, weight_decay=0.0, regularization="L2",
                 lr_mult=None, decay_mult=None, clip_gradients=-1.0, iter_size=1):  # fmt: skip
        self.compute, slots = solver
        self.w = {p: np.array(v, f32) for p, v in params.items()}
        self.h = {p: [np.zeros_like(v) for _ in range(slots)] for p, v in self.w.items()}
        self.rate, self.weight_decay, self.regularization = rate, f32(weight_decay), regularization
        self.lr_mult = lr_mult or dict.fromkeys(SHAPES, 1.0)
        self.decay_mult = decay_mult or dict.fromkeys(SHAPES, 1.0)
        self.clip, self.iter_size = f32(clip_gradients), iter_size
        self.iter = 0

    def step(self, diffs):
        """ApplyUpdate on the accumulated (summed over iter_size) diffs."""
        # A blob with lr_mult 0 gets no backward pass: its diff stays 0.
        diff = {p: np.array(d, f32) * f32(self.lr_mult[p] != 0) for p, d in diffs.items()}
        rate = self.rate(self.iter)  # GetLearningRate
        if self.clip >= 0:  # ClipGradients
            sumsq = f32(0)
            for d in diff.values():
                sumsq = f32(sumsq + np.dot(d.ravel(), d.ravel()))
            l2norm = np.sqrt(sumsq)
            if l2norm > self.clip:
                scale = f32(self.clip / l2norm)
                diff = {p: d * scale for p, d in diff.items()}
        for p in SHAPES:
            if self.iter_size != 1:  # Normalize
                diff[p] = diff[p] * (f32(1) / f32(self.iter_size))
            local_decay = self.weight_decay * f32(self.decay_mult[p])  # Regularize
            if local_decay:
                reg = self.w[p] if self.regularization == "L2" else np.sign(self.w[p])
                diff[p] = local_decay * reg + diff[p]  # caffe_axpy
            local_rate = rate * f32(self.lr_mult[p])
            diff[p] = self.compute(diff[p], self.h[p], local_rate, self.iter)
            self.w[p] = self.w[p] - diff[p]  # Blob::Update
        self.iter += 1


def caffe_step_lr(base_lr, gamma, stepsize):
    # GetLearningRate "step": base_lr * pow(gamma, current_step), in double, stored as Dtype.
    return lambda it: f32(float(f32(base_lr)) * float(f32(gamma)) ** (it // stepsize))


def caffe_inv_lr(base_lr, gamma, power):
    def lr(it):
        return f32(float(f32(base_lr)) * (1.0 + float(f32(gamma)) * it) ** -float(f32(power)))

    return lr


# ------------------------------------------------------------------ helpers


def nest(flat):
    out = {}
    for path, value in flat.items():
        layer, name = path.split("/")
        out.setdefault(layer, {})[name] = jnp.asarray(value, jnp.float32)
    return out


def flat_of(tree):
    return {p: np.asarray(tree[p.split("/")[0]][p.split("/")[1]]) for p in SHAPES}


def random_params(rng):
    params = {p: rng.standard_normal(s).astype(f32) for p, s in SHAPES.items()}
    params["conv1/w"][0, 0, 0, :] = 0.0  # sign(0) = 0 for L1
    return params


def random_grads(rng, steps):
    # Scales from 0.1 to 10: with clip_gradients=17 steps 5 and 6 clip (norms ~24), 1-4 do not.
    return [
        {
            p: (10 ** rng.uniform(-1, 1) * rng.standard_normal(s)).astype(f32)
            for p, s in SHAPES.items()
        }
        for _ in range(steps)
    ]


SOLVERS = {
    "adagrad": (optim.adagrad, caffe_adagrad, {}),
    "rmsprop": (optim.rmsprop, caffe_rmsprop, {"rms_decay": 0.98}),
    "adadelta": (optim.adadelta, caffe_adadelta, {"momentum": 0.95, "delta": 1e-6}),
    "adam": (optim.adam, caffe_adam, {}),
    "adam_beta1_0": (optim.adam, caffe_adam, {"momentum": 0.0}),
}

CONFIGS = {
    # L2 decay, per-parameter multipliers (one leaf frozen), the "step" policy.
    "l2_mults": dict(
        ours=dict(
            learning_rate=schedules.step(0.01, gamma=0.5, stepsize=2),
            weight_decay=5e-3,
            lr_mult={"conv1": {"w": 0.0, "b": 2.0}, "ip1": {"w": 1.0, "b": 2.0}},
            decay_mult={"conv1": {"w": 1.0, "b": 0.0}, "ip1": {"w": 1.0, "b": 0.0}},
        ),
        caffe=dict(
            rate=caffe_step_lr(0.01, 0.5, 2),
            weight_decay=5e-3,
            lr_mult={"conv1/w": 0.0, "conv1/b": 2.0, "ip1/w": 1.0, "ip1/b": 2.0},
            decay_mult={"conv1/w": 1.0, "conv1/b": 0.0, "ip1/w": 1.0, "ip1/b": 0.0},
        ),
    ),
    # L1 decay (sign(0) = 0), clipping of the summed gradient, iter_size, the "inv" policy.
    "l1_clip_iter_size": dict(
        ours=dict(
            learning_rate=schedules.inv(0.02, gamma=0.1, power=0.75),
            weight_decay=1e-2,
            regularization="l1",
            clip_gradients=17.0,
            iter_size=3,
        ),
        caffe=dict(
            rate=caffe_inv_lr(0.02, 0.1, 0.75),
            weight_decay=1e-2,
            regularization="L1",
            clip_gradients=17.0,
            iter_size=3,
        ),
    ),
}


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_matches_caffe_float32_over_six_steps(name, config, rng):
    make, caffe, hyper = SOLVERS[name]
    w0, grads = random_params(rng), random_grads(rng, 6)
    opt = make(**CONFIGS[config]["ours"], **hyper)
    ref = CaffeSolver(w0, caffe(**hyper), **CONFIGS[config]["caffe"])
    params = nest(w0)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for g in grads:
        params, state = update(nest(g), state, params)
        ref.step(g)
        got = flat_of(params)
        for p in SHAPES:
            # A few float32 ulps: XLA's reductions (the clipping norm) sum in another order.
            np.testing.assert_allclose(got[p], ref.w[p], rtol=4e-6, atol=1e-7, err_msg=p)
    assert int(state.iteration) == 6
    frozen = ref.lr_mult["conv1/w"] == 0
    for p in SHAPES:
        if frozen and p == "conv1/w":
            # a frozen parameter and its history are left bit-for-bit unchanged
            np.testing.assert_array_equal(got[p], w0[p])
            for history in state[1:]:
                np.testing.assert_array_equal(flat_of(history)[p], 0.0)
            continue
        for history, want in zip(state[1:], ref.h[p], strict=True):
            np.testing.assert_allclose(flat_of(history)[p], want, rtol=4e-6, atol=1e-12)


@pytest.mark.parametrize(
    ("opt", "want"),
    [
        # h = g^2: the step is rate * g / (|g| + delta)
        (optim.adagrad(0.1), 0.1 * 2 / (2 + 1e-8)),
        # h = 0.01 g^2: the step is rate * g / (0.1 |g|)
        (optim.rmsprop(0.1), 0.1 * 2 / (0.2 + 1e-8)),
        # h = 0.1 g^2, u = g sqrt(delta / (delta + h)); the rate applies to u
        (optim.adadelta(0.1), 0.1 * 2 * math.sqrt(1e-8 / (1e-8 + 0.4))),
        # m = 0.1 g, v = 0.001 g^2, c = sqrt(0.001) / 0.1: the step is rate * sign(g)
        (optim.adam(0.1), 0.1 * math.sqrt(0.001) / 0.1 * 0.2 / (math.sqrt(0.004) + 1e-8)),
    ],
    ids=["adagrad", "rmsprop", "adadelta", "adam"],
)
def test_first_step_by_hand(opt, want):
    params = {"w": jnp.zeros(3, jnp.float32)}
    grads = {"w": jnp.asarray([2.0, -2.0, 0.0], jnp.float32)}
    new, state = jax.jit(opt.update)(grads, opt.init(params), params)
    np.testing.assert_allclose(new["w"], [-want, want, 0.0], rtol=1e-6)
    assert float(opt.learning_rate_at(state)) == pytest.approx(0.1)


def test_adam_bias_correction_tends_to_one_late_in_training():
    opt = optim.adam(0.1)
    params = {"w": jnp.zeros(2, jnp.float32)}
    late = opt.init(params)._replace(iteration=jnp.asarray(10**6, jnp.int32))
    new, state = jax.jit(opt.update)({"w": jnp.asarray([2.0, -2.0])}, late, params)
    # c = 1: the step is rate * m / sqrt(v), with Caffe's float32 betas
    m, v = (1 - float(f32(0.9))) * 2, (1 - float(f32(0.999))) * 4
    step = 0.1 * m / math.sqrt(v)
    np.testing.assert_allclose(new["w"], [-step, step], rtol=1e-6)
    assert int(state.iteration) == 10**6 + 1


@pytest.mark.parametrize(
    ("make", "state_type", "fields"),
    [
        (optim.adagrad, optim.AdaGradState, ("iteration", "history")),
        (optim.rmsprop, optim.RMSPropState, ("iteration", "history")),
        (optim.adadelta, optim.AdaDeltaState, ("iteration", "history", "update_history")),
        (optim.adam, optim.AdamState, ("iteration", "m", "v")),
    ],
)
def test_state_structure(make, state_type, fields):
    opt = make(0.01, iter_size=2)
    assert isinstance(opt, optim.Solver) and opt.iter_size == 2
    assert opt.learning_rate(3) == pytest.approx(0.01)
    params = {"a": {"w": jnp.ones((2, 3), jnp.float32)}, "b": jnp.ones(4, jnp.bfloat16)}
    state = opt.init(params)
    assert type(state) is state_type and state._fields == fields
    assert state.iteration.dtype == jnp.int32 and state.iteration.shape == ()
    for history in state[1:]:
        assert jax.tree.structure(history) == jax.tree.structure(params)
        for h, p in zip(jax.tree.leaves(history), jax.tree.leaves(params), strict=True):
            assert h.shape == p.shape and h.dtype == p.dtype and not np.any(np.asarray(h))
    new_params, new_state = jax.jit(opt.update)(params, state, params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params
    )
    assert type(new_state) is state_type and int(new_state.iteration) == 1
    with pytest.raises(TypeError, match=rf"{make.__name__}.update: state must be the"):
        opt.update(params, optim.sgd(0.1).init(params), params)


def test_defaults_are_caffes():
    # caffe.proto: delta 1e-8, rms_decay 0.99, momentum2 0.999. A zero gradient and zero
    # history make the step depend on nothing but delta being > 0: the parameter stays.
    params = {"w": jnp.ones(2, jnp.float32)}
    for make in (optim.adagrad, optim.rmsprop, optim.adadelta, optim.adam):
        opt = make(0.1)
        new, _ = opt.update({"w": jnp.zeros(2)}, opt.init(params), params)
        np.testing.assert_array_equal(new["w"], 1.0)
    # rms_decay 0.99: after one step of g = 1, history = 1 - 0.99 (in float32, as Caffe's)
    opt = optim.rmsprop(0.1)
    _, state = opt.update({"w": jnp.ones(2)}, opt.init(params), params)
    np.testing.assert_array_equal(state.history["w"], f32(1) - f32(0.99))
    # momentum 0.9, momentum2 0.999: after one step of g = 1, m = 1 - 0.9 and v = 1 - 0.999
    opt = optim.adam(0.1)
    _, state = opt.update({"w": jnp.ones(2)}, opt.init(params), params)
    np.testing.assert_array_equal(state.m["w"], f32(1) - f32(0.9))
    np.testing.assert_array_equal(state.v["w"], f32(1) - f32(0.999))


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (optim.adam, dict(momentum=1.0), ValueError, r"adam: momentum=1.0 must be in \[0, 1\)"),
        (optim.adam, dict(momentum2=-0.1), ValueError, r"adam: momentum2=-0.1 must be >= 0"),
        (optim.adam, dict(delta=0.0), ValueError, r"adam: delta=0.0 must be > 0"),
        (optim.adadelta, dict(momentum=1.5), ValueError, r"adadelta: momentum=1.5 must be in"),
        (optim.adadelta, dict(delta=1e-50), ValueError, r"adadelta: delta=1e-50 must be > 0"),
        (optim.rmsprop, dict(rms_decay=1.0), ValueError, r"rmsprop: rms_decay=1.0 must be in"),
        (optim.rmsprop, dict(delta="1e-8"), TypeError, r"rmsprop: delta='1e-8' must be a real"),
        (optim.adagrad, dict(delta=-1.0), ValueError, r"adagrad: delta=-1.0 must be >= 0"),
        (optim.adagrad, dict(momentum=0.9), TypeError, r"momentum"),
        (optim.rmsprop, dict(iter_size=0), ValueError, r"rmsprop: iter_size=0 must be a positive"),
        (optim.adam, dict(regularization="l3"), ValueError, r"adam: regularization='l3'"),
        (optim.adadelta, dict(lr_mult=2.0), TypeError, r"adadelta: lr_mult=2.0 must be None"),
        (optim.adam, dict(clip_gradients=-1.0), ValueError, r"adam: clip_gradients=-1.0"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make, kwargs, error, message):
    with pytest.raises(error, match=message):
        make(0.1, **kwargs)
    with pytest.raises(ValueError, match=rf"{make.__name__}: learning_rate=-0.1 must be >= 0"):
        make(-0.1)
