"""Data: the bundled digits, MNIST IDX and CIFAR-10 readers on files written here, minibatches."""

import gzip
import importlib.resources
import io
import itertools
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlayers import data

# The UCI test set's class sizes for digits 0..9 (its documentation, and sklearn's).
DIGIT_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def raw_digits():
    """The bundled CSV parsed independently of fnlayers.data: (1797, 64) pixels 0..16, labels."""
    blob = (importlib.resources.files("fnlayers") / "_data" / "digits.csv.gz").read_bytes()
    rows = np.loadtxt(io.StringIO(gzip.decompress(blob).decode()), delimiter=",", dtype=np.int64)
    return rows[:, :64], rows[:, 64]


@pytest.fixture(scope="module")
def digits28():
    return data.load_digits()


# -- load_digits ----------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_range(digits28):
    ds = digits28
    assert isinstance(ds, data.Dataset)
    assert ds.x_train.shape == (1438, 28, 28, 1) and ds.x_test.shape == (359, 28, 28, 1)
    assert ds.y_train.shape == (1438,) and ds.y_test.shape == (359,)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and 0.9 < x.max() <= 1.0
    assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_test))


def test_digits_total_class_counts_and_stratification(digits28):
    ds = digits28
    train_counts = np.bincount(ds.y_train, minlength=10)
    test_counts = np.bincount(ds.y_test, minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, DIGIT_CLASS_COUNTS)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    # Each class is held out in proportion: 20% of 178 is 35.6, so 35 or 36.
    share = test_counts / np.array(DIGIT_CLASS_COUNTS)
    np.testing.assert_allclose(share, 0.2, atol=1 / 174)


def test_digits_splits_are_disjoint_and_cover_the_source(raw_digits):
    pixels, labels = raw_digits
    ds = data.load_digits(size=10)  # 10x10 is the 8x8 source with a zero border, exactly
    for x in (ds.x_train, ds.x_test):
        assert np.all(x[:, 0] == 0) and np.all(x[:, -1] == 0)
        assert np.all(x[:, :, 0] == 0) and np.all(x[:, :, -1] == 0)

    def rows(x, y):
        return np.concatenate(
            [np.rint(x[:, 1:-1, 1:-1, 0] * 16).reshape(len(x), 64), y[:, None]], 1
        )

    got = np.concatenate([rows(ds.x_train, ds.y_train), rows(ds.x_test, ds.y_test)])
    want = np.concatenate([pixels, labels[:, None]], 1)
    # Same multiset of (image, label) rows: every source image appears exactly once overall.
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(want, axis=0))
    np.testing.assert_array_equal(
        np.unique(got, axis=0, return_counts=True)[1],
        np.unique(want, axis=0, return_counts=True)[1],
    )
    train_rows = {r.tobytes() for r in rows(ds.x_train, ds.y_train)}
    test_rows = {r.tobytes() for r in rows(ds.x_test, ds.y_test)}
    duplicated = len(want) - len(np.unique(want, axis=0))
    assert len(train_rows & test_rows) <= duplicated


