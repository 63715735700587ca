"""conv2d, conv_transpose2d, im2col, col2im against docs/caffe-semantics.md §1-§2."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import fnlayers as fl


# ----------------------------------------------------------------------------- references
def caffe_conv_loop(x, w, b, stride, pad, dil, groups):
    """Transliteration of §1 (NCHW loops) applied to NHWC/HWIO arrays, in float64."""
    x = np.asarray(x, np.float64).transpose(0, 3, 1, 2)  # N C H W
    w = np.asarray(w, np.float64).transpose(3, 2, 0, 1)  # M C/G KH KW (Caffe blob)
    n, _, h, wd = x.shape
    m, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    out = np.zeros((n, m, oh, ow))
    mg = m // groups
    for ni in range(n):
        for mi in range(m):
            g = mi // mg
            for y in range(oh):
                for xx in range(ow):
                    s = 0.0
                    for ci in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                hh, ww = y * sh - ph + i * dh, xx * sw - pw + j * dw
                                if 0 <= hh < h and 0 <= ww < wd:
                                    s += w[mi, ci, i, j] * x[ni, g * cg + ci, hh, ww]
                    out[ni, mi, y, xx] = s + (0.0 if b is None else b[mi])
    return out.transpose(0, 2, 3, 1)


def caffe_deconv_loop(x, w, b, stride, pad, dil, groups):
    """Transliteration of §2's scatter: y[o, ih*s-p+i*d, iw*s-p+j*d] += W[c,o_local,i,j]*x[c]."""
    x = np.asarray(x, np.float64).transpose(0, 3, 1, 2)  # N C_in H W
    w = np.asarray(w, np.float64).transpose(3, 2, 0, 1)  # C_in, C_out/G, KH, KW (Caffe blob)
    n, c_in, h, wd = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    oh = sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph
    ow = sw * (wd - 1) + dw * (kw - 1) + 1 - 2 * pw
    out = np.zeros((n, og * groups, oh, ow))
    cg = c_in // groups
    for ni in range(n):
        for c in range(c_in):
            g = c // cg
            for ih in range(h):
                for iw in range(wd):
                    for ol in range(og):
                        for i in range(kh):
                            for j in range(kw):
                                yy, xx = ih * sh - ph + i * dh, iw * sw - pw + j * dw
                                if 0 <= yy < oh and 0 <= xx < ow:
                                    out[ni, g * og + ol, yy, xx] += (
                                        w[c, ol, i, j] * x[ni, c, ih, iw]
                                    )
    if b is not None:
        out += np.asarray(b, np.float64)[None, :, None, None]
    return out.transpose(0, 2, 3, 1)


def pair(v):
    return (v, v) if isinstance(v, int) else v


CASES = [
    # (N, H, W, C_in, C_out, kernel, stride, pad, dilation, groups)
    (2, 6, 6, 3, 4, 3, 1, 0, 1, 1),
    (1, 7, 5, 2, 3, (3, 2), (2, 1), (1, 0), 1, 1),  # non-square kernel and image, batch 1
    (2, 9, 8, 4, 6, 3, 2, 1, (2, 1), 2),  # dilation and groups
    (1, 5, 5, 6, 6, 1, 1, 0, 1, 3),  # 1x1 fast path with groups
    (2, 8, 7, 2, 2, 4, 3, 2, 1, 1),  # pad larger than stride
    (1, 11, 11, 3, 5, 11, 4, 0, 1, 1),  # AlexNet conv1 geometry, one output
]


