"""The optimizer protocol: sgd satisfies it, optax-style transformations are adapted by
from_optax (and refused bare by check_optimizer), and update rules lift to pytrees."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import losses, optim, schedules, train
from fnlayers.optim.rules import apply_rule
from fnlayers.optim.solver import SolverSettings, make_solver


class GradientTransformation(NamedTuple):
    """optax's GradientTransformation, written out: update returns updates, not parameters."""

    init: Any
    update: Any


def chain(*txs):
    def init(params):
        return tuple(tx.init(params) for tx in txs)

    def update(updates, state, params=None):
        new_state = []
        for tx, s in zip(txs, state, strict=True):
            updates, s = tx.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def stateless(fn):
    return GradientTransformation(lambda params: (), lambda u, s, p=None: (fn(u, p), s))


def scale(step):
    return stateless(lambda u, p: jax.tree.map(lambda g: step * g, u))


def add_decayed_weights(decay):
    return stateless(lambda u, p: jax.tree.map(lambda g, w: g + np.float32(decay) * w, u, p))


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def clip_by_global_norm(clip):
    # Caffe's ClipGradients (the optax one rounds differently)
    def fn(u, p):
        norm = optax_global_norm(u)
        factor = jnp.where(norm > clip, clip / jnp.where(norm > clip, norm, 1.0), 1.0)
        return jax.tree.map(lambda g: g * factor, u)

    return stateless(fn)


def trace(decay):
    """optax.trace: t = g + decay * t, the update is t."""

    def update(updates, state, params=None):
        t = jax.tree.map(lambda g, t: g + np.float32(decay) * t, updates, state)
        return t, t

    return GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params), update)


def optax_sgd(learning_rate, momentum):
    """optax.sgd: the rate applied after the momentum buffer."""
    return chain(trace(momentum), scale(-learning_rate))


def problem(rng):
    """A least-squares layer: params, and the gradient function of its loss."""
    x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    params = {
        "ip1": {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "b": jnp.zeros(3)},
    }

    def loss(p):
        r = x @ p["ip1"]["w"] + p["ip1"]["b"][None, :] - y
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))

    return params, jax.grad(loss), loss


def train_steps(opt, params, grad_fn, steps=6, jit=True):
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(params)
    for _ in range(steps):
        params, state = update(grad_fn(params), state, params)
    return params, state


# ---------------------------------------------------------------------------------------------


def test_sgd_satisfies_the_protocol():
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    opt = optim.sgd(schedules.step(0.1, gamma=0.5, stepsize=2), momentum=0.9, nesterov=True)
    assert isinstance(opt, optim.Optimizer)
    assert isinstance(opt, optim.Solver)
    assert optim.check_optimizer(opt, fn="fit") is opt
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    rates = []
    for _ in range(3):
        rates.append(float(jax.jit(opt.learning_rate_at)(state)))
        params, state = opt.update(grads, state, params)
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.05], rtol=1e-6)
    assert int(state.iteration) == 3

    hand_made = optim.Optimizer(opt.init, opt.update)
    assert hand_made.learning_rate_at is None
    assert optim.check_optimizer(hand_made, fn="fit") is hand_made
    with pytest.raises(TypeError, match=r"Optimizer: update=3 must be a function"):
        optim.Optimizer(opt.init, 3)
    with pytest.raises(TypeError, match=r"Optimizer: learning_rate_at=0.1 must be a function or"):
        optim.Optimizer(opt.init, opt.update, 0.1)


def test_check_optimizer_refuses_optax_style_and_other_objects():
    tx = optax_sgd(0.1, momentum=0.9)
    with pytest.raises(TypeError, match=r"fit: optimizer is a GradientTransformation with init "
                       r"and update but not an fnlayers optimizer.*returns the updates.*"
                       r"fl\.optim\.from_optax\(tx\)"):  # fmt: skip
        optim.check_optimizer(tx, fn="fit")
    with pytest.raises(TypeError, match=r"make_train_step: optimizer must be an fnlayers "
                       r"optimizer \(fl.optim.Optimizer.*got object$"):  # fmt: skip
        optim.check_optimizer(object(), fn="make_train_step")
    with pytest.raises(TypeError, match=r"got function \(a function: call it"):
        optim.check_optimizer(optim.sgd, fn="fit")
    with pytest.raises(TypeError, match=r"fit: solver must be"):
        optim.check_optimizer(None, fn="fit", name="solver")
    assert isinstance(optim.check_optimizer(optim.from_optax(tx), fn="fit"), optim.Optimizer)


