"""The ``train`` suite: images/s of one full training step, fnlayers vs Flax vs PyTorch.

One step is forward, softmax cross-entropy loss, backward and an SGD update with momentum 0.9
and weight decay 5e-4, for Caffe's LeNet (batch 64), CIFAR10-quick (batch 100) and AlexNet
(batch 16 by default; dropout active). The networks:

* ``fnlayers`` / ``fnlayers-xla``: ``fnlayers.models.<name>()`` trained with
  ``fnlayers.train.make_train_step`` (one jitted step, donated buffers) and ``fnlayers.optim.sgd``
  with Caffe's per-parameter ``lr_mult``/``decay_mult`` (:func:`fnlayers.param_mults`). The
  ``-xla`` variant is the same model built with ``Conv2D(impl="xla")``
  (``lax.conv_general_dilated``).
* ``flax``: the same layers in Flax linen (``nn.Conv`` = ``lax.conv_general_dilated``,
  ``nn.max_pool``/``nn.avg_pool`` = ``lax.reduce_window``), with Caffe's ceil-mode pooling
  reproduced by one extra row/column of padding where it matters, so every activation has the
  fnlayers shape. The update is written by hand (no optax): Caffe's ``v = m*v + lr*(g + wd*w);
  w -= v`` on every leaf, one jitted step with donated buffers.
* ``torch``: the same layers as ``torch.nn`` modules (``ceil_mode=True`` pooling,
  ``LocalResponseNorm``), ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)``; timed in NCHW and
  channels-last and with ``torch.set_num_threads`` = all cores and = 1, keeping the fastest.

``dtype`` (float32, bfloat16 or float16) is the compute dtype; the parameters stay float32
everywhere (mixed precision): fnlayers through ``make_train_step(..., compute_dtype=dtype)``,
Flax through ``dtype=`` on every ``nn.Conv``/``nn.Dense`` (``param_dtype`` float32) with the
logits cast to float32 for the loss, PyTorch through ``torch.autocast`` on CUDA in ``dtype``
and on the CPU in bfloat16 (float16 on the CPU is skipped: PyTorch's CPU mixed precision is
bfloat16). No loss scaling: a float16 step of these networks is timed, not trained to
convergence, and scaling adds a multiply and a finiteness check that no peer does here.

Reported per model and framework: median step time and images/s over repeated steps after
warm-up, achieved TFLOP/s and its fraction of the matrix-product peak measured in the same run
and dtype (``jnp.dot`` of two n x n matrices, float32 accumulation), the first call (JAX:
``lower().compile()`` timed apart as compile time; PyTorch has no compile step, its first call
is reported instead), ratios of images/s against Flax and PyTorch
measured in the same run, and peak memory. Peak memory is measured in a fresh subprocess per
framework and model: the peak resident set (Linux ``VmHWM``, reset after the imports) after init,
compile and three steps, minus the resident set after the imports (the process baseline; a
child inherits its parent's ``ru_maxrss``, so that is not used on Linux); for JAX the
compiled step's ``memory_analysis()`` (arguments
+ outputs + temporaries, minus aliased donated buffers) is recorded as well.

The FLOPs of a step are counted analytically, the same for every framework: 2 x the weight's
size x the output positions of every convolution and inner-product layer (its forward product),
times 3 for forward and backward (the input and the weight gradients). This counts the first
layer's input gradient, which no framework computes, and leaves out pooling, LRN, the loss and
the update. XLA's own count of each compiled JAX step is recorded beside it (``xla_flops``); it
is not used because XLA counts a loop body once (the CPU's tiled convolutions) and its native
convolution leaves out padded taps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fnlayers as fl
from fnlayers.bench._harness import (
    check_dtype,
    environment,
    gemm_peak,
    markdown_table,
    on_gpu,
    publish,
    significant,
    throughput,
    time_callable,
    torch_device,
    xla_flops,
)

__all__ = ["FRAMEWORKS", "MODELS", "TINY_MODELS", "TrainCase", "run"]

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LEARNING_RATE = 0.001


@dataclasses.dataclass(frozen=True)
class TrainCase:
    name: str  # lenet | cifar10_quick | alexnet
    batch: int
    hw: int
    channels: int
    classes: int

    @property
    def in_shape(self):
        return (self.batch, self.hw, self.hw, self.channels)


MODELS = (
    TrainCase("lenet", 64, 28, 1, 10),
    TrainCase("cifar10_quick", 100, 32, 3, 10),
    TrainCase("alexnet", 16, 227, 3, 1000),
)
QUICK_MODELS = MODELS[:2]
# For the smoke test: the smallest batches, every code path, a few seconds.
TINY_MODELS = (TrainCase("lenet", 2, 28, 1, 10),)
FRAMEWORKS = ("fnlayers", "fnlayers-xla", "flax", "torch")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _data(case: TrainCase, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.in_shape).astype(np.float32)
    y = rng.integers(0, case.classes, case.batch).astype(np.int32)
    return x, y


# ----------------------------------------------------------------------------- fnlayers


def model_flops(case: TrainCase) -> float:
    """The analytic FLOPs of one train step of ``fnlayers.models.<case.name>`` at
    ``case.batch``: 3 x the forward products of its convolution and inner-product layers (see
    the module docstring)."""
    model = getattr(fl.models, case.name)(case.classes)
    shapes = {name: out for name, out, _ in fl.layers.layer_shapes(model, case.in_shape)}
    _, params, _ = jax.eval_shape(lambda k: model.init(k, case.in_shape), jax.random.key(0))
    forward = 0.0
    for node in fl.layers.walk(model, params):
        if node.layer.kind in ("conv2d", "dense"):
            out = shapes[node.label]
            positions = int(np.prod(out[:-1]))  # N*OH*OW for a convolution, N for a dense layer
            forward += 2.0 * positions * int(np.prod(node.params["w"].shape))
    return 3.0 * forward


def build_fnlayers(case: TrainCase, impl: str = "im2col", dtype: str = "float32"):
    """``(step, train_state)`` for ``fnlayers.models.<case.name>``; ``step(ts, x, y)`` donates
    ``ts``. A ``dtype`` other than float32 is the step's ``compute_dtype`` (the parameters stay
    float32)."""
    model = getattr(fl.models, case.name)(case.classes, impl=impl)
    lr_mult, decay_mult = fl.param_mults(model)
    opt = fl.optim.sgd(
        LEARNING_RATE,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        lr_mult=lr_mult,
        decay_mult=decay_mult,
    )
    ts = fl.train.create_train_state(model, opt, case.in_shape, jax.random.key(0))
    # float32 is the plain step, with no precision policy at all.
    mixed = {} if dtype == "float32" else {"compute_dtype": jnp.dtype(dtype)}
    step = fl.train.make_train_step(model, fl.losses.softmax_cross_entropy, opt, **mixed)
    return step, ts


# ----------------------------------------------------------------------------- flax


def _flax_lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    # In float32 whatever x's dtype, as fnlayers' LRN computes it.
    xa = x.astype(jnp.float32)
    half = size // 2
    sq = jnp.pad(jnp.square(xa), ((0, 0), (0, 0), (0, 0), (half, half)))
    c = x.shape[-1]
    s = sum(sq[..., i : i + c] for i in range(size))
    return (xa * (k + (alpha / size) * s) ** -beta).astype(x.dtype)


def _flax_module(case: TrainCase, dtype: str = "float32"):
    import functools

    import flax.linen as nn

    # Caffe rounds pooled sizes up; one extra row/column on the far side gives the same shapes.
    ceil_pad = ((0, 1), (0, 1))
    # Computed in dtype, parameters kept float32: the same mixed precision as fnlayers' step.
    mixed = dict(dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    Conv = functools.partial(nn.Conv, **mixed)
    Dense = functools.partial(nn.Dense, **mixed)

    class LeNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = Conv(20, (5, 5), padding="VALID")(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = Conv(50, (5, 5), padding="VALID")(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.relu(Dense(500)(x.reshape(x.shape[0], -1)))
            return Dense(case.classes)(x)

    class Cifar10Quick(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = Conv(32, (5, 5), padding=2)(x)
            x = nn.relu(nn.max_pool(x, (3, 3), (2, 2), padding=ceil_pad))
            x = nn.relu(Conv(32, (5, 5), padding=2)(x))
            x = nn.avg_pool(x, (3, 3), (2, 2), padding=ceil_pad)
            x = nn.relu(Conv(64, (5, 5), padding=2)(x))
            x = nn.avg_pool(x, (3, 3), (2, 2), padding=ceil_pad)
            x = Dense(64)(x.reshape(x.shape[0], -1))
            return Dense(case.classes)(x)

    class AlexNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.relu(Conv(96, (11, 11), (4, 4), padding="VALID")(x))
            x = nn.max_pool(_flax_lrn(x), (3, 3), (2, 2))
            x = nn.relu(Conv(256, (5, 5), padding=2, feature_group_count=2)(x))
            x = nn.max_pool(_flax_lrn(x), (3, 3), (2, 2))
            x = nn.relu(Conv(384, (3, 3), padding=1)(x))
            x = nn.relu(Conv(384, (3, 3), padding=1, feature_group_count=2)(x))
            x = nn.relu(Conv(256, (3, 3), padding=1, feature_group_count=2)(x))
            x = nn.max_pool(x, (3, 3), (2, 2)).reshape(x.shape[0], -1)
            x = nn.Dropout(0.5, deterministic=not train)(nn.relu(Dense(4096)(x)))
            x = nn.Dropout(0.5, deterministic=not train)(nn.relu(Dense(4096)(x)))
            return Dense(case.classes)(x)

    return {"lenet": LeNet, "cifar10_quick": Cifar10Quick, "alexnet": AlexNet}[case.name]()


def build_flax(case: TrainCase, dtype: str = "float32"):
    """``(step, state)``: a Flax linen network and a hand-written momentum SGD step, jitted
    with the state donated; the layers compute in ``dtype`` and keep float32 parameters."""
    module = _flax_module(case, dtype)
    k_init, k_run = jax.random.split(jax.random.key(0))
    params = module.init(k_init, jnp.zeros(case.in_shape, jnp.float32), train=False)["params"]
    momentum = jax.tree_util.tree_map(jnp.zeros_like, params)

    def loss_fn(params, key, x, y):
        logits = module.apply({"params": params}, x, train=True, rngs={"dropout": key})
        # The loss in float32, as fnlayers' step computes it under a compute dtype.
        return fl.losses.softmax_cross_entropy(logits.astype(jnp.float32), y)

    def step(state, x, y):
        params, momentum, key = state
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, step_key, x, y)
        momentum = jax.tree_util.tree_map(
            lambda v, g, w: MOMENTUM * v + LEARNING_RATE * (g + WEIGHT_DECAY * w),
            momentum,
            grads,
            params,
        )
        params = jax.tree_util.tree_map(lambda w, v: w - v, params, momentum)
        return (params, momentum, key), {"loss": loss}

    return jax.jit(step, donate_argnums=(0,)), (params, momentum, k_run)


# ----------------------------------------------------------------------------- torch


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_module(torch, case: TrainCase):
    nn = torch.nn
    if case.name == "lenet":
        layers = [
            nn.Conv2d(1, 20, 5),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(20, 50, 5),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(800, 500),
            nn.ReLU(),
            nn.Linear(500, case.classes),
        ]
    elif case.name == "cifar10_quick":
        layers = [
            nn.Conv2d(3, 32, 5, padding=2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.ReLU(),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool2d(3, 2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(1024, 64),
            nn.Linear(64, case.classes),
        ]
    else:
        layers = [
            nn.Conv2d(3, 96, 11, stride=4),
            nn.ReLU(),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(96, 256, 5, padding=2, groups=2),
            nn.ReLU(),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(256, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, case.classes),
        ]
    return nn.Sequential(*layers)


def torch_skip_reason(dtype: str, device: str) -> str | None:
    """Why PyTorch's step is not timed in ``dtype`` on ``device`` (None: it is)."""
    if dtype == "float16" and device == "cpu":
        return "float16 on the CPU is not timed for PyTorch, whose CPU mixed precision is bfloat16"
    return None


