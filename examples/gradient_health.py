"""Gradient health: measure the classic claims about vanishing and exploding gradients.

The background notes this project grew from claim that (1) a sigmoid's derivative is at most
1/4, so the gradient shrinks by at least 4x per sigmoid layer, and ReLU, careful initialisation
and batch norm cure that; (2) a badly scaled initialisation makes gradients explode, parameters
turn NaN and Caffe's softmax loss then sits at 87.3365, and Xavier initialisation cures it;
(3) batch norm speeds up convergence 5x-20x; dropout regularises; momentum matters; step and
poly are the common learning-rate policies. Each experiment below measures one of them on the
1797 handwritten digits bundled with fnlayers, prints a table and saves a plot:

``depth``       a 10-layer sigmoid MLP (Caffe's gaussian std 0.01 filler) vs sigmoid+Xavier,
                ReLU+MSRA and sigmoid+batch norm: per-layer gradient norms at initialisation
                and after training, and the factor lost per layer.
``bad_init``    a ReLU MLP initialised with gaussian std 1: loss and gradient norms per step,
                with our softmax loss, with Caffe's clamped one (CPU ``std::max``: NaN passes;
                CUDA ``max``: NaN is dropped, the value sits at 87.3365), and the cures
                (Xavier, gradient clipping).
``batch_norm``  Caffe's cifar10_full_sigmoid_bn (``fl.models.cifar10_bn``) vs the same network
                without its BatchNorm layers, on the digits resized to 32x32 and repeated to
                3 channels: iterations to a fixed test accuracy.
``dropout``     an MLP with and without dropout 0.5: the train/test accuracy gap.
``momentum``    momentum 0 vs 0.9 (and momentum 0 at 10x the rate).
``policies``    fixed, step, poly and inv learning-rate policies.
``overhead``    the cost of ``fit``'s per-layer diagnostics on LeNet's train step.

    python examples/gradient_health.py [--out runs/gradient_health] [--only depth,bad_init]
                                       [--bn-iterations 300]
    python examples/gradient_health.py --quick     # every code path, tiny runs: a smoke test

``--quick`` runs a few iterations of one or two runs per experiment; its time is XLA
compilation, which ``XLA_FLAGS=--xla_backend_optimization_level=0`` roughly halves.

Everything is seeded; timings depend on the machine. docs/gradient-health.md discusses a run.
"""

import argparse
import itertools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fnlayers as fl
from fnlayers import _plot, diagnostics, losses, optim, schedules, train

EXPERIMENTS = ("depth", "bad_init", "batch_norm", "dropout", "momentum", "policies", "overhead")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: a smoke test")
    parser.add_argument("--out", default="runs/gradient_health")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated list")
    parser.add_argument(
        "--bn-iterations",
        type=int,
        default=300,
        help="iterations of the runs without batch norm (the run with it always does 300)",
    )
    args = parser.parse_args()
    chosen = [e for e in args.only.split(",") if e]
    unknown = sorted(set(chosen) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"--only: unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    os.makedirs(args.out, exist_ok=True)
    print(f"jax devices: {jax.devices()}; quick={args.quick}")
    start = time.perf_counter()
    for name in EXPERIMENTS:
        if name in chosen:
            t0 = time.perf_counter()
            print(f"\n=== {name} " + "=" * (70 - len(name)))
            globals()[f"experiment_{name}"](args)
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]")
    print(f"\nall experiments: {time.perf_counter() - start:.1f} s; plots in {args.out}")


# ----------------------------------------------------------------------------- experiments


