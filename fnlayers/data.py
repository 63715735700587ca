"""Real data for training: bundled handwritten digits, MNIST and CIFAR-10 readers, minibatches.

Everything here is NumPy on the host: images come back NHWC ``float32`` in ``[0, 1]`` and labels
``int32``, ready to be fed to a jit-compiled step.

* :func:`load_digits`: the 1797 handwritten digits of the UCI *Optical Recognition of
  Handwritten Digits* test set (the copy scikit-learn ships, bundled in ``fnlayers/_data``; see
  its README for source and license), resized for LeNet-style networks and split train/test.
* :func:`read_mnist_idx`: the MNIST IDX files (``train-images-idx3-ubyte[.gz]`` and friends).
* :func:`read_cifar10_batches`: the CIFAR-10 binary batches (``data_batch_1.bin``, ...).
* :func:`batches` (one epoch) and :func:`epochs` (an epoch-aware stream of them): shuffled
  minibatches, reproducible from ``(seed, epoch)`` alone so an interrupted run can resume at any
  epoch with the same order.

Example:
    >>> import fnlayers.data as data
    >>> ds = data.load_digits()
    >>> ds.x_train.shape, ds.y_train.shape, ds.x_test.shape
    ((1438, 28, 28, 1), (1438,), (359, 28, 28, 1))
    >>> xb, yb = next(data.batches(ds.x_train, ds.y_train, 64, seed=0))
    >>> xb.shape, yb.dtype
    ((64, 28, 28, 1), dtype('int32'))
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import io
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from fnlayers._checks import check_int, check_real

__all__ = [
    "DIGITS_SOURCE_SIZE",
    "Dataset",
    "batches",
    "epoch_order",
    "epochs",
    "load_digits",
    "random_shift",
    "read_cifar10_batches",
    "read_mnist_idx",
    "steps_per_epoch",
]

DIGITS_SOURCE_SIZE = 8  # the bundled digits are 8x8
_DIGITS_PADDED = DIGITS_SOURCE_SIZE + 2
_DIGITS_COUNT = 1797
_CIFAR_RECORD = 1 + 3 * 32 * 32

_Path: TypeAlias = str | os.PathLike
_Augment: TypeAlias = Callable[
    [np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]
]


class Dataset(NamedTuple):
    """A train/test split.

    Attributes:
      x_train: ``(N_train, H, W, C)`` float32 in ``[0, 1]``.
      y_train: ``(N_train,)`` int32 class labels.
      x_test: ``(N_test, H, W, C)`` float32 in ``[0, 1]``.
      y_test: ``(N_test,)`` int32 class labels.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(size: int = 28, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 1797 real handwritten digits (8x8, UCI / scikit-learn), resized and split.

    Preprocessing: pixel counts 0..16 are divided by 16, each 8x8 image gets a one-pixel border
    of zeros (10x10, so the strokes do not touch the edge, like MNIST's margin), and the 10x10
    image is resized to ``size x size`` by separable bilinear interpolation with half-pixel
    centres (the convention of ``jax.image.resize(..., "linear")`` and OpenCV's INTER_LINEAR
    when upsampling; no antialiasing): output pixel ``o`` samples the input at
    ``(o + 0.5) * 10 / size - 0.5``, clamped to the edge. At ``size=28`` the digit fills about
    the central 22x22 pixels, close to MNIST's 20x20 box in a 28x28 frame. ``size=10`` returns
    the padded images exactly.

    The split is stratified: each class is shuffled with ``np.random.default_rng(seed)`` and its
    first ``floor(test_fraction * n_class + 0.5)`` images go to the test set; both sets are then
    shuffled. It does not depend on ``size``. With the default ``test_fraction=0.2`` the test set
    has 359 images (35-37 per class) and the training set 1438.

    Args:
      size: output height and width, an int >= 1. LeNet expects 28.
      test_fraction: share of each class held out for testing, in ``(0, 1)``; every class must
        keep at least one image on each side.
      seed: a non-negative int; the split is a deterministic function of it.

    Returns:
      :class:`Dataset` with ``x_*`` of shape ``(N, size, size, 1)`` float32 in ``[0, 1]`` and
      ``y_*`` of shape ``(N,)`` int32 in ``0..9``.
    """
    fn = "load_digits"
    size = check_int(size, fn=fn, name="size", minimum=1)
    seed = check_int(seed, fn=fn, name="seed", minimum=0)
    what = "a number in (0, 1)"
    if not 0 < check_real(test_fraction, fn=fn, name="test_fraction", what=what) < 1:
        raise ValueError(f"{fn}: test_fraction={test_fraction!r} must be in (0, 1)")

    raw = _digits_raw()
    labels = raw[:, -1].astype(np.int32)
    images = raw[:, :-1].reshape(-1, DIGITS_SOURCE_SIZE, DIGITS_SOURCE_SIZE) / 16.0
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    resize = _bilinear_matrix(_DIGITS_PADDED, size)
    x = np.einsum("oh,nhw,pw->nop", resize, padded, resize)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)[..., None]

    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = math.floor(test_fraction * len(members) + 0.5)
        if not 0 < n_test < len(members):
            raise ValueError(
                f"{fn}: test_fraction={test_fraction!r} puts {n_test} of the {len(members)} "
                f"images of class {c} in the test set; each class needs at least one image in "
                "each split"
            )
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return Dataset(x[train], labels[train], x[test], labels[test])


def read_mnist_idx(images_path: _Path, labels_path: _Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads an MNIST image file and its label file (IDX format, plain or gzip-compressed).

    IDX: a big-endian header (magic ``0x00000803`` then N, rows, cols for images; ``0x00000801``
    then N for labels) followed by unsigned bytes. Gzip is detected from the file's first bytes,
    not its name. Works for any IDX pair of this shape (MNIST, Fashion-MNIST, EMNIST); labels
    are returned as stored, not checked against a class count.

    Args:
      images_path: e.g. ``train-images-idx3-ubyte.gz``.
      labels_path: e.g. ``train-labels-idx1-ubyte.gz``.

    Returns:
      ``(images, labels)``: ``(N, rows, cols, 1)`` float32 in ``[0, 1]`` (pixel / 255) and
      ``(N,)`` int32.

    Raises:
      ValueError: a wrong magic number (e.g. the two files swapped), a truncated file or one
        with trailing bytes, a corrupt gzip stream, or image and label counts that differ.
    """
    fn = "read_mnist_idx"
    images = _read_idx(images_path, 3, fn=fn, name="images_path", what="images")
    labels = _read_idx(labels_path, 1, fn=fn, name="labels_path", what="labels")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{fn}: images_path={os.fspath(images_path)!r} holds {images.shape[0]} images but "
            f"labels_path={os.fspath(labels_path)!r} holds {labels.shape[0]} labels"
        )
    return (images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)


def read_cifar10_batches(
    paths: _Path | Iterable[_Path],
) -> tuple[np.ndarray, np.ndarray]:
    """Reads CIFAR-10 binary batches (``data_batch_1.bin`` ... ``data_batch_5.bin``,
    ``test_batch.bin``) and concatenates them in the order given.

    Each record is 3073 bytes: one label byte (0..9), then a 32x32 image as 1024 red, 1024 green
    and 1024 blue bytes, each plane row-major (CHW). Gzip-compressed files are accepted.
    The five training batches take 614 MB as float32.

    Args:
      paths: one path, or an iterable of paths (e.g. ``sorted(root.glob("data_batch_*.bin"))``).

    Returns:
      ``(images, labels)``: ``(N, 32, 32, 3)`` float32 in ``[0, 1]`` (pixel / 255, NHWC) and
      ``(N,)`` int32 in ``0..9``.

    Raises:
      ValueError: no paths; a file whose size is not a positive multiple of 3073; a label byte
        above 9 (e.g. a CIFAR-100 file, whose records have two label bytes).
    """
    fn = "read_cifar10_batches"
    if isinstance(paths, str | bytes | os.PathLike):
        paths = [paths]
    elif isinstance(paths, Iterable):
        paths = list(paths)
    else:
        raise TypeError(f"{fn}: paths={paths!r} must be a path or an iterable of paths")
    if not paths:
        raise ValueError(f"{fn}: paths={paths!r} must be a path or a non-empty sequence of paths")
    images, labels = [], []
    for path in paths:
        data = _read_bytes(path, fn=fn, name="paths")
        if len(data) == 0 or len(data) % _CIFAR_RECORD:
            raise ValueError(
                f"{fn}: {os.fspath(path)!r} has {len(data)} bytes, not a positive multiple of "
                f"{_CIFAR_RECORD} (1 label byte + 3072 pixel bytes per CIFAR-10 record); the "
                "file is truncated or not a CIFAR-10 binary batch"
            )
        records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        bad = np.flatnonzero(records[:, 0] > 9)
        if bad.size:
            raise ValueError(
                f"{fn}: {os.fspath(path)!r} record {bad[0]} has label byte {records[bad[0], 0]}; "
                "CIFAR-10 labels are 0..9 (CIFAR-100 binaries, with two label bytes, are not "
                "this format)"
            )
        labels.append(records[:, 0].astype(np.int32))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    x = np.concatenate(images).astype(np.float32) / 255.0
    return x, np.concatenate(labels)


def batches(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of minibatches: a single pass over ``(x, y)``, shuffled.

    The order is the permutation drawn by ``np.random.default_rng((seed, epoch))``, so the same
    ``(seed, epoch)`` always gives the same batches, different epochs give different orders, and
    epoch ``e`` can be replayed without replaying epochs ``0..e-1`` (exact resume).
    Arguments are checked when this is called, not at the first ``next``.

    Args:
      x: ``(N, ...)`` array (converted with ``np.asarray``).
      y: ``(N, ...)`` array with the same N.
      batch_size: examples per batch, an int >= 1.
      seed, epoch: non-negative ints that fix the order.
      shuffle: False keeps the original order (seed and epoch are then ignored).
      drop_last: drop the final batch when it has fewer than ``batch_size`` examples. The
        default False visits every example once (right for evaluation); training loops under
        ``jit`` usually want True, so every batch has the same shape and the step compiles once.

    Yields:
      ``(x_batch, y_batch)`` NumPy arrays of shapes ``(B, ...)``, ``B = batch_size`` except for a
      smaller last batch when ``drop_last`` is False; :func:`steps_per_epoch` of them.

    Raises:
      ValueError: N differs between x and y, N is 0, or ``drop_last`` leaves no batch.
      TypeError: a non-int batch_size, seed or epoch.
    """
    x, y, n = _check_batch_args(x, y, batch_size, seed, epoch, drop_last, fn="batches")
    return _batch_iter(x, y, n, batch_size, seed, epoch, shuffle, drop_last)


def epochs(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    batch_size: int,
    *,
    seed: int = 0,
    start_epoch: int = 0,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]]:
    """Epoch-aware minibatches for a training loop: yields ``(epoch, batches(..., epoch=epoch))``.

    ::

        for epoch, epoch_batches in data.epochs(x, y, 64, seed=0, num_epochs=10):
            for xb, yb in epoch_batches:
                params, state, opt_state, loss = train_step(params, state, opt_state, xb, yb)
            evaluate(epoch)

    Epoch ``e`` is exactly ``batches(x, y, batch_size, seed=seed, epoch=e, ...)``, so resuming
    with ``start_epoch=e`` reproduces the uninterrupted run's order.

    Args:
      x, y, batch_size, seed, shuffle: as for :func:`batches`.
      start_epoch: the first epoch number, a non-negative int.
      num_epochs: how many epochs to yield; None (the default) never stops.
      drop_last: as for :func:`batches`, but True by default here: fixed batch shapes, so a
        jit-compiled step compiles once.

    Yields:
      ``(epoch, iterator)``: the epoch number (``start_epoch, start_epoch + 1, ...``) and that
      epoch's batch iterator.
    """
    fn = "epochs"
    x, y, _ = _check_batch_args(x, y, batch_size, seed, start_epoch, drop_last, fn=fn)
    if num_epochs is not None:
        num_epochs = check_int(num_epochs, fn=fn, name="num_epochs", minimum=0)
    return _epoch_iter(x, y, batch_size, seed, start_epoch, num_epochs, shuffle, drop_last)


def random_shift(max_shift: int = 1) -> _Augment:
    """A training-batch augmentation: every image moved by a random whole-pixel offset.

    Returns ``augment(x, y, rng) -> (x_shifted, y)`` for :func:`fnlayers.train.fit`. Each image
    of an ``(N, H, W, ...)`` batch is translated by ``(dy, dx)``, drawn uniformly from
    ``[-max_shift, max_shift]`` per image with the numpy Generator ``rng``; pixels shifted in
    from outside are 0. Labels are unchanged.
    """
    max_shift = check_int(max_shift, fn="random_shift", name="max_shift", minimum=0)

    def augment(x, y, rng):
        x = np.asarray(x)
        n, h, w = x.shape[:3]
        m = max_shift
        padded = np.pad(x, ((0, 0), (m, m), (m, m)) + ((0, 0),) * (x.ndim - 3))
        dy = rng.integers(0, 2 * m + 1, n)
        dx = rng.integers(0, 2 * m + 1, n)
        rows = (dy[:, None] + np.arange(h)[None, :])[:, :, None]
        cols = (dx[:, None] + np.arange(w)[None, :])[:, None, :]
        return padded[np.arange(n)[:, None, None], rows, cols], y

    return augment


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``: a permutation of ``range(num_examples)`` drawn by
    ``np.random.default_rng((seed, epoch))``. :func:`batches` and :func:`fnlayers.train.fit`
    both read examples in this order, so any epoch can be replayed on its own."""
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int, *, drop_last: bool) -> int:
    """Batches in one epoch: ``num_examples // batch_size``, plus one for a partial last batch
    when ``drop_last`` is False."""
    fn = "steps_per_epoch"
    num_examples = check_int(num_examples, fn=fn, name="num_examples", minimum=0)
    batch_size = check_int(batch_size, fn=fn, name="batch_size", minimum=1)
    full, rest = divmod(num_examples, batch_size)
    return full + (1 if rest and not drop_last else 0)


# -- helpers ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_raw() -> np.ndarray:
    """The bundled CSV as a read-only ``(1797, 65)`` uint8 array: 64 pixels, then the label."""
    resource = importlib.resources.files("fnlayers") / "_data" / "digits.csv.gz"
    text = gzip.decompress(resource.read_bytes()).decode("ascii")
    raw = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.uint8, ndmin=2)
    if (
        raw.shape != (_DIGITS_COUNT, DIGITS_SOURCE_SIZE**2 + 1)
        or raw[:, :-1].max() > 16
        or raw[:, -1].max() > 9
    ):
        raise RuntimeError(f"load_digits: the bundled {resource} is damaged (shape {raw.shape})")
    raw.setflags(write=False)
    return raw


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of bilinear weights with half-pixel centres; rows sum to 1."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _read_bytes(path, *, fn: str, name: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{fn}: {name}={path!r} must be a str or os.PathLike") from None
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{fn}: {name}={path!r} is a truncated or corrupt gzip file: {err}"
            ) from err
    return data


