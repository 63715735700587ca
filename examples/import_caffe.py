"""Import a Caffe net and its weights, check it against numpy, and export it back.

The script writes a small Caffe net as prototxt text: a convolution, an inception-style module
(1x1, 3x3 and pooled branches joined by a Concat), BatchNorm with a Scale, a residual Eltwise
SUM back onto the convolution's output, ceil-mode max pooling, an InnerProduct and a Softmax.
It draws weights in Caffe's own blob layouts (convolution ``(out, in, kh, kw)``, InnerProduct
``(out, C*H*W)``, BatchNorm's three statistics blobs), writes them as a ``.caffemodel`` with
``fl.caffe.save_caffemodel``, imports prototxt and caffemodel with ``fl.caffe.load_net`` and
runs the net on a batch. A numpy transliteration of Caffe's forward pass, in Caffe's NCHW
layout from the same blobs, is the reference. Finally the net is exported with
``to_prototxt`` and ``save_caffemodel``, reloaded, and must give the same output and the same
caffemodel bytes.

    python examples/import_caffe.py [--out runs/import_caffe] [--seed 0]

Runs in seconds on a CPU. The last line printed is
``max |fnlayers - numpy| = X.Xe-XX (tolerance 1e-05); export round trip exact``; the exit status
is 1 when a check fails.
"""

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import fnlayers as fl

PROTOTXT = """\
name: "inception_residual"
input: "data"
input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "inc/1x1" type: "Convolution" bottom: "conv1" top: "inc/1x1"
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "inc/3x3" type: "Convolution" bottom: "conv1" top: "inc/3x3"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
layer { name: "inc/pool" type: "Pooling" bottom: "conv1" top: "inc/pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "inc/pool_proj" type: "Convolution" bottom: "inc/pool" top: "inc/pool_proj"
  convolution_param { num_output: 2 kernel_size: 1 bias_term: false } }
layer { name: "inc/output" type: "Concat"
  bottom: "inc/1x1" bottom: "inc/3x3" bottom: "inc/pool_proj" top: "inc/output" }
layer { name: "bn" type: "BatchNorm" bottom: "inc/output" top: "inc/output" }
layer { name: "scale" type: "Scale" bottom: "inc/output" top: "inc/output"
  scale_param { bias_term: true } }
layer { name: "res" type: "Eltwise" bottom: "conv1" bottom: "inc/output" top: "res" }
layer { name: "res_relu" type: "ReLU" bottom: "res" top: "res" }
layer { name: "pool" type: "Pooling" bottom: "res" top: "pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

# fnlayers' leaf names of each learned layer type, in Caffe's blob order.
LEAVES = {
    "Convolution": ("w", "b"),
    "InnerProduct": ("w", "b"),
    "Scale": ("scale", "bias"),
    "BatchNorm": ("mean_acc", "var_acc", "scale_factor"),
}
EPS = 1e-5  # BatchNorm's default eps
TOLERANCE = 1e-5


def caffe_blobs(rng):
    """The weights, as Caffe stores them: ``{layer: [blob, ...]}`` (float32, Caffe's shapes)."""

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "conv1": [normal(8, 3, 3, 3), normal(8)],
        "inc/1x1": [normal(3, 8, 1, 1), normal(3)],
        "inc/3x3": [normal(3, 8, 3, 3, scale=0.2), normal(3)],
        "inc/pool_proj": [normal(2, 8, 1, 1)],  # bias_term: false
        # Caffe's running sums and their normaliser: the mean is mean_acc / scale_factor
        "bn": [
            normal(8, scale=2.0),
            rng.uniform(1.0, 4.0, 8).astype(np.float32),
            np.array([4.0], np.float32),
        ],
        "scale": [rng.uniform(0.5, 1.5, 8).astype(np.float32), normal(8)],
        "fc": [normal(5, 8 * 4 * 4, scale=0.1), normal(5)],  # (out, C*H*W), C slowest
    }


def to_trees(net, blobs):
    """``net``'s params and state with ``blobs`` in fnlayers' layouts: a convolution weight is
    HWIO ``(kh, kw, in, out)``, an InnerProduct weight ``(K, out)`` (K still in Caffe's
    ``(C, H, W)`` order: the imported layer flattens that way), the rest as Caffe stores it."""
    params = {name: dict(tree) for name, tree in net.params.items()}
    state = {name: dict(tree) for name, tree in net.state.items()}
    for name, arrays in blobs.items():
        kind = net.layer_types[name]
        tree = state if kind == "BatchNorm" else params
        # strict=False: a layer without bias_term has one blob fewer than LEAVES names
        for leaf, blob in zip(LEAVES[kind], arrays, strict=False):
            if (kind, leaf) == ("Convolution", "w"):
                blob = blob.transpose(2, 3, 1, 0)
            elif (kind, leaf) == ("InnerProduct", "w"):
                blob = blob.T
            if blob.shape != tree[name][leaf].shape:
                raise ValueError(
                    f"{name}/{leaf}: {blob.shape}, the net has {tree[name][leaf].shape}"
                )
            tree[name][leaf] = jnp.asarray(blob)
    return params, state


