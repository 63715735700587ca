"""Where ``fit``'s batches come from: whole arrays (shuffled per epoch from ``(seed, epoch)``)
or any iterable of ``(x, y)`` batches, placed on the mesh when there is one.

Both sources yield ``(iteration, x_batch, y_batch, exhausted)`` from a start iteration, so a
resumed run reads exactly the batches the uninterrupted run would have read.

With Caffe's ``iter_size`` k > 1 an iteration reads k micro-batches of ``batch_size`` and yields
them stacked, every leaf ``(k, batch_size, ...)``, split over the mesh along axis 1. From arrays,
they are the k slices of one batch of ``k * batch_size`` (so the data order is that of
``iter_size=1`` with the larger batch); from an iterable, k consecutive batches. Augmentation
sees the iteration's ``k * batch_size`` examples as one batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sized

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fnlayers import data as _data
from fnlayers._checks import is_int

__all__ = [
    "ArraySource",
    "StreamSource",
    "batch_source",
    "input_shape",
    "micro_sharding",
    "num_examples",
    "shard_micro",
    "take",
]


def batch_source(train_data, batch_size, seed, augment, dp, iter_size=1):
    if (
        isinstance(train_data, tuple | list)
        and len(train_data) == 2
        and hasattr(train_data[1], "shape")
    ):
        return ArraySource(train_data[0], train_data[1], batch_size, seed, augment, dp, iter_size)
    if isinstance(train_data, Iterable) and not isinstance(train_data, str | bytes | Mapping):
        return StreamSource(train_data, batch_size, seed, augment, dp, iter_size)
    raise ValueError(
        "fit: train_data must be a pair (x, y) of arrays or an iterable of (x, y) batches, got "
        f"{type(train_data).__name__}"
    )


class ArraySource:
    """Batches drawn from whole arrays: iteration ``i`` reads batch ``i % steps_per_epoch`` (of
    ``iter_size * batch_size`` examples) of the permutation of epoch ``i // steps_per_epoch``."""

    def __init__(self, x, y, batch_size, seed, augment, dp, iter_size=1):
        n = num_examples(x, y, "train_data")
        if not is_int(batch_size) or not 0 < batch_size <= n:
            raise ValueError(f"fit: batch_size={batch_size!r} must be an int in [1, {n}]")
        if batch_size * iter_size > n:
            raise ValueError(
                f"fit: batch_size={batch_size} times the optimizer's iter_size={iter_size} "
                f"must be at most the {n} training examples (one iteration reads "
                f"{batch_size * iter_size})"
            )
        if dp is not None:
            dp.check_batch_size(batch_size, fn="fit")
        self.arrays, self.n, self.batch_size = (x, y), n, batch_size
        self.seed, self.augment, self.dp, self.iter_size = seed, augment, dp, iter_size
        self.steps_per_epoch = n // (batch_size * iter_size)
        self.input_shape = input_shape(x)

    def batches(self, start, end):
        """Yields ``(iteration, x_batch, y_batch, exhausted)`` for ``start <= iteration < end``;
        ``exhausted`` is always False (arrays never run out)."""
        x, y = self.arrays
        k, size = self.iter_size, self.batch_size * self.iter_size
        rows = slice(None) if self.dp is None else self.dp.local_rows(self.batch_size)
        perm_epoch, perm = -1, None
        for it in range(start, end):
            epoch, b = divmod(it, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = _data.epoch_order(self.n, seed=self.seed, epoch=epoch), epoch
            idx = perm[b * size : (b + 1) * size]
            if self.augment is None:
                batch = take((x, y), _local(idx, k, rows))
            else:  # the whole global batch, so that every process augments it alike
                xb, yb = self.augment(*take((x, y), idx), _augment_rng(self.seed, it, None))
                batch = jax.tree.map(lambda a: _local(np.asarray(a), k, rows), (xb, yb))
            yield it, *_place_local(self.dp, batch, k), False


class StreamSource:
    """Batches read from an iterable, ``iter_size`` per iteration (see :func:`fit`)."""

    def __init__(self, data, batch_size, seed, augment, dp, iter_size=1):
        self.data, self.seed, self.augment, self.dp = data, seed, augment, dp
        self.iter_size = iter_size
        self._it = iter(data)
        self.reiterable = self._it is not data
        first = next(self._it, None)
        if first is None:
            raise ValueError("fit: train_data yielded no batch")
        self._first = _host_batch(first, 0)
        self.local_size = num_examples(*self._first, "a batch of train_data")
        self.batch_size = self.local_size * jax.process_count()
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"fit: batch_size={batch_size!r} disagrees with train_data's batches of "
                f"{self.local_size} examples" + _per_process(jax.process_count())
            )
        if dp is not None:
            dp.check_batch_size(self.batch_size, fn="fit", name="the batch size")
        self.steps_per_epoch = len(data) // iter_size if isinstance(data, Sized) else None
        self.input_shape = input_shape(self._first[0])
        self.arrays = None

    def batches(self, start, end):
        """Yields ``(iteration, x_batch, y_batch, exhausted)``; ``exhausted`` is True for the
        last batch of a one-shot iterator that runs out before ``end``."""
        raw = self._groups()
        for _ in range(start):
            if next(raw, None) is None:
                return
        upcoming = next(raw, None)
        for it in range(start, end):
            if upcoming is None:
                return
            batch = upcoming
            upcoming = next(raw, None) if it + 1 < end else None
            exhausted = upcoming is None and it + 1 < end
            if exhausted:
                warnings.warn(
                    f"fit: train_data ran out after {it + 1} iterations, before the "
                    f"{end} asked for; the run ends there",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if self.augment is not None:
                rng = _augment_rng(self.seed, it, jax.process_index())
                batch = _augment_stacked(self.augment, batch, rng, self.iter_size)
            yield it, *_place_local(self.dp, batch, self.iter_size), exhausted

    def _groups(self):
        """Each iteration's host batch: one batch, or ``iter_size`` consecutive ones stacked
        (an incomplete group at the end of a one-shot iterator is dropped)."""
        raw = self._raw()
        if self.iter_size == 1:
            yield from raw
            return
        while True:
            group = [b for _, b in zip(range(self.iter_size), raw, strict=False)]
            if len(group) < self.iter_size:
                return
            yield jax.tree.map(lambda *parts: np.stack(parts), *group)

    def _raw(self):
        """Full-size host batches, passes repeated while the iterable can be iterated again."""
        yield self._first
        index, it = 1, self._it
        while True:
            fresh = True
            for item in it:
                fresh = False
                batch = _host_batch(item, index)
                index += 1
                size = num_examples(*batch, "a batch of train_data")
                if size > self.local_size:
                    raise ValueError(
                        f"fit: batch {index - 1} of train_data has {size} examples, more than "
                        f"the first batch's {self.local_size}"
                    )
                if size == self.local_size:
                    yield batch
            if not self.reiterable or fresh:
                return
            it = iter(self.data)


def _host_batch(item, index):
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise ValueError(
            f"fit: batch {index} of train_data must be a pair (x, y), got {type(item).__name__}"
        )
    return jax.tree.map(np.asarray, (item[0], item[1]))


def _per_process(processes):
    return f" in each of {processes} processes" if processes > 1 else ""


def _augment_rng(seed, iteration, process):
    entropy = [seed, iteration, 1] + (
        [] if process is None or jax.process_count() == 1 else [process]
    )
    return np.random.default_rng(entropy)


def _local(a, k, rows):
    """``a`` (one batch of ``k * B`` along axis 0) as ``k`` micro-batches of ``B`` when ``k`` > 1,
    and this process's ``rows`` of each."""
    if k == 1:
        return a[rows]
    return a.reshape(k, a.shape[0] // k, *a.shape[1:])[:, rows]


def _augment_stacked(augment, batch, rng, k):
    """``augment`` on an iteration's examples as one batch, micro-batches stacked back."""
    if k == 1:
        return augment(*batch, rng)
    merged = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), batch)
    out = augment(*merged, rng)
    return jax.tree.map(lambda a: _local(np.asarray(a), k, slice(None)), tuple(out))


