"""A first look at fnlayers: im2col convolution, its transpose, and a small network.

Runs in seconds on a CPU:  python examples/conv_demo.py
"""

import jax
import jax.numpy as jnp

import fnlayers as fl


def main():
    key = jax.random.key(0)
    kx, kw, knet = jax.random.split(key, 3)
    x = jax.random.normal(kx, (8, 28, 28, 1))
    w = fl.init.xavier()(kw, (5, 5, 1, 20))

    y = fl.conv2d(x, w)
    y_xla = fl.conv2d(x, w, impl="xla")
    print(f"conv2d {x.shape} * {w.shape} -> {y.shape}")
    print(
        f"  im2col vs lax.conv_general_dilated: max |diff| = {float(jnp.abs(y - y_xla).max()):.2e}"
    )

    cols = fl.im2col(x, 5)
    print(f"  the column matrix: {cols.shape} (N, OH, OW, KH*KW*C)")

    up = fl.conv_transpose2d(y, w)
    print(f"conv_transpose2d {y.shape} -> {up.shape} (Caffe's Deconvolution)")

    net = fl.serial(
        fl.Conv2D(20, 5, name="conv1"),
        fl.Conv2D(50, 5, stride=2, name="conv2"),
        fl.Flatten(),
        fl.Dense(10, name="ip1"),
    )
    out_shape, params, state = net.init(knet, (-1, 28, 28, 1))
    print("a small network, params by layer name:")
    for name, leaves in params.items():
        shapes = {k: tuple(v.shape) for k, v in leaves.items()}
        print(f"  {name:10s} {shapes}")
    logits, _ = jax.jit(net.apply)(params, state, x)
    print(f"output {logits.shape} (init predicted {out_shape})")


if __name__ == "__main__":
    main()
