"""fnlayers.caffe: the prototxt text parser, the protobuf wire decoder (checked against bytes
derived by hand from the protobuf encoding spec, and round trips through the encoder), and
load_net on Caffe's reference prototxts (copied under tests/data/caffe, BSD licence there)."""

import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlayers as fl
from fnlayers.caffe import load_net, parse
from fnlayers.caffe.prototxt import PrototxtError, first
from fnlayers.caffe.wire import (
    WireError,
    decode_blob,
    encode_blob,
    encode_varint,
    fields,
    len_field,
    read_net,
    write_net,
)

DATA = pathlib.Path(__file__).parent / "data" / "caffe"
LENET = DATA / "mnist__lenet.prototxt"
CIFAR = DATA / "cifar10__cifar10_quick.prototxt"
ALEXNET = DATA / "bvlc_alexnet__deploy.prototxt"
SIAMESE = DATA / "siamese__mnist_siamese.prototxt"


# ----------------------------------------------------------------------------- writing weights
# The library's encoder, pinned below (and in test_caffe_export.py) to bytes derived by hand
# from the protobuf encoding spec; field numbers of caffe.proto: NetParameter.layer=100,
# LayerParameter name=1 type=2 blobs=7, BlobProto data=5 shape=7, V1LayerParameter name=4 blobs=6.
_varint, _len_field, _blob = encode_varint, len_field, encode_blob


def _caffemodel(layers, name="net"):
    return write_net(name, layers)


# ----------------------------------------------------------------------------- the parser


def test_parse_text_format():
    text = r"""
    # a comment
    name: "net"  # trailing comment
    input: 'a\tb\"c\101\x42'
    layer { name: "x" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 } }
    layer: < name: "y" bottom: "x" bottom: "z" include { phase: TEST } >
    dims: [1, 2, 3] f: -1.5e-3 g: 7 h: 0x10 t: true u: false v: inf w: 2.5f
    s: "ab" "cd"
    """
    d = parse(text)
    assert d["name"] == ["net"]
    assert d["input"] == ['a\tb"cAB']
    assert len(d["layer"]) == 2
    pool = first(d["layer"][0], "pooling_param")
    assert pool == {"pool": ["MAX"], "kernel_size": [3]}
    assert d["layer"][1]["bottom"] == ["x", "z"]
    assert d["layer"][1]["include"] == [{"phase": ["TEST"]}]
    assert d["dims"] == [1, 2, 3]
    assert d["f"] == [-1.5e-3] and isinstance(d["g"][0], int) and d["h"] == [16]
    assert d["t"] == [True] and d["u"] == [False] and d["v"] == [float("inf")]
    assert d["w"] == [2.5] and d["s"] == ["abcd"]
    assert first(d, "missing", 4) == 4


@pytest.mark.parametrize(
    "text", ['name "x"', "layer { name: 1", "a: }", 'a: "unterminated', "a: @", "}"]
)
def test_parse_errors(text):
    with pytest.raises(PrototxtError, match="line"):
        parse(text)


@pytest.mark.parametrize(
    "path, name, n_layers",
    [(LENET, "LeNet", 9), (CIFAR, "CIFAR10_quick_test", 13), (ALEXNET, "AlexNet", 24),
     (SIAMESE, "mnist_siamese", 9)],
)  # fmt: skip
def test_parse_reference_prototxts(path, name, n_layers):
    d = parse(path.read_text())
    assert d["name"] == [name]
    assert len(d["layer"]) == n_layers
    dims = first(first(d["layer"][0], "input_param"), "shape")["dim"]
    assert dims[1:] in ([1, 28, 28], [3, 32, 32], [3, 227, 227])


# ----------------------------------------------------------------------------- the wire format


