"""Graph networks: directed acyclic networks of named blobs, as Caffe's prototxt writes them.

:func:`graph` wires layers by blob name: each node is ``(layer, bottoms, tops)``, and nodes run
in the order given, each reading blobs that are inputs or tops of earlier nodes. That expresses
what :func:`fnlayers.serial` and :func:`fnlayers.parallel` cannot: branches that merge again
(ResNet's shortcut, GoogLeNet's inception concat, FCN's skip connections), networks with
several inputs and several outputs, and parameters shared by name between layers (Caffe's
``param { name: "..." }``, the Siamese net). :func:`Concat` and :func:`Eltwise` are the merge
layers (Caffe's Concat and Eltwise).

Example (a residual block, ``sum = data + conv2(relu(conv1(data)))``):
    >>> import jax, fnlayers as fl
    >>> from fnlayers.graphs import Eltwise, graph
    >>> net = graph(
    ...     inputs="data",
    ...     nodes=[
    ...         (fl.Conv2D(4, 3, padding=1, name="conv1"), "data", "conv1"),
    ...         (fl.ReLU(name="relu1"), "conv1", "conv1"),  # in place
    ...         (fl.Conv2D(4, 3, padding=1, name="conv2"), "conv1", "conv2"),
    ...         (Eltwise("sum", name="add"), ("data", "conv2"), "sum"),
    ...     ],
    ... )
    >>> out_shape, params, state = net.init(jax.random.key(0), (-1, 8, 8, 4))
    >>> out_shape
    {'sum': (-1, 8, 8, 4)}
    >>> list(params)
    ['conv1', 'relu1', 'conv2', 'add']
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnlayers.layers import Container, Layer, container_layer, missing_key_error

__all__ = ["Concat", "Eltwise", "graph"]

ELTWISE_OPERATIONS = ("sum", "prod", "max")


class _Node(NamedTuple):
    name: str
    layer: Layer
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    many_bottoms: bool  # bottoms written as a tuple: the layer gets a tuple
    many_tops: bool  # tops written as a tuple: the layer returns a tuple


def graph(
    inputs,
    nodes,
    *,
    outputs=None,
    shared_params: Mapping[str, Sequence] | None = None,
    name: str | None = None,
) -> Layer:
    """A directed acyclic network of layers wired by named blobs (Caffe's ``Net``).

    Args:
      inputs: the names of the blobs the caller feeds: a str for one, or a tuple of str.
      nodes: ``(layer, bottoms, tops)`` triples, run in this order. ``bottoms`` and ``tops``
        are a blob name (str) or a tuple of names, and the layer sees them as written: a str
        bottom is passed as that array, a tuple of bottoms as a tuple of arrays (even of one);
        a str top receives whatever the layer returns, a tuple of ``n`` tops needs a layer that
        returns a tuple of ``n`` (and whose init returns ``n`` shapes). A bottom must be an
        input or a top of an earlier node. A node may rewrite a blob only in place (the blob
        also among its bottoms, ``(fl.ReLU(), "conv1", "conv1")``): later nodes read the new
        value. A blob may be read by any number of nodes (Caffe's implicit Split; the gradients
        add up). Each node's params and state live under its layer's name, or
        ``f"{kind}_{position}"`` for an unnamed layer, as in :func:`fnlayers.serial`.
      outputs: which blobs ``apply`` returns, with their final values. ``None`` (default):
        Caffe's rule, every blob that is a top of some node and read by no later node, in
        node order (an input no node reads is not among them); a tuple of names: those blobs.
        Either way ``apply`` returns a dict ``{blob: array}`` and ``init`` a dict ``{blob:
        shape}``. A str: that one blob, returned bare (an array and its shape), so the graph
        can be a stage of :func:`fnlayers.serial`.
      shared_params: ``{label: [path, path, ...]}``: parameters that are one array (Caffe's
        ``param { name: label }``). A path names a parameter leaf inside params, starting with
        a node: ``"conv1/w"`` or ``("conv1", "w")`` (``"tower/conv1/w"`` inside a nested
        container). The array is stored once, at the first path; the others are absent from
        params and read it, so the gradient with respect to it is the sum over its uses. The
        leaves must have the same shape and dtype at init.
      name: the graph's name, as a sub-tree of an enclosing container.

    Returns:
      A container :class:`fnlayers.Layer`. ``init(key, in_shape)``: ``in_shape`` is the input's
      shape for a one-input graph, else a dict ``{blob: shape}`` (or a tuple of shapes in the
      order of ``inputs``, as :func:`fnlayers.parallel` produces or :func:`fnlayers.train.fit`
      passes for tuple inputs). ``apply(params, state, x, key=None, train=False)``: ``x``
      likewise an array, a dict ``{blob: array}`` or a tuple in ``inputs`` order. The key is
      split into one per node, by position as in :func:`fnlayers.serial`; a node whose layer
      draws no random numbers gets ``key=None``.

    Raises:
      ValueError: at construction, naming the node and the blob: a bottom that is neither an
        input nor a top of an earlier node (read before it is produced), a blob rewritten
        other than in place, two nodes with the same name, an output that is no blob, a bad
        ``shared_params`` path. At init, shared leaves that are missing or disagree in shape.
      TypeError: a node that is not a ``(Layer, bottoms, tops)`` triple, blob names that are
        not str.
    """
    where = "graph" if name is None else f"graph {name!r}"
    input_names = _names(inputs, f"{where}: inputs", allow_empty=False)
    if len(set(input_names)) != len(input_names):
        raise ValueError(f"{where}: inputs={input_names!r} names a blob twice")
    graph_nodes = _parse_nodes(nodes, where)
    default_outputs = _check_wiring(input_names, graph_nodes, where)
    single = isinstance(outputs, str)
    output_names = _outputs(outputs, default_outputs, input_names, graph_nodes, where)
    groups = _parse_shared(shared_params, graph_nodes, where)
    inject = _injections(groups)
    children = tuple((n.name, n.layer) for n in graph_nodes)
    needs_key = any(n.layer.needs_key for n in graph_nodes)

    def init(call, key, in_shape):
        shapes = _feed(in_shape, input_names, where, "in_shape")
        params, state = {}, {}
        keys = jax.random.split(key, len(graph_nodes))
        for node, k in zip(graph_nodes, keys, strict=True):
            out_shape, params[node.name], state[node.name] = call(
                node.name, node.layer, k, _gather(shapes, node)
            )
            _scatter(shapes, node, out_shape, where, "init returned", "shapes")
        _store_once(params, groups, where)
        return _result(shapes, output_names, single), params, state

    def apply(call, params, state, x, *, key=None, train=False):
        if needs_key and train and key is None:
            first = next(n.name for n in graph_nodes if n.layer.needs_key)
            raise missing_key_error(f"{where} (node {first!r})")
        blobs = _feed(x, input_names, where, "x")
        keys = [None] * len(graph_nodes) if key is None else jax.random.split(key, len(graph_nodes))
        new_state = {}
        for node, k in zip(graph_nodes, keys, strict=True):
            node_params = _node_params(params, node.name, inject, where)
            node_state = _entry(state, node.name, where, "state")
            y, new_state[node.name] = call(
                node.name,
                node.layer,
                node_params,
                node_state,
                _gather(blobs, node),
                key=k if node.layer.needs_key else None,
                train=train,
            )
            _scatter(blobs, node, y, where, "returned", "arrays")
        return _result(blobs, output_names, single), new_state

    layer = container_layer("graph", children, Container(init, apply), name=name)
    config = [("inputs", input_names)]
    if outputs is not None:
        config.append(("outputs", outputs if single else output_names))
    if groups:
        config.append(("shared_params", {label: [_join(p) for p in ps] for label, ps in groups}))
    return dataclasses.replace(layer, constructor=graph, config=tuple(config))


def Concat(axis: int = -1, *, name: str | None = None) -> Layer:
    """Caffe's Concat layer: joins a tuple of arrays along ``axis``.

    ``axis=-1``, the channels of NHWC arrays, is Caffe's default ``axis: 1`` (channels of
    NCHW); ``axis=0`` concatenates along the batch. The other axes must agree. One input (a
    tuple of one, or a bare array) passes through unchanged, as in Caffe. Output shape: the
    inputs' with ``axis`` summed (-1 if an input's is unknown, -1).
    """
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"Concat: axis={axis!r} must be an int")

    def init(key, in_shape):
        shapes = _shape_tuple(in_shape, "Concat")
        ax = _axis(axis, len(shapes[0]), "Concat")
        _agree(shapes, "Concat", skip=ax)
        sizes = [s[ax] for s in shapes]
        total = -1 if -1 in sizes else sum(sizes)
        out = list(_merged(shapes))
        out[ax] = total
        return tuple(out), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        xs = _array_tuple(x)
        ax = _axis(axis, jnp.ndim(xs[0]), "Concat")
        _agree([jnp.shape(a) for a in xs], "Concat", skip=ax)
        if len(xs) == 1:
            return xs[0], state
        return jnp.concatenate(xs, axis=ax), state

    config = (("axis", axis),) if axis != -1 else ()
    return Layer(init, apply, name=name, kind="concat", constructor=Concat, config=config)


def Eltwise(operation: str = "sum", coeffs=None, *, name: str | None = None) -> Layer:
    """Caffe's Eltwise layer: an elementwise ``"sum"``, ``"prod"`` or ``"max"`` of a tuple of
    two or more arrays of one shape.

    ``"sum"`` computes ``sum_i coeffs[i] * x_i`` (``coeffs`` default all 1; ``(1, -1)`` is a
    difference); coefficients are only for ``"sum"``. ``"prod"``: the product, its gradient
    the product of the other inputs (Caffe's ``stable_prod_grad``). ``"max"``: the maximum, its
    gradient routed to the one input that holds it, ties broken as Caffe does (between the
    first two inputs the second wins, any later input only when strictly greater).
    """
    if operation not in ELTWISE_OPERATIONS:
        raise ValueError(f"Eltwise: operation={operation!r} must be one of {ELTWISE_OPERATIONS}")
    if coeffs is not None:
        if operation != "sum":
            raise ValueError(
                f"Eltwise: coeffs={coeffs!r} are only for operation='sum' (Caffe's rule), "
                f"not {operation!r}"
            )
        if not isinstance(coeffs, tuple | list) or not all(
            isinstance(c, numbers.Real) and not isinstance(c, bool) for c in coeffs
        ):
            raise TypeError(f"Eltwise: coeffs={coeffs!r} must be a tuple of numbers")
        coeffs = tuple(float(c) for c in coeffs)

    def check(n):
        if n < 2:
            raise ValueError(f"Eltwise: needs at least two inputs (a tuple of bottoms), got {n}")
        if coeffs is not None and len(coeffs) != n:
            raise ValueError(f"Eltwise: {len(coeffs)} coeffs for {n} inputs")

    def init(key, in_shape):
        shapes = _shape_tuple(in_shape, "Eltwise")
        check(len(shapes))
        _agree(shapes, "Eltwise")
        return _merged(shapes), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        xs = _array_tuple(x)
        check(len(xs))
        _agree([jnp.shape(a) for a in xs], "Eltwise")
        if operation == "sum":
            if coeffs is None:
                y = xs[0]
                for a in xs[1:]:
                    y = y + a
            else:
                y = sum((c * a for c, a in zip(coeffs[1:], xs[1:], strict=True)), coeffs[0] * xs[0])
        elif operation == "prod":
            y = xs[0]
            for a in xs[1:]:
                y = y * a
        else:
            y = jnp.where(xs[0] > xs[1], xs[0], xs[1])
            for a in xs[2:]:
                y = jnp.where(a > y, a, y)
        return y, state

    config = []
    if operation != "sum":
        config.append(("operation", operation))
    if coeffs is not None:
        config.append(("coeffs", coeffs))
    return Layer(init, apply, name=name, kind="eltwise", constructor=Eltwise, config=tuple(config))


# ----------------------------------------------------------------------------- construction


def _names(value, what: str, *, allow_empty: bool = True) -> tuple[str, ...]:
    """A blob name or tuple of names as a tuple."""
    if isinstance(value, str):
        names = (value,)
    elif isinstance(value, tuple | list):
        names = tuple(value)
    else:
        raise TypeError(f"{what}={value!r} must be a blob name (str) or a tuple of names")
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{what}={value!r}: blob names must be non-empty str")
    if not names and not allow_empty:
        raise ValueError(f"{what}: needs at least one blob name")
    return names


def _parse_nodes(nodes, where: str) -> tuple[_Node, ...]:
    if isinstance(nodes, str | Layer) or not isinstance(nodes, Sequence):
        raise TypeError(f"{where}: nodes must be a list of (layer, bottoms, tops) triples")
    if not nodes:
        raise ValueError(f"{where}: needs at least one node")
    parsed, first_index = [], {}
    for i, spec in enumerate(nodes):
        if not isinstance(spec, tuple | list) or len(spec) != 3 or not isinstance(spec[0], Layer):
            raise TypeError(
                f"{where}: node {i} is {spec!r}, not a (layer, bottoms, tops) triple with a Layer"
            )
        layer, bottoms, tops = spec
        nm = layer.name or f"{layer.kind}_{i}"
        if nm in first_index:
            raise ValueError(
                f"{where}: nodes {first_index[nm]} and {i} are both named {nm!r}; node names "
                "must be unique (give the layers distinct name=...)"
            )
        first_index[nm] = i
        bottom_names = _names(bottoms, f"{where}: node {nm!r}: bottoms", allow_empty=False)
        top_names = _names(tops, f"{where}: node {nm!r}: tops", allow_empty=False)
        if len(set(top_names)) != len(top_names):
            raise ValueError(f"{where}: node {nm!r} writes a blob twice: tops={top_names!r}")
        many_bottoms, many_tops = not isinstance(bottoms, str), not isinstance(tops, str)
        parsed.append(_Node(nm, layer, bottom_names, top_names, many_bottoms, many_tops))
    return tuple(parsed)


def _check_wiring(inputs, nodes, where: str) -> tuple[str, ...]:
    """Checks that every bottom exists when read and that blobs are rewritten only in place;
    returns Caffe's default outputs (tops whose last event is a write), in node order."""
    producer: dict[str, str | None] = dict.fromkeys(inputs)  # blob -> node name (None: input)
    last: dict[str, tuple[int, int, bool]] = {}  # blob -> (node index, top index, written)
    for i, node in enumerate(nodes):
        for b in node.bottoms:
            if b not in producer:
                later = next((n.name for n in nodes[i + 1 :] if b in n.tops), None)
                if later is not None:
                    raise ValueError(
                        f"{where}: node {node.name!r} reads blob {b!r} before node {later!r} "
                        "produces it (nodes run in the order given)"
                    )
                raise ValueError(
                    f"{where}: node {node.name!r} reads blob {b!r}, which is neither an input "
                    f"(inputs: {inputs!r}) nor a top of an earlier node"
                )
            last[b] = (i, 0, False)
        for j, t in enumerate(node.tops):
            if t in producer and t not in node.bottoms:
                source = "an input" if producer[t] is None else f"a top of node {producer[t]!r}"
                raise ValueError(
                    f"{where}: node {node.name!r} writes blob {t!r}, which is already {source}; "
                    "a node may rewrite a blob only in place, with it among its bottoms"
                )
            producer[t] = node.name
            last[t] = (i, j, True)
    written = sorted((pos[:2], b) for b, pos in last.items() if pos[2])
    return tuple(b for _, b in written)


def _outputs(outputs, default, inputs, nodes, where: str) -> tuple[str, ...]:
    if outputs is None:
        return default
    names = _names(outputs, f"{where}: outputs", allow_empty=False)
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: outputs={names!r} names a blob twice")
    blobs = set(inputs).union(*(n.tops for n in nodes))
    for b in names:
        if b not in blobs:
            raise ValueError(
                f"{where}: output blob {b!r} is neither an input nor a top of any node "
                f"(blobs: {sorted(blobs)})"
            )
    return names


def _parse_shared(shared, nodes, where: str) -> tuple[tuple[str, tuple[tuple[str, ...], ...]]]:
    """``((label, (owner path, reader path, ...)), ...)``, paths as tuples of keys."""
    if shared is None:
        return ()
    if not isinstance(shared, Mapping):
        raise TypeError(f"{where}: shared_params must be a dict {{label: [path, ...]}}")
    node_names = [n.name for n in nodes]
    seen: dict[tuple[str, ...], str] = {}
    groups = []
    for label, paths in shared.items():
        what = f"{where}: shared_params[{label!r}]"
        if isinstance(paths, str) or not isinstance(paths, Sequence) or len(paths) < 2:
            raise ValueError(f"{what} must list at least two parameter paths, got {paths!r}")
        parsed = []
        for path in paths:
            keys = _path(path, what)
            if keys[0] not in node_names:
                raise ValueError(
                    f"{what}: path {_join(keys)!r} starts with {keys[0]!r}, which is not a "
                    f"node (nodes: {node_names})"
                )
            if keys in seen:
                raise ValueError(
                    f"{what}: path {_join(keys)!r} is already shared under {seen[keys]!r}"
                )
            seen[keys] = label
            parsed.append(keys)
        groups.append((label, tuple(parsed)))
    return tuple(groups)


def _path(path, what: str) -> tuple[str, ...]:
    keys = tuple(path.split("/")) if isinstance(path, str) else path
    if (
        not isinstance(keys, tuple | list)
        or len(keys) < 2
        or not all(isinstance(k, str) and k for k in keys)
    ):
        raise ValueError(
            f"{what}: path {path!r} must name a node and a parameter inside it: "
            "'node/param' or ('node', 'param')"
        )
    return tuple(keys)


def _injections(groups) -> dict[str, list[tuple[tuple[str, ...], tuple[str, ...], str]]]:
    """``{node: [(path inside the node, owner path, label)]}`` for the readers of shared
    leaves."""
    inject: dict[str, list] = {}
    for label, (owner, *readers) in groups:
        for reader in readers:
            inject.setdefault(reader[0], []).append((reader[1:], owner, label))
    return inject


def _join(keys) -> str:
    return "/".join(keys)


# ----------------------------------------------------------------------------- running


def _is_shape(value) -> bool:
    return isinstance(value, tuple | list) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in value
    )


