"""The ``conv`` suite: forward and forward+backward of one convolution layer.

Layer shapes (NHWC input, HWIO weight) are those of AlexNet conv1-3, Caffe's CIFAR10-quick
conv2, LeNet conv2 and a VGG 3x3 128->128 layer at 56x56. Each is timed for ``impl="im2col"``
and ``impl="xla"`` and, when it is importable, for PyTorch (``F.conv2d`` in whichever of NCHW
and channels-last memory format, and of ``torch.set_num_threads`` set to the cores this process
may use or to 1, is fastest for that case; the choice is recorded). Forward+backward is
``value_and_grad`` of ``sum(y**2)`` (summed in float32) with respect to ``x`` and ``w``.

``dtype`` (float32, bfloat16 or float16): the input and the weight are in it, for every
implementation (the fnlayers products accumulate in float32). PyTorch runs float16 on CUDA only:
on a CPU that case is skipped and the payload says why.

Reported: median ms; achieved TFLOP/s from the analytic count 2·N·OH·OW·C_out·KH·KW·C_in/groups
per product (forward+backward counts three products), the same count for every implementation;
that over the ``jnp.dot`` peak measured in the same run and dtype (``peak_fraction``); XLA's own
count of each compiled program (``xla_flops``, recorded only: see
:func:`fnlayers.bench._harness.xla_flops`); the ratios im2col/xla and im2col/torch, and their
geometric means over the cases.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fnlayers as fl
from fnlayers.bench import floor as floor_
from fnlayers.bench._harness import (
    check_dtype,
    environment,
    gemm_peak,
    geomean,
    markdown_table,
    on_gpu,
    publish,
    significant,
    throughput,
    time_callable,
    time_jax,
    torch_device,
    torch_sync,
)

__all__ = ["CASES", "TINY_CASES", "ConvCase", "run"]


@dataclasses.dataclass(frozen=True)
class ConvCase:
    name: str
    n: int
    h: int
    w: int
    c_in: int
    c_out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        shape = fl.conv_output_shape(
            (self.n, self.h, self.w, self.c_in),
            (self.kernel, self.kernel, self.c_in // self.groups, self.c_out),
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
        )
        return shape[1], shape[2]

    @property
    def flops(self) -> float:
        """Multiply-adds x 2 of one forward product."""
        oh, ow = self.out_hw
        k = self.kernel * self.kernel * self.c_in // self.groups
        return 2.0 * self.n * oh * ow * self.c_out * k

    def describe(self) -> str:
        s = f"{self.n}x{self.h}x{self.w}x{self.c_in}, {self.kernel}x{self.kernel}"
        if self.stride != 1:
            s += f"/{self.stride}"
        if self.padding:
            s += f" pad {self.padding}"
        if self.groups != 1:
            s += f" groups {self.groups}"
        return s + f", {self.c_out}"


CASES = (
    ConvCase("alexnet_conv1", 8, 227, 227, 3, 96, 11, stride=4),
    ConvCase("alexnet_conv2", 8, 27, 27, 96, 256, 5, padding=2),
    ConvCase("alexnet_conv3", 8, 13, 13, 256, 384, 3, padding=1),
    ConvCase("cifar10_quick_conv2", 64, 16, 16, 32, 32, 5, padding=2),
    ConvCase("lenet_conv2", 64, 12, 12, 20, 50, 5),
    ConvCase("vgg_3x3_128", 8, 56, 56, 128, 128, 3, padding=1),
)

# For the smoke test: every code path of the suite in a few seconds.
TINY_CASES = (
    ConvCase("tiny_stride", 2, 13, 13, 3, 4, 5, stride=4),
    ConvCase("tiny_pad", 2, 8, 8, 4, 6, 3, padding=1),
)

MODES = ("fwd", "fwd+bwd")
IMPLS = ("im2col", "xla")


def _jax_fns(case: ConvCase, impl: str):
    def fwd(x, w):
        return fl.conv2d(
            x, w, stride=case.stride, padding=case.padding, groups=case.groups, impl=impl
        )

    def loss(x, w):
        # Summed in float32: a float16 sum of squares overflows at 65504.
        return jnp.sum(jnp.square(fwd(x, w).astype(jnp.float32)))

    return {"fwd": fwd, "fwd+bwd": jax.value_and_grad(loss, argnums=(0, 1))}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_skip_reason(dtype: str, device: str) -> str | None:
    """Why PyTorch is not timed in ``dtype`` on ``device`` (None: it is)."""
    if dtype == "float16" and device == "cpu":
        return "float16 on the CPU is not timed for PyTorch, whose CPU mixed precision is bfloat16"
    return None


def _time_torch(torch, case, x, w, mode, reps, min_time_s, thread_counts, dtype="float32"):
    """Times PyTorch in both memory formats and each thread count; keeps the fastest. The
    input and weight are in ``dtype``, as for JAX.

    Returns ``(timing, config)``. More than one thread count is worth trying on a shared machine:
    with every core busy, PyTorch's OpenMP threads can wait on each other for a scheduler slice
    per barrier, and one thread is then several times faster than all of them.
    """
    import torch.nn.functional as F

    device = torch_device(torch)
    if device == "cuda":  # thread counts only matter on the CPU
        thread_counts = thread_counts[:1]
    best = None
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for fmt in ("channels_last", "nchw"):
            tdtype = getattr(torch, dtype)
            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
            xt, wt = xt.to(device, tdtype), wt.to(device, tdtype)
            if fmt == "channels_last":
                xt = xt.contiguous(memory_format=torch.channels_last)
                wt = wt.contiguous(memory_format=torch.channels_last)
            kw = dict(stride=case.stride, padding=case.padding, groups=case.groups)
            if mode == "fwd":

                def call(xt=xt, wt=wt, kw=kw):
                    with torch.inference_mode():
                        y = F.conv2d(xt, wt, **kw)
                    torch_sync(torch, device)
                    return y

            else:
                xt.requires_grad_(True)
                wt.requires_grad_(True)

                def call(xt=xt, wt=wt, kw=kw):
                    y = F.conv2d(xt, wt, **kw).float()
                    loss = (y * y).sum()
                    return loss.item(), torch.autograd.grad(loss, (xt, wt))

            t = time_callable(call, reps=reps, warmup=2, min_time_s=min_time_s)
            if best is None or t.median_s < best[0].median_s:
                best = (t, {"memory_format": fmt, "threads": threads, "device": device})
    return best


def run(
    *,
    quick: bool = False,
    cases=None,
    impls=IMPLS,
    modes=MODES,
    torch: bool = True,
    torch_threads: int | None = None,
    reps: int | None = None,
    gemm_n: int | None = None,
    floor: bool = False,
    dtype: str = "float32",
    out: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict:
    """Runs the suite; returns (and, with ``out``, writes as JSON plus a ``.md`` table) the
    results. ``quick`` uses 3 repetitions and a 1024³ GEMM peak. PyTorch runs with
    ``torch_threads`` threads (default: the faster of all cores and one thread, per case).
    ``floor`` also times the matrix products alone (``fnlayers.bench.floor``) with ``jnp`` and,
    where importable, ``torch.matmul``: what an im2col convolution costs with free columns.
    ``dtype``: one of :data:`fnlayers.bench._harness.DTYPES`, the dtype of the inputs, the
    weights and the GEMM peak.
    """
    dtype = check_dtype(dtype, fn="conv.run")
    cases = CASES if cases is None else tuple(cases)
    reps = reps or (3 if quick else 7)
    min_time_s = 0.0 if quick else 0.5
    gemm_n = gemm_n or (8192 if on_gpu() else 1024 if quick else 2048)
    th = _torch() if torch else None
    skipped = {}
    if th is not None:
        reason = torch_skip_reason(dtype, torch_device(th))
        if reason is not None:
            th, skipped["torch"] = None, reason
    thread_counts = [torch_threads] if torch_threads else sorted({_cores(), 1}, reverse=True)
    t_start = time.perf_counter()

    def log(msg):
        if verbose:
            print(msg, flush=True)

    peak = gemm_peak(gemm_n, reps=reps, dtype=dtype)
    log(f"GEMM peak (jnp.dot {gemm_n}^3 {dtype}): {peak['tflops']:.3g} TFLOP/s")
    for name, reason in skipped.items():
        log(f"{name} skipped: {reason}")
    rng = np.random.default_rng(0)
    results = []
    for case in cases:
        x = rng.standard_normal((case.n, case.h, case.w, case.c_in)).astype(np.float32)
        w = rng.standard_normal(
            (case.kernel, case.kernel, case.c_in // case.groups, case.c_out)
        ).astype(np.float32)
        w *= np.float32(1.0 / np.sqrt(w[..., 0].size))
        xj, wj = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
        for mode in modes:
            row = {"case": case.name, "shape": case.describe(), "mode": mode, "impls": {}}
            nflops = case.flops * (1 if mode == "fwd" else 3)
            row["flops"] = nflops
            timed = dict(reps=reps, min_time_s=min_time_s)
            for impl in impls:
                t = time_jax(_jax_fns(case, impl)[mode], xj, wj, **timed)
                row["impls"][impl] = t.as_dict()
            if th is not None:
                t, cfg = _time_torch(th, case, x, w, mode, reps, min_time_s, thread_counts, dtype)
                row["impls"]["torch"] = t.as_dict() | cfg
            if floor:
                t, shape = floor_.time_products_jax(case, mode, dtype=dtype, **timed)
                row["impls"]["products"] = t.as_dict() | {"blocks": shape}
                if th is not None:
                    threads = row["impls"]["torch"]["threads"]
                    t = floor_.time_products_torch(
                        th, case, mode, threads=threads, dtype=dtype, **timed
                    )
                    row["impls"]["torch-products"] = t.as_dict() | {"threads": threads}
            ms = {k: v["median_ms"] for k, v in row["impls"].items()}
            for v in row["impls"].values():
                seconds = v["median_ms"] / 1e3
                v |= {"gflops": nflops / seconds / 1e9} | throughput(nflops, seconds, peak)
            row["ratios"] = {
                f"{a}/{b}": ms[a] / ms[b]
                for a in ms
                for b in ("xla", "torch")
                if a != b
                and a in ms
                and b in ms
                and not (a == "xla" and b == "torch")
                and not (a.endswith("products") and b == "xla")
            }
            results.append(row)
            log(
                f"{case.name:20s} {mode:8s} "
                + "  ".join(
                    f"{k} {v:8.2f} ms {row['impls'][k]['tflops']:.3g} TFLOP/s"
                    for k, v in ms.items()
                )
                + "  "
                + "  ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
            )
    summary = {}
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        keys = sorted({k for r in rows for k in r["ratios"]})
        summary[mode] = {
            f"geomean {k}": geomean([r["ratios"].get(k) for r in rows]) for k in keys
        } | {
            f"max {k}": max((r["ratios"][k] for r in rows if k in r["ratios"]), default=None)
            for k in keys
        }
    extra = {"torch": None, "floor": floor, "skipped": skipped}
    if th is not None:
        extra["torch"] = {"version": th.__version__, "threads_tried": thread_counts}
    payload = {
        "suite": "conv",
        "quick": quick,
        "reps": reps,
        "dtype": dtype,
        "flops": {
            "source": "analytic",
            "formula": "2*N*OH*OW*C_out*KH*KW*C_in/groups per product; forward+backward x3",
            "xla_flops": "XLA's cost_analysis() of each JAX program, recorded only: it counts "
            "a loop body once and leaves out padded taps",
        },
        "environment": environment(extra),
        "gemm_peak": peak,
        "results": results,
        "summary": summary,
        "wall_s": time.perf_counter() - t_start,
    }
    publish(payload, format_table(payload), out, log)
    return payload


def _tflops_cell(timing: dict) -> str | None:
    """``"0.136 (0.31)"``: achieved TFLOP/s and, in brackets, the fraction of the peak."""
    if "tflops" not in timing:
        return None
    return f"{significant(timing['tflops'])} ({significant(timing['peak_fraction'], 2)})"


def format_table(payload: dict) -> str:
    """The Markdown table of a conv payload: ms, achieved TFLOP/s and the fraction of the
    measured GEMM peak per implementation, then the ratios."""
    impls = []
    for r in payload["results"]:
        impls += [k for k in r["impls"] if k not in impls]
    ratio_keys = []
    for r in payload["results"]:
        ratio_keys += [k for k in r["ratios"] if k not in ratio_keys]
    header = ["layer", "shape", "mode"] + [f"{k} ms" for k in impls]
    header += [f"{k} TFLOP/s (of peak)" for k in impls]
    header += ratio_keys
    has_torch = "torch" in impls
    if has_torch:
        header.append("torch config")
    rows = []
    for r in payload["results"]:
        row = [r["case"], r["shape"], r["mode"]]
        found = [r["impls"].get(k, {}) for k in impls]
        row += [t.get("median_ms") for t in found]
        row += [_tflops_cell(t) for t in found]
        row += [r["ratios"].get(k) for k in ratio_keys]
        if has_torch:
            t = r["impls"].get("torch", {})
            fmt = {"channels_last": "NHWC", "nchw": "NCHW"}.get(t.get("memory_format"), "")
            cuda = t.get("device") == "cuda"
            row.append(f"{fmt}, {t['threads']} thr" if "threads" in t and not cuda else fmt)
        rows.append(row)
    for mode, s in payload["summary"].items():
        for agg in ("geomean", "max"):
            row = ["**" + agg + "**", "", mode] + [None] * (2 * len(impls))
            row += [s.get(f"{agg} {k}") for k in ratio_keys]
            row += [None] if has_torch else []
            rows.append(row)
    env = payload["environment"]
    torch = env.get("torch") or {}
    peak = payload["gemm_peak"]
    skipped = "".join(f"; {k} skipped: {v}" for k, v in (env.get("skipped") or {}).items())
    lines = [
        f"conv suite, {payload['dtype']}, {env['device']['platform']} ({env['device']['kind']}, "
        f"{env['processor']}, {env['cpu_count']} cores), jax {env['jax']}, jaxlib {env['jaxlib']}"
        + (
            f", torch {torch['version']} (fastest of threads {torch['threads_tried']} and "
            "NCHW/channels-last per case)"
            if torch
            else ""
        )
        + skipped
        + f"; GEMM peak {peak['tflops']:.3g} TFLOP/s (jnp.dot {peak['n']}³ {peak['dtype']}, "
        "float32 accumulation); TFLOP/s from the analytic count (2·N·OH·OW·C_out·KH·KW·C_in/groups"
        f", x3 for fwd+bwd); medians of {payload['reps']}+ runs; env {env['env'] or '{}'}",
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(lines)
