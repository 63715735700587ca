"""fl.caffe.load_solver: Caffe's solver prototxts (copied under tests/data/caffe, BSD licence
there) read field by field, with Caffe's defaults (caffe.proto's SolverParameter), the legacy
solver_type enum (upgrade_proto.cpp's UpgradeSolverType), the learning rate of every policy
against Caffe's GetLearningRate formulas evaluated here in float64, and updates worked by hand
from sgd_solver.cpp / nesterov_solver.cpp."""

import math
import pathlib
import warnings

import numpy as np
import pytest

from fnlayers import optim
from fnlayers.caffe import load_net, parse
from fnlayers.caffe.solver import CaffeSolver, NetState, load_solver

DATA = pathlib.Path(__file__).parent / "data" / "caffe"

# Caffe's defaults for the fields none of the reference solvers sets (caffe.proto)
DEFAULTS = {
    "type": "SGD", "test_initialization": True, "test_compute_loss": False, "average_loss": 1,
    "iter_size": 1, "regularization_type": "L2", "clip_gradients": -1.0,
    "snapshot_after_train": True, "snapshot_format": "BINARYPROTO", "snapshot_diff": False,
    "random_seed": -1, "device_id": 0, "delta": 1e-8, "momentum2": 0.999, "rms_decay": 0.99,
    "debug_info": False, "layer_wise_reduce": True, "weights": (), "train_net": None,
    "test_net": (), "net_param": None, "train_net_param": None, "test_net_param": (),
    "train_state": NetState("train"), "test_state": (),
}  # fmt: skip

