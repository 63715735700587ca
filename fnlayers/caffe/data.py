"""Caffe's data layers as batch sources: :func:`data_source` turns a parsed data layer
(``HDF5Data``, ``Data`` on an LMDB, ``ImageData``, ``DummyData``) into a :class:`DataSource`
whose iterator yields batches ``{top: array}`` the way the layer's ``Forward`` fills its tops.

Layouts: a 4-D top is NHWC float32 (Caffe's NCHW blob transposed ``(0, 2, 3, 1)``); a label
top is ``(batch,)`` int32; an ``HDF5Data`` top of another rank keeps Caffe's shape and is int32
when the dataset holds integers, else float32. ``DataSource.shapes`` gives each top's Caffe
(NCHW) shape, read from the first record only.

Reading order (``layers/data_layer.cpp``, ``hdf5_data_layer.cpp``, ``image_data_layer.cpp``):
records in the source's order (LMDB keys in LMDB order, an image list's lines, each HDF5 file's
rows), batches that run on over the end of the source into its start again (10 records, batch 4:
records 0-3, 4-7, 8, 9, 0, 1, ...). With ``shuffle``, ``ImageData`` shuffles its list at the
start and at every wrap; ``HDF5Data`` shuffles the file order at the start and at every wrap,
and the rows of each file every time it is read. Each ``iter()`` of a source starts again at
the first record with the same random numbers (from ``seed``), so a resumed run reads the same
batches. Caffe's random numbers come from its own Boost generator: the choices here (shuffles,
crop offsets, mirroring) follow the same rules from numpy's generator, not the same values.

Preprocessing (``transform_param``, ``data_transformer.cpp``), per image in Caffe's order:
``mirror`` draws a coin (in either phase, as Caffe does, so set it only on the TRAIN layer), a
``crop_size`` crop takes random offsets in ``[0, H - crop]`` in the TRAIN phase and the centre
``((H - crop) // 2, (W - crop) // 2)`` in TEST, then each value becomes ``(pixel - mean) *
scale`` in float32, with ``mean`` from ``mean_file`` (a ``.binaryproto`` ``(1, C, H, W)`` blob,
read at the crop's offset) or ``mean_value`` (one for every channel, or one per channel).

Images: a Datum's ``encoded`` bytes and ``ImageData``'s files are decoded with Pillow and laid
out as OpenCV decodes them for Caffe (``util/io.cpp``): colour channels in **BGR** order, so
channel 0 is blue; ``ImageData`` with ``is_color: false`` and ``force_gray`` give one grey
channel (ITU-R 601 luma, the weights OpenCV uses; its rounding may differ by one grey level); an
encoded Datum is decoded as stored (grey stays one channel, an alpha channel is kept as a fourth,
BGRA). ``new_height``/``new_width`` resize with OpenCV's ``INTER_LINEAR`` sampling (pixel
centres ``(i + 0.5) * in / out - 0.5``, edge pixels repeated, no antialiasing), rounded to uint8;
OpenCV uses 11-bit fixed-point weights, so a pixel may differ from Caffe's by one grey level.
PNG decodes exactly; JPEG decoders differ in their rounding, so a JPEG's pixels may differ from
OpenCV's by a few levels.

Optional dependencies (``pip install 'fnlayers[caffe]'``): h5py (``HDF5Data``), lmdb
(``Data``), Pillow (encoded images and ``ImageData``).
"""

from __future__ import annotations

import importlib
import io
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator

import numpy as np

from fnlayers._checks import check_choice, is_int
from fnlayers.caffe.datum import Datum, decode_datum, encode_datum, read_binaryproto
from fnlayers.caffe.prototxt import first

__all__ = ["DataSource", "data_source", "write_lmdb"]

SUPPORTED_TYPES = ("Data", "HDF5Data", "ImageData", "DummyData")


