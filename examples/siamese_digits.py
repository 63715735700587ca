"""Learn a 2-D embedding of handwritten digits with Caffe's Siamese recipe and contrastive loss.

The recipe is ``siamese/mnist_siamese_solver.prototxt``: Caffe's Siamese LeNet
(``fl.models.siamese_lenet``: one LeNet trunk with shared weights, a 2-D ``feat`` output),
``ContrastiveLoss`` with margin 1, SGD with momentum 0.9, no weight decay, base_lr 0.01 with the
``inv`` policy (gamma 1e-4, power 0.75), batch 64, biases at lr_mult 2. Caffe runs 50,000
iterations on MNIST; the default 800 (each training image is seen about 70 times) already
separate the digits here.

The data are the 1797 handwritten digits bundled with fnlayers (``fl.data.load_digits(28)``:
1438 training and 359 test images). Caffe's recipe pairs MNIST images at random, so only about
one pair in ten is similar; with so few images this script balances the pairs instead. Pairs are
a deterministic function of ``--seed``: pair ``i`` takes a uniformly drawn first image, is
*similar* (label 1) with probability 1/2 and then takes a second, different image of the same
digit, else (label 0) an image of another digit, uniformly. The 20,000 training pairs
(``--pairs``) are built from training images only, the 2,000 test pairs from test images only.

The network never sees a digit label; it only learns "same digit or not". What it shows is that
the 2-D embedding nevertheless separates the ten digits. After training the script embeds every
image with the trained trunk and reports, next to the same measures for the untrained network,

* nearest-centroid test accuracy: each test image is assigned the digit whose training-set
  centroid (mean embedding) is nearest; chance is 0.1;
* the ratio of the mean distance between test embeddings of different digits to the mean
  distance between test embeddings of the same digit (1.0 means no separation);

and saves a scatter plot of the test embeddings coloured by digit.

    python examples/siamese_digits.py [--iterations 800] [--out runs/siamese_digits]
    python examples/siamese_digits.py --quick        # a few seconds: a smoke test

Writes ``embedding.png``, ``history.json`` and ``embeddings.npz`` under ``--out``; the last line
printed is ``embedding nearest-centroid test accuracy: 0.NNN``.
"""

import argparse
import os
import time

import jax
import numpy as np

import fnlayers as fl
from fnlayers._plot import pyplot_or_none


def make_pairs(labels, num_pairs, rng):
    """``(left, right, similar)`` index arrays: about half the pairs of the same digit.

    ``left`` is uniform over the images; a similar pair's ``right`` is another image of the
    same digit, a dissimilar pair's ``right`` an image of a different digit, both uniform.
    """
    labels = np.asarray(labels)
    n = len(labels)
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    others = {c: np.flatnonzero(labels != c) for c in classes}
    left = rng.integers(0, n, num_pairs)
    similar = (rng.random(num_pairs) < 0.5).astype(np.int32)
    right = np.empty(num_pairs, dtype=np.int64)
    for i, (a, s) in enumerate(zip(left, similar, strict=True)):
        c = labels[a]
        if s:
            pool = members[c]
            k = rng.integers(0, len(pool) - 1)  # uniform over the digit's other images
            right[i] = pool[k + (k >= np.searchsorted(pool, a))]
        else:
            pool = others[c]
            right[i] = pool[rng.integers(0, len(pool))]
    return left, right, similar


def separation(train_emb, train_y, test_emb, test_y):
    """Nearest-centroid test accuracy and between/within mean-distance ratio of the test set."""
    classes = np.unique(train_y)
    centroids = np.stack([train_emb[train_y == c].mean(axis=0) for c in classes])
    dist = np.linalg.norm(test_emb[:, None, :] - centroids[None, :, :], axis=-1)
    accuracy = float(np.mean(classes[np.argmin(dist, axis=1)] == test_y))
    pairwise = np.linalg.norm(test_emb[:, None, :] - test_emb[None, :, :], axis=-1)
    same = test_y[:, None] == test_y[None, :]
    off_diagonal = ~np.eye(len(test_y), dtype=bool)
    within = pairwise[same & off_diagonal].mean()
    between = pairwise[~same].mean()
    return accuracy, float(between / within), centroids