def experiment_depth(args):
    """Vanishing gradients in a 10-layer MLP, and three cures."""
    quick, out = args.quick, args.out
    d = fl.data.load_digits(10)
    iterations = 6 if quick else 1000
    depth = 4 if quick else 10  # quick: the same code paths, smaller programs to compile
    gauss = fl.init.gaussian(0.01)
    variants = {
        "sigmoid, gaussian 0.01": mlp("sigmoid", gauss, depth=depth),
        "sigmoid, Xavier": mlp("sigmoid", fl.init.xavier(), depth=depth),
        "ReLU, MSRA": mlp("relu", fl.init.msra(), depth=depth),
        "sigmoid+BN, gaussian 0.01": mlp("sigmoid", gauss, depth=depth, batch_norm=True),
    }
    if quick:  # one run per experiment: the same code paths, a fraction of the compilations
        variants = {k: v for k, v in variants.items() if k == "sigmoid, Xavier"}
    batch = (d.x_train[:256], d.y_train[:256])
    print(
        f"{depth} Dense layers ({depth - 1} hidden of 64 units + 10 outputs) on 10x10 digits; "
        f"SGD lr 0.01, momentum 0.9, batch 64, {iterations} iterations. Gradients on a fixed "
        "batch of 256."
    )
    rows, profiles, histories = [], {}, {}
    for label, model in variants.items():
        ts = train.create_train_state(model, optim.sgd(0.01, momentum=0.9), (-1, 10, 10, 1), key0())
        before = diagnostics.diagnose(
            model, losses.softmax_cross_entropy, ts.params, ts.state, *batch, key=key0()
        )
        ts, history, _ = run_fit(
            model,
            optim.sgd(0.01, momentum=0.9),
            d,
            iterations=iterations,
            train_state=ts,
            diagnostics_every=max(1, iterations // 20),
        )
        after = diagnostics.diagnose(
            model, losses.softmax_cross_entropy, ts.params, ts.state, *batch, key=key0()
        )
        histories[label] = history
        profiles[label] = (dense_norms(before), dense_norms(after))
        rows.append((label, before, after, last(history, "test_accuracy")))
        if label == "sigmoid, Xavier":
            print(f"\nsigmoid, Xavier at initialisation, every layer:\n{before}\n")

    lines = []
    for label, before, after, acc in rows:
        for when, rep in (("init", before), ("trained", after)):
            g = list(dense_norms(rep).values())
            per_layer, across_min = hidden_factors(rep)
            lines.append(
                [
                    label,
                    when,
                    f"{g[0]:.2e}",
                    f"{g[-1]:.2e}",
                    f"{g[-1] / g[0]:.2e}",
                    f"{per_layer:.2f}x",
                    f"{across_min:.2f}x",
                    f"{acc:.3f}" if when == "trained" else "",
                ]
            )
    table(
        [
            "variant",
            "when",
            "|g| ip1",
            f"|g| ip{depth}",
            f"ip{depth}/ip1",
            "per layer",
            "per act (min)",
            "test acc",
        ],
        lines,
    )
    print(
        f"per layer: geometric mean over the {depth - 2} hidden-to-hidden steps of |dL/dh_i+1| -> "
        "|dL/dh_i| (h_i = output of hidden layer i), the factor the backward pass loses per "
        "layer; per act (min): the smallest factor lost across one activation alone "
        "(sigmoid: >= 4 by the bound sigma' <= 1/4)."
    )
    names = list(next(iter(profiles.values()))[0])
    print("\nweight-gradient norm per layer, at initialisation:")
    table(
        ["layer", *variants],
        [[n] + [f"{profiles[v][0][n]:.2e}" for v in variants] for n in names],
    )
    plot_profiles(profiles, os.path.join(out, "depth_profile.png"))
    diagnostics.plot_grad_norms(
        histories["sigmoid, Xavier"],
        os.path.join(out, "depth_training.png"),
        layers=names,
        title=f"{depth}-layer sigmoid MLP, Xavier: weight-gradient norms during training",
    )


def experiment_bad_init(args):
    """Exploding gradients from a badly scaled initialisation; Caffe's 87.3365 plateau."""
    quick, out = args.quick, args.out
    d = fl.data.load_digits(10)
    iterations = 6 if quick else 200
    bad, good = fl.init.gaussian(1.0), fl.init.xavier()
    ours = losses.softmax_cross_entropy

    def caffe_cpu(logits, labels):
        return losses.softmax_cross_entropy(logits, labels, clamp=True)

    runs = {
        "gaussian 1, our loss": (bad, ours, {}),
        "gaussian 1, Caffe CPU loss": (bad, caffe_cpu, {}),
        "gaussian 1, Caffe GPU loss": (bad, caffe_gpu_softmax_loss, {}),
        "gaussian 1, lr 0.01": (bad, ours, {"lr": 0.01}),
        "Xavier, our loss": (good, ours, {}),
        "gaussian 1, clip 1": (bad, ours, {"clip_gradients": 1.0}),
        "gaussian 1, clip 10": (bad, ours, {"clip_gradients": 10.0}),
    }
    if quick:
        runs = {k: v for k, v in runs.items() if k.endswith(("our loss", "GPU loss"))}
    print(
        "5 Dense layers (4 hidden ReLU of 64 units) on 10x10 digits, weights N(0, 1) (Caffe's "
        f"gaussian filler default std) or Xavier; SGD lr 0.1, momentum 0.9, batch 64, "
        f"{iterations} iterations.\nCaffe CPU loss: -log(max(p, FLT_MIN)), NaN propagates "
        "(fl.losses.softmax_cross_entropy(clamp=True)); Caffe GPU loss: the same with CUDA's "
        "max, which returns the non-NaN operand."
    )
    model = mlp("relu", bad, depth=5)
    ts = train.create_train_state(model, optim.sgd(0.1, momentum=0.9), (-1, 10, 10, 1), key0())
    first = diagnostics.diagnose(
        model, ours, ts.params, ts.state, d.x_train[:64], d.y_train[:64], activations=False
    )
    print(f"\ngaussian 1 at initialisation:\n{first}\n")
    rows, curves = [], {}
    for label, (w_init, loss_fn, kw) in runs.items():
        model = mlp("relu", w_init, depth=5)
        solver = optim.sgd(kw.get("lr", 0.1), momentum=0.9, clip_gradients=kw.get("clip_gradients"))
        ts, history, error = run_fit(
            model,
            solver,
            d,
            iterations=iterations,
            loss_fn=loss_fn,
            log_every=1,
            diagnostics_every=1,
        )
        its, loss = history.column("loss")  # loss[i]: the loss of step i (log_every=1)
        # the largest layer gradient norm of each step; NaN once every layer's is NaN
        grad_max = [
            float(np.nanmax([v for k, v in r.items() if k.startswith("grad_norm/")] + [-1.0]))
            for r in history.records
            if any(k.startswith("grad_norm/") for k in r)
        ]
        grad_max = [g if g >= 0 else math.nan for g in grad_max]
        curves[label] = (its, loss, grad_max)
        if error is None:
            finite = all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(ts.params))
            end = f"ran {iterations}, params " + ("finite" if finite else "NaN")
            if finite:  # a ReLU layer whose every output is 0 passes no gradient back
                rep = diagnostics.diagnose(
                    model, ours, ts.params, ts.state, d.x_train[:256], d.y_train[:256]
                )
                dead = [k for k, a in rep.activations.items() if k.startswith("relu")]
                dead = [k for k in dead if rep.activations[k]["zero_fraction"] == 1.0]
                end += f", dead: {','.join(dead) or 'none'}"
            # fl.losses.accuracy counts an all-NaN row as correct (no score >= NaN), so an
            # accuracy of NaN parameters is meaningless
            acc = f"{last(history, 'test_accuracy'):.3f}" if finite else "n/a"
        else:
            end = f"NaN loss at step {error.iteration}: {error.layer}"
            acc = ""
            loss = [*loss, math.nan]
        nan_steps = sum(1 for g in grad_max if not math.isfinite(g))
        rows.append(
            [label]
            + [fmt_loss(loss[i]) if i < len(loss) else "" for i in (0, 1, 2, 3)]
            + [fmt_loss(loss[-1]) if loss else "", f"{np.nanmax(grad_max):.1e}"]
            + [str(nan_steps), end, acc]
        )
    table(
        ["run", *(f"step {i}" for i in range(4)), "last", "max |g|", "NaN |g|", "outcome", "acc"],
        rows,
    )
    print(
        "step i: the training loss of step i (0-based, as fit's messages count); max |g|: the "
        "largest finite layer gradient norm of the run; NaN |g|: steps whose gradients were NaN; "
        "outcome: fit's NonFiniteLossError and the layer it names (the first the backward pass "
        "reached with a non-finite gradient), or the end of the run and the ReLU layers whose "
        "every output is 0 on 256 training images (dead)."
    )
    plot_bad_init(curves, os.path.join(out, "bad_init.png"))


