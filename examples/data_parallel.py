"""Train LeNet data-parallel on every device JAX sees, and check it against one device.

``fl.train.fit(..., mesh=mesh)`` splits each global batch over the mesh's ``"data"`` axis and
replicates everything else; XLA sums the gradients across devices. The step is the
single-device step on the global batch, so the parameters after a few iterations equal those
of a run without a mesh up to the order of floating-point sums: this script trains a few
iterations both ways and prints the largest difference, then trains LeNet on the bundled
digits on all devices and prints the test accuracy.

On a machine without accelerators JAX sees one CPU device; ``--cpu-devices N`` (default 4)
adds ``--xla_force_host_platform_device_count=N`` to ``XLA_FLAGS`` before jax is imported
(unless ``XLA_FLAGS`` already sets a host device count) so that the mesh has N devices. They
share the machine's cores: this shows the mechanics, not a speedup. The flag only affects the
CPU backend; on a GPU or TPU machine the mesh is over the accelerators.

    python examples/data_parallel.py [--cpu-devices 4] [--epochs 10] [--batch-size 64]
                                     [--check-iterations 5] [--out runs/data_parallel]

Several hosts: see docs/scale-out.md. The last line printed is
``final test accuracy: 0.NNN on N devices``.
"""

import argparse
import os
import time

FORCE_FLAG = "--xla_force_host_platform_device_count"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=4,
        help="host devices to force on the CPU backend (0: leave XLA_FLAGS alone)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--check-iterations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/data_parallel")
    return parser.parse_args()


def force_host_devices(n):
    """Adds the host device count to XLA_FLAGS; must run before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 0 and FORCE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FORCE_FLAG}={n}".strip()


def main():
    args = parse_args()
    force_host_devices(args.cpu_devices)

    import jax
    import numpy as np

    import fnlayers as fl

    os.makedirs(args.out, exist_ok=True)
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",))
    if args.batch_size % n:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {n} devices")
    print(
        f"{n} {jax.devices()[0].platform} devices: {jax.devices()}\n"
        f"global batch {args.batch_size} = {n} devices x {args.batch_size // n} per device"
    )

    data = fl.data.load_digits(28)
    model = fl.models.lenet()
    lr_mult, decay_mult = fl.param_mults(model)
    solver = fl.optim.sgd(
        fl.schedules.inv(0.01, gamma=1e-4, power=0.75),
        momentum=0.9,
        weight_decay=5e-4,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )

    def train(iterations=None, epochs=None, **kw):
        return fl.train.fit(
            model,
            fl.losses.softmax_cross_entropy,
            solver,
            (data.x_train, data.y_train),
            batch_size=args.batch_size,
            iterations=iterations,
            epochs=epochs,
            seed=args.seed,
            progress=False,
            **kw,
        )

    # The same iterations on one device and on the mesh: the same numbers, summed in another
    # order. (to_host is a no-op here; in a multi-process run it reads the replicated
    # parameters from this process's devices.)
    k = args.check_iterations
    single, _ = train(iterations=k)
    parallel, _ = train(iterations=k, mesh=mesh)
    parallel_params = fl.distributed.data_parallel(mesh).to_host(parallel.params)
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(single.params), jax.tree.leaves(parallel_params), strict=True
        )
    )
    print(f"params after {k} iterations: max |mesh - one device| = {diff:.2e}")

    ckpt = os.path.join(args.out, "checkpoint.npz")
    if os.path.exists(ckpt):
        os.remove(ckpt)  # a fresh run each time
    start = time.perf_counter()
    _, history = train(
        epochs=args.epochs,
        mesh=mesh,
        metrics={"accuracy": fl.losses.accuracy},
        eval_data=(data.x_test, data.y_test),
        checkpoint_path=ckpt,
        log_every=5,
    )
    seconds = time.perf_counter() - start
    history.save_json(os.path.join(args.out, "history.json"))
    steps = history.records[-1]["iteration"]
    print(
        f"trained {args.epochs} epochs ({steps} steps of {args.batch_size} images) on {n} "
        f"devices in {seconds:.1f} s; wrote checkpoint.npz and history.json to {args.out}"
    )
    print(f"final test accuracy: {history.records[-1]['test_accuracy']:.3f} on {n} devices")


if __name__ == "__main__":
    main()
