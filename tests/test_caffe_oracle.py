"""Caffe's own outputs, as fixtures: nets written and run by the real Caffe
(``tests/data/caffe_oracle/make_fixtures.py``), imported here with their caffemodels.

Each net is a DAG Caffe's model zoo is made of: inception branches merged by Concat, a residual
block with BatchNorm + Scale and Eltwise, FCN upsampling by Deconvolution + Crop, and the
elementwise/reshaping catalogue (PReLU, ELU, AbsVal, BNLL, Power, Log, Exp, Threshold, Scale
with a second bottom, Bias, Slice, Flatten, Reshape, a transposed InnerProduct on axis 2,
Softmax, ArgMax)."""

from pathlib import Path

import jax
import numpy as np
import pytest

import fnlayers as fl
from fnlayers.caffe import wire
from fnlayers.tensor_ops import from_caffe_blob, to_caffe_blob

DATA = Path(__file__).parent / "data" / "caffe_oracle"
NETS = ("inception", "residual", "fcn", "catalogue")


def _caffe_outputs(name, net):
    fixture = np.load(DATA / f"{name}.npz")
    inputs = {
        k.removeprefix("input__"): from_caffe_blob(fixture[k])
        for k in fixture.files
        if k.startswith("input__")
    }
    x = inputs if len(inputs) > 1 else next(iter(inputs.values()))
    outs, _ = jax.jit(lambda p, s, x: net.model.apply(p, s, x, train=False))(
        net.params, net.state, x
    )
    expected = {
        k.removeprefix("output__"): fixture[k] for k in fixture.files if k.startswith("output__")
    }
    return {k: np.asarray(to_caffe_blob(v)) for k, v in outs.items()}, expected


@pytest.mark.parametrize("name", NETS)
def test_imported_net_gives_caffes_outputs(name):
    net = fl.caffe.load_net(DATA / f"{name}.prototxt", DATA / f"{name}.caffemodel")
    got, expected = _caffe_outputs(name, net)
    assert set(net.outputs) == set(expected)
    for blob, want in expected.items():
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got[blob], want, atol=2e-5 * scale, rtol=2e-5, err_msg=blob)


@pytest.mark.parametrize("name", NETS)
def test_exported_caffemodel_loads_back_the_same_weights_and_outputs(name, tmp_path):
    """Import Caffe's caffemodel, write it back, import that: the same weights and outputs."""
    net = fl.caffe.load_net(DATA / f"{name}.prototxt", DATA / f"{name}.caffemodel")
    path = tmp_path / f"{name}.caffemodel"
    fl.caffe.save_caffemodel(path, net)
    again = fl.caffe.load_net(DATA / f"{name}.prototxt", path)
    for a, b in zip(jax.tree.leaves(net.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(net.state), jax.tree.leaves(again.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    got, expected = _caffe_outputs(name, again)
    for blob, want in expected.items():
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got[blob], want, atol=2e-5 * scale, rtol=2e-5, err_msg=blob)


def _formula(size, *, offset=0.0):
    """make_fixtures.py's formula_weights / formula_input, computed here again."""
    i = np.arange(size, dtype=np.float64)
    return (0.05 * np.sin(0.37 * i + offset)).astype(np.float32)


@pytest.mark.parametrize("name", ["mnist__lenet", "cifar10__cifar10_quick"])
def test_caffes_reference_nets_give_caffes_outputs(name):
    """Caffe's own deploy prototxts with weights set blob by blob in Caffe's layouts."""
    prototxt = Path(__file__).parent / "data" / "caffe" / f"{name}.prototxt"
    net = fl.caffe.load_net(prototxt)
    # the blobs' Caffe shapes, from an export of the filler weights
    _, layers = wire.read_net(fl.caffe.save_caffemodel(None, net))
    written = []
    for k, layer in enumerate(lay for lay in layers if lay.blobs):
        blobs = [
            _formula(b.size, offset=1.3 * k + 0.7 * j).reshape(b.shape)
            for j, b in enumerate(layer.blobs)
        ]
        written.append((layer.name, layer.type, blobs))
    net = fl.caffe.load_net(prototxt, wire.write_net(net.name, written))
    (shape,) = net.inputs.values()
    size = int(np.prod(shape))
    x = (np.cos(0.11 * np.arange(size, dtype=np.float64)) ** 2).astype(np.float32)
    outs, _ = net.model.apply(net.params, net.state, from_caffe_blob(x.reshape(shape)))
    want = np.load(DATA / f"reference_{name}.npz")
    for key in want.files:
        got = np.asarray(to_caffe_blob(outs[key.removeprefix("output__")]))
        np.testing.assert_allclose(got, want[key], rtol=1e-5, atol=1e-6)
