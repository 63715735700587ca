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
    "ENV_VARS",
    "Timing",
    "environment",
    "gemm_peak",
    "geomean",
    "markdown_table",
    "on_gpu",
    "publish",
    "time_callable",
    "time_jax",
    "torch_device",
    "torch_sync",
    "write_json",
]

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
    """Seconds for one case: ``compile_s`` (0 where nothing compiles), ``times_s`` per rep."""

    compile_s: float
    first_s: float
    times_s: list[float]

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
        }


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
    return _time(lambda: _block(compiled(*args)), compile_s, reps, warmup, min_time_s)


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


def gemm_peak(n: int = 2048, reps: int = 5, dtype=jnp.float32) -> dict:
    """The measured matrix-product ceiling: ``jnp.dot`` of two ``n x n`` matrices, GFLOP/s."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    t = time_jax(jnp.dot, a, b, reps=reps, warmup=2)
    return {
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "median_ms": t.median_ms,
        "gflops": 2 * n**3 / t.median_s / 1e9,
    }


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-Markdown table; floats get 2 decimals (none from 100 up), ``None`` prints —."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