def _feed(value, inputs, where: str, what: str) -> dict[str, Any]:
    """The input blobs from ``value``: one item for a one-input graph, a dict keyed by input
    name, or a tuple in the order of ``inputs``."""
    if isinstance(value, Mapping):
        missing = [b for b in inputs if b not in value]
        extra = [b for b in value if b not in inputs]
        if missing or extra:
            raise ValueError(
                f"{where}: {what} has keys {list(value)}, the graph's inputs are {list(inputs)}"
            )
        return {b: value[b] for b in inputs}
    if len(inputs) == 1:
        return {inputs[0]: value}
    if isinstance(value, tuple | list) and len(value) == len(inputs) and len(inputs) > 1:
        return dict(zip(inputs, value, strict=True))
    raise ValueError(
        f"{where}: {what} must be a dict {{blob: ...}} for the inputs {list(inputs)}"
        + (f" or a tuple of {len(inputs)} in that order" if len(inputs) > 1 else "")
        + f", got {type(value).__name__}"
    )


def _gather(blobs: dict[str, Any], node: _Node):
    if node.many_bottoms:
        return tuple(blobs[b] for b in node.bottoms)
    return blobs[node.bottoms[0]]


def _scatter(blobs: dict[str, Any], node: _Node, value, where: str, verb: str, noun: str):
    if not node.many_tops:
        blobs[node.tops[0]] = value
        return
    one_shape = noun == "shapes" and _is_shape(value)
    if not isinstance(value, tuple | list) or len(value) != len(node.tops) or one_shape:
        if one_shape:
            got = f"the one shape {tuple(value)}"
        elif isinstance(value, tuple | list):
            got = f"{len(value)} values"
        else:
            got = type(value).__name__
        raise ValueError(
            f"{where}: node {node.name!r} has tops {node.tops!r}, so its layer must return a "
            f"tuple of {len(node.tops)} {noun}; its {verb} {got}"
        )
    blobs.update(zip(node.tops, value, strict=True))


