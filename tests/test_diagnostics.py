"""Gradient diagnostics: closed-form chains, injected NaNs, activation statistics, fit, example."""

import functools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import data, diagnostics, losses, optim, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chain(*scales, n=2):
    """Dense layers ip0, ip1, ... of width ``n``, no bias, every weight ``scales[i] / n``.

    On ``x = ones((1, n))`` with ``loss = sum(outputs)``, each layer multiplies every unit by
    ``s_i = scales[i]``, so (with ``P`` the product of all ``s_j``) ``h_i = prod_{j<=i} s_j``
    in every unit, ``dL/dh_i = prod_{j>i} s_j``, ``loss = n P`` and ``dL/dW_i`` has every entry
    ``P / s_i``: its norm is ``n P / s_i``, the weight norm is ``s_i``.
    """
    return fl.serial(
        *[
            fl.Dense(n, bias=False, w_init=fl.init.constant(s / n), name=f"ip{i}")
            for i, s in enumerate(scales)
        ]
    )


def sum_loss(outputs, y):
    return jnp.sum(outputs)


@jax.custom_vjp
def _poison(x):
    return x


_poison.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, jnp.nan),))


def poisoned_chain():
    """ip1 -> ip2 -> poison -> ip3: the backward pass turns NaN when it crosses ``poison``, so
    ip3's gradient is finite and ip2's is the first (from the loss) that is not."""
    return fl.serial(
        fl.Dense(4, name="ip1"),
        fl.ReLU(name="relu1"),
        fl.Dense(4, name="ip2"),
        fl.Lambda(_poison, name="poison"),
        fl.Dense(10, name="ip3"),
    )


def test_linear_chain_gradient_norms_match_the_closed_form():
    model = chain(1.0, 0.5, 2.0)
    _, params, state = model.init(jax.random.key(0), (-1, 2))
    x = jnp.ones((1, 2), jnp.float32)
    stats = jax.jit(lambda p: diagnostics.gradient_stats(model, sum_loss, p, state, x, None))(
        params
    )
    # P = 1: grad norms n P / s = (2, 4, 1); weight norms s = (1, 0.5, 2)
    expect = {"grad_norm": (2.0, 4.0, 1.0), "param_norm": (1.0, 0.5, 2.0)}
    expect["ratio"] = (2.0, 8.0, 0.5)
    for what, values in expect.items():
        for name, value in zip(("ip0", "ip1", "ip2"), values, strict=True):
            np.testing.assert_allclose(stats[what][name], value, rtol=1e-6)
    np.testing.assert_allclose(stats["loss"], 2.0, rtol=1e-6)
    # dL/dh_i = prod_{j>i} s_j in each of the 2 units: (1, 2, 1) * sqrt(2)
    for name, value in zip(("ip0", "ip1", "ip2"), (1.0, 2.0, 1.0), strict=True):
        np.testing.assert_allclose(stats["output_grad_norm"][name], value * math.sqrt(2), 1e-6)
    assert all(bool(v) for v in stats["grad_finite"].values())
    # the same through the standalone functions
    grads = jax.grad(lambda p: sum_loss(model.apply(p, state, x)[0], None))(params)
    norms = jax.jit(lambda g: diagnostics.grad_norms(model, g))(grads)
    assert list(diagnostics.grad_norms(model, grads)) == ["ip0", "ip1", "ip2"]
    np.testing.assert_allclose([norms[k] for k in ("ip0", "ip1", "ip2")], [2, 4, 1], rtol=1e-6)


def test_report_flags_the_first_layer_from_the_loss():
    # scales (0.01, 1, 0.01, 1): P = 1e-4, grad norms 2P/s = (0.02, 2e-4, 0.02, 2e-4)
    model = chain(0.01, 1.0, 0.01, 1.0)
    _, params, state = model.init(jax.random.key(0), (-1, 2))
    rep = diagnostics.diagnose(model, sum_loss, params, state, jnp.ones((1, 2)), None)
    np.testing.assert_allclose(list(rep.grad_norm.values()), [0.02, 2e-4, 0.02, 2e-4], 1e-5)
    # ip1 is 100x below ip2: vanishing; ip2 and ip0 are 100x above the next: exploding
    assert rep.vanishing == ("ip1",)
    assert rep.exploding == ("ip2", "ip0")  # backward order: ip2 is reached first
    assert rep.first_exploding == "ip2" and rep.first_vanishing == "ip1"
    assert rep.first_nonfinite is None and not rep.healthy
    np.testing.assert_allclose(list(rep.factors().values()), [0.01, 100.0, 0.01], rtol=1e-5)
    text = str(rep)
    assert "vanishing: first at 'ip1'" in text and "exploding: first at 'ip2'" in text
    assert text.splitlines()[0].split()[:4] == ["layer", "grad_norm", "param_norm", "grad/param"]
    # looser thresholds flag nothing; max_norm flags by size alone
    calm = diagnostics.report(
        model,
        diagnostics.gradient_stats(model, sum_loss, params, state, jnp.ones((1, 2)), None),
        vanish_ratio=0.001,
        explode_ratio=1000.0,
        max_norm=0.01,
    )
    assert calm.vanishing == () and calm.exploding == ("ip2", "ip0")


