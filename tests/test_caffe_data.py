"""fl.caffe data layers as batch sources (fnlayers.caffe.data) and the Datum / BlobProto codec
(fnlayers.caffe.datum), on small files each test writes: Datum bytes derived by hand from the
protobuf encoding spec and caffe.proto's field numbers, transformed pixels worked by hand from
data_transformer.cpp, OpenCV's INTER_LINEAR geometry worked by hand, Caffe's wrap-around
order."""

import struct

import numpy as np
import pytest

from fnlayers.caffe import parse
from fnlayers.caffe.data import data_source, write_lmdb
from fnlayers.caffe.datum import (
    Datum,
    decode_datum,
    encode_datum,
    read_binaryproto,
    write_binaryproto,
)
from fnlayers.caffe.wire import WireError


def _layer(text):
    (layer,) = parse(text)["layer"]
    return layer


def _take(source, n):
    it = iter(source)
    return [next(it) for _ in range(n)]


def _f32(x):
    return struct.pack("<f", x)


# ----------------------------------------------------------------------------- Datum codec
# caffe.proto: Datum channels=1 height=2 width=3 (varint), data=4 (bytes), label=5 (varint),
# float_data=6 (repeated float, not packed: one fixed32 field each, key 6<<3|5 = 0x35),
# encoded=7 (varint). BlobProto num..width=1..4, data=5 (packed), shape=7.


def test_encode_uint8_datum_is_the_protobuf_bytes():
    d = Datum(channels=1, height=2, width=2, data=bytes([1, 2, 3, 4]), label=7)
    want = bytes([0x08, 1, 0x10, 2, 0x18, 2, 0x22, 4, 1, 2, 3, 4, 0x28, 7])
    assert encode_datum(d) == want
    back = decode_datum(want)
    assert (back.channels, back.height, back.width, back.data, back.label, back.encoded) == (
        1, 2, 2, bytes([1, 2, 3, 4]), 7, False,
    )  # fmt: skip
    np.testing.assert_array_equal(back.array(), [[[1, 2], [3, 4]]])
    assert back.array().dtype == np.uint8


def test_float_datum_negative_label_and_encoded_flag():
    d = Datum.from_array(np.float32([[[0.5, -1.0]]]), label=-1)
    minus_one = bytes([0xFF] * 9 + [0x01])  # int32 -1 as a 10-byte varint
    want = (
        bytes([0x08, 1, 0x10, 1, 0x18, 2, 0x28]) + minus_one
        + b"\x35" + _f32(0.5) + b"\x35" + _f32(-1.0)
    )  # fmt: skip
    assert encode_datum(d) == want
    back = decode_datum(want)
    assert back.label == -1 and back.data == b""
    np.testing.assert_array_equal(back.array(), [[[0.5, -1.0]]])
    # a packed float_data (field 6, wire type 2) reads the same
    packed = bytes([0x08, 1, 0x10, 1, 0x18, 2, 0x32, 8]) + _f32(0.5) + _f32(-1.0)
    np.testing.assert_array_equal(decode_datum(packed).array(), [[[0.5, -1.0]]])
    enc = Datum(data=b"\x89PNG", label=3, encoded=True)
    assert encode_datum(enc) == b"\x22\x04\x89PNG\x28\x03\x38\x01"
    assert decode_datum(encode_datum(enc)).encoded


def test_datum_errors():
    with pytest.raises(ValueError, match="holds 3 data bytes"):
        Datum(1, 2, 2, data=b"abc").array()
    with pytest.raises(ValueError, match="encoded Datum must be decoded"):
        Datum(data=b"x", encoded=True).array()
    with pytest.raises(WireError, match="truncated varint"):
        decode_datum(b"\x08")
    with pytest.raises(WireError, match="field 4 has wire type 0"):
        decode_datum(b"\x20\x01")


