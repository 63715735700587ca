"""Layers: immutable pairs of pure functions, and the combinators that compose them.

A :class:`Layer` holds two functions::

    out_shape, params, state = layer.init(key, in_shape)    # shapes only, never runs the op
    y, state = layer.apply(params, state, x, key=None, train=False)

``in_shape`` is a tuple of ints (the batch axis may be -1), or a tuple of such shapes for layers
that take several inputs (:func:`shared`). ``params`` and ``state`` are pytrees (dicts); a layer
with neither returns ``{}`` for both. Randomness enters only through ``key``, running statistics
only through ``state``; no layer reads a global flag.

:func:`serial` and :func:`parallel` key their sub-trees by layer name: the ``name`` given to the
constructor, or the layer's kind and position (``conv2d_0``, ``dense_3``), so
``params["conv1"]["w"]`` reads like the network. :func:`shared` applies one layer, with one set
of weights, to each input of a tuple (Siamese networks).

Example:
    >>> import jax, fnlayers as fl
    >>> net = fl.serial(fl.Conv2D(4, 3, name="conv1"), fl.Flatten(), fl.Dense(10, name="ip1"))
    >>> out_shape, params, state = net.init(jax.random.key(0), (-1, 8, 8, 1))
    >>> out_shape
    (-1, 10)
    >>> jax.tree.map(lambda a: a.shape, params)
    {'conv1': {'b': (4,), 'w': (3, 3, 1, 4)}, 'flatten_1': {}, 'ip1': {'b': (10,), 'w': (144, 10)}}
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fnlayers import activations as _act
from fnlayers import conv as _conv
from fnlayers import dropout as _dropout
from fnlayers import init as _init
from fnlayers import linear as _linear
from fnlayers import normalization as _norm
from fnlayers import pooling as _pooling
from fnlayers._checks import as_pair, check_choice

__all__ = [
    "ELU",
    "LRN",
    "AvgPool",
    "BatchNorm",
    "Conv2D",
    "Deconv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "Lambda",
    "Layer",
    "MaxPool",
    "Maxout",
    "PReLU",
    "ReLU",
    "Sigmoid",
    "StochasticPool",
    "Tanh",
    "layer_shapes",
    "parallel",
    "param_mults",
    "serial",
    "shared",
    "summary",
]

Shape = tuple[int, ...]
InitFn = Callable[[jax.Array, Any], tuple[Any, Any, Any]]
ApplyFn = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Layer:
    """An immutable ``(init, apply)`` pair.

    Attributes:
      init: ``init(key, in_shape) -> (out_shape, params, state)``; works from shapes alone.
      apply: ``apply(params, state, x, *, key=None, train=False) -> (y, state)``.
      name: the key of this layer's sub-tree inside :func:`serial`/:func:`parallel`, or None to
        let the container name it ``f"{kind}_{position}"``.
      kind: a short snake_case type name (``"conv2d"``, ``"max_pool"``), used for default names.
      needs_key: True when ``apply(..., train=True)`` draws random numbers and so needs ``key``.
      children: ``(name, layer)`` pairs of a container (:func:`serial`, :func:`parallel`,
        :func:`shared`), in order; empty for a leaf layer.
      mults: ``(param_name, lr_mult, decay_mult)`` triples of a leaf layer, Caffe's
        per-parameter ``ParamSpec``; parameters not listed have 1 and 1. See
        :func:`param_mults`.
    """

    init: InitFn
    apply: ApplyFn
    name: str | None = None
    kind: str = "layer"
    needs_key: bool = False
    children: tuple[tuple[str, Layer], ...] = ()
    mults: tuple[tuple[str, float, float], ...] = ()

    def named(self, name: str) -> Layer:
        """Returns the same layer under another name."""
        return dataclasses.replace(self, name=name)


def missing_key_error(where: str) -> ValueError:
    """The error raised when ``train=True`` needs randomness and no ``key`` was passed."""
    return ValueError(
        f"{where}: train=True draws random numbers, so apply needs a PRNG key: pass "
        "key=jax.random.key(seed) (and split a fresh one for every step, e.g. "
        "key, step_key = jax.random.split(key))"
    )


def serial(*layers: Layer, name: str | None = None) -> Layer:
    """Composes layers in sequence: ``y = layers[-1](...layers[0](x))``.

    Params and state are dicts keyed by layer name. ``key`` is split into one key per layer.

    Raises:
      ValueError: no layers, or two layers with the same name.
    """
    names = _layer_names(layers, "serial")

    def init(key, in_shape):
        keys = jax.random.split(key, len(layers))
        params, state, shape = {}, {}, in_shape
        for nm, layer, k in zip(names, layers, keys, strict=True):
            shape, params[nm], state[nm] = layer.init(k, shape)
        return shape, params, state

    needs_key = any(layer.needs_key for layer in layers)

    def apply(params, state, x, *, key=None, train=False):
        _check_key(needs_key, key, train, layers, names, "serial")
        keys = _split_or_none(key, len(layers))
        new_state = {}
        for nm, layer, k in zip(names, layers, keys, strict=True):
            x, new_state[nm] = layer.apply(params[nm], state[nm], x, key=k, train=train)
        return x, new_state

    children = tuple(zip(names, layers, strict=True))
    return Layer(init, apply, name=name, kind="serial", needs_key=needs_key, children=children)


def parallel(*layers: Layer, name: str | None = None) -> Layer:
    """Feeds the same input to every layer; the output is the tuple of their outputs.

    Params and state are dicts keyed by layer name, as in :func:`serial`.
    """
    names = _layer_names(layers, "parallel")

    def init(key, in_shape):
        keys = jax.random.split(key, len(layers))
        shapes, params, state = [], {}, {}
        for nm, layer, k in zip(names, layers, keys, strict=True):
            shape, params[nm], state[nm] = layer.init(k, in_shape)
            shapes.append(shape)
        return tuple(shapes), params, state

    needs_key = any(layer.needs_key for layer in layers)

    def apply(params, state, x, *, key=None, train=False):
        _check_key(needs_key, key, train, layers, names, "parallel")
        keys = _split_or_none(key, len(layers))
        ys, new_state = [], {}
        for nm, layer, k in zip(names, layers, keys, strict=True):
            y, new_state[nm] = layer.apply(params[nm], state[nm], x, key=k, train=train)
            ys.append(y)
        return tuple(ys), new_state

    children = tuple(zip(names, layers, strict=True))
    return Layer(init, apply, name=name, kind="parallel", needs_key=needs_key, children=children)


def shared(layer: Layer, num_inputs: int = 2, *, name: str | None = None) -> Layer:
    """Applies one layer, with one set of weights, to each of ``num_inputs`` inputs.

    The input is a tuple of ``num_inputs`` arrays (``in_shape`` a tuple of their shapes, which
    must agree); the output is the tuple of results. Params and state are the inner layer's own,
    so a Siamese pair ``shared(embed, 2)`` has exactly the parameters of ``embed``. State (batch
    norm statistics) is threaded through the branches in order. Each branch gets its own key.
    """
    if not isinstance(num_inputs, int) or num_inputs < 1:
        raise ValueError(f"shared: num_inputs={num_inputs!r} must be a positive int")

    def init(key, in_shape):
        shapes = _tuple_of_shapes(in_shape, num_inputs)
        out_shape, params, state = layer.init(key, shapes[0])
        return (out_shape,) * num_inputs, params, state

    def apply(params, state, xs, *, key=None, train=False):
        if not isinstance(xs, tuple | list) or len(xs) != num_inputs:
            raise ValueError(f"shared: expected a tuple of {num_inputs} inputs, got {type(xs)}")
        if layer.needs_key and train and key is None:
            raise missing_key_error(f"shared({layer.name or layer.kind})")
        keys = _split_or_none(key, num_inputs)
        ys = []
        for x, k in zip(xs, keys, strict=True):
            y, state = layer.apply(params, state, x, key=k, train=train)
            ys.append(y)
        return tuple(ys), state

    return Layer(
        init, apply, name=name, kind="shared", needs_key=layer.needs_key, children=(("", layer),)
    )


def param_mults(model: Layer):
    """Caffe's per-parameter ``lr_mult``/``decay_mult`` of a network, as two functions.

    Returns:
      ``(lr_mult, decay_mult)``, each ``f(path, leaf) -> float`` for the key paths of
      ``model``'s params (as ``jax.tree_util.tree_map_with_path`` gives them), ready for
      ``fl.optim.sgd(..., lr_mult=lr_mult, decay_mult=decay_mult)``. Parameters whose layer
      declares nothing get 1. To see them as trees shaped like params:
      ``jax.tree_util.tree_map_with_path(lr_mult, params)``.
    """

    def lookup(path, index):
        triple = _leaf_mults(model, [_path_name(p) for p in path])
        return 1.0 if triple is None else triple[index]

    return (lambda path, leaf: lookup(path, 0)), (lambda path, leaf: lookup(path, 1))


def layer_shapes(model: Layer, in_shape) -> list[tuple[str, Any, int]]:
    """``(name, out_shape, num_params)`` for every layer of ``model`` in order, from shapes
    alone (nothing is computed). Containers are expanded: a nested :func:`serial` contributes
    its layers as ``"outer/inner"``, :func:`shared` its inner layer's rows (its params are the
    inner layer's), :func:`parallel` one row for all its branches."""
    rows: list[tuple[str, Any, int]] = []
    _collect_shapes(model, in_shape, "", rows)
    return rows


