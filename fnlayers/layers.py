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

A container says what it is through its :class:`Container` (``layer.container``): how its
children's params and state are keyed (by name, or shared with the container), and its init and
apply written against a ``call`` for each child. :func:`walk` visits every layer with its part
of the params; :func:`init_leaves` and :func:`apply_leaves` run a model with the leaf layers
intercepted, through the containers' own logic. :func:`summary`, :func:`param_mults` and
:mod:`fnlayers.diagnostics` stand on these; nothing reads a container's ``kind``.

Errors name the layer: a ValueError or TypeError raised in a child's init or apply gets the
child's path prefixed (``"block/conv1: conv2d: x must have rank 4 (NHWC) ..."``), and ``apply``
checks parameter shapes against the layer's configuration (``"conv1/w: Conv2D: expected shape
..."``) at trace time. ``repr(layer)`` shows the network, one line per layer with its
non-default configuration.

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
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnlayers import _checks
from fnlayers import activations as _act
from fnlayers import conv as _conv
from fnlayers import dropout as _dropout
from fnlayers import init as _init
from fnlayers import linear as _linear
from fnlayers import normalization as _norm
from fnlayers import pooling as _pooling
from fnlayers._checks import as_pair, check_choice, check_positive_int, check_real, is_real
from fnlayers._tree import path_str

__all__ = [
    "ELU",
    "LRN",
    "AvgPool",
    "BatchNorm",
    "Container",
    "Conv2D",
    "Deconv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "Lambda",
    "Layer",
    "LayerNode",
    "MaxPool",
    "Maxout",
    "PReLU",
    "ReLU",
    "Sigmoid",
    "StochasticPool",
    "Tanh",
    "apply_leaves",
    "child_path",
    "container_layer",
    "init_leaves",
    "layer_shapes",
    "parallel",
    "param_mults",
    "serial",
    "shared",
    "summary",
    "walk",
]

Shape = tuple[int, ...]
InitFn = Callable[[jax.Array, Any], tuple[Any, Any, Any]]
ApplyFn = Callable[..., tuple[Any, Any]]
ChildInit = Callable[..., tuple[Any, Any, Any]]
"""``call(name, child, key, in_shape) -> (out_shape, params, state)``: how a container's init
initialises one child."""
ChildApply = Callable[..., tuple[Any, Any]]
"""``call(name, child, params, state, x, *, key=None, train=False) -> (y, state)``: how a
container's apply applies one child."""


@dataclasses.dataclass(frozen=True)
class Container:
    """What a container layer (:func:`serial`, :func:`parallel`, :func:`shared`, or any
    combinator built the same way with :func:`container_layer`) declares about its children, so
    that :func:`walk`, :func:`summary`, :func:`param_mults` and :mod:`fnlayers.diagnostics` read
    the structure from it rather than from the layer's ``kind``.

    Attributes:
      init: ``init(call, key, in_shape) -> (out_shape, params, state)``: the container's init,
        with every child initialised through ``call(name, child, key, in_shape)``.
      apply: ``apply(call, params, state, x, *, key=None, train=False) -> (y, state)``: the
        container's apply (key splitting, state threading, data flow), with every child applied
        through ``call(name, child, child_params, child_state, child_x, key=k, train=train)``.
        ``name`` is the child's entry in ``Layer.children``.
      shares_params: False when params and state are dicts keyed by child name (serial,
        parallel, a graph of named layers); True when the children's params and state ARE the
        container's own (shared: one layer applied to several inputs).
    """

    init: Callable[..., tuple[Any, Any, Any]]
    apply: Callable[..., tuple[Any, Any]]
    shares_params: bool = False

    def init_with(self, call: ChildInit, key: jax.Array, in_shape) -> tuple[Any, Any, Any]:
        """:attr:`init` with ``call`` for the children; a ValueError or TypeError from a child
        is re-raised with the child's name prefixed to its message (``"conv1: ..."``)."""
        return self.init(_naming(call), key, in_shape)

    def apply_with(
        self, call: ChildApply, params, state, x, *, key=None, train: bool = False
    ) -> tuple[Any, Any]:
        """:attr:`apply` with ``call`` for the children, errors named as in :meth:`init_with`."""
        return self.apply(_naming(call), params, state, x, key=key, train=train)


