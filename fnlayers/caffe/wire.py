"""A protobuf wire-format decoder and encoder for ``.caffemodel`` files (no protobuf
dependency).

:func:`fields` splits a message into ``(field_number, wire_type, value)`` triples (a varint
as an int, a length-delimited field as bytes, a fixed 32/64-bit field as its raw 4/8 bytes);
:func:`read_net` decodes a serialized ``NetParameter`` into the layers' names, types and
blobs, the field numbers from :mod:`fnlayers.caffe.schema`; a V1 layer's enum type number
becomes its current type string (Caffe's ``UpgradeV1LayerType``). :func:`encode_blob` and
:func:`write_net` are the inverse: a ``BlobProto`` with ``shape`` and packed ``data``, a
``NetParameter`` of ``layer`` entries with name, type and blobs (fields in number order, as
protobuf serializes them).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fnlayers.caffe import schema as S

__all__ = [
    "CaffeLayerBlobs", "WireError", "decode_blob", "encode_blob", "fields", "read_net",
    "write_net",
]  # fmt: skip


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"varint longer than 10 bytes ending at byte {pos}")


def _signed64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def fields(buf: bytes) -> list[tuple[int, int, object]]:
    """The fields of one serialized message, in the order written."""
    buf = bytes(buf) if not isinstance(buf, bytes) else buf
    out, pos, n = [], 0, len(buf)
    while pos < n:
        key, pos = read_varint(buf, pos)
        number, wtype = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wtype == S.VARINT:
            value, pos = read_varint(buf, pos)
        elif wtype == S.I64:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wtype == S.LEN:
            length, pos = read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wtype == S.I32:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise WireError(f"unsupported wire type {wtype} (field {number}) at byte {pos}")
        if pos > n:
            raise WireError(f"field {number} runs past the end of the message ({n} bytes)")
        out.append((number, wtype, value))
    return out


def _ints(entries) -> list[int]:
    """A repeated integer field, packed or not."""
    values = []
    for wtype, v in entries:
        if wtype == S.VARINT:
            values.append(_signed64(v))
        elif wtype == S.LEN:
            pos = 0
            while pos < len(v):
                x, pos = read_varint(v, pos)
                values.append(_signed64(x))
        else:
            raise WireError(f"an integer field with wire type {wtype}")
    return values


def _reals(entries, dtype: str, fixed_wtype: int) -> np.ndarray:
    """A repeated float (``<f4``) or double (``<f8``) field, packed or not."""
    parts = []
    for wtype, v in entries:
        if wtype not in (S.LEN, fixed_wtype):
            raise WireError(f"a {dtype} field with wire type {wtype}")
        if len(v) % np.dtype(dtype).itemsize:
            raise WireError(f"packed {dtype} data of {len(v)} bytes")
        parts.append(np.frombuffer(v, dtype))
    return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def _group(buf: bytes) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for number, wtype, value in fields(buf):
        grouped.setdefault(number, []).append((wtype, value))
    return grouped


def _string(entries, default=None):
    if not entries:
        return default
    wtype, v = entries[-1]
    if wtype != S.LEN:
        raise WireError(f"a string field with wire type {wtype}")
    return v.decode("utf-8")


def decode_blob(buf: bytes) -> np.ndarray:
    """A serialized ``BlobProto`` as a float32 array of its shape: ``shape`` if present, else
    the legacy 4-D ``(num, channels, height, width)``, else 1-D."""
    g = _group(buf)
    if S.BLOB_DOUBLE_DATA in g and S.BLOB_DATA not in g:
        data = _reals(g[S.BLOB_DOUBLE_DATA], "<f8", S.I64).astype(np.float32)
    else:
        data = _reals(g.get(S.BLOB_DATA, []), "<f4", S.I32)
    if S.BLOB_SHAPE in g:
        shape_msg = _group(g[S.BLOB_SHAPE][-1][1])
        shape = tuple(_ints(shape_msg.get(S.SHAPE_DIM, [])))
    elif any(k in g for k in (S.BLOB_NUM, S.BLOB_CHANNELS, S.BLOB_HEIGHT, S.BLOB_WIDTH)):
        shape = tuple(
            (_ints(g[k])[-1] if k in g else 0)
            for k in (S.BLOB_NUM, S.BLOB_CHANNELS, S.BLOB_HEIGHT, S.BLOB_WIDTH)
        )
    else:
        shape = (data.size,)
    if int(np.prod(shape)) != data.size:
        raise WireError(f"a blob of shape {shape} holds {data.size} values")
    return data.reshape(shape).astype(np.float32)


class CaffeLayerBlobs(NamedTuple):
    name: str
    type: str | int | None  # a V1 layer's enum number if not one of caffe.proto's
    blobs: list


def read_net(buf: bytes) -> tuple[str | None, list[CaffeLayerBlobs]]:
    """A serialized ``NetParameter`` (a ``.caffemodel``): its name and, for each layer (the
    current ``layer`` field, then deprecated V1 ``layers``), its name, type and blobs."""
    g = _group(buf)
    layers = []
    for _, v in g.get(S.NET_LAYER, []):
        lg = _group(v)
        blobs = [decode_blob(b) for _, b in lg.get(S.LAYER_BLOBS, [])]
        layers.append(
            CaffeLayerBlobs(_string(lg.get(S.LAYER_NAME)), _string(lg.get(S.LAYER_TYPE)), blobs)
        )
    for _, v in g.get(S.NET_LAYERS_V1, []):
        lg = _group(v)
        blobs = [decode_blob(b) for _, b in lg.get(S.V1_BLOBS, [])]
        kind = _ints(lg[S.V1_TYPE])[-1] if S.V1_TYPE in lg else None
        if kind in S.V1_LAYER_TYPES:
            kind = S.V1_LAYER_TYPES[kind][1]
        layers.append(CaffeLayerBlobs(_string(lg.get(S.V1_NAME)), kind, blobs))
    return _string(g.get(S.NET_NAME)), layers


# ----------------------------------------------------------------------------- encoding


def encode_varint(n: int) -> bytes:
    """A base-128 varint; a negative int as its 64-bit two's complement (10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wtype: int) -> bytes:
    return encode_varint(number << 3 | wtype)


