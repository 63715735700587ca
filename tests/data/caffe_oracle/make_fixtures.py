"""Writes the real-Caffe fixtures in this directory; run it with a Python that has pycaffe
(BVLC Caffe 1.0, CPU), from this directory:

    GLOG_minloglevel=2 python make_fixtures.py

Not run by the tests or CI: the tests read only what it wrote.

* ``<net>.prototxt`` (written here), ``<net>.caffemodel`` (``caffe.Net.save`` of the net with
  random weights drawn by the script) and ``<net>.npz``: ``input__<blob>`` (NCHW, as Caffe took
  it) and ``output__<blob>`` (every output blob Caffe computed in the TEST phase).
* ``reference_<net>.npz`` for Caffe's own deploy nets in ``../caffe/`` (LeNet, CIFAR10-quick):
  ``output__<blob>``, computed by Caffe on the input of :func:`formula_input` with the weights
  of :func:`formula_weights` (each a fixed function of the position, so neither a caffemodel
  nor the input needs to be stored: the test computes them again).
* The solver runs: ``train_net.prototxt`` (HDF5Data -> conv -> ReLU -> InnerProduct ->
  SoftmaxWithLoss) on ``train.h5`` (listed in ``train_h5.txt``), ``init.caffemodel`` (the
  starting weights every run loads), and per solver type ``solver_<type>.prototxt`` and
  ``<type>_iter_<N>.caffemodel``, Caffe's snapshot after N iterations, plus ``<type>_loss.npy``,
  the loss Caffe displayed at each iteration.
"""

import os

import caffe
import h5py
import numpy as np

caffe.set_mode_cpu()
RNG = np.random.default_rng(20261201)

