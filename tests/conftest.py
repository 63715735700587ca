"""Shared test setup: strict rank promotion, float64 references in numpy, keys from a fixture."""

import os

# The suite is dominated by XLA compile time (hundreds of small programs), and XLA's backend
# optimisation passes cost most of it; level 0 compiles about twice as fast and computes the
# same functions (tests compare within tolerances, or two runs of the same program). Set before
# jax starts its backend; an XLA_FLAGS that already sets the level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# The references are float32/float64 loops: on GPUs whose float32 products default to TF32 the
# tests would compare against 10-bit mantissas. (No effect on the CPU.)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    """A fresh PRNG key per test; tests split it rather than inventing seeds."""
    return jax.random.key(0)


@pytest.fixture
def rng():
    """A numpy Generator for test data (float64 references are computed from it)."""
    return np.random.default_rng(0)
