"""Where ``fit``'s batches come from: whole arrays (shuffled per epoch from ``(seed, epoch)``)
or any iterable of ``(x, y)`` batches, placed on the mesh when there is one.

Both sources yield ``(iteration, x_batch, y_batch, exhausted)`` from a start iteration, so a
resumed run reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sized

import jax
import numpy as np

from fnlayers import data as _data
from fnlayers._checks import is_int

__all__ = ["ArraySource", "StreamSource", "batch_source", "input_shape", "num_examples", "take"]


def batch_source(train_data, batch_size, seed, augment, dp):
    if (
        isinstance(train_data, tuple | list)
        and len(train_data) == 2
        and hasattr(train_data[1], "shape")
    ):
        return ArraySource(train_data[0], train_data[1], batch_size, seed, augment, dp)
    if isinstance(train_data, Iterable) and not isinstance(train_data, str | bytes | Mapping):
        return StreamSource(train_data, batch_size, seed, augment, dp)
    raise ValueError(
        "fit: train_data must be a pair (x, y) of arrays or an iterable of (x, y) batches, got "
        f"{type(train_data).__name__}"
    )


class ArraySource:
    """Batches drawn from whole arrays: iteration ``i`` reads batch ``i % steps_per_epoch`` of
    the permutation of epoch ``i // steps_per_epoch``."""

    def __init__(self, x, y, batch_size, seed, augment, dp):
        n = num_examples(x, y, "train_data")
        if not is_int(batch_size) or not 0 < batch_size <= n:
            raise ValueError(f"fit: batch_size={batch_size!r} must be an int in [1, {n}]")
        if dp is not None:
            dp.check_batch_size(batch_size, fn="fit")
        self.arrays, self.n, self.batch_size = (x, y), n, batch_size
        self.seed, self.augment, self.dp = seed, augment, dp
        self.steps_per_epoch = n // batch_size
        self.input_shape = input_shape(x)

    def batches(self, start, end):
        """Yields ``(iteration, x_batch, y_batch, exhausted)`` for ``start <= iteration < end``;
        ``exhausted`` is always False (arrays never run out)."""
        x, y = self.arrays
        rows = slice(None) if self.dp is None else self.dp.local_rows(self.batch_size)
        perm_epoch, perm = -1, None
        for it in range(start, end):
            epoch, b = divmod(it, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = _data.epoch_order(self.n, seed=self.seed, epoch=epoch), epoch
            idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
            if self.augment is None:
                batch = take((x, y), idx[rows])
            else:  # the whole global batch, so that every process augments it alike
                xb, yb = self.augment(*take((x, y), idx), _augment_rng(self.seed, it, None))
                batch = jax.tree.map(lambda a: np.asarray(a)[rows], (xb, yb))
            yield it, *_place_local(self.dp, batch), False


class StreamSource:
    """Batches read from an iterable, one per iteration (see :func:`fit`)."""

    def __init__(self, data, batch_size, seed, augment, dp):
        self.data, self.seed, self.augment, self.dp = data, seed, augment, dp
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
        self.steps_per_epoch = len(data) if isinstance(data, Sized) else None
        self.input_shape = input_shape(self._first[0])
        self.arrays = None

    def batches(self, start, end):
        """Yields ``(iteration, x_batch, y_batch, exhausted)``; ``exhausted`` is True for the
        last batch of a one-shot iterator that runs out before ``end``."""
        raw = self._raw()
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
                batch = self.augment(*batch, _augment_rng(self.seed, it, jax.process_index()))
            yield it, *_place_local(self.dp, batch), exhausted

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


def _place_local(dp, batch):
    """A host batch (this process's rows) as the step's input: as is on one device, a global
    array split over the mesh with one."""
    return batch if dp is None else dp.shard_local(batch)


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
