"""``load_solver``: a Caffe solver prototxt (``SolverParameter``) as a :class:`CaffeSolver`,
which builds the fnlayers optimizer and learning-rate schedule it describes and holds the
training loop's settings.

Every field of BVLC Caffe's ``SolverParameter`` (caffe.proto, commit 9b89154) is read with
Caffe's default when the file leaves it out, except those Caffe needs and has no usable default
for (``base_lr``, ``lr_policy`` and the policy's own hyperparameters): their absence is a
ValueError. The deprecated ``solver_type`` enum is upgraded to ``type`` as Caffe's
``UpgradeSolverType`` does, and a missing ``snapshot_prefix`` becomes the solver file's path
without its extension (``UpgradeSnapshotPrefixProperty``). A field that ``SolverParameter``
does not have is a warning, not an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from collections.abc import Callable
from typing import Any

from fnlayers import optim, schedules
from fnlayers.caffe.prototxt import Ident, first, parse, to_text
from fnlayers.optim.mults import Mults

__all__ = ["CaffeSolver", "NetState", "TestNet", "load_solver"]


@dataclasses.dataclass(frozen=True)
class NetState:
    """Caffe's ``NetState``: what a net's layer ``include``/``exclude`` rules are checked
    against.

    Attributes:
      phase: ``"train"`` or ``"test"``.
      level: an int (Caffe's default 0).
      stages: the stage names.
    """

    phase: str = "test"
    level: int = 0
    stages: tuple[str, ...] = ()

    def load_net_args(self) -> dict:
        """``{"phase", "stages", "level"}``, the keyword arguments of
        :func:`fnlayers.caffe.load_net`."""
        return {"phase": self.phase, "stages": self.stages, "level": self.level}


@dataclasses.dataclass(frozen=True)
class TestNet:
    """One test net of a solver, in the order Caffe's ``Solver::InitTestNets`` builds them.

    Attributes:
      prototxt: a path (relative to the current directory, as Caffe reads it) or the text of an
        inline ``NetParameter``; :func:`fnlayers.caffe.load_net` takes either.
      test_iter: the number of batches one test pass runs.
      state: its :class:`NetState` (phase ``"test"`` unless ``test_state`` says otherwise).
      source: where it came from, Caffe's words: ``"test_net_param"``, ``"test_net file: P"``,
        ``"net_param"`` or ``"net file: P"``.
    """

    __test__ = False  # not a pytest test class

    prototxt: str
    test_iter: int
    state: NetState
    source: str


@dataclasses.dataclass(frozen=True)
class CaffeSolver:
    """A Caffe ``SolverParameter``, every field under its Caffe name with Caffe's default.

    Nets (exactly one train net: ``net``, ``net_param``, ``train_net`` or ``train_net_param``;
    paths are kept as written, relative to the current directory as in Caffe):
      net, train_net: paths or None; test_net: paths.
      net_param, train_net_param: inline ``NetParameter`` s (:func:`fnlayers.caffe.parse`
        dicts) or None; test_net_param: a tuple of them.
      train_state: a :class:`NetState` (phase ``"train"``); test_state: one per test net, or
        empty (each test net then has phase ``"test"``, level 0, no stages).

    Learning rate (docs/caffe-semantics.md §10; :meth:`schedule`):
      base_lr, lr_policy (``fixed``, ``step``, ``exp``, ``inv``, ``multistep``, ``poly``,
      ``sigmoid``), gamma, power, stepsize (None where the file does not set them; only the
      policy's own are needed), stepvalue (a tuple), max_iter (default 0).

    Update (§9; :meth:`optimizer`):
      type (``"SGD"``, ``"Nesterov"``, ``"AdaGrad"``, ``"RMSProp"``, ``"AdaDelta"``,
      ``"Adam"``), momentum (0), momentum2 (0.999), delta (1e-8), rms_decay (0.99),
      weight_decay (0), regularization_type (``"L2"`` or ``"L1"``), clip_gradients (-1: off),
      iter_size (1: the loop sums ``iter_size`` micro-batch gradients per update).

    Loop:
      test_iter (one per test net), test_interval (0), test_initialization (True),
      test_compute_loss (False), display (0: off), average_loss (1), snapshot (0: off),
      snapshot_prefix (default: the solver file's path without extension; None for a solver
      given as text), snapshot_after_train (True), snapshot_format (``"BINARYPROTO"`` or
      ``"HDF5"``), snapshot_diff (False), random_seed (-1: unseeded), weights (caffemodel
      paths to start from), debug_info (False).

    Accepted and unused (the device is whatever JAX runs on): solver_mode (``"GPU"``),
    device_id (0), layer_wise_reduce (True).

    Attributes:
      path: the solver file, or None for text.
    """

    base_lr: float
    lr_policy: str
    net: str | None = None
    net_param: dict | None = dataclasses.field(default=None, repr=False)
    train_net: str | None = None
    train_net_param: dict | None = dataclasses.field(default=None, repr=False)
    test_net: tuple[str, ...] = ()
    test_net_param: tuple[dict, ...] = dataclasses.field(default=(), repr=False)
    train_state: NetState = NetState("train")
    test_state: tuple[NetState, ...] = ()
    test_iter: tuple[int, ...] = ()
    test_interval: int = 0
    test_compute_loss: bool = False
    test_initialization: bool = True
    display: int = 0
    average_loss: int = 1
    max_iter: int = 0
    iter_size: int = 1
    gamma: float | None = None
    power: float | None = None
    stepsize: int | None = None
    stepvalue: tuple[int, ...] = ()
    type: str = "SGD"
    momentum: float = 0.0
    momentum2: float = 0.999
    delta: float = 1e-8
    rms_decay: float = 0.99
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    clip_gradients: float = -1.0
    snapshot: int = 0
    snapshot_prefix: str | None = None
    snapshot_diff: bool = False
    snapshot_format: str = "BINARYPROTO"
    snapshot_after_train: bool = True
    random_seed: int = -1
    solver_mode: str = "GPU"
    device_id: int = 0
    debug_info: bool = False
    layer_wise_reduce: bool = True
    weights: tuple[str, ...] = ()
    path: str | None = None

    def schedule(self) -> schedules.Schedule:
        """The learning-rate schedule of ``lr_policy`` (:mod:`fnlayers.schedules`), from
        ``base_lr`` and the policy's hyperparameters."""
        p = self.lr_policy
        if p == "fixed":
            return schedules.fixed(self.base_lr)
        if p in ("step", "sigmoid"):
            return getattr(schedules, p)(self.base_lr, self.gamma, self.stepsize)
        if p == "exp":
            return schedules.exp(self.base_lr, self.gamma)
        if p == "inv":
            return schedules.inv(self.base_lr, self.gamma, self.power)
        if p == "multistep":
            return schedules.multistep(self.base_lr, self.gamma, self.stepvalue)
        return schedules.poly(self.base_lr, self.power, self.max_iter)

    def optimizer(self, *, lr_mult: Mults = None, decay_mult: Mults = None) -> optim.Optimizer:
        """The fnlayers optimizer of ``type`` with this solver's schedule and every
        hyperparameter: ``optim.sgd`` (``nesterov=True`` for Nesterov), ``optim.adagrad(delta)``,
        ``optim.rmsprop(rms_decay, delta)``, ``optim.adadelta(momentum, delta)`` or
        ``optim.adam(momentum, momentum2, delta)``, each with ``weight_decay``,
        ``regularization``, ``clip_gradients`` (None when negative), ``iter_size``.

        Args:
          lr_mult, decay_mult: the per-parameter multipliers (Caffe's ``param { lr_mult
            decay_mult }``), as :func:`fnlayers.optim.sgd` takes them; None: all 1.

        Returns:
          An :class:`fnlayers.optim.Optimizer`.

        Raises:
          ValueError: ``type`` names a solver that ``fnlayers.optim`` does not provide.
        """
        factory_name, kwargs = _SOLVER_ARGS[self.type](self)
        factory = getattr(optim, factory_name, None)
        if factory is None:
            raise ValueError(
                f"CaffeSolver.optimizer: type={self.type!r} needs fnlayers.optim."
                f"{factory_name}, which this version of fnlayers does not have"
            )
        return factory(
            self.schedule(),
            **kwargs,
            weight_decay=self.weight_decay,
            regularization=self.regularization_type.lower(),
            clip_gradients=None if self.clip_gradients < 0 else self.clip_gradients,
            lr_mult=lr_mult,
            decay_mult=decay_mult,
            iter_size=self.iter_size,
        )

    def train_net_path(self) -> str:
        """The train net for :func:`fnlayers.caffe.load_net`: its path (as written: relative to
        the current directory), or the text of an inline ``NetParameter``; load it with
        ``**solver.train_state.load_net_args()``."""
        if self.train_net_param is not None:
            return to_text(self.train_net_param)
        if self.train_net is not None:
            return self.train_net
        if self.net_param is not None:
            return to_text(self.net_param)
        return self.net

    def test_net_paths(self) -> tuple[str, ...]:
        """Each test net's path or inline text, in :meth:`test_nets`' order."""
        return tuple(t.prototxt for t in self.test_nets())

    def test_states(self) -> tuple[NetState, ...]:
        """Each test net's :class:`NetState`, in :meth:`test_nets`' order."""
        return tuple(t.state for t in self.test_nets())

    def test_nets(self) -> tuple[TestNet, ...]:
        """The test nets in Caffe's order: ``test_net_param`` s, then ``test_net`` files, then
        ``net_param``/``net`` once for each remaining ``test_iter``."""
        specs = [(to_text(p), "test_net_param") for p in self.test_net_param]
        specs += [(p, f"test_net file: {p}") for p in self.test_net]
        remaining = len(self.test_iter) - len(specs)
        if self.net_param is not None:
            specs += [(to_text(self.net_param), "net_param")] * remaining
        elif self.net is not None:
            specs += [(self.net, f"net file: {self.net}")] * remaining
        states = self.test_state or (NetState("test"),) * len(specs)
        return tuple(
            TestNet(text, n, state, source)
            for (text, source), n, state in zip(specs, self.test_iter, states, strict=True)
        )


def load_solver(path_or_text: str | os.PathLike) -> CaffeSolver:
    """Reads a Caffe solver prototxt (``SolverParameter`` in text format).

    Args:
      path_or_text: the solver file's path, or its text.

    Returns:
      A :class:`CaffeSolver`: ``.optimizer()``, ``.schedule()``, ``.train_net_path()``,
      ``.test_nets()`` and the loop settings as fields.

    Raises:
      ValueError: the text is not valid text format (a :class:`~fnlayers.caffe.PrototxtError`
        with line and column); ``base_lr`` or ``lr_policy`` is missing; the policy lacks one of
        its hyperparameters (``step`` needs ``gamma`` and ``stepsize``, ``exp`` ``gamma``,
        ``inv`` ``gamma`` and ``power``, ``multistep`` ``gamma`` and ``stepvalue``, ``poly``
        ``power`` and ``max_iter``, ``sigmoid`` ``gamma`` and ``stepsize``); an unknown
        ``type``, policy, enum value or ``regularization_type``; ``type`` together with
        ``solver_type``; no train net or more than one; ``test_iter``/``test_state`` counts
        that do not match the test nets, or test nets with ``test_interval`` 0; a field of the
        wrong kind, or a value that Caffe's solver rejects (``average_loss`` < 1, momentum with
        AdaGrad or RMSProp, ``rms_decay`` outside ``[0, 1)``). Each message starts with the
        solver file's path.
    """
    path, text = _read(path_or_text)
    where = f"load_solver: {path or 'solver text'}"
    msg = parse(text)
    for name in msg:
        if name not in _FIELDS and name != "solver_type":
            warnings.warn(
                f"{where}: {name!r} is not a SolverParameter field; it is ignored",
                stacklevel=2,
            )
    values = {name: _read_field(msg, name, kind, where) for name, kind in _FIELDS.items()}
    values = {k: v for k, v in values.items() if v is not None and v != ()}
    _upgrade_solver_type(msg, values, where)
    if path is not None:
        values["snapshot_prefix"] = _snapshot_prefix(values.get("snapshot_prefix"), path)
    for name in ("base_lr", "lr_policy"):
        if name not in values:
            raise ValueError(f"{where}: {name} is missing (Caffe's solver needs it)")
    solver = CaffeSolver(**values, path=path)
    _check(solver, where)
    return solver


# --------------------------------------------------------------------------------------------
# private helpers

_POLICY_NEEDS = {
    "fixed": (),
    "step": ("gamma", "stepsize"),
    "exp": ("gamma",),
    "inv": ("gamma", "power"),
    "multistep": ("gamma", "stepvalue"),
    "poly": ("power", "max_iter"),
    "sigmoid": ("gamma", "stepsize"),
}

# type -> (fnlayers.optim factory, its type-specific arguments)
_SOLVER_ARGS: dict[str, Callable[[CaffeSolver], tuple[str, dict]]] = {
    "SGD": lambda s: ("sgd", {"momentum": s.momentum}),
    "Nesterov": lambda s: ("sgd", {"momentum": s.momentum, "nesterov": True}),
    "AdaGrad": lambda s: ("adagrad", {"delta": s.delta}),
    "RMSProp": lambda s: ("rmsprop", {"rms_decay": s.rms_decay, "delta": s.delta}),
    "AdaDelta": lambda s: ("adadelta", {"momentum": s.momentum, "delta": s.delta}),
    "Adam": lambda s: (
        "adam",
        {"momentum": s.momentum, "momentum2": s.momentum2, "delta": s.delta},
    ),
}

# SolverParameter's legacy enum SolverType (caffe.proto) -> the type string
# UpgradeSolverType (util/upgrade_proto.cpp) gives it
_SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
_SOLVER_TYPE_ENUM = ("SGD", "NESTEROV", "ADAGRAD", "RMSPROP", "ADADELTA", "ADAM")

# SolverParameter's fields (caffe.proto): a scalar kind, or ("repeated", kind); an enum is the
# tuple of its value names in number order. Defaults are CaffeSolver's.
_FIELDS: dict[str, Any] = {
    "net": "string",
    "net_param": "message",
    "train_net": "string",
    "test_net": ("repeated", "string"),
    "train_net_param": "message",
    "test_net_param": ("repeated", "message"),
    "train_state": "netstate",
    "test_state": ("repeated", "netstate"),
    "test_iter": ("repeated", "int"),
    "test_interval": "int",
    "test_compute_loss": "bool",
    "test_initialization": "bool",
    "base_lr": "float",
    "display": "int",
    "average_loss": "int",
    "max_iter": "int",
    "iter_size": "int",
    "lr_policy": "string",
    "gamma": "float",
    "power": "float",
    "momentum": "float",
    "weight_decay": "float",
    "regularization_type": "string",
    "stepsize": "int",
    "stepvalue": ("repeated", "int"),
    "clip_gradients": "float",
    "snapshot": "int",
    "snapshot_prefix": "string",
    "snapshot_diff": "bool",
    "snapshot_format": ("HDF5", "BINARYPROTO"),
    "solver_mode": ("CPU", "GPU"),
    "device_id": "int",
    "random_seed": "int",
    "type": "string",
    "delta": "float",
    "momentum2": "float",
    "rms_decay": "float",
    "debug_info": "bool",
    "snapshot_after_train": "bool",
    "layer_wise_reduce": "bool",
    "weights": ("repeated", "string"),
}


def _read(path_or_text) -> tuple[str | None, str]:
    if isinstance(path_or_text, os.PathLike) or (
        isinstance(path_or_text, str) and not any(c in path_or_text for c in "\n{:")
    ):
        path = os.fspath(path_or_text)
        try:
            with open(path, encoding="utf-8") as f:
                return path, f.read()
        except OSError as e:
            raise ValueError(f"load_solver: cannot read {path!r}: {e.strerror}") from None
    if isinstance(path_or_text, bytes):
        return None, path_or_text.decode("utf-8")
    if not isinstance(path_or_text, str):
        raise TypeError(
            f"load_solver: path_or_text must be a path or the solver's text, got "
            f"{type(path_or_text).__name__}"
        )
    return None, path_or_text


def _read_field(msg: dict, name: str, kind, where: str):
    if isinstance(kind, tuple) and kind[0] == "repeated":
        return tuple(_value(v, name, kind[1], where) for v in msg.get(name, []))
    if name not in msg:
        return None
    return _value(first(msg, name), name, kind, where)


def _value(v, name: str, kind, where: str):
    """One value of a field, as Caffe's protobuf text parser would accept it."""
    bad = f"{where}: {name}: {v!r} is not "
    if isinstance(kind, tuple):  # an enum: its name, or its number
        if isinstance(v, Ident) and v in kind:
            return str(v)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(kind):
            return kind[v]
        raise ValueError(bad + f"one of {', '.join(kind)}")
    if kind == "string":
        if isinstance(v, str) and not isinstance(v, Ident):
            return v
        raise ValueError(bad + "a quoted string")
    if kind == "int":
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise ValueError(bad + "an integer")
    if kind == "float":
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        raise ValueError(bad + "a number")
    if kind == "bool":
        if isinstance(v, bool) or v in (0, 1):
            return bool(v)
        raise ValueError(bad + "true or false")
    if kind == "message":
        if isinstance(v, dict):
            return v
        raise ValueError(bad + "a message { ... }")
    return _net_state(v, name, where)


def _net_state(v, name: str, where: str) -> NetState:
    if not isinstance(v, dict):
        raise ValueError(f"{where}: {name}: {v!r} is not a NetState message {{ ... }}")
    for field in v:
        if field not in ("phase", "level", "stage"):
            raise ValueError(f"{where}: {name}: {field!r} is not a NetState field")
    default = "train" if name == "train_state" else "test"
    phase = (
        _value(first(v, "phase"), f"{name}.phase", ("TRAIN", "TEST"), where)
        if ("phase" in v)
        else default.upper()
    )
    level = _value(first(v, "level"), f"{name}.level", "int", where) if "level" in v else 0
    stages = tuple(_value(s, f"{name}.stage", "string", where) for s in v.get("stage", []))
    return NetState(phase.lower(), level, stages)


def _upgrade_solver_type(msg: dict, values: dict, where: str) -> None:
    """Caffe's ``UpgradeSolverType``: the legacy enum ``solver_type`` as the string ``type``."""
    if "solver_type" not in msg:
        return
    if "type" in values:
        raise ValueError(
            f"{where}: the legacy solver_type (enum) and type (string) cannot both be given"
        )
    legacy = _value(first(msg, "solver_type"), "solver_type", _SOLVER_TYPE_ENUM, where)
    values["type"] = _SOLVER_TYPES[_SOLVER_TYPE_ENUM.index(legacy)]


def _snapshot_prefix(prefix: str | None, path: str) -> str:
    """Caffe's ``UpgradeSnapshotPrefixProperty``."""
    if prefix is None:
        return os.path.splitext(path)[0]
    if os.path.isdir(prefix):
        return os.path.join(prefix, os.path.splitext(os.path.basename(path))[0])
    return prefix


def _check(s: CaffeSolver, where: str) -> None:
    """What Caffe checks when it builds the solver, its nets and its learning rate."""
    if s.lr_policy not in _POLICY_NEEDS:
        raise ValueError(
            f"{where}: lr_policy={s.lr_policy!r} is not one of {', '.join(_POLICY_NEEDS)}"
        )
    missing = [
        n
        for n in _POLICY_NEEDS[s.lr_policy]
        if getattr(s, n) in (None, ()) or (n == "max_iter" and s.max_iter == 0)
    ]
    if missing:
        raise ValueError(
            f"{where}: lr_policy {s.lr_policy!r} needs "
            f"{' and '.join(_POLICY_NEEDS[s.lr_policy])}; missing: {', '.join(missing)}"
        )
    if s.type not in _SOLVER_TYPES:
        close = difflib.get_close_matches(s.type, _SOLVER_TYPES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: type={s.type!r} is not one of {', '.join(_SOLVER_TYPES)}{hint}")
    if s.regularization_type not in ("L1", "L2"):
        raise ValueError(
            f"{where}: regularization_type={s.regularization_type!r} must be 'L1' or 'L2'"
        )
    if s.average_loss < 1:
        raise ValueError(f"{where}: average_loss={s.average_loss} must be >= 1")
    if s.type in ("AdaGrad", "RMSProp") and s.momentum != 0:
        raise ValueError(
            f"{where}: momentum={s.momentum:g} cannot be used with {s.type} (Caffe's "
            "solver checks that it is 0)"
        )
    if s.type == "RMSProp" and not 0 <= s.rms_decay < 1:
        raise ValueError(f"{where}: rms_decay={s.rms_decay:g} must be in [0, 1)")
    _check_nets(s, where)
    try:
        s.schedule()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _check_nets(s: CaffeSolver, where: str) -> None:
    """``Solver::InitTrainNet`` and ``InitTestNets``' checks."""
    train = ("net", "net_param", "train_net", "train_net_param")
    given = [n for n in train if getattr(s, n) is not None]
    if len(given) != 1:
        got = f"got {', '.join(given)}" if given else "got none"
        raise ValueError(f"{where}: give exactly one train net: one of {', '.join(train)}; {got}")
    generic = s.net is not None or s.net_param is not None
    named = len(s.test_net) + len(s.test_net_param)
    if len(s.test_iter) < named or (not generic and len(s.test_iter) != named):
        raise ValueError(
            f"{where}: test_iter must be given once for each test net: {len(s.test_iter)} "
            f"test_iter for {named} test_net/test_net_param"
        )
    count = len(s.test_iter) if generic else named
    if s.test_state and len(s.test_state) != count:
        raise ValueError(
            f"{where}: test_state must be absent or given once per test net: "
            f"{len(s.test_state)} for {count} test nets"
        )
    if count and s.test_interval <= 0:
        raise ValueError(
            f"{where}: test_interval={s.test_interval} must be > 0 when there are test nets "
            f"(test_iter given {len(s.test_iter)} times)"
        )
