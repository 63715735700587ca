"""Gradient health: per-layer gradient, parameter and activation statistics, and a report.

Everything that touches arrays is a pure function that runs inside ``jax.jit`` and returns a
dict of device scalars keyed by layer name, so a whole network is summarised by one compiled
call and one transfer, never a host round-trip per layer::

    stats = jax.jit(lambda p, s, x, y: diagnostics.gradient_stats(model, loss, p, s, x, y))(
        params, state, x, y)
    print(diagnostics.report(model, stats))          # a table, with the problems flagged

or in one call, :func:`diagnose`. :func:`fnlayers.train.fit` records the per-layer gradient
norms every ``diagnostics_every`` steps (``history`` keys ``"grad_norm/<layer>"``) and names the
layer whose gradient went non-finite first when the loss does; :func:`plot_grad_norms` draws
those records.

Layer names. A layer is named by its key path in ``params`` (:func:`fnlayers.layers.walk`):
the names :func:`fnlayers.serial` gives (``"conv1"``, ``"dense_3"``), joined with ``/`` inside
nested containers (``"block1/conv"``, as :func:`fnlayers.layer_shapes`); :func:`fnlayers.shared`
adds no level (its params are its inner layer's). Containers are always opened: statistics are
per leaf layer. Gradient and parameter statistics cover the layers that hold parameters;
activation statistics every layer, its output taken by running the containers' own apply with
the leaf layers intercepted (:func:`fnlayers.layers.apply_leaves`); a layer inside ``shared``
has one output per input, measured together.

Order. Network order is input to output. The backward pass visits layers in the reverse order,
so the report calls *first* the layer the backward pass reaches first: the one nearest the loss.
That is where a gradient that vanishes starts to vanish, and where a gradient that overflows or
turns NaN does so first (every layer before it inherits the NaN). Non-finite activations are
ordered the other way, by the forward pass. The dicts these functions build are in network
order; ``jax.jit`` hands dicts back with sorted keys, so the host side (:func:`report`,
:func:`param_layers`) takes the order from the model, never from a dict.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fnlayers import _plot
from fnlayers._checks import check_real
from fnlayers.layers import Layer, apply_leaves, walk

__all__ = [
    "GradientReport",
    "activation_stats",
    "diagnose",
    "finite",
    "grad_norms",
    "gradient_stats",
    "layer_outputs",
    "param_layers",
    "param_norms",
    "plot_grad_norms",
    "report",
]


def layer_outputs(model: Layer, params, state, x, *, key=None, train: bool = False):
    """Applies a network layer by layer and keeps every layer's output.

    Computes exactly ``model.apply(params, state, x, key=key, train=train)``: the containers
    run their own apply (:func:`fnlayers.layers.apply_leaves`), so the key splitting (one key
    per layer in order, again inside every nested container) and the state threading are
    theirs.

    Args:
      model: a container: a network built with :func:`fnlayers.serial` (or ``parallel``,
        ``shared``).
      params, state: the trees ``model.init`` returned (or trained ones).
      x: the input, e.g. ``(N, H, W, C)``.
      key: a PRNG key; required when ``train=True`` and a layer draws random numbers.
      train: passed to every layer.

    Returns:
      ``(outputs, new_state)``: ``outputs`` maps every leaf layer's name (its path: layers of
      nested containers as ``"outer/inner"``) to that layer's output, in network order; a layer
      applied to several inputs (inside :func:`fnlayers.shared`) maps to the tuple of its
      outputs, one per input. For a ``serial`` network the last value is the network's output.
      ``new_state`` is ``model.apply``'s.

    Raises:
      TypeError: ``model`` is not a Layer.
      ValueError: ``model`` is a leaf layer, not a container, or ``train=True`` needs a key
        and none was given.
    """
    _check_container(model, "layer_outputs")
    _, new_state, outputs = _record_outputs(model, params, state, x, key, train, {})
    return {path: ys[0] if len(ys) == 1 else tuple(ys) for path, ys in outputs.items()}, new_state


def param_layers(model: Layer, params) -> list[str]:
    """The names of the layers of ``model`` that hold at least one parameter, in network order.

    ``params`` is ``model``'s parameter tree (or any tree of the same structure, such as the
    gradients). These are the keys of :func:`grad_norms`, :func:`param_norms` and
    :func:`finite`.
    """
    _check_layer(model, "param_layers")
    return list(_per_layer(model, params, len))


def grad_norms(model: Layer, grads) -> dict[str, jax.Array]:
    """The L2 norm of each layer's gradient: ``sqrt(sum of g**2 over the layer's leaves)``.

    Args:
      model: the network (any Layer; containers are opened as described in the module doc).
      grads: a tree shaped like ``model``'s params, e.g. ``jax.grad(loss)(params)``.

    Returns:
      ``{layer: float32 scalar}`` for the layers with parameters, in network order. Computed
      with the largest magnitude factored out, so a finite gradient has a finite norm up to
      float32's largest value; NaN when the layer's gradient holds a NaN, inf when it holds an
      inf. Runs under ``jit``.
    """
    _check_layer(model, "grad_norms")
    return _norms(model, grads)


def param_norms(model: Layer, params) -> dict[str, jax.Array]:
    """The L2 norm of each layer's parameters, ``{layer: float32 scalar}`` (see
    :func:`grad_norms`, which computes it the same way)."""
    _check_layer(model, "param_norms")
    return _norms(model, params)


def finite(model: Layer, tree) -> dict[str, jax.Array]:
    """Whether every element of each layer's sub-tree (gradients or parameters) is finite.

    Returns:
      ``{layer: bool scalar}`` for the layers with parameters, in network order (runs under
      ``jit``).
    """
    _check_layer(model, "finite")
    return _per_layer(model, tree, _all_finite)


def activation_stats(
    model: Layer,
    params,
    state,
    x,
    *,
    key=None,
    train: bool = False,
    saturation: float = 0.01,
) -> dict[str, dict[str, jax.Array]]:
    """Statistics of every layer's output of a network (one forward pass).

    Args:
      model, params, state, x, key, train: as for :func:`layer_outputs`.
      saturation: a number in ``(0, 0.5)``: a sigmoid output within ``saturation`` of 0 or 1,
        or a tanh output within it of -1 or 1, counts as saturated (its derivative is below
        ``saturation`` of the sigmoid's maximum, ``2*saturation`` of tanh's).

    Returns:
      ``{layer: {stat: float32 scalar}}`` in network order, each over all elements of the
      layer's output (all outputs together for a layer with several): ``mean``, ``std``,
      ``zero_fraction`` (exact zeros: dead ReLUs, dropped units), ``nonfinite_fraction``, and
      for sigmoid/tanh layers ``saturated_fraction``. Runs under ``jit``.

    Raises:
      ValueError: as :func:`layer_outputs`; ``saturation`` outside ``(0, 0.5)``.
    """
    _check_container(model, "activation_stats")
    sat = _check_saturation(saturation, "activation_stats")
    kinds: dict[str, str] = {}
    _, _, outputs = _record_outputs(model, params, state, x, key, train, kinds)
    return {name: _output_stats(ys, kinds[name], sat) for name, ys in outputs.items()}


def gradient_stats(
    model: Layer,
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    state,
    x,
    y,
    *,
    key=None,
    train: bool = True,
    activations: bool = True,
    saturation: float = 0.01,
) -> dict[str, Any]:
    """Everything :func:`report` needs, from one forward and one backward pass (jit it).

    Args:
      model: the network; any Layer, a container (``serial``, ...) when ``activations``.
      loss_fn: ``loss_fn(outputs, y) -> scalar``.
      params, state, x, y: the parameters, the running state, one batch.
      key, train: as ``model.apply`` takes them (training mode by default, as a train step).
      activations: also return :func:`activation_stats`, from the same forward pass.
      saturation: see :func:`activation_stats`.

    Returns:
      A dict of device values: ``"loss"`` (scalar), and per layer with parameters
      ``"grad_norm"``, ``"param_norm"``, ``"ratio"`` (grad_norm / param_norm, inf when the
      parameters are all zero), ``"grad_finite"``, ``"param_finite"``, each ``{layer:
      scalar}``; with ``activations``, ``"activations"``: ``{layer: {stat: scalar}}`` and
      ``"output_grad_norm"``: ``{layer: scalar}``, the norm of the loss's gradient with respect
      to each layer's output (for every layer, with or without parameters: across a sigmoid
      layer it shrinks by at least 4, the bound on the sigmoid's derivative).
    """
    _check_layer(model, "gradient_stats")
    if activations:
        _check_container(model, "gradient_stats(activations=True)")
    sat = _check_saturation(saturation, "gradient_stats")
    kinds: dict[str, str] = {}
    taps = _zero_taps(model, params, state, x, key, train) if activations else {}

    def loss_with_outputs(p, taps):
        if not activations:
            return loss_fn(model.apply(p, state, x, key=key, train=train)[0], y), {}
        out, _, outputs = _record_outputs(model, p, state, x, key, train, kinds, taps)
        return loss_fn(out, y), outputs

    (loss, outputs), (grads, tap_grads) = jax.value_and_grad(
        loss_with_outputs, argnums=(0, 1), has_aux=True
    )(params, taps)
    stats = {"loss": loss, **_param_stats(model, grads, params)}
    if activations:
        stats["activations"] = {
            name: _output_stats(out, kinds[name], sat) for name, out in outputs.items()
        }
        stats["output_grad_norm"] = {
            name: _l2(jax.tree.leaves(tap_grads[name])) for name in outputs
        }
    return stats


def diagnose(
    model: Layer,
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    state,
    x,
    y,
    *,
    key=None,
    train: bool = True,
    activations: bool = True,
    saturation: float = 0.01,
    vanish_ratio: float = 0.1,
    explode_ratio: float = 10.0,
    max_norm: float | None = None,
) -> GradientReport:
    """:func:`gradient_stats` compiled (once per model, loss and setting) and run on one
    batch, then :func:`report`: one call from arrays to a :class:`GradientReport`.

    ``x`` is ``(N, ...)`` as ``model`` takes it, ``y`` what ``loss_fn`` takes. The thresholds
    are :func:`report`'s. The compilation is cached on the identity of ``model`` and
    ``loss_fn``: pass the same objects (not a new lambda each call) to reuse it.
    """
    _check_layer(model, "diagnose")
    stats = _gradient_stats_jit(
        model,
        loss_fn,
        params,
        state,
        x,
        y,
        key=key,
        train=train,
        activations=activations,
        saturation=saturation,
    )
    return report(
        model, stats, vanish_ratio=vanish_ratio, explode_ratio=explode_ratio, max_norm=max_norm
    )


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """Per-layer gradient health on the host, with the problems flagged; ``str()`` is a table.

    Attributes:
      layers: every layer in network order (the table's rows): layers with parameters and,
        when activations were measured, every layer with an output.
      param_layers: the layers with parameters, in network order.
      grad_norm, param_norm, ratio: ``{layer: float}`` for ``param_layers``.
      grad_finite, param_finite: ``{layer: bool}`` for ``param_layers``.
      activations: ``{layer: {stat: float}}`` (empty when not measured).
      output_grad_norm: ``{layer: float}``, the norm of the loss's gradient with respect to
        each layer's output (empty when activations were not measured).
      loss: the batch loss, or None.
      vanishing: the layers whose gradient norm is below ``vanish_ratio`` times that of the
        next layer with parameters, in backward order (the first is the one nearest the loss).
      exploding: the layers whose gradient norm is above ``explode_ratio`` times the next
        layer's, or above ``max_norm``, or not finite, in backward order.
      nonfinite_grads: the layers whose gradient holds NaN or inf, in backward order.
      nonfinite_params: the layers whose parameters hold NaN or inf, in network order.
      nonfinite_outputs: the layers whose output holds NaN or inf, in network order.
      vanish_ratio, explode_ratio, max_norm: the thresholds used.
    """

    layers: tuple[str, ...]
    param_layers: tuple[str, ...]
    grad_norm: dict[str, float]
    param_norm: dict[str, float]
    ratio: dict[str, float]
    grad_finite: dict[str, bool]
    param_finite: dict[str, bool]
    activations: dict[str, dict[str, float]]
    output_grad_norm: dict[str, float]
    loss: float | None
    vanishing: tuple[str, ...]
    exploding: tuple[str, ...]
    nonfinite_grads: tuple[str, ...]
    nonfinite_params: tuple[str, ...]
    nonfinite_outputs: tuple[str, ...]
    vanish_ratio: float
    explode_ratio: float
    max_norm: float | None = None

    @property
    def first_vanishing(self) -> str | None:
        """The first layer (from the loss) where the gradient vanishes, or None."""
        return self.vanishing[0] if self.vanishing else None

    @property
    def first_exploding(self) -> str | None:
        """The first layer (from the loss) where the gradient explodes or is non-finite."""
        return self.exploding[0] if self.exploding else None

    @property
    def first_nonfinite(self) -> str | None:
        """The first layer (from the loss) whose gradient is NaN or inf, or None."""
        return self.nonfinite_grads[0] if self.nonfinite_grads else None

    @property
    def healthy(self) -> bool:
        """No layer vanishing, exploding or non-finite anywhere."""
        return not (
            self.vanishing or self.exploding or self.nonfinite_params or self.nonfinite_outputs
        )

    def factors(self) -> dict[str, float]:
        """``{layer: grad_norm[next layer] / grad_norm[layer]}`` for consecutive layers with
        parameters: how much the gradient norm shrinks (> 1) or grows (< 1) from each layer to
        the one before it."""
        out = {}
        names = self.param_layers
        for lower, upper in itertools.pairwise(names):
            g, g_next = self.grad_norm[lower], self.grad_norm[upper]
            out[lower] = g_next / g if g > 0 else math.inf
        return out

    def __str__(self) -> str:
        columns = ["layer", "grad_norm", "param_norm", "grad/param"]
        if self.activations:
            columns += ["out_grad", "out_mean", "out_std", "zeros", "saturated"]
        columns.append("flags")
        rows = []
        for name in self.layers:
            row = [name]
            if name in self.grad_norm:
                row += [
                    _fmt(self.grad_norm[name]),
                    _fmt(self.param_norm[name]),
                    _fmt(self.ratio[name]),
                ]
            else:
                row += ["", "", ""]
            if self.activations:
                act = self.activations.get(name, {})
                row += [
                    _fmt(self.output_grad_norm[name]) if name in self.output_grad_norm else "",
                    _fmt(act["mean"], "{:.3g}") if act else "",
                    _fmt(act["std"], "{:.3g}") if act else "",
                    _fmt(act["zero_fraction"], "{:.0%}") if act else "",
                    _fmt(act["saturated_fraction"], "{:.0%}")
                    if "saturated_fraction" in act
                    else "",
                ]
            row.append(", ".join(self._flags(name)))
            rows.append(row)
        widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
        last = len(columns) - 1
        lines = [
            "  ".join(
                _pad(c, w, i in (0, last)) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            for r in [columns, *rows]
        ]
        lines += self._summary()
        return "\n".join(lines)

    def _flags(self, name) -> list[str]:
        flags = []
        if name in self.nonfinite_params:
            flags.append("params non-finite")
        if name in self.nonfinite_outputs:
            flags.append("output non-finite")
        if name in self.nonfinite_grads:
            flags.append("grad non-finite")
        elif name in self.exploding:
            flags.append("exploding")
        if name in self.vanishing:
            flags.append("vanishing")
        return flags

    def _summary(self) -> list[str]:
        lines = []
        if self.loss is not None:
            lines.append(f"loss: {_fmt(self.loss, '{:.6g}')}")
        factors = self.factors()
        finite_factors = [f for f in factors.values() if 0 < f < math.inf]
        if finite_factors:
            geo = math.exp(sum(math.log(f) for f in finite_factors) / len(finite_factors))
            lines.append(
                f"gradient norm shrinks by {geo:.3g}x per layer with parameters towards the "
                "input (geometric mean)"
            )
        lines.append(self._describe("vanishing", self.vanishing, f"< {self.vanish_ratio:g}x"))
        bound = f"> {self.explode_ratio:g}x the next layer's"
        if self.max_norm is not None:
            bound += f" or > {self.max_norm:g}"
        lines.append(self._describe("exploding", self.exploding, f"{bound}, or non-finite"))
        if self.nonfinite_params:
            lines.append(f"non-finite parameters in: {', '.join(self.nonfinite_params)}")
        if self.nonfinite_outputs:
            lines.append(f"first non-finite output (forward order): {self.nonfinite_outputs[0]!r}")
        return lines

    def _describe(self, what, names, rule) -> str:
        if not names:
            return f"{what}: none (rule: gradient norm {rule})"
        first = names[0]
        detail = f"grad_norm {_fmt(self.grad_norm[first])}"
        nxt = _next_layer(self.param_layers, first)
        if nxt is not None:
            detail += f" vs {_fmt(self.grad_norm[nxt])} at {nxt!r}"
        return (
            f"{what}: first at {first!r} (from the loss; {detail}); "
            f"{len(names)} layer(s) flagged (rule: gradient norm {rule})"
        )


def report(
    model: Layer,
    stats: Mapping[str, Any],
    *,
    vanish_ratio: float = 0.1,
    explode_ratio: float = 10.0,
    max_norm: float | None = None,
) -> GradientReport:
    """Turns :func:`gradient_stats` into a :class:`GradientReport` (one device-to-host copy).

    Comparisons run between consecutive layers with parameters, ``lower`` before ``upper`` in
    network order, so that the backward pass goes from ``upper`` to ``lower``:

    - vanishing at ``lower``: ``grad_norm[lower] < vanish_ratio * grad_norm[upper]``;
    - exploding at ``lower``: ``grad_norm[lower] > explode_ratio * grad_norm[upper]``; and at
      any layer whose gradient norm exceeds ``max_norm`` (when given) or is not finite.

    Layers of very different sizes or kinds (a convolution and a classifier, a weight matrix
    and a batch norm's scale and shift) have gradient norms of different scales even in a
    healthy network: read the flags of such pairs with care.

    Args:
      model: the network the stats were computed for (it gives the layer order).
      stats: the dict :func:`gradient_stats` returned (device or host values).
      vanish_ratio: in ``(0, 1)``.
      explode_ratio: > 1.
      max_norm: None, or a positive number.

    Raises:
      ValueError: a threshold out of range; ``stats`` lacks ``"grad_norm"``.
    """
    _check_layer(model, "report")
    vanish = check_real(vanish_ratio, fn="report", name="vanish_ratio")
    if not 0 < vanish < 1:
        raise ValueError(f"report: vanish_ratio={vanish_ratio!r} must be in (0, 1)")
    explode = check_real(explode_ratio, fn="report", name="explode_ratio")
    if not explode > 1:
        raise ValueError(f"report: explode_ratio={explode_ratio!r} must be > 1")
    if max_norm is not None:
        max_norm = check_real(max_norm, fn="report", name="max_norm")
        if not max_norm > 0:
            raise ValueError(f"report: max_norm={max_norm!r} must be > 0")
    if not isinstance(stats, Mapping) or "grad_norm" not in stats:
        raise ValueError(
            "report: stats must be the dict gradient_stats returned (with a 'grad_norm' entry), "
            f"got {type(stats).__name__}"
            + (f" with keys {sorted(stats)}" if isinstance(stats, Mapping) else "")
        )
    host = jax.device_get(dict(stats))
    order = _layer_order(model)
    rank = {name: i for i, name in enumerate(order)}

    def ordered(d):
        return sorted(d, key=lambda name: rank.get(name, len(rank)))

    grad = {k: float(host["grad_norm"][k]) for k in ordered(host["grad_norm"])}
    names = tuple(grad)
    param = {k: float(host.get("param_norm", {}).get(k, math.nan)) for k in names}
    ratio = {k: float(host.get("ratio", {}).get(k, math.nan)) for k in names}
    g_finite = {k: bool(host.get("grad_finite", {}).get(k, math.isfinite(grad[k]))) for k in names}
    p_finite = {k: bool(host.get("param_finite", {}).get(k, True)) for k in names}
    acts = {
        k: {s: float(v) for s, v in host["activations"][k].items()}
        for k in ordered(host.get("activations", {}))
    }
    out_grad = {
        k: float(host["output_grad_norm"][k]) for k in ordered(host.get("output_grad_norm", {}))
    }

    vanishing, exploding = [], []
    for i in reversed(range(len(names))):
        lower, g = names[i], grad[names[i]]
        upper = names[i + 1] if i + 1 < len(names) else None
        g_up = grad[upper] if upper is not None else math.nan
        comparable = upper is not None and math.isfinite(g) and math.isfinite(g_up)
        if not g_finite[lower] or not math.isfinite(g):
            exploding.append(lower)
        elif (comparable and g > explode * g_up) or (max_norm is not None and g > max_norm):
            exploding.append(lower)
        if comparable and g < vanish * g_up:
            vanishing.append(lower)

    rows = ordered(set(names) | set(acts))
    loss = host.get("loss")
    return GradientReport(
        layers=tuple(rows),
        param_layers=names,
        grad_norm=grad,
        param_norm=param,
        ratio=ratio,
        grad_finite=g_finite,
        param_finite=p_finite,
        activations=acts,
        output_grad_norm=out_grad,
        loss=None if loss is None else float(loss),
        vanishing=tuple(vanishing),
        exploding=tuple(exploding),
        nonfinite_grads=tuple(k for k in reversed(names) if not g_finite[k]),
        nonfinite_params=tuple(k for k in names if not p_finite[k]),
        nonfinite_outputs=tuple(k for k, a in acts.items() if a.get("nonfinite_fraction", 0) > 0),
        vanish_ratio=vanish,
        explode_ratio=explode,
        max_norm=max_norm,
    )


def plot_grad_norms(
    history,
    path,
    *,
    layers=None,
    title: str = "",
    prefix: str = "grad_norm/",
) -> list[str]:
    """Saves a PNG of per-layer gradient norms over training (log scale, one line per layer,
    coloured from input to output). Needs matplotlib (the ``examples`` extra), imported here.

    Args:
      history: a :class:`fnlayers.train.History` (anything with ``records``) or a list of
        record dicts, with ``"iteration"`` and ``prefix + layer`` entries, as
        ``fit(..., diagnostics_every=N)`` writes them.
      path: where to write the PNG.
      layers: the layers to draw, in order; default every layer found, in record order.
      title: the figure title.
      prefix: the record key prefix to read (``"grad_norm/"``).

    Returns:
      The layers drawn.

    Raises:
      ValueError: no record holds a ``prefix`` entry.
    """
    records = getattr(history, "records", history)
    found: list[str] = []
    for r in records:
        found += [
            k[len(prefix) :] for k in r if k.startswith(prefix) and k[len(prefix) :] not in found
        ]
    names = list(layers) if layers is not None else found
    if not names:
        raise ValueError(f"plot_grad_norms: no record has an entry starting with {prefix!r}")
    plt = _plot.pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        rows = [r for r in records if prefix + name in r]
        its = [r["iteration"] for r in rows]
        vals = [float(r[prefix + name]) for r in rows]
        vals = [v if math.isfinite(v) and v > 0 else math.nan for v in vals]
        ax.plot(its, vals, color=cmap(i / max(1, len(names) - 1)), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(names) > 6 else 1)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return names


# ----------------------------------------------------------------------------- helpers

_gradient_stats_jit = jax.jit(
    gradient_stats, static_argnames=("model", "loss_fn", "train", "activations", "saturation")
)


def _recorder(outputs: dict[str, list], kinds: dict[str, str], taps=None) -> Callable:
    """An ``on_leaf`` for :func:`fnlayers.layers.apply_leaves` that applies each leaf layer and
    appends its output to ``outputs[path]`` (one entry per call: a layer inside ``shared`` is
    called once per input). ``taps`` (optional, ``{path: [zeros like each output]}``) are added
    to the outputs."""

    def record(path, layer, params, state, x, *, key=None, train=False):
        y, new_state = layer.apply(params, state, x, key=key, train=train)
        calls = outputs.setdefault(path, [])
        if taps is not None:
            y = jax.tree.map(jnp.add, y, taps[path][len(calls)])
        calls.append(y)
        kinds[path] = layer.kind
        return y, new_state

    return record


def _record_outputs(model, params, state, x, key, train, kinds, taps=None):
    """``(y, new_state, {path: [output per call]})``: ``model.apply`` with every leaf layer's
    output kept."""
    outputs: dict[str, list] = {}
    record = _recorder(outputs, kinds, taps)
    y, new_state = apply_leaves(model, record, params, state, x, key=key, train=train)
    return y, new_state, outputs


def _zero_taps(model, params, state, x, key, train) -> dict[str, list]:
    """Zeros like every leaf layer's outputs, ``{path: [one per call]}``: added to the outputs,
    their gradient is dL/d(output), the signal the backward pass carries through each layer."""
    shapes = jax.eval_shape(
        lambda p: _record_outputs(model, p, state, x, key, train, {})[2], params
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _param_stats(model, grads, params) -> dict[str, dict[str, jax.Array]]:
    """The per-layer gradient and parameter entries of :func:`gradient_stats`."""
    g_norm, p_norm = _norms(model, grads), _norms(model, params)
    ratio = {
        name: jnp.where(p_norm[name] > 0, g_norm[name] / p_norm[name], jnp.inf) for name in g_norm
    }
    return {
        "grad_norm": g_norm,
        "param_norm": p_norm,
        "ratio": ratio,
        "grad_finite": finite(model, grads),
        "param_finite": finite(model, params),
    }


def _layer_order(model) -> list[str]:
    """Every name a statistic can carry (the leaf layers), in network order."""
    return [n.label for n in walk(model) if not n.layer.is_container]


def _norms(model, tree) -> dict[str, jax.Array]:
    return _per_layer(model, tree, _l2)


def _per_layer(model, tree, fn: Callable[[list], Any]) -> dict[str, Any]:
    """``{layer: fn(leaves of its sub-tree)}`` for the leaf layers whose sub-tree of ``tree``
    (shaped like the params) has leaves, in network order."""
    leaves = (n for n in walk(model, tree) if not n.layer.is_container)
    groups = ((n.label, jax.tree.leaves(n.params)) for n in leaves)
    return {name: fn(leaves) for name, leaves in groups if leaves}


def _l2(leaves) -> jax.Array:
    # sqrt(sum g^2) overflows float32 once |g| passes ~1e19, well before the gradient itself
    # does; factoring out the largest magnitude keeps exploding gradients measurable.
    leaves = [jnp.asarray(a).astype(jnp.float32) for a in leaves]
    big = jnp.max(jnp.stack([jnp.max(jnp.abs(a)) if a.size else jnp.float32(0) for a in leaves]))
    safe = jnp.where((big > 0) & jnp.isfinite(big), big, jnp.float32(1))
    sumsq = sum(jnp.sum(jnp.square(a / safe)) for a in leaves)
    return jnp.where((big > 0) & jnp.isfinite(big), safe * jnp.sqrt(sumsq), big)


def _all_finite(leaves) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(a)) for a in leaves]
    return jnp.all(jnp.stack(flags))


def _output_stats(y, kind, saturation) -> dict[str, jax.Array]:
    parts = [jnp.ravel(a).astype(jnp.float32) for a in jax.tree.leaves(y)]
    v = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    stats = {
        "mean": jnp.mean(v),
        "std": jnp.std(v),
        "zero_fraction": jnp.mean((v == 0).astype(jnp.float32)),
        "nonfinite_fraction": jnp.mean((~jnp.isfinite(v)).astype(jnp.float32)),
    }
    if kind == "sigmoid":
        stats["saturated_fraction"] = jnp.mean(
            ((v < saturation) | (v > 1 - saturation)).astype(jnp.float32)
        )
    elif kind == "tanh":
        stats["saturated_fraction"] = jnp.mean((jnp.abs(v) > 1 - saturation).astype(jnp.float32))
    return stats


def _check_layer(model, fn):
    if not isinstance(model, Layer):
        raise TypeError(f"{fn}: model must be a fnlayers Layer, got {type(model).__name__}")


def _check_container(model, fn):
    _check_layer(model, fn)
    if not model.is_container:
        raise ValueError(
            f"{fn}: model must be a serial network or another container of layers, got the "
            f"leaf layer {model!r}; wrap it: fnlayers.serial(model)"
        )


def _check_saturation(saturation, fn) -> float:
    value = check_real(saturation, fn=fn, name="saturation")
    if not 0 < value < 0.5:
        raise ValueError(f"{fn}: saturation={saturation!r} must be in (0, 0.5)")
    return value


def _next_layer(names, name):
    i = names.index(name)
    return names[i + 1] if i + 1 < len(names) else None


def _fmt(value, spec="{:.3g}") -> str:
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if spec == "{:.3g}" and value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.2e}"
    return spec.format(value)


def _pad(text, width, left) -> str:
    return text.ljust(width) if left else text.rjust(width)
