"""Mixed precision: a compute dtype for the forward and backward passes, float32 master weights,
and loss scaling (docs/mixed-precision.md).

A *compute dtype* (``jnp.bfloat16`` or ``jnp.float16``) is what :func:`fnlayers.train.fit` and
:func:`fnlayers.train.make_train_step` run the model in: every step casts the float32 parameters
and the floating inputs to it with :func:`cast_floating`, runs forward and backward there (the
ops accumulate their products, sums and normalisations in float32), and casts the model's
outputs to float32 for the loss and the metrics. The cast sits inside the differentiated
function, so the gradients come back float32, and the optimizer updates the float32 parameters
(the *master weights*) in float32.

float16's smallest subnormal is ``2**-24`` (6e-8): smaller gradients of the backward pass become
zero. *Loss scaling* multiplies the loss by a scale before the backward pass, so the backward
pass computes ``scale * gradient``, and divides the float32 gradients by it afterwards:

* a number: a static scale, the same every step;
* ``"dynamic"`` or a :class:`DynamicLossScale`: the scale lives in the train state
  (:class:`LossScaleState`, checkpointed with it). A step whose gradients are not all finite is
  skipped (the parameters, the optimizer state with its iteration counter, and the model state
  stay as they were) and the scale is multiplied by ``backoff_factor``; after
  ``growth_interval`` finite steps in a row it is multiplied by ``growth_factor``
  (:func:`update_loss_scale`; PyTorch's ``GradScaler`` rule and defaults).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers._checks import check_int, check_real, is_real

__all__ = [
    "COMPUTE_DTYPES",
    "DynamicLossScale",
    "LossScaleState",
    "all_finite",
    "cast_floating",
    "check_compute_dtype",
    "check_loss_scale",
    "loss_scale_state",
    "update_loss_scale",
]

#: The compute dtypes a policy accepts, by name (float32 runs unchanged).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """The rule of a dynamic loss scale (``loss_scale="dynamic"`` is this with its defaults).

    Attributes:
      init_scale: the first scale, a positive number (default ``2**15``).
      growth_interval: finite steps in a row after which the scale grows (default 2000).
      growth_factor: what the scale is multiplied by then, > 1 (default 2).
      backoff_factor: what it is multiplied by after a step with non-finite gradients, in
        ``(0, 1)`` (default 0.5).

    Powers of two keep ``scale * gradient`` and its division exact.
    """

    init_scale: float = 2.0**15
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    def __post_init__(self):
        fn = "DynamicLossScale"
        if check_real(self.init_scale, fn=fn, name="init_scale") <= 0:
            raise ValueError(f"{fn}: init_scale={self.init_scale!r} must be positive")
        check_int(self.growth_interval, fn=fn, name="growth_interval", minimum=1)
        if check_real(self.growth_factor, fn=fn, name="growth_factor") <= 1:
            raise ValueError(f"{fn}: growth_factor={self.growth_factor!r} must be > 1")
        if not 0 < check_real(self.backoff_factor, fn=fn, name="backoff_factor") < 1:
            raise ValueError(f"{fn}: backoff_factor={self.backoff_factor!r} must be in (0, 1)")


class LossScaleState(NamedTuple):
    """A dynamic loss scale's state, carried in ``TrainState.loss_scale`` (a pytree).

    Attributes:
      scale: the scale the next step multiplies its loss by, a float32 scalar.
      good_steps: finite steps in a row since the scale last changed, an int32 scalar.
    """

    scale: jax.Array
    good_steps: jax.Array


def check_compute_dtype(compute_dtype, *, fn: str) -> np.dtype | None:
    """``compute_dtype`` as a NumPy dtype (None stays None).

    Raises:
      TypeError: not a dtype (``jnp.bfloat16``, ``"float16"``, ``np.float32``, ...).
      ValueError: a dtype other than bfloat16, float16 or float32.
    """
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(
            f"{fn}: compute_dtype={compute_dtype!r} must be a dtype such as jnp.bfloat16"
        ) from None
    if dtype.name not in COMPUTE_DTYPES:
        raise ValueError(
            f"{fn}: compute_dtype={compute_dtype!r} must be one of {COMPUTE_DTYPES} (or None)"
        )
    return dtype


def check_loss_scale(loss_scale, *, fn: str) -> float | DynamicLossScale | None:
    """``loss_scale`` as a policy takes it: None (no scaling), a positive float (static), or a
    :class:`DynamicLossScale` (``"dynamic"`` gives the defaults).

    Raises:
      TypeError: anything else (bools are not numbers).
      ValueError: a number that is not finite and positive, or a string other than
        ``"dynamic"``.
    """
    if loss_scale is None or isinstance(loss_scale, DynamicLossScale):
        return loss_scale
    if isinstance(loss_scale, str):
        if loss_scale != "dynamic":
            raise ValueError(f"{fn}: loss_scale={loss_scale!r} must be 'dynamic' or a number")
        return DynamicLossScale()
    if not is_real(loss_scale):
        raise TypeError(
            f"{fn}: loss_scale={loss_scale!r} must be None, 'dynamic', a DynamicLossScale or a "
            "positive number"
        )
    if check_real(loss_scale, fn=fn, name="loss_scale") <= 0:
        raise ValueError(f"{fn}: loss_scale={loss_scale!r} must be positive")
    return float(loss_scale)


def loss_scale_state(loss_scale) -> LossScaleState | None:
    """The initial :class:`LossScaleState` of a dynamic ``loss_scale``; None for a static scale
    or none (they keep nothing from step to step)."""
    loss_scale = check_loss_scale(loss_scale, fn="loss_scale_state")
    if not isinstance(loss_scale, DynamicLossScale):
        return None
    return LossScaleState(jnp.float32(loss_scale.init_scale), jnp.int32(0))


def update_loss_scale(
    rule: DynamicLossScale, state: LossScaleState, finite: jax.Array
) -> LossScaleState:
    """The state after a step whose gradients were all finite (``finite`` True) or not.

    Not finite: ``scale * backoff_factor``, the count back to 0. Finite: the count goes up by
    one; when it reaches ``growth_interval`` the scale is multiplied by ``growth_factor`` (unless
    that would overflow float32) and the count goes back to 0.
    """
    good = state.good_steps + 1
    grow = finite & (good >= rule.growth_interval)
    grown = state.scale * jnp.float32(rule.growth_factor)
    scale = jnp.where(grow & jnp.isfinite(grown), grown, state.scale)
    scale = jnp.where(finite, scale, state.scale * jnp.float32(rule.backoff_factor))
    good = jnp.where(finite & ~grow, good, 0).astype(state.good_steps.dtype)
    return LossScaleState(scale.astype(state.scale.dtype), good)


def cast_floating(tree: Any, dtype) -> Any:
    """``tree`` with every floating leaf cast to ``dtype``; integer, bool and PRNG key leaves
    (labels, counters, keys) unchanged."""

    def cast(leaf):
        if isinstance(leaf, jax.Array | np.ndarray | np.generic) and jnp.issubdtype(
            leaf.dtype, jnp.floating
        ):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)


def all_finite(tree: Any) -> jax.Array:
    """A bool scalar: whether every element of every floating leaf of ``tree`` is finite."""
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


# ----------------------------------------------------------------------------- the train step's
# policy: what fnlayers.train does with compute_dtype and loss_scale.


@dataclasses.dataclass(frozen=True)
class _Policy:
    """A compute dtype (None: run in the parameters' own dtypes) and a loss scale (None, a
    static float, or a :class:`DynamicLossScale`)."""

    compute_dtype: np.dtype | None = None
    loss_scale: float | DynamicLossScale | None = None

    @property
    def dynamic(self) -> bool:
        return isinstance(self.loss_scale, DynamicLossScale)

    def cast_in(self, tree):
        """Parameters or inputs as the model computes with them."""
        return tree if self.compute_dtype is None else cast_floating(tree, self.compute_dtype)

    def cast_out(self, tree):
        """The model's outputs as the loss and the metrics see them: float32 under a compute
        dtype, so that softmax, log-softmax and the loss's sums run in float32."""
        return tree if self.compute_dtype is None else cast_floating(tree, jnp.float32)

    def scale(self, state: LossScaleState | None, fn: str) -> jax.Array | None:
        """The scale of this step's loss (None: unscaled)."""
        if self.loss_scale is None:
            return None
        if not self.dynamic:
            return jnp.float32(self.loss_scale)
        if not isinstance(state, LossScaleState):
            raise ValueError(
                f"{fn}: loss_scale={self.loss_scale!r} keeps its scale in the train state, and "
                f"this one has loss_scale={state!r}: make it with create_train_state(..., "
                "loss_scale=...) or train_state._replace(loss_scale="
                "fnlayers.precision.loss_scale_state(...))"
            )
        return state.scale

    def unscale(self, grads, scale: jax.Array | None):
        """The gradients of the unscaled loss, in their own dtypes."""
        if scale is None:
            return grads
        return jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)


def policy(compute_dtype, loss_scale, *, fn: str) -> _Policy:
    """Validates ``compute_dtype`` and ``loss_scale`` (see :func:`check_compute_dtype`,
    :func:`check_loss_scale`) into the policy a train step follows."""
    return _Policy(check_compute_dtype(compute_dtype, fn=fn), check_loss_scale(loss_scale, fn=fn))
