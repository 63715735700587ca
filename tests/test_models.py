"""The model zoo: shapes, Caffe names, fillers and multipliers from the prototxts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers import models


def mult_trees(model, params):
    """The lr_mult and decay_mult trees, shaped like params."""
    lr_fn, decay_fn = fl.param_mults(model)
    as_tree = jax.tree_util.tree_map_with_path
    return as_tree(lr_fn, params), as_tree(decay_fn, params)


@pytest.mark.parametrize(
    "make,in_shape,out_shape",
    [
        (models.lenet, (2, 28, 28, 1), (2, 10)),
        (models.cifar10_quick, (2, 32, 32, 3), (2, 10)),
        (models.cifar10_bn, (2, 32, 32, 3), (2, 10)),
        (lambda: models.fcn_tiny(3), (2, 16, 24, 1), (2, 16, 24, 3)),
    ],
)
def test_init_shapes_match_forward_pass(key, make, in_shape, out_shape):
    model = make()
    predicted, params, state = model.init(key, (-1, *in_shape[1:]))
    assert predicted == (-1, *out_shape[1:])
    apply = jax.jit(lambda p, s, x, k: model.apply(p, s, x, key=k, train=True))
    y, new_state = apply(params, state, jnp.ones(in_shape), key)
    assert y.shape == out_shape
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_alexnet_shapes_from_shapes_alone(key):
    model = models.alexnet()
    # Caffe's blob shapes: conv1 55x55, pool1 27, conv2 27, pool2 13, conv3-5 13, pool5 6.
    shapes = {}
    params = jax.eval_shape(lambda k: model.init(k, (-1, 227, 227, 3))[1], key)
    for name, layer_shape, _ in fl.layer_shapes(model, (-1, 227, 227, 3)):
        shapes[name] = layer_shape
    assert shapes["conv1"] == (-1, 55, 55, 96)
    assert shapes["pool1"] == (-1, 27, 27, 96)
    assert shapes["conv2"] == (-1, 27, 27, 256)
    assert shapes["pool2"] == (-1, 13, 13, 256)
    assert shapes["conv5"] == (-1, 13, 13, 256)
    assert shapes["pool5"] == (-1, 6, 6, 256)
    assert shapes["fc8"] == (-1, 1000)
    assert params["conv2"]["w"].shape == (5, 5, 48, 256)  # group 2
    assert params["fc6"]["w"].shape == (6 * 6 * 256, 4096)
    count = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
    assert count == 60_965_224  # Caffe's BVLC AlexNet parameter count


def test_alexnet_forward_traces_to_the_init_shape(key):
    # The whole forward pass traced abstractly (every op's shape rule runs, no FLOPs spent).
    model = models.alexnet(num_classes=7)
    _, params, state = jax.eval_shape(lambda k: model.init(k, (-1, 227, 227, 3)), key)
    x = jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32)
    y, _ = jax.eval_shape(
        lambda p, s, x, k: model.apply(p, s, x, key=k, train=True), params, state, x, key
    )
    assert y.shape == (2, 7)
    with pytest.raises(ValueError, match="pass key=jax.random.key"):
        jax.eval_shape(lambda p, s, x: model.apply(p, s, x, train=True), params, state, x)


def test_lenet_names_fillers_and_mults(key):
    model = models.lenet()
    _, params, _ = model.init(key, (-1, 28, 28, 1))
    assert [n for n in params if params[n]] == ["conv1", "conv2", "ip1", "ip2"]
    assert params["ip1"]["w"].shape == (4 * 4 * 50, 500)
    np.testing.assert_array_equal(params["conv1"]["b"], 0.0)
    limit = np.sqrt(3.0 / 25)  # xavier, fan_in = 1*5*5
    assert float(jnp.abs(params["conv1"]["w"]).max()) <= limit
    lr, decay = mult_trees(model, params)
    assert lr["conv1"] == {"w": 1.0, "b": 2.0} and lr["ip2"] == {"w": 1.0, "b": 2.0}
    assert decay["conv1"] == {"w": 1.0, "b": 1.0}
    assert jax.tree.structure(lr) == jax.tree.structure(params)


def test_cifar10_quick_fillers(key):
    _, params, _ = models.cifar10_quick().init(key, (-1, 32, 32, 3))
    np.testing.assert_allclose(float(jnp.std(params["conv1"]["w"])), 1e-4, rtol=0.1)
    np.testing.assert_allclose(float(jnp.std(params["ip1"]["w"])), 0.1, rtol=0.1)
    assert params["ip1"]["w"].shape == (4 * 4 * 64, 64)


def test_alexnet_mults_and_biases(key):
    model = models.alexnet()
    params = jax.eval_shape(lambda k: model.init(k, (-1, 227, 227, 3))[1], key)
    lr, decay = mult_trees(model, params)
    assert lr["conv2"] == {"w": 1.0, "b": 2.0} and decay["fc7"] == {"w": 1.0, "b": 0.0}
    assert decay["conv1"] == {"w": 1.0, "b": 0.0}


def test_cifar10_bn_has_state_and_no_conv_bias(key):
    model = models.cifar10_bn()
    _, params, state = model.init(key, (-1, 32, 32, 3))
    assert "b" not in params["conv1"] and params["bn1"] == {}
    assert set(state["bn1"]) and state["Sigmoid1"] == {}
    _, decay = mult_trees(model, params)
    assert decay["ip1"] == {"w": 1.0, "b": 0.0}
    x = jax.random.normal(key, (4, 32, 32, 3))
    _, new_state = model.apply(params, state, x, train=True)
    assert not np.allclose(jax.tree.leaves(new_state["bn1"])[0], jax.tree.leaves(state["bn1"])[0])
    _, same = model.apply(params, new_state, x, train=False)
    jax.tree.map(np.testing.assert_array_equal, same, new_state)


def test_siamese_shares_one_trunk(key):
    model = models.siamese_lenet()
    shapes, params, state = model.init(key, ((-1, 28, 28, 1), (-1, 28, 28, 1)))
    assert shapes == ((-1, 2), (-1, 2))
    assert "feat" in params and "conv1" in params
    x = jax.random.uniform(key, (3, 28, 28, 1))
    (a, b), _ = model.apply(params, state, (x, x))
    np.testing.assert_array_equal(a, b)
    lr, _ = mult_trees(model, params)
    assert lr["feat"] == {"w": 1.0, "b": 2.0}


def test_fcn_tiny_upsampling_is_frozen_bilinear(key):
    model = models.fcn_tiny(4)
    _, params, _ = model.init(key, (-1, 16, 16, 3))
    w = params["upscore"]["w"]
    assert w.shape == (8, 8, 1, 4)
    np.testing.assert_allclose(w[:, :, 0, 0], w[:, :, 0, 3])
    lr, decay = mult_trees(model, params)
    assert lr["upscore"] == {"w": 0.0} and decay["upscore"] == {"w": 0.0}
    with pytest.raises(ValueError, match="num_classes=0 must be a positive int"):
        models.fcn_tiny(0)


def test_summary_lists_layers_shapes_and_counts():
    text = fl.summary(models.lenet(), (-1, 28, 28, 1))
    lines = text.splitlines()
    assert any(
        line.split()[:1] == ["conv1"] and "(-1, 24, 24, 20)" in line and "520" in line
        for line in lines
    )
    assert any(line.split()[:1] == ["pool2"] and "(-1, 4, 4, 50)" in line for line in lines)
    assert "431,080" in text  # LeNet's parameter count: 520 + 25,050 + 400,500 + 5,010


@pytest.mark.parametrize(
    "name", ["lenet", "cifar10_quick", "alexnet", "siamese_lenet", "cifar10_bn"]
)
def test_models_take_the_convolution_impl(name):
    build = getattr(models, name)
    for impl in ("im2col", "xla"):
        convs = [n.layer for n in fl.walk(build(impl=impl)) if n.layer.kind == "conv2d"]
        assert convs and all(dict(c.config).get("impl", "im2col") == impl for c in convs)
    with pytest.raises(ValueError, match="impl='cudnn'"):
        build(impl="cudnn")
