"""benchmarks/bench_kernels.py: refuses without a GPU, and its --smoke run checks the kernels end to end."""

from __future__ import annotations

import json

import torch

from benchmarks import bench_kernels


def test_refuses_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_kernels.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_smoke_run(device, tmp_path):
    out = tmp_path / "kernels.json"
    if device.type == "cuda":  # a real but tiny benchmark
        argv = ["--batches", "1", "--contexts", "256", "--backends", "triton,torch", "--confidence", "--vocab", "4096"]
    else:
        argv = ["--smoke"]
    assert bench_kernels.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kernel"], r["backend"]) for r in rows} >= {("paged_attention", "triton"), ("confidence", "triton")}
