"""Every fnlayers op's value and gradients under jit, vmap, pmap and shard_map, on 4 CPU devices.

Run by tests/test_transforms.py in subprocesses (``python tests/_transforms_worker.py [case ...]``)
because the host platform's device count must be set before jax starts; prints one JSON object,
``{case: {transform: "ok" | "<what went wrong>"}}``, on its last line of output (with
``FNLAYERS_WORKER_VERBOSE=1`` also a line per transform on stderr, with
``FNLAYERS_WORKER_TRACEBACK=1`` the tracebacks). Importing this module only defines the cases (the
test module reads their names); nothing runs.

Each case is a loss ``loss(params, batch, axis_name) -> (scalar, aux)`` over replicated
``params`` and a ``batch`` whose leaves share a leading batch axis. Data parallelism splits the
batch into 4 shards; the loss of the whole is the sum of the shards' losses. A result is
``(loss, aux, gradients)``, the gradients in the params and in the batch's floating leaves. The
reference is computed on one device, and what it means depends on the op:

* ``"full"``: the loss of the whole batch at once (``axis_name=None``). Right for every op that
  treats examples independently (a sum of per-example terms), and for batch norm with an axis
  name, whose statistics span the shards.
* ``"shards"``: the sum over a Python loop of the 4 shards' losses. Right for ops whose result on
  a shard depends on the shard as a whole: batch norm without an axis name (per-shard
  statistics), losses normalised by the shard's size, random draws shaped like the shard (the
  same key on every shard, as a replicated key is under pmap and shard_map).

``aux`` is a pytree of values per shard (batch norm's new state), compared stacked. Results
agree when every leaf is within ``RTOL`` of the reference leaf's largest magnitude.

Transforms (entries of each case's result):

* ``one_device``: the reference, ``jit(value_and_grad)`` on one device; must be finite.
* ``vmap``: the batch as 4 groups on axis 1, ``vmap(in_axes=1, axis_name="data")`` over the
  groups (params closed over), the group losses summed.
* ``pmap``: the batch as ``(4, N/4, ...)``; per device ``value_and_grad`` of the local loss,
  ``psum`` of the loss and of the params' gradients (pmap transposes a collective into a sum
  of the cotangents over devices, so the local loss has the global gradient).
* ``shard_map_vma`` / ``shard_map_novma``: ``value_and_grad`` of a function that runs the loss in
  ``jax.shard_map`` over an Explicit-axes mesh (``jax.make_mesh``), batch ``P("data")``, params
  ``P()``, the loss ``psum``-ed inside, with ``check_vma=True`` / ``False``.
* ``shard_map_inner_vma`` / ``shard_map_inner_novma``: ``value_and_grad`` inside the
  ``shard_map`` body: of the ``psum``-ed loss with ``check_vma=True`` (the cotangents of the
  replicated params come summed by the varying-axes types); of the local loss, the params'
  gradients ``psum``-ed, with ``check_vma=False``.
* ``shard_map_vma_params`` / ``shard_map_inner_vma_params`` (cases with params): the same with
  gradients in the params alone, the batch being data as in a training step. Nothing then
  checks the type of a cotangent of the batch, so an op whose output lost its varying axes
  gives per-shard gradients (not summed) silently: what these catch.
* ``shard_map_auto``: as ``shard_map_vma`` over an Auto-axes mesh, inside ``jax.set_mesh``.
* ``global_explicit`` / ``global_auto``: no ``shard_map``: ``value_and_grad`` of the
  whole-batch loss on a batch sharded ``P("data")``, inside ``jax.set_mesh`` of the Explicit /
  Auto mesh (XLA partitions it; shardings are in the types with Explicit axes). Compared with
  the whole batch on one device.
* ``tiling_*`` (conv2d cases with ``tiled=``): whether the convolution runs as a ``scan`` over
  blocks where it should: on one device and inside a ``shard_map`` body as the case says, never
  in a partitioned whole-batch program.

Every program is jitted. The programs on one set of inputs are compiled together, as one
(compiling is most of the time), and again one by one only if that fails, so that an error
names its transform.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

DEVICES = 4
AXIS = "data"
RTOL = 1e-4  # relative to the largest magnitude of the reference leaf
ATOL = 1e-6

CASES = {}


def case(name, ref="full", grads=True, tiled=None):
    """Registers ``builder() -> (loss, params, batch)`` under ``name``: ``ref`` is ``"full"``
    or ``"shards"`` (see above), ``grads=False`` compares values only, ``tiled`` (for conv2d) is
    whether the convolution is computed over blocks by ``lax.scan`` on one device."""

    def register(builder):
        CASES[name] = dict(builder=builder, ref=ref, grads=grads, tiled=tiled)
        return builder

    return register


# ----------------------------------------------------------------------------- case helpers


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def _normal(seed, shape, scale=1.0):
    import numpy as np

    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype("float32")


def _score(y):
    """A loss of an op's output: a sum of elementwise terms, so it decomposes over shards; the
    ``sin`` keeps it from being a function of the norm alone (batch norm's sum of squares is
    nearly constant)."""
    _, jnp = _jax()
    return jnp.sum(y * y) + jnp.sum(jnp.sin(3 * y))


@contextlib.contextmanager
def _tiles(above, block):
    """Small tiling thresholds for fnlayers.conv, so tiny shapes take the tiled paths."""
    from fnlayers import conv

    saved = conv._TILE_ABOVE_BYTES, conv._BLOCK_BYTES
    conv._TILE_ABOVE_BYTES, conv._BLOCK_BYTES = above, block
    try:
        yield
    finally:
        conv._TILE_ABOVE_BYTES, conv._BLOCK_BYTES = saved


def _conv_case(x_shape, w_shape, tile=None, **kw):
    import fnlayers as fl

    def loss(p, b, axis_name):
        with _tiles(*tile) if tile else contextlib.nullcontext():
            return _score(fl.conv2d(b["x"], p["w"], p["b"], **kw)), {}

    params = {"w": _normal(1, w_shape, 0.3), "b": _normal(2, w_shape[3:], 0.1)}
    return loss, params, {"x": _normal(0, x_shape)}


def _unary_case(fn, x_shape, params=None, seed=0):
    def loss(p, b, axis_name):
        return _score(fn(b["x"], **p)), {}

    return loss, params or {}, {"x": _normal(seed, x_shape)}


# ----------------------------------------------------------------------------- conv2d paths
# Tiled paths: _TILE_ABOVE_BYTES = 0 tiles every call; _BLOCK_BYTES picks the block. Columns of
# one output row are OW*KH*KW*C*4 bytes. Per-shard, per-group and whole batches (4, 4, 16) all
# take the same path.


@case("conv2d_untiled", tiled=False)
def _():
    return _conv_case((8, 6, 6, 3), (3, 3, 3, 4), padding=1)


@case("conv2d_tiled_batch", tiled=True)
def _():  # 2 examples per block (oh=6, row=6*9*3*4 bytes)
    return _conv_case((16, 6, 6, 3), (3, 3, 3, 4), tile=(0, 2 * 6 * 648), padding=1)


@case("conv2d_tiled_batch_unit", tiled=True)
def _():  # 1 example per block: scanned without the block axis
    return _conv_case((16, 6, 6, 3), (3, 3, 3, 4), tile=(0, 6 * 648), padding=1)


@case("conv2d_tiled_rows", tiled=True)
def _():  # windows of 1 output row (oh=5), 2 windows per block
    return _conv_case((16, 5, 5, 3), (3, 3, 3, 4), tile=(0, 2 * 540), padding=1)


@case("conv2d_tiled_rows_unit", tiled=True)
def _():  # windows of 1 output row, 1 per block, stride 2 (phases inside the blocks)
    return _conv_case((8, 7, 7, 3), (3, 3, 3, 4), tile=(0, 4 * 27 * 4), stride=2, padding=1)


@case("conv2d_tiled_grouped", tiled=True)
def _():  # groups=2 over batch blocks of 2 (row = 6*9*2*2*4 bytes for all 4 channels)
    return _conv_case((16, 6, 6, 4), (3, 3, 2, 6), tile=(0, 2 * 6 * 864), padding=1, groups=2)


@case("conv2d_tiled_grouped_rows", tiled=True)
def _():  # groups=2 over windows of 1 output row, 2 windows per block
    return _conv_case((8, 5, 5, 4), (3, 3, 2, 6), tile=(0, 2 * 720), padding=1, groups=2)


@case("conv2d_tiled_two_stage", tiled=True)
def _():  # 5x5 on 1 channel: two-stage columns, half-size blocks of 2 examples (row 8*25*4)
    return _conv_case((16, 8, 8, 1), (5, 5, 1, 3), tile=(0, 2 * 2 * 8 * 800), padding=2)


@case("conv2d_grouped")
def _():
    return _conv_case((8, 6, 6, 4), (3, 3, 2, 6), padding=1, groups=2)


@case("conv2d_stride_phases")
def _():  # stride 2, kernel 3: width phases in im2col, stride phases in col2im
    return _conv_case((8, 7, 7, 3), (3, 3, 3, 4), stride=2, padding=1)


@case("conv2d_space_to_depth")
def _():  # stride == kernel
    return _conv_case((8, 6, 6, 3), (2, 2, 3, 4), stride=2)


@case("conv2d_two_stage")
def _():  # 5x5 on 1 channel: the width taps first, then the row slices
    return _conv_case((8, 8, 8, 1), (5, 5, 1, 3), padding=2)


@case("conv2d_two_stage_strided")
def _():  # 5x5 stride 2 on 2 channels: two stages over width phases
    return _conv_case((8, 9, 9, 2), (5, 5, 2, 3), stride=2, padding=1)


@case("conv2d_dilation")
def _():
    return _conv_case((8, 7, 7, 3), (3, 3, 3, 4), padding=2, dilation=2)


@case("conv2d_1x1")
def _():
    return _conv_case((8, 5, 5, 3), (1, 1, 3, 4))


@case("conv2d_xla")
def _():
    return _conv_case((8, 6, 6, 3), (3, 3, 3, 4), padding=1, stride=2, impl="xla")


@case("conv_transpose2d")
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        return _score(fl.conv_transpose2d(b["x"], p["w"], p["b"], stride=2, padding=1)), {}

    params = {"w": _normal(1, (3, 3, 4, 3), 0.3), "b": _normal(2, (4,), 0.1)}
    return loss, params, {"x": _normal(0, (8, 4, 4, 3))}


@case("conv_transpose2d_grouped")
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        y = fl.conv_transpose2d(b["x"], p["w"], stride=1, padding=1, groups=2, dilation=2)
        return _score(y), {}

    return loss, {"w": _normal(1, (3, 3, 2, 4), 0.3)}, {"x": _normal(0, (8, 5, 5, 4))}


@case("im2col")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.im2col(x, 3, stride=2, padding=1) * 0.5, (8, 6, 6, 2))


@case("col2im")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.col2im(x, (6, 6), 3, stride=2, padding=1) * 0.5, (8, 3, 3, 18))


# ----------------------------------------------------------------------------- pooling


@case("max_pool")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.max_pool(x, 3, stride=2, padding=1), (8, 7, 7, 3))


@case("max_pool_tiles")
def _():  # window == stride: the space-to-depth columns
    import fnlayers as fl

    return _unary_case(lambda x: fl.max_pool(x, 2, stride=2), (8, 6, 6, 3))


@case("avg_pool")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.avg_pool(x, 3, stride=2, padding=1), (8, 7, 7, 3))


@case("stochastic_pool_train", ref="shards")
def _():  # the same key on every shard: each draws for its own shape
    import fnlayers as fl

    jax, jnp = _jax()

    def loss(p, b, axis_name):
        y = fl.stochastic_pool(jnp.abs(b["x"]), 3, stride=2, key=jax.random.key(3), train=True)
        return _score(y), {}

    return loss, {}, {"x": _normal(0, (8, 7, 7, 3))}


@case("stochastic_pool_eval")
def _():
    import fnlayers as fl

    _, jnp = _jax()
    return _unary_case(lambda x: fl.stochastic_pool(jnp.abs(x), 3, stride=2), (8, 7, 7, 3))


@case("global_avg_pool")
def _():
    import fnlayers as fl

    return _unary_case(fl.global_avg_pool, (8, 4, 4, 3))


@case("global_max_pool")
def _():
    import fnlayers as fl

    return _unary_case(fl.global_max_pool, (8, 4, 4, 3))


# ----------------------------------------------------------------------------- normalization


@case("lrn_across_channels")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.lrn(x, size=3, alpha=0.5), (8, 3, 3, 6))


@case("lrn_within_channel")
def _():
    import fnlayers as fl

    return _unary_case(
        lambda x: fl.lrn(x, size=3, alpha=0.5, region="within_channel"), (8, 4, 4, 3)
    )


def _bn_state(c):
    return {
        "mean_acc": _normal(5, (c,), 0.1),
        "var_acc": 1 + abs(_normal(6, (c,), 0.1)),
        "scale_factor": _normal(7, (1,), 0.0) + 2.0,
    }


def _bn_case(train, axis_name):
    import fnlayers as fl

    def loss(p, b, axis_name_):
        state = {k: v for k, v in p.items()}
        y, new_state = fl.batch_norm(
            b["x"], state, train=train, axis_name=axis_name_ if axis_name else None
        )
        return _score(y), new_state

    # The state is an input the loss is not differentiated in (no gradient flows into it).
    return loss, _bn_state(3), {"x": _normal(0, (8, 3, 3, 3)) + 0.5}


@case("batch_norm_train", ref="shards")
def _():  # no axis name: every shard normalises with its own statistics
    return _bn_case(train=True, axis_name=False)


@case("batch_norm_train_axis_name")
def _():  # statistics over every shard: equal to the whole batch on one device
    return _bn_case(train=True, axis_name=True)


@case("batch_norm_eval")
def _():
    return _bn_case(train=False, axis_name=False)


# ----------------------------------------------------------------------------- dropout


@case("dropout_train", ref="shards")
def _():  # the same key on every shard: each shard draws the mask of its own shape
    import fnlayers as fl

    jax, _ = _jax()

    def loss(p, b, axis_name):
        return _score(fl.dropout(b["x"], 0.5, key=jax.random.key(4), train=True)), {}

    return loss, {}, {"x": _normal(0, (8, 3, 3, 4))}


@case("dropout_eval")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.dropout(x, 0.5), (8, 3, 3, 4))


# ----------------------------------------------------------------------------- activations


@case("relu")
def _():
    import fnlayers as fl

    return _unary_case(fl.relu, (8, 3, 3, 4))


@case("relu_leaky")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.relu(x, 0.1), (8, 3, 3, 4))


@case("prelu")
def _():
    import fnlayers as fl

    return _unary_case(
        lambda x, alpha: fl.prelu(x, alpha), (8, 3, 3, 4), {"alpha": _normal(1, (4,), 0.3)}
    )


@case("elu")
def _():
    import fnlayers as fl

    return _unary_case(fl.elu, (8, 3, 3, 4))


@case("sigmoid")
def _():
    import fnlayers as fl

    return _unary_case(fl.sigmoid, (8, 3, 3, 4))


@case("tanh")
def _():
    import fnlayers as fl

    return _unary_case(fl.tanh, (8, 3, 3, 4))


@case("maxout")
def _():
    import fnlayers as fl

    return _unary_case(lambda x: fl.maxout(x, 2), (8, 3, 3, 6))


# ----------------------------------------------------------------------------- linear, losses


@case("dense")
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        return _score(fl.dense(b["x"], p["w"], p["b"])), {}

    params = {"w": _normal(1, (12, 5), 0.3), "b": _normal(2, (5,), 0.1)}
    return loss, params, {"x": _normal(0, (8, 2, 2, 3))}


def _labels(seed, shape, k):
    import numpy as np

    return np.random.default_rng(seed).integers(0, k, shape).astype("int32")


@case("softmax_cross_entropy", ref="shards")
def _():  # "valid" normalisation counts the shard's own non-ignored labels
    import fnlayers as fl

    def loss(p, b, axis_name):
        logits = fl.dense(b["x"], p["w"], p["b"])
        return fl.softmax_cross_entropy(logits, b["labels"], ignore_label=2), {}

    params = {"w": _normal(1, (6, 5), 0.5), "b": _normal(2, (5,), 0.1)}
    return loss, params, {"x": _normal(0, (8, 6)), "labels": _labels(3, (8,), 5)}


@case("softmax_cross_entropy_pixels", ref="shards")
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        return fl.softmax_cross_entropy(b["x"], b["labels"], clamp=True), {}

    return loss, {}, {"x": _normal(0, (8, 2, 2, 5)), "labels": _labels(3, (8, 2, 2), 5)}


@case("sigmoid_cross_entropy", ref="shards")
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        return fl.sigmoid_cross_entropy(b["x"], b["t"], ignore_label=-1), {}

    t = _labels(3, (8, 5), 3).astype("float32") - 1  # -1 ignored, 0, 1
    return loss, {}, {"x": _normal(0, (8, 5)), "t": t}


@case("euclidean", ref="shards")
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        return fl.euclidean(b["x"], b["t"]), {}

    return loss, {}, {"x": _normal(0, (8, 5)), "t": _normal(1, (8, 5))}


@case("contrastive", ref="shards")
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        return fl.contrastive(b["a"], b["b"], b["similar"], margin=p["margin"]), {}

    # A margin of 3 leaves some dissimilar pairs inside it, some outside.
    return (
        lambda p, b, ax: loss({"margin": 3.0}, b, ax),
        {},
        {"a": _normal(0, (8, 4)), "b": _normal(1, (8, 4)), "similar": _labels(2, (8,), 2)},
    )


@case("accuracy", ref="shards", grads=False)
def _():
    import fnlayers as fl

    def loss(p, b, axis_name):
        return fl.accuracy(b["x"], b["labels"], top_k=2), {}

    return loss, {}, {"x": _normal(0, (8, 5)), "labels": _labels(3, (8,), 5)}


# ----------------------------------------------------------------------------- the checks


def _shard(tree, k):
    """Shard ``k`` of 4 of every leaf's leading axis."""
    jax, _ = _jax()

    def cut(a):
        size = a.shape[0] // DEVICES
        return a[k * size : (k + 1) * size]

    return jax.tree.map(cut, tree)


