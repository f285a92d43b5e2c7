"""`python -m benchmarks.bench_host` runs end to end on the committed tiny world model."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_host


@pytest.mark.parametrize("mode,stub", [("diffusion", False), ("ar", False), ("diffusion", True)])
def test_bench_host_splits_each_step_into_body_lm_head_and_host(mode, stub, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_host.main(["--batch-sizes", "1,4", "--max-new-tokens", "24", "--repeats", "1", "--mode", mode,
                            "--json", str(out)] + (["--stub-model"] if stub else [])) == 0
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["model"], r["batch"]) for r in rows] == [(mode, "stub" if stub else "real", b) for b in (1, 4)]
    for r in rows:
        assert r["steps"] >= 3  # decode steps with every request running and one forward each
        assert r["head_ms"] > 0 and r["host_ms"] > 0 and r["host_mean_ms"] > 0
        # a real forward takes far longer than the LM head on candidate rows; a stub body is a lookup
        assert r["body_ms"] < r["head_ms"] if stub else r["body_ms"] > r["head_ms"]
        # medians of per-step parts: not additive in general, but never more than the step itself
        assert max(r["body_ms"], r["head_ms"], r["host_ms"]) < r["step_ms"]
        # the host's part before the forward and after its results: some, never all of it (the head's
        # launch, confidence and sampling lie between)
        assert 0 < r["critical_ms"] < r["host_ms"]
    printed = capsys.readouterr().out
    assert "lm head ms" in printed and "host ms" in printed and "host mean" in printed and "critical ms" in printed


def test_prefill_rows_time_the_steps_that_prefill_a_long_prompt(tmp_path):
    """--prefill-len: per batch size, the steps that prefill a long prompt whole beside the batch; their
    body runs over the prompt's tokens too, so it takes longer than a decode step's."""
    out = tmp_path / "rows.json"
    assert bench_host.main(["--batch-sizes", "2", "--max-new-tokens", "24", "--repeats", "1", "--prefill-len", "300",
                            "--json", str(out)]) == 0
    decode, prefill = json.loads(out.read_text())
    assert (decode["mode"], prefill["mode"]) == ("diffusion", "prefill") and prefill["batch"] == 2
    assert prefill["steps"] == bench_host.PREFILLS and prefill["host_ms"] > 0
    assert prefill["body_ms"] > 2 * decode["body_ms"]


def test_best_keeps_the_quietest_repeat_and_the_mean_over_all_of_them():
    """A collector pause in one repeat must show in the mean even when another repeat has the least median."""
    row = lambda steps, host, mean: bench_host.HostRow("diffusion", "stub", 64, steps, 2.0, 0.0, 0.2, host, mean, 0.5)  # noqa: E731
    [best] = bench_host.best([row(60, 1.9, 5.0), row(40, 1.5, 1.5)])
    assert best.host_ms == 1.5 and best.steps == 40
    assert best.host_mean_ms == pytest.approx((60 * 5.0 + 40 * 1.5) / 100)


def test_too_few_new_tokens_to_time_a_step_is_a_usage_error(capsys):
    """It was a RuntimeError traceback (exit 1) after the model loaded."""
    with pytest.raises(SystemExit) as e:
        bench_host.main(["--batch-sizes", "1", "--max-new-tokens", "1", "--repeats", "1", "--prompt-len", "4"])
    assert e.value.code == 2
    assert "bench_host: error: no full-batch decode step was measured" in capsys.readouterr().err