def test_nan_injected_in_the_backward_pass_is_reported_at_that_layer(key):
    model = poisoned_chain()
    _, params, state = model.init(key, (-1, 6))
    x = jnp.ones((3, 6), jnp.float32)
    y = jnp.array([0, 1, 2], jnp.int32)
    rep = diagnostics.diagnose(model, losses.softmax_cross_entropy, params, state, x, y)
    assert math.isfinite(rep.loss)
    assert rep.grad_finite == {"ip1": False, "ip2": False, "ip3": True}
    assert rep.nonfinite_grads == ("ip2", "ip1") and rep.first_nonfinite == "ip2"
    assert rep.first_exploding == "ip2"
    assert rep.nonfinite_params == () and rep.nonfinite_outputs == ()
    assert "grad non-finite" in str(rep)


def test_nan_parameter_is_reported_at_that_layer(key):
    model = fl.serial(
        fl.Dense(5, name="ip1"), fl.Tanh(name="tanh1"), fl.Dense(5, name="ip2"), fl.Dense(3)
    )
    _, params, state = model.init(key, (-1, 4))
    params["ip2"]["w"] = params["ip2"]["w"].at[1, 2].set(jnp.nan)
    x = jnp.ones((2, 4), jnp.float32)
    rep = diagnostics.diagnose(
        model, losses.softmax_cross_entropy, params, state, x, jnp.array([0, 1])
    )
    assert rep.nonfinite_params == ("ip2",)
    assert rep.nonfinite_outputs[0] == "ip2"  # forward order: the first output that is NaN
    assert rep.activations["tanh1"]["nonfinite_fraction"] == 0.0
    assert rep.activations["ip2"]["nonfinite_fraction"] == pytest.approx(2 * 1 / 10)
    assert "first non-finite output (forward order): 'ip2'" in str(rep)


def test_layer_outputs_reproduce_apply_with_keys_and_state(key):
    model = fl.serial(
        fl.Dense(8, name="ip0"),
        fl.BatchNorm(name="bn1"),
        fl.ReLU(name="relu1"),
        fl.Dropout(0.5, name="drop1"),
        fl.serial(fl.Dense(6, name="ip1"), fl.Dropout(0.3, name="drop2"), name="head"),
        fl.Dense(4, name="ip2"),
    )
    k_init, k_apply = jax.random.split(key)
    _, params, state = model.init(k_init, (-1, 6))
    x = jax.random.normal(k_init, (5, 6), jnp.float32)
    outputs_fn = jax.jit(
        functools.partial(diagnostics.layer_outputs, model), static_argnames="train"
    )
    apply_fn = jax.jit(model.apply, static_argnames="train")
    for train_mode, k in ((True, k_apply), (False, None)):
        outputs, new_state = outputs_fn(params, state, x, key=k, train=train_mode)
        y, expected_state = apply_fn(params, state, x, key=k, train=train_mode)
        np.testing.assert_allclose(outputs["ip2"], y, rtol=1e-6, atol=1e-7)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state, expected_state
        )
    # dropout really drew from the split keys: some units are dropped in training mode
    outputs, _ = outputs_fn(params, state, x, key=k_apply, train=True)
    assert 0 < float(jnp.mean(outputs["drop1"] == 0)) < 1
    assert set(outputs) == {"ip0", "bn1", "relu1", "drop1", "head/ip1", "head/drop2", "ip2"}
    # outside jit (which sorts dict keys) the outputs come in network order
    plain = fl.serial(fl.Tanh(name="z"), fl.serial(fl.ReLU(name="b"), name="y"), fl.Sigmoid())
    _, p, s = plain.init(k_init, (-1, 3))
    assert list(diagnostics.layer_outputs(plain, p, s, jnp.ones((1, 3)))[0]) == [
        "z",
        "y/b",
        "sigmoid_2",
    ]
    with pytest.raises(ValueError, match=r"layer 'drop1'.*PRNG key"):
        diagnostics.layer_outputs(model, params, state, x, train=True)
    with pytest.raises(ValueError, match="must be a serial network"):
        diagnostics.layer_outputs(fl.Dense(3), {}, {}, x)