def _named(result):
    """``(loss, aux, grads)`` as a dict, so that a mismatch names what it is in."""
    value, aux, grads = result
    named = {"loss": value, "aux": aux}
    if grads is not None:
        named["d_params"] = grads[0]
        if len(grads) > 1:
            named["d_batch"] = grads[1]
    return named


def _compare(got, want):
    """``None`` if the results ``(loss, aux, grads)`` agree, else what differs first."""
    import numpy as np

    jax, _ = _jax()
    got, want = _named(got), _named(want)
    got_leaves, got_def = jax.tree.flatten(got)
    want_paths, want_def = jax.tree_util.tree_flatten_with_path(want)
    if got_def != want_def:
        return f"structure {got_def} != {want_def}"
    for (path, w), g in zip(want_paths, got_leaves, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        where = jax.tree_util.keystr(path)
        if g.shape != w.shape:
            return f"{where}: shape {g.shape} != {w.shape}"
        if not np.all(np.isfinite(w)):
            return f"{where}: the reference is not finite"
        scale = float(np.max(np.abs(w), initial=0.0))
        err = float(np.max(np.abs(g - w), initial=0.0))
        if not err <= RTOL * scale + ATOL:
            return f"{where}: max error {err:.3g} (reference scale {scale:.3g})"
    return None


def _error(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


class _Case:
    """The programs of one case, each ``f(params, batch) -> (loss, aux, grads)``."""

    def __init__(self, spec):
        jax, jnp = _jax()
        self.spec = spec
        self.loss, self.np_params, self.np_batch = spec["builder"]()
        self.params = jax.tree.map(jnp.asarray, self.np_params)
        self.batch = jax.tree.map(jnp.asarray, self.np_batch)

    def vg(self, f, params_only=False):
        """``f(params, batch) -> (loss, aux)`` as ``(loss, aux, grads)``: ``grads`` of the loss
        in the params and in the batch's floating leaves, or ``(grads in the params,)`` (the
        batch is data, as in training), or None for a forward-only case."""
        jax, jnp = _jax()

        def both(p, b):
            if not self.spec["grads"]:
                return (*f(p, b), None)
            if params_only:
                (value, aux), grads = jax.value_and_grad(f, has_aux=True)(p, b)
                return value, aux, (grads,)
            floats = {k: v for k, v in b.items() if jnp.issubdtype(v.dtype, jnp.floating)}
            others = {k: v for k, v in b.items() if k not in floats}
            (value, aux), grads = jax.value_and_grad(
                lambda p, floats: f(p, {**floats, **others}), argnums=(0, 1), has_aux=True
            )(p, floats)
            return value, aux, grads

        return both

    # --- one device
    def _stacked(self, auxes):
        jax, jnp = _jax()
        return jax.tree.map(lambda *a: jnp.stack(a), *auxes)

    def shard_loop(self, p, b):
        """The shards one after the other, their losses summed."""
        pairs = [self.loss(p, _shard(b, k), None) for k in range(DEVICES)]
        return sum(v for v, _ in pairs), self._stacked([a for _, a in pairs])

    def whole(self, p, b):
        """The whole batch at once; its aux stands for every shard's."""
        value, aux = self.loss(p, b, None)
        return value, self._stacked([aux] * DEVICES)

    def reference(self):
        return self.vg(self.shard_loop if self.spec["ref"] == "shards" else self.whole)

    # --- vmap over 4 groups on axis 1 (shard k is group k), named for the collectives
    @staticmethod
    def groups(b, axis, np):
        """``(N, ...) -> (4, N/4, ...)`` (axis 0) or ``(N/4, 4, ...)`` (axis 1) with ``np``,
        numpy (on the host, nothing to compile) or jax.numpy."""
        jax, _ = _jax()

        def split(a):
            g = a.reshape(DEVICES, a.shape[0] // DEVICES, *a.shape[1:])
            return g if axis == 0 else np.swapaxes(g, 0, 1)

        return jax.tree.map(split, b)

    @staticmethod
    def ungroup(g, axis, np):
        return (g if axis == 0 else np.swapaxes(g, 0, 1)).reshape(-1, *g.shape[2:])

    def vmap(self, p, b):
        jax, jnp = _jax()

        def vmapped(p, b):
            values, auxes = jax.vmap(lambda b: self.loss(p, b, AXIS), in_axes=1, axis_name=AXIS)(b)
            return jnp.sum(values), auxes

        value, aux, grads = self.vg(vmapped)(p, self.groups(b, 1, jnp))
        if grads is not None:
            grads = (grads[0], jax.tree.map(lambda g: self.ungroup(g, 1, jnp), grads[1]))
        return value, aux, grads

    # --- pmap: local value_and_grad; the loss and the params' gradients psum-ed
    def pmap(self):
        import numpy as np

        jax, _ = _jax()
        from jax import lax

        def pmapped(p, b):
            value, aux, grads = self.vg(lambda p, b: self.loss(p, b, AXIS))(p, b)
            if grads is not None:
                grads = (lax.psum(grads[0], AXIS), grads[1])
            return lax.psum(value, AXIS), aux, grads

        # The params go in broadcast, mapped: pmap with in_axes=None on an empty dict maps the
        # wrong arguments (jax 0.10). Inputs and outputs are rearranged by numpy, on the host.
        p = jax.tree.map(lambda a: np.broadcast_to(a, (DEVICES, *a.shape)), self.np_params)
        out = jax.pmap(pmapped, axis_name=AXIS)(p, self.groups(self.np_batch, 0, np))
        value, aux, grads = jax.tree.map(np.asarray, out)
        if grads is not None:
            grads = (
                jax.tree.map(lambda g: g[0], grads[0]),
                jax.tree.map(lambda g: self.ungroup(g, 0, np), grads[1]),
            )
        return value[0], aux, grads

    # --- shard_map: batch P(AXIS), params P(); aux comes back one row per shard
    def local(self, p, b):
        jax, _ = _jax()
        value, aux = self.loss(p, b, AXIS)
        return value, jax.tree.map(lambda a: a[None], aux)

    def summed(self, p, b):
        from jax import lax

        value, aux = self.local(p, b)
        return lax.psum(value, AXIS), aux

    def shard_map(self, f, mesh, check_vma, out_specs=None):
        jax, _ = _jax()
        from jax.sharding import PartitionSpec as P

        return jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(P(), P(AXIS)),
            out_specs=out_specs or (P(), P(AXIS)),
            check_vma=check_vma,
        )

    def outer(self, mesh, check_vma, params_only=False):
        """value_and_grad of a function that runs the psum-ed loss in shard_map."""
        return self.vg(self.shard_map(self.summed, mesh, check_vma), params_only)

    def inner(self, mesh, check_vma, params_only=False):
        """value_and_grad inside the shard_map body: of the psum-ed loss when the types track
        what varies (the cotangents of replicated params come summed), else of the local loss,
        the params' gradients psum-ed by hand, as under pmap."""
        from jax import lax
        from jax.sharding import PartitionSpec as P

        def body(p, b):
            if check_vma:
                return self.vg(self.summed, params_only)(p, b)
            value, aux, grads = self.vg(self.local, params_only)(p, b)
            if grads is not None:
                grads = (lax.psum(grads[0], AXIS), *grads[1:])
            return lax.psum(value, AXIS), aux, grads

        grad_specs = None
        if self.spec["grads"]:
            grad_specs = (P(),) if params_only else (P(), P(AXIS))
        return self.shard_map(body, mesh, check_vma, (P(), P(AXIS), grad_specs))


def _run_case(name, spec, meshes):
    jax, _ = _jax()
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    c = _Case(spec)
    results = {}
    verbose = os.environ.get("FNLAYERS_WORKER_VERBOSE")

    def run_group(programs, args, mesh=None, expected=None):
        """Compiles the programs ``{transform: f(params, batch)}`` as one (compiling is most
        of the time); if that fails, one by one, so the error names its transform. Compares
        each result with ``expected[transform]``; returns the results."""
        start = time.perf_counter()

        def compiled(progs):
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                return jax.jit(lambda p, b: {t: f(p, b) for t, f in progs.items()})(*args)

        try:
            got = compiled(programs)
        except Exception:
            got = {}
            for transform, f in programs.items():
                try:
                    got.update(compiled({transform: f}))
                except Exception as e:
                    results[transform] = _error(e)
                    if os.environ.get("FNLAYERS_WORKER_TRACEBACK"):
                        traceback.print_exc()
        for transform, value in got.items():
            if expected is not None:
                results[transform] = _compare(value, expected[transform]) or "ok"
        if verbose:
            took = time.perf_counter() - start
            for transform in programs:
                outcome = results.get(transform, "-")
                print(f"{name:30s} {transform:22s} {took:5.2f}s {outcome}", file=sys.stderr)
        return got

    # --- one device: the reference, vmap, and (where the reference is the loop over the
    # shards) the whole batch at once, which is what a partitioned whole-batch program computes
    whole = c.vg(c.whole)
    programs = {"one_device": c.reference(), "vmap": c.vmap}
    if spec["ref"] == "shards":
        programs["whole"] = whole
    got = run_group(programs, (c.params, c.batch))
    if "one_device" not in got or "whole" in results:
        return results | {"one_device": results.get("one_device", "the reference failed")}
    want = got["one_device"]
    want_whole = got.get("whole", want)
    results["one_device"] = _compare(want, want) or "ok"  # finite
    results.pop("whole", None)
    if "vmap" in got:
        results["vmap"] = _compare(got["vmap"], want) or "ok"

    start = time.perf_counter()
    try:
        results["pmap"] = _compare(c.pmap(), want) or "ok"
    except Exception as e:
        results["pmap"] = _error(e)
    if verbose:
        took = time.perf_counter() - start
        print(f"{name:30s} {'pmap':22s} {took:5.2f}s {results['pmap']}", file=sys.stderr)

    for mesh_name, mesh in meshes.items():
        args = (
            jax.device_put(c.params, NamedSharding(mesh, P())),
            jax.device_put(c.batch, NamedSharding(mesh, P(AXIS))),
        )
        if mesh_name == "explicit":
            programs = {
                "shard_map_vma": c.outer(mesh, True),
                "shard_map_novma": c.outer(mesh, False),
                "shard_map_inner_vma": c.inner(mesh, True),
                "shard_map_inner_novma": c.inner(mesh, False),
            }
            if c.params and spec["grads"]:
                # The gradient in the params alone, the batch being data (a training step):
                # no cotangent of the batch whose type would be checked.
                programs["shard_map_vma_params"] = c.outer(mesh, True, params_only=True)
                programs["shard_map_inner_vma_params"] = c.inner(mesh, True, params_only=True)
        else:
            programs = {"shard_map_auto": c.outer(mesh, True)}
        # global view: the whole-batch program, partitioned by XLA over the sharded batch
        programs["global_" + mesh_name] = whole
        expected = {t: want for t in programs} | {"global_" + mesh_name: want_whole}
        if want[2] is not None:
            params_want = (*want[:2], want[2][:1])
            expected |= {t: params_want for t in programs if t.endswith("_params")}
        run_group(programs, args, mesh, expected)
        if spec["tiled"] is not None:
            results.update(_tiling(c, mesh_name, mesh, args, spec["tiled"]))
    return results


def _tiling(c, mesh_name, mesh, args, tiled):
    """Whether the convolution was tiled (a ``scan`` in the program) where it should be: as on
    one device inside the ``shard_map`` body, where each device computes its own shard, and in
    a whole-batch program partitioned by XLA (``global_*``) as one device tiles one shard (the
    convolution splits the batch into per-device slices first; the gradients of that program
    are checked with the other programs, and it must not gather the batch: ``gathers_*``)."""
    jax, _ = _jax()

    def scans(f, args, mesh=None):
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return "scan[" in str(jax.make_jaxpr(f)(*args))

    out = {}
    if mesh_name == "explicit":
        expect = {
            "one_device": (c.reference(), (c.params, c.batch), None, tiled),
            "shard_map": (c.outer(mesh, True), args, None, tiled),
        }
    else:
        expect = {}
    try:
        one_shard = scans(c.reference(), (c.params, _shard(c.batch, 0)))
    except Exception as e:
        out["tiling_global_" + mesh_name] = _error(e)
        return out
    expect["global_" + mesh_name] = (c.vg(c.whole), args, mesh, one_shard)
    for where, (f, f_args, f_mesh, want) in expect.items():
        try:
            got = scans(f, f_args, f_mesh)
            out["tiling_" + where] = "ok" if got == want else f"tiled={got}, expected {want}"
        except Exception as e:
            out["tiling_" + where] = _error(e)
    try:
        with jax.set_mesh(mesh):
            hlo = jax.jit(c.vg(c.whole)).lower(*args).compile().as_text()
        out["gathers_global_" + mesh_name] = "ok" if "all-gather" not in hlo else "all-gather"
    except Exception as e:
        out["gathers_global_" + mesh_name] = _error(e)
    return out


def main(names):
    jax, _ = _jax()
    from jax.sharding import AxisType

    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")
    if jax.device_count() != DEVICES:
        raise SystemExit(f"expected {DEVICES} devices, got {jax.devices()}")
    meshes = {
        "explicit": jax.make_mesh((DEVICES,), (AXIS,)),
        "auto": jax.make_mesh((DEVICES,), (AXIS,), axis_types=(AxisType.Auto,)),
    }
    return {name: _run_case(name, CASES[name], meshes) for name in names}


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={DEVICES}"
        + " --xla_backend_optimization_level=0"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    start = time.perf_counter()
    report = main(sys.argv[1:] or list(CASES))
    print(f"worker: {len(report)} cases in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print(json.dumps(report))
