"""graph: DAG networks of named blobs (ResNet, inception, Siamese); Concat and Eltwise."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import fnlayers as fl
from fnlayers import diagnostics
from fnlayers.graphs import Concat, Eltwise, graph


def ip(x, p):
    """Caffe's InnerProduct with the params ``p``."""
    return fl.dense(x, p["w"], p["b"])


def shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


def resnet_block(c=4, name=None):
    return graph(
        inputs="data",
        nodes=[
            (fl.Conv2D(c, 3, padding=1, name="conv1"), "data", "conv1"),
            (fl.ReLU(name="relu1"), "conv1", "conv1"),
            (fl.Conv2D(c, 3, padding=1, name="conv2"), "conv1", "conv2"),
            (Eltwise("sum", name="add"), ("data", "conv2"), "sum"),
        ],
        name=name,
    )


# ----------------------------------------------------------------------------- networks


def test_resnet_block_matches_a_hand_written_function(key, rng):
    net = resnet_block()
    out_shape, params, state = net.init(key, (-1, 6, 6, 4))
    assert out_shape == {"sum": (-1, 6, 6, 4)}
    assert list(params) == ["conv1", "relu1", "conv2", "add"]
    assert shapes(params["conv2"]) == {"w": (3, 3, 4, 4), "b": (4,)}
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    outs, new_state = net.apply(params, state, x)

    def by_hand(p, x):
        h = fl.conv2d(x, p["conv1"]["w"], p["conv1"]["b"], padding=1)
        h = jnp.maximum(h, 0)
        return x + fl.conv2d(h, p["conv2"]["w"], p["conv2"]["b"], padding=1)

    assert list(outs) == ["sum"]
    np.testing.assert_allclose(outs["sum"], by_hand(params, x), rtol=1e-5, atol=1e-5)
    assert new_state == state
    # gradients agree too (the data blob is read by conv1 and by the sum)
    g_net = jax.grad(lambda p, x: jnp.sum(net.apply(p, state, x)[0]["sum"] ** 2), (0, 1))
    g_ref = jax.grad(lambda p, x: jnp.sum(by_hand(p, x) ** 2), (0, 1))
    for a, b in zip(
        jax.tree.leaves(g_net(params, x)), jax.tree.leaves(g_ref(params, x)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_inception_concat_of_two_branches(key, rng):
    net = graph(
        inputs="data",
        nodes=[
            (fl.Conv2D(3, 1, name="b1x1"), "data", "b1"),
            (fl.Conv2D(5, 3, padding=1, name="b3x3"), "data", "b3"),
            (fl.MaxPool(3, stride=1, padding=1, name="pool"), "data", "bp"),
            (Concat(name="concat"), ("b1", "b3", "bp"), "out"),
        ],
        outputs="out",
    )
    out_shape, params, state = net.init(key, (-1, 5, 5, 2))
    assert out_shape == (-1, 5, 5, 3 + 5 + 2)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 2)), jnp.float32)
    y, _ = net.apply(params, state, x)
    ref = jnp.concatenate(
        [
            fl.conv2d(x, params["b1x1"]["w"], params["b1x1"]["b"]),
            fl.conv2d(x, params["b3x3"]["w"], params["b3x3"]["b"], padding=1),
            fl.max_pool(x, 3, stride=1, padding=1),
        ],
        axis=-1,
    )
    np.testing.assert_allclose(y, ref, rtol=1e-6)


def two_in_two_out():
    return graph(
        inputs=("a", "b"),
        nodes=[
            (fl.Dense(3, name="ipa"), "a", "ha"),
            (fl.Dense(3, name="ipb"), "b", "hb"),
            (Eltwise("sum", name="add"), ("ha", "hb"), "sum"),
            (Eltwise("prod", name="mul"), ("ha", "hb"), "prod"),
        ],
    )


