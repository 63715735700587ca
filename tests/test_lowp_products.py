"""Low-precision matrix products (fnlayers._products.dot): the backward products of a bfloat16
step take bfloat16 operands and accumulate in float32; the gradients are those products of the
rounded operands; float32 programs are unchanged; and the rule holds under vmap, pmap and
shard_map (a subprocess with 4 CPU devices: this file run as a script)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fnlayers as fl
from fnlayers import conv, linear, train
from fnlayers.conv import blocking, ops

HERE = Path(__file__).resolve().parent
BF16 = jnp.bfloat16

# One bfloat16 unit in the last place, relative: a float32 sum that lands near a rounding
# boundary may round the other way than the float64 reference does.
ULP = 2.0**-7

# `stablehlo.dot_general ... : (tensor<AxBxlhs>, tensor<...xrhs>) -> tensor<...xresult>`
DOT = re.compile(
    r"stablehlo\.dot_general.*:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)"
    r"\s*->\s*tensor<[^>]*x(\w+)>"
)


def _dots(text):
    """The ``(lhs, rhs, result)`` element types of every dot_general in a lowered program."""
    dots = DOT.findall(text)
    assert len(dots) == text.count("stablehlo.dot_general"), "a dot_general the regex missed"
    return dots


def _grad_program(f, *args):
    """The lowered text of the gradient of ``sum(sin(f(*args)))`` in every argument."""
    loss = lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    return grad.lower(*args).as_text()


def _normal(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


@pytest.fixture
def tiles(monkeypatch):
    """Tiles every convolution, in blocks of ``_BLOCK_BYTES``: small shapes take the scan."""
    monkeypatch.setattr(conv, "_TILE_ABOVE_BYTES", 0)
    monkeypatch.setattr(conv, "_BLOCK_BYTES", 2000)


# ----------------------------------------------------------------------------- lowered dots


def test_every_product_of_a_bfloat16_lenet_step_is_bfloat16_with_float32_accumulation(key):
    model, opt = fl.models.lenet(), fl.optim.sgd(0.01, momentum=0.9)
    ts = train.create_train_state(model, opt, (-1, 28, 28, 1), key)
    step = train.make_train_step(
        model, fl.losses.softmax_cross_entropy, opt, compute_dtype=BF16, donate=False
    )
    text = step.lower(ts, jnp.zeros((8, 28, 28, 1)), jnp.zeros((8,), jnp.int32)).as_text()
    dots = _dots(text)
    # 4 layers with products forward; backward 2 each (dW, dX), but no dX for the first conv.
    assert len(dots) == 4 + 7
    assert set(dots) == {("bf16", "bf16", "f32")}, dots


# The ops whose products go through fnlayers._products.dot, with small operand shapes.
PRODUCT_OPS = [
    (lambda x, w, b: fl.conv2d(x, w, b, stride=2, padding=1), [(2, 7, 7, 3), (3, 3, 3, 4), (4,)]),
    (lambda x, w: fl.conv2d(x, w, padding=1, groups=2), [(2, 5, 5, 4), (3, 3, 2, 6)]),
    (lambda x, w: fl.conv_transpose2d(x, w, stride=2, groups=2), [(2, 4, 4, 4), (3, 3, 3, 4)]),
    (fl.dense, [(3, 2, 5), (10, 4), (4,)]),
]


@pytest.mark.parametrize("dtype", [BF16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "op, shapes", PRODUCT_OPS, ids=["conv2d", "conv2d_grouped", "conv_transpose2d", "dense"]
)
def test_every_product_of_a_low_precision_gradient_is_low_precision(rng, op, shapes, dtype):
    name = {BF16: "bf16", jnp.float16: "f16"}[dtype]
    args = [_normal(rng, *s, dtype=dtype) for s in shapes]
    dots = _dots(_grad_program(op, *args))
    assert len(dots) == 3  # forward, and the gradients in both operands
    assert set(dots) == {(name, name, "f32")}, dots


def test_the_tiled_convolution_products_are_bfloat16(rng, tiles):
    x, w = _normal(rng, 4, 6, 6, 4, dtype=BF16), _normal(rng, 3, 3, 2, 6, dtype=BF16)
    text = _grad_program(lambda x, w: fl.conv2d(x, w, padding=1, groups=2), x, w)
    assert "stablehlo.while" in text  # the scan over blocks
    assert set(_dots(text)) == {("bf16", "bf16", "f32")}


# ----------------------------------------------------------------------------- values
# Every reference is float64 numpy on the bfloat16-rounded operands, rounded where the op
# rounds: the cotangent of a bfloat16 output is the float32 one rounded; im2col's column
# cotangents are rounded before col2im sums them (in float32, exact here: a few bfloat16
# terms); every gradient is rounded once at the end.


def _round(a):
    return np.asarray(a, np.float64).astype(BF16).astype(np.float64)


def _f64(a):
    return np.asarray(a, np.float64)


def _assert_bf16_close(got, want):
    got, want = _f64(got), _f64(want)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=ULP, atol=1e-3 * ULP * scale)


def _grads(op, args, cotangent):
    """Gradients of ``sum(op(*args) * cotangent)`` (the output cast to float32)."""
    loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32) * cotangent)
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def test_dense_gradients_are_rounded_bfloat16_products(rng):
    x, w, b = (_normal(rng, *s, dtype=BF16) for s in [(6, 2, 5), (10, 4), (4,)])
    c = _normal(rng, 6, 4)
    dx, dw, db = _grads(fl.dense, (x, w, b), c)
    dy, xf, wf = _round(c), _f64(x).reshape(6, 10), _f64(w)
    _assert_bf16_close(dx, _round(dy @ wf.T).reshape(6, 2, 5))
    _assert_bf16_close(dw, _round(xf.T @ dy))
    _assert_bf16_close(db, _round(dy.sum(0)))


def _conv2d_grads_reference(x, w, dy, stride, pad, groups):
    """dX and dW of Caffe's grouped convolution by loops over the kernel taps, float64."""
    h, wd = x.shape[1:3]
    kh, kw, cg, c_out = w.shape
    og = c_out // groups
    oh, ow = dy.shape[1:3]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (oh - 1) + 1, stride)
            cols = slice(j, j + stride * (ow - 1) + 1, stride)
            for g in range(groups):
                xs = xp[:, rows, cols, g * cg : (g + 1) * cg]
                dys = dy[..., g * og : (g + 1) * og]
                dw[i, j, :, g * og : (g + 1) * og] = np.einsum("nhwc,nhwo->co", xs, dys)
                dcols = _round(np.einsum("nhwo,co->nhwc", dys, w[i, j, :, g * og : (g + 1) * og]))
                dxp[:, rows, cols, g * cg : (g + 1) * cg] += dcols
    return _round(dxp[:, pad : pad + h, pad : pad + wd]), _round(dw)


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, pad, groups",
    [((2, 7, 7, 3), (3, 3, 3, 4), 2, 1, 1), ((2, 5, 5, 4), (3, 3, 2, 6), 1, 1, 2)],
    ids=["strided", "grouped"],
)
def test_conv2d_gradients_are_rounded_bfloat16_products(rng, x_shape, w_shape, stride, pad, groups):
    x, w = _normal(rng, *x_shape, dtype=BF16), _normal(rng, *w_shape, dtype=BF16)
    op = lambda x, w: fl.conv2d(x, w, stride=stride, padding=pad, groups=groups)
    c = _normal(rng, *op(x, w).shape)
    dx, dw = _grads(op, (x, w), c)
    want_dx, want_dw = _conv2d_grads_reference(_f64(x), _f64(w), _round(c), stride, pad, groups)
    _assert_bf16_close(dx, want_dx)
    _assert_bf16_close(dw, want_dw)