def test_from_optax_trains_like_sgd(rng):
    params, grad_fn, loss = problem(rng)
    want, sgd_state = train_steps(optim.sgd(0.1, momentum=0.9), params, grad_fn)
    # optax's order (rate after the momentum buffer) agrees up to rounding...
    got, state = train_steps(optim.from_optax(optax_sgd(0.1, momentum=0.9)), params, grad_fn)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    assert isinstance(state, optim.OptaxState)
    assert int(state.iteration) == int(sgd_state.iteration) == 6
    assert loss(got) < 0.5 * loss(params)
    # ...and Caffe's (rate inside the buffer, the buffer negated) exactly, op by op; compiled,
    # XLA may fuse a multiply-add differently in the two programs (1 ulp).
    tx = chain(scale(-0.1), trace(0.9))
    got, _ = train_steps(optim.from_optax(tx), params, grad_fn)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    want, _ = train_steps(optim.sgd(0.1, momentum=0.9), params, grad_fn, jit=False)
    got, _ = train_steps(optim.from_optax(tx), params, grad_fn, jit=False)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_from_optax_chain_with_clipping_and_decay_is_caffe_sgd(rng):
    params, grad_fn, _ = problem(rng)

    def grads(p):  # large enough to be clipped
        return jax.tree.map(lambda g: 50 * g, grad_fn(p))

    assert optax_global_norm(grads(params)) > 1.0
    opt = optim.sgd(0.05, momentum=0.8, weight_decay=0.01, clip_gradients=1.0)
    tx = chain(clip_by_global_norm(1.0), add_decayed_weights(0.01), scale(-0.05), trace(0.8))
    want, _ = train_steps(opt, params, grads, jit=False)
    got, _ = train_steps(optim.from_optax(tx), params, grads, jit=False)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_from_optax_learning_rate_at():
    params = {"w": jnp.ones(3)}
    tx = scale(-0.1)
    assert optim.from_optax(tx).learning_rate_at is None
    opt = optim.from_optax(tx, learning_rate=0.1)
    state = opt.init(params)
    np.testing.assert_allclose(jax.jit(opt.learning_rate_at)(state), 0.1)
    opt = optim.from_optax(tx, learning_rate=schedules.step(0.1, gamma=0.1, stepsize=1))
    state = opt.init(params)
    for want in (0.1, 0.01, 0.001):
        np.testing.assert_allclose(opt.learning_rate_at(state), want, rtol=1e-6)
        params, state = opt.update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(params["w"], 1 - 0.3, rtol=1e-6)


def test_from_optax_keeps_parameter_dtypes():
    # apply_updates: params + updates, cast back to each parameter's dtype
    params = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(2)}
    tx = stateless(lambda u, p: jax.tree.map(lambda g: g.astype(jnp.float32) * -0.5, u))
    opt = optim.from_optax(tx)
    new, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
    assert new["a"].dtype == jnp.bfloat16 and new["b"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(new["a"], np.float32), 0.5)


def test_from_optax_errors():
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    with pytest.raises(TypeError, match=r"from_optax: tx must be an optax-style Gradient.*got "
                       r"object"):  # fmt: skip
        optim.from_optax(object())
    with pytest.raises(TypeError, match=r"from_optax: tx is already an fnlayers optimizer"):
        optim.from_optax(optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"from_optax: learning_rate=-1.0 must be >= 0"):
        optim.from_optax(scale(-0.1), learning_rate=-1.0)
    opt = optim.from_optax(scale(-0.1))
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"from_optax.update: grads does not match params: "
                       r"grads has no leaf at 'b'"):  # fmt: skip
        opt.update({"w": jnp.ones(3)}, state, params)
    with pytest.raises(TypeError, match=r"from_optax.update: state must be the OptaxState"):
        opt.update(params, (), params)
    drops_b = optim.from_optax(stateless(lambda u, p: {"w": u["w"]}))
    with pytest.raises(ValueError, match=r"tx's updates does not match params: tx's updates has "
                       r"no leaf at 'b'"):  # fmt: skip
        drops_b.update(params, drops_b.init(params), params)


def test_from_optax_in_a_train_step_learns_as_sgd(key):
    model = fl.serial(fl.Flatten(name="flat"), fl.Dense(3, name="ip1"))
    x = jax.random.normal(jax.random.key(1), (8, 2, 2, 1))
    y = jnp.arange(8) % 3
    results = []
    for opt in (
        optim.sgd(0.1, momentum=0.9),
        optim.from_optax(optax_sgd(0.1, 0.9), learning_rate=0.1),
    ):
        ts = train.create_train_state(model, opt, (-1, 2, 2, 1), key)
        step = train.make_train_step(model, losses.softmax_cross_entropy, opt, donate=False)
        history = []
        for _ in range(5):
            ts, metrics = step(ts, x, y)
            history.append(float(metrics["loss"]))
        assert float(metrics["lr"]) == pytest.approx(0.1)
        results.append((ts.params, history))
    (want, want_loss), (got, got_loss) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    assert got_loss[-1] < got_loss[0]


def sign_rule(g, w, v, *, rate, decay_mult):
    """signSGD with a running count of steps per parameter, as a per-array rule."""
    return w - rate * jnp.sign(g), (v + 1,)