def test_several_inputs_and_outputs(key, rng):
    net = two_in_two_out()
    out_shape, params, state = net.init(key, {"a": (-1, 2), "b": (-1, 5)})
    assert out_shape == {"sum": (-1, 3), "prod": (-1, 3)}
    # a tuple of shapes in the order of inputs does the same
    assert net.init(key, ((-1, 2), (-1, 5)))[0] == out_shape
    a = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    outs, _ = net.apply(params, state, {"a": a, "b": b})
    assert list(outs) == ["sum", "prod"]  # Caffe's rule: unconsumed tops, in node order
    ha = ip(a, params["ipa"])
    hb = ip(b, params["ipb"])
    np.testing.assert_allclose(outs["sum"], ha + hb, rtol=1e-5)
    np.testing.assert_allclose(outs["prod"], ha * hb, rtol=1e-5)
    tuple_outs, _ = net.apply(params, state, (a, b))
    np.testing.assert_array_equal(tuple_outs["sum"], outs["sum"])


def test_explicit_outputs_may_name_intermediate_blobs_and_inputs(key, rng):
    nodes = two_in_two_out().children
    net = graph(
        inputs=("a", "b"),
        nodes=[
            (nodes[0][1], "a", "ha"),
            (nodes[1][1], "b", "hb"),
            (nodes[2][1], ("ha", "hb"), "sum"),
        ],
        outputs=("ha", "sum", "a"),
    )
    out_shape, params, state = net.init(key, {"a": (-1, 2), "b": (-1, 5)})
    assert out_shape == {"ha": (-1, 3), "sum": (-1, 3), "a": (-1, 2)}
    a = jnp.ones((1, 2))
    outs, _ = net.apply(params, state, {"a": a, "b": jnp.ones((1, 5))})
    assert list(outs) == ["ha", "sum", "a"]
    np.testing.assert_array_equal(outs["a"], a)


def test_in_place_rewrites_the_blob_for_later_readers(key):
    scale2 = fl.Lambda(lambda x: 2 * x, name="double")
    net = graph(
        inputs="x",
        nodes=[
            (fl.Lambda(lambda x: x + 0, name="copy"), "x", "early"),  # reads the old value
            (scale2, "x", "x"),  # in place on an input
            (fl.Lambda(lambda x: x + 1, name="inc"), "x", "x"),  # in place again
            (fl.Lambda(lambda x: x, name="late"), "x", "late"),
        ],
        outputs=("early", "late", "x"),
    )
    _, params, state = net.init(key, (-1, 2))
    outs, _ = net.apply(params, state, jnp.array([[1.0, 3.0]]))
    np.testing.assert_array_equal(outs["early"], [[1, 3]])
    np.testing.assert_array_equal(outs["late"], [[3, 7]])
    np.testing.assert_array_equal(outs["x"], [[3, 7]])  # an output is the blob's final value


def test_in_place_relu_default_outputs():
    net = graph(
        inputs="x",
        nodes=[
            (fl.Dense(3, name="ip1"), "x", "ip1"),
            (fl.ReLU(name="relu1"), "ip1", "ip1"),
            (fl.Dense(2, name="ip2"), "ip1", "ip2"),
            (fl.ReLU(name="relu2"), "ip2", "ip2"),
        ],
    )
    assert net.init(jax.random.key(0), (-1, 4))[0] == {"ip2": (-1, 2)}


def test_a_blob_read_by_two_nodes_accumulates_its_gradient(key):
    net = graph(
        inputs="x",
        nodes=[
            (fl.Lambda(lambda x: 3 * x, name="left"), "x", "l"),
            (fl.Lambda(lambda x: x**2, name="right"), "x", "r"),
            (Eltwise("sum", name="add"), ("l", "r"), "y"),
        ],
        outputs="y",
    )
    _, params, state = net.init(key, (-1,))
    x = jnp.array([1.0, 2.0])
    g = jax.grad(lambda x: jnp.sum(net.apply(params, state, x)[0]))(x)
    np.testing.assert_allclose(g, 3 + 2 * x)