def test_blob_bytes_by_hand():
    # BlobProto{data: [1.0, 2.0], shape: {dim: [2]}}, fields in number order, from the spec:
    # data (5, length-delimited): key 5<<3|2 = 0x2A, length 8, 1.0f = 00 00 80 3F, 2.0f =
    # 00 00 00 40 (little endian); shape (7, LEN): key 0x3A, length 3, BlobShape: dim (1, packed
    # LEN) key 0x0A, length 1, varint 2.
    expected = bytes.fromhex("2a08 0000803f 00000040 3a03 0a01 02")
    assert _blob([1.0, 2.0]) == expected
    np.testing.assert_array_equal(decode_blob(expected), np.array([1.0, 2.0], np.float32))
    # the same blob with the fields in the other order, unpacked floats (wire type 5) and the
    # legacy 4-D shape: num 1 (key 0x08), channels 1 (0x10), height 1 (0x18), width 2 (0x20)
    legacy = bytes.fromhex("08011001180120022d0000803f2d00000040")
    np.testing.assert_array_equal(decode_blob(legacy), np.array([[[[1.0, 2.0]]]], np.float32))


def test_varints_and_fields():
    assert _varint(300) == bytes([0xAC, 0x02])
    assert fields(bytes([0x08, 0xAC, 0x02])) == [(1, 0, 300)]
    assert fields(_len_field(100, b"ab")) == [(100, 2, b"ab")]
    assert fields(bytes([0x0D]) + struct.pack("<f", 1.5)) == [(1, 5, struct.pack("<f", 1.5))]
    assert fields(bytes([0x09]) + struct.pack("<d", 1.5)) == [(1, 1, struct.pack("<d", 1.5))]
    with pytest.raises(WireError):
        fields(bytes([0x0A, 0x05, 0x01]))  # length past the end
    with pytest.raises(WireError):
        fields(bytes([0x08, 0x80]))  # truncated varint
    with pytest.raises(WireError):
        fields(bytes([0x0B]))  # wire type 3 (groups)


def test_read_net_current_and_v1():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    buf = _caffemodel([("ip", "InnerProduct", [w, np.ones(2)])], name="n")
    # a V1 layer (NetParameter.layers = 2): name = 4, type = 5 (enum), blobs = 6
    v1 = _len_field(4, b"old") + bytes([0x28, 14]) + _len_field(6, _blob([3.0]))
    buf += _len_field(2, v1)
    name, layers = read_net(buf)
    assert name == "n"
    # the V1 enum number 14 (INNER_PRODUCT) read as its current type string
    assert [(x.name, x.type) for x in layers] == [("ip", "InnerProduct"), ("old", "InnerProduct")]
    np.testing.assert_array_equal(layers[0].blobs[0], w)
    np.testing.assert_array_equal(layers[1].blobs[0], [3.0])


def test_blob_size_mismatch():
    bad = _len_field(5, np.zeros(3, "<f4").tobytes()) + _len_field(7, _len_field(1, b"\x02"))
    with pytest.raises(WireError, match="shape"):
        decode_blob(bad)


# ----------------------------------------------------------------------------- load_net


def _shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


def _caffe_layout(params, flatten_hwc):
    """fnlayers conv/Dense params as Caffe's blobs. flatten_hwc: {dense: (H, W, C)} for a
    Dense that follows a 4-D blob (its rows permuted from HWC to Caffe's CHW order)."""
    layers = []
    for name, p in params.items():
        if not p:
            continue
        w = np.asarray(p["w"])
        if w.ndim == 4:
            blob_w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            kind = "Convolution"
        else:
            if name in flatten_hwc:
                h, wd, c = flatten_hwc[name]
                w = w.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(h * wd * c, -1)
            blob_w = w.T
            kind = "InnerProduct"
        layers.append((name, kind, [blob_w, np.asarray(p["b"])]))
    return _caffemodel(layers)