def test_digits_split_is_deterministic_and_seeded(digits28):
    again = data.load_digits()
    for a, b in zip(digits28, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = data.load_digits(seed=1)
    assert not np.array_equal(other.y_train, digits28.y_train)
    # The split does not depend on the output size.
    small = data.load_digits(size=10)
    np.testing.assert_array_equal(small.y_train, digits28.y_train)
    half = data.load_digits(test_fraction=0.5)
    assert len(half.y_test) == sum(int(c / 2 + 0.5) for c in DIGIT_CLASS_COUNTS)


def test_digits_resize_is_bilinear_with_half_pixel_centres(digits28):
    padded = data.load_digits(size=10).x_train[..., 0]
    for size, ds in [(28, digits28), (16, data.load_digits(16)), (5, data.load_digits(5))]:
        reference = jax.image.resize(
            jnp.asarray(padded), (len(padded), size, size), "linear", antialias=False
        )
        np.testing.assert_allclose(ds.x_train[..., 0], reference, atol=1e-6)


def test_digits_resize_keeps_the_mass_centred(digits28):
    small = data.load_digits(size=10).x_train[..., 0]
    big = digits28.x_train[..., 0]

    def centre_of_mass(x):
        idx = np.arange(x.shape[-1])
        mass = x.sum((1, 2))
        return x.sum(2) @ idx / mass, x.sum(1) @ idx / mass

    # A point at pixel p of the 10x10 image sits at (p + 0.5) * 28 / 10 - 0.5 after resizing.
    for c_small, c_big in zip(centre_of_mass(small), centre_of_mass(big), strict=True):
        np.testing.assert_allclose(c_big, (c_small + 0.5) * 2.8 - 0.5, atol=0.25)
        assert abs(c_big.mean() - 13.5) < 1.0
    # The digit stays inside the frame: almost all ink in the central 22x22, none on the edge.
    assert big[:, 3:25, 3:25].sum() > 0.95 * big.sum()
    assert np.all(big[:, 0] == 0) and np.all(big[:, :, -1] == 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"size": 0}, ValueError, r"size=0 must be >= 1"),
        ({"size": 2.5}, TypeError, r"size=2.5 must be an int"),
        ({"test_fraction": 0.0}, ValueError, r"test_fraction=0.0 must be in \(0, 1\)"),
        ({"test_fraction": 1}, ValueError, r"test_fraction=1 must be in \(0, 1\)"),
        ({"test_fraction": "0.2"}, TypeError, r"test_fraction='0.2' must be a number"),
        ({"test_fraction": 0.001}, ValueError, r"puts 0 of the 178 images of class 0"),
        ({"seed": -1}, ValueError, r"seed=-1 must be >= 0"),
    ],
)
def test_digits_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        data.load_digits(**kwargs)


# -- MNIST IDX -------------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_files(tmp_path, rng):
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    images[0, 1, 2] = 255
    images[0, 0, 0] = 0
    labels = np.array([7, 0, 9, 3, 3], np.uint8)
    img, lab = tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    img.write_bytes(_idx(images))
    lab.write_bytes(_idx(labels))
    return img, lab, images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_read_mnist_idx(tmp_path, mnist_files, compress):
    img, lab, images, _ = mnist_files
    if compress:
        img_gz, lab_gz = tmp_path / "i.gz", tmp_path / "l.gz"
        img_gz.write_bytes(gzip.compress(img.read_bytes()))
        lab_gz.write_bytes(gzip.compress(lab.read_bytes()))
        img, lab = img_gz, lab_gz
    x, y = data.read_mnist_idx(img, lab)
    assert x.shape == (5, 4, 3, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and y.tolist() == [7, 0, 9, 3, 3]
    assert x[0, 1, 2, 0] == 1.0 and x[0, 0, 0, 0] == 0.0
    np.testing.assert_allclose(x[..., 0] * 255, images, atol=1e-4)


def test_read_mnist_idx_rejects_bad_files(tmp_path, mnist_files):
    img, lab, _, labels = mnist_files
    with pytest.raises(ValueError, match=r"images_path=.*magic number 0x00000801; expected 0x0000"):
        data.read_mnist_idx(lab, img)  # swapped

    short = tmp_path / "short"
    short.write_bytes(img.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"'.*short' is truncated: .*shape \(5, 4, 3\) \(60 bytes"):
        data.read_mnist_idx(short, lab)

    long = tmp_path / "long"
    long.write_bytes(lab.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=r"labels_path=.*followed by extra bytes"):
        data.read_mnist_idx(img, long)

    stub = tmp_path / "stub"
    stub.write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match=r"has 3 bytes, fewer than the 16-byte IDX header"):
        data.read_mnist_idx(stub, lab)

    floats = tmp_path / "floats"
    floats.write_bytes(struct.pack(">I3I", 0x0D03, 1, 1, 1) + b"\x00" * 4)
    with pytest.raises(ValueError, match=r"magic number 0x00000d03"):
        data.read_mnist_idx(floats, lab)

    four = tmp_path / "four"
    four.write_bytes(_idx(labels[:4]))
    with pytest.raises(ValueError, match=r"holds 5 images but labels_path=.* holds 4 labels"):
        data.read_mnist_idx(img, four)

    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(img.read_bytes())[:-6])
    with pytest.raises(ValueError, match=r"cut\.gz' is a truncated or corrupt gzip file"):
        data.read_mnist_idx(cut_gz, lab)