def _read_idx(path, ndim: int, *, fn: str, name: str, what: str) -> np.ndarray:
    data = _read_bytes(path, fn=fn, name=name)
    path = os.fspath(path)
    expected_magic = 0x0800 | ndim  # type code 0x08 = unsigned byte, then the rank
    header = 4 + 4 * ndim
    magic = struct.unpack_from(">I", data, 0)[0] if len(data) >= 4 else None
    if magic is not None and magic != expected_magic:
        raise ValueError(
            f"{fn}: {name}={path!r} has magic number 0x{magic:08x}; expected "
            f"0x{expected_magic:08x} (IDX unsigned bytes, {ndim} dimension(s): MNIST {what})"
        )
    if len(data) < header:
        raise ValueError(
            f"{fn}: {name}={path!r} has {len(data)} bytes, fewer than the {header}-byte IDX "
            f"header of {what}; the file is truncated"
        )
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    count = math.prod(dims)
    body = len(data) - header
    if body != count:
        problem = "truncated" if body < count else "followed by extra bytes"
        raise ValueError(
            f"{fn}: {name}={path!r} is {problem}: its header gives shape {dims} ({count} bytes) "
            f"but {body} bytes follow the header"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _check_batch_args(x, y, batch_size, seed, epoch, drop_last, *, fn: str):
    batch_size = check_int(batch_size, fn=fn, name="batch_size", minimum=1)
    check_int(seed, fn=fn, name="seed", minimum=0)
    check_int(epoch, fn=fn, name="start_epoch" if fn == "epochs" else "epoch", minimum=0)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(
            f"{fn}: x and y need a leading example axis, got shapes {x.shape}, {y.shape}"
        )
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(
            f"{fn}: x has {n} examples (shape {x.shape}) but y has {y.shape[0]} (shape {y.shape})"
        )
    if n == 0:
        raise ValueError(f"{fn}: x and y hold no examples")
    if drop_last and n < batch_size:
        raise ValueError(
            f"{fn}: batch_size={batch_size} exceeds the {n} examples and drop_last=True, so an "
            "epoch would have no batches"
        )
    return x, y, n


def _batch_iter(x, y, n, batch_size, seed, epoch, shuffle, drop_last):
    order = epoch_order(n, seed=seed, epoch=epoch) if shuffle else None
    for step in range(steps_per_epoch(n, batch_size, drop_last=drop_last)):
        sl = slice(step * batch_size, (step + 1) * batch_size)
        if order is None:
            yield x[sl], y[sl]
        else:
            idx = order[sl]
            yield x[idx], y[idx]


def _epoch_iter(x, y, batch_size, seed, start_epoch, num_epochs, shuffle, drop_last):
    n = x.shape[0]
    epoch = start_epoch
    while num_epochs is None or epoch < start_epoch + num_epochs:
        yield epoch, _batch_iter(x, y, n, batch_size, seed, epoch, shuffle, drop_last)
        epoch += 1