def test_lenet_param_shapes_match_models():
    net = load_net(LENET)
    _, ref, _ = fl.models.lenet().init(jax.random.key(0), (-1, 28, 28, 1))
    assert net.inputs == {"data": (64, 1, 28, 28)}
    assert net.outputs == ("prob",)
    got = {k: v for k, v in _shapes(net.params).items() if v}
    assert got == {k: v for k, v in _shapes(ref).items() if v}


@pytest.mark.parametrize(
    "path, model, in_shape, flat",
    [
        (LENET, fl.models.lenet, (2, 28, 28, 1), {"ip1": (4, 4, 50)}),
        (CIFAR, fl.models.cifar10_quick, (2, 32, 32, 3), {"ip1": (4, 4, 64)}),
    ],
)
def test_weights_reproduce_models(path, model, in_shape, flat, key):
    m = model()
    _, params, state = m.init(key, in_shape)
    x = jax.random.normal(jax.random.key(1), in_shape)
    logits, _ = m.apply(params, state, x)
    buf = _caffemodel_with_extra(_caffe_layout(params, flat))
    net = load_net(path, buf)
    out, _ = net.model.apply(net.params, net.state, x, train=False)
    np.testing.assert_allclose(out["prob"], jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)


def _caffemodel_with_extra(buf):
    """Layers the net lacks (a loss layer) are ignored, as Caffe's CopyTrainedLayersFrom."""
    return buf + write_net(None, [("loss", "SoftmaxWithLoss", [])])


def test_weights_from_a_file(tmp_path, key):
    m = fl.models.lenet()
    _, params, _ = m.init(key, (1, 28, 28, 1))
    path = tmp_path / "lenet.caffemodel"
    path.write_bytes(_caffe_layout(params, {"ip1": (4, 4, 50)}))
    net = load_net(str(LENET), str(path))
    np.testing.assert_array_equal(net.params["conv1"]["w"], params["conv1"]["w"])
    np.testing.assert_array_equal(net.params["ip2"]["w"], params["ip2"]["w"])


def test_missing_prototxt_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_net(str(tmp_path / "absent.prototxt"))


def test_weights_that_do_not_fit(key):
    buf = _caffemodel([("conv1", "Convolution", [np.zeros((3, 1, 5, 5)), np.zeros(3)])])
    with pytest.raises(ValueError, match="conv1"):
        load_net(LENET, buf)


def test_alexnet_shapes():
    net = load_net(ALEXNET)
    assert net.inputs == {"data": (10, 3, 227, 227)}
    assert net.outputs == ("prob",)
    p = _shapes(net.params)
    assert p["conv1"] == {"w": (11, 11, 3, 96), "b": (96,)}
    assert p["conv2"] == {"w": (5, 5, 48, 256), "b": (256,)}  # group 2
    assert p["conv4"]["w"] == (3, 3, 192, 384) and p["conv5"]["w"] == (3, 3, 192, 256)
    assert p["fc6"]["w"] == (9216, 4096) and p["fc8"]["w"] == (4096, 1000)
    x = jax.ShapeDtypeStruct((1, 227, 227, 3), jnp.float32)
    out = jax.eval_shape(lambda x: net.model.apply(net.params, net.state, x)[0], x)
    assert out["prob"].shape == (1, 1000)


def test_siamese_deploy_uses_default_fillers():
    net = load_net(SIAMESE)
    assert net.outputs == ("feat",)
    # no weight_filler in the deploy file: Caffe's default filler, constant 0
    assert float(jnp.abs(net.params["conv1"]["w"]).sum()) == 0.0


PHASED = """
name: "phased"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 4
layer { name: "relu" type: "ReLU" bottom: "data" top: "a" }
layer { name: "t" type: "Sigmoid" bottom: "a" top: "train_only" include { phase: TRAIN } }
layer { name: "s" type: "TanH" bottom: "a" top: "test_only" include { phase: TEST } }
layer { name: "x" type: "TanH" bottom: "a" top: "not_test" exclude { phase: TEST } }
layer { name: "st" type: "TanH" bottom: "a" top: "staged" include { stage: "deploy" } }
layer { name: "lv" type: "TanH" bottom: "a" top: "leveled" include { min_level: 1 } }
"""


