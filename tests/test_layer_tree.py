"""The layer tree: walk, the Container protocol, repr, layer-named errors, parameter checks."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import diagnostics, models
from fnlayers.layers import Container, apply_leaves, container_layer, walk


def shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


def nodes(model, params=None, state=None):
    """``[(path, kind, params shapes, state shapes)]`` of every node."""
    return [
        (n.path, n.layer.kind, shapes(n.params), shapes(n.state))
        for n in walk(model, params, state)
    ]


# ----------------------------------------------------------------------------- walk


def test_walk_serial_yields_every_layer_with_its_params_and_state(key):
    net = fl.serial(fl.Dense(3, name="ip1"), fl.BatchNorm(name="bn1"), fl.ReLU(), name="net")
    _, params, state = net.init(key, (-1, 2))
    got = list(walk(net, params, state))
    assert [(n.path, n.label) for n in got] == [
        ("", "net"),
        ("ip1", "ip1"),
        ("bn1", "bn1"),
        ("relu_2", "relu_2"),
    ]
    assert got[0].params is params and got[0].state is state
    assert got[1].params is params["ip1"] and got[2].state is state["bn1"]
    assert shapes(got[2].state) == {"mean_acc": (3,), "var_acc": (3,), "scale_factor": (1,)}
    # without trees the nodes carry None
    assert all(n.params is None and n.state is None for n in walk(net))


def test_walk_parallel_and_nested_containers(key):
    branch = fl.serial(fl.Dense(2, name="a"), fl.BatchNorm(name="bn"), name="left")
    net = fl.serial(fl.parallel(branch, fl.Dense(4, name="right"), name="par"), fl.Flatten())
    _, params, state = net.init(key, (-1, 3))
    assert nodes(net, params, state)[1:] == [
        ("par", "parallel", shapes(params["par"]), shapes(state["par"])),
        ("par/left", "serial", shapes(params["par"]["left"]), shapes(state["par"]["left"])),
        ("par/left/a", "dense", {"b": (2,), "w": (3, 2)}, {}),
        (
            "par/left/bn",
            "batch_norm",
            {"scale": (2,), "shift": (2,)},
            {"mean_acc": (2,), "var_acc": (2,), "scale_factor": (1,)},
        ),
        ("par/right", "dense", {"b": (4,), "w": (3, 4)}, {}),
        ("flatten_1", "flatten", {}, {}),
    ]


def test_walk_shared_adds_no_level_and_hands_down_the_same_trees(key):
    trunk = fl.serial(fl.Dense(3, name="a"), fl.BatchNorm(name="bn"), name="trunk")
    siamese = fl.shared(trunk, 2, name="pair")
    _, params, state = siamese.init(key, ((-1, 4), (-1, 4)))
    got = list(walk(siamese, params, state))
    assert [(n.path, n.label, n.layer.kind) for n in got] == [
        ("", "pair", "shared"),
        ("", "trunk", "serial"),
        ("a", "a", "dense"),
        ("bn", "bn", "batch_norm"),
    ]
    assert got[1].params is params and got[1].state is state
    # inside a serial, shared takes its path from its key there
    net = fl.serial(fl.shared(trunk, 2, name="pair"), name="net")
    _, params, state = net.init(key, ((-1, 4), (-1, 4)))
    assert [n.path for n in walk(net)] == ["", "pair", "pair", "pair/a", "pair/bn"]
    assert next(n for n in walk(net, params) if n.path == "pair/a").params is params["pair"]["a"]


def test_walk_a_leaf_and_a_tree_that_does_not_fit(key):
    [node] = walk(fl.Dense(2), {"w": 1})
    assert (node.path, node.label, node.params) == ("", "dense", {"w": 1})
    net = fl.serial(fl.Dense(2, name="ip1"))
    with pytest.raises(ValueError, match=r"no entry 'ip1' for that child \(it has \['ip2'\]\)"):
        list(walk(net, {"ip2": {}}))
    with pytest.raises(TypeError, match="a leaf layer has no children"):
        fl.Dense(2).child_tree({}, "w")


def test_containers_declare_how_children_are_keyed():
    dense = fl.Dense(2, name="ip")
    for make, shares in ((fl.serial, False), (fl.parallel, False), (fl.shared, True)):
        layer = make(dense)
        assert layer.is_container and layer.container.shares_params is shares
    assert not dense.is_container and dense.container is None
    assert fl.serial(dense).child_tree({"ip": 1}, "ip") == 1
    assert fl.shared(dense).child_tree({"w": 1}, "") == {"w": 1}
    with pytest.raises(TypeError, match="must say how it runs them"):
        fl.Layer(dense.init, dense.apply, children=(("ip", dense),))


def residual(body, name=None):
    """``y = x + body(x)``, a container none of the library's code has seen: its kind is new."""

    def init(call, key, in_shape):
        shape, params, state = call("body", body, key, in_shape)
        return shape, {"body": params}, {"body": state}

    def apply(call, params, state, x, *, key=None, train=False):
        y, s = call("body", body, params["body"], state["body"], x, key=key, train=train)
        return x + y, {"body": s}

    return container_layer("residual", [("body", body)], Container(init, apply), name=name)