def test_binaryproto_legacy_and_shape_forms(tmp_path):
    # compute_image_mean's form: num, channels, height, width, then packed data
    legacy = bytes([0x08, 1, 0x10, 1, 0x18, 1, 0x20, 2, 0x2A, 8]) + _f32(1.5) + _f32(2.5)
    (tmp_path / "mean.binaryproto").write_bytes(legacy)
    mean = read_binaryproto(tmp_path / "mean.binaryproto")
    assert mean.shape == (1, 1, 1, 2)
    np.testing.assert_array_equal(mean, [[[[1.5, 2.5]]]])
    write_binaryproto(tmp_path / "m2.binaryproto", np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    np.testing.assert_array_equal(
        read_binaryproto(tmp_path / "m2.binaryproto"), np.arange(6).reshape(1, 2, 3)
    )
    (tmp_path / "bad.binaryproto").write_bytes(b"\x2a\x05abc")
    with pytest.raises(ValueError, match="bad.binaryproto' is not a serialized BlobProto"):
        read_binaryproto(tmp_path / "bad.binaryproto")
    with pytest.raises(ValueError, match="cannot read .*nope"):
        read_binaryproto(tmp_path / "nope")


# ----------------------------------------------------------------------------- HDF5Data


def _hdf5_layer(batch, shuffle=False, tops=("data", "label"), extra=""):
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return _layer(
        f'layer {{ name: "h5" type: "HDF5Data" {top_lines} {extra} hdf5_data_param {{ '
        f'source: "list.txt" batch_size: {batch} shuffle: {str(shuffle).lower()} }} }}'
    )


def _write_h5(path, **datasets):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value


def test_hdf5_batches_run_on_across_files_and_wrap(tmp_path):
    data = np.arange(10 * 1 * 2 * 3, dtype=np.float64).reshape(10, 1, 2, 3)
    _write_h5(tmp_path / "a.h5", data=data[:6], label=np.arange(6))
    _write_h5(tmp_path / "b.h5", data=data[6:], label=np.arange(6, 10))
    (tmp_path / "list.txt").write_text("a.h5\nb.h5\n")
    src = data_source(_hdf5_layer(4), phase="train", root=tmp_path)
    assert src.shapes == {"data": (4, 1, 2, 3), "label": (4,)}
    batches = _take(src, 3)
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    first = batches[0]
    assert first["data"].dtype == np.float32 and first["label"].dtype == np.int32
    assert first["data"].shape == (4, 2, 3, 1)  # NHWC
    np.testing.assert_array_equal(first["data"][1], data[1].transpose(1, 2, 0))


def test_hdf5_other_ranks_keep_caffe_shape_and_float_labels(tmp_path):
    _write_h5(tmp_path / "a.h5", x=np.ones((3, 5)), y=np.float64([[0.5], [1.5], [2.5]]))
    (tmp_path / "list.txt").write_text("a.h5")
    src = data_source(_hdf5_layer(2, tops=("x", "y")), phase="test", root=tmp_path)
    assert src.shapes == {"x": (2, 5), "y": (2, 1)}
    b0, b1 = _take(src, 2)
    assert b0["y"].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b0["y"], b1["y"]]).ravel(), [0.5, 1.5, 2.5, 0.5])