def test_a_layer_returning_a_tuple_feeds_several_tops(key, rng):
    net = graph(
        inputs="x",
        nodes=[
            (
                fl.parallel(fl.Dense(2, name="p"), fl.Dense(3, name="q"), name="par"),
                "x",
                ("p", "q"),
            ),
            (Concat(name="cat"), ("q", "p"), "pq"),
            (fl.parallel(fl.ReLU(), fl.Tanh(), name="both"), "pq", "pair"),  # a tuple in a blob
            (Eltwise("max", name="max"), "pair", "m"),
        ],
    )
    out_shape, params, state = net.init(key, (-1, 4))
    assert out_shape == {"m": (-1, 5)}
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    outs, _ = net.apply(params, state, x)
    p = ip(x, params["par"]["p"])
    q = ip(x, params["par"]["q"])
    pq = jnp.concatenate([q, p], -1)
    np.testing.assert_allclose(outs["m"], jnp.maximum(jnp.maximum(pq, 0), jnp.tanh(pq)), rtol=1e-5)


# ----------------------------------------------------------------------------- shared params


def siamese(shared=True):
    def tower(suffix):
        return [
            (fl.Conv2D(3, 3, name=f"conv1{suffix}"), f"data{suffix}", f"conv1{suffix}"),
            (fl.ReLU(name=f"relu1{suffix}"), f"conv1{suffix}", f"conv1{suffix}"),
            (fl.Flatten(name=f"flat{suffix}"), f"conv1{suffix}", f"flat{suffix}"),
            (fl.Dense(4, name=f"ip1{suffix}"), f"flat{suffix}", f"feat{suffix}"),
        ]

    share = {
        "conv1_w": ["conv1/w", "conv1_p/w"],
        "conv1_b": [("conv1", "b"), ("conv1_p", "b")],
        "ip1_w": ["ip1/w", "ip1_p/w"],
        "ip1_b": ["ip1/b", "ip1_p/b"],
    }
    return graph(
        inputs=("data", "data_p"),
        nodes=[*tower(""), *tower("_p")],
        shared_params=share if shared else None,
        name="siamese",
    )


def test_siamese_shared_params_are_one_array_and_sum_the_gradients(key, rng):
    net = siamese()
    in_shape = {"data": (-1, 5, 5, 1), "data_p": (-1, 5, 5, 1)}
    out_shape, params, state = net.init(key, in_shape)
    assert out_shape == {"feat": (-1, 4), "feat_p": (-1, 4)}
    # one copy: the second tower's entries are empty
    assert shapes(params["conv1"]) == {"w": (3, 3, 1, 3), "b": (3,)}
    assert params["conv1_p"] == {} and params["ip1_p"] == {}
    assert sum(a.size for a in jax.tree.leaves(params)) == 3 * 3 * 3 + 3 + 27 * 4 + 4
    assert "total                  " in fl.summary(net, in_shape)

    xa = jnp.asarray(rng.normal(size=(2, 5, 5, 1)), jnp.float32)
    xb = jnp.asarray(rng.normal(size=(2, 5, 5, 1)), jnp.float32)

    def loss(model, p):
        outs, _ = model.apply(p, state, {"data": xa, "data_p": xb})
        return fl.contrastive(outs["feat"], outs["feat_p"], jnp.array([1, 0]), margin=1.0)

    # the same net without sharing, each tower holding its own copy of the same values
    plain = siamese(shared=False)
    copies = {**params, "conv1_p": params["conv1"], "ip1_p": params["ip1"]}
    np.testing.assert_allclose(loss(net, params), loss(plain, copies), rtol=1e-6)
    g = jax.grad(lambda p: loss(net, p))(params)
    g_plain = jax.grad(lambda p: loss(plain, p))(copies)
    assert shapes(g) == shapes(params)
    for layer, twin in (("conv1", "conv1_p"), ("ip1", "ip1_p")):
        for leaf in ("w", "b"):
            np.testing.assert_allclose(
                g[layer][leaf], g_plain[layer][leaf] + g_plain[twin][leaf], rtol=1e-5, atol=1e-6
            )
            assert not np.allclose(g_plain[twin][leaf], 0)  # both towers contribute