def test_a_new_container_works_with_summary_mults_and_diagnostics(key):
    body = fl.serial(fl.Dense(4, name="ip", lr_mult=(1, 2)), fl.Tanh(name="act"), name="b")
    net = fl.serial(fl.Dense(4, name="stem"), residual(body, name="res"), fl.Dense(2, name="out"))
    _, params, state = net.init(key, (-1, 3))
    assert shapes(params["res"]) == {"body": {"ip": {"b": (4,), "w": (4, 4)}, "act": {}}}
    assert [row[0] for row in fl.layer_shapes(net, (-1, 3))] == [
        "stem",
        "res/body/ip",
        "res/body/act",
        "out",
    ]
    lr, _ = fl.param_mults(net)
    assert jax.tree_util.tree_map_with_path(lr, params)["res"]["body"]["ip"] == {"w": 1, "b": 2}
    x = jnp.ones((2, 3))
    outputs, _ = diagnostics.layer_outputs(net, params, state, x)
    assert list(outputs) == ["stem", "res/body/ip", "res/body/act", "out"]
    np.testing.assert_allclose(outputs["out"], net.apply(params, state, x)[0], rtol=1e-6)
    assert diagnostics.param_layers(net, params) == ["stem", "res/body/ip", "out"]


def test_apply_leaves_reuses_the_containers_key_splitting(key):
    net = fl.serial(
        fl.Dense(4, name="ip"),
        fl.parallel(fl.Dropout(0.5, name="d1"), fl.Dropout(0.5, name="d2"), name="par"),
        fl.Lambda(lambda xs: xs[0] + xs[1], name="sum"),
    )
    _, params, state = net.init(key, (-1, 3))
    seen = []

    def on_leaf(path, layer, p, s, x, *, key=None, train=False):
        seen.append(path)
        return layer.apply(p, s, x, key=key, train=train)

    x = jnp.ones((5, 3))
    y, _ = apply_leaves(net, on_leaf, params, state, x, key=key, train=True)
    np.testing.assert_array_equal(y, net.apply(params, state, x, key=key, train=True)[0])
    assert seen == ["ip", "par/d1", "par/d2", "sum"]


def test_layer_outputs_open_parallel_and_shared(key):
    trunk = fl.serial(fl.Dense(3, name="a"), fl.Tanh(name="t"), name="trunk")
    net = fl.serial(
        fl.parallel(fl.Dense(3, name="l"), fl.Dense(3, name="r"), name="par"),
        fl.shared(trunk, 2, name="pair"),
        fl.Lambda(lambda ys: ys[0] - ys[1], name="diff"),
    )
    _, params, state = net.init(key, (-1, 2))
    x = jax.random.normal(key, (4, 2))
    outputs, _ = diagnostics.layer_outputs(net, params, state, x)
    assert list(outputs) == ["par/l", "par/r", "pair/a", "pair/t", "diff"]
    left, right = outputs["par/l"], outputs["par/r"]
    assert isinstance(outputs["pair/t"], tuple) and len(outputs["pair/t"]) == 2
    np.testing.assert_allclose(
        outputs["pair/t"][1], trunk.apply(params["pair"], state["pair"], right)[0], rtol=1e-6
    )
    np.testing.assert_allclose(outputs["diff"], net.apply(params, state, x)[0], rtol=1e-6)
    assert left.shape == (4, 3)
    # activation statistics of a shared layer cover both inputs; the tap gradients exist
    stats = diagnostics.gradient_stats(
        net, lambda y, _: jnp.sum(y**2), params, state, x, None, train=False
    )
    assert set(stats["output_grad_norm"]) == set(outputs)
    both = jnp.concatenate([jnp.ravel(o) for o in outputs["pair/t"]])
    np.testing.assert_allclose(stats["activations"]["pair/t"]["mean"], jnp.mean(both), 1e-6)