def test_apply_rule_lifts_a_leaf_rule_over_the_tree():
    params = {"a": jnp.array([1.0, -1.0]), "b": [jnp.ones(2, jnp.bfloat16), jnp.ones(1)]}
    grads = {"a": jnp.array([2.0, -3.0]), "b": [jnp.ones(2, jnp.bfloat16), jnp.ones(1)]}
    counts = jax.tree.map(jnp.zeros_like, params)
    lr_mult = {"a": 2.0, "b": [1.0, 0.0]}  # b/1 frozen
    new, (new_counts,) = apply_rule(
        sign_rule, grads, params, {"counts": counts}, rate=jnp.float32(0.5), lr_mult=lr_mult,
        where="sign.update",
    )  # fmt: skip
    np.testing.assert_array_equal(new["a"], [0.0, 0.0])
    assert new["b"][0].dtype == jnp.bfloat16 and new_counts["b"][0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new["b"][0], np.float32), [0.5, 0.5])
    np.testing.assert_array_equal(new["b"][1], params["b"][1])
    assert jax.tree.map(lambda c: c.tolist(), new_counts) == {"a": [1, 1], "b": [[1, 1], [0]]}


def test_apply_rule_reports_trees_that_do_not_match():
    params = {"a": jnp.ones(2), "b": {"c": jnp.ones(3)}}
    counts = jax.tree.map(jnp.zeros_like, params)

    def run(grads=params, slots=counts, rule=sign_rule, **kw):
        return apply_rule(rule, grads, params, {"state.counts": slots}, rate=jnp.float32(0.1),
                          where="sign.update", **kw)  # fmt: skip

    with pytest.raises(ValueError, match=r"sign.update: grads does not match params: grads has no "
                       r"leaf at 'b/c' \(found 'b/d'\)"):  # fmt: skip
        run(grads={"a": jnp.ones(2), "b": {"d": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"grads has an extra leaf at 'z'"):
        run(grads={**params, "z": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"grads does not match params at 'b/c': shape \(2,\) vs "
                       r"\(3,\)"):  # fmt: skip
        run(grads={"a": jnp.ones(2), "b": {"c": jnp.ones(2)}})
    with pytest.raises(TypeError, match=r"grads at 'a' has dtype int32 but params has float32"):
        run(grads={**params, "a": jnp.ones(2, jnp.int32)})
    with pytest.raises(ValueError, match=r"state.counts does not match params: state.counts has "
                       r"no leaf at 'b/c'"):  # fmt: skip
        run(slots={"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"lr_mult does not match params: lr_mult has no leaf"):
        run(lr_mult={"a": 1.0})
    with pytest.raises(TypeError, match=r"sign.update: params at 'a' must be floating"):
        apply_rule(sign_rule, params, {**params, "a": jnp.ones(2, jnp.int32)}, {"c": counts},
                   rate=jnp.float32(0.1), where="sign.update")  # fmt: skip
    with pytest.raises(TypeError, match=r"sign.update: the update rule must return \(new_w, "
                       r"new_slots\) with a tuple of 1 slots, got list"):  # fmt: skip
        run(rule=lambda g, w, v, *, rate, decay_mult: (w, [v]))


def test_make_solver_runs_a_caffe_rule_adagrad(rng):
    """Caffe's AdaGradSolver as a short rule: history += g^2; w -= rate * g / (sqrt(h) + delta)."""

    class AdaGradState(NamedTuple):
        iteration: jax.Array
        history: Any

    def adagrad_rule(g, w, h, *, rate, iteration):
        h = h + g * g
        return w - rate * g / (jnp.sqrt(h) + np.float32(1e-8)), (h,)

    settings = SolverSettings.checked(
        "adagrad", weight_decay=0.1, regularization="l2", clip_gradients=None,
        lr_mult={"w": 1.0, "b": 2.0}, decay_mult={"w": 1.0, "b": 0.0}, iter_size=2,
    )  # fmt: skip
    opt = make_solver("adagrad", lambda it: jnp.float32(0.1), settings, AdaGradState, adagrad_rule)
    w0 = {"w": rng.standard_normal(3), "b": rng.standard_normal(2)}
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), w0)
    state = opt.init(params)
    ref = {k: v.copy() for k, v in w0.items()}
    hist = {k: np.zeros_like(v) for k, v in w0.items()}
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape) for k, v in w0.items()}
        params, state = jax.jit(opt.update)(
            jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), grads), state, params
        )
        for k, lr_mult, decay_mult in (("w", 1.0, 1.0), ("b", 2.0, 0.0)):
            g = grads[k] / 2 + 0.1 * decay_mult * ref[k]
            hist[k] += g * g
            ref[k] -= 0.1 * lr_mult * g / (np.sqrt(hist[k]) + 1e-8)
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-5)
        np.testing.assert_allclose(state.history[k], hist[k], rtol=1e-5)
    assert int(state.iteration) == 3
    assert opt.iter_size == 2
    with pytest.raises(TypeError, match=r"adagrad.update: state must be the AdaGradState"):
        opt.update(params, optim.sgd(0.1).init(params), params)