# -- CIFAR-10 --------------------------------------------------------------------------------------


def _cifar_records(rng, labels):
    planes = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    raw = np.concatenate(
        [np.asarray(labels, np.uint8)[:, None], planes.reshape(len(labels), -1)], axis=1
    )
    return raw.tobytes(), planes


def test_read_cifar10_batches(tmp_path, rng):
    first, planes1 = _cifar_records(rng, [3, 9, 0])
    second, planes2 = _cifar_records(rng, [1, 6])
    (tmp_path / "data_batch_1.bin").write_bytes(first)
    (tmp_path / "data_batch_2.bin.gz").write_bytes(gzip.compress(second))
    x, y = data.read_cifar10_batches(
        [tmp_path / "data_batch_1.bin", str(tmp_path / "data_batch_2.bin.gz")]
    )
    assert x.shape == (5, 32, 32, 3) and x.dtype == np.float32
    assert y.dtype == np.int32 and y.tolist() == [3, 9, 0, 1, 6]
    planes = np.concatenate([planes1, planes2])
    # Record byte 1 + c*1024 + i*32 + j is channel c of pixel (i, j).
    for n, i, j, c in [(0, 0, 0, 0), (1, 5, 7, 1), (4, 31, 2, 2), (2, 17, 30, 0)]:
        assert x[n, i, j, c] == np.float32(planes[n, c, i, j] / 255)
    assert 0.0 <= x.min() and x.max() <= 1.0

    x1, y1 = data.read_cifar10_batches(tmp_path / "data_batch_1.bin")
    np.testing.assert_array_equal(x1, x[:3])
    np.testing.assert_array_equal(y1, y[:3])
    x2, y2 = data.read_cifar10_batches(tmp_path.glob("*.gz"))  # any iterable of paths
    np.testing.assert_array_equal(x2, x[3:])
    np.testing.assert_array_equal(y2, y[3:])


def test_read_cifar10_batches_rejects_bad_files(tmp_path, rng):
    good, _ = _cifar_records(rng, [1, 2])
    cut = tmp_path / "cut.bin"
    cut.write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"cut\.bin' has 6145 bytes, not a positive multiple of"):
        data.read_cifar10_batches([cut])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.bin' has 0 bytes"):
        data.read_cifar10_batches(empty)
    bad_label, _ = _cifar_records(rng, [4, 12])
    (tmp_path / "c100.bin").write_bytes(bad_label)
    with pytest.raises(ValueError, match=r"record 1 has label byte 12; CIFAR-10 labels are 0..9"):
        data.read_cifar10_batches(tmp_path / "c100.bin")
    with pytest.raises(ValueError, match=r"paths=\[\] must be a path or a non-empty sequence"):
        data.read_cifar10_batches([])
    with pytest.raises(TypeError, match=r"paths=5 must be a path or an iterable of paths"):
        data.read_cifar10_batches(5)


# -- batches and epochs ----------------------------------------------------------------------------


def _pairs(n):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return x, np.arange(n, dtype=np.int32)


def test_batches_one_epoch_visits_every_example_once():
    x, y = _pairs(10)
    out = list(data.batches(x, y, 4, seed=0))
    assert [len(yb) for _, yb in out] == [4, 4, 2]
    seen = np.concatenate([yb for _, yb in out])
    assert sorted(seen.tolist()) == list(range(10))
    assert seen.tolist() != list(range(10))  # shuffled
    for xb, yb in out:  # x and y stay paired
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)


