"""The tops of Caffe's data layers (Input, Data, ImageData, HDF5Data, MemoryData, DummyData,
WindowData): they are not built, their tops are the net's inputs, and :func:`data_top_shapes`
reads the shapes the prototxt gives them (docs/caffe-semantics.md §15; the data itself comes
from :mod:`fnlayers.caffe.data`).
"""

from __future__ import annotations

from fnlayers.caffe.prototxt import first

__all__ = ["DATA_TYPES", "data_top_shapes"]

#: Layer types whose tops are the net's inputs (fed by the caller, or by a data source built
#: from the layer's definition).
DATA_TYPES = ("Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData")


def data_top_shapes(layer: dict) -> dict[str, tuple[int, ...] | None]:
    """``{top: Caffe shape}`` of a data layer (:data:`DATA_TYPES`), None where the prototxt does
    not say (the shape comes from the data: Data's and WindowData's images, HDF5Data's
    datasets, ImageData's files without ``new_height``/``new_width`` or ``crop_size``).

    Input: ``input_param.shape``. DummyData: ``shape`` or the legacy ``num``/``channels``/
    ``height``/``width`` (one for every top, or one per top). MemoryData: ``(batch_size,
    channels, height, width)``. ImageData: ``(batch_size, 3 if is_color else 1, H, W)`` with
    ``transform_param.crop_size`` or else ``new_height``/``new_width``. The label (second top)
    of Data, ImageData, WindowData and MemoryData is ``(batch_size,)``, as Caffe shapes it.

    Raises:
      ValueError: shapes that do not fit the tops (naming the layer and the field).
    """
    name, kind = first(layer, "name"), first(layer, "type")
    tops = tuple(layer.get("top", []))
    try:
        shapes = _DATA_SHAPES[kind](layer, len(tops))
    except (ValueError, TypeError) as err:
        raise ValueError(f"Caffe layer {name!r} ({kind}): {err}") from err
    shapes = list(shapes) + [None] * (len(tops) - len(shapes))
    return dict(zip(tops, shapes, strict=True))


# ----------------------------------------------------------------------------- per type


def _input_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "input_param", {})
    shapes = [_dims(s) for s in p.get("shape", [])]
    return _once_or_per_top(shapes, n_tops, "input_param.shape")


def _dummy_data_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "dummy_data_param", {})
    legacy = ("num", "channels", "height", "width")
    if any(f in p for f in legacy):
        if "shape" in p:
            raise ValueError("dummy_data_param: give shape or num/channels/height/width, not both")
        columns = [_once_or_per_top(p.get(f, []), n_tops, f"dummy_data_param.{f}") for f in legacy]
        return [tuple(int(v) for v in dims) for dims in zip(*columns, strict=True)]
    shapes = [_dims(s) for s in p.get("shape", [])]
    return _once_or_per_top(shapes, n_tops, "dummy_data_param.shape")


def _memory_data_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "memory_data_param", {})
    dims = tuple(int(first(p, f, 0)) for f in ("batch_size", "channels", "height", "width"))
    if min(dims) <= 0:
        raise ValueError(
            f"memory_data_param: batch_size, channels, height and width must all be positive, "
            f"got {dims}"
        )
    return [dims, dims[:1]]


def _image_data_shapes(layer: dict, n_tops: int) -> list:
    p = first(layer, "image_data_param", {})
    batch = int(first(p, "batch_size", 1))
    crop = int(first(first(layer, "transform_param", {}), "crop_size", 0))
    height, width = int(first(p, "new_height", 0)), int(first(p, "new_width", 0))
    channels = 3 if first(p, "is_color", True) else 1
    if crop:
        data = (batch, channels, crop, crop)
    elif height and width:
        data = (batch, channels, height, width)
    else:
        data = None  # each image's own size
    return [data, (batch,)]


def _batched_label(param_field: str):
    """Data and WindowData: the images' shape comes from the data; the label is (batch,)."""

    def shapes(layer: dict, n_tops: int) -> list:
        batch = first(first(layer, param_field, {}), "batch_size")
        return [None, None if batch is None else (int(batch),)]

    return shapes


def _unknown_shapes(layer: dict, n_tops: int) -> list:
    return []


_DATA_SHAPES = {
    "Input": _input_shapes,
    "DummyData": _dummy_data_shapes,
    "MemoryData": _memory_data_shapes,
    "ImageData": _image_data_shapes,
    "Data": _batched_label("data_param"),
    "WindowData": _batched_label("window_data_param"),
    "HDF5Data": _unknown_shapes,
}


def _dims(blob_shape: dict) -> tuple[int, ...]:
    return tuple(int(d) for d in blob_shape.get("dim", []))


def _once_or_per_top(values: list, n_tops: int, field: str) -> list:
    if len(values) == 1:
        return values * n_tops
    if len(values) != n_tops:
        raise ValueError(
            f"{field}: {len(values)} values for {n_tops} tops (give one, or one per top)"
        )
    return values