def summary(model: Layer, in_shape) -> str:
    """A table of layer names, output shapes and parameter counts, with the total.

    Example:
        >>> import fnlayers as fl
        >>> print(fl.summary(fl.serial(fl.Dense(4, name="ip1")), (-1, 3)))
        layer  output shape  params
        ip1    (-1, 4)           16
        total                    16
    """
    rows = [
        (name, str(shape), f"{count:,}") for name, shape, count in layer_shapes(model, in_shape)
    ]
    total = f"{sum(c for _, _, c in layer_shapes(model, in_shape)):,}"
    head = ("layer", "output shape", "params")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows), len("total"))
    w1 = max(len(head[1]), *(len(r[1]) for r in rows))
    w2 = max(len(head[2]), *(len(r[2]) for r in rows), len(total))
    lines = [f"{head[0]:<{w0}}  {head[1]:<{w1}}  {head[2]:>{w2}}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:>{w2}}" for a, b, c in rows]
    lines.append(f"{'total':<{w0}}  {'':<{w1}}  {total:>{w2}}")
    return "\n".join(lines)


def Lambda(fn: Callable[[jax.Array], jax.Array], *, name: str | None = None, kind="lambda"):
    """A parameter-free layer from an array function; its output shape is found by tracing
    ``fn`` on a placeholder of the input shape (batch -1 is traced as 1 and restored)."""

    def init(key, in_shape):
        return _traced_shape(fn, in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return fn(x), state

    return Layer(init, apply, name=name, kind=kind)


def Conv2D(
    num_output: int,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bias: bool = True,
    w_init=None,
    b_init=None,
    impl: str = "im2col",
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's Convolution layer: :func:`fnlayers.conv2d` with weight ``(KH, KW, C_in//groups,
    num_output)`` and bias ``(num_output,)``.

    Defaults: ``w_init=init.xavier()`` (Caffe's model zoo choice), ``b_init=init.constant(0)``.
    ``lr_mult``/``decay_mult``: a number for every parameter, or one per parameter in Caffe's
    order ``(w, b)``, e.g. ``lr_mult=(1, 2)`` (see :func:`param_mults`).
    """
    kernel = as_pair(kernel_size, fn="Conv2D", name="kernel_size", minimum=1)
    _check_num_output(num_output, "Conv2D")
    check_choice(impl, _conv.IMPLS, fn="Conv2D", name="impl")
    w_init = w_init or _init.xavier()
    b_init = b_init or _init.constant(0.0)
    cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def init(key, in_shape):
        c_in = _channels(in_shape, "Conv2D")
        if c_in % groups:
            raise ValueError(f"Conv2D: groups={groups} does not divide C_in={c_in}")
        w_shape = (*kernel, c_in // groups, num_output)
        out_shape = _conv.conv_output_shape(in_shape, w_shape, **cfg)
        return out_shape, _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias), {}

    def apply(params, state, x, *, key=None, train=False):
        return _conv.conv2d(x, params["w"], params.get("b"), impl=impl, **cfg), state

    mults = _mults(("w", "b") if bias else ("w",), lr_mult, decay_mult, "Conv2D")
    return Layer(init, apply, name=name, kind="conv2d", mults=mults)


def Deconv2D(
    num_output: int,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bias: bool = True,
    w_init=None,
    b_init=None,
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's Deconvolution layer: :func:`fnlayers.conv_transpose2d` with weight
    ``(KH, KW, num_output//groups, C_in)`` and bias ``(num_output,)``.

    For FCN-style upsampling by a factor F use ``kernel_size=2F - F % 2, stride=F,
    padding=ceil((F - 1) / 2), groups=C, w_init=init.bilinear(), bias=False``.
    """
    kernel = as_pair(kernel_size, fn="Deconv2D", name="kernel_size", minimum=1)
    _check_num_output(num_output, "Deconv2D")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Deconv2D: groups={groups!r} must be a positive int")
    if num_output % groups:
        raise ValueError(f"Deconv2D: groups={groups} does not divide num_output={num_output}")
    w_init = w_init or _init.xavier()
    b_init = b_init or _init.constant(0.0)
    cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def init(key, in_shape):
        c_in = _channels(in_shape, "Deconv2D")
        w_shape = (*kernel, num_output // groups, c_in)
        out_shape = _conv.conv_transpose_output_shape(in_shape, w_shape, **cfg)
        return out_shape, _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias), {}

    def apply(params, state, x, *, key=None, train=False):
        return _conv.conv_transpose2d(x, params["w"], params.get("b"), **cfg), state

    mults = _mults(("w", "b") if bias else ("w",), lr_mult, decay_mult, "Deconv2D")
    return Layer(init, apply, name=name, kind="deconv2d", mults=mults)


def Dense(
    num_output: int,
    *,
    bias: bool = True,
    w_init=None,
    b_init=None,
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's InnerProduct layer: :func:`fnlayers.dense`, weight ``(K, num_output)`` where K is
    the product of the input's trailing axes, bias ``(num_output,)``."""
    _check_num_output(num_output, "Dense")
    w_init = w_init or _init.xavier()
    b_init = b_init or _init.constant(0.0)

    def init(key, in_shape):
        if len(in_shape) < 2:
            raise ValueError(
                f"Dense: input shape {tuple(in_shape)} needs a batch axis and features"
            )
        k = math.prod(in_shape[1:])
        w_shape = (k, num_output)
        out_shape = (in_shape[0], num_output)
        return out_shape, _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias), {}

    def apply(params, state, x, *, key=None, train=False):
        return _linear.dense(x, params["w"], params.get("b")), state

    mults = _mults(("w", "b") if bias else ("w",), lr_mult, decay_mult, "Dense")
    return Layer(init, apply, name=name, kind="dense", mults=mults)


def Flatten(*, name: str | None = None) -> Layer:
    """:func:`fnlayers.flatten`: ``(N, ...) -> (N, prod(...))``."""

    def init(key, in_shape):
        return (in_shape[0], math.prod(in_shape[1:])), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return _linear.flatten(x), state

    return Layer(init, apply, name=name, kind="flatten")


# ----------------------------------------------------------------------------- helpers


def _layer_names(layers: Sequence[Layer], where: str) -> list[str]:
    if not layers:
        raise ValueError(f"{where}: needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"{where}: argument {i} is {type(layer).__name__}, not a Layer")
    names = [layer.name or f"{layer.kind}_{i}" for i, layer in enumerate(layers)]
    seen = set()
    for nm in names:
        if nm in seen:
            raise ValueError(f"{where}: two layers are named {nm!r}; names must be unique")
        seen.add(nm)
    return names


def _check_key(needs_key, key, train, layers, names, where):
    if needs_key and train and key is None:
        first = next(nm for nm, layer in zip(names, layers, strict=True) if layer.needs_key)
        raise missing_key_error(f"{where} (layer {first!r})")


def _split_or_none(key, n):
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def _tuple_of_shapes(in_shape, n) -> tuple[Shape, ...]:
    if (
        not isinstance(in_shape, tuple | list)
        or len(in_shape) != n
        or not all(isinstance(s, tuple | list) for s in in_shape)
    ):
        raise ValueError(f"shared: in_shape={in_shape!r} must be a tuple of {n} shapes")
    shapes = tuple(tuple(s) for s in in_shape)
    if len(set(shapes)) != 1:
        raise ValueError(f"shared: the {n} input shapes must agree, got {shapes}")
    return shapes


def _channels(in_shape, where) -> int:
    if len(in_shape) != 4:
        raise ValueError(f"{where}: input shape {tuple(in_shape)} must be NHWC (rank 4)")
    return int(in_shape[-1])


def _check_num_output(num_output, where):
    if not isinstance(num_output, int) or isinstance(num_output, bool) or num_output < 1:
        raise ValueError(f"{where}: num_output={num_output!r} must be a positive int")


def _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias):
    kw, kb = jax.random.split(key)
    params = {"w": w_init(kw, w_shape, jnp.float32)}
    if bias:
        params["b"] = b_init(kb, (num_output,), jnp.float32)
    return params


def _traced_shape(fn, in_shape) -> Shape:
    concrete = tuple(1 if d == -1 else d for d in in_shape)
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(concrete, jnp.float32)).shape
    if in_shape and in_shape[0] == -1 and out:
        out = (-1, *out[1:])
    return tuple(out)


# ----------------------------------------------------------------------------- building blocks
# Pooling, normalization, dropout and activations (CAFFE_SEMANTICS.md §3-§7). Every init works
# out the output shape from the input shape alone (the batch may be -1) and never runs the op.


def MaxPool(
    window, *, stride=1, padding=0, rounding: str = "ceil", name: str | None = None
) -> Layer:
    """Caffe's MAX Pooling layer: :func:`fnlayers.max_pool`, ``(N, H, W, C) -> (N, OH, OW, C)``
    with Caffe's output size (:func:`fnlayers.pool_output_size`). No params, no state."""
    return _pool_layer(
        _pooling.max_pool, "MaxPool", "max_pool", window, stride, padding, rounding, name
    )


def AvgPool(
    window, *, stride=1, padding=0, rounding: str = "ceil", name: str | None = None
) -> Layer:
    """Caffe's AVE Pooling layer: :func:`fnlayers.avg_pool` (divisor counts the padding, not
    the ceil overhang), ``(N, H, W, C) -> (N, OH, OW, C)``. No params, no state."""
    return _pool_layer(
        _pooling.avg_pool, "AvgPool", "avg_pool", window, stride, padding, rounding, name
    )


def StochasticPool(window, *, stride=1, name: str | None = None) -> Layer:
    """Caffe's STOCHASTIC Pooling layer: :func:`fnlayers.stochastic_pool`. Samples with ``key``
    when ``train=True`` (so ``needs_key``), probability-weighted average otherwise."""
    as_pair(window, fn="StochasticPool", name="window", minimum=1)

    def init(key, in_shape):
        out = _pooling.pool_output_shape(in_shape, window, stride=stride, fn="StochasticPool")
        return out, {}, {}

    def apply(params, state, x, *, key=None, train=False):
        if train and key is None:
            raise missing_key_error("StochasticPool")
        return _pooling.stochastic_pool(x, window, stride=stride, key=key, train=train), state

    return Layer(init, apply, name=name, kind="stochastic_pool", needs_key=True)


def GlobalAvgPool(*, name: str | None = None) -> Layer:
    """:func:`fnlayers.global_avg_pool`: ``(N, H, W, C) -> (N, 1, 1, C)``, the spatial mean."""
    return _global_pool_layer(_pooling.global_avg_pool, "GlobalAvgPool", "global_avg_pool", name)


def GlobalMaxPool(*, name: str | None = None) -> Layer:
    """:func:`fnlayers.global_max_pool`: ``(N, H, W, C) -> (N, 1, 1, C)``, the spatial max."""
    return _global_pool_layer(_pooling.global_max_pool, "GlobalMaxPool", "global_max_pool", name)


def LRN(
    size: int = 5,
    *,
    alpha: float = 1.0,
    beta: float = 0.75,
    k: float = 1.0,
    region: str = "across_channels",
    name: str | None = None,
) -> Layer:
    """Caffe's LRN layer: :func:`fnlayers.lrn` (``region="within_channel"`` ignores ``k``, as
    Caffe). Shape-preserving; no params, no state."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % 2 == 0:
        raise ValueError(f"LRN: size={size!r} must be a positive odd int (Caffe's local_size)")
    check_choice(region, _norm.LRN_REGIONS, fn="LRN", name="region")
    cfg = dict(size=size, alpha=alpha, beta=beta, k=k, region=region)

    def init(key, in_shape):
        if region == "within_channel" and len(in_shape) != 4:
            raise ValueError(
                f"LRN: region='within_channel' needs an NHWC input, got shape {tuple(in_shape)}"
            )
        return tuple(in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return _norm.lrn(x, **cfg), state

    return Layer(init, apply, name=name, kind="lrn")


def BatchNorm(
    *,
    momentum: float = 0.999,
    eps: float = 1e-5,
    affine: bool = True,
    axis_name=None,
    scale_init=None,
    shift_init=None,
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's BatchNorm layer (:func:`fnlayers.batch_norm`), followed when ``affine`` by the
    per-channel ``y * scale + shift`` of the Scale layer Caffe pairs it with (§5).

    Input ``(N, ..., C)``, channels last; output the same shape. Params ``{"scale": (C,),
    "shift": (C,)}`` (init 1 and 0, Caffe's Scale/Bias fillers) or ``{}`` without ``affine``;
    state ``{"mean_acc": (C,), "var_acc": (C,), "scale_factor": (1,)}``, all zero.
    ``momentum`` is Caffe's ``moving_average_fraction``. ``train=True`` normalises with the
    batch statistics and returns the updated state; ``train=False`` uses the running averages
    and returns the state unchanged. ``axis_name`` averages the statistics over a
    ``pmap``/``shard_map`` axis.
    """
    _check_real(momentum, "BatchNorm", "momentum")
    if not 0 <= momentum <= 1:
        raise ValueError(f"BatchNorm: momentum={momentum!r} must be in [0, 1]")
    _check_real(eps, "BatchNorm", "eps")
    if eps < 0:
        raise ValueError(f"BatchNorm: eps={eps!r} must be >= 0")
    scale_init = scale_init or _init.constant(1.0)
    shift_init = shift_init or _init.constant(0.0)
    cfg = dict(momentum=momentum, eps=eps, axis_name=axis_name)

    def init(key, in_shape):
        if len(in_shape) < 2:
            raise ValueError(
                f"BatchNorm: input shape {tuple(in_shape)} must be (N, ..., C) with channels last"
            )
        c = int(in_shape[-1])
        params = {}
        if affine:
            k_scale, k_shift = jax.random.split(key)
            params = {
                "scale": scale_init(k_scale, (c,), jnp.float32),
                "shift": shift_init(k_shift, (c,), jnp.float32),
            }
        return tuple(in_shape), params, _norm.batch_norm_state(c)

    def apply(params, state, x, *, key=None, train=False):
        y, state = _norm.batch_norm(x, state, train=train, **cfg)
        if affine:
            shape = (1,) * (y.ndim - 1) + (y.shape[-1],)
            scale = params["scale"].astype(y.dtype).reshape(shape)
            shift = params["shift"].astype(y.dtype).reshape(shape)
            y = y * scale + shift
        return y, state

    mults = _mults(("scale", "shift") if affine else (), lr_mult, decay_mult, "BatchNorm")
    return Layer(init, apply, name=name, kind="batch_norm", mults=mults)


def Dropout(rate: float = 0.5, *, name: str | None = None) -> Layer:
    """Caffe's Dropout layer: :func:`fnlayers.dropout`. ``rate`` is the **drop** probability
    (Caffe's ``dropout_ratio``, default 0.5); kept units are scaled by ``1/(1 - rate)`` at train
    time, identity at test time. Needs ``key`` when ``train=True``."""
    _check_real(rate, "Dropout", "rate")
    if not 0 <= rate < 1:
        raise ValueError(f"Dropout: rate={rate!r} is the drop probability and must be in [0, 1)")

    def init(key, in_shape):
        return tuple(in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        if train and key is None:
            raise missing_key_error("Dropout")
        return _dropout.dropout(x, rate, key=key, train=train), state

    return Layer(init, apply, name=name, kind="dropout", needs_key=True)


def ReLU(negative_slope: float = 0.0, *, name: str | None = None) -> Layer:
    """Caffe's ReLU layer: :func:`fnlayers.relu` (leaky when ``negative_slope`` is set)."""
    return _elementwise(lambda x: _act.relu(x, negative_slope), "relu", name)


def PReLU(
    *,
    channel_shared: bool = False,
    alpha_init=None,
    lr_mult=1.0,
    decay_mult=1.0,
    name: str | None = None,
) -> Layer:
    """Caffe's PReLU layer: :func:`fnlayers.prelu` with a learned slope, params ``{"alpha": (C,)}``
    (or ``()`` when ``channel_shared``), initialised to 0.25 (Caffe's default filler)."""
    alpha_init = alpha_init or _init.constant(0.25)

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ValueError("PReLU: input shape () has no channel axis")
        shape = () if channel_shared else (int(in_shape[-1]),)
        return tuple(in_shape), {"alpha": alpha_init(key, shape, jnp.float32)}, {}

    def apply(params, state, x, *, key=None, train=False):
        return _act.prelu(x, params["alpha"].astype(x.dtype)), state

    mults = _mults(("alpha",), lr_mult, decay_mult, "PReLU")
    return Layer(init, apply, name=name, kind="prelu", mults=mults)


def ELU(alpha: float = 1.0, *, name: str | None = None) -> Layer:
    """Caffe's ELU layer: :func:`fnlayers.elu`."""
    return _elementwise(lambda x: _act.elu(x, alpha), "elu", name)


def Sigmoid(*, name: str | None = None) -> Layer:
    """Caffe's Sigmoid layer: :func:`fnlayers.sigmoid`."""
    return _elementwise(_act.sigmoid, "sigmoid", name)


def Tanh(*, name: str | None = None) -> Layer:
    """Caffe's TanH layer: :func:`fnlayers.tanh`."""
    return _elementwise(_act.tanh, "tanh", name)


def Maxout(pieces: int, *, name: str | None = None) -> Layer:
    """:func:`fnlayers.maxout` (not in Caffe): ``(..., C) -> (..., C // pieces)``."""
    if not isinstance(pieces, int) or isinstance(pieces, bool) or pieces < 1:
        raise ValueError(f"Maxout: pieces={pieces!r} must be a positive int")

    def init(key, in_shape):
        c = int(in_shape[-1]) if len(in_shape) else None
        if c is None or c % pieces:
            raise ValueError(f"Maxout: pieces={pieces} does not divide the channel count C={c}")
        return (*in_shape[:-1], c // pieces), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return _act.maxout(x, pieces), state

    return Layer(init, apply, name=name, kind="maxout")


def _pool_layer(op, where, kind, window, stride, padding, rounding, name) -> Layer:
    as_pair(window, fn=where, name="window", minimum=1)
    check_choice(rounding, _pooling.ROUNDINGS, fn=where, name="rounding")
    cfg = dict(stride=stride, padding=padding, rounding=rounding)

    def init(key, in_shape):
        return _pooling.pool_output_shape(in_shape, window, fn=where, **cfg), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return op(x, window, **cfg), state

    return Layer(init, apply, name=name, kind=kind)


def _global_pool_layer(op, where, kind, name) -> Layer:
    def init(key, in_shape):
        c = _channels(in_shape, where)
        return (in_shape[0], 1, 1, c), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return op(x), state

    return Layer(init, apply, name=name, kind=kind)


def _check_real(value, where, name):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{where}: {name}={value!r} must be a real number")


def _elementwise(fn, kind, name) -> Layer:
    def init(key, in_shape):
        return tuple(in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return fn(x), state

    return Layer(init, apply, name=name, kind=kind)


def _mults(names, lr_mult, decay_mult, where) -> tuple[tuple[str, float, float], ...]:
    lrs = _per_param(lr_mult, names, "lr_mult", where)
    decays = _per_param(decay_mult, names, "decay_mult", where)
    return tuple(zip(names, lrs, decays, strict=True))


def _per_param(value, names, arg, where) -> tuple[float, ...]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = (float(value),) * len(names)
    elif isinstance(value, tuple | list) and all(isinstance(v, numbers.Real) for v in value):
        if len(value) != len(names):
            raise ValueError(
                f"{where}: {arg}={tuple(value)!r} gives {len(value)} values for the "
                f"{len(names)} parameters {names}"
            )
        values = tuple(float(v) for v in value)
    else:
        raise TypeError(f"{where}: {arg}={value!r} must be a number or a tuple of numbers")
    if any(v < 0 for v in values):
        raise ValueError(f"{where}: {arg}={value!r} must be >= 0")
    return values


def _path_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_mults(layer: Layer, path: list[str]):
    """The ``(lr_mult, decay_mult)`` of the parameter at ``path`` inside ``layer``, or None."""
    while layer.children:
        if layer.kind == "shared":
            layer = layer.children[0][1]
            continue
        if not path:
            return None
        child = dict(layer.children).get(path[0])
        if child is None:
            return None
        layer, path = child, path[1:]
    if not path:
        return None
    for name, lr, decay in layer.mults:
        if name == path[0]:
            return lr, decay
    return None


def _abstract_init(layer: Layer, in_shape):
    """``layer.init`` traced abstractly: ``(out_shape, param count)``, no array materialised."""
    box = []

    def init(key):
        out_shape, params, _ = layer.init(key, in_shape)
        box.append(out_shape)
        return params

    params = jax.eval_shape(init, jax.random.key(0))
    return box[0], sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def _collect_shapes(layer: Layer, in_shape, prefix, rows):
    if layer.kind == "serial":
        shape = in_shape
        for name, child in layer.children:
            shape = _collect_shapes(child, shape, f"{prefix}{name}/", rows)
        return shape
    if layer.kind == "shared":
        inner = layer.children[0][1]
        branch = _collect_shapes(inner, in_shape[0], prefix, rows)
        return (branch,) * len(in_shape)
    out_shape, count = _abstract_init(layer, in_shape)
    rows.append((prefix.rstrip("/") or layer.name or layer.kind, out_shape, count))
    return out_shape
