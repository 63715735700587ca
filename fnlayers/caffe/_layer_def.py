"""What the Caffe layer builders share: the parsed layer they read (:class:`_Def`), what they
return (:class:`Built`, with the :class:`Blobs` that say where the layer's Caffe blobs live in
fnlayers' trees), Caffe's limit on ``param { }`` specs, the ``(h, w)`` reading of
``kernel_size``/``pad``/``stride`` (docs/caffe-semantics.md §1, §3) and the parameter-free layer
that wraps one function. Private to :mod:`fnlayers.caffe`; :mod:`fnlayers.caffe.builders` is the
public entry.
"""

from __future__ import annotations

from typing import NamedTuple

from fnlayers import catalogue as cat
from fnlayers import layers as L
from fnlayers.caffe.prototxt import first


class Blobs(NamedTuple):
    """Where one layer's Caffe blobs live in fnlayers' trees.

    Attributes:
      names: the leaf names in Caffe's blob order (only the blobs this configuration has: no
        ``"b"`` without ``bias_term``).
      layout: the first blob's layout: ``"as_stored"`` (Caffe's shape), ``"conv"`` (HWIO here,
        Caffe's ``(out, in/g, kh, kw)``, or ``(in, out/g, kh, kw)`` for Deconvolution) or
        ``"dense"`` (``(K, out)`` here, Caffe's ``(out, K)``). Later blobs are as stored.
      tree: ``"params"`` or ``"state"`` (BatchNorm's statistics).
    """

    names: tuple[str, ...] = ()
    layout: str = "as_stored"
    tree: str = "params"


class Built(NamedTuple):
    """A built Caffe layer: the fnlayers :class:`~fnlayers.layers.Layer` and its :class:`Blobs`."""

    layer: L.Layer
    blobs: Blobs = Blobs()


class _Def(NamedTuple):
    """One parsed Caffe ``LayerParameter`` as a builder reads it: its name, type, bottoms, tops
    and the whole parsed layer (``raw``)."""

    name: str
    kind: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    raw: dict

    def param(self, field: str) -> dict:
        """The layer's ``field`` message (``convolution_param``, ...); ``{}`` where unset."""
        return first(self.raw, field, {})


def _check_param_specs(d: _Def, n_blobs: int) -> None:
    """Caffe's limit: no more ``param { }`` specs than the layer has blobs."""
    n_specs = len(d.raw.get("param", []))
    if n_specs > n_blobs:
        raise ValueError(
            f"{n_specs} param specs for a layer with {n_blobs} blobs (Caffe: too many params)"
        )


def _hw(p: dict, base: str, default):
    """Caffe's ``kernel_size``/``kernel_h``+``kernel_w`` (likewise pad, stride) as (h, w)."""
    if f"{base}_h" in p or f"{base}_w" in p:
        return (int(first(p, f"{base}_h")), int(first(p, f"{base}_w")))
    name = {"kernel": "kernel_size"}.get(base, base)
    values = p.get(name, [])
    if not values:
        return (default, default)
    if len(values) == 1:
        return (int(values[0]), int(values[0]))
    if len(values) == 2:
        return (int(values[0]), int(values[1]))
    raise ValueError(f"{name}: {values!r} has more than two spatial values")


def _stateless(op, kind: str, name, **config) -> L.Layer:
    """A layer without params or state, ``y = op(x)``, its output shape traced from ``op``;
    ``config`` is what its repr shows."""

    def init(key, in_shape):
        return cat._out_shape(op, in_shape, kind), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return op(x), state

    shown = tuple((k, v) for k, v in config.items() if v is not None)
    return L.Layer(init, apply, name=name, kind=kind, config=shown)