def test_batches_are_deterministic_per_seed_and_epoch():
    x, y = _pairs(50)

    def order(**kw):
        return np.concatenate([yb for _, yb in data.batches(x, y, 8, **kw)]).tolist()

    assert order(seed=3, epoch=2) == order(seed=3, epoch=2)
    assert order(seed=3, epoch=2) != order(seed=3, epoch=1)
    assert order(seed=3) != order(seed=4)
    assert order(shuffle=False) == list(range(50))


def test_batches_drop_last_and_steps_per_epoch():
    x, y = _pairs(10)
    out = list(data.batches(x, y, 4, drop_last=True))
    assert [len(yb) for _, yb in out] == [4, 4]
    assert data.steps_per_epoch(10, 4, drop_last=True) == 2
    assert data.steps_per_epoch(10, 4, drop_last=False) == 3
    assert data.steps_per_epoch(12, 4, drop_last=False) == 3
    assert len(list(data.batches(x, y, 5))) == data.steps_per_epoch(10, 5, drop_last=False) == 2


def test_epochs_resume_and_limits():
    x, y = _pairs(20)
    run = [
        (e, [yb.tolist() for _, yb in it]) for e, it in data.epochs(x, y, 6, seed=1, num_epochs=4)
    ]
    assert [e for e, _ in run] == [0, 1, 2, 3]
    assert all(len(batches) == 3 for _, batches in run)  # drop_last=True by default
    assert run[0][1] != run[1][1]
    resumed = [
        (e, [yb.tolist() for _, yb in it])
        for e, it in data.epochs(x, y, 6, seed=1, start_epoch=2, num_epochs=2)
    ]
    assert resumed == run[2:]
    assert [yb.tolist() for _, yb in data.batches(x, y, 6, seed=1, epoch=3, drop_last=True)] == (
        run[3][1]
    )
    endless = data.epochs(x, y, 6, seed=1)
    assert [e for e, _ in itertools.islice(endless, 7)] == list(range(7))
    assert list(data.epochs(x, y, 6, num_epochs=0)) == []


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda x, y: data.batches(x, y[:9], 4), ValueError, r"x has 10 examples .* y has 9"),
        (lambda x, y: data.batches(x, y, 0), ValueError, r"batches: batch_size=0 must be >= 1"),
        (lambda x, y: data.batches(x, y, 2.0), TypeError, r"batch_size=2.0 must be an int"),
        (lambda x, y: data.batches(x, y, 11, drop_last=True), ValueError, r"no batches"),
        (lambda x, y: data.batches(x[:0], y[:0], 4), ValueError, r"hold no examples"),
        (lambda x, y: data.batches(x, y, 4, seed=-2), ValueError, r"seed=-2 must be >= 0"),
        (lambda x, y: data.epochs(x, y, 4, num_epochs=-1), ValueError, r"num_epochs=-1"),
        (lambda x, y: data.epochs(x, y, 4, start_epoch=1.5), TypeError, r"start_epoch=1.5"),
        (lambda x, y: data.steps_per_epoch(10, 0, drop_last=False), ValueError, r"batch_size=0"),
    ],
)
def test_batching_bad_arguments_fail_at_the_call(call, error, message):
    x, y = _pairs(10)
    with pytest.raises(error, match=message):
        call(x, y)  # raised eagerly, before any next()


def test_random_shift_moves_each_image_by_at_most_max_shift():
    x = np.zeros((50, 6, 6, 1), np.float32)
    x[:, 2, 3, 0] = 1.0  # one bright pixel per image
    y = np.arange(50)
    shifted, y_out = data.random_shift(1)(x, y, np.random.default_rng(0))
    assert shifted.shape == x.shape and y_out is y
    moves = set()
    for img in shifted[..., 0]:
        (r,), (c,) = np.nonzero(img)
        moves.add((int(r) - 2, int(c) - 3))
        assert img.sum() == 1.0
    assert moves == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    same, _ = data.random_shift(0)(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(same, x)
    with pytest.raises(ValueError, match="max_shift"):
        data.random_shift(-1)
