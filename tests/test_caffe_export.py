"""fnlayers.caffe: the V1 prototxt format (Caffe's UpgradeV1Net), the .caffemodel writer
(save_caffemodel, the wire encoder) and to_prototxt, each checked by round trips through the
reader and against bytes derived by hand from the protobuf encoding spec."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_caffe_import import BRANCHY, DECONV, SHARED, _blob, _caffe_layout, _len_field

import fnlayers as fl
from fnlayers.caffe import load_net, parse, save_caffemodel, schema, to_prototxt, upgrade_v1
from fnlayers.caffe.wire import decode_blob, encode_blob, encode_varint, read_net, write_net

DATA = pathlib.Path(__file__).parent / "data" / "caffe"
LENET = DATA / "mnist__lenet.prototxt"
# Caffe's examples/mnist/lenet.prototxt as it was before commit e6c80dac4 ("Upgrade existing
# nets using upgrade_net_proto_text tool"): the V1 `layers { type: CONVOLUTION blobs_lr: 1 }`
# format, with input/input_dim in place of the Input layer
LENET_V1 = DATA / "mnist__lenet_v1.prototxt"
CIFAR = DATA / "cifar10__cifar10_quick.prototxt"
ALEXNET = DATA / "bvlc_alexnet__deploy.prototxt"


def _mults(net):
    lr, decay = fl.param_mults(net.model)
    tm = jax.tree_util.tree_map_with_path
    return tm(lr, net.params), tm(decay, net.params)


def _randomized(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tree)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- V1 format


def test_v1_type_table_spot_checks():
    # numbers read off caffe.proto's V1LayerParameter.LayerType at commit 9b89154
    expected = {4: "Convolution", 14: "InnerProduct", 17: "Pooling", 18: "ReLU", 15: "LRN",
                6: "Dropout", 20: "Softmax", 21: "SoftmaxWithLoss", 3: "Concat", 25: "Eltwise",
                8: "Flatten", 22: "Split", 33: "Slice", 19: "Sigmoid", 23: "TanH", 5: "Data",
                1: "Accuracy", 39: "Deconvolution", 0: ""}  # fmt: skip
    assert {k: schema.V1_LAYER_TYPES[k][1] for k in expected} == expected
    assert len(schema.V1_LAYER_TYPES) == 40 and sorted(schema.V1_LAYER_TYPES) == list(range(40))
    assert schema.V1_LAYER_TYPES[21][0] == "SOFTMAX_LOSS"


def test_v1_lenet_matches_current_format(key):
    old, new = load_net(LENET_V1), load_net(LENET)
    assert old.name == new.name == "LeNet"
    assert old.inputs == new.inputs == {"data": (64, 1, 28, 28)}
    assert old.outputs == new.outputs == ("prob",)
    assert old.layer_types == {k: v for k, v in new.layer_types.items() if v != "Input"}
    assert jax.tree.map(jnp.shape, old.params) == jax.tree.map(jnp.shape, new.params)
    assert _mults(old) == _mults(new)
    lr, decay = _mults(old)
    assert lr["conv1"] == {"w": 1.0, "b": 2.0} and decay["ip2"] == {"w": 1.0, "b": 1.0}
    # the same weights give the same outputs
    new = load_net(LENET, key=key)
    buf = save_caffemodel(None, new)
    old_w = load_net(LENET_V1, buf)
    _assert_trees_equal(old_w.params, load_net(LENET, buf).params)
    x = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))
    a, _ = old_w.model.apply(old_w.params, old_w.state, x)
    b, _ = new.model.apply(new.params, new.state, x)
    np.testing.assert_array_equal(a["prob"], b["prob"])


V1_NET = """
name: "v1"
input: "data" input_dim: 2 input_dim: 3 input_dim: 6 input_dim: 6
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
         blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
         convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layers { name: "drop" type: DROPOUT bottom: "conv" top: "conv" include { phase: TRAIN } }
layers { name: "ip" type: INNER_PRODUCT bottom: "conv" top: "ip" param: "shared_w"
         blobs_lr: 0 inner_product_param { num_output: 5 bias_term: false } }
layers { name: "prob" type: SOFTMAX bottom: "ip" top: "prob" }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss"
         loss_weight: 2 exclude { phase: TEST } }
