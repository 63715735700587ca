"""Caffe's ``Datum`` (one record of a ``Data`` layer's LMDB) and ``.binaryproto`` files (a
serialized ``BlobProto``, such as a ``mean_file``), decoded and encoded with
:mod:`fnlayers.caffe.wire` (no protobuf dependency).

A Datum holds one image, ``channels x height x width`` in Caffe's C, H, W order, either as
``data`` (uint8 bytes) or as ``float_data`` (float32), or an ``encoded`` image file (JPEG, PNG)
in ``data``; and an int32 ``label``. :func:`encode_datum` writes the fields as protobuf does
(in number order, ``float_data`` unpacked as proto2 declares it), so that a Datum Caffe's own
tools write (``convert_imageset``, ``convert_mnist_data``) and the same Datum written here are
the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from fnlayers.caffe import schema, wire

__all__ = [
    "Datum",
    "decode_datum",
    "encode_datum",
    "read_binaryproto",
    "write_binaryproto",
]

# message Datum, caffe.proto (BVLC Caffe commit 9b891540183ddc834a02b2bd81b31afae71b2153)
DATUM_CHANNELS = 1  # optional int32
DATUM_HEIGHT = 2  # optional int32
DATUM_WIDTH = 3  # optional int32
DATUM_DATA = 4  # optional bytes
DATUM_LABEL = 5  # optional int32
DATUM_FLOAT_DATA = 6  # repeated float (not packed)
DATUM_ENCODED = 7  # optional bool [default = false]


@dataclasses.dataclass(frozen=True, eq=False)
class Datum:
    """A Caffe ``Datum``.

    Attributes:
      channels, height, width: the image's shape (0 where unset, as in an encoded Datum).
      data: the uint8 pixels in C, H, W order, or the encoded image file's bytes.
      label: an int32.
      float_data: float32 pixels in C, H, W order, used when ``data`` is empty.
      encoded: whether ``data`` is an image file (JPEG, PNG, ...).
    """

    channels: int = 0
    height: int = 0
    width: int = 0
    data: bytes = b""
    label: int = 0
    float_data: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float32))
    encoded: bool = False

    @classmethod
    def from_array(cls, array, label: int = 0) -> Datum:
        """A Datum of one ``(channels, height, width)`` image: a uint8 array as ``data``, any
        other real dtype as float32 ``float_data``."""
        a = np.asarray(array)
        if a.ndim != 3:
            raise ValueError(
                f"Datum.from_array: array must be (channels, height, width), got shape {a.shape}"
            )
        c, h, w = (int(d) for d in a.shape)
        if a.dtype == np.uint8:
            return cls(c, h, w, data=a.tobytes(), label=int(label))
        return cls(c, h, w, label=int(label), float_data=a.astype(np.float32).ravel())

    def array(self) -> np.ndarray:
        """The unencoded image as a ``(channels, height, width)`` array: uint8 from ``data``,
        else float32 from ``float_data`` (Caffe's ``DataTransformer`` reads ``data`` when it is
        not empty).

        Raises:
          ValueError: the Datum is encoded, or its pixel count is not
            ``channels * height * width``.
        """
        if self.encoded:
            raise ValueError("Datum.array: an encoded Datum must be decoded as an image first")
        shape = (self.channels, self.height, self.width)
        count = self.channels * self.height * self.width
        if self.data:
            values, what = np.frombuffer(self.data, np.uint8), "data bytes"
        else:
            values, what = np.asarray(self.float_data, np.float32), "float_data values"
        if values.size != count or count == 0:
            raise ValueError(
                f"Datum of shape channels={shape[0]} height={shape[1]} width={shape[2]} "
                f"holds {values.size} {what}"
            )
        return values.reshape(shape)


def decode_datum(buf: bytes) -> Datum:
    """A serialized ``Datum``.

    Raises:
      fnlayers.caffe.wire.WireError (a ValueError): bytes that are not a Datum message.
    """
    values: dict = {}
    floats = []
    for number, wtype, value in wire.fields(buf):
        if number in (DATUM_CHANNELS, DATUM_HEIGHT, DATUM_WIDTH, DATUM_LABEL, DATUM_ENCODED):
            _expect(wtype, schema.VARINT, number)
            values[number] = value
        elif number == DATUM_DATA:
            _expect(wtype, schema.LEN, number)
            values[number] = bytes(value)
        elif number == DATUM_FLOAT_DATA:
            if wtype == schema.I32:
                floats.append(value)
            elif wtype == schema.LEN and len(value) % 4 == 0:  # a packed writer's form
                floats.append(value)
            else:
                raise wire.WireError(f"Datum float_data with wire type {wtype}")
    return Datum(
        channels=_int32(values.get(DATUM_CHANNELS, 0)),
        height=_int32(values.get(DATUM_HEIGHT, 0)),
        width=_int32(values.get(DATUM_WIDTH, 0)),
        data=values.get(DATUM_DATA, b""),
        label=_int32(values.get(DATUM_LABEL, 0)),
        float_data=np.frombuffer(b"".join(floats), "<f4").astype(np.float32),
        encoded=bool(values.get(DATUM_ENCODED, 0)),
    )


def encode_datum(datum: Datum) -> bytes:
    """A ``Datum`` serialized as protobuf does: ``channels``, ``height``, ``width`` when not 0,
    ``data`` when not empty, ``label`` always (Caffe's tools always set it), ``float_data`` one
    fixed32 field per value, ``encoded`` when true."""
    out = b""
    for number, v in (
        (DATUM_CHANNELS, datum.channels),
        (DATUM_HEIGHT, datum.height),
        (DATUM_WIDTH, datum.width),
    ):
        if v:
            out += _varint_field(number, v)
    if datum.data:
        out += wire.len_field(DATUM_DATA, bytes(datum.data))
    out += _varint_field(DATUM_LABEL, datum.label)
    key = wire.encode_varint(DATUM_FLOAT_DATA << 3 | schema.I32)
    out += b"".join(key + struct.pack("<f", v) for v in np.asarray(datum.float_data).ravel())
    if datum.encoded:
        out += _varint_field(DATUM_ENCODED, 1)
    return out


def read_binaryproto(path: str | os.PathLike) -> np.ndarray:
    """A ``.binaryproto`` file (a serialized ``BlobProto``, e.g. a mean file written by Caffe's
    ``compute_image_mean``) as a float32 array of its shape: the legacy ``(num, channels,
    height, width)`` or the ``shape`` field's.

    Raises:
      ValueError: the file cannot be read or is not a BlobProto (the message names the path).
    """
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {os.fspath(path)!r}: {e.strerror}") from None
    try:
        return wire.decode_blob(buf)
    except wire.WireError as e:
        raise ValueError(f"{os.fspath(path)!r} is not a serialized BlobProto: {e}") from None


def write_binaryproto(path: str | os.PathLike, array) -> None:
    """Writes ``array`` as a ``.binaryproto`` (a ``BlobProto`` with ``shape`` and float32
    ``data``) that Caffe reads as a mean file; a mean for ``(C, H, W)`` images is
    ``(1, C, H, W)``."""
    with open(path, "wb") as f:
        f.write(wire.encode_blob(array))


# --------------------------------------------------------------------------------------------
# private helpers


def _expect(wtype: int, want: int, number: int) -> None:
    if wtype != want:
        raise wire.WireError(f"Datum field {number} has wire type {wtype}, expected {want}")


def _int32(v: int) -> int:
    v &= (1 << 32) - 1  # an int32 field: the low 32 bits of the (sign-extended) varint
    return v - (1 << 32) if v >= 1 << 31 else v


def _varint_field(number: int, value: int) -> bytes:
    return wire.encode_varint(number << 3 | schema.VARINT) + wire.encode_varint(int(value))