def build_torch(torch, case: TrainCase, memory_format: str, dtype: str = "float32"):
    """A zero-argument callable running one PyTorch train step (returns the loss as a float:
    that synchronises, like ``block_until_ready``). On CUDA when JAX itself runs on a GPU. A
    ``dtype`` other than float32 runs the forward pass and the loss under
    ``torch.autocast(device, dtype)`` (float32 parameters, as fnlayers and Flax keep them)."""
    import contextlib

    torch.manual_seed(0)
    device = torch_device(torch)
    reason = torch_skip_reason(dtype, device)
    if reason is not None:
        raise ValueError(f"build_torch: dtype={dtype!r}: {reason}")
    model = _torch_module(torch, case).train().to(device)
    x, y = _data(case)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    yt = torch.from_numpy(y.astype(np.int64)).to(device)
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    def autocast():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=getattr(torch, dtype))

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

    return step


# ----------------------------------------------------------------------------- timing


class _Stepper:
    """Calls a compiled, donating JAX step repeatedly, threading its state."""

    def __init__(self, compiled, state, x, y):
        self.compiled, self.state, self.x, self.y = compiled, state, x, y

    def __call__(self):
        self.state, out = self.compiled(self.state, self.x, self.y)
        jax.block_until_ready((self.state, out))


