"""The shared argument checks: one rule for ints, reals and bools everywhere, and messages that
name the function, the argument and its value."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import _checks as checks


@pytest.mark.parametrize("value", [3, np.int32(3), np.int64(3), np.uint8(3)])
def test_ints_are_python_and_numpy_ints(value):
    assert checks.is_int(value)
    got = checks.check_int(value, fn="f", name="n", minimum=1)
    assert got == 3 and type(got) is int
    assert checks.check_positive_int(value, fn="f", name="n") == 3
    assert checks.as_pair(value, fn="f", name="n") == (3, 3)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, np.float32(2), "2", None])
def test_bools_and_floats_are_not_ints(value):
    assert not checks.is_int(value)
    with pytest.raises(TypeError, match=re.escape(f"f: n={value!r} must be an int")):
        checks.check_int(value, fn="f", name="n")
    with pytest.raises(TypeError, match="must be an int or a pair of ints"):
        checks.as_pair(value, fn="f", name="n")
    with pytest.raises(TypeError, match="must be an int or a pair of ints"):
        checks.as_pair((1, value), fn="f", name="n")


def test_int_ranges_name_function_argument_and_value():
    with pytest.raises(ValueError, match=r"^f: n=-1 must be >= 0$"):
        checks.check_int(-1, fn="f", name="n", minimum=0)
    with pytest.raises(ValueError, match=r"^f: n=0 must be a positive int$"):
        checks.check_positive_int(0, fn="f", name="n")
    with pytest.raises(ValueError, match=r"^f: n=0 must be positive$"):
        checks.check_int(0, fn="f", name="n", minimum=1, what="positive")
    with pytest.raises(ValueError, match=r"^f: n=\(2, 0\) must be positive$"):
        checks.as_pair((2, 0), fn="f", name="n", minimum=1)
    assert checks.check_int(-5, fn="f", name="n") == -5  # no minimum: any int


@pytest.mark.parametrize(
    "value", [0, 2, -1.5, np.float32(0.25), np.float64(3.0), np.int16(4), 1e300]
)
def test_reals_are_ints_and_floats(value):
    assert checks.is_real(value)
    got = checks.check_real(value, fn="f", name="r")
    assert got == float(value) and type(got) is float


@pytest.mark.parametrize("value", [True, np.bool_(False), "0.5", None, 1j, [1.0], jnp.ones(())])
def test_bools_strings_and_arrays_are_not_reals(value):
    assert not checks.is_real(value)
    with pytest.raises(TypeError, match=r"^f: r=.* must be a real number$"):
        checks.check_real(value, fn="f", name="r")


def test_real_checks_name_function_argument_and_value():
    with pytest.raises(ValueError, match=r"^f: r=nan must be finite$"):
        checks.check_real(float("nan"), fn="f", name="r")
    with pytest.raises(ValueError, match=r"^f: r=inf must be finite$"):
        checks.check_real(np.inf, fn="f", name="r")
    with pytest.raises(ValueError, match=r"^f: r=-0.5 must be >= 0$"):
        checks.check_real(-0.5, fn="f", name="r", minimum=0)
    with pytest.raises(TypeError, match=r"^f: r='x' must be a number in \(0, 1\)$"):
        checks.check_real("x", fn="f", name="r", what="a number in (0, 1)")


def test_bools():
    assert checks.check_bool(np.bool_(True), fn="f", name="b") is True
    with pytest.raises(TypeError, match=r"^f: b=1 must be a bool$"):
        checks.check_bool(1, fn="f", name="b")
    with pytest.raises(TypeError, match=r"^f: train=None must be a Python bool$"):
        checks.check_bool(None, fn="f", name="train", what="a Python bool")


def test_missing_key():
    checks.check_key(object(), fn="f")
    with pytest.raises(ValueError, match=r"^f: train=True draws random numbers, so it needs a"):
        checks.check_key(None, fn="f")
    err = checks.missing_key_error("Dropout", needs="apply")
    assert "Dropout: train=True draws random numbers, so apply needs a PRNG key" in str(err)
    assert "key=jax.random.key(seed)" in str(err)


def test_accumulation_dtype():
    assert checks.acc_dtype(jnp.bfloat16) == jnp.float32
    assert checks.acc_dtype(jnp.float16) == jnp.float32
    assert checks.acc_dtype(jnp.float32) == jnp.float32
    assert checks.acc_dtype(np.dtype("float64")) == np.float64


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: fl.maxout(jnp.ones((2, 4)), np.int64(2)), None, None),
        (
            lambda: fl.maxout(jnp.ones((2, 4)), True),
            TypeError,
            "maxout: pieces=True must be an int",
        ),
        (lambda: fl.batch_norm_state(np.int32(3)), None, None),
        (lambda: fl.batch_norm_state(True), TypeError, "num_channels=True must be an int"),
        (lambda: fl.lrn(jnp.ones((1, 2, 2, 3)), size=np.int64(3)), None, None),
        (lambda: fl.lrn(jnp.ones((1, 2, 2, 3)), size=True), TypeError, "size=True must be an int"),
        (lambda: fl.relu(jnp.ones(2), True), TypeError, "negative_slope=True must be a real"),
        (lambda: fl.relu(jnp.ones(2), np.float32(0.1)), None, None),
        (lambda: fl.elu(jnp.ones(2), np.inf), ValueError, "elu: alpha=inf must be finite"),
        (lambda: fl.dropout(jnp.ones(2), np.float64(0.5)), None, None),
        (lambda: fl.dropout(jnp.ones(2), 0.5, train=1), TypeError, "train=1 must be a Python"),
        (
            lambda: fl.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 1, 2)), groups=np.int64(2)),
            None,
            None,
        ),
        (
            lambda: fl.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2)), groups=True),
            TypeError,
            "conv2d: groups=True must be an int",
        ),
        (
            lambda: fl.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2)), stride=True),
            TypeError,
            "conv2d: stride=True must be an int or a pair",
        ),
        (
            lambda: fl.accuracy(jnp.ones((2, 3)), jnp.zeros(2, int), top_k=True),
            TypeError,
            "accuracy: top_k=True must be an int",
        ),
        (lambda: fl.accuracy(jnp.ones((2, 3)), jnp.zeros(2, int), top_k=np.int8(2)), None, None),
        (lambda: fl.schedules.step(0.1, 0.5, np.int64(10)), None, None),
        (lambda: fl.schedules.step(0.1, 0.5, True), TypeError, "stepsize=True must be an int"),
        (lambda: fl.schedules.fixed(True), TypeError, "base_lr=True must be a real number"),
        (lambda: fl.data.steps_per_epoch(np.int64(10), 3, drop_last=True), None, None),
        (lambda: fl.data.steps_per_epoch(10, True, drop_last=True), TypeError, "must be an int"),
        (lambda: fl.data.load_digits(test_fraction=True), TypeError, "test_fraction=True must"),
    ],
)
def test_ops_share_the_rules(call, error, message):
    """NumPy ints pass where ints are asked for, and ``True`` passes for neither an int nor a
    real number, in every module."""
    if error is None:
        call()
    else:
        with pytest.raises(error, match=message):
            call()