def len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes, a message or a packed repeated field)."""
    return _key(number, S.LEN) + encode_varint(len(payload)) + payload


def encode_blob(array) -> bytes:
    """A ``BlobProto``: packed float32 ``data`` (field 5, omitted when empty, as protobuf omits
    an empty packed field) then ``shape`` (field 7, a ``BlobShape`` of packed ``dim``)."""
    a = np.asarray(array, dtype=np.float32)
    out = len_field(S.BLOB_DATA, a.astype("<f4").tobytes()) if a.size else b""
    dims = b"".join(encode_varint(int(d)) for d in a.shape)
    return out + len_field(S.BLOB_SHAPE, len_field(S.SHAPE_DIM, dims) if dims else b"")


def write_net(name: str | None, layers) -> bytes:
    """A serialized ``NetParameter``: ``name`` then, for each ``(name, type, blobs)`` (e.g. a
    :class:`CaffeLayerBlobs`), a ``layer`` entry with its name, type (a str) and blobs."""
    out = len_field(S.NET_NAME, name.encode("utf-8")) if name is not None else b""
    for layer_name, kind, blobs in layers:
        msg = len_field(S.LAYER_NAME, layer_name.encode("utf-8"))
        if kind is not None:
            msg += len_field(S.LAYER_TYPE, str(kind).encode("utf-8"))
        msg += b"".join(len_field(S.LAYER_BLOBS, encode_blob(b)) for b in blobs)
        out += len_field(S.NET_LAYER, msg)
    return out