# ----------------------------------------------------------------------------- numpy reference


def conv(x, w, b=None, pad=0):
    """Caffe's Convolution (stride 1): ``x`` (N, C, H, W), ``w`` (out, C, kh, kw)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))  # (N, C, OH, OW, kh, kw)
    y = np.einsum("ncijab,ocab->noij", windows, w)
    return y if b is None else y + b[None, :, None, None]


def max_pool(x, k, stride, pad=0):
    """Caffe's MAX Pooling: ceil rounding, a window may overhang the image on the right."""
    h = x.shape[2]
    out = -(-(h + 2 * pad - k) // stride) + 1
    if pad and (out - 1) * stride >= h + pad:
        out -= 1
    right = max((out - 1) * stride + k - pad - h, 0)
    x = np.pad(x, ((0, 0), (0, 0), (pad, right), (pad, right)), constant_values=-np.inf)
    windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return windows[:, :, :out, :out].max(axis=(-2, -1))


def reference(x, blobs):
    """Caffe's test-phase forward pass of PROTOTXT in float64, NCHW."""
    b = {name: [a.astype(np.float64) for a in arrays] for name, arrays in blobs.items()}
    conv1 = np.maximum(conv(x, *b["conv1"], pad=1), 0.0)
    branches = [
        conv(conv1, *b["inc/1x1"]),
        conv(conv1, *b["inc/3x3"], pad=1),
        conv(max_pool(conv1, 3, 1, pad=1), *b["inc/pool_proj"]),
    ]
    inc = np.concatenate(branches, axis=1)
    mean_acc, var_acc, factor = b["bn"]
    mean, var = mean_acc / factor[0], var_acc / factor[0]
    inc = (inc - mean[:, None, None]) / np.sqrt(var[:, None, None] + EPS)
    gamma, beta = b["scale"]
    inc = inc * gamma[:, None, None] + beta[:, None, None]
    res = np.maximum(conv1 + inc, 0.0)
    pool = max_pool(res, 3, 2)  # 8 -> ceil(5/2) + 1 = 4
    w, bias = b["fc"]
    fc = pool.reshape(len(pool), -1) @ w.T + bias
    e = np.exp(fc - fc.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- the run


def run(out_dir, seed):
    rng = np.random.default_rng(seed)
    prototxt = os.path.join(out_dir, "inception_residual.prototxt")
    weights = os.path.join(out_dir, "inception_residual.caffemodel")
    with open(prototxt, "w") as f:
        f.write(PROTOTXT)
    blank = fl.caffe.load_net(prototxt)  # the fillers' weights: only the layout is used
    kinds = sorted(set(blank.layer_types.values()))
    print(f"wrote {prototxt}: {len(blank.layer_types)} layers of types {', '.join(kinds)}")

    blobs = caffe_blobs(rng)
    params, state = to_trees(blank, blobs)
    size = len(fl.caffe.save_caffemodel(weights, blank, params, state))
    print(f"wrote {weights} ({size} bytes) with fl.caffe.save_caffemodel")

    net = fl.caffe.load_net(prototxt, weights)
    print(f"loaded with fl.caffe.load_net: inputs {net.inputs}, outputs {net.outputs}")
    for name, leaves in net.params.items():
        if leaves:
            print(f"  {name:14s} {jax.tree.map(jnp.shape, leaves)}")

    x = rng.standard_normal(net.inputs["data"]).astype(np.float32)  # Caffe's NCHW batch
    apply = jax.jit(net.model.apply)
    y = np.asarray(apply(net.params, net.state, x.transpose(0, 2, 3, 1))[0]["prob"])
    expected = reference(x.astype(np.float64), blobs)
    err = float(np.abs(y - expected).max())
    print(
        f"forward: prob {y.shape}; numpy reference (NCHW, Caffe's formulas): max |diff| {err:.1e}"
    )

    text = fl.caffe.to_prototxt(net)
    exported = fl.caffe.save_caffemodel(os.path.join(out_dir, "exported.caffemodel"), net)
    again = fl.caffe.load_net(text, exported)
    y_again = np.asarray(apply(again.params, again.state, x.transpose(0, 2, 3, 1))[0]["prob"])
    with open(weights, "rb") as f:
        same_bytes = f.read() == exported == fl.caffe.save_caffemodel(None, again)
    same_output = bool(np.array_equal(y, y_again))
    print(
        f"exported (to_prototxt, save_caffemodel) and reloaded: output identical {same_output}, "
        f"caffemodel bytes identical {same_bytes}"
    )
    exact = "exact" if same_output and same_bytes else "NOT exact"
    print(
        f"max |fnlayers - numpy| = {err:.1e} (tolerance {TOLERANCE:.0e}); export round trip {exact}"
    )
    return err <= TOLERANCE and same_output and same_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for the files (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        ok = run(args.out, args.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ok = run(tmp, args.seed)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