def test_layer_shapes_rows_for_parallel_branches_and_shared_layers():
    net = fl.serial(
        fl.parallel(fl.Dense(3, name="l"), fl.Flatten(name="r"), name="par"),
        fl.Lambda(lambda ys: ys[0], name="first"),
    )
    assert fl.layer_shapes(net, (-1, 2, 2)) == [
        ("par/l", (-1, 3), 15),
        ("par/r", (-1, 4), 0),
        ("first", (-1, 3), 0),
    ]
    siamese = models.siamese_lenet()
    rows = fl.layer_shapes(siamese, ((-1, 28, 28, 1), (-1, 28, 28, 1)))
    assert [r[0] for r in rows][:2] == ["conv1", "pool1"] and rows[-1] == ("feat", (-1, 2), 22)


# ----------------------------------------------------------------------------- repr

LENET_REPR = """\
lenet: serial(
  conv1: Conv2D(20, kernel_size=5, lr_mult=(1.0, 2.0)),
  pool1: MaxPool(2, stride=2),
  conv2: Conv2D(50, kernel_size=5, lr_mult=(1.0, 2.0)),
  pool2: MaxPool(2, stride=2),
  ip1: Dense(500, w_init=xavier(...), b_init=constant(...), lr_mult=(1.0, 2.0)),
  relu1: ReLU(),
  ip2: Dense(10, w_init=xavier(...), b_init=constant(...), lr_mult=(1.0, 2.0)),
)"""


def test_repr_of_lenet_is_one_line_per_layer():
    assert repr(models.lenet()) == LENET_REPR


def test_repr_of_nested_containers_and_leaves():
    net = fl.serial(
        fl.Conv2D(8, 3, stride=2, padding=1, name="conv1"),
        fl.parallel(fl.Dropout(0.3), fl.serial(fl.ReLU(0.1), name="block"), name="par"),
        fl.shared(fl.Dense(4, bias=False, name="ip"), 3),
        fl.Lambda(jnp.tanh, name="squash"),
    )
    assert repr(net) == (
        "serial(\n"
        "  conv1: Conv2D(8, kernel_size=3, stride=2, padding=1),\n"
        "  par: parallel(\n"
        "    dropout_0: Dropout(0.3),\n"
        "    block: serial(\n"
        "      relu_0: ReLU(0.1),\n"
        "    ),\n"
        "  ),\n"
        "  shared_2: shared(\n"
        "    ip: Dense(4, bias=False),\n"
        "    num_inputs=3,\n"
        "  ),\n"
        "  squash: Lambda(tanh),\n"
        ")"
    )
    assert repr(fl.MaxPool(3, stride=2, rounding="floor", name="pool1")) == (
        "pool1: MaxPool(3, stride=2, rounding='floor')"
    )
    assert repr(fl.BatchNorm(momentum=0.9)) == "BatchNorm(momentum=0.9)"


def test_config_records_the_non_default_arguments_and_rebuilds_the_layer():
    conv = fl.Conv2D(16, (3, 5), padding=1, groups=2, impl="xla", name="c")
    assert conv.config == (
        ("num_output", 16),
        ("kernel_size", (3, 5)),
        ("padding", 1),
        ("groups", 2),
        ("impl", "xla"),
    )
    again = conv.constructor(**dict(conv.config), name=conv.name)
    assert repr(again) == repr(conv) and again.mults == conv.mults
    assert fl.ReLU().config == () and fl.ReLU(0.0).config == ()


def test_layers_stay_hashable_and_usable_as_static_arguments(key):
    model = models.lenet()
    assert hash(model) == hash(model) and model == model
    assert hash(fl.Conv2D(4, 3, w_init=fl.init.gaussian(0.1)))
    assert model.named("other") != model
    f = jax.jit(lambda m, x: x * 2, static_argnums=0)
    np.testing.assert_array_equal(f(model, jnp.ones(2)), 2 * jnp.ones(2))


# ----------------------------------------------------------------------------- errors


def conv_net():
    return fl.serial(fl.Conv2D(16, 5, name="conv1"), fl.ReLU(name="relu1"), name="net")


