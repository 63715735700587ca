"""Checkpoints: save and load any pytree of arrays, atomically, in an open format.

::

    fl.checkpoint.save("ckpt.npz", {"params": params, "opt_state": opt_state}, iteration=500)
    tree = fl.checkpoint.load("ckpt.npz")                        # structure from the file
    tree = fl.checkpoint.load("ckpt.npz", like=template)         # template's treedef and dtypes
    meta = fl.checkpoint.load_metadata("ckpt.npz")               # {"iteration": 500}

File format (version 1)
-----------------------
A checkpoint is an uncompressed ZIP archive in NumPy's ``.npz`` layout, so ``np.load`` reads it:

* one ``.npy`` member per array leaf, keyed by the leaf's *path*: the keys from the root to the
  leaf joined by ``"/"`` (dict keys, list and tuple indices, NamedTuple field names), e.g.
  ``"params/conv1/w"`` or ``"opt_state/0/1"``; a ``"/"`` inside a key is written ``"%2F"``
  (``"params/inception_3a%2F1x1/w"``). A bare array saved as the whole tree has path ``""``.
* ``"__fnlayers__"``: a 0-d unicode array holding one JSON document (strict JSON, no NaN)::

      {"format": "fnlayers.checkpoint", "version": 1, "tree": NODE, "metadata": {...}}

  where ``NODE`` is ``null`` (a None leaf), ``{"dict": [[key, NODE], ...]}`` (str or int keys, in
  insertion order), ``{"list": [NODE, ...]}``, ``{"tuple": [NODE, ...]}``,
  ``{"node": "module.Type", "children": [[name, NODE], ...]}`` (any other registered pytree
  node, e.g. a NamedTuple), or a leaf
  ``{"leaf": PATH, "type": T, "dtype": "float32", "shape": [...]}``. ``T`` says what the leaf
  was: ``"jax"`` (a jax.Array), ``"numpy"`` (an ndarray), ``"numpy_scalar"``, ``"int"``,
  ``"float"``, ``"bool"``, ``"complex"`` (Python scalars), or ``"key"`` (a typed PRNG key array
  from ``jax.random.key``: the member holds ``jax.random.key_data(k)``, ``"shape"`` is the key
  array's shape and ``"impl"`` names the implementation, e.g. ``"threefry2x32"``).

Dtypes that plain NumPy lacks (``bfloat16``, ``float8_*``, ``int4``, ...) are stored as the
unsigned integers of the same width holding their bits; ``"dtype"`` names the real dtype, so
``f[path].view(ml_dtypes.bfloat16)`` restores them. Reading a checkpoint with NumPy alone::

    import json, numpy as np
    with np.load("ckpt.npz") as f:
        header = json.loads(f["__fnlayers__"].item())
        w = f["params/conv1/w"]

Atomicity
---------
:func:`save` writes a temporary file ``.NAME.XXXX.tmp`` in the target's directory, flushes and
fsyncs it, renames it over the target with ``os.replace`` and fsyncs the directory. An exception
during the write removes the temporary file and leaves the previous checkpoint untouched; a hard
crash (power loss, SIGKILL) can leave a stray ``.NAME.*.tmp`` beside an intact target, which is
safe to delete.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnlayers._checks import is_int
from fnlayers._tree import path_str

__all__ = ["FORMAT", "HEADER_KEY", "VERSION", "load", "load_metadata", "save"]

FORMAT = "fnlayers.checkpoint"
VERSION = 1
HEADER_KEY = "__fnlayers__"

_PY_SCALARS = {"bool": bool, "int": int, "float": float, "complex": complex}
_NATIVE_KINDS = "biufc"  # dtypes np.save stores as themselves


def save(path, tree, **metadata) -> None:
    """Writes ``tree`` to ``path`` atomically (see the module docstring for the format).

    Args:
      path: a ``str`` or ``os.PathLike``; written exactly as given (no suffix is added). Its
        directory must exist. An existing file is replaced, keeping its permission bits; a new
        file gets mode 0o644.
      tree: a pytree of arrays: nested dicts (str or int keys), lists, tuples,
        NamedTuples or other registered pytree nodes, with leaves that are None, jax arrays,
        NumPy arrays or scalars of any numeric dtype (bfloat16 and other ml_dtypes included),
        Python bool/int/float/complex, or typed PRNG key arrays (``jax.random.key``).
      **metadata: JSON-serialisable values stored beside the tree (read back with
        :func:`load_metadata`). NumPy and 0-d jax scalars are converted with ``.item()``;
        NaN and infinity are rejected (strict JSON).

    Raises:
      TypeError: a leaf or dict key of an unsupported type, or a metadata value JSON cannot hold.
      ValueError: two leaves with the same path, or a non-finite
        float in the metadata.
    """
    fn = "checkpoint.save"
    path = _fspath(path, fn)
    arrays: dict[str, np.ndarray] = {}
    structure = _encode(tree, (), arrays, fn)
    for name, value in metadata.items():
        try:
            json.dumps(value, allow_nan=False, default=_json_default)
        except TypeError as err:
            raise TypeError(
                f"{fn}: metadata {name}={value!r:.80} is not JSON-serialisable: {err}"
            ) from None
        except ValueError:
            raise ValueError(
                f"{fn}: metadata {name}={value!r:.80} is not strict JSON (NaN or infinity); "
                "store such values as strings or None"
            ) from None
    header = {"format": FORMAT, "version": VERSION, "tree": structure, "metadata": metadata}
    text = json.dumps(header, allow_nan=False, default=_json_default)
    _atomic_write(path, lambda f: _write_npz(f, text, arrays))


def load(path, like=None):
    """Reads a checkpoint written by :func:`save`.

    Args:
      path: the checkpoint file.
      like: optional template pytree (arrays, ``jax.ShapeDtypeStruct``s, Python scalars or PRNG
        key arrays as leaves). When given, the file must hold exactly the leaf paths of ``like``
        with the same shapes; the result has ``like``'s treedef, and each leaf takes the dtype
        and kind of the template leaf (jax array, NumPy array or scalar, Python scalar, key
        array), casting the stored values where dtypes differ.

    Returns:
      The tree. Without ``like`` it is rebuilt from the file: dicts, lists, tuples and None as
      saved; other pytree nodes (NamedTuples, ...) come back as dicts keyed by field name; each
      leaf comes back as the kind it was saved as (jax array, NumPy array or scalar, Python
      scalar, PRNG key array) with its dtype and shape.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is truncated, corrupt or not an fnlayers checkpoint (the message
        names the file); or, with ``like``, the first path (in ``like``'s flattening order,
        then the file's extra paths in file order) that is missing from the file, extra in the
        file, of a different shape, or a key array on one side only.
    """
    fn = "checkpoint.load"
    path = _fspath(path, fn)
    header, arrays = _read(path, fn, header_only=False)
    leaves = _leaf_descriptions(header["tree"], path, fn)
    if like is None:
        return _decode(header["tree"], arrays, path, fn)
    return _restore_like(like, leaves, arrays, path, fn)


def load_metadata(path) -> dict[str, Any]:
    """Returns the ``**metadata`` dict given to :func:`save` (JSON types: tuples come back as
    lists). Reads only the JSON header, not the arrays.

    Raises:
      FileNotFoundError, ValueError: as :func:`load`.
    """
    fn = "checkpoint.load_metadata"
    path = _fspath(path, fn)
    header, _ = _read(path, fn, header_only=True)
    return header["metadata"]


# -- encoding -----------------------------------------------------------------------------------


def _encode(node, keys: tuple[str, ...], arrays: dict[str, np.ndarray], fn: str):
    if node is None:
        return None
    if type(node) is dict:
        items = []
        for k, child in node.items():
            seg = _dict_segment(k, keys, fn)
            items.append([k, _encode(child, (*keys, seg), arrays, fn)])
        return {"dict": items}
    if type(node) in (list, tuple):
        children = [_encode(c, (*keys, str(i)), arrays, fn) for i, c in enumerate(node)]
        return {type(node).__name__: children}
    if _is_leaf(node):
        return _encode_leaf(node, keys, arrays, fn)
    # Any other registered pytree node: flatten exactly one level to get its children and keys.
    children, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0][0] == () and children[0][1] is node:
        raise TypeError(
            f"{fn}: leaf {_join(keys)!r} has type {type(node).__qualname__}; expected an array, "
            "a NumPy or Python scalar, a PRNG key array or None"
        )
    kind = f"{type(node).__module__}.{type(node).__qualname__}"
    items = []
    for key_path, child in children:
        seg = path_str(key_path[:1])
        items.append([seg, _encode(child, (*keys, _segment(seg)), arrays, fn)])
    return {"node": kind, "children": items}


def _encode_leaf(x, keys: tuple[str, ...], arrays: dict[str, np.ndarray], fn: str) -> dict:
    path = _join(keys)
    if path == HEADER_KEY:
        raise ValueError(f"{fn}: the path {HEADER_KEY!r} is reserved for the checkpoint header")
    if path in arrays:
        raise ValueError(f"{fn}: two leaves have the same path {path!r}")
    if _is_key_array(x):
        data = np.asarray(jax.random.key_data(x))
        desc = {"type": "key", "impl": str(jax.random.key_impl(x)), "dtype": str(data.dtype)}
        desc["shape"] = list(x.shape)
    else:
        if isinstance(x, jax.Array):
            kind = "jax"
        elif isinstance(x, np.ndarray):
            kind = "numpy"
        elif isinstance(x, np.generic):
            kind = "numpy_scalar"
        else:
            kind = type(x).__name__
        data = np.asarray(x)
        desc = {"type": kind, "dtype": str(data.dtype), "shape": list(data.shape)}
        data = _to_storable(data, path, fn)
    arrays[path] = data
    return {"leaf": path, **desc}


def _to_storable(a: np.ndarray, path: str, fn: str) -> np.ndarray:
    if a.dtype.kind in _NATIVE_KINDS:
        return a
    if a.dtype.kind == "V" and a.dtype.names is None and a.dtype.itemsize in (1, 2, 4, 8):
        # ml_dtypes extension types (bfloat16, float8_*, int4): keep the bits.
        return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))
    raise TypeError(f"{fn}: leaf {path!r} has dtype {a.dtype}, which a checkpoint cannot hold")


def _write_npz(f, header_text: str, arrays: dict[str, np.ndarray]) -> None:
    # The zip is written by hand rather than with np.savez, whose keyword names ("file",
    # "allow_pickle") would collide with leaf paths.
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in [*arrays.items(), (HEADER_KEY, np.array(header_text))]:
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if os.name == "posix":  # a directory cannot be opened for fsync on Windows
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        except OSError:
            pass  # the rename is done; some filesystems (NFS, FUSE) refuse fsync on a directory
        finally:
            os.close(dir_fd)


def _json_default(value):
    if isinstance(value, np.generic) or (
        isinstance(value, np.ndarray | jax.Array) and not value.shape
    ):
        return value.item()
    raise TypeError(f"type {type(value).__qualname__} is not JSON-serialisable")


# -- decoding -----------------------------------------------------------------------------------


def _read(path: str, fn: str, *, header_only: bool) -> tuple[dict, dict[str, np.ndarray]]:
    with open(path, "rb") as fh:
        try:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise _Corrupt("it is a single .npy array, not an .npz archive")
            with npz:
                if HEADER_KEY not in npz.files:
                    raise _Corrupt(f"it has no {HEADER_KEY!r} entry")
                header = json.loads(npz[HEADER_KEY].item())
                names = [] if header_only else [k for k in npz.files if k != HEADER_KEY]
                arrays = {k: npz[k] for k in names}
        except _Corrupt as err:
            raise ValueError(f"{fn}: {path!r} is not an fnlayers checkpoint: {err}") from None
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            OSError,
            ValueError,
            KeyError,
            TypeError,
        ) as err:
            raise ValueError(
                f"{fn}: {path!r} is truncated or corrupt (cannot read it as a checkpoint): "
                f"{type(err).__name__}: {err}"
            ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{fn}: {path!r} is not an fnlayers checkpoint (bad header)")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{fn}: {path!r} has checkpoint format version {header.get('version')!r}; "
            f"this fnlayers reads version {VERSION}"
        )
    if not isinstance(header.get("metadata"), dict) or "tree" not in header:
        raise ValueError(f"{fn}: {path!r} is corrupt (header lacks tree or metadata)")
    return header, arrays


class _Corrupt(Exception):
    pass


def _leaf_descriptions(node, path: str, fn: str) -> dict[str, dict]:
    """Path -> leaf description, in file order; checks that the header is well formed."""
    out: dict[str, dict] = {}

    def walk(n):
        if n is None:
            return
        if not isinstance(n, dict) or len(n) == 0:
            raise ValueError(f"{fn}: {path!r} is corrupt (malformed tree node {n!r:.80})")
        if "leaf" in n:
            out[n["leaf"]] = n
        elif "dict" in n:
            for _, child in n["dict"]:
                walk(child)
        elif "list" in n or "tuple" in n:
            for child in n.get("list", n.get("tuple")):
                walk(child)
        elif "node" in n:
            for _, child in n["children"]:
                walk(child)
        else:
            raise ValueError(f"{fn}: {path!r} is corrupt (unknown tree node {n!r:.80})")

    walk(node)
    return out


def _decode(node, arrays: dict[str, np.ndarray], path: str, fn: str):
    if node is None:
        return None
    if "dict" in node:
        return {k: _decode(c, arrays, path, fn) for k, c in node["dict"]}
    if "list" in node:
        return [_decode(c, arrays, path, fn) for c in node["list"]]
    if "tuple" in node:
        return tuple(_decode(c, arrays, path, fn) for c in node["tuple"])
    if "node" in node:
        return {k: _decode(c, arrays, path, fn) for k, c in node["children"]}
    value = _stored_value(node, arrays, path, fn)
    kind = node["type"]
    if kind == "key":
        return jax.random.wrap_key_data(value, impl=node["impl"])
    if kind == "jax":
        return jnp.asarray(value)
    if kind == "numpy":
        return value
    if kind == "numpy_scalar":
        return value[()]
    if kind in _PY_SCALARS:
        return _PY_SCALARS[kind](value.item())
    raise ValueError(f"{fn}: {path!r} is corrupt (leaf {node['leaf']!r} has type {kind!r})")


def _stored_value(desc: dict, arrays: dict[str, np.ndarray], path: str, fn: str) -> np.ndarray:
    """The leaf's array with its real dtype (bit-stored dtypes viewed back)."""
    name = desc["leaf"]
    if name not in arrays:
        raise ValueError(f"{fn}: {path!r} is corrupt (header lists {name!r}, no such array)")
    value = arrays[name]
    try:
        dtype = jnp.dtype(desc["dtype"])
    except TypeError as err:
        raise ValueError(f"{fn}: {path!r} is corrupt (leaf {name!r}: {err})") from err
    if value.dtype != dtype:
        if value.dtype.kind != "u" or value.dtype.itemsize != dtype.itemsize:
            raise ValueError(
                f"{fn}: {path!r} is corrupt (leaf {name!r} stored as {value.dtype}, header "
                f"says {dtype})"
            )
        value = value.view(dtype)
    shape = tuple(desc["shape"])
    if value.shape[: len(shape)] != shape or (desc["type"] != "key" and value.shape != shape):
        raise ValueError(
            f"{fn}: {path!r} is corrupt (leaf {name!r} has shape {value.shape}, header says "
            f"{shape})"
        )
    return value


def _restore_like(like, leaves: dict[str, dict], arrays, path: str, fn: str):
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    like_paths = [
        _join(tuple(_segment(path_str((entry,))) for entry in key_path)) for key_path, _ in flat
    ]
    wanted = set(like_paths)
    out = []
    for name, (_, template) in zip(like_paths, flat, strict=True):
        if name not in leaves:
            raise ValueError(
                f"{fn}: {path!r} does not match `like`: path {name!r} is in `like` but not in "
                "the checkpoint"
            )
        desc = leaves[name]
        template_is_key = _is_key_array(template)
        if template_is_key != (desc["type"] == "key"):
            which = "`like`" if template_is_key else "the checkpoint"
            raise ValueError(
                f"{fn}: {path!r} does not match `like`: path {name!r} is a PRNG key array in "
                f"{which} only"
            )
        like_shape = tuple(np.shape(template))
        if tuple(desc["shape"]) != like_shape:
            raise ValueError(
                f"{fn}: {path!r} does not match `like`: path {name!r} has shape "
                f"{tuple(desc['shape'])} in the checkpoint but {like_shape} in `like`"
            )
        out.append(_cast_like(_stored_value(desc, arrays, path, fn), desc, template, name, fn))
    for name in leaves:
        if name not in wanted:
            raise ValueError(
                f"{fn}: {path!r} does not match `like`: path {name!r} is in the checkpoint but "
                "not in `like`"
            )
    return jax.tree_util.tree_unflatten(treedef, out)


def _cast_like(value: np.ndarray, desc: dict, template, name: str, fn: str):
    if _is_key_array(template):
        impl = _key_impl_name(template)
        if impl is not None and impl != desc["impl"]:
            raise ValueError(
                f"{fn}: path {name!r} holds {desc['impl']} keys but `like` has {impl} keys"
            )
        return jax.random.wrap_key_data(value, impl=desc["impl"])
    if isinstance(template, jax.Array | jax.ShapeDtypeStruct):
        return jnp.asarray(value.astype(template.dtype, copy=False))
    if isinstance(template, np.ndarray):
        return value.astype(template.dtype, copy=False)
    if isinstance(template, np.generic):
        return value.astype(template.dtype)[()]
    if type(template) in _PY_SCALARS.values():
        return type(template)(value.item())
    raise TypeError(
        f"{fn}: `like` leaf {name!r} has type {type(template).__qualname__}; expected an array, "
        "a jax.ShapeDtypeStruct, a NumPy or Python scalar or a PRNG key array"
    )


# -- paths and leaf kinds -----------------------------------------------------------------------


def _dict_segment(k, keys: tuple[str, ...], fn: str) -> str:
    if not (isinstance(k, str) or is_int(k)):
        raise TypeError(
            f"{fn}: dict key {k!r} under {_join(keys)!r} has type {type(k).__qualname__}; "
            "checkpoint dict keys must be str or int"
        )
    return _segment(str(k))


def _segment(name: str) -> str:
    """A path segment: a ``/`` inside a key (a Caffe layer name such as ``inception_3a/1x1``)
    is written ``%2F`` so that paths stay ``/``-joined; the tree in the header keeps the key
    itself."""
    return name.replace("/", "%2F")


def _join(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def _is_leaf(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def _is_key_array(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(template) -> str | None:
    if isinstance(template, jax.Array):
        return str(jax.random.key_impl(template))
    return None


def _fspath(path, fn: str) -> str:
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(
            f"{fn}: path={path!r} must be a str or os.PathLike, not {type(path).__qualname__}"
        ) from None