def data_source(
    layer: dict,
    *,
    phase: str,
    seed: int | None = None,
    root: str | os.PathLike = ".",
) -> DataSource:
    """A batch source for one Caffe data layer.

    Args:
      layer: the layer as :func:`fnlayers.caffe.parse` gives it (a ``LayerParameter`` dict,
        e.g. ``parse(text)["layer"][0]``): ``HDF5Data``, ``Data`` (``backend: LMDB``),
        ``ImageData`` or ``DummyData`` (constant, uniform or gaussian fillers).
      phase: ``"train"`` or ``"test"``: the phase the layer runs in (a TRAIN crop is random, a
        TEST crop central).
      seed: the seed of the shuffles, crops and mirroring; None draws one (each ``iter()`` of
        the source still repeats the same stream).
      root: the directory that relative paths (``source``, ``mean_file``, the files an HDF5
        list or an image list names) are read from; Caffe reads them from its current
        directory, the default ``"."``.

    Returns:
      A :class:`DataSource`: iterate it for batches ``{top: array}``; ``.shapes`` gives the
      tops' Caffe shapes.

    Raises:
      ValueError: a type that is not a supported data layer (``Input`` and ``MemoryData`` are
        fed by the caller, ``Data`` with LevelDB is not supported), a parameter that Caffe
        rejects, or a source that is missing or unreadable: the message names the layer, the
        path and what is wrong.
      ImportError: h5py, lmdb or Pillow is needed and not installed.
    """
    if not isinstance(layer, dict):
        raise TypeError(f"data_source: layer must be a parsed layer dict, got {type(layer)}")
    check_choice(phase, ("train", "test"), fn="data_source", name="phase")
    if seed is not None and not is_int(seed):
        raise TypeError(f"data_source: seed={seed!r} must be an int or None")
    name, kind = first(layer, "name", ""), first(layer, "type")
    where = f"Caffe layer {name!r} ({kind})"
    tops = tuple(layer.get("top", []))
    if kind in _FED_BY_CALLER:
        raise ValueError(f"{where}: {_FED_BY_CALLER[kind]}")
    if kind not in _READERS:
        hint = (
            " (a V1 enum type: upgrade the net with fl.caffe.upgrade_v1)"
            if (isinstance(kind, str) and kind.isupper())
            else ""
        )
        raise ValueError(
            f"Caffe layer {name!r}: type {kind!r} is not a data layer data_source reads "
            f"(one of {', '.join(SUPPORTED_TYPES)}){hint}"
        )
    reader = _READERS[kind](layer, _Context(where, tops, phase, os.fspath(root)))
    return DataSource(name, kind, phase, tops, reader, seed)


class DataSource:
    """The batches of one Caffe data layer (:func:`data_source`).

    ``for batch in source`` yields ``{top: array}`` forever (the source wraps around), from the
    first record again at every ``iter()``.

    Attributes:
      name, type: the layer's name and Caffe type.
      phase: ``"train"`` or ``"test"``.
      tops: the top names, in the layer's order.
      batch_size: records per batch.
      shapes: ``{top: Caffe shape}``, e.g. ``{"data": (64, 1, 28, 28), "label": (64,)}``
        (NCHW; the arrays of a 4-D top are NHWC).
    """

    def __init__(self, name, kind, phase, tops, reader, seed):
        self.name, self.type, self.phase, self.tops = name, kind, phase, tops
        self.batch_size = reader.batch_size
        self._reader = reader
        self._entropy = np.random.SeedSequence(seed).entropy
        self.shapes = dict(zip(tops, reader.shapes(*self._rngs()), strict=True))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for arrays in self._reader.batches(*self._rngs()):
            yield {top: _layout(a) for top, a in zip(self.tops, arrays, strict=True)}

    def pairs(
        self, x: str | tuple[str, ...] | None = None, y: str | None = None
    ) -> Iterator[tuple]:
        """Batches as ``(x, y)`` pairs, the form :func:`fnlayers.fit` takes as ``train_data``
        (pass ``iterations=``: the source never runs out).

        Args:
          x: the input top, or a tuple of tops (then ``x`` is a tuple of arrays); default the
            first top.
          y: the target top; default the second top.
        """
        x = self.tops[0] if x is None else x
        if y is None:
            if len(self.tops) < 2:
                raise ValueError(f"DataSource.pairs: {self.name!r} has one top; name y")
            y = self.tops[1]
        for top in (*(x if isinstance(x, tuple) else (x,)), y):
            if top not in self.tops:
                raise ValueError(f"DataSource.pairs: {top!r} is not a top of {self.name!r}")
        return self._pairs(x, y)

    def _pairs(self, x, y):
        for batch in self:
            xs = tuple(batch[t] for t in x) if isinstance(x, tuple) else batch[x]
            yield xs, batch[y]

    def __repr__(self) -> str:
        return f"DataSource({self.name!r}, type={self.type!r}, shapes={self.shapes})"

    def _rngs(self):
        order, transform = np.random.SeedSequence(self._entropy).spawn(2)
        return np.random.default_rng(order), np.random.default_rng(transform)


