"""benchmarks/bench_kernels.py: refuses without a GPU, and its --smoke run checks the kernels end to end."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_kernels


def test_refuses_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_kernels.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_refuses_an_unknown_linear_shape(capsys):
    with pytest.raises(SystemExit):
        bench_kernels.main(["--linear", "--linear-shapes", "qwen2.5-1.5b,llama-70b"])
    assert "expected a comma list of" in capsys.readouterr().err


def test_smoke_run(device, tmp_path):
    out = tmp_path / "kernels.json"
    if device.type == "cuda":  # a real but tiny benchmark
        argv = ["--batches", "1", "--contexts", "256", "--backends", "triton,torch", "--confidence", "--vocab", "4096",
                "--linear", "--linear-shapes", "smoke"]
    else:
        argv = ["--smoke"]
    assert bench_kernels.main([*argv, "--tune", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    tuned = {("paged_attention", f"triton min_keys={n}") for n in bench_kernels.TUNE_MIN_KEYS_PER_SPLIT}
    tuned |= {("paged_attention", f"triton {k}={v}") for k, values in bench_kernels.TUNE_ATTENTION.items() for v in values}
    tuned |= {("confidence", f"triton {name}={n}") for name, values in bench_kernels.TUNE_CONFIDENCE.items() for n in values}
    projections = {f"linear {p} smoke" for p in ("qkv", "o", "gate_up", "down")}
    tuned |= {(p, f"triton {name}={n}") for p in projections for name, values in bench_kernels.TUNE_LINEAR.items()
              for n in values}
    linear = {(p, backend) for p in projections for backend in ("triton", "torch")}
    assert {(r["kernel"], r["backend"]) for r in rows} >= {("paged_attention", "triton"), ("confidence", "triton"), *linear,
                                                           *tuned}
    # the tuned kernels compute what the defaults do (the error column: against the torch reference)
    assert all(r["max_abs_err"] is not None and r["max_abs_err"] < 1e-3 for r in rows
               if r["backend"].startswith("triton") and r["kernel"] in {"paged_attention", *projections})