def _arrays(rng, n, h, w, c_in, c_out, kernel, groups, dtype=np.float32):
    kh, kw = pair(kernel)
    x = rng.standard_normal((n, h, w, c_in)).astype(dtype)
    wt = rng.standard_normal((kh, kw, c_in // groups, c_out)).astype(dtype)
    b = rng.standard_normal((c_out,)).astype(dtype)
    return x, wt, b


@pytest.mark.parametrize("impl", ["im2col", "xla"])
@pytest.mark.parametrize("case", CASES)
def test_conv2d_matches_caffe_loop(rng, case, impl):
    n, h, w, c_in, c_out, kernel, stride, pad, dil, groups = case
    x, wt, b = _arrays(rng, n, h, w, c_in, c_out, kernel, groups)
    got = fl.conv2d(x, wt, b, stride=stride, padding=pad, dilation=dil, groups=groups, impl=impl)
    want = caffe_conv_loop(x, wt, b, pair(stride), pair(pad), pair(dil), groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv2d_hand_worked():
    # §1 example: 1x3x3 input 1..9, k=2 -> columns [1 2 4 5] [2 3 5 6] [4 5 7 8] [5 6 8 9];
    # a weight of ones sums each window.
    x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    cols = fl.im2col(x, 2)
    np.testing.assert_array_equal(
        cols[0].reshape(4, 4), [[1, 2, 4, 5], [2, 3, 5, 6], [4, 5, 7, 8], [5, 6, 8, 9]]
    )
    y = fl.conv2d(x, jnp.ones((2, 2, 1, 1)), jnp.array([0.5]))
    np.testing.assert_array_equal(y[0, :, :, 0], [[12.5, 16.5], [24.5, 28.5]])
    # padding 1, stride 2: windows at (-1,-1), (-1,1), (1,-1), (1,1)
    y = fl.conv2d(x, jnp.ones((2, 2, 1, 1)), stride=2, padding=1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[1, 5], [11, 28]])


@pytest.mark.parametrize("case", CASES)
def test_conv_transpose2d_matches_caffe_scatter(rng, case):
    n, h, w, c_in, c_out, kernel, stride, pad, dil, groups = case
    kh, kw = pair(kernel)
    # deconv of an input with c_out channels back to c_in channels, weight (KH, KW, c_in/G, c_out)
    y_in = rng.standard_normal((n, h, w, c_out)).astype(np.float32)
    wt = rng.standard_normal((kh, kw, c_in // groups, c_out)).astype(np.float32)
    b = rng.standard_normal((c_in,)).astype(np.float32)
    try:
        got = fl.conv_transpose2d(
            y_in, wt, b, stride=stride, padding=pad, dilation=dil, groups=groups
        )
    except ValueError:
        pytest.fail("valid deconvolution geometry rejected")
    want = caffe_deconv_loop(y_in, wt, b, pair(stride), pair(pad), pair(dil), groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_transpose2d_hand_worked_upsample():
    # §2 example: x=[[1,2],[3,4]], k=2, s=2, W=ones -> nearest-neighbour 4x4 upsample.
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    y = fl.conv_transpose2d(x, jnp.ones((2, 2, 1, 1)), stride=2)
    np.testing.assert_array_equal(
        y[0, :, :, 0], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    )


@pytest.mark.parametrize("case", CASES)
def test_conv_transpose_is_adjoint_of_conv(rng, case):
    n, h, w, c_in, c_out, kernel, stride, pad, dil, groups = case
    x, wt, _ = _arrays(rng, n, h, w, c_in, c_out, kernel, groups, np.float64)
    cfg = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    with jax.enable_x64():
        y = fl.conv2d(jnp.asarray(x), jnp.asarray(wt), **cfg)
        v = rng.standard_normal(y.shape)
        xt = fl.conv_transpose2d(jnp.asarray(v), jnp.asarray(wt), **cfg)
        if xt.shape != x.shape:  # Caffe's sizes only match when the conv tiles exactly
            x = x[:, : xt.shape[1], : xt.shape[2]]
            y = fl.conv2d(jnp.asarray(x), jnp.asarray(wt), **cfg)
        np.testing.assert_allclose(np.vdot(y, v), np.vdot(x, xt), rtol=1e-10)


@pytest.mark.parametrize(
    "image,kernel,stride,pad,dil",
    [((7, 6), (3, 2), (2, 1), (1, 2), (1, 2)), ((5, 5), 1, 2, 0, 1), ((4, 4), 1, 1, 0, 1)],
)
def test_col2im_is_adjoint_of_im2col(rng, image, kernel, stride, pad, dil):
    with jax.enable_x64():
        x = jnp.asarray(rng.standard_normal((2, *image, 3)))
        cols = fl.im2col(x, kernel, stride=stride, padding=pad, dilation=dil)
        c = jnp.asarray(rng.standard_normal(cols.shape))
        back = fl.col2im(c, image, kernel, stride=stride, padding=pad, dilation=dil)
        assert back.shape == x.shape
        np.testing.assert_allclose(jnp.vdot(cols, c), jnp.vdot(x, back), rtol=1e-10)


def test_im2col_column_order_is_kh_kw_c(rng):
    x = rng.standard_normal((1, 4, 5, 3)).astype(np.float32)
    cols = np.asarray(fl.im2col(x, (2, 3), stride=(2, 1), padding=(1, 0), dilation=1))
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))
    for oh in range(cols.shape[1]):
        for ow in range(cols.shape[2]):
            for i in range(2):
                for j in range(3):
                    for c in range(3):
                        got = cols[0, oh, ow, (i * 3 + j) * 3 + c]
                        assert got == xp[0, oh * 2 + i, ow + j, c]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    cg=st.integers(1, 3),
    og=st.integers(1, 3),
    groups=st.integers(1, 3),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
)
def test_impls_agree_hypothesis(n, h, w, cg, og, groups, kh, kw, sh, sw, ph, pw, dh, dw):
    if dh * (kh - 1) + 1 > h + 2 * ph or dw * (kw - 1) + 1 > w + 2 * pw:
        return  # geometry rejected by design; covered by the error tests
    rng = np.random.default_rng(h * 100 + w)
    x = rng.standard_normal((n, h, w, cg * groups)).astype(np.float32)
    wt = rng.standard_normal((kh, kw, cg, og * groups)).astype(np.float32)
    cfg = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups)
    a = fl.conv2d(x, wt, **cfg)
    b = fl.conv2d(x, wt, impl="xla", **cfg)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- autodiff
@pytest.mark.parametrize("impl", ["im2col", "xla"])
def test_conv2d_check_grads(rng, impl):
    x, wt, b = _arrays(rng, 2, 6, 5, 4, 4, (3, 2), 2, np.float64)
    with jax.enable_x64():
        f = lambda x, w, b: fl.conv2d(x, w, b, stride=2, padding=1, groups=2, impl=impl)
        check_grads(f, (x, wt, b), order=2, modes=["fwd", "rev"])


def test_conv_transpose2d_check_grads(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    wt = rng.standard_normal((3, 3, 1, 4))
    b = rng.standard_normal((2,))
    with jax.enable_x64():
        f = lambda x, w, b: fl.conv_transpose2d(x, w, b, stride=2, padding=1, groups=2)
        check_grads(f, (x, wt, b), order=2, modes=["fwd", "rev"])


def test_im2col_col2im_check_grads(rng):
    x = rng.standard_normal((1, 5, 4, 2))
    with jax.enable_x64():
        check_grads(
            lambda x: fl.im2col(x, 3, stride=2, padding=1), (x,), order=2, modes=["fwd", "rev"]
        )
        c = fl.im2col(jnp.asarray(x), 3, stride=2, padding=1)
        g = lambda c: fl.col2im(c, (5, 4), 3, stride=2, padding=1)
        check_grads(g, (np.asarray(c),), order=2, modes=["fwd", "rev"])


def test_conv2d_backward_is_two_dots_and_col2im(rng):
    x, wt, _ = _arrays(rng, 2, 8, 8, 3, 4, 3, 1)
    loss = lambda x, w: jnp.sum(fl.conv2d(x, w, padding=1) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, wt))
    assert jaxpr.count("dot_general") == 3  # forward product, dW, dcols
    assert "fnlayers_col2im" in jaxpr
    assert " pad[" not in jaxpr.split("fnlayers_col2im")[0].split("fnlayers_im2col")[-1]


def test_jit_and_vmap(rng):
    x, wt, b = _arrays(rng, 3, 7, 7, 2, 3, 3, 1)
    f = lambda x: fl.conv2d(x, wt, b, stride=2, padding=1)
    want = f(x)
    np.testing.assert_allclose(jax.jit(f)(x), want, rtol=1e-6)
    # vmap over an extra leading axis: each element is an (N=1) batch
    got = jax.vmap(f)(x[:, None])
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)
    g = jax.vmap(jax.grad(lambda x: jnp.sum(f(x) ** 2)))(x[:, None])
    want_g = jax.grad(lambda x: jnp.sum(f(x) ** 2))(x)
    np.testing.assert_allclose(g[:, 0], want_g, rtol=1e-4, atol=1e-5)
    t = lambda y: fl.conv_transpose2d(y, wt, stride=2, padding=1)
    y = f(x)
    np.testing.assert_allclose(jax.vmap(t)(y[:, None])[:, 0], t(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", ["im2col", "xla"])
def test_low_precision_keeps_dtype(rng, dtype, impl):
    x, wt, b = _arrays(rng, 2, 6, 6, 3, 4, 3, 1)
    y = fl.conv2d(x.astype(dtype), wt.astype(dtype), b.astype(dtype), padding=1, impl=impl)
    assert y.dtype == dtype
    ref = fl.conv2d(x, wt, b, padding=1)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0.05, atol=0.1)
    yt = fl.conv_transpose2d(x.astype(dtype), wt.transpose(0, 1, 3, 2).astype(dtype))
    assert yt.dtype == dtype


# ----------------------------------------------------------------------------- bad input
X = np.zeros((1, 5, 5, 4), np.float32)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (
            dict(w=np.zeros((3, 3, 2, 6), np.float32), groups=3),
            ValueError,
            "groups=3 does not divide C_in=4",
        ),
        (
            dict(w=np.zeros((3, 3, 2, 5), np.float32), groups=2),
            ValueError,
            "groups=2 does not divide C_out=5",
        ),
        (
            dict(w=np.zeros((3, 3, 3, 6), np.float32)),
            ValueError,
            r"w has 3 input channels per group but x has C_in=4",
        ),
        (
            dict(w=np.zeros((7, 3, 4, 6), np.float32)),
            ValueError,
            "kernel height 7 .* larger than the padded input height 5",
        ),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float32), stride=0),
            ValueError,
            "stride=0 must be positive",
        ),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float32), dilation=(1, 0)),
            ValueError,
            r"dilation=\(1, 0\) must be positive",
        ),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float32), padding=-1),
            ValueError,
            "padding=-1 must be >= 0",
        ),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float32), stride=1.5),
            TypeError,
            "stride=1.5 must be an int or a pair",
        ),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float64)),
            TypeError,
            "x has dtype float32 but w has dtype float64",
        ),
        (dict(w=np.zeros((3, 3, 4), np.float32)), ValueError, "w must have rank 4"),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float32), impl="cudnn"),
            ValueError,
            "impl='cudnn' must be one of",
        ),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float32), b=np.zeros(5, np.float32)),
            ValueError,
            r"b has shape \(5,\)",
        ),
        (
            dict(w=np.zeros((3, 3, 4, 6), np.float32), groups=0),
            ValueError,
            "groups=0 must be a positive int",
        ),
    ],
)
def test_conv2d_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        fl.conv2d(X, **kwargs)