@pytest.mark.parametrize(
    "kw, outputs",
    [
        ({}, ("test_only",)),
        ({"phase": "train"}, ("not_test", "train_only")),  # sorted by name, as Caffe's
        ({"stages": ("deploy",)}, ("staged", "test_only")),
        ({"level": 2}, ("leveled", "test_only")),
    ],
)
def test_phase_rules(kw, outputs):
    net = load_net(PHASED, **kw)
    assert net.inputs == {"data": (2, 3, 4, 4)}
    assert net.outputs == outputs


def test_unsupported_layer():
    text = PHASED + 'layer { name: "mvn" type: "MVN" bottom: "a" top: "c" }'
    with pytest.raises(ValueError, match=r"'mvn'.*'MVN'.*supported: Convolution"):
        load_net(text)
    with pytest.raises(ValueError, match="phase"):
        load_net(PHASED, phase="val")


BRANCHY = """
name: "branchy"
input: "data"
input_shape { dim: 2 dim: 4 dim: 5 dim: 5 }
layer { name: "split" type: "Split" bottom: "data" top: "d1" top: "d2" }
layer { name: "slice" type: "Slice" bottom: "d1" top: "s1" top: "s2"
        slice_param { axis: 1 slice_point: 1 } }
layer { name: "concat" type: "Concat" bottom: "s2" bottom: "s1" top: "cat" }
layer { name: "sum" type: "Eltwise" bottom: "cat" bottom: "d2" top: "sum"
        eltwise_param { operation: SUM coeff: 1 coeff: -2 } }
layer { name: "bn" type: "BatchNorm" bottom: "sum" top: "sum" }
layer { name: "scale" type: "Scale" bottom: "sum" top: "sum" scale_param { bias_term: true } }
layer { name: "gpool" type: "Pooling" bottom: "sum" top: "g"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "g" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "out"
        inner_product_param { num_output: 3 } }
"""