"""


def test_upgrade_v1_fields():
    net = upgrade_v1(parse(V1_NET))
    assert "layers" not in net and net["input"] == ["data"]
    conv, relu, drop, ip, prob, loss = net["layer"]
    assert conv["type"] == ["Convolution"]
    assert conv["param"] == [
        {"lr_mult": [1], "decay_mult": [1]},
        {"lr_mult": [2], "decay_mult": [0]},
    ]
    assert conv["convolution_param"] == [{"num_output": [4], "kernel_size": [3]}]
    assert relu["relu_param"] == [{"negative_slope": [0.1]}]
    assert drop["type"] == ["Dropout"] and drop["include"] == [{"phase": ["TRAIN"]}]
    assert ip["param"] == [{"name": ["shared_w"], "lr_mult": [0]}]
    assert loss["type"] == ["SoftmaxWithLoss"] and loss["loss_weight"] == [2]
    assert loss["exclude"] == [{"phase": ["TEST"]}] and loss["bottom"] == ["ip", "label"]
    assert prob["type"] == ["Softmax"]


def test_v1_net_loads_with_its_multipliers():
    net = load_net(V1_NET)
    assert net.outputs == ("prob",)
    assert list(net.layer_types) == ["conv", "relu", "ip", "prob"]
    lr, decay = _mults(net)
    assert lr["conv"] == {"w": 1.0, "b": 2.0} and decay["conv"] == {"w": 1.0, "b": 0.0}
    assert lr["ip"] == {"w": 0.0}
    # in the train phase the excluded loss layer is kept; it reads a label the net lacks
    with pytest.raises(ValueError, match="'loss' reads blob 'label'"):
        load_net(V1_NET, phase="train")
    labelled = V1_NET.replace(
        'input: "data" input_dim: 2 input_dim: 3 input_dim: 6 input_dim: 6',
        'input: "data" input: "label" input_dim: 2 input_dim: 3 input_dim: 6 input_dim: 6 '
        "input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1",
    )
    train = load_net(labelled, phase="train")
    assert train.layer_types["loss"] == "SoftmaxWithLoss"
    assert train.outputs == ("loss", "prob") and train.loss_weights == {"loss": 2.0}


@pytest.mark.parametrize(
    "text, match",
    [
        ('layers { name: "x" type: BOGUS }', "BOGUS"),
        ('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }', "both"),
        ('layers { name: "x" type: RELU frobnicate: 1 }', "frobnicate"),
    ],
)
def test_v1_errors(text, match):
    with pytest.raises(ValueError, match=match):
        load_net('input: "d" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1\n' + text)


def test_v1_caffemodel_layers(key):
    """A V1 caffemodel (NetParameter.layers = 2; V1LayerParameter name = 4, type = 5 as its
    enum number, blobs = 6) loads into the current-format net."""
    new = load_net(LENET, key=key)
    v1 = b""
    for name, kind, blobs in read_net(save_caffemodel(None, new))[1]:
        number = {"Convolution": 4, "InnerProduct": 14}.get(kind)
        if number is None:
            continue
        msg = _len_field(4, name.encode()) + bytes([0x28, number])
        v1 += _len_field(2, msg + b"".join(_len_field(6, encode_blob(b)) for b in blobs))
    _, layers = read_net(v1)
    assert [(x.name, x.type) for x in layers] == [
        ("conv1", "Convolution"), ("conv2", "Convolution"),
        ("ip1", "InnerProduct"), ("ip2", "InnerProduct"),
    ]  # fmt: skip
    _assert_trees_equal(load_net(LENET_V1, v1).params, new.params)


# ----------------------------------------------------------------------------- the encoder


def test_encoder_bytes_by_hand():
    # the bytes test_caffe_import.test_blob_bytes_by_hand derives from the spec
    expected = bytes.fromhex("2a08 0000803f 00000040 3a03 0a01 02")
    assert encode_blob(np.array([1.0, 2.0])) == expected == _blob([1.0, 2.0])
    assert encode_varint(300) == bytes([0xAC, 0x02]) and encode_varint(1) == b"\x01"
    assert encode_varint(-1) == b"\xff" * 9 + b"\x01"
    # an empty blob: no data field (protobuf omits an empty packed field), shape dim 0
    assert encode_blob(np.zeros((0,))) == bytes.fromhex("3a03 0a01 00")
    # a 4-D blob round-trips through the decoder
    a = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) - 7.5
    np.testing.assert_array_equal(decode_blob(encode_blob(a)), a)
    # NetParameter: name (1) "n", layer (100: key 0xA2 0x06) {name (1) "a", type (2) "B"}
    assert write_net("n", [("a", "B", [])]) == bytes.fromhex("0a01 6e a206 06 0a0161 120142")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("path", [LENET, CIFAR, LENET_V1])
def test_save_load_round_trip(path, tmp_path):
    net = load_net(path)
    params = _randomized(net.params, 5)  # (CIFAR10-quick's deploy net has no fillers: zeros)
    out = tmp_path / "w.caffemodel"
    buf = save_caffemodel(str(out), net, params)
    assert out.read_bytes() == buf
    back = load_net(path, str(out))
    _assert_trees_equal(back.params, params)
    _assert_trees_equal(back.state, net.state)
    # Caffe's layouts in the file: OIHW convolutions, (out, K) inner products
    blobs = {x.name: x.blobs for x in read_net(buf)[1]}
    assert blobs["conv1"][0].shape[:2] == (net.params["conv1"]["w"].shape[3],
                                           net.params["conv1"]["w"].shape[2])  # fmt: skip
    k, n = net.params["ip1"]["w"].shape
    assert blobs["ip1"][0].shape == (n, k)
    np.testing.assert_array_equal(blobs["ip1"][0], np.asarray(params["ip1"]["w"]).T)


def test_lenet_blob_layout_matches_models(key):
    """The written ip1 blob is Caffe's: rows of fl.models.lenet's Dense permuted from HWC to
    the (C, H, W) flattening order (test_caffe_import's _caffe_layout, inverted here)."""
    m = fl.models.lenet()
    _, params, _ = m.init(key, (1, 28, 28, 1))
    ref = _caffe_layout(params, {"ip1": (4, 4, 50)})
    net = load_net(LENET, ref)
    saved = {x.name: x.blobs for x in read_net(save_caffemodel(None, net))[1]}
    for x in read_net(ref)[1]:
        for a, b in zip(x.blobs, saved[x.name], strict=True):
            np.testing.assert_array_equal(a, b)


def test_batchnorm_scale_round_trip():
    net = load_net(BRANCHY)
    rng = np.random.default_rng(4)
    state = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2, a.shape), a.dtype), net.state)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), net.params)
    buf = save_caffemodel(None, net, params, state)
    blobs = {x.name: x.blobs for x in read_net(buf)[1]}
    assert [b.shape for b in blobs["bn"]] == [(4,), (4,), (1,)]
    np.testing.assert_array_equal(blobs["bn"][0], state["bn"]["mean_acc"])
    np.testing.assert_array_equal(blobs["scale"][1], params["scale"]["bias"])
    assert blobs["split"] == [] and [b.shape for b in blobs["ip"]] == [(3, 4), (3,)]
    back = load_net(BRANCHY, buf)
    _assert_trees_equal(back.params, params)
    _assert_trees_equal(back.state, state)