def test_conv2d_rank_and_dtype_errors():
    with pytest.raises(ValueError, match=r"conv2d: x must have rank 4 \(NHWC\)"):
        fl.conv2d(np.zeros((5, 5, 4), np.float32), np.zeros((3, 3, 4, 1), np.float32))
    with pytest.raises(TypeError, match="x must have a floating dtype, got int32"):
        fl.conv2d(np.zeros((1, 5, 5, 4), np.int32), np.zeros((3, 3, 4, 1), np.int32))


def test_conv_transpose2d_bad_input():
    with pytest.raises(ValueError, match=r"w.shape\[3\]=3 must equal the C_in=4"):
        fl.conv_transpose2d(X, np.zeros((2, 2, 1, 3), np.float32))
    with pytest.raises(ValueError, match="groups=3 does not divide C_in=4"):
        fl.conv_transpose2d(X, np.zeros((2, 2, 1, 4), np.float32), groups=3)
    with pytest.raises(ValueError, match="padding=3 crops the whole output"):
        fl.conv_transpose2d(X[:, :1, :1], np.zeros((2, 2, 1, 4), np.float32), padding=3)
    with pytest.raises(ValueError, match="stride=-2 must be positive"):
        fl.conv_transpose2d(X, np.zeros((2, 2, 1, 4), np.float32), stride=-2)