def _place_local(dp, batch, k=1):
    """A host batch (this process's rows) as the step's input: as is on one device, a global
    array split over the mesh with one (micro-batches stacked by ``iter_size`` k > 1 along
    axis 1)."""
    if dp is None:
        return batch
    if k == 1:
        return dp.shard_local(batch)
    sharding = micro_sharding(dp)

    def place(a):
        a = np.asarray(a)
        shape = (a.shape[0], a.shape[1] * jax.process_count(), *a.shape[2:])
        return jax.make_array_from_process_local_data(sharding, a, shape)

    return jax.tree.map(place, batch)


def micro_sharding(dp) -> NamedSharding:
    """Micro-batches stacked ``(iter_size, batch, ...)``: each split over the data axis."""
    return NamedSharding(dp.mesh, P(None, dp.axis))


def shard_micro(dp, tree):
    """Stacked global micro-batches (the same in every process) split along axis 1, as
    ``dp.shard`` splits a batch along axis 0."""
    sharding = micro_sharding(dp)

    def place(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree)


def num_examples(x, y, name) -> int:
    sizes = {int(np.shape(a)[0]) for a in jax.tree.leaves((x, y))}
    if len(sizes) != 1:
        raise ValueError(f"{name}: x and y disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def take(tree, idx):
    return jax.tree.map(lambda a: np.asarray(a)[idx], tree)


def input_shape(x):
    """The model's in_shape for data ``x``: ``(-1, ...)``, or a tuple of those for a tuple."""
    if isinstance(x, tuple | list):
        return tuple((-1, *np.shape(a)[1:]) for a in x)
    return (-1, *np.shape(x)[1:])
