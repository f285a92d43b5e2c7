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
    assert modes == {"ar", "diffusion cache off", "diffusion cache on", "diffusion cache on, block lookahead",
                     "speculative", "speculative, no lookahead", "hf generate"}
    rows = {row["mode"]: row for row in sections["decode"]["table"]}
    # threshold ~0: a sub-block per step, and the lookahead's forwards take a block's first sub-block too
    assert rows["diffusion cache on, block lookahead"]["tokens/forward"] > rows["diffusion cache on"]["tokens/forward"]
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


def test_decode_targets_read_their_own_rows():
    """The batch-1 targets: the plain diffusion row (sub-block cache on, graphs) against AR, and AR
    against the roofline; rows without graphs, at other batches or of other modes are not read."""
    def row(mode, ratio=None, **kw):
        return {"shape": "s", "batch": 1, "mode": mode, "graphs": True, "ms/step": 2.0} | (
            {"step/AR step": ratio} if ratio else {}) | kw

    table = [row("ar", **{"roofline ms": 1.0}), row("ar", graphs=False, **{"roofline ms": 0.1}),
             row("diffusion cache off", 2.0), row("diffusion cache on", 1.2), row("diffusion cache on", 9.0, graphs=False),
             row("diffusion cache on", 9.0, batch=8), row("diffusion cache on, block lookahead", 9.0),
             row("speculative", 9.0), {"shape": "s", "batch": 1, "mode": "hf generate", "ms/step": 5.0}]
    checks = gpu_suite.decode_checks(table)
    assert [(c["value"], c["pass"]) for c in checks] == [(2.0, False), (1.2, True)]
    assert "roofline (1.00 ms)" in checks[0]["what"] and "diffusion step <= 1.3x AR step" in checks[1]["what"]