def test_col2im_bad_cols():
    with pytest.raises(ValueError, match=r"col2im: cols shape \(1, 2, 2, 9\) does not fit"):
        fl.col2im(np.zeros((1, 2, 2, 9), np.float32), (5, 5), 3)


def test_output_shape_helpers_work_from_shapes_alone():
    assert fl.conv_output_shape((-1, 227, 227, 3), (11, 11, 3, 96), stride=4) == (-1, 55, 55, 96)
    assert fl.conv_output_shape((8, 27, 27, 96), (5, 5, 48, 256), padding=2, groups=2) == (
        8,
        27,
        27,
        256,
    )
    # FCN 2x upsampling: k=4, s=2, p=1 doubles the size.
    assert fl.conv_transpose_output_shape(
        (-1, 8, 8, 21), (4, 4, 1, 21), stride=2, padding=1, groups=21
    ) == (-1, 16, 16, 21)


# ----------------------------------------------------------------------------- fast paths
# im2col/col2im pick a construction by geometry (space-to-depth when stride == kernel, width
# phases for a width stride > 1, strided slices otherwise) and conv2d tiles the batch when the
# column matrix is large; every path must give the same matrix and the same gradients.
blocking = __import__("importlib").import_module("fnlayers.conv.blocking")
primitives = __import__("importlib").import_module("fnlayers.conv.primitives")
folding = __import__("importlib").import_module("fnlayers.conv.folding")

PATH_GEOMETRIES = [
    # (image, kernel, stride, pad, dilation)
    ((9, 9), 3, 3, 0, 1),  # space-to-depth, exact tiling
    ((10, 11), (2, 3), (2, 3), (1, 2), 1),  # space-to-depth with padding and a cropped edge
    ((12, 13), 5, (1, 4), 2, 1),  # width phases, kw > sw
    ((7, 12), (3, 2), (2, 3), 1, (2, 1)),  # width phases, kw < sw, height dilation
    ((8, 11), (2, 4), (3, 2), (0, 1), 1),  # width phases, kw multiple of sw
    ((13, 13), 11, 4, 0, 1),  # AlexNet conv1 geometry
    ((9, 10), 3, 2, 1, 2),  # width dilation: generic slices
    ((6, 7), (2, 2), (1, 1), (1, 0), (1, 2)),  # stride 1, dilation
]


