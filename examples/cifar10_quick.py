"""Caffe's CIFAR10-quick network and solver, on real CIFAR-10 or on a generated stand-in.

The recipe is ``cifar10/cifar10_quick_solver.prototxt``: ``fl.models.cifar10_quick()`` (three
5x5 convolutions with max/average pooling, ip1 64, ip2 10, Caffe's Gaussian fillers), SGD with
momentum 0.9, weight decay 0.004, the ``fixed`` policy at base_lr 0.001, batch 100, and the
per-parameter ``lr_mult`` (biases 2) read from the model with ``fl.param_mults``. Inputs are as
Caffe's data layer gives them: raw pixel values 0..255, minus the per-pixel mean of the training
set (Caffe's ``mean_file``, ``compute_image_mean``); the test set is evaluated every 500
iterations (``test_interval``) and at the end.

Data:

* ``--data DIR``: the real CIFAR-10 binary batches (``data_batch_1.bin`` ...
  ``data_batch_5.bin`` and ``test_batch.bin``, from ``cifar-10-binary.tar.gz``), read with
  ``fl.data.read_cifar10_batches``: 50,000 training and 10,000 test images. Caffe trains this
  net for 4000 iterations (then 1000 more at lr 0.0001) to about 75% test accuracy;
  ``--iterations 4000`` runs the first stage, expect tens of minutes on a CPU.
* without ``--data``: a generated stand-in, NOT CIFAR-10, so the script runs anywhere: 32x32
  colour images of ten classes, each a shape (disc, square, ring, horizontal stripes, vertical
  stripes) in one of two colour families (reds/yellows or blues/greens), with random position,
  size, hue and brightness, a random background colour and Gaussian noise. It is a deterministic
  function of ``--seed``; a classifier has to use both shape and colour.

Every line of output that reports a result says which of the two it was.

    python examples/cifar10_quick.py [--iterations 500] [--out runs/cifar10_quick]
    python examples/cifar10_quick.py --data ~/data/cifar-10-batches-bin --iterations 4000
    python examples/cifar10_quick.py --quick        # a few seconds: a smoke test

The last line printed is ``final test accuracy: 0.NNN on <the data>``.
"""

import argparse
import os
import time

import jax
import numpy as np

import fnlayers as fl

STAND_IN_CLASSES = tuple(
    f"{colour} {shape}"
    for colour in ("warm", "cool")
    for shape in ("disc", "square", "ring", "h-stripes", "v-stripes")
)


def make_stand_in(num, rng):
    """``num`` generated images ``(num, 32, 32, 3)`` float32 in [0, 255], labels ``(num,)``."""
    labels = rng.permutation(np.arange(num) % 10).astype(np.int32)
    shape, family = labels % 5, labels // 5
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    yy, xx = yy[None], xx[None]
    cy = rng.uniform(9, 23, num).astype(np.float32)[:, None, None]
    cx = rng.uniform(9, 23, num).astype(np.float32)[:, None, None]
    r = rng.uniform(5, 9, num).astype(np.float32)[:, None, None]
    dy, dx = yy - cy, xx - cx
    dist = np.sqrt(dy * dy + dx * dx)
    box = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    period = rng.integers(4, 7, num)[:, None, None]
    phase = rng.integers(0, 6, num)[:, None, None]
    masks = np.stack(
        [
            dist <= r,  # disc
            box,  # square
            (dist <= r) & (dist >= 0.55 * r),  # ring
            box & ((yy.astype(int) + phase) % period < period / 2),  # horizontal stripes
            box & ((xx.astype(int) + phase) % period < period / 2),  # vertical stripes
        ]
    )[shape, np.arange(num)]
    # Warm: strong red, any green, little blue; cool: strong blue, any green, little red.
    strong = rng.uniform(150, 255, num)
    middle = rng.uniform(0, 220, num)
    weak = rng.uniform(0, 90, num)
    fg = np.where(
        (family == 0)[:, None],
        np.stack([strong, middle, weak], axis=1),
        np.stack([weak, middle, strong], axis=1),
    )
    bg = rng.uniform(0, 255, (num, 3)) * rng.uniform(0.2, 0.8, (num, 1))
    images = np.where(masks[..., None], fg[:, None, None, :], bg[:, None, None, :])
    images = images + rng.normal(0, 20, images.shape)
    return np.clip(images, 0, 255).astype(np.float32), labels