def test_branchy_net_with_batchnorm_and_scale_weights():
    c = 4
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2, size=c)
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    w_ip, b_ip = rng.normal(size=(3, c)), rng.normal(size=3)
    factor = 2.0  # Caffe stores the sums, divided by the scale factor at use
    buf = _caffemodel(
        [
            ("bn", "BatchNorm", [mean * factor, var * factor, [factor]]),
            ("scale", "Scale", [gamma, beta]),
            ("ip", "InnerProduct", [w_ip, b_ip]),
        ]
    )
    net = load_net(BRANCHY, buf)
    assert net.outputs == ("out",)
    x = rng.normal(size=(2, 5, 5, c)).astype(np.float32)
    out, _ = net.model.apply(net.params, net.state, jnp.asarray(x), train=False)
    # numpy reference on Caffe's NCHW blob
    b = np.moveaxis(x, -1, 1).astype(np.float64)
    cat = np.concatenate([b[:, 1:], b[:, :1]], axis=1)
    s = cat - 2 * b
    s = (s - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    s = s * gamma[None, :, None, None] + beta[None, :, None, None]
    g = s.mean(axis=(2, 3))
    np.testing.assert_allclose(out["out"], g @ w_ip.T + b_ip, rtol=1e-4, atol=1e-5)


SHARED = """
name: "siamese_pair"
input: "a" input_shape { dim: 2 dim: 1 dim: 6 dim: 6 }
input: "b" input_shape { dim: 2 dim: 1 dim: 6 dim: 6 }
layer { name: "conv_a" type: "Convolution" bottom: "a" top: "ca"
        param { name: "cw" } param { name: "cb" }
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "conv_b" type: "Convolution" bottom: "b" top: "cb"
        param { name: "cw" } param { name: "cb" }
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "ca" top: "fa" param { name: "iw" }
        inner_product_param { num_output: 3 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "cb" top: "fb" param { name: "iw" }
        inner_product_param { num_output: 3 bias_term: false weight_filler { type: "xavier" } } }
"""


def test_shared_params_by_name():
    rng = np.random.default_rng(1)
    w, bias, w_ip = rng.normal(size=(2, 1, 3, 3)), rng.normal(size=2), rng.normal(size=(3, 32))
    # Caffe copies each layer's blobs in file order through the one shared blob: the last
    # layer holding it wins (here conv_b and ip_b, after conv_a's and ip_a's zeros)
    buf = _caffemodel(
        [
            ("conv_a", "Convolution", [w * 0, bias * 0]),
            ("ip_a", "InnerProduct", [w_ip * 0]),
            ("conv_b", "Convolution", [w, bias]),
            ("ip_b", "InnerProduct", [w_ip]),
        ]
    )
    net = load_net(SHARED, buf)
    assert net.inputs == {"a": (2, 1, 6, 6), "b": (2, 1, 6, 6)}
    assert net.outputs == ("fa", "fb")
    assert net.params["conv_b"] == {} and net.params["ip_b"] == {}
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 1)), jnp.float32)
    out, _ = net.model.apply(net.params, net.state, {"a": x, "b": x})
    np.testing.assert_allclose(out["fa"], out["fb"])
    # reference: Caffe's convolution on NCHW, then the (C, H, W)-ordered inner product
    xb = np.moveaxis(np.asarray(x, np.float64), -1, 1)
    conv = np.zeros((2, 2, 4, 4))
    for i in range(4):
        for j in range(4):
            conv[:, :, i, j] = np.einsum("ncij,ocij->no", xb[:, :, i : i + 3, j : j + 3], w)
    conv += bias[None, :, None, None]
    np.testing.assert_allclose(out["fa"], conv.reshape(2, -1) @ w_ip.T, rtol=1e-4, atol=1e-5)


DECONV = """
input: "x" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
layer { name: "up" type: "Deconvolution" bottom: "x" top: "y"
        convolution_param { num_output: 3 kernel_size: 4 stride: 2 pad: 1 } }
"""


