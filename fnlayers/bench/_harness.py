"""Timing, environment capture, JSON and table output shared by the benchmark suites.

Rules every suite follows (docs/performance.md, "Reading the numbers"): compile time is
measured apart from run time; each case is warmed up, then timed ``reps`` times with
``block_until_ready``; the median is the figure reported; ratios are only taken between cases
measured in the same process.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DTYPES",
    "ENV_VARS",
    "Timing",
    "check_dtype",
    "environment",
    "gemm_peak",
    "geomean",
    "markdown_table",
    "on_gpu",
    "publish",
    "significant",
    "throughput",
    "time_callable",
    "time_jax",
    "torch_device",
    "torch_sync",
    "write_json",
    "xla_flops",
]

#: The dtypes the conv and train suites run in (``--dtype``), by name.
DTYPES = ("float32", "bfloat16", "float16")

# Environment variables that change the numbers (allocator, threads, XLA flags).
ENV_VARS = (
    "GLIBC_TUNABLES",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "JAX_ENABLE_X64",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_CPP_MIN_LOG_LEVEL",
    "LD_PRELOAD",
)


@dataclasses.dataclass
class Timing:
    """Seconds for one case: ``compile_s`` (0 where nothing compiles), ``times_s`` per rep;
    ``xla_flops``: XLA's own count of the compiled program's floating-point operations (None
    where nothing compiles or the backend does not count; see :func:`xla_flops`)."""

    compile_s: float
    first_s: float
    times_s: list[float]
    xla_flops: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median_s

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "min_ms": 1e3 * min(self.times_s),
            "max_ms": 1e3 * max(self.times_s),
            "reps": len(self.times_s),
            "compile_s": self.compile_s,
            "first_call_s": self.first_s,
            "times_ms": [1e3 * t for t in self.times_s],
        } | ({} if self.xla_flops is None else {"xla_flops": self.xla_flops})


def _block(out):
    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out
    )


def time_jax(fn: Callable, *args, reps: int = 5, warmup: int = 1, min_time_s: float = 0.0):
    """Compiles ``jax.jit(fn)`` for ``args`` (timed as ``compile_s``), runs it ``warmup`` times,
    then times ``reps`` calls (more while their total is under ``min_time_s``).
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    timing = _time(lambda: _block(compiled(*args)), compile_s, reps, warmup, min_time_s)
    timing.xla_flops = xla_flops(compiled)
    return timing


def xla_flops(compiled) -> float | None:
    """The ``flops`` of a compiled program's ``cost_analysis()``, or None where there is none.

    Recorded beside the analytic counts, not used for TFLOP/s: XLA counts the body of a loop
    once, whatever its trip count (a convolution tiled into a ``lax.scan`` over 8 blocks shows
    an eighth of its products), and its native convolution leaves out the taps that fall on
    padding, so the same computation gets different counts in different implementations.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # backends without a cost model raise rather than return None
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def time_callable(fn: Callable[[], object], *, reps: int = 5, warmup: int = 1, min_time_s=0.0):
    """Times an already-runnable zero-argument callable (e.g. a PyTorch step) the same way."""
    return _time(fn, 0.0, reps, warmup, min_time_s)


def _time(call, compile_s, reps, warmup, min_time_s):
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        call()
    times: list[float] = []
    while len(times) < reps or (sum(times) < min_time_s and len(times) < 20 * reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return Timing(compile_s, first_s, times)


def on_gpu() -> bool:
    """Whether JAX's default device is a GPU (then PyTorch runs on CUDA too, where it can)."""
    return jax.devices()[0].platform == "gpu"


def torch_device(torch) -> str:
    """``"cuda"`` when JAX runs on a GPU and PyTorch sees one, else ``"cpu"``: the peers are
    always measured on the same kind of device. On CUDA this also turns on cuDNN's autotuner
    and TF32 matrix products, matching XLA's default precision for float32 on such GPUs."""
    if on_gpu() and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return "cuda"
    return "cpu"


def torch_sync(torch, device: str) -> None:
    """Waits for queued CUDA work (the PyTorch analogue of ``block_until_ready``)."""
    if device == "cuda":
        torch.cuda.synchronize()


def check_dtype(dtype, *, fn: str) -> str:
    """``dtype`` (a name or a dtype) as one of :data:`DTYPES`' names.

    Raises:
      ValueError: any other dtype or name.
    """
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"{fn}: dtype={dtype!r} must be one of {DTYPES}")
    return name


def gemm_peak(n: int = 2048, reps: int = 5, dtype=jnp.float32) -> dict:
    """The measured matrix-product ceiling in ``dtype``: ``jnp.dot`` of two ``n x n`` matrices
    of that dtype, GFLOP/s and TFLOP/s. A bfloat16 or float16 product accumulates in float32
    (``preferred_element_type``), as fnlayers' convolutions and dense layers do."""
    dtype = jnp.dtype(check_dtype(dtype, fn="gemm_peak"))
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)

    def product(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32)

    t = time_jax(product, a, b, reps=reps, warmup=2)
    seconds = t.median_s
    return {
        "n": n,
        "dtype": dtype.name,
        "accumulate": "float32",
        "median_ms": t.median_ms,
        "gflops": 2 * n**3 / seconds / 1e9,
        "tflops": 2 * n**3 / seconds / 1e12,
    }


def throughput(flops: float, seconds: float, peak: dict) -> dict:
    """``{"tflops", "peak_fraction"}``: ``flops`` done in ``seconds``, in TFLOP/s and as a
    fraction of the measured ``peak`` (a :func:`gemm_peak` result)."""
    tflops = flops / seconds / 1e12
    return {"tflops": tflops, "peak_fraction": tflops / peak["tflops"]}


def environment(extra: dict | None = None) -> dict:
    """Device, versions, platform and the environment variables that move the numbers."""
    import jaxlib

    dev = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {
            "platform": dev.platform,
            "kind": dev.device_kind,
            "count": jax.device_count(),
        },
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ENV_VARS if os.environ.get(k) is not None},
    }
    env.update(extra or {})
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and v > 0]
    if not vals:
        return float("nan")
    return float(np.exp(np.mean(np.log(vals))))


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def publish(payload: dict, table: str, out, log) -> None:
    """Logs the table; with ``out``, writes the JSON there and the table beside it (``.md``)."""
    log("\n" + table)
    if out is not None:
        path = write_json(out, payload)
        path.with_suffix(".md").write_text(table + "\n")
        log(f"\nwrote {path} and {path.with_suffix('.md')}")


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v:
            return "—"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def significant(v: float | None, digits: int = 3) -> str | None:
    """``v`` to ``digits`` significant digits, as a table cell (TFLOP/s on a CPU are
    hundredths, on a GPU hundreds: a fixed number of decimals suits neither)."""
    if v is None or v != v:
        return None
    return f"{v:.{digits}g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-Markdown table; floats get 2 decimals (none from 100 up), ``None`` prints —."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