def im2col_slices(x, kernel, stride, pad, dil):
    """The naive construction in jnp, differentiable by JAX itself."""
    h, w = x.shape[1:3]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(kernel), pair(stride), pair(pad), pair(dil)
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return jnp.concatenate(
        [
            xp[
                :,
                i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                j * dw : j * dw + (ow - 1) * sw + 1 : sw,
            ]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )


@pytest.mark.parametrize("image,kernel,stride,pad,dil", PATH_GEOMETRIES)
def test_im2col_paths_match_reference_and_col2im_is_adjoint(rng, image, kernel, stride, pad, dil):
    cfg = dict(stride=stride, padding=pad, dilation=dil)
    with jax.enable_x64():
        x = rng.standard_normal((2, *image, 3))
        cols = fl.im2col(jnp.asarray(x), kernel, **cfg)
        ref = jax.jit(lambda x: im2col_slices(x, kernel, stride, pad, dil))
        np.testing.assert_array_equal(cols, ref(x))
        c = rng.standard_normal(cols.shape)
        back = fl.col2im(jnp.asarray(c), image, kernel, **cfg)
        assert back.shape == x.shape
        np.testing.assert_allclose(np.vdot(cols, c), np.vdot(x, back), rtol=1e-10)
        # ... and equals autodiff of the reference construction (pad, strided slices, concat)
        ref_t = jax.jit(lambda x, c: jax.vjp(ref, x)[1](c)[0])
        np.testing.assert_allclose(back, ref_t(x, c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_conv2d_grads_match_xla(rng, case):
    """The custom backward (two dots + col2im) against autodiff of lax.conv_general_dilated."""
    n, h, w, c_in, c_out, kernel, stride, pad, dil, groups = case
    x, wt, _ = _arrays(rng, n, h, w, c_in, c_out, kernel, groups, np.float64)
    cfg = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    with jax.enable_x64():
        g = {}
        for impl in ("im2col", "xla"):
            loss = lambda x, w, impl=impl: jnp.sum(jnp.sin(fl.conv2d(x, w, impl=impl, **cfg)))
            g[impl] = jax.value_and_grad(loss, argnums=(0, 1))(x, wt)
        np.testing.assert_allclose(g["im2col"][0], g["xla"][0], rtol=1e-10)
        for a, b in zip(g["im2col"][1], g["xla"][1], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.fixture(params=["rows", "examples"])
def tiny_blocks(request, monkeypatch):
    """Forces conv2d to tile: ``tile(x_shape, w_shape, itemsize, **cfg)`` sets the budget to one
    output row ("rows": row windows folded into the batch) or one example ("examples")."""

    def tile(x_shape, w_shape, itemsize, **cfg):
        monkeypatch.setattr(blocking, "_tile_for_cache", lambda: True)  # on any backend
        monkeypatch.setattr(blocking, "_TILE_ABOVE_BYTES", 0)
        _, oh, ow, _ = fl.conv_output_shape(x_shape, w_shape, **cfg)
        row = ow * w_shape[0] * w_shape[1] * x_shape[3] * itemsize
        monkeypatch.setattr(blocking, "_BLOCK_BYTES", row * (1 if request.param == "rows" else oh))

    return tile


@pytest.mark.parametrize("case", CASES)
def test_conv2d_tiled_matches_xla(rng, tiny_blocks, case):
    n, h, w, c_in, c_out, kernel, stride, pad, dil, groups = case
    n = 4  # several blocks
    x, wt, b = _arrays(rng, n, h, w, c_in, c_out, kernel, groups, np.float64)
    cfg = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    tiny_blocks(x.shape, wt.shape, 8, **cfg)
    with jax.enable_x64():
        loss = lambda x, w, impl: jnp.sum(jnp.sin(fl.conv2d(x, w, b, impl=impl, **cfg)))
        jaxpr = str(jax.make_jaxpr(lambda x, w: loss(x, w, "im2col"))(x, wt))
        is_1x1 = pair(kernel) == (1, 1) and pair(stride) == (1, 1) and pair(pad) == (0, 0)
        assert ("scan" in jaxpr) != is_1x1
        got = jax.value_and_grad(loss, argnums=(0, 1))(x, wt, "im2col")
        want = jax.value_and_grad(loss, argnums=(0, 1))(x, wt, "xla")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
        for a, b_ in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-10)


def test_conv2d_tiled_check_grads_jit_vmap(rng, tiny_blocks):
    x, wt, b = _arrays(rng, 4, 6, 5, 4, 4, (3, 2), 2, np.float64)
    tiny_blocks(x.shape, wt.shape, 8, stride=2, padding=1, groups=2)
    with jax.enable_x64():
        f = lambda x, w, b: fl.conv2d(x, w, b, stride=2, padding=1, groups=2)
        assert "scan" in str(jax.make_jaxpr(f)(x, wt, b))
        check_grads(f, (x, wt, b), order=1, modes=["fwd", "rev"])
        want = fl.conv2d(x, wt, b, stride=2, padding=1, groups=2, impl="xla")
        np.testing.assert_allclose(jax.jit(f)(x, wt, b), want, rtol=1e-10)
        got = jax.vmap(f, in_axes=(0, None, None))(x.reshape(2, 2, *x.shape[1:]), wt, b)
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-10)


def test_conv2d_tiled_backward_is_two_dots_and_col2im(rng, tiny_blocks):
    x, wt, _ = _arrays(rng, 4, 8, 8, 3, 4, 3, 1)
    tiny_blocks(x.shape, wt.shape, 4, padding=1)
    loss = lambda x, w: jnp.sum(fl.conv2d(x, w, padding=1) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, wt))
    assert "scan" in jaxpr
    assert jaxpr.count("dot_general") == 3  # forward product, dW, dcols: one each per block
    assert "fnlayers_col2im" in jaxpr


def test_tiling_choice(monkeypatch):
    monkeypatch.setattr(blocking, "_tile_for_cache", lambda: True)
    monkeypatch.setattr(blocking, "_TILE_ABOVE_BYTES", 100)
    monkeypatch.setattr(blocking, "_BLOCK_BYTES", 40)
    tiling = blocking._tiling
    assert tiling(2, 5, 10) == (5, 2)  # 100 bytes in all: not tiled
    assert tiling(16, 4, 2) == (4, 4)  # whole examples (8 bytes): 5 fit, 4 divides 16
    assert tiling(8, 4, 5) == (4, 2)  # 20 bytes per example, 2 per block
    assert tiling(7, 4, 5) == (4, 1)  # 7 is prime: one example per block
    assert tiling(8, 6, 10) == (3, 1)  # one example is 60 bytes: windows of 3 rows
    assert tiling(3, 7, 50) == (1, 1)  # a row above the block size: one row per block


def test_tiling_is_for_the_cpu_backend_only(monkeypatch):
    monkeypatch.setattr(blocking, "_TILE_ABOVE_BYTES", 100)
    monkeypatch.setattr(blocking, "_BLOCK_BYTES", 40)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert blocking._tiling(8, 6, 10) == (3, 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert blocking._tiling(8, 6, 10) == (6, 8)  # accelerators: one block, no scan


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def _blocks_in_jaxpr(f, *args):
    """``(scan length, column matrix per block as (G, M, K/G))`` of the convolution in the jaxpr
    of ``f``, or ``(1, None)`` when it runs without a scan."""
    jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"]
    if not scans:
        return 1, None
    (scan,) = scans
    body = scan.params["jaxpr"].jaxpr
    (cols,) = [e for e in _eqns(body) if e.primitive.name == "fnlayers_im2col"]
    return scan.params["length"], cols.outvars[0].aval.shape


def test_plan_blocks_is_what_conv2d_runs_for_alexnet_conv1(monkeypatch):
    """AlexNet conv1 at the floor benchmark's batch: 121 taps on 3 channels with stride 4 are
    folded into 9 taps of 4x4x3 = 48 channels on the 57x57 image of 4x4 tiles, zero taps
    included (3*4 = 12 > 11): 432-wide columns, built in one stage. The plan, the scan in
    conv2d's jaxpr and the floor benchmark's block shapes agree: one example per block (3025
    rows of 432 columns)."""
    from fnlayers.bench import conv as conv_bench
    from fnlayers.bench import floor

    (case,) = [c for c in conv_bench.CASES if c.name == "alexnet_conv1"]
    x = jax.ShapeDtypeStruct((case.n, case.h, case.w, case.c_in), jnp.float32)
    w = jax.ShapeDtypeStruct((case.kernel, case.kernel, case.c_in, case.c_out), jnp.float32)
    plan = blocking.plan_blocks(x.shape, case.kernel, stride=case.stride, dtype=x.dtype)
    assert plan == blocking.BlockPlan(
        tiled=True,
        rows=55,
        per_block=1,
        blocks=case.n,
        cols_shape=(1, 3025, 432),
        two_stage=False,
        block_bytes=blocking._BLOCK_BYTES,
        folded=True,
    )
    calls = []
    fold_input = folding.fold_input
    monkeypatch.setattr(folding, "fold_input", lambda *a: calls.append(a) or fold_input(*a))
    conv = lambda x, w: fl.conv2d(x, w, stride=case.stride)
    length, cols = _blocks_in_jaxpr(conv, x, w)
    assert [a[0].shape for a in calls] == [x.shape]
    assert length == plan.blocks
    assert cols == (plan.per_block, plan.rows, 55, 432)
    want = {"m": 3025, "k": 432, "o": 96, "groups": 1, "blocks": case.n}
    assert floor.block_shapes(case) == want


@pytest.mark.parametrize(
    "x_shape, kernel, stride, padding, folds",
    [
        ((2, 23, 26, 3), 11, 4, 0, True),  # AlexNet's conv1, a smaller image
        ((2, 22, 25, 3), 11, 4, 2, True),  # padded; the tiles cut the last rows off
        ((2, 19, 21, 1), (8, 6), (4, 3), (1, 2), True),  # unequal strides, a 1-channel image
        ((2, 30, 30, 3), 7, 2, 3, False),  # the ResNet/GoogLeNet conv1: 1.31x the work
        ((2, 30, 30, 3), 11, 4, 0, False),  # grouped (below): never folded
    ],
)
def test_stride_folding_matches_xla(rng, monkeypatch, x_shape, kernel, stride, padding, folds):
    calls = []
    fold_weight = folding.fold_weight
    monkeypatch.setattr(folding, "fold_weight", lambda *a: calls.append(a) or fold_weight(*a))
    groups = 1 if folds or kernel == 7 else 3
    x = rng.standard_normal(x_shape).astype(np.float32)
    wt = 0.1 * rng.standard_normal((*pair(kernel), x_shape[3] // groups, 6)).astype(np.float32)
    cfg = dict(stride=stride, padding=padding, groups=groups)
    loss = lambda x, w, impl: jnp.sum(jnp.sin(fl.conv2d(x, w, impl=impl, **cfg)))
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(x, wt, "im2col")
    assert bool(calls) == folds
    want = jax.value_and_grad(loss, argnums=(0, 1))(x, wt, "xla")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.max(np.abs(b)))


def test_stride_folding_check_grads(rng):
    x = rng.standard_normal((1, 13, 11, 1))
    wt = rng.standard_normal((8, 6, 1, 2))
    plan = blocking.plan_blocks(x.shape, (8, 6), stride=(4, 3), padding=1, dtype=np.float64)
    assert plan.folded
    with jax.enable_x64():
        f = lambda x, w: fl.conv2d(x, w, stride=(4, 3), padding=1)
        check_grads(f, (x, wt), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize(
    "x_shape, w_shape, cfg, block_bytes",
    [
        ((6, 8, 8, 3), (3, 3, 3, 4), dict(padding=1), 2 * 8 * 8 * 27 * 4),  # 2 examples
        ((6, 8, 8, 3), (3, 3, 3, 4), dict(padding=1), 8 * 8 * 27 * 4),  # 1 example
        ((4, 5, 5, 3), (3, 3, 3, 4), dict(padding=1), 2 * 5 * 27 * 4),  # 2 one-row windows
        ((4, 6, 6, 4), (3, 3, 2, 6), dict(padding=1, groups=2), 2 * 6 * 6 * 36 * 4),  # groups
        ((4, 9, 9, 4), (3, 3, 2, 6), dict(stride=2, groups=2), 2 * 4 * 36 * 4),  # rows, groups
        ((4, 12, 12, 1), (5, 5, 1, 2), dict(padding=2), 2 * 12 * 25 * 4),  # two-stage rows
        ((4, 6, 6, 8), (1, 1, 8, 3), {}, 1),  # 1x1: never tiled
        ((4, 6, 6, 8), (3, 3, 8, 3), {}, 1 << 30),  # one block: not tiled
    ],
)
def test_plan_blocks_matches_the_scan_of_conv2d(monkeypatch, x_shape, w_shape, cfg, block_bytes):
    monkeypatch.setattr(blocking, "_tile_for_cache", lambda: True)
    monkeypatch.setattr(blocking, "_TILE_ABOVE_BYTES", 0)
    monkeypatch.setattr(blocking, "_BLOCK_BYTES", block_bytes)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
    plan = blocking.plan_blocks(x_shape, w_shape[:2], dtype=x.dtype, **cfg)
    length, cols = _blocks_in_jaxpr(lambda x, w: fl.conv2d(x, w, **cfg), x, w)
    assert length == plan.blocks and plan.tiled == (cols is not None)
    if cols is not None:
        groups = plan.cols_shape[0]
        assert (groups, math.prod(cols[:3]) // groups, cols[3]) == plan.cols_shape


def test_planner_budgets_assigned_on_the_package_reach_the_planner(monkeypatch):
    monkeypatch.setattr(fl.conv, "_TILE_ABOVE_BYTES", 0)
    monkeypatch.setattr(fl.conv, "_BLOCK_BYTES", 8 * 8 * 27 * 4)  # one example per block
    monkeypatch.setattr(fl.conv, "_tile_for_cache", lambda: True)
    assert (blocking._TILE_ABOVE_BYTES, blocking._BLOCK_BYTES) == (0, 8 * 8 * 27 * 4)
    assert fl.conv._BLOCK_BYTES == 8 * 8 * 27 * 4
    assert blocking.plan_blocks((4, 8, 8, 3), 3, padding=1).blocks == 4


def test_plan_blocks_checks_its_arguments():
    with pytest.raises(ValueError, match=r"plan_blocks: x_shape must have rank 4"):
        blocking.plan_blocks((8, 8, 3), 3)
    with pytest.raises(ValueError, match="plan_blocks: groups=0 must be a positive int"):
        blocking.plan_blocks((1, 8, 8, 3), 3, groups=0)
    with pytest.raises(TypeError, match="plan_blocks: kernel=2.0 must be an int or a pair"):
        blocking.plan_blocks((1, 8, 8, 3), 2.0)


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        (5, 1, 2, 1),  # CIFAR10-quick conv1 on an image's few channels
        ((4, 5), (2, 1), (1, 2), (1, 2)),  # height stride, width dilation
        (11, 4, 0, 1),  # AlexNet conv1: width phases in the first stage
        ((5, 7), (1, 3), (2, 0), (2, 1)),  # width stride 3 with height dilation
    ],
)
def test_two_stage_im2col_matches_xla(rng, monkeypatch, kernel, stride, padding, dilation):
    monkeypatch.setattr(blocking, "_FOLD_MAX_WORK", 0)  # conv2d would fold AlexNet's conv1
    calls = []
    width_taps = primitives._width_taps
    monkeypatch.setattr(primitives, "_width_taps", lambda *a: calls.append(a) or width_taps(*a))
    x = rng.standard_normal((2, 23, 26, 1))  # one channel: the two-stage path
    wt = rng.standard_normal((*pair(kernel), 1, 3))
    cfg = dict(stride=stride, padding=padding, dilation=dilation)
    with jax.enable_x64():
        loss = lambda x, w, impl: jnp.sum(jnp.sin(fl.conv2d(x, w, impl=impl, **cfg)))
        got = jax.value_and_grad(loss, argnums=(0, 1))(x, wt, "im2col")
        assert calls, "the two-stage construction was not used"
        want = jax.value_and_grad(loss, argnums=(0, 1))(x, wt, "xla")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
        for a, b in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
        np.testing.assert_array_equal(
            fl.im2col(x, kernel, **cfg),
            _one_stage_im2col(monkeypatch, x, kernel, **cfg),
        )


def _one_stage_im2col(monkeypatch, x, kernel, *, stride, padding, dilation):
    """The concatenation of KH*KW slices (called directly: the primitive's jit cache would
    return the two-stage program compiled for the same shapes)."""
    monkeypatch.setattr(blocking, "_TWO_STAGE_MIN_TAPS", 10**9)
    params = dict(kernel=pair(kernel), stride=pair(stride), padding=pair(padding))
    return primitives._im2col_impl(x, dilation=pair(dilation), image=x.shape[1:3], **params)


# Geometries of the stacked construction (8 float64 channels: 64-byte pieces, past the two-stage
# path): a kernel row of 11 taps (stacked in two padded groups of 6, cut to 11), 9 taps (three
# groups of 3), 65 taps (two levels of groups), and width phases whose last slice runs past KW.
STACK_GEOMETRIES = [
    # (image, kernel, stride, pad, dilation)
    ((6, 14), (2, 11), 1, (0, 1), 1),
    ((11, 10), 9, 1, (1, 0), 1),
    ((3, 70), (1, 65), (1, 2), 0, 1),
    ((12, 13), 5, (1, 2), 2, (2, 1)),
    ((9, 10), (3, 3), (2, 1), 1, 2),
]


@pytest.mark.parametrize("image,kernel,stride,pad,dil", STACK_GEOMETRIES)
def test_stacked_im2col_matches_reference(rng, image, kernel, stride, pad, dil):
    cfg = dict(stride=stride, padding=pad, dilation=dil)
    with jax.enable_x64():
        x = jnp.asarray(rng.standard_normal((2, *image, 8)))
        ref = jax.jit(lambda x: im2col_slices(x, kernel, stride, pad, dil))
        np.testing.assert_array_equal(fl.im2col(x, kernel, **cfg), ref(x))
        loss = lambda x: jnp.sum(jnp.sin(fl.im2col(x, kernel, **cfg)))
        ref_loss = lambda x: jnp.sum(jnp.sin(ref(x)))
        np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(ref_loss)(x), rtol=1e-12)


@pytest.mark.parametrize(
    "kernel, cfg",
    [(5, {}), ((3, 11), {}), (9, {}), (5, dict(stride=2)), (3, dict(dilation=2))],
)
def test_im2col_compiles_to_one_fused_loop_on_the_cpu(kernel, cfg):
    """The point of the stacked construction: one kernel for the whole column matrix, where a
    concatenation of KH*KW slices compiles to a kernel per slice plus one for the copy."""
    x = jax.device_put(jnp.ones((2, 20, 24, 16), jnp.float32), jax.devices("cpu")[0])
    hlo = jax.jit(lambda x: fl.im2col(x, kernel, **cfg)).lower(x).compile().as_text()
    assert hlo.count("kind=kLoop") == 1


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [(3, 1, 1, 1), (5, 1, 2, 1), ((2, 5), 1, (0, 2), (2, 1)), (3, 2, 1, 1), (2, 2, 0, 1)],
)
def test_isolated_col2im_matches(rng, kernel, stride, padding, dilation):
    """An untiled convolution's col2im, computed apart from its consumers on the CPU, is the same
    image as the plain one and as the public col2im."""
    image = (7, 9)
    params = dict(
        kernel=pair(kernel), stride=pair(stride), padding=pair(padding), dilation=pair(dilation)
    )
    oh, ow = fl.conv.conv_output_size(image, kernel, stride, padding, dilation)
    kk = params["kernel"][0] * params["kernel"][1]
    cols = jnp.asarray(rng.standard_normal((2, oh, ow, kk * 3)), jnp.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        bind = functools.partial(primitives.col2im_p.bind, cols, image=image, **params)
        isolated, plain = bind(isolate_col2im=True), bind(isolate_col2im=False)
        np.testing.assert_array_equal(isolated, plain)
        public = fl.col2im(cols, image, kernel, stride=stride, padding=padding, dilation=dilation)
        np.testing.assert_array_equal(plain, public)


def test_untiled_conv_isolates_its_col2im_on_the_cpu_only(rng):
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(fl.conv2d(x, wt, padding=1) ** 2)))
    assert "stablehlo.case" in dx.trace(x).lower(lowering_platforms=("cpu",)).as_text()
    assert "stablehlo.case" not in dx.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    # Pooling and the public col2im are not isolated.
    pool = jax.jit(jax.grad(lambda x: jnp.sum(fl.avg_pool(x, 3, stride=1, padding=1) ** 2)))
    assert "stablehlo.case" not in pool.trace(x).lower(lowering_platforms=("cpu",)).as_text()