@dataclasses.dataclass(frozen=True, repr=False)
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
        :func:`shared`), in order; empty for a leaf layer. :func:`shared`'s one child has the
        name ``""``: it adds no level to paths.
      mults: ``(param_name, lr_mult, decay_mult)`` triples of a leaf layer, Caffe's
        per-parameter ``ParamSpec``; parameters not listed have 1 and 1. See
        :func:`param_mults`.
      container: how a container runs its children (a :class:`Container`); None for a leaf.
      constructor: the function that built the layer (``Conv2D``), or None.
      config: ``(argument, value)`` pairs the constructor was given that differ from its
        defaults, in its signature's order (``name`` and sub-layers left out); ``repr`` shows
        them.
    """

    init: InitFn
    apply: ApplyFn
    name: str | None = None
    kind: str = "layer"
    needs_key: bool = False
    children: tuple[tuple[str, Layer], ...] = ()
    mults: tuple[tuple[str, float, float], ...] = ()
    container: Container | None = dataclasses.field(default=None, compare=False)
    constructor: Callable[..., Layer] | None = dataclasses.field(default=None, compare=False)
    config: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        if self.children and self.container is None:
            raise TypeError(
                f"Layer {self.kind!r}: a layer with children must say how it runs them "
                "(container=Container(...))"
            )

    @property
    def is_container(self) -> bool:
        """True for a layer that holds other layers (its ``container`` is set)."""
        return self.container is not None

    def named(self, name: str) -> Layer:
        """Returns the same layer under another name."""
        return dataclasses.replace(self, name=name)

    def child_tree(self, tree, name: str):
        """The part of this container's params, state or gradients that belongs to the child
        ``name``: ``tree[name]``, or ``tree`` itself when the container shares its params with
        its child (:func:`shared`). None stays None.

        Raises:
          TypeError: this layer is not a container.
          ValueError: ``tree`` has no entry ``name``.
        """
        if self.container is None:
            raise TypeError(f"{self.name or self.kind}: a leaf layer has no children")
        if tree is None or self.container.shares_params:
            return tree
        if not isinstance(tree, Mapping) or name not in tree:
            keys = list(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ValueError(
                f"{self.name or self.kind}: the tree has no entry {name!r} for that child "
                f"(it has {keys})"
            )
        return tree[name]

    def __repr__(self) -> str:
        return "\n".join(_describe(self, self.name or "", ""))


class LayerNode(NamedTuple):
    """One layer of a model, as :func:`walk` yields it.

    Attributes:
      path: the layer's key path in the params tree, ``"/"``-joined (``"block/conv1"``); the
        model itself (and the child of a :func:`shared` at the root) has ``""``.
      layer: the Layer.
      params, state: the layer's parts of the trees given to :func:`walk` (None if not given).
    """

    path: str
    layer: Layer
    params: Any = None
    state: Any = None

    @property
    def label(self) -> str:
        """The name tables and diagnostics use: the path, or for the root the layer's name or
        kind."""
        return self.path or self.layer.name or self.layer.kind


def walk(model: Layer, params=None, state=None) -> Iterator[LayerNode]:
    """Every layer of ``model``, containers before their children, in network order.

    Args:
      model: any Layer.
      params, state: optional trees shaped like ``model.init``'s (or gradients); each node
        carries its own part of them.

    Yields:
      :class:`LayerNode` ``(path, layer, params, state)``.

    Example:
        >>> import fnlayers as fl
        >>> net = fl.serial(fl.Dense(3, name="ip1"), fl.serial(fl.ReLU(), name="block"))
        >>> [(n.path, n.layer.kind) for n in walk(net)]
        [('', 'serial'), ('ip1', 'dense'), ('block', 'serial'), ('block/relu_0', 'relu')]
    """
    return _walk(model, "", params, state)


def child_path(path: str, name: str) -> str:
    """The path of the child ``name`` of the layer at ``path`` (``""`` adds no level)."""
    return f"{path}/{name}" if path and name else path or name


def init_leaves(model: Layer, on_leaf: ChildInit, key: jax.Array, in_shape):
    """``model.init(key, in_shape)`` with every leaf layer initialised through
    ``on_leaf(path, leaf, key, in_shape) -> (out_shape, params, state)``; containers run their
    own init (key splitting, shape flow). A leaf ``model`` is ``on_leaf("", model, ...)``."""
    return _opening(on_leaf, "", "init_with")("", model, key, in_shape)


def apply_leaves(model: Layer, on_leaf: ChildApply, params, state, x, *, key=None, train=False):
    """``model.apply(params, state, x, key=key, train=train)`` with every leaf layer applied
    through ``on_leaf(path, leaf, params, state, x, key=k, train=train) -> (y, state)``;
    containers run their own apply (key splitting, state threading, data flow), so a leaf
    inside :func:`shared` is called once per input."""
    call = _opening(on_leaf, "", "apply_with")
    return call("", model, params, state, x, key=key, train=train)


def container_layer(kind: str, children, container: Container, *, name: str | None = None) -> Layer:
    """The Layer of a container: ``init``/``apply`` run ``container`` with each child's own
    init/apply; ``needs_key`` when a child needs one.

    Args:
      kind: the default-name prefix (``"serial"``).
      children: ``(name, layer)`` pairs, the names ``container`` passes to its ``call``.
      container: the :class:`Container`.
      name: the layer's name.

    Example (a residual block, ``y = x + body(x)``, its params under ``"body"``):
        >>> import fnlayers as fl
        >>> def residual(body, name=None):
        ...     def init(call, key, in_shape):
        ...         shape, params, state = call("body", body, key, in_shape)
        ...         return shape, {"body": params}, {"body": state}
        ...     def apply(call, params, state, x, *, key=None, train=False):
        ...         p, s = params["body"], state["body"]
        ...         y, s = call("body", body, p, s, x, key=key, train=train)
        ...         return x + y, {"body": s}
        ...     return container_layer("residual", [("body", body)], Container(init, apply),
        ...                            name=name)
        >>> net = fl.serial(residual(fl.Dense(3, name="ip")), name="net")
        >>> [n.path for n in walk(net)]
        ['', 'residual_0', 'residual_0/body']
    """
    children = tuple(children)
    return Layer(
        functools.partial(container.init_with, _init_child),
        functools.partial(container.apply_with, _apply_child),
        name=name,
        kind=kind,
        needs_key=any(layer.needs_key for _, layer in children),
        children=children,
        container=container,
    )


def missing_key_error(where: str) -> ValueError:
    """The error raised when ``train=True`` needs randomness and no ``key`` was passed."""
    return _checks.missing_key_error(where, needs="apply")


def _configured(constructor: Callable[..., Layer]) -> Callable[..., Layer]:
    """Decorates a layer constructor: the layer it returns records the constructor and the
    arguments that differ from its defaults (:attr:`Layer.config`)."""
    signature = inspect.signature(constructor)

    @functools.wraps(constructor)
    def build(*args, **kwargs) -> Layer:
        layer = constructor(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        config = tuple(_changed_arguments(signature, bound.arguments))
        return dataclasses.replace(layer, constructor=build, config=config)

    return build


@_configured
def serial(*layers: Layer, name: str | None = None) -> Layer:
    """Composes layers in sequence: ``y = layers[-1](...layers[0](x))``.

    Params and state are dicts keyed by layer name. ``key`` is split into one key per layer.

    Raises:
      ValueError: no layers, or two layers with the same name.
    """
    children = _named_children(layers, "serial")
    needs_key = any(layer.needs_key for layer in layers)

    def init(call, key, in_shape):
        params, state, shape = {}, {}, in_shape
        for (nm, layer), k in zip(children, jax.random.split(key, len(layers)), strict=True):
            shape, params[nm], state[nm] = call(nm, layer, k, shape)
        return shape, params, state

    def apply(call, params, state, x, *, key=None, train=False):
        _check_key(needs_key, key, train, children, "serial")
        new_state = {}
        for (nm, layer), k in zip(children, _split_or_none(key, len(layers)), strict=True):
            x, new_state[nm] = call(nm, layer, params[nm], state[nm], x, key=k, train=train)
        return x, new_state

    return container_layer("serial", children, Container(init, apply), name=name)


@_configured
def parallel(*layers: Layer, name: str | None = None) -> Layer:
    """Feeds the same input to every layer; the output is the tuple of their outputs.

    Params and state are dicts keyed by layer name, as in :func:`serial`.
    """
    children = _named_children(layers, "parallel")
    needs_key = any(layer.needs_key for layer in layers)

    def init(call, key, in_shape):
        keys = jax.random.split(key, len(layers))
        outs = {
            nm: call(nm, layer, k, in_shape) for (nm, layer), k in zip(children, keys, strict=True)
        }
        shapes, params, state = _by_part(outs)
        return tuple(shapes.values()), params, state

    def apply(call, params, state, x, *, key=None, train=False):
        _check_key(needs_key, key, train, children, "parallel")
        keys = _split_or_none(key, len(layers))
        outs = {
            nm: call(nm, layer, params[nm], state[nm], x, key=k, train=train)
            for (nm, layer), k in zip(children, keys, strict=True)
        }
        ys, new_state = _by_part(outs)
        return tuple(ys.values()), new_state

    return container_layer("parallel", children, Container(init, apply), name=name)


@_configured
def shared(layer: Layer, num_inputs: int = 2, *, name: str | None = None) -> Layer:
    """Applies one layer, with one set of weights, to each of ``num_inputs`` inputs.

    The input is a tuple of ``num_inputs`` arrays (``in_shape`` a tuple of their shapes, which
    must agree); the output is the tuple of results. Params and state are the inner layer's own,
    so a Siamese pair ``shared(embed, 2)`` has exactly the parameters of ``embed``. State (batch
    norm statistics) is threaded through the branches in order. Each branch gets its own key.
    """
    check_positive_int(num_inputs, fn="shared", name="num_inputs")

    def init(call, key, in_shape):
        shapes = _tuple_of_shapes(in_shape, num_inputs)
        out_shape, params, state = call("", layer, key, shapes[0])
        return (out_shape,) * num_inputs, params, state

    def apply(call, params, state, xs, *, key=None, train=False):
        if not isinstance(xs, tuple | list) or len(xs) != num_inputs:
            raise ValueError(f"shared: expected a tuple of {num_inputs} inputs, got {type(xs)}")
        if layer.needs_key and train and key is None:
            raise missing_key_error(f"shared({layer.name or layer.kind})")
        ys = []
        for x, k in zip(xs, _split_or_none(key, num_inputs), strict=True):
            y, state = call("", layer, params, state, x, key=k, train=train)
            ys.append(y)
        return tuple(ys), state

    container = Container(init, apply, shares_params=True)
    return container_layer("shared", [("", layer)], container, name=name)


def param_mults(model: Layer):
    """Caffe's per-parameter ``lr_mult``/``decay_mult`` of a network, as two functions.

    Returns:
      ``(lr_mult, decay_mult)``, each ``f(path, leaf) -> float`` for the key paths of
      ``model``'s params (as ``jax.tree_util.tree_map_with_path`` gives them), ready for
      ``fl.optim.sgd(..., lr_mult=lr_mult, decay_mult=decay_mult)``. Parameters whose layer
      declares nothing get 1. To see them as trees shaped like params:
      ``jax.tree_util.tree_map_with_path(lr_mult, params)``.
    """
    by_path = {n.path: n.layer.mults for n in walk(model) if not n.layer.is_container}

    def lr_mult(path, leaf) -> float:
        return _param_mult(by_path, path_str(path), 0)

    def decay_mult(path, leaf) -> float:
        return _param_mult(by_path, path_str(path), 1)

    return lr_mult, decay_mult


def layer_shapes(model: Layer, in_shape) -> list[tuple[str, Any, int]]:
    """``(name, out_shape, num_params)`` for every leaf layer of ``model`` in network order,
    from shapes alone (``init`` traced abstractly, nothing computed). Layers are named by their
    path (:attr:`LayerNode.label`): a nested container contributes its layers as
    ``"outer/inner"``; :func:`shared` adds no level and its layers appear once, with the output
    shape of one input (their params are counted once)."""
    shapes: dict[str, Any] = {}

    def record(path, layer, key, shape):
        out = layer.init(key, shape)
        shapes.setdefault(path, out[0])
        return out

    params = jax.eval_shape(lambda k: init_leaves(model, record, k, in_shape)[1], jax.random.key(0))
    return [
        (n.label, shapes[n.path], _count(n.params))
        for n in walk(model, params)
        if not n.layer.is_container
    ]


def summary(model: Layer, in_shape) -> str:
    """A table of layer names, output shapes and parameter counts, with the total.

    Example:
        >>> import fnlayers as fl
        >>> print(fl.summary(fl.serial(fl.Dense(4, name="ip1")), (-1, 3)))
        layer  output shape  params
        ip1    (-1, 4)           16
        total                    16
    """
    shapes = layer_shapes(model, in_shape)
    rows = [(name, str(shape), f"{count:,}") for name, shape, count in shapes]
    total = f"{sum(c for _, _, c in shapes):,}"
    head = ("layer", "output shape", "params")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows), len("total"))
    w1 = max(len(head[1]), *(len(r[1]) for r in rows))
    w2 = max(len(head[2]), *(len(r[2]) for r in rows), len(total))
    lines = [f"{head[0]:<{w0}}  {head[1]:<{w1}}  {head[2]:>{w2}}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:>{w2}}" for a, b, c in rows]
    lines.append(f"{'total':<{w0}}  {'':<{w1}}  {total:>{w2}}")
    return "\n".join(lines)


@_configured
def Lambda(fn: Callable[[jax.Array], jax.Array], *, name: str | None = None, kind="lambda"):
    """A parameter-free layer from an array function; its output shape is found by tracing
    ``fn`` on a placeholder of the input shape (batch -1 is traced as 1 and restored). The input
    may be a tuple of arrays (``in_shape`` a tuple of shapes), e.g. the output of
    :func:`parallel`."""

    def init(key, in_shape):
        return _traced_shape(fn, in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return fn(x), state

    return Layer(init, apply, name=name, kind=kind)


@_configured
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
    param_dtype=jnp.float32,
    name: str | None = None,
) -> Layer:
    """Caffe's Convolution layer: :func:`fnlayers.conv2d` with weight ``(KH, KW, C_in//groups,
    num_output)`` and bias ``(num_output,)``.

    Defaults: ``w_init=init.xavier()`` (Caffe's model zoo choice), ``b_init=init.constant(0)``.
    ``lr_mult``/``decay_mult``: a number for every parameter, or one per parameter in Caffe's
    order ``(w, b)``, e.g. ``lr_mult=(1, 2)`` (see :func:`param_mults`). ``param_dtype``: the
    dtype ``init`` creates the parameters in (float32; mixed precision keeps them so and
    casts per step, docs/mixed-precision.md).
    """
    kernel = as_pair(kernel_size, fn="Conv2D", name="kernel_size", minimum=1)
    _check_num_output(num_output, "Conv2D")
    param_dtype = _param_dtype(param_dtype, "Conv2D")
    check_choice(impl, _conv.IMPLS, fn="Conv2D", name="impl")
    w_init = w_init or _init.xavier()
    b_init = b_init or _init.constant(0.0)
    cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def w_for(c_in: int) -> Shape:
        return (*kernel, c_in // groups, num_output)

    def init(key, in_shape):
        c_in = _channels(in_shape, "Conv2D")
        if c_in % groups:
            raise ValueError(f"Conv2D: groups={groups} does not divide C_in={c_in}")
        w_shape = w_for(c_in)
        out_shape = _conv.conv_output_shape(in_shape, w_shape, **cfg)
        params = _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias, param_dtype)
        return out_shape, params, {}

    def apply(params, state, x, *, key=None, train=False):
        _check_conv_params(
            params, x, w_for, lambda w: w[2] * groups, "(KH, KW, C_in/groups, C_out)", "Conv2D"
        )
        _check_bias(params, bias, num_output, "Conv2D")
        return _conv.conv2d(x, params["w"], params.get("b"), impl=impl, **cfg), state

    mults = _mults(("w", "b") if bias else ("w",), lr_mult, decay_mult, "Conv2D")
    return Layer(init, apply, name=name, kind="conv2d", mults=mults)


@_configured
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
    param_dtype=jnp.float32,
    name: str | None = None,
) -> Layer:
    """Caffe's Deconvolution layer: :func:`fnlayers.conv_transpose2d` with weight
    ``(KH, KW, num_output//groups, C_in)`` and bias ``(num_output,)``.

    For FCN-style upsampling by a factor F use ``kernel_size=2F - F % 2, stride=F,
    padding=ceil((F - 1) / 2), groups=C, w_init=init.bilinear(), bias=False``.
    ``param_dtype``: as for :func:`Conv2D`.
    """
    kernel = as_pair(kernel_size, fn="Deconv2D", name="kernel_size", minimum=1)
    _check_num_output(num_output, "Deconv2D")
    param_dtype = _param_dtype(param_dtype, "Deconv2D")
    check_positive_int(groups, fn="Deconv2D", name="groups")
    if num_output % groups:
        raise ValueError(f"Deconv2D: groups={groups} does not divide num_output={num_output}")
    w_init = w_init or _init.xavier()
    b_init = b_init or _init.constant(0.0)
    cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def w_for(c_in: int) -> Shape:
        return (*kernel, num_output // groups, c_in)

    def init(key, in_shape):
        w_shape = w_for(_channels(in_shape, "Deconv2D"))
        out_shape = _conv.conv_transpose_output_shape(in_shape, w_shape, **cfg)
        params = _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias, param_dtype)
        return out_shape, params, {}

    def apply(params, state, x, *, key=None, train=False):
        layout = "(KH, KW, C_out/groups, C_in)"
        _check_conv_params(params, x, w_for, lambda w: w[3], layout, "Deconv2D")
        _check_bias(params, bias, num_output, "Deconv2D")
        return _conv.conv_transpose2d(x, params["w"], params.get("b"), **cfg), state

    mults = _mults(("w", "b") if bias else ("w",), lr_mult, decay_mult, "Deconv2D")
    return Layer(init, apply, name=name, kind="deconv2d", mults=mults)


@_configured
def Dense(
    num_output: int,
    *,
    bias: bool = True,
    w_init=None,
    b_init=None,
    lr_mult=1.0,
    decay_mult=1.0,
    param_dtype=jnp.float32,
    name: str | None = None,
) -> Layer:
    """Caffe's InnerProduct layer: :func:`fnlayers.dense`, weight ``(K, num_output)`` where K is
    the product of the input's trailing axes, bias ``(num_output,)``. ``param_dtype``: as for
    :func:`Conv2D`."""
    _check_num_output(num_output, "Dense")
    param_dtype = _param_dtype(param_dtype, "Dense")
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
        params = _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias, param_dtype)
        return out_shape, params, {}

    def apply(params, state, x, *, key=None, train=False):
        if jnp.ndim(x) >= 2:  # else the op reports the rank
            k = math.prod(jnp.shape(x)[1:])
            context = f" (K, C_out) for an input of shape {jnp.shape(x)} (K = {k} features)"
            _check_param(params, "w", (k, num_output), "Dense", context)
        _check_bias(params, bias, num_output, "Dense")
        return _linear.dense(x, params["w"], params.get("b")), state

    mults = _mults(("w", "b") if bias else ("w",), lr_mult, decay_mult, "Dense")
    return Layer(init, apply, name=name, kind="dense", mults=mults)


@_configured
def Flatten(*, name: str | None = None) -> Layer:
    """:func:`fnlayers.flatten`: ``(N, ...) -> (N, prod(...))``."""

    def init(key, in_shape):
        return (in_shape[0], math.prod(in_shape[1:])), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return _linear.flatten(x), state

    return Layer(init, apply, name=name, kind="flatten")


# ----------------------------------------------------------------------------- helpers


def _channels(in_shape, where) -> int:
    if len(in_shape) != 4:
        raise ValueError(f"{where}: input shape {tuple(in_shape)} must be NHWC (rank 4)")
    return int(in_shape[-1])


def _check_num_output(num_output, where):
    check_positive_int(num_output, fn=where, name="num_output")


def _weight_and_bias(key, w_shape, num_output, w_init, b_init, bias, dtype):
    kw, kb = jax.random.split(key)
    params = {"w": w_init(kw, w_shape, dtype)}
    if bias:
        params["b"] = b_init(kb, (num_output,), dtype)
    return params


def _param_dtype(value, where):
    """A layer's ``param_dtype`` as a floating NumPy dtype."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: param_dtype={value!r} must be a floating dtype such as jnp.float32 or "
            "jnp.bfloat16"
        )
    return dtype


def _traced_shape(fn, in_shape):
    """``fn``'s output shape (or tuple of shapes) for ``in_shape``, a shape or a tuple of
    shapes; a batch of -1 is traced as 1 and restored."""
    shapes = jax.tree.leaves(in_shape, is_leaf=_is_shape)
    unknown_batch = any(s and s[0] == -1 for s in shapes)
    placeholders = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(tuple(1 if d == -1 else d for d in s), jnp.float32),
        in_shape,
        is_leaf=_is_shape,
    )
    out = jax.eval_shape(fn, placeholders)
    return jax.tree.map(
        lambda o: (-1, *o.shape[1:]) if unknown_batch and o.shape else tuple(o.shape), out
    )