def test_deconvolution_weights_follow_caffe():
    rng = np.random.default_rng(2)
    w, bias = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=3)  # Caffe: (C_in, C_out, kh, kw)
    net = load_net(DECONV, _caffemodel([("up", "Deconvolution", [w, bias])]))
    x = rng.normal(size=(1, 3, 3, 2))
    out, _ = net.model.apply(net.params, net.state, jnp.asarray(x, jnp.float32))
    # Caffe's deconvolution: col2im of W^T x (the convolution's backward pass), then crop pad
    xb = np.moveaxis(x, -1, 1)
    full = np.zeros((1, 3, 2 * 2 + 4, 2 * 2 + 4))
    for i in range(3):
        for j in range(3):
            full[:, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4] += np.einsum(
                "nc,cokl->nokl", xb[:, :, i, j], w
            )
    ref = full[:, :, 1:-1, 1:-1] + bias[None, :, None, None]  # (3 - 1) * 2 + 4 - 2 = 6
    np.testing.assert_allclose(out["y"], np.moveaxis(ref, 1, -1), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- train_test nets

LENET_TT = DATA / "mnist__lenet_train_test.prototxt"
CIFAR_TT = DATA / "cifar10__cifar10_quick_train_test.prototxt"
ALEXNET_TV = DATA / "bvlc_alexnet__train_val.prototxt"
SIAMESE_TT = DATA / "siamese__mnist_siamese_train_test.prototxt"
CIFAR_BN = DATA / "cifar10__cifar10_full_sigmoid_train_test_bn.prototxt"
GOOGLENET_TV = DATA / "bvlc_googlenet__train_val.prototxt"


def _abstract_net(path, **kw):
    """load_net with the fillers traced instead of drawn (no big arrays made): the CaffeNet's
    description, and its params' and state's shapes (its own params are tracers: unused)."""
    box = {}

    def load(k):
        box["net"] = load_net(path, key=k, **kw)
        return box["net"].params, box["net"].state

    params, state = jax.eval_shape(load, jax.random.key(0))
    return box["net"], params, state


# (path, the data top and its Caffe shape per phase (batch from the prototxt), data layer)
TRAIN_TEST = [
    (LENET_TT, "data", {"train": (64, 1, 28, 28), "test": (100, 1, 28, 28)}, "mnist"),
    (CIFAR_TT, "data", {"train": (100, 3, 32, 32), "test": (100, 3, 32, 32)}, "cifar"),
    (ALEXNET_TV, "data", {"train": (256, 3, 227, 227), "test": (50, 3, 227, 227)}, "data"),
    (CIFAR_BN, "data", {"train": (100, 3, 32, 32), "test": (1000, 3, 32, 32)}, "cifar"),
]


@pytest.mark.parametrize("phase", ["train", "test"])
@pytest.mark.parametrize(
    "path, top, shapes, layer", TRAIN_TEST, ids=lambda v: getattr(v, "stem", "")
)
def test_train_test_nets_import_in_both_phases(path, top, shapes, layer, phase):
    net, params, _ = _abstract_net(path, phase=phase, input_shapes={top: shapes[phase]})
    batch = shapes[phase][0]
    # the Data layer's tops are the inputs; the label's shape (batch_size,) is the prototxt's
    assert net.inputs == {top: shapes[phase], "label": (batch,)}
    assert list(net.data_layers) == [layer] and net.layer_types[layer] == "Data"
    assert first(first(net.data_layers[layer], "data_param"), "batch_size") == batch
    # Caffe's outputs, sorted by name; the loss weighs 1, Accuracy nothing
    assert net.outputs == (("loss",) if phase == "train" else ("accuracy", "loss"))
    assert net.loss_weights == {"loss": 1.0}
    deploy_like = {k: v for k, v in params.items() if v}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(deploy_like))
    x = {top: jax.ShapeDtypeStruct(_nhwc(shapes[phase]), jnp.float32),
         "label": jax.ShapeDtypeStruct((batch,), jnp.float32)}  # fmt: skip
    out = jax.eval_shape(lambda p, s, x: net.model.apply(p, s, x)[0], params, _, x)
    assert {k: v.shape for k, v in out.items()} == dict.fromkeys(net.outputs, ())


def _nhwc(shape):
    n, c, h, w = shape
    return (n, h, w, c)


def test_train_test_params_match_the_deploy_net():
    shapes = {"data": (64, 1, 28, 28)}
    train, params, _ = _abstract_net(LENET_TT, phase="train", input_shapes=shapes)
    deploy = load_net(LENET)

    def learned(tree):
        return {k: jax.tree.map(jnp.shape, v) for k, v in tree.items() if v}

    assert learned(params) == learned(deploy.params)
    assert train.layer_types["loss"] == "SoftmaxWithLoss" and "prob" not in train.layer_types


def test_data_tops_without_a_shape_need_input_shapes():
    with pytest.raises(ValueError, match=r"'mnist' \(Data\).*top 'data'.*input_shapes=") as err:
        load_net(LENET_TT)
    assert "'label'" not in str(err.value)  # the label's shape is in the prototxt
    with pytest.raises(ValueError, match=r"'images'.*not an input.*\['data', 'label'\]"):
        load_net(LENET_TT, input_shapes={"images": (1, 1, 28, 28)})
    with pytest.raises(ValueError, match=r"input_shapes\['data'\]"):
        load_net(LENET_TT, input_shapes={"data": (64, 0, 28, 28)})
    hdf5 = 'layer { name: "h5" type: "HDF5Data" top: "x" hdf5_data_param { batch_size: 4 } }'
    with pytest.raises(ValueError, match=r"'h5' \(HDF5Data\).*top 'x'"):
        load_net(hdf5 + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }')


