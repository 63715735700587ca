"""The building-block layer constructors: init shapes from shapes alone, params and state,
keys, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlayers.layers import (
    ELU,
    LRN,
    AvgPool,
    BatchNorm,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    Maxout,
    MaxPool,
    PReLU,
    ReLU,
    Sigmoid,
    StochasticPool,
    Tanh,
    serial,
)

NHWC_SHAPES = [(2, 7, 7, 4), (1, 6, 9, 6), (3, 5, 4, 2)]


def _layers():
    return {
        "max_pool": MaxPool(3, stride=2),
        "max_pool_pad": MaxPool((3, 2), stride=(2, 1), padding=(1, 0), rounding="floor"),
        "avg_pool": AvgPool(3, stride=2, padding=1),
        "stochastic_pool": StochasticPool(2, stride=2),
        "global_avg": GlobalAvgPool(),
        "global_max": GlobalMaxPool(),
        "lrn": LRN(3, alpha=1e-4),
        "lrn_within": LRN(3, region="within_channel"),
        "batch_norm": BatchNorm(),
        "batch_norm_plain": BatchNorm(affine=False),
        "dropout": Dropout(0.5),
        "relu": ReLU(),
        "leaky_relu": ReLU(0.1),
        "prelu": PReLU(),
        "prelu_shared": PReLU(channel_shared=True),
        "elu": ELU(),
        "sigmoid": Sigmoid(),
        "tanh": Tanh(),
        "maxout": Maxout(2),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_init_shape_matches_apply_shape(key, name):
    layer = _layers()[name]
    for i, shape in enumerate(NHWC_SHAPES):
        out_shape, params, state = layer.init(key, shape)
        for train in (False, True):

            def apply(x, params=params, state=state, train=train):
                return layer.apply(params, state, x, key=key, train=train)[0]

            x = jnp.linspace(0.1, 2.0, np.prod(shape)).reshape(shape)
            # Run the layer on the first shape; trace it (no compilation) on the others.
            y = apply(x) if i == 0 else jax.eval_shape(apply, x)
            assert y.shape == out_shape, (name, shape, train)
        # The batch may be unknown; init never runs the op.
        unknown, _, _ = layer.init(key, (-1, *shape[1:]))
        assert unknown == (-1, *out_shape[1:])


def test_known_output_shapes(key):
    assert MaxPool(3, stride=2).init(key, (-1, 55, 55, 96))[0] == (-1, 27, 27, 96)
    assert MaxPool(3, stride=2).init(key, (-1, 112, 112, 64))[0] == (-1, 56, 56, 64)
    assert AvgPool(3, stride=2, rounding="floor").init(key, (-1, 112, 112, 64))[0] == (
        -1,
        55,
        55,
        64,
    )
    assert GlobalAvgPool().init(key, (8, 7, 7, 1024))[0] == (8, 1, 1, 1024)
    assert Maxout(4).init(key, (-1, 10, 12))[0] == (-1, 10, 3)
    assert ReLU().init(key, (-1, 500))[0] == (-1, 500)
    assert BatchNorm().init(key, (-1, 500))[0] == (-1, 500)


def test_kinds_name_layers_in_serial(key):
    net = serial(MaxPool(2), ReLU(), BatchNorm(), Dropout(0.5), PReLU(), LRN())
    _, params, state = net.init(key, (-1, 4, 4, 3))
    assert list(params) == ["max_pool_0", "relu_1", "batch_norm_2", "dropout_3", "prelu_4", "lrn_5"]
    assert list(state["batch_norm_2"]) == ["mean_acc", "var_acc", "scale_factor"]


def test_batch_norm_layer_params_state_and_affine(key, rng):
    layer = BatchNorm(momentum=0.9)
    _, params, state = layer.init(key, (-1, 3, 3, 2))
    assert jax.tree.map(jnp.shape, params) == {"scale": (2,), "shift": (2,)}
    np.testing.assert_array_equal(params["scale"], [1.0, 1.0])
    np.testing.assert_array_equal(params["shift"], [0.0, 0.0])
    assert jax.tree.map(jnp.shape, state) == {
        "mean_acc": (2,),
        "var_acc": (2,),
        "scale_factor": (1,),
    }
    assert BatchNorm(affine=False).init(key, (-1, 2))[1] == {}

    x = jnp.asarray(rng.normal(loc=1.0, size=(4, 3, 3, 2)), jnp.float32)
    y_plain, new_state = layer.apply(params, state, x, train=True)
    np.testing.assert_allclose(new_state["scale_factor"], [1.0])
    np.testing.assert_allclose(new_state["mean_acc"], x.mean(axis=(0, 1, 2)), rtol=1e-5)
    params2 = {"scale": jnp.asarray([2.0, 3.0]), "shift": jnp.asarray([1.0, -1.0])}
    y_affine, _ = layer.apply(params2, state, x, train=True)
    expected = y_plain * jnp.asarray([[[[2.0, 3.0]]]]) + jnp.asarray([[[[1.0, -1.0]]]])
    np.testing.assert_allclose(y_affine, expected, rtol=1e-5, atol=1e-6)
    # Eval leaves the state as it was.
    _, eval_state = layer.apply(params, new_state, x, train=False)
    assert eval_state is new_state
    # Gradients reach scale and shift.
    g = jax.grad(lambda p: layer.apply(p, state, x, train=True)[0][..., 0].sum())(params2)
    np.testing.assert_allclose(g["shift"], [x.shape[0] * 9, 0.0])


def test_prelu_layer_learns_alpha(key):
    _, params, _ = PReLU().init(key, (-1, 5, 5, 3))
    np.testing.assert_array_equal(params["alpha"], np.full(3, 0.25, np.float32))
    _, shared_params, _ = PReLU(channel_shared=True).init(key, (-1, 5, 5, 3))
    assert shared_params["alpha"].shape == ()
    x = -jnp.ones((1, 2, 2, 3))
    y, _ = PReLU().apply(params, {}, x)
    np.testing.assert_allclose(y, np.full((1, 2, 2, 3), -0.25))
    g = jax.grad(lambda p: PReLU().apply(p, {}, x)[0].sum())(params)
    np.testing.assert_allclose(g["alpha"], [-4.0, -4.0, -4.0])


def test_dropout_and_stochastic_pool_layers_need_a_key(key):
    x = jnp.ones((2, 4, 4, 3))
    for layer in (Dropout(0.5), StochasticPool(2)):
        assert layer.needs_key
        _, params, state = layer.init(key, x.shape)
        with pytest.raises(ValueError, match=r"train=True .* pass key=jax.random.key\(seed\)"):
            layer.apply(params, state, x, train=True)
        y, _ = layer.apply(params, state, x, train=False)  # no key needed at test time
        assert y.shape == layer.init(key, x.shape)[0]
    net = serial(ReLU(), Dropout(0.5, name="drop6"))
    _, params, state = net.init(key, x.shape)
    with pytest.raises(ValueError, match=r"'drop6'.*pass key=jax.random.key\(seed\)"):
        net.apply(params, state, x, train=True)
    y1, _ = net.apply(params, state, x, key=key, train=True)
    y2, _ = net.apply(params, state, x, key=key, train=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(net.apply(params, state, x)[0], x)


def test_a_small_network_trains_under_jit(key):
    net = serial(
        BatchNorm(name="bn1"),
        PReLU(name="prelu1"),
        ReLU(name="relu1"),
        MaxPool(3, stride=2, name="pool1"),
        Dropout(0.5, name="drop1"),
        Flatten(),
    )
    x = jax.random.normal(key, (4, 8, 8, 3))
    out_shape, params, state = net.init(key, (-1, 8, 8, 3))
    assert out_shape == (-1, 4 * 4 * 3)

    @jax.jit
    def step(params, state, x, key):
        def loss(p):
            y, new_state = net.apply(p, state, x, key=key, train=True)
            return jnp.sum(y**2), (y, new_state)

        (_, (y, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return y, new_state, grads

    y, new_state, grads = step(params, state, x, key)
    assert y.shape == (4, out_shape[1])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(new_state["bn1"]["scale_factor"], [1.0])
    assert jax.tree.map(jnp.shape, grads["bn1"]) == {"scale": (3,), "shift": (3,)}
    assert grads["prelu1"]["alpha"].shape == (3,)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: LRN(4), ValueError, "LRN: size=4 must be a positive odd int"),
        (lambda: LRN(region="cross"), ValueError, "LRN: region='cross' must be one of"),
        (lambda: Dropout(1.0), ValueError, r"Dropout: rate=1.0 is the drop probability"),
        (lambda: Dropout("half"), TypeError, "Dropout: rate='half' must be a real number"),
        (
            lambda: BatchNorm(momentum=1.5),
            ValueError,
            r"BatchNorm: momentum=1.5 must be in \[0, 1\]",
        ),
        (lambda: BatchNorm(eps=-1), ValueError, "BatchNorm: eps=-1 must be >= 0"),
        (lambda: BatchNorm(eps=None), TypeError, "BatchNorm: eps=None must be a real number"),
        (
            lambda: BatchNorm(momentum=[0.9]),
            TypeError,
            r"BatchNorm: momentum=\[0.9\] must be a real",
        ),
        (lambda: Maxout(0), ValueError, "Maxout: pieces=0 must be a positive int"),
        (lambda: MaxPool(0), ValueError, "MaxPool: window=0 must be positive"),
        (lambda: AvgPool(2, rounding="up"), ValueError, "AvgPool: rounding='up' must be one of"),
        (lambda: StochasticPool((2, 2, 2)), TypeError, "StochasticPool: window=.* must be an int"),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    ("layer", "shape", "match"),
    [
        (MaxPool(3, padding=3), (1, 5, 5, 2), r"MaxPool: padding=\(3, 3\) must be smaller"),
        (AvgPool(7), (1, 5, 5, 2), "AvgPool: window height 7 is larger than the padded input"),
        (MaxPool(2), (5, 5, 2), "MaxPool: x must have rank 4"),
        (StochasticPool(6), (1, 5, 5, 2), "StochasticPool: window height 6 is larger"),
        (GlobalMaxPool(), (5, 2), r"GlobalMaxPool: input shape \(5, 2\) must be NHWC"),
        (GlobalAvgPool(), (5, 2), r"GlobalAvgPool: input shape \(5, 2\) must be NHWC"),
        (Maxout(3), (1, 4), "Maxout: pieces=3 does not divide the channel count C=4"),
        (LRN(region="within_channel"), (2, 4), "LRN: region='within_channel' needs an NHWC"),
        (BatchNorm(), (4,), r"BatchNorm: input shape \(4,\) must be \(N, ..., C\)"),
        (PReLU(), (), r"PReLU: input shape \(\) has no channel axis"),
    ],
)
def test_init_errors(key, layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer.init(key, shape)
