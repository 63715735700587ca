"""Train Caffe's LeNet with Caffe's LeNet solver on real handwritten digits.

The recipe is ``mnist/lenet_solver.prototxt``: SGD with momentum 0.9, weight decay 5e-4,
base_lr 0.01 with the ``inv`` policy (gamma 1e-4, power 0.75), batch 64, biases at lr_mult 2.
The data are the 1797 handwritten digits bundled with fnlayers (8x8 scans resized to 28x28,
1438 for training, 359 for testing). With so few training images, each batch is shifted by up
to one pixel (``fl.data.random_shift(1)``, the kind of thing Caffe's ``transform_param`` does);
``--max-shift 0`` trains on the images as they are.

    python examples/train_lenet.py [--epochs 40] [--max-shift 1] [--out runs/lenet]

Writes a checkpoint, the history (JSON and CSV) and a PNG of the loss/accuracy curves under
``--out``; the last line printed is ``final test accuracy: 0.NNN``.
"""

import argparse
import os
import time

import jax

import fnlayers as fl


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-shift", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/lenet")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    data = fl.data.load_digits(28)
    print(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, "
        f"{data.x_train.shape[1:]} each; jax devices: {jax.devices()}"
    )
    model = fl.models.lenet()
    print(fl.summary(model, (-1, 28, 28, 1)))

    lr_mult, decay_mult = fl.param_mults(model)
    solver = fl.optim.sgd(
        fl.schedules.inv(0.01, gamma=1e-4, power=0.75),
        momentum=0.9,
        weight_decay=5e-4,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )
    ckpt = os.path.join(args.out, "checkpoint.npz")
    if os.path.exists(ckpt):
        os.remove(ckpt)  # a fresh run each time; fit(resume=True) would continue it instead
    start = time.perf_counter()
    _, history = fl.train.fit(
        model,
        fl.losses.softmax_cross_entropy,
        solver,
        (data.x_train, data.y_train),
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        metrics={"accuracy": fl.losses.accuracy},
        eval_data=(data.x_test, data.y_test),
        checkpoint_path=ckpt,
        augment=fl.data.random_shift(args.max_shift) if args.max_shift else None,
    )
    seconds = time.perf_counter() - start
    history.save_json(os.path.join(args.out, "history.json"))
    history.save_csv(os.path.join(args.out, "history.csv"))
    try:
        history.plot(os.path.join(args.out, "curves.png"), title="LeNet on digits, Caffe recipe")
        plotted = "curves.png, "
    except ImportError as e:  # matplotlib is optional; the message says how to install it
        print(e)
        plotted = ""
    print("epoch  test_loss  test_accuracy")
    for r in history.records:
        if "test_accuracy" in r:
            print(f"{r['epoch']:5.1f}  {r['test_loss']:9.4f}  {r['test_accuracy']:13.3f}")
    print(
        f"trained {args.epochs} epochs in {seconds:.1f} s; wrote {plotted}checkpoint.npz, "
        f"history.json/csv to {args.out}"
    )
    print(f"final test accuracy: {history.records[-1]['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