def _is_shape(s) -> bool:
    return isinstance(s, tuple | list) and all(isinstance(d, numbers.Integral) for d in s)


# ----------------------------------------------------------------------------- building blocks
# Pooling, normalization, dropout and activations (docs/caffe-semantics.md §3-§7). Every init works
# out the output shape from the input shape alone (the batch may be -1) and never runs the op.


@_configured
def MaxPool(
    window, *, stride=1, padding=0, rounding: str = "ceil", name: str | None = None
) -> Layer:
    """Caffe's MAX Pooling layer: :func:`fnlayers.max_pool`, ``(N, H, W, C) -> (N, OH, OW, C)``
    with Caffe's output size (:func:`fnlayers.pool_output_size`). No params, no state."""
    return _pool_layer(
        _pooling.max_pool, "MaxPool", "max_pool", window, stride, padding, rounding, name
    )


@_configured
def AvgPool(
    window, *, stride=1, padding=0, rounding: str = "ceil", name: str | None = None
) -> Layer:
    """Caffe's AVE Pooling layer: :func:`fnlayers.avg_pool` (divisor counts the padding, not
    the ceil overhang), ``(N, H, W, C) -> (N, OH, OW, C)``. No params, no state."""
    return _pool_layer(
        _pooling.avg_pool, "AvgPool", "avg_pool", window, stride, padding, rounding, name
    )


