"""Checkpoints: round trips, the open format, `like=` matching, corrupt files, atomic writes."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlayers import checkpoint

Moments = namedtuple("Moments", ["mu", "nu"])


def _tree(key):
    k1, k2 = jax.random.split(key)
    return {
        "params": {
            "conv1": {
                "w": jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 1, 4) / 8,
                "b": jnp.array([1.5, -2.25, 3.0, 0.0], dtype=jnp.bfloat16),
            },
            "ip1": {"w": np.full((3, 2), 0.5, np.float16), "b": None},
        },
        "state": [jnp.int32(7), (np.array([1, 2, 255], np.uint8), np.array([True, False]))],
        "opt": (jnp.array([1 + 2j], jnp.complex64), np.float64(0.125)),
        "iteration": 500,
        "lr": 0.01,
        "converged": False,
        "rng": k1,
        "rngs": jax.random.split(k2, 3),
        "empty": {},
    }


def _is_none(x):
    return x is None


def _assert_same_leaf(got, want):
    if isinstance(want, jax.Array) and jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
        assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(got) == jax.random.key_impl(want)
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
        return
    assert type(got) is type(want) or (isinstance(got, jax.Array) and isinstance(want, jax.Array))
    if isinstance(want, bool | int | float | complex):
        assert got == want
        return
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    exact = np.complex128 if np.iscomplexobj(want) else np.float64
    np.testing.assert_array_equal(np.asarray(got).astype(exact), np.asarray(want).astype(exact))


def test_round_trip_keeps_structure_dtypes_values_and_keys(tmp_path, key):
    tree = _tree(key)
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, tree)
    out = checkpoint.load(path)

    assert jax.tree.structure(out, is_leaf=_is_none) == jax.tree.structure(tree, is_leaf=_is_none)
    assert list(out) == list(tree)  # dict order as saved, not sorted
    for got, want in zip(
        jax.tree.leaves(out, is_leaf=_is_none), jax.tree.leaves(tree, is_leaf=_is_none), strict=True
    ):
        if want is None:
            assert got is None
        else:
            _assert_same_leaf(got, want)
    assert isinstance(out["params"]["conv1"]["w"], jax.Array)
    assert isinstance(out["params"]["ip1"]["w"], np.ndarray)
    assert isinstance(out["opt"][1], np.float64)
    assert isinstance(out["state"][1], tuple) and isinstance(out["state"], list)
    # A restored key draws the same numbers as the original.
    np.testing.assert_array_equal(
        jax.random.normal(out["rng"], (4,)), jax.random.normal(tree["rng"], (4,))
    )


def test_bare_array_and_rbg_keys_round_trip(tmp_path):
    checkpoint.save(tmp_path / "a.npz", jnp.ones((2, 2), jnp.bfloat16))
    out = checkpoint.load(tmp_path / "a.npz")
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 2)
    np.testing.assert_array_equal(out.astype(jnp.float32), np.ones((2, 2)))

    keys = jax.random.split(jax.random.key(3, impl="rbg"), 2)
    checkpoint.save(tmp_path / "k.npz", {"k": keys})
    restored = checkpoint.load(tmp_path / "k.npz")["k"]
    assert jax.random.key_impl(restored) == jax.random.key_impl(keys)
    np.testing.assert_array_equal(jax.random.key_data(restored), jax.random.key_data(keys))


def test_file_is_plain_npz_with_path_keys_and_json_header(tmp_path, key):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, _tree(key), epoch=3)
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(f["__fnlayers__"].item())
        np.testing.assert_array_equal(
            f["params/conv1/w"], np.arange(24, dtype=np.float32).reshape(2, 3, 1, 4) / 8
        )
        # bfloat16 1.5, -2.25, 3.0, 0.0 as raw bits: sign | exponent | 7-bit mantissa.
        assert f["params/conv1/b"].dtype == np.uint16
        np.testing.assert_array_equal(f["params/conv1/b"], [0x3FC0, 0xC010, 0x4040, 0x0000])
        assert f["state/1/0"].tolist() == [1, 2, 255]
        assert f["rngs"].shape == (3, 2) and f["rngs"].dtype == np.uint32
        assert "params/ip1/b" not in f.files  # None leaves have no array
    assert header["format"] == "fnlayers.checkpoint" and header["version"] == 1
    assert header["metadata"] == {"epoch": 3}
    b_leaf = dict(header["tree"]["dict"])["params"]["dict"][0][1]["dict"][1][1]
    assert b_leaf == {
        "leaf": "params/conv1/b",
        "type": "jax",
        "dtype": "bfloat16",
        "shape": [4],
    }
    rngs_leaf = dict(header["tree"]["dict"])["rngs"]
    assert rngs_leaf["type"] == "key" and rngs_leaf["impl"] == "threefry2x32"
    assert rngs_leaf["shape"] == [3]


def test_metadata_round_trip_and_validation(tmp_path):
    path = tmp_path / "m.npz"
    checkpoint.save(path, {"x": np.zeros(1)}, iteration=12, loss=np.float32(0.5), tags=("a", 1))
    assert checkpoint.load_metadata(path) == {"iteration": 12, "loss": 0.5, "tags": ["a", 1]}
    with pytest.raises(ValueError, match="metadata loss=nan is not strict JSON"):
        checkpoint.save(path, {}, loss=float("nan"))
    with pytest.raises(TypeError, match="metadata when=.*not JSON-serialisable"):
        checkpoint.save(path, {}, when=object())
    # Rejected saves leave the previous file as it was.
    assert checkpoint.load_metadata(path)["iteration"] == 12


def test_like_restores_treedef_dtypes_and_leaf_kinds(tmp_path, key):
    path = tmp_path / "ckpt.npz"
    saved = {"opt": Moments(mu=np.arange(3.0), nu=[jnp.ones(2), None]), "step": 4, "rng": key}
    checkpoint.save(path, saved)

    plain = checkpoint.load(path)
    assert isinstance(plain["opt"], dict) and set(plain["opt"]) == {"mu", "nu"}

    like = {
        "opt": Moments(mu=jnp.zeros(3, jnp.bfloat16), nu=[np.zeros(2, np.float16), None]),
        "step": jnp.int32(0),
        "rng": jax.random.key(1),
    }
    out = checkpoint.load(path, like=like)
    assert jax.tree.structure(out) == jax.tree.structure(like)
    assert isinstance(out["opt"], Moments)
    assert out["opt"].mu.dtype == jnp.bfloat16 and isinstance(out["opt"].mu, jax.Array)
    np.testing.assert_array_equal(out["opt"].mu.astype(jnp.float32), [0.0, 1.0, 2.0])
    assert isinstance(out["opt"].nu[0], np.ndarray) and out["opt"].nu[0].dtype == np.float16
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 4
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(key))

    abstract = jax.eval_shape(lambda: saved)
    out = checkpoint.load(path, like=abstract)
    assert isinstance(out["opt"].mu, jax.Array) and out["opt"].mu.dtype == jnp.float32
    assert jax.dtypes.issubdtype(out["rng"].dtype, jax.dtypes.prng_key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {**t, "extra": jnp.zeros(1)}, r"path 'extra' is in `like` but not in the chec"),
        (lambda t: {"a": t["a"]}, r"path 'b/0' is in the checkpoint but not in `like`"),
        (
            lambda t: {**t, "a": {"w": jnp.zeros((3, 2))}},
            r"path 'a/w' has shape \(2, 3\) in the checkpoint but \(3, 2\) in `like`",
        ),
        (lambda t: {**t, "b": [t["b"][0], jnp.zeros(2)]}, r"'b/1' is a PRNG key array in the "),
        (lambda t: {**t, "b": [jax.random.key(0), t["b"][1]]}, r"'b/0' is a PRNG key array in `l"),
        (lambda t: {**t, "a": {"v": jnp.zeros((2, 3))}}, r"path 'a/v' is in `like` but not in"),
    ],
)
def test_like_mismatch_names_the_first_differing_path(tmp_path, key, change, message):
    path = tmp_path / "ckpt.npz"
    tree = {"a": {"w": jnp.zeros((2, 3))}, "b": [jnp.ones(2), jax.random.split(key, 2)]}
    checkpoint.save(path, tree)
    with pytest.raises(ValueError, match=message) as err:
        checkpoint.load(path, like=change(tree))
    assert "ckpt.npz" in str(err.value)


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -1])
def test_truncated_file_is_a_clear_value_error(tmp_path, key, keep):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, _tree(key))
    data = path.read_bytes()
    cut = len(data) + keep if keep == -1 else int(len(data) * keep) if keep < 1 else keep
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"ckpt\.npz' is truncated or corrupt"):
        checkpoint.load(path)
    with pytest.raises(ValueError, match=r"ckpt\.npz' is truncated or corrupt"):
        checkpoint.load_metadata(path)


def test_corrupted_bytes_and_foreign_files_are_clear_value_errors(tmp_path, key):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, {"w": jnp.arange(1000, dtype=jnp.float32)})
    data = bytearray(path.read_bytes())
    data[len(data) // 4] ^= 0xFF  # inside the array's bytes: the zip CRC catches it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ckpt\.npz' is truncated or corrupt.*CRC"):
        checkpoint.load(path)

    other = tmp_path / "other.npz"
    np.savez(other, w=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz' is not an fnlayers checkpoint"):
        checkpoint.load(other)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match=r"single\.npy' is not an fnlayers checkpoint"):
        checkpoint.load(single)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt' is truncated or corrupt"):
        checkpoint.load(text)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.npz")


def test_failure_during_write_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, {"w": np.zeros(3)}, iteration=1)
    before = path.read_bytes()
    real_write_array = np.lib.format.write_array
    calls = []

    def failing_write_array(fp, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first array is written, the second fails half-way
            fp.write(b"\x93NUMPY partial")
            raise OSError(28, "No space left on device")
        real_write_array(fp, array, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write_array)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(path, {"w": np.ones(3), "v": np.ones(5)}, iteration=2)
    monkeypatch.undo()

    assert len(calls) == 2
    assert path.read_bytes() == before
    np.testing.assert_array_equal(checkpoint.load(path)["w"], np.zeros(3))
    assert checkpoint.load_metadata(path) == {"iteration": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


def test_failure_at_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, {"w": np.zeros(3)})

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save(path, {"w": np.ones(3)})
    monkeypatch.undo()
    np.testing.assert_array_equal(checkpoint.load(path)["w"], np.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


def test_process_killed_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, {"w": np.zeros(3)}, iteration=1)
    child = textwrap.dedent(
        f"""
        import os, sys
        import numpy as np
        from fnlayers import checkpoint

        def die(fp, array, **kwargs):
            fp.write(b"half an array")
            fp.flush()
            os._exit(3)  # no cleanup, no exception handlers: a hard crash

        np.lib.format.write_array = die
        checkpoint.save({str(path)!r}, {{"w": np.ones(3)}}, iteration=2)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr.decode()
    np.testing.assert_array_equal(checkpoint.load(path)["w"], np.zeros(3))
    assert checkpoint.load_metadata(path) == {"iteration": 1}


