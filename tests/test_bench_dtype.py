"""``fnlayers-bench conv|train --dtype``: the runs in bfloat16, their achieved TFLOP/s and the
fraction of the matrix-product peak measured in the same dtype. Tiny shapes, one repetition."""

import json

import pytest

from fnlayers.bench import _harness, cli
from fnlayers.bench import conv as conv_bench
from fnlayers.bench import train as train_bench


def test_dtype_flag_is_checked_and_names_the_outputs(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["conv", "--dtype", "int8", "--no-out"])
    assert exit_.value.code == 2
    assert "--dtype" in capsys.readouterr().err
    assert "-train-bfloat16-quick-" in cli._default_out("train", True, "bfloat16")
    with pytest.raises(ValueError, match="dtype='int8'"):
        _harness.check_dtype("int8", fn="conv.run")
    assert _harness.check_dtype("bfloat16", fn="f") == "bfloat16"
    assert train_bench.torch_skip_reason("float16", "cpu")
    assert train_bench.torch_skip_reason("bfloat16", "cpu") is None
    assert conv_bench.torch_skip_reason("float16", "cuda") is None


def test_conv_benchmark_in_bfloat16_reports_tflops_and_peak_fraction(tmp_path, capsys):
    out = tmp_path / "conv.json"
    args = ["conv", "--tiny", "--reps", "1", "--no-torch", "--modes", "fwd+bwd"]
    assert cli.main([*args, "--dtype", "bfloat16", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["dtype"] == "bfloat16" and payload["flops"]["source"] == "analytic"
    peak = payload["gemm_peak"]
    assert peak["dtype"] == "bfloat16" and peak["tflops"] > 0
    for r in payload["results"]:
        case = next(c for c in conv_bench.TINY_CASES if c.name == r["case"])
        assert r["flops"] == 3 * case.flops
        for t in r["impls"].values():
            assert t["tflops"] == pytest.approx(r["flops"] / t["median_ms"] * 1e3 / 1e12)
            assert t["peak_fraction"] == pytest.approx(t["tflops"] / peak["tflops"])
            assert t["xla_flops"] > 0
    table = out.with_suffix(".md").read_text()
    assert "conv suite, bfloat16" in table
    assert "| im2col TFLOP/s (of peak) |" in table
    assert "TFLOP/s" in capsys.readouterr().out


def test_train_benchmark_in_bfloat16_reports_tflops_and_peak_fraction(tmp_path):
    out = tmp_path / "train.json"
    args = ["train", "--tiny", "--reps", "1", "--frameworks", "fnlayers", "--no-memory"]
    assert cli.main([*args, "--dtype", "bfloat16", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["dtype"] == "bfloat16" and payload["gemm_peak"]["dtype"] == "bfloat16"
    (row,) = payload["results"]
    # LeNet at batch 2: conv1 2*2*24*24*(5*5*1*20), conv2 2*2*8*8*(5*5*20*50), ip1 2*2*800*500,
    # ip2 2*2*500*10; forward and backward three times that.
    assert row["flops"] == 3 * (1_152_000 + 6_400_000 + 1_600_000 + 20_000)
    t = row["frameworks"]["fnlayers"]
    assert t["tflops"] == pytest.approx(row["flops"] / t["median_ms"] * 1e3 / 1e12)
    assert 0 < t["peak_fraction"] == pytest.approx(t["tflops"] / payload["gemm_peak"]["tflops"])
    assert t["xla_flops"] > 0
    table = out.with_suffix(".md").read_text()
    assert "train suite, bfloat16" in table and "| TFLOP/s | of peak |" in table