def test_shared_params_inside_nested_containers_and_partial_sharing(key):
    net = graph(
        inputs="x",
        nodes=[
            (fl.serial(fl.Dense(3, name="ip"), name="a"), "x", "ya"),
            (fl.serial(fl.Dense(3, name="ip"), name="b"), "x", "yb"),
        ],
        shared_params={"w": ["a/ip/w", "b/ip/w"]},  # the biases stay separate
    )
    _, params, state = net.init(key, (-1, 2))
    assert shapes(params) == {"a": {"ip": {"w": (2, 3), "b": (3,)}}, "b": {"ip": {"b": (3,)}}}
    params = jax.tree.map(lambda a: a + 0, params)
    params["b"]["ip"]["b"] = params["b"]["ip"]["b"] + 1
    outs, _ = net.apply(params, state, jnp.ones((1, 2)))
    np.testing.assert_allclose(outs["yb"] - outs["ya"], 1.0, rtol=1e-6)
    # walk sees the reader's own part only
    nodes = {n.path: shapes(n.params) for n in fl.walk(net, params)}
    assert nodes["b/ip"] == {"b": (3,)}


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(nodes=[(fl.ReLU(name="r"), "nope", "y")]),
            "node 'r' reads blob 'nope', which is neither an input",
        ),
        (
            dict(
                nodes=[
                    (fl.ReLU(name="r1"), "h", "y"),
                    (fl.ReLU(name="r2"), "x", "h"),
                ]
            ),
            "node 'r1' reads blob 'h' before node 'r2' produces it",
        ),
        (
            dict(nodes=[(fl.ReLU(name="r"), "x", "y"), (fl.Tanh(name="r"), "y", "z")]),
            "nodes 0 and 1 are both named 'r'",
        ),
        (
            dict(nodes=[(fl.ReLU(name="r"), "x", "y")], outputs=("y", "zz")),
            "output blob 'zz' is neither an input nor a top of any node",
        ),
        (
            dict(nodes=[(fl.ReLU(name="r"), "x", "y")], outputs="zz"),
            "output blob 'zz'",
        ),
        (
            dict(nodes=[(fl.ReLU(name="r"), "x", "y"), (fl.Tanh(name="t"), "x", "y")]),
            "node 't' writes blob 'y', which is already a top of node 'r'; a node may rewrite "
            "a blob only in place",
        ),
        (
            dict(nodes=[(fl.ReLU(name="r"), "x", ("y", "y"))]),
            "node 'r' writes a blob twice",
        ),
        (
            dict(
                nodes=[(fl.Dense(2, name="a"), "x", "y")],
                shared_params={"w": ["a/w", "zz/w"]},
            ),
            "shared_params['w']: path 'zz/w' starts with 'zz', which is not a node",
        ),
        (
            dict(nodes=[(fl.Dense(2, name="a"), "x", "y")], shared_params={"w": ["a/w"]}),
            "shared_params['w'] must list at least two parameter paths",
        ),
        (
            dict(
                nodes=[(fl.Dense(2, name="a"), "x", "y"), (fl.Dense(2, name="b"), "x", "z")],
                shared_params={"w": ["a", "b"]},
            ),
            "path 'a' must name a node and a parameter inside it",
        ),
    ],
)
def test_construction_errors_name_the_node_and_the_blob(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        graph(inputs="x", **kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match=r"node 0 is .* not a \(layer, bottoms, tops\) triple"):
        graph(inputs="x", nodes=[(fl.ReLU(), "x")])
    with pytest.raises(TypeError, match="blob names must be non-empty str"):
        graph(inputs="x", nodes=[(fl.ReLU(), ("x", 3), "y")])
    with pytest.raises(ValueError, match="needs at least one node"):
        graph(inputs="x", nodes=[])


def test_init_and_apply_errors(key):
    mismatch = graph(
        inputs="x",
        nodes=[(fl.Dense(2, name="a"), "x", "y"), (fl.Dense(3, name="b"), "x", "z")],
        shared_params={"w": ["a/w", "b/w"]},
    )
    with pytest.raises(ValueError, match=r"'b/w' is float32\(2, 3\) but 'a/w'"):
        mismatch.init(key, (-1, 2))
    missing = graph(
        inputs="x",
        nodes=[(fl.Dense(2, name="a"), "x", "y"), (fl.Dense(2, bias=False, name="b"), "x", "z")],
        shared_params={"b": ["a/b", "b/b"]},
    )
    with pytest.raises(ValueError, match=r"node 'b' has no parameter 'b' \(it has \['w'\]\)"):
        missing.init(key, (-1, 2))

    net = two_in_two_out()
    _, params, state = net.init(key, {"a": (-1, 2), "b": (-1, 5)})
    with pytest.raises(ValueError, match=r"x has keys \['a'\], the graph's inputs are"):
        net.apply(params, state, {"a": jnp.ones((1, 2))})
    with pytest.raises(ValueError, match="or a tuple of 2 in that order"):
        net.apply(params, state, jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="params has no entry for node 'ipb'"):
        net.apply({"ipa": params["ipa"]}, state, (jnp.ones((1, 2)), jnp.ones((1, 5))))

    tops = graph(inputs="x", nodes=[(fl.ReLU(name="r"), "x", ("a", "b"))])
    with pytest.raises(ValueError, match=r"node 'r' has tops \('a', 'b'\), so its layer must"):
        tops.init(key, (-1, 2))

    # a child's own error comes back under the node's path
    bad = graph(inputs="x", nodes=[(fl.Conv2D(2, 3, name="conv"), "x", "y")])
    with pytest.raises(ValueError, match="conv: Conv2D: input shape"):
        bad.init(key, (-1, 2))


def test_shared_params_given_twice_is_an_error(key):
    net = siamese()
    in_shape = {"data": (-1, 5, 5, 1), "data_p": (-1, 5, 5, 1)}
    _, params, state = net.init(key, in_shape)
    x = {"data": jnp.ones((1, 5, 5, 1)), "data_p": jnp.ones((1, 5, 5, 1))}
    with pytest.raises(ValueError, match=r"params\['conv1_p'\] holds 'w', which shared_params"):
        net.apply({**params, "conv1_p": params["conv1"]}, state, x)


# ----------------------------------------------------------------------------- keys and state


def test_keys_are_split_per_node_like_serial(key):
    layers = [fl.Dense(4, name="ip"), fl.Dropout(0.5, name="drop"), fl.ReLU(name="relu")]
    chain = graph(
        inputs="x",
        nodes=[(layers[0], "x", "h"), (layers[1], "h", "h"), (layers[2], "h", "y")],
        outputs="y",
    )
    ref = fl.serial(*layers)
    _, params, state = chain.init(key, (-1, 3))
    _, ref_params, _ = ref.init(key, (-1, 3))
    np.testing.assert_array_equal(params["ip"]["w"], ref_params["ip"]["w"])
    x = jnp.ones((8, 3))
    run_key = jax.random.key(7)
    y, _ = chain.apply(params, state, x, key=run_key, train=True)
    y_ref, _ = ref.apply(params, state, x, key=run_key, train=True)
    np.testing.assert_array_equal(y, y_ref)
    assert chain.needs_key
    with pytest.raises(ValueError, match=r"graph \(node 'drop'\): train=True draws random"):
        chain.apply(params, state, x, train=True)
    chain.apply(params, state, x, train=False)  # no key needed to evaluate


def test_state_is_threaded_per_node(key, rng):
    net = graph(
        inputs="x",
        nodes=[(fl.BatchNorm(name="bn"), "x", "y"), (fl.ReLU(name="relu"), "y", "y")],
    )
    _, params, state = net.init(key, (-1, 3))
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    _, new_state = net.apply(params, state, x, train=True)
    assert set(new_state) == {"bn", "relu"}
    assert not np.allclose(new_state["bn"]["mean_acc"], state["bn"]["mean_acc"])


# ----------------------------------------------------------------------------- nesting


def test_graph_as_a_serial_stage_and_serial_as_a_node(key, rng):
    block = graph(
        inputs="in",
        nodes=[
            (fl.serial(fl.Conv2D(2, 3, padding=1, name="c"), fl.ReLU(), name="body"), "in", "b"),
            (Eltwise(name="add"), ("in", "b"), "out"),
        ],
        outputs="out",
        name="res",
    )
    net = fl.serial(fl.Conv2D(2, 1, name="stem"), block, fl.Flatten(), fl.Dense(10, name="ip"))
    out_shape, params, state = net.init(key, (-1, 4, 4, 1))
    assert out_shape == (-1, 10)
    assert shapes(params["res"]["body"]["c"]) == {"w": (3, 3, 2, 2), "b": (2,)}
    assert [n.path for n in fl.walk(net)] == [
        "",
        "stem",
        "res",
        "res/body",
        "res/body/c",
        "res/body/relu_1",
        "res/add",
        "flatten_2",
        "ip",
    ]
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)
    y, _ = net.apply(params, state, x)
    h = fl.conv2d(x, params["stem"]["w"], params["stem"]["b"])
    h = h + jnp.maximum(fl.conv2d(h, *params["res"]["body"]["c"].values(), padding=1), 0)
    ref = ip(h.reshape(2, -1), params["ip"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    # a graph nested in a graph, and a dict-output graph in serial feeding a Lambda
    outer = graph(inputs="x", nodes=[(resnet_block(2, name="inner"), "x", "y")])
    _, p2, s2 = outer.init(key, (-1, 4, 4, 2))
    outs, _ = outer.apply(p2, s2, jnp.ones((1, 4, 4, 2)))
    assert outs["y"]["sum"].shape == (1, 4, 4, 2)
    picked = fl.serial(resnet_block(2), fl.Lambda(lambda d: d["sum"]))
    assert picked.init(key, (-1, 4, 4, 2))[0] == (-1, 4, 4, 2)


def test_graph_takes_the_tuple_of_a_parallel_stage(key):
    merge = graph(
        inputs=("l", "r"),
        nodes=[(Eltwise("sum", coeffs=(1, -1), name="diff"), ("l", "r"), "d")],
        outputs="d",
    )
    net = fl.serial(fl.parallel(fl.Dense(2, name="a"), fl.Dense(2, name="b")), merge)
    _, params, state = net.init(key, (-1, 3))
    x = jnp.ones((1, 3))
    y, _ = net.apply(params, state, x)
    pa, pb = params["parallel_0"]["a"], params["parallel_0"]["b"]
    np.testing.assert_allclose(y, ip(x, pa) - ip(x, pb), rtol=1e-6)


# ----------------------------------------------------------------------------- tools


def test_summary_walk_param_mults_and_diagnostics(key, rng):
    net = graph(
        inputs="data",
        nodes=[
            (fl.Conv2D(2, 3, padding=1, lr_mult=(1, 2), name="conv1"), "data", "conv1"),
            (fl.ReLU(name="relu1"), "conv1", "conv1"),
            (Concat(name="cat"), ("data", "conv1"), "cat"),
            (fl.Flatten(name="flat"), "cat", "flat"),
            (fl.Dense(3, name="ip"), "flat", "ip"),
        ],
        name="net",
    )
    in_shape = (-1, 4, 4, 1)
    text = fl.summary(net, in_shape)
    assert text.splitlines()[1:] == [
        "conv1  (-1, 4, 4, 2)      20",
        "relu1  (-1, 4, 4, 2)       0",
        "cat    (-1, 4, 4, 3)       0",
        "flat   (-1, 48)            0",
        "ip     (-1, 3)           147",
        "total                    167",
    ]
    assert [(n.path, n.layer.kind) for n in fl.walk(net)] == [
        ("", "graph"),
        ("conv1", "conv2d"),
        ("relu1", "relu"),
        ("cat", "concat"),
        ("flat", "flatten"),
        ("ip", "dense"),
    ]
    _, params, state = net.init(key, in_shape)
    lr_mult, _ = fl.param_mults(net)
    mults = jax.tree_util.tree_map_with_path(lr_mult, params)
    assert mults["conv1"] == {"w": 1.0, "b": 2.0} and mults["ip"] == {"w": 1.0, "b": 1.0}

    x = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)

    def loss(p):
        return jnp.sum(net.apply(p, state, x)[0]["ip"] ** 2)

    grads = jax.grad(loss)(params)
    norms = diagnostics.grad_norms(net, grads)
    assert list(norms) == ["conv1", "ip"]
    np.testing.assert_allclose(
        norms["ip"],
        np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads["ip"]))),
        rtol=1e-5,
    )
    outs, _ = diagnostics.layer_outputs(net, params, state, x)
    assert list(outs) == ["conv1", "relu1", "cat", "flat", "ip"]
    np.testing.assert_allclose(outs["ip"], net.apply(params, state, x)[0]["ip"], rtol=1e-6)
    assert float(jnp.min(outs["relu1"])) >= 0