# every field of each file, copied by hand from the file
REFERENCE = {
    "mnist__lenet_solver": {
        "net": "examples/mnist/lenet_train_test.prototxt", "test_iter": (100,),
        "test_interval": 500, "base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
        "lr_policy": "inv", "gamma": 0.0001, "power": 0.75, "stepsize": None, "stepvalue": (),
        "display": 100, "max_iter": 10000, "snapshot": 5000,
        "snapshot_prefix": "examples/mnist/lenet", "solver_mode": "GPU",
    },
    "mnist__lenet_multistep_solver": {
        "net": "examples/mnist/lenet_train_test.prototxt", "test_iter": (100,),
        "test_interval": 500, "base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
        "lr_policy": "multistep", "gamma": 0.9, "power": None,
        "stepvalue": (5000, 7000, 8000, 9000, 9500), "display": 100, "max_iter": 10000,
        "snapshot": 5000, "snapshot_prefix": "examples/mnist/lenet_multistep",
        "solver_mode": "GPU",
    },
    "cifar10__cifar10_quick_solver": {
        "net": "examples/cifar10/cifar10_quick_train_test.prototxt", "test_iter": (100,),
        "test_interval": 500, "base_lr": 0.001, "momentum": 0.9, "weight_decay": 0.004,
        "lr_policy": "fixed", "gamma": None, "display": 100, "max_iter": 4000,
        "snapshot": 4000, "snapshot_prefix": "examples/cifar10/cifar10_quick",
        "solver_mode": "GPU",
    },
    "bvlc_alexnet__solver": {
        "net": "models/bvlc_alexnet/train_val.prototxt", "test_iter": (1000,),
        "test_interval": 1000, "base_lr": 0.01, "lr_policy": "step", "gamma": 0.1,
        "stepsize": 100000, "display": 20, "max_iter": 450000, "momentum": 0.9,
        "weight_decay": 0.0005, "snapshot": 10000,
        "snapshot_prefix": "models/bvlc_alexnet/caffe_alexnet_train", "solver_mode": "GPU",
    },
    "siamese__mnist_siamese_solver": {
        "net": "examples/siamese/mnist_siamese_train_test.prototxt", "test_iter": (100,),
        "test_interval": 500, "base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
        "lr_policy": "inv", "gamma": 0.0001, "power": 0.75, "display": 100,
        "max_iter": 50000, "snapshot": 5000, "snapshot_prefix": "examples/siamese/mnist_siamese",
        "solver_mode": "GPU",
    },
    "cifar10__cifar10_full_sigmoid_solver_bn": {
        "net": "examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt",
        "test_iter": (10,), "test_interval": 1000, "base_lr": 0.001, "momentum": 0.9,
        "weight_decay": 0.0,  # absent from the file: Caffe's default
        "lr_policy": "step", "gamma": 1.0, "stepsize": 5000, "display": 100,
        "max_iter": 60000, "snapshot": 10000,
        "snapshot_prefix": "examples/cifar10_full_sigmoid_bn", "solver_mode": "GPU",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_solver_files(name):
    s = load_solver(DATA / f"{name}.prototxt")
    for field, want in {**DEFAULTS, **REFERENCE[name]}.items():
        assert getattr(s, field) == want, field
    # paths stay as written: Caffe reads them from the current directory
    (test,) = s.test_nets()
    assert (test.prototxt, test.test_iter, test.state) == (s.net, s.test_iter[0], NetState())
    assert s.train_net_path() == s.net
    assert s.path == str(DATA / f"{name}.prototxt")


def _caffe_rate(policy, it, base_lr, gamma=0.0, power=0.0, stepsize=1, stepvalue=(), max_iter=1):
    """SGDSolver::GetLearningRate, transliterated (multistep by its stateful walk)."""
    if policy == "fixed":
        return base_lr
    if policy == "step":
        return base_lr * gamma ** (it // stepsize)
    if policy == "exp":
        return base_lr * gamma**it
    if policy == "inv":
        return base_lr * (1 + gamma * it) ** (-power)
    if policy == "multistep":
        step = 0
        for i in range(it + 1):
            if step < len(stepvalue) and i >= stepvalue[step]:
                step += 1
        return base_lr * gamma**step
    if policy == "poly":
        return base_lr * (1 - it / max_iter) ** power
    return base_lr * (1 / (1 + math.exp(-gamma * (it - stepsize))))


@pytest.mark.parametrize(
    "text",
    [
        'lr_policy: "fixed"',
        'lr_policy: "step" gamma: 0.5 stepsize: 3',
        'lr_policy: "exp" gamma: 0.9',
        'lr_policy: "inv" gamma: 0.1 power: 0.75',
        'lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 5',
        'lr_policy: "poly" power: 2 max_iter: 10',
        'lr_policy: "sigmoid" gamma: 0.5 stepsize: 4',
    ],
)
def test_every_policy_follows_caffe(text):
    s = load_solver(f'net: "n.prototxt" base_lr: 0.1 {text}')
    args = {k: v for k, v in parse(text).items() if k != "lr_policy"}
    args = {k: (tuple(v) if k == "stepvalue" else v[0]) for k, v in args.items()}
    sched = s.schedule()
    for it in range(9):
        want = _caffe_rate(s.lr_policy, it, 0.1, **args)
        np.testing.assert_allclose(float(sched(it)), want, rtol=2e-6, atol=1e-9)


def test_reference_schedules():
    lenet = load_solver(DATA / "mnist__lenet_solver.prototxt").schedule()
    np.testing.assert_allclose(float(lenet(100)), 0.01 * 1.01**-0.75, rtol=1e-6)
    multi = load_solver(DATA / "mnist__lenet_multistep_solver.prototxt").schedule()
    for it, steps in [(4999, 0), (5000, 1), (7000, 2), (9499, 4), (9500, 5)]:
        np.testing.assert_allclose(float(multi(it)), 0.01 * 0.9**steps, rtol=1e-6)
    alex = load_solver(DATA / "bvlc_alexnet__solver.prototxt").schedule()
    np.testing.assert_allclose([float(alex(99999)), float(alex(100000))], [0.01, 0.001], 1e-6)


def test_sgd_update_from_the_lenet_solver():
    opt = load_solver(DATA / "mnist__lenet_solver.prototxt").optimizer()
    params = {"w": np.float32([1.0])}
    state = opt.init(params)
    params, state = opt.update({"w": np.float32([0.5])}, state, params)
    # rate(0) = 0.01; g = 0.5 + 0.0005 * 1; v = 0.01 * g; w = 1 - v
    np.testing.assert_allclose(params["w"], [1 - 0.01 * 0.5005], rtol=1e-6)
    np.testing.assert_allclose(state.momentum["w"], [0.01 * 0.5005], rtol=1e-6)


def test_legacy_nesterov_enum_and_its_update():
    s = load_solver('net: "n" base_lr: 0.1 lr_policy: "fixed" momentum: 0.5 solver_type: NESTEROV')
    assert s.type == "Nesterov"
    opt = s.optimizer()
    params = {"w": np.float32([0.0])}
    state = opt.init(params)
    got = []
    for _ in range(2):
        params, state = opt.update({"w": np.float32([1.0])}, state, params)
        got.append(float(params["w"][0]))
    # v1 = 0.1, step 1.5*0.1 = 0.15; v2 = 0.5*0.1 + 0.1 = 0.15, step 1.5*0.15 - 0.5*0.1 = 0.175
    np.testing.assert_allclose(got, [-0.15, -0.325], rtol=1e-6)


def test_l1_clipping_iter_size_and_multipliers_reach_the_optimizer():
    s = load_solver(
        'net: "n" base_lr: 1 lr_policy: "fixed" regularization_type: "L1" weight_decay: 0.1 '
        "clip_gradients: 1.0 iter_size: 2"
    )
    opt = s.optimizer(lr_mult={"a": 1.0, "b": 0.0})
    assert opt.iter_size == 2
    params = {"a": np.float32([2.0]), "b": np.float32([5.0])}
    new, _ = opt.update({"a": np.float32([4.0]), "b": np.float32([9.0])}, opt.init(params), params)
    # b is frozen (no gradient, also not in the norm); a: norm 4 > 1, g = 1; g /= 2; + 0.1*sign
    np.testing.assert_allclose(new["a"], [2.0 - 0.6], rtol=1e-6)
    np.testing.assert_array_equal(new["b"], [5.0])


@pytest.mark.parametrize(
    ("legacy", "want"),
    [("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"), ("RMSPROP", "RMSProp"),
     ("ADADELTA", "AdaDelta"), ("ADAM", "Adam"), ("0", "SGD"), ("5", "Adam")],
)  # fmt: skip
def test_legacy_solver_type_enum(legacy, want):
    s = load_solver(f'net: "n" base_lr: 0.1 lr_policy: "fixed" solver_type: {legacy}')
    assert s.type == want


@pytest.mark.parametrize(
    ("type_", "extra", "factory", "kwargs"),
    [
        ("AdaGrad", "delta: 1e-6", "adagrad", {"delta": 1e-6}),
        ("RMSProp", "rms_decay: 0.9", "rmsprop", {"rms_decay": 0.9, "delta": 1e-8}),
        ("AdaDelta", "momentum: 0.95", "adadelta", {"momentum": 0.95, "delta": 1e-8}),
        (
            "Adam",
            "momentum: 0.9 momentum2: 0.99 delta: 1e-7",
            "adam",
            {"momentum": 0.9, "momentum2": 0.99, "delta": 1e-7},
        ),
    ],
)
def test_adaptive_types_map_to_their_optim_factories(monkeypatch, type_, extra, factory, kwargs):
    calls = []

    def record(lr, **kw):
        calls.append((lr, kw))
        return "the optimizer"

    monkeypatch.setattr(optim, factory, record, raising=False)
    s = load_solver(
        f'net: "n" type: "{type_}" base_lr: 0.5 lr_policy: "exp" gamma: 0.5 {extra} '
        'weight_decay: 0.01 regularization_type: "L1" clip_gradients: 3 iter_size: 4'
    )
    assert s.optimizer(decay_mult={"w": 0.0}) == "the optimizer"
    ((lr, kw),) = calls
    np.testing.assert_allclose(float(lr(2)), 0.125)
    assert kw == {
        **kwargs, "weight_decay": 0.01, "regularization": "l1", "clip_gradients": 3.0,
        "lr_mult": None, "decay_mult": {"w": 0.0}, "iter_size": 4,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("type_", "extra", "want"),
    [
        # first updates with w = 1, g = 2, base_lr 0.1, worked from Caffe's *_solver.cpp
        # AdaGrad: h = g^2; w -= lr * g / (sqrt(h) + delta) = lr (delta negligible)
        ("AdaGrad", "", 1 - 0.1),
        # RMSProp: h = (1 - 0.99) g^2 = 0.04; w -= lr * g / (sqrt(h) + delta) = 0.1 * 2 / 0.2
        ("RMSProp", "", 0.0),
        # AdaDelta: h = 0.05 g^2 = 0.2; u = g * sqrt((0 + 1e-6) / (0.2 + 1e-6)); w -= lr * u
        ("AdaDelta", "momentum: 0.95 delta: 1e-6", 1 - 0.1 * 2 * math.sqrt(1e-6 / 0.200001)),
        # Adam: m = 0.1 g, v = 0.001 g^2, w -= lr * sqrt(1 - 0.999) / (1 - 0.9) * m / sqrt(v)
        ("Adam", "momentum: 0.9", 1 - 0.1),
    ],
)
def test_adaptive_solvers_first_update(type_, extra, want):
    s = load_solver(f'net: "n" type: "{type_}" base_lr: 0.1 lr_policy: "fixed" {extra}')
    opt = s.optimizer()
    params = {"w": np.float32([1.0])}
    new, _ = opt.update({"w": np.float32([2.0])}, opt.init(params), params)
    np.testing.assert_allclose(new["w"], [want], rtol=1e-5, atol=1e-6)


def test_every_other_field_and_the_nets():
    text = """
    train_net: "train.prototxt"
    test_net: "a.prototxt"
    test_net_param { name: "inline" }
    test_iter: 3  test_iter: 4
    test_state { stage: "val" level: 2 }
    test_state { phase: TRAIN }
    train_state { stage: "s1" stage: "s2" level: 1 }
    test_interval: 50 test_initialization: false test_compute_loss: true
    base_lr: 0.2 lr_policy: "fixed" display: 10 average_loss: 20 max_iter: 7 iter_size: 3
    type: "Nesterov" momentum: 0.8 weight_decay: 0.01 clip_gradients: 10
    snapshot: 5 snapshot_prefix: "snaps/run" snapshot_after_train: false snapshot_diff: true
    snapshot_format: HDF5 random_seed: 42 solver_mode: CPU device_id: 1 debug_info: true
    layer_wise_reduce: false weights: "a.caffemodel" weights: "b.caffemodel"
    """
    s = load_solver(text)
    assert (s.train_net, s.test_net, s.test_iter) == ("train.prototxt", ("a.prototxt",), (3, 4))
    assert s.train_state == NetState("train", 1, ("s1", "s2"))
    assert s.test_state == (NetState("test", 2, ("val",)), NetState("train", 0, ()))
    want = {
        "test_interval": 50, "test_initialization": False, "test_compute_loss": True,
        "base_lr": 0.2, "display": 10, "average_loss": 20, "max_iter": 7, "iter_size": 3,
        "type": "Nesterov", "momentum": 0.8, "weight_decay": 0.01, "clip_gradients": 10.0,
        "snapshot": 5, "snapshot_prefix": "snaps/run", "snapshot_after_train": False,
        "snapshot_diff": True, "snapshot_format": "HDF5", "random_seed": 42,
        "solver_mode": "CPU", "device_id": 1, "debug_info": True, "layer_wise_reduce": False,
        "weights": ("a.caffemodel", "b.caffemodel"), "path": None,
    }  # fmt: skip
    for field, value in want.items():
        assert getattr(s, field) == value, field
    # Caffe's order: test_net_param first, then test_net files
    inline, file_net = s.test_nets()
    assert parse(inline.prototxt) == {"name": ["inline"]}
    assert (inline.test_iter, inline.state, inline.source) == (3, s.test_state[0], "test_net_param")
    assert (file_net.prototxt, file_net.test_iter, file_net.state.phase) == (
        "a.prototxt",
        4,
        "train",
    )
    assert s.train_net_path() == "train.prototxt"
    assert s.test_net_paths() == (inline.prototxt, "a.prototxt")
    assert s.test_states() == s.test_state


def test_inline_net_param_loads_as_a_net_in_each_phase():
    s = load_solver(
        """
        base_lr: 0.1 lr_policy: "fixed" test_iter: 2 test_iter: 5 test_interval: 10
        net_param {
          layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }
          layer { name: "r" type: "ReLU" bottom: "x" top: "r" }
          layer { name: "s" type: "Sigmoid" bottom: "r" top: "s" include { phase: TEST } }
        }
        """
    )
    train = load_net(s.train_net_path(), **s.train_state.load_net_args())
    assert train.layer_types == {"x": "Input", "r": "ReLU"}
    tests = s.test_nets()  # one generic net instance per test_iter
    assert [(t.test_iter, t.source) for t in tests] == [(2, "net_param"), (5, "net_param")]
    net = load_net(tests[0].prototxt, **tests[0].state.load_net_args())
    assert net.layer_types == {"x": "Input", "r": "ReLU", "s": "Sigmoid"}


def test_snapshot_prefix_defaults_to_the_solver_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pathlib.Path("solver.prototxt").write_text('net: "n" base_lr: 1 lr_policy: "fixed"')
    assert load_solver("solver.prototxt").snapshot_prefix == "solver"
    pathlib.Path("snaps").mkdir()
    pathlib.Path("s2.prototxt").write_text(
        'net: "n" base_lr: 1 lr_policy: "fixed" snapshot_prefix: "snaps"'
    )
    assert load_solver("s2.prototxt").snapshot_prefix == str(pathlib.Path("snaps", "s2"))
    assert load_solver('net: "n" base_lr: 1 lr_policy: "fixed"').snapshot_prefix is None


BASE = 'net: "n" base_lr: 0.1 lr_policy: "fixed" '
NO_POLICY = 'net: "n" base_lr: 0.1 '


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('net: "n" lr_policy: "fixed"', "base_lr is missing"),
        ('net: "n" base_lr: 0.1', "lr_policy is missing"),
        (NO_POLICY + 'lr_policy: "step"', "needs gamma and stepsize; missing: gamma, stepsize"),
        ('net: "n" base_lr: 0.1 lr_policy: "step" gamma: 0.1', "missing: stepsize"),
        ('net: "n" base_lr: 0.1 lr_policy: "poly" power: 1', "missing: max_iter"),
        ('net: "n" base_lr: 0.1 lr_policy: "multistep" gamma: 0.1', "missing: stepvalue"),
        ('net: "n" base_lr: 0.1 lr_policy: "inv" gamma: 0.1', "missing: power"),
        ('net: "n" base_lr: 0.1 lr_policy: "cosine"', "lr_policy='cosine' is not one of"),
        (NO_POLICY + 'lr_policy: "step" gamma: -1 stepsize: 2', "gamma=-1.0 must be >= 0"),
        (BASE + 'type: "adam"', "type='adam' is not one of .*did you mean 'Adam'"),
        (BASE + 'type: "Adam" solver_type: ADAM', "cannot both be given"),
        (BASE + "solver_type: LBFGS", "solver_type: 'LBFGS' is not one of SGD, NESTEROV"),
        (BASE + 'regularization_type: "L3"', "regularization_type='L3' must be 'L1' or 'L2'"),
        (BASE + 'type: "AdaGrad" momentum: 0.9', "momentum=0.9 cannot be used with AdaGrad"),
        (BASE + 'type: "RMSProp" rms_decay: 1.0', r"rms_decay=1 must be in \[0, 1\)"),
        (BASE + "average_loss: 0", "average_loss=0 must be >= 1"),
        (BASE + "max_iter: 1.5", "max_iter: 1.5 is not an integer"),
        (BASE + "base_lr: true", "base_lr: True is not a number"),
        (BASE + "solver_mode: TPU", "solver_mode: 'TPU' is not one of CPU, GPU"),
        (BASE + "lr_policy: fixed", "lr_policy: 'fixed' is not a quoted string"),
        (BASE + "train_state { phase: VAL }", "train_state.phase: 'VAL' is not one of TRAIN, TEST"),
        (BASE + "test_state { stages: 'x' }", "'stages' is not a NetState field"),
        ('base_lr: 0.1 lr_policy: "fixed"', "exactly one train net.*got none"),
        (BASE + 'train_net: "t"', "exactly one train net.*got net, train_net"),
        (BASE + "test_iter: 5", "test_interval=0 must be > 0"),
        ('train_net: "t" base_lr: 1 lr_policy: "fixed" test_iter: 5', "test_iter must be given"),
        (BASE + 'test_net: "a" test_interval: 5', "test_iter must be given once"),
        (BASE + "test_iter: 1 test_interval: 5 test_state {} test_state {}", "test_state must be"),
        ("base_lr: {", "line 1"),
    ],
)  # fmt: skip
def test_errors_name_the_field_and_value(text, match):
    with pytest.raises(ValueError, match=match) as info:
        load_solver(text)
    if "line 1" not in match:
        assert str(info.value).startswith("load_solver: solver text: ")


def test_unknown_fields_warn_and_missing_files_fail(tmp_path):
    with pytest.warns(UserWarning, match="'learning_rate' is not a SolverParameter field"):
        s = load_solver(BASE + "learning_rate: 0.3")
    assert isinstance(s, CaffeSolver) and s.base_lr == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_solver(DATA / "bvlc_alexnet__solver.prototxt")
    missing = tmp_path / "nope.prototxt"
    with pytest.raises(ValueError, match=f"cannot read '{missing}'"):
        load_solver(missing)


def test_missing_adaptive_factory_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(optim, "adam", raising=False)
    s = load_solver(BASE + 'type: "Adam"')
    with pytest.raises(ValueError, match="type='Adam' needs fnlayers.optim.adam"):
        s.optimizer()