DATA_LAYERS = """
name: "feeds"
layer { name: "mem" type: "MemoryData" top: "m" top: "m_label"
        memory_data_param { batch_size: 2 channels: 1 height: 4 width: 5 } }
layer { name: "dummy" type: "DummyData" top: "d1" top: "d2"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 dim: 4 dim: 5 } } }
layer { name: "legacy" type: "DummyData" top: "l"
        dummy_data_param { num: 2 channels: 1 height: 4 width: 5 } }
layer { name: "gray" type: "ImageData" top: "g" top: "g_label"
        image_data_param { source: "list.txt" batch_size: 2 new_height: 4 new_width: 5
                           is_color: false } }
layer { name: "crop" type: "ImageData" top: "c" top: "c_label"
        transform_param { crop_size: 3 } image_data_param { source: "list.txt" } }
layer { name: "in" type: "Input" top: "i1" top: "i2" input_param { shape { dim: 2 dim: 2 } } }
layer { name: "sum" type: "Eltwise" bottom: "m" bottom: "g" bottom: "l" bottom: "d2" top: "s"
        eltwise_param { coeff: 1 coeff: 10 coeff: 100 coeff: 1000 } }
layer { name: "quiet" type: "Silence" bottom: "m_label" bottom: "d1" bottom: "i1" bottom: "i2"
        bottom: "g_label" bottom: "c" bottom: "c_label" }
"""


def test_data_layer_shapes_from_the_prototxt():
    net = load_net(DATA_LAYERS)
    assert net.inputs == {
        "m": (2, 1, 4, 5), "m_label": (2,), "d1": (2, 3), "d2": (2, 1, 4, 5), "l": (2, 1, 4, 5),
        "g": (2, 1, 4, 5), "g_label": (2,), "c": (1, 3, 3, 3), "c_label": (1,), "i1": (2, 2),
        "i2": (2, 2),
    }  # fmt: skip
    assert list(net.data_layers) == ["mem", "dummy", "legacy", "gray", "crop"]
    assert net.data_layers["gray"]["image_data_param"][0]["source"] == ["list.txt"]
    assert net.outputs == ("s",) and net.loss_weights == {}
    feed = {k: jnp.ones(_from_caffe(s)) for k, s in net.inputs.items()}
    out, _ = net.model.apply(net.params, net.state, feed)
    np.testing.assert_array_equal(out["s"], np.full((2, 4, 5, 1), 1111.0))


def _from_caffe(shape):
    return (shape[0], *shape[2:], shape[1]) if len(shape) >= 3 else shape


STATE = """
name: "staged"
state { stage: "deploy" phase: TRAIN level: 3 }
input: "x" input_shape { dim: 1 dim: 2 }
layer { name: "d" type: "ReLU" bottom: "x" top: "d" include { stage: "deploy" } }
layer { name: "both" type: "TanH" bottom: "x" top: "both"
        include { stage: "deploy" stage: "extra" } }
layer { name: "train" type: "Sigmoid" bottom: "x" top: "train" include { phase: TRAIN } }
layer { name: "level" type: "Sigmoid" bottom: "x" top: "level" include { min_level: 1 } }
"""


def test_state_block_adds_stages_and_yields_phase_and_level():
    # the block's stage counts; its phase (TRAIN) and level (3) give way to the arguments
    assert load_net(STATE).outputs == ("d",)
    assert load_net(STATE, stages=("extra",)).outputs == ("both", "d")
    assert load_net(STATE, phase="train", level=1).outputs == ("d", "level", "train")
    with pytest.raises(ValueError, match="stages='extra'"):
        load_net(STATE, stages="extra")