def write_lmdb(path: str | os.PathLike, datums: Iterable[Datum]) -> None:
    """Writes :class:`~fnlayers.caffe.datum.Datum` s to a new LMDB (a directory, created with
    its parents) that Caffe's ``Data`` layer reads, under the keys ``00000000``, ``00000001``,
    ... (the keys Caffe's ``convert_mnist_data`` writes; LMDB order is key order).

    Raises:
      ValueError: ``path`` exists and is not an empty directory.
    """
    lmdb = _require("lmdb", "lmdb", "write_lmdb")
    path = os.fspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"write_lmdb: {path!r} exists; it writes a new LMDB, as Caffe's tools do")
    values = [encode_datum(d) for d in datums]
    size = 2 * sum(len(v) + 64 for v in values) + (1 << 20)
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=size, subdir=True)
    try:
        with env.begin(write=True) as txn:
            for i, v in enumerate(values):
                txn.put(f"{i:08d}".encode(), v)
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# private helpers: context, layout, transformer

_FED_BY_CALLER = {
    "Input": "an Input layer reads no data: its tops are the arrays the caller passes to the "
    "net (input_param gives their shapes)",
    "MemoryData": "a MemoryData layer reads no data: Caffe's caller hands it arrays "
    "(MemoryDataLayer::Reset); pass the arrays to fl.fit instead",
}


class _Context:
    """What every reader needs: the layer's description for messages, its tops, the phase and
    the directory relative paths are read from."""

    def __init__(self, where: str, tops: tuple, phase: str, root: str):
        self.where, self.tops, self.phase, self.root = where, tops, phase, root

    def path(self, p: str) -> str:
        return os.path.join(self.root, p)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.where}: {what}")

    def param(self, layer: dict, field: str) -> dict:
        value = first(layer, field, {})
        if not isinstance(value, dict):
            raise self.fail(f"{field} must be a message {{ ... }}")
        return value

    def int_field(self, msg: dict, field: str, default=None, *, positive=False, prefix=""):
        v = first(msg, field, default)
        if not is_int(v) or isinstance(v, bool) or v < (1 if positive else 0):
            what = "a positive int" if positive else "an int >= 0"
            shown = "missing" if v is None else repr(v)
            raise self.fail(f"{prefix}{field} is {shown}; it must be {what}")
        return int(v)

    def top_count(self, low: int, high: int) -> None:
        n = len(self.tops)
        if not low <= n <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise self.fail(f"has {n} tops {list(self.tops)}; it takes {want}")