@_configured
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


@_configured
def GlobalAvgPool(*, name: str | None = None) -> Layer:
    """:func:`fnlayers.global_avg_pool`: ``(N, H, W, C) -> (N, 1, 1, C)``, the spatial mean."""
    return _global_pool_layer(_pooling.global_avg_pool, "GlobalAvgPool", "global_avg_pool", name)


@_configured
def GlobalMaxPool(*, name: str | None = None) -> Layer:
    """:func:`fnlayers.global_max_pool`: ``(N, H, W, C) -> (N, 1, 1, C)``, the spatial max."""
    return _global_pool_layer(_pooling.global_max_pool, "GlobalMaxPool", "global_max_pool", name)


@_configured
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
    _norm.check_lrn_args(size, alpha, beta, k, region, fn="LRN")
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


@_configured
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
    param_dtype=jnp.float32,
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
    ``pmap``/``shard_map`` axis. ``param_dtype``: the dtype of ``scale`` and ``shift`` (as for
    :func:`Conv2D`); the state is float32 whatever it is: ``mean_acc`` sums about
    ``1 / (1 - momentum)`` batch means, and a bfloat16 sum that large would stop taking them in.
    """
    _norm.check_batch_norm_args(momentum, eps, fn="BatchNorm")
    param_dtype = _param_dtype(param_dtype, "BatchNorm")
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
                "scale": scale_init(k_scale, (c,), param_dtype),
                "shift": shift_init(k_shift, (c,), param_dtype),
            }
        return tuple(in_shape), params, _norm.batch_norm_state(c)

    def apply(params, state, x, *, key=None, train=False):
        if affine and jnp.ndim(x) >= 2:  # else the op reports the rank
            _check_per_channel(params, ("scale", "shift"), x, "BatchNorm")
        y, state = _norm.batch_norm(x, state, train=train, **cfg)
        if affine:
            # In the accumulation dtype: the gradients of scale and shift sum over every
            # position of a channel, and the transposes of these broadcasts are those sums.
            acc = _checks.acc_dtype(y.dtype)
            shape = (1,) * (y.ndim - 1) + (y.shape[-1],)
            scale = params["scale"].astype(acc).reshape(shape)
            shift = params["shift"].astype(acc).reshape(shape)
            y = (y.astype(acc) * scale + shift).astype(y.dtype)
        return y, state

    mults = _mults(("scale", "shift") if affine else (), lr_mult, decay_mult, "BatchNorm")
    return Layer(init, apply, name=name, kind="batch_norm", mults=mults)


@_configured
def Dropout(rate: float = 0.5, *, name: str | None = None) -> Layer:
    """Caffe's Dropout layer: :func:`fnlayers.dropout`. ``rate`` is the **drop** probability
    (Caffe's ``dropout_ratio``, default 0.5); kept units are scaled by ``1/(1 - rate)`` at train
    time, identity at test time. Needs ``key`` when ``train=True``."""
    check_real(rate, fn="Dropout", name="rate")
    if not 0 <= rate < 1:
        raise ValueError(f"Dropout: rate={rate!r} is the drop probability and must be in [0, 1)")

    def init(key, in_shape):
        return tuple(in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        if train and key is None:
            raise missing_key_error("Dropout")
        return _dropout.dropout(x, rate, key=key, train=train), state

    return Layer(init, apply, name=name, kind="dropout", needs_key=True)


@_configured
def ReLU(negative_slope: float = 0.0, *, name: str | None = None) -> Layer:
    """Caffe's ReLU layer: :func:`fnlayers.relu` (leaky when ``negative_slope`` is set)."""
    return _elementwise(lambda x: _act.relu(x, negative_slope), "relu", name)


@_configured
def PReLU(
    *,
    channel_shared: bool = False,
    alpha_init=None,
    lr_mult=1.0,
    decay_mult=1.0,
    param_dtype=jnp.float32,
    name: str | None = None,
) -> Layer:
    """Caffe's PReLU layer: :func:`fnlayers.prelu` with a learned slope, params ``{"alpha": (C,)}``
    (or ``()`` when ``channel_shared``), initialised to 0.25 (Caffe's default filler), in
    ``param_dtype`` (as for :func:`Conv2D`)."""
    alpha_init = alpha_init or _init.constant(0.25)
    param_dtype = _param_dtype(param_dtype, "PReLU")

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ValueError("PReLU: input shape () has no channel axis")
        shape = () if channel_shared else (int(in_shape[-1]),)
        return tuple(in_shape), {"alpha": alpha_init(key, shape, param_dtype)}, {}

    def apply(params, state, x, *, key=None, train=False):
        if jnp.ndim(x) >= 1:
            _check_per_channel(params, ("alpha",), x, "PReLU", shared=channel_shared)
        return _act.prelu(x, params["alpha"].astype(x.dtype)), state

    mults = _mults(("alpha",), lr_mult, decay_mult, "PReLU")
    return Layer(init, apply, name=name, kind="prelu", mults=mults)


@_configured
def ELU(alpha: float = 1.0, *, name: str | None = None) -> Layer:
    """Caffe's ELU layer: :func:`fnlayers.elu`."""
    return _elementwise(lambda x: _act.elu(x, alpha), "elu", name)


@_configured
def Sigmoid(*, name: str | None = None) -> Layer:
    """Caffe's Sigmoid layer: :func:`fnlayers.sigmoid`."""
    return _elementwise(_act.sigmoid, "sigmoid", name)


@_configured
def Tanh(*, name: str | None = None) -> Layer:
    """Caffe's TanH layer: :func:`fnlayers.tanh`."""
    return _elementwise(_act.tanh, "tanh", name)


@_configured
def Maxout(pieces: int, *, name: str | None = None) -> Layer:
    """:func:`fnlayers.maxout` (not in Caffe): ``(..., C) -> (..., C // pieces)``."""
    check_positive_int(pieces, fn="Maxout", name="pieces")

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
    if is_real(value):
        values = (float(value),) * len(names)
    elif isinstance(value, tuple | list) and all(is_real(v) for v in value):
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


def _abstract_init(layer: Layer, in_shape):
    """``layer.init`` traced abstractly: ``(out_shape, param count)``, no array materialised."""
    box = []

    def init(key):
        out_shape, params, _ = layer.init(key, in_shape)
        box.append(out_shape)
        return params

    params = jax.eval_shape(init, jax.random.key(0))
    return box[0], sum(math.prod(p.shape) for p in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- containers


def _walk(layer: Layer, path: str, params, state) -> Iterator[LayerNode]:
    yield LayerNode(path, layer, params, state)
    for name, child in layer.children:
        sub_params, sub_state = layer.child_tree(params, name), layer.child_tree(state, name)
        yield from _walk(child, child_path(path, name), sub_params, sub_state)


def _opening(on_leaf: Callable, prefix: str, method: str) -> Callable:
    """A child ``call`` for ``Container.init_with``/``apply_with`` (``method``) that opens
    containers with their own logic and hands leaf layers to ``on_leaf(path, leaf, ...)``."""

    def call(name, layer, *args, **kwargs):
        path = child_path(prefix, name)
        if layer.is_container:
            run = getattr(layer.container, method)
            return run(_opening(on_leaf, path, method), *args, **kwargs)
        return on_leaf(path, layer, *args, **kwargs)

    return call


def _init_child(name: str, layer: Layer, key, in_shape):
    return layer.init(key, in_shape)


def _apply_child(name: str, layer: Layer, params, state, x, *, key=None, train=False):
    return layer.apply(params, state, x, key=key, train=train)


def _naming(call: Callable) -> Callable:
    """``call`` with a child's ValueError/TypeError re-raised under the child's name."""

    def named(name, layer, *args, **kwargs):
        try:
            return call(name, layer, *args, **kwargs)
        except (ValueError, TypeError) as err:
            _add_path(err, name)
            raise

    return named


def _add_path(err: Exception, name: str) -> None:
    """Prefixes ``name`` to the layer path in ``err``'s message: ``"conv2d: ..."`` becomes
    ``"conv1: conv2d: ..."``, and ``"conv1: ..."`` from an inner container ``"block/conv1:
    ..."``. The path and the bare message are kept as ``err.layer_path`` and
    ``err.layer_message``."""
    if not name or not err.args or not isinstance(err.args[0], str):
        return
    inner = getattr(err, "layer_path", None)
    message = getattr(err, "layer_message", err.args[0])
    path = child_path(name, inner or "")
    err.layer_path, err.layer_message = path, message
    err.args = (f"{path}: {message}", *err.args[1:])


def _param_error(param: str, message: str) -> ValueError:
    """A ValueError about the parameter ``param`` of a leaf layer; the containers above it
    prefix their names to the path (``"conv1/w: ..."``)."""
    err = ValueError(f"{param}: {message}")
    err.layer_path, err.layer_message = param, message
    return err


def _named_children(layers: Sequence[Layer], where: str) -> tuple[tuple[str, Layer], ...]:
    """``(name, layer)`` pairs: each layer's name, or ``f"{kind}_{position}"``."""
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
    return tuple(zip(names, layers, strict=True))


def _by_part(outs: dict[str, tuple]) -> tuple[dict[str, Any], ...]:
    """``{name: (a, b, ...)}`` as ``({name: a}, {name: b}, ...)``."""
    width = len(next(iter(outs.values())))
    return tuple({nm: out[i] for nm, out in outs.items()} for i in range(width))


def _check_key(needs_key, key, train, children, where):
    if needs_key and train and key is None:
        first = next(nm for nm, layer in children if layer.needs_key)
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


def _param_mult(by_path: Mapping[str, tuple], path: str, index: int) -> float:
    """The lr (``index`` 0) or decay (1) multiplier of the parameter at ``path``
    (``"conv1/w"``), given each leaf layer's mults by layer path."""
    parts = path.split("/")
    # the longest layer path first: a layer may be named "a/b" (Caffe's "inception_3a/1x1")
    # beside a layer "a"
    for i in reversed(range(len(parts))):
        mults = by_path.get("/".join(parts[:i]))
        if mults is not None:
            return next((m[1 + index] for m in mults if m[0] == parts[i]), 1.0)
    return 1.0


def _count(params) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- repr


def _changed_arguments(signature: inspect.Signature, arguments: Mapping[str, Any]):
    """``(name, value)`` for the arguments that differ from the defaults, sub-layers and the
    layer name left out."""
    for param in signature.parameters.values():
        if param.name == "name" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name in arguments and not isinstance(arguments[param.name], Layer):
            value = arguments[param.name]
            if not _is_default(value, param.default):
                yield param.name, value


def _is_default(value, default) -> bool:
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except (TypeError, ValueError):  # arrays compare elementwise
        return False


def _describe(layer: Layer, key: str, indent: str) -> list[str]:
    """The lines of ``repr(layer)``: ``key: Constructor(config)``, children indented inside."""
    head = f"{indent}{key}: " if key else indent
    if not layer.is_container:
        return [head + _call_text(layer)]
    lines = [head + _constructor_name(layer) + "("]
    for name, child in layer.children:
        child_lines = _describe(child, name or child.name or "", indent + "  ")
        lines += [*child_lines[:-1], child_lines[-1] + ","]
    lines += [f"{indent}  {arg}={_show(value)}," for arg, value in layer.config]
    return [*lines, indent + ")"]


def _call_text(layer: Layer) -> str:
    """``"Conv2D(20, kernel_size=5)"``: the first argument bare when it is positional."""
    args = [f"{arg}={_show(value)}" for arg, value in layer.config]
    if layer.config and layer.config[0][0] == _first_positional(layer.constructor):
        args[0] = _show(layer.config[0][1])
    return f"{_constructor_name(layer)}({', '.join(args)})"


def _constructor_name(layer: Layer) -> str:
    return getattr(layer.constructor, "__name__", None) or layer.kind


@functools.cache
def _first_positional(constructor) -> str | None:
    if constructor is None:
        return None
    first = next(iter(inspect.signature(constructor).parameters.values()), None)
    return first.name if first is not None and first.kind == first.POSITIONAL_OR_KEYWORD else None


def _show(value) -> str:
    """A value as the repr shows it; a function by its name (``xavier(...)`` for one an
    ``fnlayers.init`` factory made)."""
    if not callable(value):
        return repr(value)
    qualname = getattr(value, "__qualname__", type(value).__name__)
    outer, _, inner = qualname.partition(".<locals>.")
    if inner and getattr(value, "__module__", "") == _init.__name__:
        return f"{outer}(...)"
    return qualname.rpartition(".")[2]


# ----------------------------------------------------------------------------- parameter checks
# Run by apply at trace time, on static shapes only.


def _param_shape(params, param: str, where: str) -> Shape:
    if not isinstance(params, Mapping) or param not in params:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise _param_error(param, f"{where}: parameter missing (params has {keys})")
    return tuple(jnp.shape(params[param]))


def _check_param(params, param: str, expected: Shape, where: str, context: str = "") -> None:
    """Raises a ValueError naming ``param`` unless ``params[param]`` has shape ``expected``."""
    actual = _param_shape(params, param, where)
    if actual != tuple(expected):
        raise _param_error(
            param, f"{where}: expected shape {tuple(expected)}{context}, got {actual}"
        )


def _check_conv_params(params, x, w_for, c_in_of, layout: str, where: str) -> None:
    """Checks a convolution's ``w`` (and ``b``) against its configuration and an NHWC ``x``.

    ``w_for(c_in)`` is the weight shape for ``c_in`` input channels, ``c_in_of(w_shape)`` the
    input channels a weight takes. A weight that fits the layer but takes ``x.shape[1]``
    channels means an NCHW input, reported as such.
    """
    if jnp.ndim(x) != 4:
        return  # the op reports the rank (NHWC)
    _, h, _, c_in = jnp.shape(x)
    w_shape = _param_shape(params, "w", where)
    if len(w_shape) == 4 and w_shape == w_for(c_in_of(w_shape)) and c_in_of(w_shape) == h != c_in:
        raise ValueError(
            f"{where}: input of shape {jnp.shape(x)} has {c_in} channels on its last axis but "
            f"the weights take C_in={h}: inputs are NHWC (N, H, W, C), channels last, and this "
            "one looks NCHW; transpose it with x.transpose(0, 2, 3, 1)"
        )
    context = f" {layout} for an NHWC input with C={c_in} channels on its last axis"
    _check_param(params, "w", w_for(c_in), where, context)


def _check_per_channel(params, names, x, where: str, *, shared: bool = False) -> None:
    """Checks that the parameters ``names`` are ``(C,)`` for an ``x`` with channels last
    (``()`` when ``shared``)."""
    shape = () if shared else (jnp.shape(x)[-1],)
    context = f" for an input of shape {jnp.shape(x)}, channels last"
    for param in names:
        _check_param(params, param, shape, where, context)


def _check_bias(params, bias: bool, num_output: int, where: str) -> None:
    if bias:
        _check_param(params, "b", (num_output,), where)