def test_repr_shows_the_nodes_and_the_wiring_arguments():
    text = repr(siamese())
    assert text.splitlines()[0] == "siamese: graph("
    assert "  conv1: Conv2D(3, kernel_size=3)," in text
    assert "  inputs=('data', 'data_p')," in text
    assert "'conv1_w': ['conv1/w', 'conv1_p/w']" in text
    assert repr(Eltwise("max")) == "Eltwise('max')"
    assert repr(Concat(0)) == "Concat(0)"


def test_fit_a_two_headed_graph_with_a_dict_loss():
    ds = fl.data.load_digits(12)
    net = graph(
        inputs="data",
        nodes=[
            (fl.Conv2D(4, 3, name="conv1"), "data", "conv1"),
            (fl.ReLU(name="relu1"), "conv1", "conv1"),
            (fl.Flatten(name="flat"), "conv1", "flat"),
            (fl.Dense(10, name="ip1"), "flat", "logits"),
            (fl.Dense(10, name="aux"), "flat", "aux"),
        ],
    )

    def loss_fn(outs, y):
        return fl.softmax_cross_entropy(outs["logits"], y) + 0.5 * fl.softmax_cross_entropy(
            outs["aux"], y
        )

    ts, history = fl.train.fit(
        net,
        loss_fn,
        fl.optim.sgd(0.1, momentum=0.9),
        (ds.x_train[:256], ds.y_train[:256]),
        batch_size=32,
        iterations=30,
        log_every=10,
        progress=False,
        diagnostics_every=10,
    )
    losses = history.column("loss")[1]
    assert losses[-1] < 0.6 * losses[0]
    assert "grad_norm/ip1" in history.records[-1] and "grad_norm/aux" in history.records[-1]
    preds = fl.train.predict(net, ts.params, ts.state, ds.x_test[:50])
    assert set(preds) == {"logits", "aux"} and preds["logits"].shape == (50, 10)