def _result(blobs, outputs, single: bool):
    if single:
        return blobs[outputs[0]]
    return {b: blobs[b] for b in outputs}


def _entry(tree, nm: str, where: str, what: str):
    if not isinstance(tree, Mapping) or nm not in tree:
        keys = list(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ValueError(f"{where}: {what} has no entry for node {nm!r} (it has {keys})")
    return tree[nm]


def _node_params(params, nm: str, inject, where: str):
    """The params node ``nm`` runs with: its own, with the shared leaves it reads put in."""
    own = _entry(params, nm, where, "params")
    for sub, owner, label in inject.get(nm, ()):
        if _lookup(own, sub) is not None:
            raise ValueError(
                f"{where}: params[{nm!r}] holds {_join(sub)!r}, which shared_params[{label!r}] "
                f"stores once, under {_join(owner)!r}"
            )
        value = _lookup(params, owner)
        if value is None:
            raise ValueError(
                f"{where}: params has no {_join(owner)!r}, the stored copy of "
                f"shared_params[{label!r}]"
            )
        own = _with(own, sub, value)
    return own


def _lookup(tree, keys):
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _with(tree, keys, value):
    """A copy of the dict ``tree`` with ``value`` at ``keys`` (dicts along the path copied)."""
    head, *rest = keys
    if not rest:
        return {**tree, head: value}
    return {**tree, head: _with(tree.get(head, {}), rest, value)}


def _without(tree, keys):
    """A copy of the dict ``tree`` without the entry at ``keys`` (dicts along the path
    copied)."""
    head, *rest = keys
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _without(tree[head], rest)}