def test_siamese_train_test_shares_one_array_per_param(key):
    shapes = {"pair_data": (2, 2, 28, 28), "sim": (2,)}  # both replace the prototxt's batch
    net = load_net(SIAMESE_TT, phase="train", input_shapes=shapes, key=key)
    assert net.inputs == shapes and net.outputs == ("loss",) and net.loss_weights == {"loss": 1.0}
    for name in ("conv1", "conv2", "ip1", "ip2", "feat"):
        assert net.params[f"{name}_p"] == {} and set(net.params[name]) == {"w", "b"}
    lr, _ = fl.param_mults(net.model)
    assert jax.tree_util.tree_map_with_path(lr, net.params)["conv1"] == {"w": 1.0, "b": 2.0}
    # the two towers are one function: equal halves give equal features, loss 0 when similar
    half = jax.random.normal(key, (2, 28, 28, 1))
    x = {"pair_data": jnp.concatenate([half, half], axis=-1), "sim": jnp.ones(2)}
    out, _ = net.model.apply(net.params, net.state, x)
    assert float(out["loss"]) == 0.0
    x["sim"] = jnp.zeros(2)  # dissimilar at distance 0: margin**2 / 2 per pair
    np.testing.assert_allclose(net.model.apply(net.params, net.state, x)[0]["loss"], 0.5)


def test_batchnorm_net_test_phase_uses_the_stored_statistics(key):
    shapes = {"data": (2, 3, 32, 32), "label": (2,)}
    net = load_net(CIFAR_BN, input_shapes=shapes, key=key)
    rng = np.random.default_rng(3)
    state = {
        name: {"mean_acc": jnp.asarray(rng.normal(size=s["mean_acc"].shape), jnp.float32),
               "var_acc": jnp.asarray(rng.uniform(1, 2, s["var_acc"].shape), jnp.float32),
               "scale_factor": jnp.asarray([2.0], jnp.float32)} if s else s
        for name, s in net.state.items()
    }  # fmt: skip
    seen = {}

    def record(path, leaf, params, st, x, **kw):
        y, new = leaf.apply(params, st, x, **kw)
        seen[path] = (x, y)
        return y, new

    x = {"data": jax.random.normal(key, (2, 32, 32, 3)), "label": jnp.array([1.0, 7.0])}
    out, new_state = fl.layers.apply_leaves(net.model, record, net.params, state, x)
    assert set(out) == {"accuracy", "loss"}
    _assert_trees_equal_np(new_state, state)  # the statistics are read, not updated
    bn_in, bn_out = (np.asarray(a, np.float64) for a in seen["bn2"])
    mean, var = np.asarray(state["bn2"]["mean_acc"]) / 2, np.asarray(state["bn2"]["var_acc"]) / 2
    np.testing.assert_allclose(bn_out, (bn_in - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def _assert_trees_equal_np(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_googlenet_layer_names_with_slashes():
    shapes = {"data": (32, 3, 224, 224)}
    net, params, _ = _abstract_net(GOOGLENET_TV, phase="train", input_shapes=shapes)
    assert net.outputs == ("loss1/loss1", "loss2/loss2", "loss3/loss3")
    assert net.loss_weights == {"loss1/loss1": 0.3, "loss2/loss2": 0.3, "loss3/loss3": 1.0}
    assert params["inception_3a/1x1"]["w"].shape == (1, 1, 192, 64)
    lr, decay = fl.param_mults(net.model)
    mults = jax.tree_util.tree_map_with_path(lambda p, a: (lr(p, a), decay(p, a)), params)
    assert mults["inception_3a/1x1"] == {"w": (1.0, 1.0), "b": (2.0, 0.0)}
    test, _, _ = _abstract_net(GOOGLENET_TV, input_shapes={"data": (50, 3, 224, 224)})
    assert test.outputs == tuple(
        f"loss{i}/{top}" for i in (1, 2, 3) for top in (f"loss{i}", "top-1", "top-5")
    )  # sorted by name: "loss1/loss1" < "loss1/top-1" < ... < "loss3/top-5"