def plot_embedding(path, test_emb, test_y, centroids, title):
    plt = pyplot_or_none()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.2, 6))
    cmap = plt.get_cmap("tab10")
    for c in range(10):
        pts = test_emb[test_y == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=9, color=cmap(c), alpha=0.7, label=str(c))
        ax.text(
            *centroids[c],
            str(c),
            fontsize=14,
            weight="bold",
            ha="center",
            va="center",
            color=cmap(c),
            bbox=dict(boxstyle="circle", fc="white", ec=cmap(c), alpha=0.85),
        )
    ax.set_title(title)
    ax.set_xlabel("feat[0]")
    ax.set_ylabel("feat[1]")
    ax.legend(title="digit", markerscale=2, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--pairs", type=int, default=20000, help="training pairs to build")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few iterations: a smoke test")
    parser.add_argument("--out", default="runs/siamese_digits")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.pairs = 5, 1000
    os.makedirs(args.out, exist_ok=True)

    data = fl.data.load_digits(28)
    rng = np.random.default_rng(args.seed)
    left, right, sim = make_pairs(data.y_train, args.pairs, rng)
    t_left, t_right, t_sim = make_pairs(data.y_test, 2000, rng)
    train_pairs = ((data.x_train[left], data.x_train[right]), sim)
    print(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test images; "
        f"{len(sim)} training pairs ({sim.mean():.1%} similar), {len(t_sim)} test pairs "
        f"({t_sim.mean():.1%} similar); jax devices: {jax.devices()}"
    )

    model = fl.models.siamese_lenet(2)
    in_shape = ((-1, 28, 28, 1), (-1, 28, 28, 1))
    print(fl.summary(model, in_shape))
    lr_mult, decay_mult = fl.param_mults(model)
    solver = fl.optim.sgd(
        fl.schedules.inv(0.01, gamma=1e-4, power=0.75),
        momentum=0.9,
        weight_decay=0.0,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )

    def loss_fn(outs, similar):
        return fl.losses.contrastive(outs[0], outs[1], similar, margin=1.0)

    # The Siamese net is fl.shared(trunk, 2): its params are the trunk's own, so the trunk alone
    # embeds single images. All 1797 images go through in one call: one shape, one compilation.
    (_, trunk), *_ = model.children
    embed_fn = jax.jit(lambda params, state, x: trunk.apply(params, state, x)[0])
    x_all = np.concatenate([data.x_train, data.x_test])
    n_train = len(data.x_train)

    def embed_and_measure(ts):
        emb = np.asarray(embed_fn(ts.params, ts.state, x_all))
        train_emb, test_emb = emb[:n_train], emb[n_train:]
        pair_loss = float(loss_fn((test_emb[t_left], test_emb[t_right]), t_sim))
        return (
            train_emb,
            test_emb,
            pair_loss,
            *separation(train_emb, data.y_train, test_emb, data.y_test),
        )

    # fit() would build this itself; built here (under jit: one compilation instead of one per
    # initializer call) so the untrained embedding can be measured first.
    train_state = jax.jit(lambda k: fl.train.create_train_state(model, solver, in_shape, k))(
        jax.random.key(args.seed)
    )
    *_, loss0, acc0, ratio0, _ = embed_and_measure(train_state)
    print(
        f"before training: test pair loss {loss0:.4f}, nearest-centroid accuracy {acc0:.3f}, "
        f"between/within distance ratio {ratio0:.2f}"
    )

    start = time.perf_counter()
    train_state, history = fl.train.fit(
        model,
        loss_fn,
        solver,
        train_pairs,
        batch_size=args.batch_size,
        iterations=args.iterations,
        train_state=train_state,
        seed=args.seed,
        log_every=min(50, args.iterations),
    )
    seconds = time.perf_counter() - start
    history.save_json(os.path.join(args.out, "history.json"))
    its, losses = history.column("loss")
    shown = sorted({0, *np.linspace(0, len(its) - 1, 6).astype(int).tolist()})
    print("iteration  train_pair_loss (mean since the previous row)")
    for i in shown:
        print(f"{its[i]:9d}  {losses[i]:.4f}")

    train_emb, test_emb, loss1, acc, ratio, centroids = embed_and_measure(train_state)
    np.savez(
        os.path.join(args.out, "embeddings.npz"),
        train=train_emb,
        train_labels=data.y_train,
        test=test_emb,
        test_labels=data.y_test,
    )
    plotted = plot_embedding(
        os.path.join(args.out, "embedding.png"),
        test_emb,
        data.y_test,
        centroids,
        f"Siamese LeNet, contrastive loss: test digits ({args.iterations} iterations)",
    )
    print(
        f"trained {args.iterations} iterations in {seconds:.1f} s; wrote "
        f"{'embedding.png, ' if plotted else ''}history.json, embeddings.npz to {args.out}"
    )
    print(f"test pair loss (contrastive, margin 1): {loss1:.4f} (before training {loss0:.4f})")
    print(
        f"mean distance between different digits / within a digit (test): {ratio:.2f} "
        f"(1.0 = no separation; before training {ratio0:.2f})"
    )
    print(f"nearest-centroid test accuracy before training: {acc0:.3f} (chance 0.1)")
    print(f"embedding nearest-centroid test accuracy: {acc:.3f}")


if __name__ == "__main__":
    main()