def _store_once(params, groups, where: str) -> None:
    """Checks each shared group's leaves agree, and drops all but the owner's from ``params``
    (replacing the node entries of the dict ``params``)."""
    for label, (owner, *readers) in groups:
        what = f"{where}: shared_params[{label!r}]"
        ref = _leaf(params, owner, what)
        for reader in readers:
            leaf = _leaf(params, reader, what)
            if (jnp.shape(leaf), jnp.result_type(leaf)) != (jnp.shape(ref), jnp.result_type(ref)):
                raise ValueError(
                    f"{what}: {_join(reader)!r} is {jnp.result_type(leaf)}{jnp.shape(leaf)} but "
                    f"{_join(owner)!r}, where the shared array is stored, is "
                    f"{jnp.result_type(ref)}{jnp.shape(ref)}"
                )
            params[reader[0]] = _without(params[reader[0]], reader[1:])


def _leaf(params, keys, what: str):
    parent = _lookup(params, keys[:-1])
    if not isinstance(parent, Mapping) or keys[-1] not in parent:
        has = sorted(parent) if isinstance(parent, Mapping) else None
        raise ValueError(
            f"{what}: node {keys[0]!r} has no parameter {_join(keys[1:])!r}"
            + (f" (it has {has})" if has is not None else "")
        )
    leaf = parent[keys[-1]]
    if isinstance(leaf, Mapping):
        raise ValueError(
            f"{what}: {_join(keys)!r} is a sub-tree, not a parameter; list its parameters"
        )
    return leaf


