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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fnlayers import conv as _conv
from fnlayers import init as _init
from fnlayers import linear as _linear
from fnlayers._checks import as_pair, check_choice

__all__ = [
    "Conv2D",
    "Deconv2D",
    "Dense",
    "Flatten",
    "Lambda",
    "Layer",
    "parallel",
    "serial",
    "shared",
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
    """

    init: InitFn
    apply: ApplyFn
    name: str | None = None
    kind: str = "layer"
    needs_key: bool = False

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

    return Layer(init, apply, name=name, kind="serial", needs_key=needs_key)


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

    return Layer(init, apply, name=name, kind="parallel", needs_key=needs_key)


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

    return Layer(init, apply, name=name, kind="shared", needs_key=layer.needs_key)


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
    name: str | None = None,
) -> Layer:
    """Caffe's Convolution layer: :func:`fnlayers.conv2d` with weight ``(KH, KW, C_in//groups,
    num_output)`` and bias ``(num_output,)``.

    Defaults: ``w_init=init.xavier()`` (Caffe's model zoo choice), ``b_init=init.constant(0)``.
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

    return Layer(init, apply, name=name, kind="conv2d")


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

    return Layer(init, apply, name=name, kind="deconv2d")


def Dense(
    num_output: int,
    *,
    bias: bool = True,
    w_init=None,
    b_init=None,
    name: str | None = None,
) -> Layer:
    """Caffe's InnerProduct layer: :func:`fnlayers.dense`, weight ``(K, num_output)`` where K is
    the product of the input's trailing axes, bias ``(num_output,)``."""
    _check_num_output(num_output, "Dense")
    w_init = w_init or _init.xavier()
    b_init = b_init or _init.constant(0.0)

    def init(key, in_shape):
        if len(in_shape) < 2:
            raise ValueError(f"Dense: input shape {tuple(in_shape)} needs a batch axis and features")
        k = math.prod(in_shape[1:])
        w_shape = (k, num_output)
        out_shape = (in_shape[0], num_output)
        return out_shape, _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias), {}

    def apply(params, state, x, *, key=None, train=False):
        return _linear.dense(x, params["w"], params.get("b")), state

    return Layer(init, apply, name=name, kind="dense")


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