NETS = {
    # inception-style branches merged by Concat, LRN, ceil-mode pooling, Softmax on axis 1
    "inception": """
name: "inception"
input: "data"
input_shape { dim: 2 dim: 3 dim: 12 dim: 12 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "inc/1x1" type: "Convolution" bottom: "conv1" top: "inc/1x1"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "inc/3x3_reduce" type: "Convolution" bottom: "conv1" top: "inc/3x3_reduce"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "inc/relu_3x3_reduce" type: "ReLU" bottom: "inc/3x3_reduce" top: "inc/3x3_reduce" }
layer { name: "inc/3x3" type: "Convolution" bottom: "inc/3x3_reduce" top: "inc/3x3"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "inc/pool" type: "Pooling" bottom: "conv1" top: "inc/pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "inc/pool_proj" type: "Convolution" bottom: "inc/pool" top: "inc/pool_proj"
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "inc/output" type: "Concat"
  bottom: "inc/1x1" bottom: "inc/3x3" bottom: "inc/pool_proj" top: "inc/output" }
layer { name: "pool2" type: "Pooling" bottom: "inc/output" top: "pool2"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm2" type: "LRN" bottom: "pool2" top: "norm2"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool3" type: "Pooling" bottom: "norm2" top: "pool3"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool3" top: "fc"
  inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
""",
    # a residual block: Convolution without bias, BatchNorm (stored statistics) + Scale,
    # Eltwise SUM with coefficients, PROD and MAX, global average pooling
    "residual": """
name: "residual"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn_conv1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale_conv1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true } }
layer { name: "conv1_relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "res2a_branch2a" type: "Convolution" bottom: "conv1" top: "res2a_branch2a"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2a_branch2a" type: "BatchNorm" bottom: "res2a_branch2a"
  top: "res2a_branch2a" batch_norm_param { use_global_stats: true } }
layer { name: "scale2a_branch2a" type: "Scale" bottom: "res2a_branch2a"
  top: "res2a_branch2a" scale_param { bias_term: true } }
layer { name: "res2a_branch2a_relu" type: "ReLU" bottom: "res2a_branch2a" top: "res2a_branch2a" }
layer { name: "res2a_branch2b" type: "Convolution" bottom: "res2a_branch2a" top: "res2a_branch2b"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2a_branch2b" type: "BatchNorm" bottom: "res2a_branch2b"
  top: "res2a_branch2b" batch_norm_param { use_global_stats: true } }
layer { name: "scale2a_branch2b" type: "Scale" bottom: "res2a_branch2b"
  top: "res2a_branch2b" scale_param { bias_term: true } }
layer { name: "res2a" type: "Eltwise" bottom: "conv1" bottom: "res2a_branch2b" top: "res2a"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }
layer { name: "gate" type: "Eltwise" bottom: "res2a" bottom: "conv1" top: "gate"
  eltwise_param { operation: PROD } }
layer { name: "pick" type: "Eltwise" bottom: "gate" bottom: "res2a_branch2a" top: "pick"
  eltwise_param { operation: MAX } }
layer { name: "pool" type: "Pooling" bottom: "pick" top: "pool"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param { num_output: 3 } }
""",
    # FCN-style upsampling: a stride-2 Deconvolution (grouped, bilinear) cropped back onto the
    # input by Crop, and a score summed with a skip branch
    "fcn": """
name: "fcn"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 10
input_dim: 10
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool1" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "upscore" type: "Deconvolution" bottom: "score" top: "upscore"
  convolution_param { num_output: 3 kernel_size: 4 stride: 2 group: 3 bias_term: false } }
layer { name: "score_skip" type: "Convolution" bottom: "conv1" top: "score_skip"
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "crop" type: "Crop" bottom: "upscore" bottom: "data" top: "crop"
  crop_param { axis: 2 offset: 1 } }
layer { name: "fuse" type: "Eltwise" bottom: "crop" bottom: "score_skip" top: "fuse" }
layer { name: "prob" type: "Softmax" bottom: "fuse" top: "prob" }
""",
    # the elementwise and reshaping catalogue, one after another
    "catalogue": """
name: "catalogue"
input: "data"
input_shape { dim: 2 dim: 4 dim: 5 dim: 5 }
input: "gain"
input_shape { dim: 2 dim: 4 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "prelu" }
layer { name: "elu" type: "ELU" bottom: "conv" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "abs" type: "AbsVal" bottom: "conv" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "conv" top: "bnll" }
layer { name: "power" type: "Power" bottom: "abs" top: "power"
  power_param { power: 1.5 scale: 0.5 shift: 1.0 } }
layer { name: "log" type: "Log" bottom: "power" top: "log"
  log_param { base: 2 scale: 1.5 shift: 0.25 } }
layer { name: "exp" type: "Exp" bottom: "elu" top: "exp" exp_param { scale: 0.5 shift: -0.1 } }
layer { name: "thresh" type: "Threshold" bottom: "conv" top: "thresh"
  threshold_param { threshold: 0.1 } }
layer { name: "gate" type: "Scale" bottom: "bnll" bottom: "gain" top: "gate"
  scale_param { axis: 0 } }
layer { name: "bias" type: "Bias" bottom: "log" top: "bias" }
layer { name: "scale_ch" type: "Scale" bottom: "exp" top: "scale_ch"
  scale_param { bias_term: true } }
layer { name: "mix" type: "Eltwise" bottom: "gate" bottom: "bias" bottom: "scale_ch"
  bottom: "thresh" bottom: "prelu" top: "mix" }
layer { name: "slice" type: "Slice" bottom: "mix" top: "mix_a" top: "mix_b"
  slice_param { axis: 1 slice_point: 1 } }
layer { name: "flat" type: "Flatten" bottom: "mix_b" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "flat" top: "reshape"
  reshape_param { shape { dim: 0 dim: 3 dim: -1 } } }
layer { name: "ip_t" type: "InnerProduct" bottom: "reshape" top: "ip_t"
  inner_product_param { num_output: 4 axis: 2 transpose: true } }
layer { name: "soft" type: "Softmax" bottom: "ip_t" top: "soft" softmax_param { axis: 1 } }
layer { name: "argmax" type: "ArgMax" bottom: "mix_a" top: "argmax"
  argmax_param { top_k: 2 out_max_val: true axis: 3 } }
""",
}


def _random_weights(net):
    """Gaussian weights (positive variances for BatchNorm) so that every blob matters."""
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        if kind == "BatchNorm":
            channels = blobs[0].data.shape[0]
            factor = 2.0
            blobs[0].data[...] = RNG.normal(0, 0.5, channels) * factor
            blobs[1].data[...] = RNG.uniform(0.5, 2.0, channels) * factor
            blobs[2].data[...] = factor
            continue
        for blob in blobs:
            blob.data[...] = RNG.normal(0, 0.5, blob.data.shape)


def write_nets():
    for name, text in NETS.items():
        with open(f"{name}.prototxt", "w") as f:
            f.write(text.lstrip())
        net = caffe.Net(f"{name}.prototxt", caffe.TEST)
        _random_weights(net)
        net.save(f"{name}.caffemodel")
        arrays = {}
        for blob in net.inputs:
            x = RNG.normal(0, 1, net.blobs[blob].data.shape).astype(np.float32)
            net.blobs[blob].data[...] = x
            arrays[f"input__{blob}"] = x
        out = net.forward()
        for blob in net.outputs:
            arrays[f"output__{blob}"] = np.array(out[blob], np.float32)
        np.savez(f"{name}.npz", **arrays)
        print(name, {k: v.shape for k, v in arrays.items()})