def test_hdf5_shuffle_reads_every_row_once_per_pass(tmp_path):
    _write_h5(tmp_path / "a.h5", data=np.zeros((10, 1)), label=np.arange(10))
    _write_h5(tmp_path / "b.h5", data=np.zeros((10, 1)), label=np.arange(10, 20))
    (tmp_path / "list.txt").write_text("a.h5 b.h5")
    src = data_source(_hdf5_layer(5, shuffle=True), phase="train", seed=3, root=tmp_path)
    labels = np.concatenate([b["label"] for b in _take(src, 12)])  # three passes of 20
    passes = labels.reshape(3, 20)
    for p in passes:
        assert sorted(p.tolist()) == list(range(20))
        # files are not interleaved: the first 10 rows come from one file
        assert len({int(v) // 10 for v in p[:10]}) == 1
    assert passes[0].tolist() != list(range(20)) or passes[1].tolist() != list(range(20))
    again = np.concatenate([b["label"] for b in _take(src, 12)])
    np.testing.assert_array_equal(labels, again)  # every iter() repeats the stream


def test_hdf5_errors_name_the_layer_and_path(tmp_path):
    with pytest.raises(ValueError, match=r"layer 'h5' \(HDF5Data\): cannot read the source list"):
        data_source(_hdf5_layer(2), phase="train", root=tmp_path)
    (tmp_path / "list.txt").write_text("missing.h5\n")
    with pytest.raises(ValueError, match="missing.h5', listed in .*list.txt', does not exist"):
        data_source(_hdf5_layer(2), phase="train", root=tmp_path)
    _write_h5(tmp_path / "a.h5", data=np.zeros((3, 2)))
    (tmp_path / "list.txt").write_text("a.h5\n")
    with pytest.raises(ValueError, match=r"a.h5' has no dataset 'label' .*holds \['data'\]"):
        data_source(_hdf5_layer(2), phase="train", root=tmp_path)
    _write_h5(tmp_path / "a.h5", data=np.zeros((3, 2)), label=np.zeros(2))
    src = data_source(_hdf5_layer(2), phase="train", root=tmp_path)
    with pytest.raises(ValueError, match=r"row counts \{'data': 3, 'label': 2\}"):
        next(iter(src))
    with pytest.raises(ValueError, match="does not transform data"):
        data_source(_hdf5_layer(2, extra="transform_param { scale: 2 }"), phase="train")
    with pytest.raises(ValueError, match="hdf5_data_param.batch_size is missing"):
        data_source(_layer('layer { name: "h5" type: "HDF5Data" top: "d" }'), phase="train")
    (tmp_path / "x.h5").write_text("not hdf5")
    (tmp_path / "list.txt").write_text("x.h5\n")
    with pytest.raises(ValueError, match="cannot open .*x.h5' as an HDF5 file"):
        data_source(_hdf5_layer(2), phase="train", root=tmp_path)


# ----------------------------------------------------------------------------- Data (LMDB)


def _data_layer(batch, transform="", tops=("data", "label"), backend="backend: LMDB"):
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return _layer(
        f'layer {{ name: "db" type: "Data" {top_lines} transform_param {{ {transform} }} '
        f'data_param {{ source: "db" batch_size: {batch} {backend} }} }}'
    )


def test_lenet_data_layer_on_an_lmdb_written_by_the_encoder(tmp_path):
    pytest.importorskip("lmdb")
    images = [np.full((1, 28, 28), 10 * i, np.uint8) for i in range(3)]
    images[0][0, 0, 1] = 255
    write_lmdb(
        tmp_path / "examples/mnist/mnist_train_lmdb",
        [Datum.from_array(im, label=i) for i, im in enumerate(images)],
    )
    # the TRAIN data layer of Caffe's examples/mnist/lenet_train_test.prototxt
    layer = _layer(
        """
        layer {
          name: "mnist" type: "Data" top: "data" top: "label"
          include { phase: TRAIN }
          transform_param { scale: 0.00390625 }
          data_param { source: "examples/mnist/mnist_train_lmdb" batch_size: 64 backend: LMDB }
        }
        """
    )
    src = data_source(layer, phase="train", root=tmp_path)
    assert src.shapes == {"data": (64, 1, 28, 28), "label": (64,)}
    (batch,) = _take(src, 1)
    assert batch["label"].tolist() == [0, 1, 2] * 21 + [0]  # 64 records from 3: wrap-around
    assert batch["data"].shape == (64, 28, 28, 1)
    assert batch["data"][0, 0, 1, 0] == np.float32(255 * 0.00390625)
    assert batch["data"][2, 5, 5, 0] == np.float32(20 * 0.00390625)


def test_lmdb_ten_records_batch_four_wraps_like_caffe(tmp_path):
    pytest.importorskip("lmdb")
    write_lmdb(
        tmp_path / "db", [Datum.from_array(np.full((1, 1, 1), i, np.uint8), i) for i in range(10)]
    )
    src = data_source(_data_layer(4), phase="test", root=tmp_path)
    got = [b["label"].tolist() for b in _take(src, 4)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    one_top = data_source(_data_layer(4, tops=("data",)), phase="test", root=tmp_path)
    assert one_top.shapes == {"data": (4, 1, 1, 1)}
    assert list(next(iter(one_top))) == ["data"]


def test_float_data_with_per_channel_mean_values(tmp_path):
    pytest.importorskip("lmdb")
    image = np.float32([[[1.0, 2.0]], [[10.0, 20.0]]])  # (C=2, H=1, W=2)
    write_lmdb(tmp_path / "db", [Datum.from_array(image, 4)])
    layer = _data_layer(1, "scale: 0.5 mean_value: 1 mean_value: 10")
    (batch,) = _take(data_source(layer, phase="test", root=tmp_path), 1)
    # (pixel - mean[c]) * scale; NHWC: [h, w, c]
    np.testing.assert_array_equal(batch["data"][0], [[[0.0, 0.0], [0.5, 5.0]]])
    one_mean = _data_layer(1, "mean_value: 1")
    (batch,) = _take(data_source(one_mean, phase="test", root=tmp_path), 1)
    np.testing.assert_array_equal(batch["data"][0], [[[0.0, 9.0], [1.0, 19.0]]])


def _grid_lmdb(tmp_path, n=1):
    write_lmdb(
        tmp_path / "db",
        [Datum.from_array(np.arange(16, dtype=np.uint8).reshape(1, 4, 4), 0)] * n,
    )


def test_test_phase_centre_crop_with_mean_file_at_the_crop_offset(tmp_path):
    pytest.importorskip("lmdb")
    _grid_lmdb(tmp_path)
    mean = np.ones((1, 1, 4, 4), np.float32)
    mean[0, 0, 1, 1] = 5.0
    write_binaryproto(tmp_path / "mean.binaryproto", mean)
    layer = _data_layer(1, 'crop_size: 2 scale: 2 mean_file: "mean.binaryproto"')
    src = data_source(layer, phase="test", root=tmp_path)
    assert src.shapes["data"] == (1, 1, 2, 2)
    (batch,) = _take(src, 1)
    # the centre crop of 0..15 (offset 1, 1) is [[5, 6], [9, 10]]; minus the mean there, x2
    np.testing.assert_array_equal(batch["data"][0, :, :, 0], [[0, 10], [16, 18]])
    # H=5, W=3: offsets (5 - 2) // 2 = 1 and (3 - 2) // 2 = 0 (C++ integer division)
    write_lmdb(tmp_path / "odd", [Datum.from_array(np.arange(15, dtype=np.uint8).reshape(1, 5, 3))])
    odd = _layer(
        'layer { name: "db" type: "Data" top: "d" transform_param { crop_size: 2 } '
        'data_param { source: "odd" batch_size: 1 backend: LMDB } }'
    )
    (batch,) = _take(data_source(odd, phase="test", root=tmp_path), 1)
    np.testing.assert_array_equal(batch["d"][0, :, :, 0], [[3, 4], [6, 7]])


def test_train_phase_crops_are_random_and_mirroring_flips_rows(tmp_path):
    pytest.importorskip("lmdb")
    _grid_lmdb(tmp_path, n=30)
    grid = np.arange(16, dtype=np.float32).reshape(4, 4)
    crops = {(r, c): grid[r : r + 2, c : c + 2] for r in range(3) for c in range(3)}
    (batch,) = _take(data_source(_data_layer(30, "crop_size: 2"), phase="train", seed=0,
                                 root=tmp_path), 1)  # fmt: skip
    seen = set()
    for image in batch["data"][:, :, :, 0]:
        (offset,) = [o for o, crop in crops.items() if np.array_equal(crop, image)]
        seen.add(offset)
    assert len(seen) >= 4
    src = data_source(_data_layer(30, "mirror: true"), phase="test", seed=0, root=tmp_path)
    (batch,) = _take(src, 1)
    flipped = [bool(np.array_equal(im, grid[:, ::-1])) for im in batch["data"][:, :, :, 0]]
    kept = [bool(np.array_equal(im, grid)) for im in batch["data"][:, :, :, 0]]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 30


def _png(array, mode):
    pil = pytest.importorskip("PIL.Image")
    import io

    buf = io.BytesIO()
    pil.fromarray(np.asarray(array, np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_png_datums_decode_in_opencv_channel_order(tmp_path):
    pytest.importorskip("lmdb")
    rgb = _png(np.tile([10, 20, 30], (2, 3, 1)), "RGB")
    gray = _png(np.full((2, 3), 7), "L")
    rgba = _png(np.tile([10, 20, 30, 40], (2, 3, 1)), "RGBA")
    write_lmdb(
        tmp_path / "db",
        [Datum(data=b, label=i, encoded=True) for i, b in enumerate([rgb, gray, rgba])],
    )
    src = data_source(_data_layer(1), phase="test", root=tmp_path)
    assert src.shapes == {"data": (1, 3, 2, 3), "label": (1,)}  # from the first record
    colour, grey, alpha = (b["data"][0, 0, 0] for b in _take(src, 3))
    assert colour.tolist() == [30, 20, 10]  # BGR, as OpenCV decodes
    assert grey.tolist() == [7]  # decoded as stored: one channel
    assert alpha.tolist() == [30, 20, 10, 40]  # BGRA
    forced = data_source(_data_layer(1, "force_color: true"), phase="test", root=tmp_path)
    assert [b["data"][0, 0, 0].tolist() for b in _take(forced, 2)] == [[30, 20, 10], [7, 7, 7]]
    grey_src = data_source(_data_layer(1, "force_gray: true"), phase="test", root=tmp_path)
    # ITU-R 601 luma of (R, G, B) = (10, 20, 30): 2.99 + 11.74 + 3.42 = 18.15
    assert next(iter(grey_src))["data"][0, 0, 0].tolist() == [18]


def test_data_layer_errors(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    with pytest.raises(ValueError, match=r"layer 'db' \(Data\): data_param.backend LEVELDB"):
        data_source(_data_layer(2, backend=""), phase="train", root=tmp_path)
    with pytest.raises(ValueError, match="source .*db' is not an LMDB"):
        data_source(_data_layer(2), phase="train", root=tmp_path)
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="source .*db' is not an LMDB"):
        data_source(_data_layer(2), phase="train", root=tmp_path)
    write_lmdb(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="empty' exists; it writes a new LMDB"):
        write_lmdb(tmp_path / "empty", [])
    empty = _layer(
        'layer { name: "db" type: "Data" top: "d" '
        'data_param { source: "empty" batch_size: 1 backend: LMDB } }'
    )
    with pytest.raises(ValueError, match="empty' holds no records"):
        data_source(empty, phase="train", root=tmp_path)
    env = lmdb.open(str(tmp_path / "bad"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", encode_datum(Datum.from_array(np.zeros((1, 2, 2), np.uint8))))
        txn.put(b"00000001", b"\x22\x09abc")
    env.close()
    layer_text = (
        'layer { name: "db" type: "Data" top: "d" top: "l" '
        'data_param { source: "bad" batch_size: 1 backend: LMDB } }'
    )
    it = iter(data_source(_layer(layer_text), phase="train", root=tmp_path))
    next(it)
    with pytest.raises(ValueError, match="record '00000001' of .*bad' is not a valid Datum"):
        next(it)
    write_lmdb(tmp_path / "png", [Datum(data=b"not a png", encoded=True)])
    with pytest.raises(ValueError, match="cannot decode record '00000000' .* as an image"):
        data_source(_layer(layer_text.replace('"bad"', '"png"')), phase="train", root=tmp_path)
    _grid_lmdb(tmp_path / "db")
    with pytest.raises(ValueError, match="is 4x4, smaller than transform_param.crop_size 5"):
        data_source(_data_layer(1, "crop_size: 5"), phase="test", root=tmp_path / "db")
    with pytest.raises(ValueError, match="2 mean_value for record .* of 1 channels"):
        data_source(_data_layer(1, "mean_value: 1 mean_value: 2"), phase="test",
                    root=tmp_path / "db")  # fmt: skip
    write_binaryproto(tmp_path / "m.binaryproto", np.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"has shape \(1, 3, 3\) but record"):
        data_source(_data_layer(1, f'mean_file: "{tmp_path}/m.binaryproto"'), phase="test",
                    root=tmp_path / "db")  # fmt: skip


# ----------------------------------------------------------------------------- ImageData


def _image_layer(batch, extra="", transform=""):
    return _layer(
        f'layer {{ name: "img" type: "ImageData" top: "data" top: "label" '
        f"transform_param {{ {transform} }} image_data_param {{ source: "
        f'"list.txt" root_folder: "imgs/" batch_size: {batch} {extra} }} }}'
    )


def _write_images(tmp_path, images, labels):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    lines = []
    for i, (im, mode) in enumerate(images):
        (tmp_path / "imgs" / f"im{i}.png").write_bytes(_png(im, mode))
        lines.append(f"im{i}.png {labels[i]}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")


def test_image_data_list_wraps_in_bgr(tmp_path):
    _write_images(
        tmp_path,
        [(np.tile([10, 20, 30], (2, 2, 1)), "RGB"), (np.tile([1, 2, 3], (2, 2, 1)), "RGB")],
        [3, 5],
    )
    src = data_source(_image_layer(3), phase="test", root=tmp_path)
    assert src.shapes == {"data": (3, 3, 2, 2), "label": (3,)}
    b0, b1 = _take(src, 2)
    assert b0["label"].tolist() == [3, 5, 3] and b1["label"].tolist() == [5, 3, 5]
    assert b0["data"][0, 1, 1].tolist() == [30, 20, 10]
    assert b0["data"][1, 0, 0].tolist() == [3, 2, 1]
    gray = data_source(_image_layer(1, "is_color: false"), phase="test", root=tmp_path)
    assert gray.shapes["data"] == (1, 1, 2, 2)
    assert next(iter(gray))["data"][0, 0, 0].tolist() == [18]


def test_image_data_resize_follows_opencv_inter_linear(tmp_path):
    _write_images(
        tmp_path, [(np.uint8([[0, 100]]), "L"), (np.uint8([[0, 40, 80, 120]]), "L")], [0, 1]
    )
    up = data_source(_image_layer(1, "is_color: false new_height: 1 new_width: 4"), phase="test",
                     root=tmp_path)  # fmt: skip
    # output x samples source (x + 0.5) * 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25 (edges clamped)
    assert up.shapes["data"] == (1, 1, 1, 4)
    first, second = (b["data"][0, 0, :, 0].tolist() for b in _take(up, 2))
    assert first == [0, 25, 75, 100]
    # down: samples at (x + 0.5) * 4/4 ... for 4 -> 4 it is the identity
    assert second == [0, 40, 80, 120]
    down = data_source(_image_layer(1, "is_color: false new_height: 1 new_width: 2"),
                       phase="test", root=tmp_path)  # fmt: skip
    # 4 -> 2 samples 0.5 and 2.5: the mean of two neighbours, no antialiasing
    assert [b["data"][0, 0, :, 0].tolist() for b in _take(down, 2)][1] == [20, 100]


def test_image_data_shuffle_and_rand_skip(tmp_path):
    _write_images(tmp_path, [(np.full((1, 1), i), "L") for i in range(6)], list(range(6)))
    src = data_source(_image_layer(6, "shuffle: true"), phase="train", seed=1, root=tmp_path)
    passes = [b["label"].tolist() for b in _take(src, 4)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # reshuffled at every wrap
    for b in _take(src, 2):  # the pixel is the label: images and labels stay paired
        np.testing.assert_array_equal(b["data"][:, 0, 0, 0], b["label"])
    skip = data_source(_image_layer(6, "rand_skip: 5"), phase="train", seed=1, root=tmp_path)
    (labels,) = [b["label"].tolist() for b in _take(skip, 1)]
    assert labels[0] < 5 and labels == [(labels[0] + i) % 6 for i in range(6)]


def test_image_data_errors(tmp_path):
    pytest.importorskip("PIL.Image")
    with pytest.raises(ValueError, match=r"layer 'img' \(ImageData\): cannot read the source"):
        data_source(_image_layer(1), phase="test", root=tmp_path)
    (tmp_path / "list.txt").write_text("a.png 1\nb.png\n")
    with pytest.raises(ValueError, match="line 2 of .*list.txt' is 'b.png', not 'path label'"):
        data_source(_image_layer(1), phase="test", root=tmp_path)
    (tmp_path / "list.txt").write_text("a.png 1\n")
    with pytest.raises(ValueError, match=r"cannot read image .*imgs/a.png' \(line 1 of"):
        data_source(_image_layer(1), phase="test", root=tmp_path)
    with pytest.raises(ValueError, match="set new_height and new_width together"):
        data_source(_image_layer(1, "new_height: 4"), phase="test", root=tmp_path)


# ----------------------------------------------------------------------------- other layers


def test_dummy_data_constant_and_legacy_shapes():
    layer = _layer(
        'layer { name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
        "shape { dim: 2 dim: 3 dim: 4 dim: 5 } shape { dim: 2 } "
        "data_filler { type: 'constant' value: 1.5 } data_filler {} } }"
    )
    src = data_source(layer, phase="train")
    assert src.shapes == {"a": (2, 3, 4, 5), "b": (2,)}
    batch = next(iter(src))
    assert batch["a"].shape == (2, 4, 5, 3) and np.all(batch["a"] == 1.5)
    np.testing.assert_array_equal(batch["b"], [0.0, 0.0])
    legacy = _layer(
        'layer { name: "d" type: "DummyData" top: "a" dummy_data_param { '
        "num: 1 channels: 2 height: 1 width: 1 data_filler { type: 'uniform' min: 3 max: 4 } } }"
    )
    x = next(iter(data_source(legacy, phase="train", seed=0)))["a"]
    assert x.shape == (1, 1, 1, 2) and np.all((x >= 3) & (x <= 4))
    bad = _layer(
        'layer { name: "d" type: "DummyData" top: "a" dummy_data_param { '
        "shape { dim: 1 } data_filler { type: 'xavier' } } }"
    )
    with pytest.raises(ValueError, match="DummyData filler 'xavier' is not supported"):
        data_source(bad, phase="train")


def test_pairs_feed_fit_style_batches(tmp_path):
    _write_h5(tmp_path / "a.h5", data=np.arange(4.0).reshape(4, 1), label=np.arange(4))
    (tmp_path / "list.txt").write_text("a.h5")
    src = data_source(_hdf5_layer(2), phase="train", root=tmp_path)
    (x0, _), (x1, y1) = _take(src.pairs(), 2)
    np.testing.assert_array_equal(np.concatenate([x0, x1]).ravel(), [0, 1, 2, 3])
    assert y1.tolist() == [2, 3]
    with pytest.raises(ValueError, match="'nope' is not a top of 'h5'"):
        src.pairs(x="nope")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('type: "Input" top: "x"', "an Input layer reads no data"),
        ('type: "MemoryData" top: "x"', "a MemoryData layer reads no data"),
        ('type: "WindowData" top: "x"', "type 'WindowData' is not a data layer"),
        ('type: "Convolution" top: "x"', "one of Data, HDF5Data, ImageData, DummyData"),
    ],
)
def test_layers_that_are_not_sources(text, match):
    with pytest.raises(ValueError, match=match):
        data_source(_layer(f'layer {{ name: "l" {text} }}'), phase="train")
    with pytest.raises(ValueError, match="phase='TRAIN' must be one of"):
        data_source(_layer(f'layer {{ name: "l" {text} }}'), phase="TRAIN")