def test_errors_from_a_layer_name_its_path_once(key):
    _, params, state = conv_net().init(key, (-1, 32, 32, 3))
    with pytest.raises(ValueError) as e:
        conv_net().apply(params, state, jnp.ones((32, 32, 3)))
    assert str(e.value).startswith("conv1: conv2d: x must have rank 4 (NHWC)")
    assert e.value.layer_path == "conv1"
    nested = fl.serial(fl.Dense(3, name="ip"), fl.serial(conv_net(), name="block"))
    with pytest.raises(ValueError) as e:
        nested.init(key, (-1, 7))
    assert str(e.value) == ("block/net/conv1: Conv2D: input shape (-1, 3) must be NHWC (rank 4)")
    # a TypeError stays a TypeError; a parallel branch and a shared layer name their paths
    x16 = jnp.ones((1, 32, 32, 3), jnp.float16)
    with pytest.raises(TypeError, match=r"^conv1: conv2d: x has dtype float16"):
        conv_net().apply(params, state, x16)
    par = fl.parallel(fl.Dense(2, name="ok"), fl.Conv2D(2, 3, name="bad"), name="p")
    with pytest.raises(ValueError, match=r"^bad: Conv2D: input shape \(-1, 4\)"):
        par.init(key, (-1, 4))
    pair = fl.serial(fl.shared(conv_net(), 2, name="pair"))
    _, p2, s2 = pair.init(key, ((-1, 32, 32, 3),) * 2)
    with pytest.raises(ValueError, match=r"^pair/conv1: conv2d: x must have rank 4"):
        pair.apply(p2, s2, (jnp.ones((1, 32, 32, 3)), jnp.ones((32, 32, 3))))


def test_an_nchw_input_is_explained(key):
    _, params, state = conv_net().init(key, (-1, 32, 32, 3))
    with pytest.raises(ValueError) as e:
        conv_net().apply(params, state, jnp.ones((2, 3, 32, 32)))
    message = str(e.value)
    assert message.startswith("conv1: Conv2D: input of shape (2, 3, 32, 32) has 32 channels")
    assert "NHWC" in message and "channels last" in message and "last axis" in message
    assert "x.transpose(0, 2, 3, 1)" in message
    deconv = fl.serial(fl.Deconv2D(4, 2, stride=2, name="up"))
    _, params, state = deconv.init(key, (-1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"^up: Deconv2D: .* looks NCHW"):
        deconv.apply(params, state, jnp.ones((1, 3, 8, 8)))


@pytest.mark.parametrize(
    "layer_path,bad_shape,expected",
    [
        ("conv1/w", (5, 5, 3, 8), (5, 5, 3, 16)),  # 8-channel weights in a Conv2D(16)
        ("conv1/w", (5, 5, 8, 16), (5, 5, 3, 16)),  # weights for the wrong C_in
        ("conv1/w", (3, 3, 3, 16), (5, 5, 3, 16)),  # the wrong kernel
        ("conv1/b", (8,), (16,)),
    ],
)
def test_parameter_shapes_are_checked_against_the_configuration(
    key, layer_path, bad_shape, expected
):
    _, params, state = conv_net().init(key, (-1, 32, 32, 3))
    layer, param = layer_path.split("/")
    params[layer][param] = jnp.zeros(bad_shape)
    x = jnp.ones((2, 32, 32, 3))
    for apply in (conv_net().apply, jax.jit(conv_net().apply)):
        with pytest.raises(ValueError) as e:
            apply(params, state, x)
        assert str(e.value).startswith(f"{layer_path}: Conv2D: expected shape {expected}")
        assert f"got {bad_shape}" in str(e.value)
        assert e.value.layer_path == layer_path


def test_other_layers_check_their_parameters(key):
    net = fl.serial(
        fl.Dense(6, name="ip1"),
        fl.BatchNorm(name="bn1"),
        fl.PReLU(name="prelu1"),
        fl.Dense(2, bias=False, name="ip2"),
    )
    _, params, state = net.init(key, (-1, 4))
    x = jnp.ones((3, 4))
    cases = {
        ("ip1", "w"): (5, 6),
        ("ip1", "b"): (7,),
        ("bn1", "scale"): (5,),
        ("prelu1", "alpha"): (),
    }
    for (layer, param), bad in cases.items():
        broken = jax.tree.map(lambda a: a, params)
        broken[layer][param] = jnp.zeros(bad)
        with pytest.raises(ValueError, match=rf"^{layer}/{param}: .*got {re.escape(str(bad))}"):
            net.apply(broken, state, x)
    missing = jax.tree.map(lambda a: a, params)
    del missing["ip2"]["w"]
    with pytest.raises(ValueError, match=r"^ip2/w: Dense: parameter missing"):
        net.apply(missing, state, x)


def test_the_checks_cost_nothing_inside_jit(key):
    conv = fl.Conv2D(4, 3)
    _, params, state = conv.init(key, (-1, 8, 8, 2))
    x = jnp.ones((1, 8, 8, 2))
    checked = jax.make_jaxpr(functools.partial(conv.apply, train=False))(params, state, x)
    bare = jax.make_jaxpr(lambda p, x: fl.conv2d(x, p["w"], p["b"]))(params, x)
    assert len(checked.eqns) == len(bare.eqns)
