"""Caffe's learning-rate policies (docs/caffe-semantics.md §10) against their formulas in
float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers.schedules as schedules

ITERS = [0, 1, 2, 7, 99, 100, 101, 999, 1000, 12345, 99999]


def f32(v):
    # Caffe's SolverParameter stores base_lr, gamma and power as protobuf floats.
    return float(np.float32(v))


# (schedule, float64 formula of Caffe's GetLearningRate on float32 hyperparameters)
CASES = {
    "fixed": (schedules.fixed(0.01), lambda it: f32(0.01)),
    "step": (
        schedules.step(0.01, gamma=0.1, stepsize=100),
        lambda it: f32(0.01) * f32(0.1) ** (it // 100),
    ),
    "exp": (schedules.exp(0.01, gamma=0.9999), lambda it: f32(0.01) * f32(0.9999) ** it),
    "inv": (
        schedules.inv(0.01, gamma=1e-4, power=0.75),
        lambda it: f32(0.01) * (1 + f32(1e-4) * it) ** (-f32(0.75)),
    ),
    "multistep": (
        schedules.multistep(0.1, gamma=0.5, stepvalues=[100, 1000, 20000]),
        lambda it: f32(0.1) * f32(0.5) ** sum(it >= s for s in (100, 1000, 20000)),
    ),
    "poly": (
        schedules.poly(0.01, power=0.9, max_iter=100000),
        lambda it: f32(0.01) * (1 - it / 100000) ** f32(0.9),
    ),
    "sigmoid": (
        schedules.sigmoid(0.01, gamma=0.002, stepsize=1000),
        lambda it: f32(0.01) / (1 + math.exp(-f32(0.002) * (it - 1000))),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_formula_eager_vectorised_and_jit(name):
    schedule, formula = CASES[name]
    # Caffe returns the rate as float: the float64 value rounded to float32 (1e-125 -> 0).
    # atol: XLA flushes float32 subnormals to zero.
    want = np.array([np.float32(formula(it)) for it in ITERS], np.float64)
    tol = {"rtol": 2e-6, "atol": 1.2e-38}
    eager = np.array([schedule(it) for it in ITERS])
    np.testing.assert_allclose(eager, want, **tol)
    vector = schedule(np.array(ITERS, np.int32))
    assert vector.shape == (len(ITERS),)
    assert vector.dtype == jnp.float32
    np.testing.assert_allclose(vector, want, **tol)
    jitted = jax.jit(schedule)
    traced = np.array([jitted(jnp.int32(it)) for it in ITERS])
    np.testing.assert_allclose(traced, want, **tol)
    assert jitted(jnp.int32(3)).shape == ()


def test_schedules_hand_worked():
    np.testing.assert_allclose(schedules.step(0.01, 0.1, 100)(250), 1e-4, rtol=1e-6)
    # Caffe's LeNet solver: inv at iteration 10000 halves (1 + 1)^-0.75
    np.testing.assert_allclose(schedules.inv(0.01, 1e-4, 0.75)(10000), 0.01 * 2**-0.75, rtol=1e-6)
    np.testing.assert_allclose(schedules.exp(1.0, 0.5)(3), 0.125)
    np.testing.assert_allclose(schedules.poly(1.0, power=2.0, max_iter=10)(5), 0.25)
    np.testing.assert_allclose(schedules.sigmoid(0.2, gamma=1.0, stepsize=50)(50), 0.1)
    lr = schedules.multistep(1.0, gamma=0.1, stepvalues=[0, 3])
    np.testing.assert_allclose(lr(np.arange(5)), [0.1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    assert float(schedules.multistep(0.5, 0.1, [])(10**6)) == 0.5


def test_multistep_equals_caffes_stateful_count_from_zero():
    stepvalues = [3, 4, 10, 11, 40]
    lr = jax.jit(schedules.multistep(0.1, gamma=0.5, stepvalues=stepvalues))
    current_step = 0  # SGDSolver::GetLearningRate, called once per iteration from 0
    for it in range(60):
        if current_step < len(stepvalues) and it >= stepvalues[current_step]:
            current_step += 1
        want = f32(0.1) * f32(0.5) ** current_step
        np.testing.assert_allclose(lr(jnp.int32(it)), want, rtol=1e-7)


def test_poly_is_zero_at_and_after_max_iter():
    lr = schedules.poly(0.01, power=1.0, max_iter=100)
    np.testing.assert_allclose(lr(np.array([0, 50, 99])), [0.01, 0.005, 0.0001], rtol=1e-6)
    for f in (lr, jax.jit(lr)):
        assert float(f(100)) == 0.0
        assert float(f(jnp.int32(250))) == 0.0
    assert float(schedules.poly(0.01, power=0.0, max_iter=100)(100)) == np.float32(0.01)


def test_schedules_repr_and_fields():
    s = schedules.step(0.01, gamma=0.1, stepsize=100)
    assert repr(s) == "schedules.step(base_lr=0.01, gamma=0.1, stepsize=100)"
    assert s.policy == "step"
    assert repr(schedules.multistep(0.1, 0.1, [1, 2])).endswith("stepvalues=(1, 2))")


def test_schedule_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"schedules.step: stepsize=0 must be positive"):
        schedules.step(0.01, 0.1, 0)
    with pytest.raises(TypeError, match=r"schedules.step: stepsize=10.0 must be an int"):
        schedules.step(0.01, 0.1, 10.0)
    with pytest.raises(ValueError, match=r"schedules.sigmoid: gamma=-0.1 must be >= 0"):
        schedules.sigmoid(0.01, -0.1, 100)
    with pytest.raises(ValueError, match=r"schedules.sigmoid: stepsize=-5 must be positive"):
        schedules.sigmoid(0.01, 0.1, -5)
    with pytest.raises(ValueError, match=r"schedules.exp: gamma=-0.5 must be >= 0"):
        schedules.exp(0.01, -0.5)
    with pytest.raises(ValueError, match=r"stepvalues=\[10, 5\] must be strictly increasing"):
        schedules.multistep(0.01, 0.1, [10, 5])
    with pytest.raises(ValueError, match=r"stepvalues=\[5, 5\] must be strictly increasing"):
        schedules.multistep(0.01, 0.1, [5, 5])
    with pytest.raises(ValueError, match=r"stepvalues=\[-1, 5\] must be >= 0, got -1"):
        schedules.multistep(0.01, 0.1, [-1, 5])
    with pytest.raises(TypeError, match=r"stepvalues=\[1.5\] must hold ints, got 1.5"):
        schedules.multistep(0.01, 0.1, [1.5])
    with pytest.raises(TypeError, match=r"stepvalues=100 must be a sequence of ints"):
        schedules.multistep(0.01, 0.1, 100)
    with pytest.raises(ValueError, match=r"schedules.poly: max_iter=0 must be positive"):
        schedules.poly(0.01, 1.0, 0)
    with pytest.raises(ValueError, match=r"schedules.poly: power=-1.0 must be >= 0"):
        schedules.poly(0.01, -1.0, 10)
    with pytest.raises(ValueError, match=r"schedules.inv: power=nan must be finite"):
        schedules.inv(0.01, 0.1, float("nan"))
    with pytest.raises(ValueError, match=r"schedules.fixed: base_lr=-0.01 must be >= 0"):
        schedules.fixed(-0.01)
    with pytest.raises(TypeError, match=r"schedules.fixed: base_lr='0.1' must be a real number"):
        schedules.fixed("0.1")


def test_schedule_bad_iteration():
    lr = schedules.inv(0.01, 1e-4, 0.75)
    with pytest.raises(TypeError, match=r"schedules.inv: iteration must be an integer.*float32"):
        lr(jnp.float32(3.0))
    with pytest.raises(TypeError, match=r"schedules.inv: iteration must be an integer.*2.5"):
        lr(2.5)
    with pytest.raises(ValueError, match=r"schedules.inv: iteration=-1 must be >= 0"):
        lr(-1)