def test_activation_stats_known_values():
    model = fl.serial(fl.ReLU(name="relu"), fl.Sigmoid(name="sig"), fl.Tanh(name="tanh"))
    empty = {"relu": {}, "sig": {}, "tanh": {}}
    x = jnp.array([[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]], jnp.float32)
    stats = jax.jit(lambda x: diagnostics.activation_stats(model, empty, empty, x, saturation=0.1))(
        x
    )
    relu = stats["relu"]  # [0, 0, 0, 1, 2, 3]
    np.testing.assert_allclose(relu["mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(relu["std"], math.sqrt(14 / 6 - 1), rtol=1e-6)
    assert float(relu["zero_fraction"]) == 0.5 and "saturated_fraction" not in relu
    # sigmoid(3) = 0.9526 > 0.9 is the one saturated value; tanh(sigmoid) stays below 0.9
    np.testing.assert_allclose(stats["sig"]["saturated_fraction"], 1 / 6, rtol=1e-6)
    assert float(stats["tanh"]["saturated_fraction"]) == 0.0
    assert float(stats["sig"]["nonfinite_fraction"]) == 0.0
    big = jnp.array([[-20.0, 20.0, 0.0, 0.1]], jnp.float32)
    for layer in (fl.Sigmoid(name="s"), fl.Tanh(name="s")):  # +-20 saturate, 0 and 0.1 do not
        sat = diagnostics.activation_stats(fl.serial(layer), {"s": {}}, {"s": {}}, big)
        assert float(sat["s"]["saturated_fraction"]) == 0.5
    with pytest.raises(ValueError, match=r"saturation=0.7 must be in \(0, 0.5\)"):
        diagnostics.activation_stats(model, empty, empty, x, saturation=0.7)


def test_statistics_stay_on_device(key):
    # one compiled program, no callbacks to the host inside it
    model = poisoned_chain()
    _, params, state = model.init(key, (-1, 6))
    x, y = jnp.ones((3, 6)), jnp.array([0, 1, 2])
    jaxpr = jax.make_jaxpr(
        lambda p: diagnostics.gradient_stats(model, losses.softmax_cross_entropy, p, state, x, y)
    )(params)
    assert "callback" not in str(jaxpr)
    assert all(aval.shape == () for aval in jaxpr.out_avals)  # only scalars come back


def test_report_argument_errors(key):
    model = chain(1.0, 1.0)
    _, params, state = model.init(key, (-1, 2))
    stats = diagnostics.gradient_stats(model, sum_loss, params, state, jnp.ones((1, 2)), None)
    with pytest.raises(ValueError, match=r"vanish_ratio=1.5 must be in \(0, 1\)"):
        diagnostics.report(model, stats, vanish_ratio=1.5)
    with pytest.raises(ValueError, match="explode_ratio=0.5 must be > 1"):
        diagnostics.report(model, stats, explode_ratio=0.5)
    with pytest.raises(ValueError, match="max_norm=-1.0 must be > 0"):
        diagnostics.report(model, stats, max_norm=-1.0)
    with pytest.raises(ValueError, match="'grad_norm' entry"):
        diagnostics.report(model, {"loss": 1.0})
    with pytest.raises(TypeError, match="must be a fnlayers Layer"):
        diagnostics.grad_norms("net", {})


def test_norms_survive_gradients_beyond_float32_squares():
    # 1e30**2 overflows float32, the norm itself does not: sqrt(3) * 1e30
    model = fl.serial(fl.Dense(3, bias=False, name="ip"))
    grads = {"ip": {"w": jnp.full((1, 3), 1e30, jnp.float32)}}
    np.testing.assert_allclose(diagnostics.grad_norms(model, grads)["ip"], math.sqrt(3) * 1e30)
    grads = {"ip": {"w": jnp.array([[1.0, jnp.inf, 0.0]], jnp.float32)}}
    assert diagnostics.grad_norms(model, grads)["ip"] == jnp.inf
    assert not bool(diagnostics.finite(model, grads)["ip"])


def test_nested_and_shared_layers_are_named_by_path(key):
    inner = fl.serial(fl.Dense(3, name="a"), fl.ReLU(), fl.Dense(3, name="b"), name="trunk")
    model = fl.serial(inner, fl.Dense(2, name="head"))
    _, params, _ = model.init(key, (-1, 4))
    assert diagnostics.param_layers(model, params) == ["trunk/a", "trunk/b", "head"]
    siamese = fl.shared(inner, 2)
    _, sparams, _ = siamese.init(key, ((-1, 4), (-1, 4)))
    assert list(diagnostics.param_norms(siamese, sparams)) == ["a", "b"]


@pytest.fixture(scope="module")
def digits10():
    return data.load_digits(10)


def small_net():
    return fl.serial(
        fl.Dense(16, name="ip1"), fl.ReLU(name="relu1"), fl.Dense(10, name="ip2"), name="net"
    )


def test_fit_records_per_layer_gradient_norms(digits10):
    solver = optim.sgd(0.1, momentum=0.9)
    kw = dict(batch_size=32, iterations=7, seed=4, log_every=5, progress=False)
    xy = (digits10.x_train, digits10.y_train)
    ts, history = train.fit(
        small_net(), losses.softmax_cross_entropy, solver, xy, diagnostics_every=3, **kw
    )
    rows = [r for r in history.records if "grad_norm/ip1" in r]
    assert [r["iteration"] for r in rows] == [1, 3, 6]  # iteration 1, then every 3rd
    assert [r["iteration"] for r in history.records] == [1, 3, 5, 6, 7]
    assert "loss" in history.records[2] and "grad_norm/ip1" not in history.records[2]
    # the first record is the gradient at the initial parameters on the first batch
    model = small_net()
    ts0 = train.create_train_state(model, solver, (-1, 10, 10, 1), jax.random.key(4))
    idx = np.random.default_rng([4, 0]).permutation(len(xy[0]))[:32]
    grads = jax.jit(
        jax.grad(
            lambda p: losses.softmax_cross_entropy(
                model.apply(p, ts0.state, xy[0][idx])[0], xy[1][idx]
            )
        )
    )(ts0.params)
    for name in ("ip1", "ip2"):
        expected = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[name]))))
        assert rows[0][f"grad_norm/{name}"] == pytest.approx(expected, rel=1e-5)
    # diagnostics observe; they do not change the training
    ts_plain, _ = train.fit(small_net(), losses.softmax_cross_entropy, solver, xy, **kw)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        ts.params,
        ts_plain.params,
    )
    with pytest.raises(ValueError, match="diagnostics_every=0 must be None or an int >= 1"):
        train.fit(small_net(), losses.softmax_cross_entropy, solver, xy, diagnostics_every=0, **kw)