def _memory_analysis(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backends without it
        return None
    if m is None:  # pragma: no cover
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    out = {f: int(getattr(m, f, 0)) for f in fields}
    out["alias_size_in_bytes"] = int(getattr(m, "alias_size_in_bytes", 0))
    out["total_mb"] = (sum(out[f] for f in fields) - out["alias_size_in_bytes"]) / 2**20
    return out


def _build_jax(framework: str, case: TrainCase, dtype: str = "float32"):
    if framework == "fnlayers":
        return build_fnlayers(case, "im2col", dtype)
    if framework == "fnlayers-xla":
        return build_fnlayers(case, "xla", dtype)
    if framework == "flax":
        return build_flax(case, dtype)
    raise ValueError(framework)


def time_jax_step(
    framework: str, case: TrainCase, reps: int, min_time_s: float, dtype: str = "float32"
):
    step, state = _build_jax(framework, case, dtype)
    x, y = (jnp.asarray(a) for a in _data(case))
    # Initialisation is dispatched asynchronously: let it finish, or it competes with the
    # compiler for the cores and is counted as compile time.
    jax.block_until_ready((state, x, y))
    t0 = time.perf_counter()
    compiled = step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    timing = time_callable(
        _Stepper(compiled, state, x, y), reps=reps, warmup=2, min_time_s=min_time_s
    )
    timing.compile_s = compile_s
    timing.xla_flops = xla_flops(compiled)
    return timing, {"memory_analysis": _memory_analysis(compiled)}


def time_torch_step(torch, case, reps, min_time_s, thread_counts, dtype="float32"):
    device = torch_device(torch)
    if device == "cuda":  # thread counts only matter on the CPU
        thread_counts = thread_counts[:1]
    best = None
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for fmt in ("channels_last", "nchw"):
            t = time_callable(
                build_torch(torch, case, fmt, dtype), reps=reps, warmup=2, min_time_s=min_time_s
            )
            if best is None or t.median_s < best[0].median_s:
                best = (t, {"memory_format": fmt, "threads": threads, "device": device})
    return best


# ----------------------------------------------------------------------------- peak memory


def _rss_reset() -> float:
    """The current resident set in MB, after resetting the peak to it where Linux allows
    (``/proc/self/clear_refs``); ``ru_maxrss`` elsewhere. A fresh process inherits its parent's
    ``ru_maxrss`` high-water mark across ``fork``/``exec``, which is why ``VmHWM`` is read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:  # pragma: no cover - not Linux
        return _peak_mb()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(field)  # pragma: no cover


def _peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except OSError:  # pragma: no cover - not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _memory_probe(
    framework: str, case: TrainCase, torch_cfg: dict | None, dtype: str = "float32"
) -> dict:
    """Runs in a fresh process: builds, compiles and runs 3 steps; returns the peak memory's
    growth over the baseline taken after the imports: the resident set on a CPU, the device
    allocator's peak bytes in use on a GPU."""
    gpu = on_gpu()
    if framework == "torch":
        torch = _torch()
        torch.set_num_threads((torch_cfg or {}).get("threads", 1))
        if gpu:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20 if gpu else _rss_reset()
        step = build_torch(torch, case, (torch_cfg or {}).get("memory_format", "nchw"), dtype)
        for _ in range(3):
            step()
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else _peak_mb()
    else:
        if framework == "flax":
            import flax.linen  # noqa: F401
        jnp.zeros(()).block_until_ready()  # the backend's start-up memory is in the baseline
        base = _device_mb("bytes_in_use") if gpu else _rss_reset()
        step, state = _build_jax(framework, case, dtype)
        x, y = (jnp.asarray(a) for a in _data(case))
        compiled = step.lower(state, x, y).compile()
        stepper = _Stepper(compiled, state, x, y)
        for _ in range(3):
            stepper()
        peak = _device_mb("peak_bytes_in_use") if gpu else _peak_mb()
    return {
        "baseline_mb": base,
        "peak_mb": peak,
        "delta_mb": peak - base,
        "kind": "device" if gpu else "rss",
    }


def _device_mb(field: str) -> float:
    return jax.devices()[0].memory_stats()[field] / 2**20


def measure_memory(
    framework: str,
    case: TrainCase,
    torch_cfg: dict | None = None,
    timeout=900,
    dtype: str = "float32",
):
    """Peak-memory probe in a fresh subprocess (``python -m fnlayers.bench.train --probe``)."""
    spec = json.dumps(
        {
            "framework": framework,
            "case": dataclasses.asdict(case),
            "torch_cfg": torch_cfg,
            "dtype": dtype,
        }
    )
    cmd = [sys.executable, "-m", "fnlayers.bench.train", "--probe", spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE ") :])
    return {"error": (proc.stderr or proc.stdout)[-500:]}


# ----------------------------------------------------------------------------- the suite


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def run(
    *,
    quick: bool = False,
    models=None,
    frameworks=FRAMEWORKS,
    torch_threads: int | None = None,
    reps: int | None = None,
    memory: bool | None = None,
    dtype: str = "float32",
    gemm_n: int | None = None,
    out: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict:
    """Runs the suite; returns (and, with ``out``, writes as JSON plus a ``.md`` table) the
    results. ``quick``: LeNet and CIFAR10-quick, 3 repetitions, no memory probes. ``memory``
    (default: not ``quick``) runs one probe subprocess per framework and model. ``dtype``: the
    compute dtype (one of :data:`fnlayers.bench._harness.DTYPES`; parameters stay float32).
    ``gemm_n``: the side of the square matrix product whose time is the peak (default 8192 on
    a GPU, 2048 on a CPU, 1024 with ``quick``)."""
    dtype = check_dtype(dtype, fn="train.run")
    models = (QUICK_MODELS if quick else MODELS) if models is None else tuple(models)
    reps = reps or (3 if quick else 7)
    min_time_s = 0.0 if quick else 1.0
    memory = (not quick) if memory is None else memory
    frameworks = list(frameworks)
    skipped = {}
    if "flax" in frameworks and not _importable("flax"):
        frameworks.remove("flax")
        skipped["flax"] = "not importable"
    th = _torch() if "torch" in frameworks else None
    if "torch" in frameworks and th is None:
        frameworks.remove("torch")
        skipped["torch"] = "not importable"
    elif th is not None:
        reason = torch_skip_reason(dtype, torch_device(th))
        if reason is not None:
            frameworks.remove("torch")
            th, skipped["torch"] = None, reason
    gemm_n = gemm_n or (8192 if on_gpu() else 1024 if quick else 2048)
    thread_counts = [torch_threads] if torch_threads else sorted({_cores(), 1}, reverse=True)
    t_start = time.perf_counter()

    def log(msg):
        if verbose:
            print(msg, flush=True)

    peak = gemm_peak(gemm_n, reps=reps, dtype=dtype)
    log(f"GEMM peak (jnp.dot {gemm_n}^3 {dtype}): {peak['tflops']:.3g} TFLOP/s")
    for name, reason in skipped.items():
        log(f"{name} skipped: {reason}")
    results = []
    for case in models:
        flops = model_flops(case)
        row = {"model": case.name, "batch": case.batch, "flops": flops, "frameworks": {}}
        for fw in frameworks:
            if fw == "torch":
                t, cfg = time_torch_step(th, case, reps, min_time_s, thread_counts, dtype)
                extra = cfg
            else:
                t, extra = time_jax_step(fw, case, reps, min_time_s, dtype)
            d = t.as_dict() | {"images_per_s": case.batch / t.median_s} | extra
            d |= throughput(flops, t.median_s, peak)
            row["frameworks"][fw] = d
            log(
                f"{case.name:14s} {fw:13s} {d['median_ms']:9.1f} ms  "
                f"{d['images_per_s']:8.1f} img/s  {d['tflops']:.3g} TFLOP/s "
                f"({d['peak_fraction']:.2g} of peak)  compile {d['compile_s']:.2f} s  "
                f"first call {d['first_call_s']:.2f} s"
            )
        ips = {k: v["images_per_s"] for k, v in row["frameworks"].items()}
        row["speedups"] = {
            f"{a} vs {b}": ips[a] / ips[b]
            for a in ips
            if a.startswith("fnlayers")
            for b in ("flax", "torch")
            if b in ips
        }
        row["compile_ratio"] = {
            f"{a}/flax": row["frameworks"][a]["compile_s"] / row["frameworks"]["flax"]["compile_s"]
            for a in ips
            if a.startswith("fnlayers") and "flax" in ips
        }
        results.append(row)
    if memory:
        for row, case in zip(results, models, strict=True):
            for fw, d in row["frameworks"].items():
                cfg = {k: d[k] for k in ("threads", "memory_format") if k in d}
                d["peak_memory"] = measure_memory(fw, case, cfg or None, dtype=dtype)
                log(f"{case.name:14s} {fw:13s} peak memory {d['peak_memory']}")
            fws = row["frameworks"]
            if fws.get("flax", {}).get("peak_memory", {}).get("delta_mb", 0) > 0:
                row["memory_ratio"] = {
                    f"{a}/flax": fws[a]["peak_memory"]["delta_mb"]
                    / fws["flax"]["peak_memory"]["delta_mb"]
                    for a in fws
                    if a.startswith("fnlayers") and "delta_mb" in fws[a].get("peak_memory", {})
                }
    extra = {"torch": None, "flax": None, "skipped": skipped}
    if th is not None:
        extra["torch"] = {"version": th.__version__, "threads_tried": thread_counts}
    if "flax" in frameworks:
        import flax

        extra["flax"] = {"version": flax.__version__, "api": "linen, hand-written SGD"}
    payload = {
        "suite": "train",
        "quick": quick,
        "reps": reps,
        "dtype": dtype,
        "gemm_peak": peak,
        "flops": {
            "source": "analytic",
            "formula": "3 x the forward products (2 x weight size x output positions) of the "
            "convolution and inner-product layers",
            "xla_flops": "XLA's cost_analysis() of each compiled JAX step, recorded only: it "
            "counts a loop body once and leaves out padded taps",
        },
        "step": {
            "loss": "softmax cross-entropy",
            "optimizer": f"SGD momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}",
            "precision": "float32"
            if dtype == "float32"
            else f"compute in {dtype}, float32 parameters and loss, no loss scaling",
            "peak_memory_method": "GPU: the device allocator's peak bytes in use "
            "(JAX memory_stats, torch.cuda.max_memory_allocated) over the baseline after the "
            "imports; CPU: peak resident set (Linux VmHWM, reset through "
            "/proc/self/clear_refs after the imports) after init+compile+3 steps minus the "
            "resident set after the imports, fresh subprocess per framework and model; JAX: "
            "also the compiled step's "
            "memory_analysis (arguments + outputs + temporaries - aliased)",
        },
        "environment": environment(extra),
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    publish(payload, format_table(payload), out, log)
    return payload


def format_table(payload: dict) -> str:
    gpu = payload["environment"]["device"]["platform"] == "gpu"
    header = [
        "model",
        "batch",
        "framework",
        "step ms",
        "images/s",
        "TFLOP/s",
        "of peak",
        "vs flax",
        "vs torch",
        "compile s",
        "peak MB (device)" if gpu else "peak MB (rss)",
        "XLA MB",
        "config",
    ]
    rows = []
    for r in payload["results"]:
        for fw, d in r["frameworks"].items():
            mem = d.get("peak_memory") or {}
            ma = d.get("memory_analysis") or {}
            cfg = ""
            if "threads" in d:
                fmt = {"channels_last": "NHWC", "nchw": "NCHW"}[d["memory_format"]]
                cfg = f"{fmt}, {d['threads']} thr" if d.get("device", "cpu") == "cpu" else fmt
            rows.append(
                [
                    r["model"],
                    r["batch"],
                    fw,
                    d["median_ms"],
                    d["images_per_s"],
                    significant(d.get("tflops")),
                    significant(d.get("peak_fraction"), 2),
                    r["speedups"].get(f"{fw} vs flax"),
                    r["speedups"].get(f"{fw} vs torch"),
                    d["compile_s"] if fw != "torch" else None,
                    mem.get("delta_mb"),
                    ma.get("total_mb"),
                    cfg,
                ]
            )
    env = payload["environment"]
    torch = env.get("torch") or {}
    flax = env.get("flax") or {}
    peak = payload["gemm_peak"]
    skipped = "".join(f"; {k} skipped: {v}" for k, v in (env.get("skipped") or {}).items())
    lines = [
        f"train suite, {payload['dtype']}, {env['device']['platform']} ({env['device']['kind']}, "
        f"{env['processor']}, {env['cpu_count']} cores), jax {env['jax']}, jaxlib {env['jaxlib']}"
        + (f", flax {flax['version']} (linen, hand SGD)" if flax else "")
        + (
            f", torch {torch['version']} (fastest of threads {torch['threads_tried']} and "
            "NCHW/channels-last)"
            if torch
            else ""
        )
        + skipped
        + f"; GEMM peak {peak['tflops']:.3g} TFLOP/s (jnp.dot {peak['n']}³ {peak['dtype']}, "
        "float32 accumulation); TFLOP/s from the analytic count (3 x the conv and inner-product "
        "forward products)"
        + f"; medians of {payload['reps']}+ steps after compile and 2 warm-up steps; "
        "'vs' = images/s ratio in this run; peak MB = peak "
        + ("device memory" if gpu else "RSS")
        + " growth in a fresh process; "
        f"env {env['env'] or '{}'}",
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(lines)


def _probe_main(spec: str) -> int:
    spec = json.loads(spec)
    case = TrainCase(**spec["case"])
    result = _memory_probe(spec["framework"], case, spec["torch_cfg"], spec["dtype"])
    print("PROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        sys.exit(_probe_main(sys.argv[2]))
    from fnlayers.bench.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