def experiment_batch_norm(args):
    """Caffe's cifar10_full_sigmoid with and without batch norm."""
    quick, out = args.quick, args.out
    d = fl.data.load_digits(32)
    x_train, x_test = np.repeat(d.x_train, 3, axis=-1), np.repeat(d.x_test, 3, axis=-1)
    mean = x_train.mean(axis=0, keepdims=True)  # Caffe's mean_file
    n_test = 64 if quick else len(x_test)  # quick: convolutions on 359 images take seconds
    data = fl.data.Dataset(x_train - mean, d.y_train, x_test[:n_test] - mean, d.y_test[:n_test])
    iterations = 2 if quick else 300
    eval_every = iterations if quick else 20
    longer = 2 if quick else max(iterations, args.bn_iterations)
    target = 0.5
    with_bn = fl.models.cifar10_bn()
    without = fl.serial(
        *[layer.named(n) for n, layer in with_bn.children if layer.kind != "batch_norm"],
        name="cifar10_full_sigmoid",
    )
    runs = {
        "with BN, lr 0.001": (with_bn, 0.001, iterations),
        "without BN, lr 0.001": (without, 0.001, longer),
        "without BN, lr 0.1": (without, 0.1, longer),
    }
    if quick:
        runs = {k: v for k, v in runs.items() if k.startswith("with BN")}
    print(
        "fl.models.cifar10_bn (conv-pool-BN-sigmoid x3, Caffe's fillers) vs the same without "
        "its BatchNorm layers; digits resized to 32x32, repeated to 3 channels, mean image "
        f"subtracted. Recipe solver: SGD momentum 0.9, lr 0.001 (fixed); batch 32 instead of "
        f"100; {iterations} iterations with BN, {longer} without; test accuracy every "
        f"{eval_every}. Target: {target}."
    )
    rows, curves, reached = [], {}, {}
    for label, (model, lr, run_iterations) in runs.items():
        lr_mult, decay_mult = fl.param_mults(model)
        solver = optim.sgd(lr, momentum=0.9, lr_mult=lr_mult, decay_mult=decay_mult)
        t0 = time.perf_counter()
        _, history, _ = run_fit(
            model,
            solver,
            data,
            iterations=run_iterations,
            batch_size=32,
            eval_every=eval_every,
            diagnostics_every=None if quick else 50,
        )
        seconds = time.perf_counter() - t0
        its, acc = history.column("test_accuracy")
        curves[label] = (its, acc, history)
        reached[label] = next((i for i, a in zip(its, acc, strict=True) if a >= target), None)
        g0 = {k[10:]: v for k, v in history.records[0].items() if k.startswith("grad_norm/")}
        rows.append(
            [
                label,
                str(reached[label]) if reached[label] else f"> {run_iterations}",
                f"{max(acc):.3f}",
                f"{acc[-1]:.3f}",
                f"{g0['conv1']:.1e}" if g0 else "",
                f"{g0['ip1']:.1e}" if g0 else "",
                f"{seconds:.0f}",
            ]
        )
    table(
        ["run", f"its to {target}", "best acc", "last acc", "|g| conv1", "|g| ip1", "s"],
        rows,
    )
    base = reached.get("with BN, lr 0.001")
    for label in runs:
        if label.startswith("without") and base:
            other = reached[label]
            ratio = f"{other / base:.1f}x" if other else f"> {longer / base:.1f}x (lower bound)"
            print(f"speed-up of BN over '{label}': {ratio}")
    print("|g|: weight-gradient norm at the first iteration (fit's diagnostics).")
    plot_accuracy(
        {k: v[:2] for k, v in curves.items()},
        os.path.join(out, "batch_norm.png"),
        title="cifar10_full_sigmoid on 32x32 digits: with vs without batch norm",
        target=target,
    )
    if not quick:
        diagnostics.plot_grad_norms(
            curves["without BN, lr 0.001"][2],
            os.path.join(out, "batch_norm_grads.png"),
            title="without BN, lr 0.001: weight-gradient norms",
        )


