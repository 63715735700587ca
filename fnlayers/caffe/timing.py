"""``caffe time``: per-layer and whole-net forward and backward times of a Caffe net.

Under ``jax.jit`` a net is one compiled program in which XLA fuses neighbouring layers, so a
layer has no time of its own inside it. A layer's time here is that of the layer compiled on
its own (``jax.jit`` of its ``apply``; backward: of its VJP with respect to its parameters and
inputs) on the inputs it receives in the net; the averages are those of the whole net compiled
as one program (forward; forward and backward), which is what training runs. Every time is the
median over ``iterations`` runs after a compiling run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers.caffe.net import CaffeNet
from fnlayers.layers import apply_leaves
from fnlayers.tensor_ops import _from_caffe_shape

__all__ = ["LayerTime", "random_inputs", "time_net"]


class LayerTime(NamedTuple):
    """One layer's medians, in milliseconds, each compiled on its own."""

    name: str
    forward_ms: float
    backward_ms: float


def time_net(
    net: CaffeNet,
    x,
    *,
    iterations: int = 50,
    train: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Times ``net`` on the input ``x`` (an array or ``{blob: array}``) and logs Caffe's lines.

    Returns:
      ``{"layers": [LayerTime], "forward_ms", "backward_ms", "forward_backward_ms",
      "total_ms"}`` (medians in milliseconds; ``total_ms`` = ``iterations`` forward-backward
      passes).
    """
    key = jax.random.key(0)
    inputs = _layer_inputs(net, x, key, train)
    layers = []
    for path, layer, params, state, lx in inputs:
        f_ms, b_ms = _time_layer(layer, params, state, lx, key, train, iterations)
        layers.append(LayerTime(path, f_ms, b_ms))
        log(f"{path:>20}\tforward: {f_ms:.4g} ms.")
        log(f"{path:>20}\tbackward: {b_ms:.4g} ms.")

    def forward(p, s, v):
        return net.model.apply(p, s, v, key=key, train=train)[0]

    whole_f = jax.jit(forward)
    whole_fb = jax.jit(jax.grad(lambda p, s, v: _scalar(forward(p, s, v))))
    f_ms = _median_ms(lambda: whole_f(net.params, net.state, x), iterations)
    fb_ms = _median_ms(lambda: whole_fb(net.params, net.state, x), iterations)
    b_ms = max(fb_ms - f_ms, 0.0)
    total = fb_ms * iterations
    log(f"Average Forward pass: {f_ms:.4g} ms.")
    log(f"Average Backward pass: {b_ms:.4g} ms.")
    log(f"Average Forward-Backward: {fb_ms:.4g} ms.")
    log(f"Total Time: {total:.4g} ms.")
    return {
        "layers": layers,
        "forward_ms": f_ms,
        "backward_ms": b_ms,
        "forward_backward_ms": fb_ms,
        "total_ms": total,
    }


def _time_layer(layer, params, state, x, key, train, iterations):
    """``(forward_ms, backward_ms)`` of one layer compiled on its own."""

    def forward(p, s, v):
        return layer.apply(p, s, v, key=key, train=train)[0]

    fwd = jax.jit(forward)
    f_ms = _median_ms(lambda: fwd(params, state, x), iterations)
    # the gradient reaches the parameters and the floating inputs (not a label input)
    leaves, treedef = jax.tree.flatten(x)
    floating = [_floating(v) for v in leaves]

    def loss(p, real):
        it = iter(real)
        v = jax.tree.unflatten(
            treedef, [next(it) if f else u for u, f in zip(leaves, floating, strict=True)]
        )
        return _scalar(forward(p, state, v))

    real = [v for v, f in zip(leaves, floating, strict=True) if f]
    if not real and not jax.tree.leaves(params):
        return f_ms, 0.0
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return f_ms, _median_ms(lambda: bwd(params, real), iterations)


def _layer_inputs(net: CaffeNet, x, key, train):
    """``(path, layer, params, state, input)`` of each leaf layer, in the order the net runs
    them (one eager pass)."""
    seen = []

    def on_leaf(path, leaf, params, state, v, *, key=None, train=False):
        seen.append((path, leaf, params, state, v))
        return leaf.apply(params, state, v, key=key, train=train)

    apply_leaves(net.model, on_leaf, net.params, net.state, x, key=key, train=train)
    return seen


def _scalar(outputs) -> jax.Array:
    """A scalar whose gradient reaches every output: the sum of all floating outputs."""
    leaves = [jnp.sum(v) for v in jax.tree.leaves(outputs) if jnp.issubdtype(v.dtype, jnp.floating)]
    return sum(leaves) if leaves else jnp.zeros(())


def _floating(v) -> bool:
    return jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)


def _median_ms(fn, iterations: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(max(1, iterations)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def random_inputs(net: CaffeNet, seed: int = 0):
    """Standard-normal NHWC inputs shaped as ``net.inputs`` declares (one array for one
    input), for nets without data layers."""
    rng = np.random.default_rng(seed)
    arrays = {
        name: rng.standard_normal(_from_caffe_shape(tuple(shape))).astype(np.float32)
        for name, shape in net.inputs.items()
    }
    return arrays if len(arrays) > 1 else next(iter(arrays.values()))