def test_shared_and_deconvolution_round_trip():
    net = load_net(SHARED)
    net.params = _randomized(net.params, 1)
    buf = save_caffemodel(None, net)
    blobs = {x.name: x.blobs for x in read_net(buf)[1]}
    # Caffe writes a shared blob under every layer that uses it
    np.testing.assert_array_equal(blobs["conv_b"][0], blobs["conv_a"][0])
    assert len(blobs["ip_b"]) == 1 and blobs["ip_b"][0].shape == (3, 32)
    _assert_trees_equal(load_net(SHARED, buf).params, net.params)
    up = load_net(DECONV)
    up.params = _randomized(up.params, 2)
    buf = save_caffemodel(None, up)
    assert read_net(buf)[1][0].blobs[0].shape == (2, 3, 4, 4)  # Caffe: (C_in, C_out, kh, kw)
    _assert_trees_equal(load_net(DECONV, buf).params, up.params)


# ----------------------------------------------------------------------------- to_prototxt


@pytest.mark.parametrize("path", [LENET, CIFAR, ALEXNET, LENET_V1])
def test_to_prototxt_round_trip(path):
    net = load_net(path)
    text = to_prototxt(net)
    assert parse(text) == net.definition
    assert to_prototxt(parse(text)) == text
    if path == LENET_V1:
        assert "layers" not in text and 'type: "Convolution"' in text
    else:
        assert parse(text) == parse(path.read_text())
    assert "pool: MAX" in text  # enums written bare, strings quoted
    again = load_net(text)
    assert again.layer_types == net.layer_types and again.outputs == net.outputs