def experiment_dropout(args):
    """Dropout on vs off: the gap between training and test accuracy."""
    quick, out = args.quick, args.out
    d = fl.data.load_digits(10)
    iterations = 4 if quick else 1500
    rows, curves = [], {}
    for rate in (0.5,) if quick else (0.0, 0.5):
        layers = []
        for i in range(2):
            layers += [fl.Dense(512, w_init=fl.init.msra(), name=f"ip{i + 1}"), fl.ReLU()]
            if rate:
                layers.append(fl.Dropout(rate))
        model = fl.serial(*layers, fl.Dense(10, name="ip3"))
        ts, history, _ = run_fit(
            model,
            optim.sgd(0.01, momentum=0.9),
            d,
            iterations=iterations,
            eval_every=max(1, iterations // 15),
        )
        train_acc = accuracy_on(model, ts, d, on_train=True)
        test_acc = last(history, "test_accuracy")
        label = f"dropout {rate}"
        curves[label] = history.column("test_accuracy")
        rows.append(
            [
                label,
                f"{train_acc:.3f}",
                f"{test_acc:.3f}",
                f"{train_acc - test_acc:+.3f}",
                f"{last(history, 'test_loss'):.3f}",
            ]
        )
    print(
        "MLP 100-512-512-10, ReLU, MSRA; dropout after each hidden layer or none; SGD lr "
        f"0.01, momentum 0.9, batch 64, {iterations} iterations (1438 training images)."
    )
    table(["run", "train acc", "test acc", "gap", "test loss"], rows)
    plot_accuracy(curves, os.path.join(out, "dropout.png"), title="dropout on vs off")


def experiment_momentum(args):
    """Momentum 0 vs 0.9."""
    quick, out = args.quick, args.out
    d = fl.data.load_digits(10)
    iterations = 4 if quick else 600
    runs = {"lr 0.01, momentum 0": (0.01, 0.0), "lr 0.01, momentum 0.9": (0.01, 0.9)}
    runs["lr 0.1, momentum 0"] = (0.1, 0.0)
    if quick:
        runs = {k: v for k, v in runs.items() if k.endswith("0.9")}
    rows, curves = [], {}
    for label, (lr, momentum) in runs.items():
        model = small_mlp()
        _, history, _ = run_fit(
            model,
            optim.sgd(lr, momentum=momentum),
            d,
            iterations=iterations,
            eval_every=max(1, iterations // 30),
        )
        its, acc = history.column("test_accuracy")
        curves[label] = (its, acc)
        first = next((i for i, a in zip(its, acc, strict=True) if a >= 0.9), None)
        rows.append(
            [
                label,
                str(first) if first else f"> {iterations}",
                f"{acc[-1]:.3f}",
                f"{history.column('loss')[1][-1]:.3f}",
            ]
        )
    print(
        "MLP 100-128-128-10, ReLU, MSRA; SGD, batch 64, fixed rate, "
        f"{iterations} iterations. With momentum m the steady-state step is lr/(1-m)."
    )
    table(["run", "its to 0.9", "test acc", "train loss"], rows)
    plot_accuracy(curves, os.path.join(out, "momentum.png"), title="momentum 0 vs 0.9")


def experiment_policies(args):
    """Caffe's learning-rate policies: fixed, step, poly, inv."""
    quick, out = args.quick, args.out
    d = fl.data.load_digits(10)
    iterations = 4 if quick else 600
    base = 0.01
    policies = {
        "fixed": schedules.fixed(base),
        "step (0.1 every 200)": schedules.step(base, gamma=0.1, stepsize=max(1, iterations // 3)),
        "poly (power 1)": schedules.poly(base, power=1.0, max_iter=iterations),
        "inv (LeNet's)": schedules.inv(base, gamma=1e-4, power=0.75),
    }
    if quick:
        policies = {k: v for k, v in policies.items() if k.startswith("poly")}
    rows, curves = [], {}
    for label, policy in policies.items():
        model = small_mlp()
        _, history, _ = run_fit(
            model,
            optim.sgd(policy, momentum=0.9),
            d,
            iterations=iterations,
            eval_every=max(1, iterations // 30),
        )
        its, acc = history.column("test_accuracy")
        curves[label] = (its, acc)
        _, loss = history.column("loss")
        rows.append(
            [
                label,
                f"{float(policy(iterations - 1)):.2e}",
                f"{acc[-1]:.3f}",
                f"{max(acc):.3f}",
                f"{np.mean(loss[-max(1, len(loss) // 10) :]):.4f}",
            ]
        )
    print(
        f"MLP 100-128-128-10 as above; SGD momentum 0.9, base_lr {base}, batch 64, "
        f"{iterations} iterations."
    )
    table(["policy", "last lr", "test acc", "best acc", "train loss (last 10%)"], rows)
    plot_accuracy(curves, os.path.join(out, "policies.png"), title="learning-rate policies")


def experiment_overhead(args):
    """What the per-layer gradient diagnostics cost in LeNet's train step."""
    quick = args.quick
    reps = 5 if quick else 150
    if quick:
        model, shape = small_mlp(), (64, 10, 10, 1)
        name = "MLP 100-128-128-10 (quick)"
    else:
        model, shape = fl.models.lenet(), (64, 28, 28, 1)
        name = "LeNet"
    solver = optim.sgd(0.01, momentum=0.9)
    x = jnp.asarray(np.random.default_rng(0).random(shape, np.float32))
    y = jnp.asarray(np.arange(shape[0], dtype=np.int32) % 10)
    variants = {
        "plain step": {},
        "+ finiteness (fit's default)": {"grad_finite": True},
        "+ norms (diagnostics step)": {"grad_finite": True, "grad_norms": True},
    }
    steps, states, costs, compile_s = {}, {}, {}, {}
    for label, kw in variants.items():
        step = train.make_train_step(model, losses.softmax_cross_entropy, solver, **kw)
        ts = train.create_train_state(model, solver, (-1, *shape[1:]), key0())
        t0 = time.perf_counter()
        cost = step.lower(ts, x, y).compile().cost_analysis()
        compile_s[label] = time.perf_counter() - t0
        costs[label] = cost[0] if isinstance(cost, list) else cost
        ts, metrics = step(ts, x, y)
        jax.block_until_ready(metrics)
        steps[label], states[label] = step, ts
    times = {label: [] for label in variants}
    order = list(variants)
    for rep in range(reps):  # interleaved, alternating order: load hits every variant alike
        for label in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            states[label], metrics = steps[label](states[label], x, y)
            jax.block_until_ready(metrics)
            times[label].append(time.perf_counter() - t0)
    ref = "plain step"
    print(
        f"{name}, batch {shape[0]}, SGD momentum 0.9; median (and min) of {reps} interleaved "
        "steps after compilation; flops/bytes from XLA's cost analysis of the compiled step."
    )
    rows = []
    for label in variants:
        med, low = np.median(times[label]), np.min(times[label])
        flops, nbytes = costs[label].get("flops", math.nan), costs[label].get("bytes accessed")
        rows.append(
            [
                label,
                f"{med * 1e3:.2f}",
                f"{med / np.median(times[ref]) - 1:+.1%}",
                f"{low * 1e3:.2f}",
                f"{low / np.min(times[ref]) - 1:+.1%}",
                f"{flops / costs[ref]['flops'] - 1:+.2%}",
                f"{nbytes / costs[ref]['bytes accessed'] - 1:+.2%}" if nbytes else "",
                f"{compile_s[label]:.1f}",
            ]
        )
    table(
        ["step", "median ms", "vs plain", "min ms", "vs plain", "flops", "bytes", "compile s"],
        rows,
    )
    print(
        "fit compiles the plain step with finiteness always, and the norms step as well when "
        "diagnostics_every is set; it runs the norms step only at the recorded iterations."
    )


# ----------------------------------------------------------------------------- helpers


def key0():
    return jax.random.key(0)


def mlp(activation, w_init, *, depth=10, width=64, batch_norm=False):
    """``depth`` Dense layers named ip1..ip<depth>, each hidden one followed by an optional
    BatchNorm and the activation (named sigmoid<i>/relu<i>)."""
    act = {"sigmoid": fl.Sigmoid, "relu": fl.ReLU}[activation]
    layers = []
    for i in range(1, depth):
        layers.append(fl.Dense(width, w_init=w_init, name=f"ip{i}"))
        if batch_norm:
            layers.append(fl.BatchNorm(name=f"bn{i}"))
        layers.append(act(name=f"{activation}{i}"))
    layers.append(fl.Dense(10, w_init=w_init, name=f"ip{depth}"))
    return fl.serial(*layers)


def small_mlp():
    return fl.serial(
        fl.Dense(128, w_init=fl.init.msra(), name="ip1"),
        fl.ReLU(),
        fl.Dense(128, w_init=fl.init.msra(), name="ip2"),
        fl.ReLU(),
        fl.Dense(10, name="ip3"),
    )


def run_fit(
    model,
    solver,
    d,
    *,
    iterations,
    loss_fn=losses.softmax_cross_entropy,
    batch_size=64,
    eval_every=None,
    log_every=None,
    diagnostics_every=None,
    train_state=None,
):
    """``fit`` on ``d``'s training set with accuracy and test evaluation; a non-finite loss
    ends the run instead of raising: returns ``(train_state, history, None)``, or
    ``(None, history so far, the NonFiniteLossError)``."""
    try:
        ts, history = train.fit(
            model,
            loss_fn,
            solver,
            (d.x_train, d.y_train),
            batch_size=batch_size,
            iterations=iterations,
            train_state=train_state,
            key=key0(),
            metrics={"accuracy": losses.accuracy},
            eval_data=(d.x_test, d.y_test),
            eval_every=eval_every or iterations,
            eval_batch_size=len(d.x_test),  # one batch: one compilation
            log_every=log_every or max(1, iterations // 50),
            diagnostics_every=diagnostics_every,
            progress=False,
        )
        return ts, history, None
    except train.NonFiniteLossError as error:
        return None, error.history, error


def accuracy_on(model, ts, d, *, on_train=False):
    step = train.make_eval_step(
        model, losses.softmax_cross_entropy, metrics={"accuracy": losses.accuracy}
    )
    x, y = (d.x_train, d.y_train) if on_train else (d.x_test, d.y_test)
    return train.evaluate(step, ts.params, ts.state, x, y, batch_size=len(x))["accuracy"]


def last(history, name):
    """The last recorded value of ``name`` (fit evaluates at the final iteration)."""
    return history.column(name)[1][-1]


def dense_norms(rep):
    """The weight-gradient norms of the Dense layers ip1, ip2, ... (batch norm left out)."""
    return {k: v for k, v in rep.grad_norm.items() if k.startswith("ip")}


def hidden_factors(rep):
    """``(geometric-mean factor per hidden layer, smallest factor across one activation)``
    from the gradients with respect to the layer outputs (see the printed explanation)."""
    acts = [k for k in rep.layers if k.startswith(("sigmoid", "relu"))]
    g = rep.output_grad_norm
    per = [g[b] / g[a] for a, b in itertools.pairwise(acts) if g[a] > 0]
    geo = math.exp(np.mean(np.log(per))) if per and all(p > 0 for p in per) else math.nan
    across = []
    for act in acts:
        before = rep.layers[rep.layers.index(act) - 1]  # the Dense (or BN) feeding it
        if g[before] > 0:
            across.append(g[act] / g[before])
    return geo, min(across, default=math.nan)


@jax.custom_vjp
def caffe_gpu_softmax_loss(logits, labels):
    """Caffe's SoftmaxWithLoss value as its CUDA kernel computes it: ``-log(max(p, FLT_MIN))``
    with CUDA's ``max`` (``fmaxf``), which returns FLT_MIN when ``p`` is NaN; gradient
    ``(softmax - onehot) / N`` as Caffe's backward."""
    p = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
    return jnp.mean(-jnp.log(jnp.fmax(p, np.float32(losses.FLT_MIN))))


def _caffe_gpu_fwd(logits, labels):
    return caffe_gpu_softmax_loss(logits, labels), (logits, labels)


def _caffe_gpu_bwd(res, g):
    logits, labels = res
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    grad = (jax.nn.softmax(logits, axis=-1) - onehot) / logits.shape[0]
    return g * grad, None


caffe_gpu_softmax_loss.defvjp(_caffe_gpu_fwd, _caffe_gpu_bwd)


def fmt_loss(v):
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def table(header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(
        f"{h:<{w}}" if i == 0 else f"{h:>{w}}"
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(line)
    for r in rows:
        print(
            "  ".join(
                f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def plot_profiles(profiles, path):
    plt = _plot.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, which, title in ((axes[0], 0, "at initialisation"), (axes[1], 1, "after training")):
        for label, pair in profiles.items():
            norms = pair[which]
            ax.plot(range(1, len(norms) + 1), list(norms.values()), marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("Dense layer (1 = input side)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("weight-gradient norm")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_bad_init(curves, path):
    plt = _plot.pyplot()
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    for label, (its, loss, grad_max) in curves.items():
        loss = [v if math.isfinite(v) else math.nan for v in loss]
        ax_loss.plot(its, loss, label=label)
        ax_grad.plot(range(1, len(grad_max) + 1), grad_max, label=label)
    for ax, ylabel in ((ax_loss, "training loss"), (ax_grad, "largest layer gradient norm")):
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_loss.axhline(-math.log(losses.FLT_MIN), color="k", lw=0.6, ls=":")
    ax_loss.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_accuracy(curves, path, *, title, target=None):
    plt = _plot.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for label, (its, acc) in curves.items():
        ax.plot(its, acc, marker="o", ms=2, label=label)
    if target is not None:
        ax.axhline(target, color="k", lw=0.6, ls=":")
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


if __name__ == "__main__":
    main()
