"""The Layer contract: init from shapes, apply, serial/parallel/shared naming and keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers.layers import Layer


@pytest.mark.parametrize(
    "layer,in_shape",
    [
        (fl.Conv2D(6, 5), (2, 28, 28, 1)),
        (fl.Conv2D(4, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2), (3, 9, 10, 4)),
        (fl.Conv2D(4, 3, impl="xla", bias=False), (1, 5, 5, 2)),
        (fl.Deconv2D(3, 4, stride=2, padding=1), (2, 5, 6, 2)),
        (
            fl.Deconv2D(4, 4, stride=2, padding=1, groups=4, bias=False, w_init=fl.init.bilinear()),
            (1, 3, 3, 4),
        ),
        (fl.Dense(10), (4, 3, 3, 2)),
        (fl.Flatten(), (4, 3, 3, 2)),
        (fl.Lambda(lambda x: x[:, ::2]), (4, 6, 3)),
    ],
)
def test_init_shape_equals_apply_shape(key, layer, in_shape):
    out_shape, params, state = layer.init(key, in_shape)
    x = jnp.ones(in_shape)
    y, new_state = layer.apply(params, state, x)
    assert y.shape == out_shape
    assert new_state == state
    # batch may be unknown at init time
    out_unknown, _, _ = layer.init(key, (-1, *in_shape[1:]))
    assert out_unknown == (-1, *out_shape[1:])


def test_init_never_runs_the_op(key):
    # A huge input shape: building any array of it would exhaust memory; init must not.
    out_shape, params, _ = fl.Conv2D(8, 3).init(key, (100_000, 4096, 4096, 3))
    assert out_shape == (100_000, 4094, 4094, 8)
    assert params["w"].shape == (3, 3, 3, 8) and params["b"].shape == (8,)


def test_serial_names_params_like_the_network(key):
    net = fl.serial(
        fl.Conv2D(20, 5, name="conv1"),
        fl.Conv2D(50, 5),
        fl.Flatten(),
        fl.Dense(10, name="ip2"),
    )
    out_shape, params, state = net.init(key, (-1, 28, 28, 1))
    assert out_shape == (-1, 10)
    assert list(params) == ["conv1", "conv2d_1", "flatten_2", "ip2"]
    assert params["conv1"]["w"].shape == (5, 5, 1, 20)
    assert params["conv2d_1"]["w"].shape == (5, 5, 20, 50)
    assert params["ip2"]["w"].shape == (20 * 20 * 50, 10)
    y, _ = net.apply(params, state, jnp.ones((2, 28, 28, 1)))
    assert y.shape == (2, 10)


def test_serial_splits_the_key_per_layer(key):
    net = fl.serial(fl.Dense(3, name="a"), fl.Dense(3, name="b"))
    _, params, _ = net.init(key, (-1, 3))
    assert not np.allclose(params["a"]["w"], params["b"]["w"])
    k_a, k_b = jax.random.split(key)
    _, pa, _ = fl.Dense(3).init(k_a, (-1, 3))
    _, pb, _ = fl.Dense(3).init(k_b, (-1, 3))
    np.testing.assert_array_equal(params["a"]["w"], pa["w"])
    np.testing.assert_array_equal(params["b"]["w"], pb["w"])


def _noise_layer(name=None):
    """A layer that needs a key in training: adds uniform noise; records the key it saw."""

    def init(key, shape):
        return shape, {}, {}

    def apply(params, state, x, *, key=None, train=False):
        if not train:
            return x, state
        if key is None:
            raise fl.layers.missing_key_error("noise")
        return x + jax.random.uniform(key, x.shape), state

    return Layer(init, apply, name=name, kind="noise", needs_key=True)


def test_serial_keys_reach_layers_and_missing_key_is_explained(key):
    net = fl.serial(fl.Flatten(), _noise_layer(), _noise_layer(name="n2"))
    _, params, state = net.init(key, (-1, 4))
    x = jnp.zeros((2, 4))
    y, _ = net.apply(params, state, x, key=key, train=True)
    k = jax.random.split(key, 3)
    want = jax.random.uniform(k[1], x.shape) + jax.random.uniform(k[2], x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    y_eval, _ = net.apply(params, state, x)
    np.testing.assert_array_equal(y_eval, x)
    with pytest.raises(ValueError, match=r"layer 'noise_1'.*pass key=jax.random.key"):
        net.apply(params, state, x, train=True)


def test_parallel_feeds_the_same_input(key):
    net = fl.parallel(fl.Dense(3, name="left"), fl.Flatten(name="right"))
    shapes, params, state = net.init(key, (-1, 2, 2))
    assert shapes == ((-1, 3), (-1, 4))
    x = jnp.arange(8.0).reshape(2, 2, 2)
    (a, b), _ = net.apply(params, state, x)
    np.testing.assert_allclose(a, x.reshape(2, 4) @ params["left"]["w"], rtol=1e-6)
    np.testing.assert_array_equal(b, x.reshape(2, 4))


def test_shared_uses_one_set_of_weights(key):
    embed = fl.serial(fl.Flatten(), fl.Dense(2, name="feat"))
    siamese = fl.shared(embed, 2)
    shapes, params, state = siamese.init(key, ((-1, 3, 3, 1), (-1, 3, 3, 1)))
    assert shapes == ((-1, 2), (-1, 2))
    assert jax.tree.structure(params) == jax.tree.structure(embed.init(key, (-1, 3, 3, 1))[1])
    x1, x2 = jnp.ones((4, 3, 3, 1)), 2 * jnp.ones((4, 3, 3, 1))
    (y1, y2), _ = siamese.apply(params, state, (x1, x2))
    np.testing.assert_allclose(y2, 2 * y1 - params["feat"]["b"][None, :], rtol=1e-6)
    # gradients from both branches add into the one weight
    g = jax.grad(lambda p: jnp.sum(siamese.apply(p, state, (x1, x2))[0][1]))(params)
    assert float(jnp.abs(g["feat"]["w"]).sum()) > 0


def test_container_errors(key):
    with pytest.raises(ValueError, match="two layers are named 'x'"):
        fl.serial(fl.Dense(2, name="x"), fl.Dense(2, name="x"))
    with pytest.raises(ValueError, match="needs at least one layer"):
        fl.serial()
    with pytest.raises(TypeError, match="argument 1 is builtin_function_or_method, not a Layer"):
        fl.serial(fl.Flatten(), abs)
    with pytest.raises(ValueError, match="must be a tuple of 2 shapes"):
        fl.shared(fl.Flatten()).init(key, (-1, 3))
    with pytest.raises(ValueError, match="the 2 input shapes must agree"):
        fl.shared(fl.Flatten()).init(key, ((-1, 3), (-1, 4)))
    with pytest.raises(ValueError, match="num_inputs=0 must be a positive int"):
        fl.shared(fl.Flatten(), 0)


def test_layer_constructor_errors(key):
    with pytest.raises(ValueError, match="Conv2D: num_output=0 must be a positive int"):
        fl.Conv2D(0, 3)
    with pytest.raises(ValueError, match="Conv2D: kernel_size=0 must be positive"):
        fl.Conv2D(4, 0)
    with pytest.raises(ValueError, match="Conv2D: groups=3 does not divide C_in=4"):
        fl.Conv2D(6, 3, groups=3).init(key, (-1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"Conv2D: input shape \(-1, 8, 4\) must be NHWC"):
        fl.Conv2D(6, 3).init(key, (-1, 8, 4))
    with pytest.raises(ValueError, match="kernel height 9 .* larger than the padded input"):
        fl.Conv2D(6, 9).init(key, (-1, 8, 8, 4))
    with pytest.raises(ValueError, match="Deconv2D: groups=2 does not divide num_output=3"):
        fl.Deconv2D(3, 2, groups=2)
    with pytest.raises(ValueError, match="Dense: num_output=-1 must be a positive int"):
        fl.Dense(-1)


def test_named_returns_a_renamed_copy():
    layer = fl.Dense(3)
    renamed = layer.named("ip1")
    assert renamed.name == "ip1" and layer.name is None