# ----------------------------------------------------------------------------- the catalogue

CATALOGUE = """
name: "catalogue"
input: "x" input_shape { dim: 2 dim: 3 dim: 2 dim: 2 }
input: "s" input_shape { dim: 2 dim: 3 }
layer { name: "block/prelu" type: "PReLU" bottom: "x" top: "block/prelu" }
layer { name: "block/prelu_shared" type: "PReLU" bottom: "x" top: "p2"
        prelu_param { channel_shared: true } }
layer { name: "block/bias" type: "Bias" bottom: "x" top: "b1" param { lr_mult: 3 } }
layer { name: "bias2" type: "Bias" bottom: "x" bottom: "s" top: "b2" bias_param { axis: 0 } }
layer { name: "scale2" type: "Scale" bottom: "x" bottom: "s" top: "s2"
        param { lr_mult: 2 decay_mult: 0 } scale_param { axis: 0 bias_term: true } }
layer { name: "scale1" type: "Scale" bottom: "x" top: "s1" param { lr_mult: 0.5 }
        scale_param { bias_term: true } }
layer { name: "ip_t" type: "InnerProduct" bottom: "x" top: "ip_t"
        inner_product_param { num_output: 2 transpose: true } }
layer { name: "ip_ax2" type: "InnerProduct" bottom: "x" top: "ip_ax2"
        inner_product_param { num_output: 2 axis: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "bn"
        batch_norm_param { use_global_stats: true } }
layer { name: "loss" type: "EuclideanLoss" bottom: "s1" bottom: "s2" top: "loss" }
"""


def test_catalogue_round_trip_in_caffes_blob_shapes():
    net = load_net(CATALOGUE)
    params, state = _randomized(net.params, 6), _randomized(net.state, 7)
    buf = save_caffemodel(None, net, params, state)
    blobs = {x.name: [b.shape for b in x.blobs] for x in read_net(buf)[1]}
    assert blobs == {
        "block/prelu": [(3,)], "block/prelu_shared": [()], "block/bias": [(3,)], "bias2": [],
        "scale2": [(2, 3)],  # the second bottom is the scale: only the bias is a blob
        "scale1": [(3,), (3,)], "ip_t": [(12, 2), (2,)],  # transposed: (K, num_output)
        "ip_ax2": [(2, 4), (2,)],  # axis 2: K = H * W
        "bn": [(3,), (3,), (1,)], "loss": [],
    }  # fmt: skip
    back = load_net(CATALOGUE, buf)
    _assert_trees_equal(back.params, params)
    _assert_trees_equal(back.state, state)
    # the prelu blob is the slope per channel, as stored
    stored = {x.name: x.blobs for x in read_net(buf)[1]}
    np.testing.assert_array_equal(stored["block/prelu"][0], params["block/prelu"]["alpha"])
    lr, decay = _mults(net)
    assert lr["block/bias"] == {"bias": 3.0} and lr["scale1"] == {"scale": 0.5, "bias": 1.0}
    assert lr["scale2"] == {"bias": 2.0} and decay["scale2"] == {"bias": 0.0}


def test_blob_count_must_match_the_layer():
    net = load_net(CATALOGUE)
    buf = write_net(None, [("scale2", "Scale", [np.zeros((2, 3)), np.zeros((2, 3))])])
    with pytest.raises(ValueError, match=r"'scale2' \(Scale\).*2 blobs.*has 1 \(bias\)"):
        load_net(CATALOGUE, buf)
    with pytest.raises(ValueError, match=r"'bias2' \(Bias\).*1 blobs.*has 0"):
        load_net(CATALOGUE, write_net(None, [("bias2", "Bias", [np.zeros(3)])]))
    assert net.layer_types["bias2"] == "Bias"