def test_new_file_mode_and_preserved_mode(tmp_path):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, {"w": np.zeros(1)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o600)
    checkpoint.save(path, {"w": np.ones(1)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_unsupported_trees_are_rejected_with_the_path(tmp_path):
    path = tmp_path / "ckpt.npz"
    with pytest.raises(TypeError, match=r"leaf 'a/0' has type str"):
        checkpoint.save(path, {"a": ["text"]})
    with pytest.raises(ValueError, match=r"two leaves with the same path 'a/x%2Fy'|a/x%2Fy"):
        checkpoint.save(path, {"a": {"x/y": np.zeros(1), "x%2Fy": np.ones(1)}})
    with pytest.raises(TypeError, match=r"dict key \(1, 2\) under '' has type tuple"):
        checkpoint.save(path, {(1, 2): np.zeros(1)})
    with pytest.raises(TypeError, match=r"leaf 'o' has dtype object"):
        checkpoint.save(path, {"o": np.array([None, 1], dtype=object)})
    with pytest.raises(ValueError, match=r"'__fnlayers__' is reserved"):
        checkpoint.save(path, {"__fnlayers__": np.zeros(1)})
    with pytest.raises(TypeError, match=r"path=3 must be a str or os.PathLike"):
        checkpoint.save(3, {})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_keys_with_a_slash_round_trip(tmp_path):
    """Caffe layer names such as ``inception_3a/1x1`` are params keys."""
    path = tmp_path / "ckpt.npz"
    tree = {"inception_3a/1x1": {"w": np.arange(3.0)}, "fc": [np.ones(2)]}
    checkpoint.save(path, tree)
    assert sorted(np.load(path).files) == ["__fnlayers__", "fc/0", "inception_3a%2F1x1/w"]
    for got in (checkpoint.load(path), checkpoint.load(path, like=tree)):
        assert set(got) == {"inception_3a/1x1", "fc"}
        np.testing.assert_array_equal(got["inception_3a/1x1"]["w"], np.arange(3.0))