# ----------------------------------------------------------------------------- merge layers


def _shape_tuple(in_shape, where: str) -> tuple[tuple[int, ...], ...]:
    if _is_shape(in_shape):
        return (tuple(in_shape),)
    if isinstance(in_shape, tuple | list) and in_shape and all(_is_shape(s) for s in in_shape):
        return tuple(tuple(s) for s in in_shape)
    raise ValueError(f"{where}: in_shape={in_shape!r} must be a tuple of shapes")


def _array_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _axis(axis: int, rank: int, where: str) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"{where}: axis={axis} is out of range for inputs of rank {rank}")
    return axis % rank


def _agree(shapes, where: str, skip: int | None = None) -> None:
    """Raises unless the shapes have one rank and agree on every axis but ``skip`` (-1, an
    unknown batch, agrees with anything)."""
    shapes = [tuple(s) for s in shapes]
    first = shapes[0]
    for s in shapes[1:]:
        if len(s) != len(first) or any(
            i != skip and a != b and -1 not in (a, b)
            for i, (a, b) in enumerate(zip(s, first, strict=True))
        ):
            rule = "every axis" if skip is None else f"every axis but {skip}"
            raise ValueError(f"{where}: input shapes {shapes} must agree on {rule}")


def _merged(shapes) -> tuple[int, ...]:
    """The shapes' common shape, a known size preferred over -1."""
    return tuple(max(dims) if -1 in dims else dims[0] for dims in zip(*shapes, strict=True))