REFERENCE_NETS = ("mnist__lenet", "cifar10__cifar10_quick")


def formula_weights(layer_index: int, blob_index: int, size: int) -> np.ndarray:
    """The value of every element of a blob, by its flat position: small, varied and the same
    in any program that computes it (the test computes it again)."""
    i = np.arange(size, dtype=np.float64)
    return (0.05 * np.sin(0.37 * i + 1.3 * layer_index + 0.7 * blob_index)).astype(np.float32)


def formula_input(size: int) -> np.ndarray:
    return (np.cos(0.11 * np.arange(size, dtype=np.float64)) ** 2).astype(np.float32)


def write_reference_nets():
    for name in REFERENCE_NETS:
        net = caffe.Net(os.path.join("..", "caffe", f"{name}.prototxt"), caffe.TEST)
        for k, blobs in enumerate(net.params.values()):
            for j, blob in enumerate(blobs):
                blob.data[...] = formula_weights(k, j, blob.data.size).reshape(blob.data.shape)
        arrays = {}
        for blob in net.inputs:
            size = net.blobs[blob].data.size
            x = formula_input(size).reshape(net.blobs[blob].data.shape)
            net.blobs[blob].data[...] = x
        out = net.forward()
        for blob in net.outputs:
            arrays[f"output__{blob}"] = np.array(out[blob], np.float32)
        np.savez(f"reference_{name}.npz", **arrays)
        print(name, {k: v.shape for k, v in arrays.items()})


TRAIN_NET = """
name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train_h5.txt" batch_size: 4 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 3
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

ITERATIONS = 6

# the type-specific fields, on top of SOLVER_COMMON
SOLVERS = {
    "SGD": 'type: "SGD"\nmomentum: 0.9\nlr_policy: "step"\ngamma: 0.5\nstepsize: 2\n'
    "clip_gradients: 1.5\n",
    "Nesterov": 'type: "Nesterov"\nmomentum: 0.9\nlr_policy: "inv"\ngamma: 0.1\npower: 0.75\n'
    'regularization_type: "L1"\n',
    "AdaGrad": 'type: "AdaGrad"\nlr_policy: "fixed"\ndelta: 1e-6\niter_size: 2\n',
    "RMSProp": 'type: "RMSProp"\nlr_policy: "exp"\ngamma: 0.9\nrms_decay: 0.95\ndelta: 1e-6\n',
    "AdaDelta": 'type: "AdaDelta"\nmomentum: 0.95\ndelta: 1e-6\nlr_policy: "multistep"\n'
    "gamma: 0.5\nstepvalue: 2\nstepvalue: 4\n",
    "Adam": 'type: "Adam"\nmomentum: 0.9\nmomentum2: 0.999\ndelta: 1e-8\nlr_policy: "poly"\n'
    "power: 2\n",
}

SOLVER_COMMON = """net: "train_net.prototxt"
base_lr: {base_lr}
weight_decay: 0.01
max_iter: {iterations}
display: 1
snapshot: 3
snapshot_prefix: "{prefix}"
random_seed: 1
solver_mode: CPU
"""


def write_solver_runs():
    with open("train_net.prototxt", "w") as f:
        f.write(TRAIN_NET.lstrip())
    x = RNG.normal(0, 1, (10, 2, 5, 5)).astype(np.float32)
    y = RNG.integers(0, 3, 10).astype(np.float32)
    with h5py.File("train.h5", "w") as f:
        f["data"], f["label"] = x, y
    with open("train_h5.txt", "w") as f:
        f.write("train.h5\n")
    init = caffe.Net("train_net.prototxt", caffe.TRAIN)
    init.save("init.caffemodel")
    for kind, fields in SOLVERS.items():
        base_lr = 1.0 if kind == "AdaDelta" else 0.05
        path = f"solver_{kind}.prototxt"
        with open(path, "w") as f:
            f.write(SOLVER_COMMON.format(base_lr=base_lr, iterations=ITERATIONS, prefix=kind))
            f.write(fields)
        solver = caffe.get_solver(path)
        solver.net.copy_from("init.caffemodel")
        losses = []
        for _ in range(ITERATIONS):
            solver.step(1)
            losses.append(float(solver.net.blobs["loss"].data))
        np.save(f"{kind}_loss.npy", np.asarray(losses, np.float32))
        for n in (3, ITERATIONS):
            state = f"{kind}_iter_{n}.solverstate"
            if os.path.exists(state):  # only the caffemodel snapshots are fixtures
                os.remove(state)
        print(kind, losses)


if __name__ == "__main__":
    write_nets()
    write_reference_nets()
    write_solver_runs()
