"""Smoke test of the benchmark suites: each runs in its quickest mode and writes its files."""

import json

import pytest

from fnlayers.bench import cli
from fnlayers.bench import conv as conv_bench


def test_conv_benchmark_tiny_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "conv.json"
    rc = cli.main(["conv", "--tiny", "--reps", "1", "--no-torch", "--out", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["suite"] == "conv"
    assert {"device", "jax", "jaxlib", "platform", "env"} <= set(payload["environment"])
    assert payload["gemm_peak"]["gflops"] > 0
    cases = {c.name for c in conv_bench.TINY_CASES}
    assert {r["case"] for r in payload["results"]} == cases
    assert len(payload["results"]) == 2 * len(cases)  # forward, forward+backward
    for r in payload["results"]:
        assert set(r["impls"]) == {"im2col", "xla"}
        for t in r["impls"].values():
            assert t["median_ms"] > 0 and t["compile_s"] > 0 and t["gflops"] > 0
        assert r["ratios"]["im2col/xla"] > 0
    assert set(payload["summary"]) == {"fwd", "fwd+bwd"}
    table = out.with_suffix(".md").read_text()
    assert "| layer |" in table and "geomean" in table
    assert "im2col/xla" in capsys.readouterr().out


def test_conv_benchmark_floor_times_the_products_alone(tmp_path):
    out = tmp_path / "conv.json"
    args = ["conv", "--tiny", "--reps", "1", "--no-torch", "--floor", "--modes", "fwd+bwd"]
    assert cli.main([*args, "--out", str(out)]) == 0
    for r in json.loads(out.read_text())["results"]:
        products = r["impls"]["products"]
        assert products["median_ms"] > 0
        assert r["ratios"]["im2col/xla"] > 0
        assert "products/xla" not in r["ratios"]  # the floor is compared with PyTorch only


def test_floor_block_shapes_follow_the_tiling(monkeypatch):
    from fnlayers import conv as conv_module
    from fnlayers.bench import floor

    case = conv_bench.ConvCase("c", 4, 8, 8, 3, 6, 3, padding=1, groups=1)
    assert floor.block_shapes(case) == {"m": 256, "k": 27, "o": 6, "groups": 1, "blocks": 1}
    monkeypatch.setattr(conv_module, "_tile_for_cache", lambda: True)
    monkeypatch.setattr(conv_module, "_TILE_ABOVE_BYTES", 0)
    monkeypatch.setattr(conv_module, "_BLOCK_BYTES", 8 * 27 * 4 * 8)  # one example per block
    assert floor.block_shapes(case) == {"m": 64, "k": 27, "o": 6, "groups": 1, "blocks": 4}
    grouped = conv_bench.ConvCase("g", 4, 8, 8, 4, 6, 3, padding=1, groups=2)
    assert floor.block_shapes(grouped)["k"] == 18 and floor.block_shapes(grouped)["o"] == 3


def test_conv_benchmark_rejects_unknown_case(capsys):
    assert cli.main(["conv", "--cases", "nope", "--no-out"]) == 2
    assert "unknown case" in capsys.readouterr().err


def test_conv_cases_shapes():
    shapes = {c.name: c.out_hw for c in conv_bench.CASES}
    assert shapes["alexnet_conv1"] == (55, 55)
    assert shapes["vgg_3x3_128"] == (56, 56)
    assert len(conv_bench.CASES) == 6


def test_train_benchmark_tiny_writes_json_and_table(tmp_path, capsys):
    from fnlayers.bench import train as train_bench

    out = tmp_path / "train.json"
    args = ["--tiny", "--reps", "1", "--frameworks", "fnlayers", "--no-memory", "--out", str(out)]
    rc = cli.main(["train", *args])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["suite"] == "train"
    assert {"device", "jax", "jaxlib", "env"} <= set(payload["environment"])
    assert [r["model"] for r in payload["results"]] == [m.name for m in train_bench.TINY_MODELS]
    for r in payload["results"]:
        t = r["frameworks"]["fnlayers"]
        assert t["median_ms"] > 0 and t["compile_s"] > 0 and t["images_per_s"] > 0
        assert t["memory_analysis"] is None or t["memory_analysis"]["total_mb"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| model |" in table and "images/s" in table
    assert "img/s" in capsys.readouterr().out


def test_train_benchmark_rejects_unknown_model_and_framework(capsys):
    assert cli.main(["train", "--models", "nope", "--no-out"]) == 2
    assert cli.main(["train", "--frameworks", "caffe", "--no-out"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "unknown framework" in err


def test_train_benchmark_memory_probe_subprocess():
    from fnlayers.bench import train as train_bench

    probe = train_bench.measure_memory("fnlayers", train_bench.TINY_MODELS[0])
    assert "error" not in probe, probe
    assert probe["peak_mb"] > 0 and probe["peak_mb"] >= probe["baseline_mb"] >= 0
    if probe["kind"] == "rss":  # on a GPU the baseline is the device memory in use: 0 at first
        assert probe["baseline_mb"] > 0


def test_floor_step_script_times_products_of_the_blocks():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "floor_step.py"
    spec = importlib.util.spec_from_file_location("floor_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    case = conv_bench.ConvCase("c", 2, 6, 6, 3, 4, 3, padding=1)
    seconds, shape = module._jax_products(case, True, reps=1)
    assert seconds > 0 and shape == {"m": 72, "k": 27, "o": 4, "groups": 1, "blocks": 1}


def test_scale_benchmark_reruns_with_host_devices_and_computes_ratios(tmp_path):
    """``scale`` on a 1-device CPU reruns itself with 4 forced host devices (a subprocess, as a
    user would start it); the JSON has a weak and a strong row per device count, the ratios and
    the all-reduce volumes. No timing is asserted."""
    import os
    import subprocess
    import sys

    from fnlayers.bench import scale

    out = tmp_path / "scale.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(scale.FORCE_FLAG)
    )
    cmd = [sys.executable, "-m", "fnlayers.bench.cli", "scale", "--tiny", "--devices", "1,2,4"]
    proc = subprocess.run(
        [*cmd, "--reps", "1", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "running again with" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["suite"] == "scale"
    assert payload["devices"] == [1, 2, 4] and payload["skipped_devices"] == []
    assert payload["environment"]["device"]["count"] == 4
    assert f"{scale.FORCE_FLAG}=4" in payload["environment"]["env"]["XLA_FLAGS"]
    assert "not a speedup" in payload["note"]
    case = scale.TINY_MODELS[0]
    grad = payload["models"][case.name]["gradient_bytes"]
    assert grad == 4 * payload["models"][case.name]["parameters"] > 0
    rows = {(r["mode"], r["devices"]): r for r in payload["results"]}
    assert set(rows) == {(m, k) for m in ("weak", "strong") for k in (1, 2, 4)}
    for (mode, k), r in rows.items():
        assert r["model"] == case.name
        expected = case.batch * k if mode == "weak" else case.batch * 4
        assert r["global_batch"] == expected and r["per_device_batch"] == expected // k
        assert r["median_ms"] > 0 and r["images_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["images_per_s"] / rows[mode, 1]["images_per_s"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / k)
        assert r["allreduce_bytes_per_device"] == pytest.approx(2 * (k - 1) / k * grad)
    assert rows["weak", 1]["speedup"] == 1.0 and rows["strong", 1]["efficiency"] == 1.0
    (overhead,) = payload["overhead"]
    assert overhead["batch"] == case.batch
    assert overhead["ratio"] == pytest.approx(
        overhead["mesh1"]["median_ms"] / overhead["plain"]["median_ms"]
    )
    table = out.with_suffix(".md").read_text()
    assert "| model | mode | devices |" in table and "1-device mesh ms" in table


def test_scale_helpers_and_errors(capsys):
    from fnlayers.bench import scale

    assert scale.default_devices(1) == [1]
    assert scale.default_devices(4) == [1, 2, 4]
    assert scale.default_devices(6) == [1, 2, 4, 6]
    assert scale.ring_allreduce_bytes(1000, 1) == 0
    assert scale.ring_allreduce_bytes(1000, 4) == 1500
    assert cli.main(["scale", "--models", "nope", "--no-out"]) == 2
    assert cli.main(["scale", "--devices", "1,x", "--no-out"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "--devices" in err