def test_conv_transpose2d_gradients_are_rounded_bfloat16_products(rng):
    # Deconvolution: the column product x @ Wᵀ per group, then col2im; its gradients are the
    # columns of dY (im2col, exact) times W (for dX) and times x (for dW).
    n, h, wd, c_in, k, c_out_g, groups, stride = 2, 4, 4, 4, 3, 3, 2, 2
    x = _normal(rng, n, h, wd, c_in, dtype=BF16)
    w = _normal(rng, k, k, c_out_g, c_in, dtype=BF16)
    op = lambda x, w: fl.conv_transpose2d(x, w, stride=stride, groups=groups)
    c = _normal(rng, *op(x, w).shape)
    dy, xf, wf = _round(c), _f64(x), _f64(w)
    mg = c_in // groups
    want_dx, want_dw = np.zeros_like(xf), np.zeros_like(wf)
    for g in range(groups):
        ins, outs = slice(g * mg, (g + 1) * mg), slice(g * c_out_g, (g + 1) * c_out_g)
        for i in range(k):
            for j in range(k):
                rows = slice(i, i + stride * (h - 1) + 1, stride)
                cols = slice(j, j + stride * (wd - 1) + 1, stride)
                dcols = dy[:, rows, cols, outs]  # (N, H, W, C_out/G)
                want_dx[..., ins] += np.einsum("nhwc,cm->nhwm", dcols, wf[i, j, :, ins])
                want_dw[i, j, :, ins] = np.einsum("nhwc,nhwm->cm", dcols, xf[..., ins])
    dx, dw = _grads(op, (x, w), c)
    _assert_bf16_close(dx, _round(want_dx))
    _assert_bf16_close(dw, _round(want_dw))