def test_fit_a_siamese_graph_on_tuple_inputs(rng):
    # fit passes a tuple of inputs (and their tuple of shapes) in the order of the graph's inputs
    xa, xb = (rng.normal(size=(32, 5, 5, 1)).astype(np.float32) for _ in range(2))
    similar = (rng.random(32) > 0.5).astype(np.int32)

    def loss_fn(outs, y):
        return fl.contrastive(outs["feat"], outs["feat_p"], y, margin=1.0)

    ts, history = fl.train.fit(
        siamese(),
        loss_fn,
        fl.optim.sgd(0.01),
        ((xa, xb), similar),
        batch_size=16,
        iterations=4,
        log_every=2,
        progress=False,
    )
    assert ts.params["conv1_p"] == {} and np.isfinite(history.column("loss")[1]).all()


def test_checkpoint_round_trip(key, tmp_path):
    net = siamese()
    _, params, state = net.init(key, {"data": (-1, 5, 5, 1), "data_p": (-1, 5, 5, 1)})
    path = tmp_path / "siamese.npz"
    fl.checkpoint.save(path, params)
    loaded = fl.checkpoint.load(path, like=params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    x = {"data": jnp.ones((1, 5, 5, 1)), "data_p": jnp.zeros((1, 5, 5, 1))}
    y, _ = net.apply(loaded, state, x)
    np.testing.assert_array_equal(y["feat"], net.apply(params, state, x)[0]["feat"])


def test_jit_and_check_grads(key, rng):
    net = graph(
        inputs=("a", "b"),
        nodes=[
            (fl.Dense(3, name="ipa"), "a", "ha"),
            (fl.Tanh(name="tanh"), "ha", "ha"),
            (fl.Dense(3, name="ipb"), "b", "hb"),
            (Eltwise("prod", name="mul"), ("ha", "hb"), "m"),
            (Eltwise("sum", coeffs=(0.5, -2.0), name="add"), ("m", "hb"), "s"),
            (Concat(name="cat"), ("s", "ha"), "out"),
        ],
        outputs="out",
        shared_params={"b": ["ipa/b", "ipb/b"]},
    )
    _, params, state = net.init(key, {"a": (-1, 2), "b": (-1, 2)})
    x = {
        "a": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
    }
    y, _ = jax.jit(net.apply)(params, state, x)
    np.testing.assert_allclose(y, net.apply(params, state, x)[0], rtol=1e-6)
    assert y.shape == (2, 6)

    def f(p, x):
        return net.apply(p, state, x)[0]

    with jax.enable_x64():
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), x)
        check_grads(f, (params64, x64), order=2, modes=("fwd", "rev"))


