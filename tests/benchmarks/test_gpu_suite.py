"""`python -m benchmarks.gpu_suite --smoke` runs every section end to end on CPU, so the GPU suite cannot rot."""

from __future__ import annotations

import json

from benchmarks import gpu_suite


def test_gpu_suite_smoke_writes_every_section(tmp_path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path), "--smoke"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["pytest -m gpu", "engine exactness", "decode", "quantized decode", "syncs per step",
                              "kernels", "training step"]
    assert all(s["status"] == "ok" for s in sections.values()), [s.get("error") for s in sections.values()]
    assert all(c["pass"] for c in sections["engine exactness"]["checks"])
    modes = {row["mode"] for row in sections["decode"]["table"]}
    assert modes == {"ar", "diffusion cache off", "diffusion cache on", "speculative", "speculative, no lookahead",
                     "hf generate"}
    assert any(row.get("lookahead step cost", 0) > 0 for row in sections["decode"]["table"])
    assert any("speed-up @2.4" in row for row in sections["decode"]["table"])
    quantized = {row["format"]: row for row in sections["quantized decode"]["table"]}
    assert set(quantized) == {"float32", "int8", "int4", "fp8"} and "skipped" in quantized["fp8"]  # fp8: CUDA only
    assert quantized["int8"]["weight MB"] < quantized["float32"]["weight MB"]
    assert {row["objective"] for row in sections["training step"]["table"]} == {"diffusion", "diffusion-uncut", "ar"}
    md = (tmp_path / "report.md").read_text()
    assert "## decode (ok" in md and "| shape | batch | mode |" in md
    assert "| speed-up @4 |" in md and "| lookahead step cost |" in md  # columns the first row lacks are shown
    assert "[gpu_suite] engine exactness: ok" in capsys.readouterr().out  # progress is printed as it goes