def _layout(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a


class _Transformer:
    """Caffe's ``DataTransformer`` on one ``(C, H, W)`` image (see the module docstring)."""

    def __init__(self, layer: dict, ctx: _Context):
        p = ctx.param(layer, "transform_param")
        self.ctx = ctx
        self.scale = np.float32(first(p, "scale", 1.0))
        self.mirror = bool(first(p, "mirror", False))
        self.crop = ctx.int_field(p, "crop_size", 0, prefix="transform_param.")
        self.force_color = bool(first(p, "force_color", False))
        self.force_gray = bool(first(p, "force_gray", False))
        if self.force_color and self.force_gray:
            raise ctx.fail("transform_param: cannot set both force_color and force_gray")
        values = p.get("mean_value", [])
        self.mean_values = np.asarray(values, np.float32)
        self.mean = None
        if "mean_file" in p:
            if values:
                raise ctx.fail("transform_param: give mean_file or mean_value, not both")
            path = ctx.path(first(p, "mean_file"))
            try:
                mean = read_binaryproto(path)
            except ValueError as e:
                raise ctx.fail(f"transform_param.mean_file: {e}") from None
            if mean.ndim == 4 and mean.shape[0] == 1:
                mean = mean[0]
            if mean.ndim != 3:
                raise ctx.fail(
                    f"transform_param.mean_file {path!r} holds a blob of shape {mean.shape}; "
                    "a mean is (1, channels, height, width)"
                )
            self.mean, self.mean_path = mean, path

    @property
    def decode_mode(self) -> str:
        return "color" if self.force_color else "gray" if self.force_gray else "native"

    def check(self, shape: tuple, what: str) -> tuple:
        """The output shape for an input of ``shape`` ``(C, H, W)``, after Caffe's checks."""
        c, h, w = shape
        if self.crop and (h < self.crop or w < self.crop):
            raise self.ctx.fail(
                f"{what} is {h}x{w}, smaller than transform_param.crop_size {self.crop}"
            )
        if self.mean is not None and self.mean.shape != shape:
            raise self.ctx.fail(
                f"transform_param.mean_file {self.mean_path!r} has shape {self.mean.shape} "
                f"but {what} is {shape} (channels, height, width)"
            )
        if self.mean_values.size not in (0, 1, c):
            raise self.ctx.fail(
                f"transform_param has {self.mean_values.size} mean_value for {what} of {c} "
                "channels: give one, or one per channel"
            )
        return (c, self.crop, self.crop) if self.crop else shape

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c, h, w = image.shape
        # Caffe's draw order: the mirror coin, then the crop's row and column offsets.
        mirror = self.mirror and rng.integers(2) == 1
        top, left = 0, 0
        if self.crop:
            if self.ctx.phase == "train":
                top, left = rng.integers(h - self.crop + 1), rng.integers(w - self.crop + 1)
            else:
                top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = image.astype(np.float32)
        if self.mean is not None:
            x = x - self.mean
        elif self.mean_values.size:
            x = x - np.broadcast_to(self.mean_values, (c,))[:, None, None]
        if self.crop:
            x = x[:, top : top + self.crop, left : left + self.crop]
        if mirror:
            x = x[:, :, ::-1]
        return x * self.scale


# --------------------------------------------------------------------------------------------
# readers: each has batch_size, shapes(order_rng, transform_rng) -> Caffe shapes in top order,
# and batches(order_rng, transform_rng) -> an endless iterator of lists of Caffe-layout arrays


class _RecordReader:
    """A reader whose batches stack ``batch_size`` records (one array per top each), read on
    over the end of the source into its start."""

    batch_size: int
    ctx: _Context

    def records(self, order_rng, transform_rng) -> Iterator[tuple]:
        raise NotImplementedError

    def shapes(self, order_rng, transform_rng) -> list[tuple]:
        record = next(self.records(order_rng, transform_rng))
        return [(self.batch_size, *np.shape(a)) for a in record]

    def batches(self, order_rng, transform_rng):
        records = self.records(order_rng, transform_rng)
        while True:
            items = [next(records) for _ in range(self.batch_size)]
            arrays = []
            for j, top in enumerate(self.ctx.tops):
                shapes = {np.shape(item[j]) for item in items}
                if len(shapes) > 1:
                    raise self.ctx.fail(
                        f"the records of one batch differ in shape for top {top!r}: "
                        f"{sorted(shapes)} (Caffe needs one shape per batch)"
                    )
                arrays.append(np.stack([item[j] for item in items]))
            yield arrays


class _HDF5(_RecordReader):
    """``HDF5Data``: a text file listing ``.h5`` files; each top is the dataset of its name."""

    def __init__(self, layer: dict, ctx: _Context):
        self.h5py = _require("h5py", "h5py", ctx.where)
        self.ctx = ctx
        if not ctx.tops:
            raise ctx.fail("has no top: each top reads the HDF5 dataset of its name")
        if "transform_param" in layer:
            raise ctx.fail("HDF5Data does not transform data: remove transform_param")
        p = ctx.param(layer, "hdf5_data_param")
        self.batch_size = ctx.int_field(p, "batch_size", positive=True, prefix="hdf5_data_param.")
        self.shuffle = bool(first(p, "shuffle", False))
        if "source" not in p:
            raise ctx.fail("hdf5_data_param.source is missing")
        self.source = ctx.path(first(p, "source"))
        self.files = [ctx.path(f) for f in _read_text(self.source, ctx, "source").split()]
        if not self.files:
            raise ctx.fail(f"hdf5_data_param.source {self.source!r} lists no HDF5 file")
        for f in self.files:
            if not os.path.isfile(f):
                raise ctx.fail(f"{f!r}, listed in {self.source!r}, does not exist")
        self._cache = None

    def shapes(self, order_rng, transform_rng) -> list[tuple]:
        path = self.files[self._file_order(order_rng)[0]]
        with self._open(path) as f:
            return [
                (self.batch_size, *self._dataset(f, path, top).shape[1:]) for top in self.ctx.tops
            ]

    def records(self, order_rng, transform_rng):
        order = self._file_order(order_rng)
        shapes = None
        while True:
            for i in order:
                arrays = self._load(self.files[i])
                row_shapes = [a.shape[1:] for a in arrays]
                if shapes is not None and row_shapes != shapes:
                    raise self.ctx.fail(
                        f"{self.files[i]!r} has rows of shapes {row_shapes}, the first file "
                        f"read {shapes}"
                    )
                shapes = row_shapes
                rows = np.arange(len(arrays[0]))
                if self.shuffle:
                    order_rng.shuffle(rows)
                for r in rows:
                    yield tuple(a[r] for a in arrays)
            if self.shuffle:
                order_rng.shuffle(order)

    def _file_order(self, rng) -> list[int]:
        order = list(range(len(self.files)))
        if self.shuffle:
            rng.shuffle(order)
        return order

    def _open(self, path: str):
        try:
            return self.h5py.File(path, "r")
        except OSError as e:
            raise self.ctx.fail(f"cannot open {path!r} as an HDF5 file: {e}") from None

    def _dataset(self, f, path: str, top: str):
        if top not in f or not isinstance(f[top], self.h5py.Dataset):
            raise self.ctx.fail(
                f"{path!r} has no dataset {top!r} (a top's data is the dataset of its name; "
                f"the file holds {sorted(f.keys())})"
            )
        ds = f[top]
        if ds.ndim < 1 or ds.dtype.kind not in "biuf":
            raise self.ctx.fail(
                f"{path!r}: dataset {top!r} ({ds.dtype}, shape {ds.shape}) must be a numeric "
                "array with at least one axis"
            )
        return ds

    def _load(self, path: str) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == path:
            return self._cache[1]
        with self._open(path) as f:
            raw = [self._dataset(f, path, top)[()] for top in self.ctx.tops]
        rows = {len(a) for a in raw}
        if len(rows) != 1 or 0 in rows:
            counts = {top: len(a) for top, a in zip(self.ctx.tops, raw, strict=True)}
            raise self.ctx.fail(
                f"{path!r}: the datasets' row counts {counts} must be equal and > 0"
            )
        arrays = [_hdf5_dtype(a) for a in raw]
        self._cache = (path, arrays)
        return arrays


def _hdf5_dtype(a: np.ndarray) -> np.ndarray:
    if a.ndim != 4 and a.dtype.kind in "biu":
        return a.astype(np.int32)
    return a.astype(np.float32)


class _LMDB(_RecordReader):
    """``Data`` with ``backend: LMDB``: Datum records in key order."""

    def __init__(self, layer: dict, ctx: _Context):
        self.ctx = ctx
        ctx.top_count(1, 2)
        p = ctx.param(layer, "data_param")
        backend = first(p, "backend", "LEVELDB")
        if backend in ("LEVELDB", 0):
            raise ctx.fail(
                "data_param.backend LEVELDB (Caffe's default) is not supported: convert the "
                "database to LMDB (Caffe's convert_imageset --backend=lmdb), or add "
                "'backend: LMDB' if the source is an LMDB already"
            )
        if backend not in ("LMDB", 1):
            raise ctx.fail(f"data_param.backend {backend!r} must be LMDB")
        self.batch_size = ctx.int_field(p, "batch_size", positive=True, prefix="data_param.")
        _warn_deprecated(p, "data_param", ctx)
        if "source" not in p:
            raise ctx.fail("data_param.source is missing")
        self.source = ctx.path(first(p, "source"))
        self.transform = _Transformer(layer, ctx)
        self.env = _open_lmdb(self.source, ctx)
        if self.env.stat()["entries"] == 0:
            raise ctx.fail(f"data_param.source {self.source!r} holds no records")

    def records(self, order_rng, transform_rng):
        while True:
            with self.env.begin(buffers=False) as txn:
                for key, value in txn.cursor():
                    image, label = self._datum(key, value)
                    x = self.transform(image, transform_rng)
                    yield (x, np.int32(label))[: len(self.ctx.tops)]

    def _datum(self, key: bytes, value: bytes) -> tuple[np.ndarray, int]:
        what = f"record {key.decode(errors='replace')!r} of {self.source!r}"
        try:  # a WireError is a ValueError
            datum = decode_datum(value)
            image = None if datum.encoded else datum.array()
        except ValueError as e:
            raise self.ctx.fail(f"{what} is not a valid Datum: {e}") from None
        if datum.encoded:
            image = _decode_image(datum.data, self.transform.decode_mode, what, self.ctx)
        self.transform.check(image.shape, what)
        return image, datum.label


class _ImageList(_RecordReader):
    """``ImageData``: a text file of ``path label`` lines, the images read from
    ``root_folder + path``."""

    def __init__(self, layer: dict, ctx: _Context):
        self.ctx = ctx
        ctx.top_count(2, 2)
        p = ctx.param(layer, "image_data_param")
        pre = "image_data_param."
        self.batch_size = ctx.int_field(p, "batch_size", 1, positive=True, prefix=pre)
        self.rand_skip = ctx.int_field(p, "rand_skip", 0, prefix=pre)
        self.shuffle = bool(first(p, "shuffle", False))
        self.size = (
            ctx.int_field(p, "new_height", 0, prefix=pre),
            ctx.int_field(p, "new_width", 0, prefix=pre),
        )
        if (self.size[0] == 0) != (self.size[1] == 0):
            raise ctx.fail("image_data_param: set new_height and new_width together")
        self.mode = "color" if first(p, "is_color", True) else "gray"
        self.folder = first(p, "root_folder", "")
        _warn_deprecated(p, "image_data_param", ctx)
        if "source" not in p:
            raise ctx.fail("image_data_param.source is missing")
        self.source = ctx.path(first(p, "source"))
        self.lines = _image_list(_read_text(self.source, ctx, "source"), self.source, ctx)
        if self.rand_skip and self.rand_skip >= len(self.lines):
            raise ctx.fail(
                f"image_data_param.rand_skip {self.rand_skip} is not below the "
                f"{len(self.lines)} images of {self.source!r}"
            )
        self.transform = _Transformer(layer, ctx)
        _require("PIL.Image", "Pillow", ctx.where)

    def records(self, order_rng, transform_rng):
        lines = list(self.lines)
        if self.shuffle:
            order_rng.shuffle(lines)
        start = int(order_rng.integers(self.rand_skip)) if self.rand_skip else 0
        while True:
            for number, path, label in lines[start:]:
                image = self._image(number, path)
                yield self.transform(image, transform_rng), np.int32(label)
            start = 0
            if self.shuffle:
                order_rng.shuffle(lines)

    def _image(self, number: int, path: str) -> np.ndarray:
        # Caffe joins root_folder and the path as strings, with no separator of its own
        full = self.ctx.path(self.folder + path)
        what = f"image {full!r} (line {number} of {self.source!r})"
        try:
            with open(full, "rb") as f:
                buf = f.read()
        except OSError as e:
            raise self.ctx.fail(f"cannot read {what}: {e.strerror}") from None
        image = _decode_image(buf, self.mode, what, self.ctx)
        if self.size[0]:
            image = _resize_linear(image, *self.size)
        self.transform.check(image.shape, what)
        return image


class _Dummy:
    """``DummyData``: blobs of the given shapes from constant, uniform or gaussian fillers
    (``layers/dummy_data_layer.cpp``)."""

    def __init__(self, layer: dict, ctx: _Context):
        self.ctx = ctx
        n = len(ctx.tops)
        if not n:
            raise ctx.fail("has no top")
        p = ctx.param(layer, "dummy_data_param")
        shapes = [tuple(s.get("dim", [])) for s in p.get("shape", [])]
        legacy = [p.get(k, []) for k in ("num", "channels", "height", "width")]
        if any(legacy):
            if shapes:
                raise ctx.fail("dummy_data_param: give shape or num/channels/height/width")
            if any(len(v) not in (1, n) for v in legacy):
                raise ctx.fail("dummy_data_param: num/channels/height/width given 1 or N times")
            shapes = [tuple(v[i if len(v) > 1 else 0] for v in legacy) for i in range(n)]
        if len(shapes) not in (1, n):
            raise ctx.fail(f"dummy_data_param: {len(shapes)} shapes for {n} tops: give 1 or {n}")
        self.blob_shapes = [
            tuple(int(d) for d in s) for s in (shapes * n if len(shapes) == 1 else shapes)
        ]
        fillers = p.get("data_filler", [])
        if len(fillers) not in (0, 1, n):
            raise ctx.fail(f"dummy_data_param: {len(fillers)} data_filler for {n} tops")
        fillers = fillers * n if len(fillers) == 1 else fillers or [{}] * n
        self.fillers = [self._filler(f) for f in fillers]
        for s in self.blob_shapes:
            if not s or min(s) < 1:
                raise ctx.fail(f"dummy_data_param: shape {s} must have positive dims")
        self.batch_size = self.blob_shapes[0][0]

    def _filler(self, f: dict):
        kind = first(f, "type", "constant")
        if kind == "constant":
            value = np.float32(first(f, "value", 0.0))
            return lambda rng, shape: np.full(shape, value, np.float32)
        if kind == "uniform":
            lo, hi = float(first(f, "min", 0.0)), float(first(f, "max", 1.0))
            return lambda rng, shape: rng.uniform(lo, hi, shape).astype(np.float32)
        if kind == "gaussian" and first(f, "sparse", -1) < 0:
            mean, std = float(first(f, "mean", 0.0)), float(first(f, "std", 1.0))
            return lambda rng, shape: rng.normal(mean, std, shape).astype(np.float32)
        raise self.ctx.fail(
            f"DummyData filler {kind!r} is not supported here: constant, uniform or gaussian"
        )

    def shapes(self, order_rng, transform_rng) -> list[tuple]:
        return list(self.blob_shapes)

    def batches(self, order_rng, transform_rng):
        while True:
            yield [
                fill(order_rng, s) for fill, s in zip(self.fillers, self.blob_shapes, strict=True)
            ]


_READERS = {"HDF5Data": _HDF5, "Data": _LMDB, "ImageData": _ImageList, "DummyData": _Dummy}


# --------------------------------------------------------------------------------------------
# files and images


def _require(module: str, package: str, who: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{who} needs the {package} package: pip install {package} (or "
            "pip install 'fnlayers[caffe]')"
        ) from None


# py-lmdb opens an environment once per process: sources on one LMDB share it, and it closes
# when the last of them is gone.
_OPEN_LMDBS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _open_lmdb(path: str, ctx: _Context):
    lmdb = _require("lmdb", "lmdb", ctx.where)
    key = os.path.realpath(path)
    env = _OPEN_LMDBS.get(key)
    if env is None:
        try:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True)
        except lmdb.Error as e:
            raise ctx.fail(f"data_param.source {path!r} is not an LMDB: {e}") from None
        _OPEN_LMDBS[key] = env
    return env


def _read_text(path: str, ctx: _Context, field: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ctx.fail(f"cannot read the {field} list {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ctx.fail(f"the {field} list {path!r} is not a text file") from None


def _image_list(text: str, source: str, ctx: _Context) -> list[tuple[int, str, int]]:
    """``(line number, path, label)`` per line: Caffe splits each line at its last space."""
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip()
        if not line:
            continue
        path, _, label = line.rpartition(" ")
        try:
            lines.append((number, path, int(label)))
        except ValueError:
            path = None
        if not path:
            raise ctx.fail(f"line {number} of {source!r} is {line!r}, not 'path label'")
    if not lines:
        raise ctx.fail(f"image_data_param.source {source!r} lists no image")
    return lines


def _warn_deprecated(p: dict, field: str, ctx: _Context) -> None:
    old = [k for k in ("scale", "mean_file", "crop_size", "mirror") if k in p]
    if old:
        warnings.warn(
            f"{ctx.where}: {field} {', '.join(old)} are deprecated and ignored in a current "
            "'layer' (as in Caffe): set them in transform_param",
            stacklevel=4,
        )


def _decode_image(buf: bytes, mode: str, what: str, ctx: _Context) -> np.ndarray:
    """An image file's bytes as a ``(C, H, W)`` uint8 array in OpenCV's channel order: mode
    ``"color"`` (BGR), ``"gray"`` (one channel) or ``"native"`` (as stored; BGR/BGRA)."""
    image_mod = _require("PIL.Image", "Pillow", ctx.where)
    try:
        img = image_mod.open(io.BytesIO(buf))
        img.load()
    except Exception as e:  # Pillow raises many kinds for a bad file
        raise ctx.fail(f"cannot decode {what} as an image: {e}") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F") or img.mode.startswith("I;"):
        raise ctx.fail(f"{what} is a {img.mode} image; Caffe's transformer takes 8-bit images")
    if mode == "native":
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        mode = "gray" if img.mode in ("1", "L") else "bgra" if has_alpha else "color"
    if mode == "gray":
        return np.asarray(img.convert("L"))[None]
    pixels = np.asarray(img.convert("RGBA" if mode == "bgra" else "RGB"))
    order = [2, 1, 0, 3] if mode == "bgra" else [2, 1, 0]
    return np.ascontiguousarray(pixels[:, :, order].transpose(2, 0, 1))


def _resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's ``INTER_LINEAR`` resize of a ``(C, H, W)`` uint8 image (module docstring)."""
    r0, r1, fr = _linear_taps(image.shape[1], height)
    c0, c1, fc = _linear_taps(image.shape[2], width)
    x = image.astype(np.float64)
    rows = x[:, r0, :] * (1 - fr)[:, None] + x[:, r1, :] * fr[:, None]
    out = rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _linear_taps(size: int, out: int):
    """Source index pairs and weights of the second for ``out`` samples over ``size`` pixels."""
    pos = ((np.arange(out) + 0.5) * (size / out) - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0).astype(np.float64)
    frac[i0 < 0] = 0.0
    i0 = np.maximum(i0, 0)
    last = i0 >= size - 1
    frac[last] = 0.0
    i0[last] = size - 1
    return i0, np.minimum(i0 + 1, size - 1), frac