# ----------------------------------------------------------------------------- merge layers


def test_eltwise_operations_and_caffe_max_ties():
    a, b, c = jnp.array([1.0, 5.0, 2.0]), jnp.array([3.0, 5.0, 2.0]), jnp.array([3.0, 1.0, 2.0])
    run = lambda layer, *xs: layer.apply({}, {}, xs)[0]
    np.testing.assert_allclose(run(Eltwise(), a, b, c), a + b + c)
    np.testing.assert_allclose(run(Eltwise("sum", coeffs=[2, -1]), a, b), 2 * a - b)
    np.testing.assert_allclose(run(Eltwise("prod"), a, b, c), a * b * c)
    np.testing.assert_allclose(run(Eltwise("max"), a, b, c), [3, 5, 2])
    # the gradient goes to one input: between the first two the second wins a tie, a later input
    # only when strictly greater (Caffe's mask)
    grads = jax.grad(lambda xs: jnp.sum(run(Eltwise("max"), *xs)))((a, b, c))
    np.testing.assert_array_equal(np.stack(grads), [[0, 0, 0], [1, 1, 1], [0, 0, 0]])
    gprod = jax.grad(lambda xs: jnp.sum(run(Eltwise("prod"), *xs)))((a, b))
    np.testing.assert_allclose(gprod[0], b)
    assert Eltwise().init(None, ((-1, 3), (4, 3)))[0] == (4, 3)
    with pytest.raises(ValueError, match="coeffs=.* are only for operation='sum'"):
        Eltwise("max", coeffs=(1, 1))
    with pytest.raises(ValueError, match="operation='mean' must be one of"):
        Eltwise("mean")
    with pytest.raises(ValueError, match="3 coeffs for 2 inputs"):
        Eltwise(coeffs=(1, 1, 1)).init(None, ((2,), (2,)))
    with pytest.raises(ValueError, match="at least two inputs"):
        Eltwise().init(None, ((2, 3),))
    with pytest.raises(ValueError, match="must agree on every axis"):
        Eltwise().init(None, ((2, 3), (2, 4)))