def test_fit_names_the_layer_whose_gradient_went_non_finite(digits10):
    with pytest.raises(train.NonFiniteLossError) as e:
        train.fit(
            poisoned_chain(),
            losses.softmax_cross_entropy,
            optim.sgd(0.1),
            (digits10.x_train, digits10.y_train),
            batch_size=32,
            iterations=5,
            progress=False,
        )
    # step 0: finite loss, NaN gradients in ip2 and ip1 -> NaN parameters -> step 1: NaN loss
    assert e.value.iteration == 1
    assert e.value.layer == "ip2" and e.value.layer_iteration == 0
    assert "first went non-finite at iteration 0 in layer 'ip2'" in str(e.value)
    assert "non-finite in: ip2, ip1" in str(e.value)


def test_plot_grad_norms_writes_a_png(tmp_path):
    history = train.History(
        [
            {"iteration": 1, "grad_norm/ip1": 1e-3, "grad_norm/ip2": 0.1},
            {"iteration": 5, "loss": 2.0},
            {"iteration": 10, "grad_norm/ip1": 2e-3, "grad_norm/ip2": float("nan")},
        ]
    )
    path = tmp_path / "g.png"
    assert diagnostics.plot_grad_norms(history, path, title="t") == ["ip1", "ip2"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no record has an entry starting with 'grad_norm/'"):
        diagnostics.plot_grad_norms([{"iteration": 1, "loss": 1.0}], tmp_path / "h.png")


def test_gradient_health_example_quick(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "gradient_health.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for name in ("depth", "bad_init", "batch_norm", "dropout", "momentum", "policies"):
        assert f"=== {name} " in out
    assert "all experiments:" in out
    assert re.search(
        r"NaN loss at step \d+: ip5", out
    )  # the NaN run names the layer nearest the loss
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(
        [
            "bad_init.png",
            "batch_norm.png",
            "depth_profile.png",
            "depth_training.png",
            "dropout.png",
            "momentum.png",
            "policies.png",
        ]
    )