def load_cifar10(root, quick):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise SystemExit(
            f"--data {root}: missing {', '.join(missing)}; expected the CIFAR-10 binary "
            "version (data_batch_1.bin ... data_batch_5.bin, test_batch.bin)"
        )
    train_files = names[:1] if quick else names[:5]
    x_train, y_train = fl.data.read_cifar10_batches([os.path.join(root, n) for n in train_files])
    x_test, y_test = fl.data.read_cifar10_batches(os.path.join(root, "test_batch.bin"))
    # read_cifar10_batches scales to [0, 1]; Caffe's cifar10_quick sees raw 0..255 values.
    return x_train * 255.0, y_train, x_test * 255.0, y_test


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="directory with the CIFAR-10 binary batches")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--train-images", type=int, default=10000, help="stand-in only")
    parser.add_argument("--test-images", type=int, default=2000, help="stand-in only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few iterations: a smoke test")
    parser.add_argument("--out", default="runs/cifar10_quick")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.train_images, args.test_images = 3, 300, 100

    if args.data:
        x_train, y_train, x_test, y_test = load_cifar10(args.data, args.quick)
        if args.quick:
            x_train, y_train = x_train[: args.train_images], y_train[: args.train_images]
            x_test, y_test = x_test[: args.test_images], y_test[: args.test_images]
        source = f"real CIFAR-10 ({args.data})"
    else:
        x_train, y_train = make_stand_in(args.train_images, np.random.default_rng([args.seed, 0]))
        x_test, y_test = make_stand_in(args.test_images, np.random.default_rng([args.seed, 1]))
        source = "the generated stand-in (NOT CIFAR-10; pass --data DIR for the real thing)"
    os.makedirs(args.out, exist_ok=True)
    print(f"data: {source}")
    print(
        f"{len(x_train)} train / {len(x_test)} test images {x_train.shape[1:]}; "
        f"jax devices: {jax.devices()}"
    )
    if not args.data:
        print("stand-in classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(STAND_IN_CLASSES)))
    mean = x_train.mean(axis=0)  # Caffe's mean_file: the per-pixel mean of the training set
    x_train, x_test = x_train - mean, x_test - mean

    model = fl.models.cifar10_quick()
    in_shape = (-1, 32, 32, 3)
    print(fl.summary(model, in_shape))
    lr_mult, decay_mult = fl.param_mults(model)
    solver = fl.optim.sgd(
        fl.schedules.fixed(0.001),
        momentum=0.9,
        weight_decay=0.004,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )
    # fit() would build the train state itself; under jit it is one compilation instead of
    # one per initializer call.
    train_state = jax.jit(lambda key: fl.train.create_train_state(model, solver, in_shape, key))(
        jax.random.key(args.seed)
    )
    start = time.perf_counter()
    _, history = fl.train.fit(
        model,
        fl.losses.softmax_cross_entropy,
        solver,
        (x_train, y_train),
        batch_size=100,
        iterations=args.iterations,
        train_state=train_state,
        seed=args.seed,
        metrics={"accuracy": fl.losses.accuracy},
        eval_data=(x_test, y_test),
        eval_every=min(500, args.iterations),
        log_every=min(50, args.iterations),
    )
    seconds = time.perf_counter() - start
    history.save_json(os.path.join(args.out, "history.json"))
    history.save_csv(os.path.join(args.out, "history.csv"))
    try:
        history.plot(os.path.join(args.out, "curves.png"), title=f"cifar10_quick on {source}")
        plotted = "curves.png, "
    except ImportError as e:  # matplotlib is optional; the message says how to install it
        print(e)
        plotted = ""
    its, losses = history.column("loss")
    _, accs = history.column("accuracy")
    shown = sorted({0, *np.linspace(0, len(its) - 1, 6).astype(int).tolist()})
    print("iteration  train_loss  train_accuracy (means since the previous row)")
    for i in shown:
        print(f"{its[i]:9d}  {losses[i]:10.4f}  {accs[i]:14.3f}")
    print("iteration  test_loss  test_accuracy")
    for r in history.records:
        if "test_accuracy" in r:
            print(f"{r['iteration']:9d}  {r['test_loss']:9.4f}  {r['test_accuracy']:13.3f}")
    print(
        f"trained {args.iterations} iterations in {seconds:.1f} s; wrote {plotted}"
        f"history.json/csv to {args.out}"
    )
    kind = "real CIFAR-10" if args.data else "the generated stand-in, not CIFAR-10"
    print(f"final test accuracy: {history.records[-1]['test_accuracy']:.3f} on {kind}")


if __name__ == "__main__":
    main()