def test_tiled_conv2d_gradients_are_rounded_bfloat16_products(rng, tiles):
    x, w = _normal(rng, 4, 6, 6, 3, dtype=BF16), _normal(rng, 3, 3, 3, 4, dtype=BF16)
    op = lambda x, w: fl.conv2d(x, w, padding=1)
    c = _normal(rng, 4, 6, 6, 4)
    dx, dw = _grads(op, (x, w), c)
    want_dx, want_dw = _conv2d_grads_reference(_f64(x), _f64(w), _round(c), 1, 1, 1)
    _assert_bf16_close(dx, want_dx)
    # Each block's weight gradient is rounded before the blocks are summed (in float32): each
    # block's rounding is at most a unit roundoff (2**-8) of its partial sum, so of the sum of
    # the products' magnitudes.
    assert blocking.plan_blocks(x.shape, (3, 3), padding=1, dtype=BF16).blocks > 1
    _, magnitudes = _conv2d_grads_reference(
        np.abs(_f64(x)), np.abs(_f64(w)), np.abs(_round(c)), 1, 1, 1
    )
    assert np.all(np.abs(_f64(dw) - want_dw) <= 2.0**-8 * (magnitudes + np.abs(want_dw)))


# ----------------------------------------------------------------------------- float32


def _plain_dot(a, b, dimension_numbers, out_dtype=None):
    """The products as the ops computed them before ``_products.dot``."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    y = lax.dot_general(a, b, dimension_numbers, preferred_element_type=acc)
    return y.astype(a.dtype if out_dtype is None else out_dtype)


@pytest.mark.parametrize(
    "op, shapes", PRODUCT_OPS, ids=["conv2d", "conv2d_grouped", "conv_transpose2d", "dense"]
)
def test_float32_programs_are_the_plain_products(rng, monkeypatch, op, shapes):
    args = [_normal(rng, *s) for s in shapes]
    with_helper = _grad_program(op, *args)
    monkeypatch.setattr(ops, "dot", _plain_dot)
    monkeypatch.setattr(linear, "dot", _plain_dot)
    assert _grad_program(op, *args) == with_helper
    assert set(_dots(with_helper)) == {("f32", "f32", "f32")}


# ----------------------------------------------------------------------------- transforms


def test_bfloat16_products_under_vmap_pmap_and_shard_map():
    """The cases of tests/_transforms_worker.py in bfloat16: each transform's loss and gradients
    agree with one device's, within bfloat16 tolerance (shards round their own partial weight
    gradients)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__))],
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"conv2d_tiled_grouped", "conv_transpose2d_grouped", "dense"}
    for case, outcomes in report.items():
        failed = {t: o for t, o in outcomes.items() if o != "ok"}
        assert not failed, f"{case}: {failed}"
        assert {"vmap", "pmap", "shard_map_vma", "shard_map_novma", "global_explicit"} <= set(
            outcomes
        )


def _worker():
    """Registers bfloat16 cases with the transforms worker and runs them (4 devices)."""
    import _transforms_worker as worker

    worker.CASES.clear()
    worker.RTOL = 2e-2  # a few bfloat16 roundings of the reference's scale

    def bf16(*arrays):
        return [a.astype(BF16) for a in arrays]

    def score(y):
        return worker._score(y.astype(jnp.float32)), {}

    @worker.case("conv2d_tiled_grouped", tiled=True)
    def _():  # groups=2 over batch blocks of 2 (a row is 6*9*2*2*2 bytes)
        def loss(p, b, axis_name):
            with worker._tiles(0, 2 * 6 * 432):
                return score(fl.conv2d(*bf16(b["x"], p["w"], p["b"]), padding=1, groups=2))

        params = {"w": worker._normal(1, (3, 3, 2, 6), 0.3), "b": worker._normal(2, (6,), 0.1)}
        return loss, params, {"x": worker._normal(0, (16, 6, 6, 4))}

    @worker.case("conv_transpose2d_grouped")
    def _():
        def loss(p, b, axis_name):
            return score(fl.conv_transpose2d(*bf16(b["x"], p["w"]), stride=2, padding=1, groups=2))

        return (
            loss,
            {"w": worker._normal(1, (3, 3, 2, 4), 0.3)},
            {"x": worker._normal(0, (8, 4, 4, 4))},
        )

    @worker.case("dense")
    def _():
        def loss(p, b, axis_name):
            return score(fl.dense(*bf16(b["x"], p["w"], p["b"])))

        params = {"w": worker._normal(1, (12, 5), 0.3), "b": worker._normal(2, (5,), 0.1)}
        return loss, params, {"x": worker._normal(0, (8, 3, 4))}

    print(json.dumps(worker.main(list(worker.CASES))))


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    _worker()
