"""Shared test setup: strict rank promotion, float64 references in numpy, keys from a fixture."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    """A fresh PRNG key per test; tests split it rather than inventing seeds."""
    return jax.random.key(0)


@pytest.fixture
def rng():
    """A numpy Generator for test data (float64 references are computed from it)."""
    return np.random.default_rng(0)