def test_concat_axes_and_shapes():
    assert Concat().init(None, ((-1, 4, 4, 2), (-1, 4, 4, 3)))[0] == (-1, 4, 4, 5)
    assert Concat(0).init(None, ((2, 3), (5, 3)))[0] == (7, 3)
    assert Concat(0).init(None, ((-1, 3), (5, 3)))[0] == (-1, 3)
    assert Concat().init(None, (2, 3))[0] == (2, 3)  # one bottom passes through
    x, y = jnp.ones((2, 3)), jnp.zeros((1, 3))
    np.testing.assert_array_equal(Concat(0).apply({}, {}, (x, y))[0], jnp.concatenate([x, y]))
    np.testing.assert_array_equal(Concat().apply({}, {}, x)[0], x)
    with pytest.raises(ValueError, match="must agree on every axis but 1"):
        Concat(1).init(None, ((2, 3), (5, 3)))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        Concat(2).init(None, ((2, 3), (2, 3)))


def test_param_mults_of_a_layer_named_like_a_path_inside_another():
    """Caffe names layers "inception_3a/1x1"; a layer "a/b" beside a layer "a" keeps its own."""
    net = graph(
        "x",
        [
            (fl.Dense(3, lr_mult=(2.0, 4.0), name="a"), "x", "a"),
            (fl.Dense(3, lr_mult=(3.0, 5.0), name="a/b"), "a", "y"),
        ],
    )
    _, params, _ = net.init(jax.random.key(0), (-1, 4))
    lr_mult, _ = fl.param_mults(net)
    got = jax.tree_util.tree_map_with_path(lr_mult, params)
    assert got == {"a": {"w": 2.0, "b": 4.0}, "a/b": {"w": 3.0, "b": 5.0}}
