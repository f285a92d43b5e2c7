"""`pipelines/evaluate.py` sweeps selection policies: rows carry their policy, the figure draws one
frontier curve per policy family, the CLI parses `--policies`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipelines.evaluate import EvalRow, Policy, accuracy_figure, format_table, main, run_evaluation


def test_policy_parse():
    assert Policy.parse("thr=0.9") == Policy("threshold", 0.9)
    assert Policy.parse("eb=0.5") == Policy("entropy_budget", 0.5)
    assert Policy.parse("eb=2+delim=0.3") == Policy("entropy_budget", 2.0, 0.3)
    sp = Policy.parse("thr=0.7+delim=0.4").sampling_params(8, "diffusion")
    assert (sp.selection, sp.threshold, sp.entropy_budget, sp.delimiter_threshold) == ("threshold", 0.7, None, 0.4)
    sp = Policy.parse("eb=1").sampling_params(8, "speculative")
    assert (sp.selection, sp.threshold, sp.entropy_budget, sp.mode) == ("entropy_budget", None, 1.0, "speculative")
    for bad in ("top=3", "thr", "eb=-1", "thr=0.9+d=0.3", "thr=2"):
        with pytest.raises(ValueError):
            Policy.parse(bad)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "test.jsonl"
    rows = [{"prompt": p, "answer": "a", "category": c} for p, c in
            [("hello", "x"), ("the quick", "x"), ("a b c", "y"), ("hi", "y")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_evaluation_sweeps_policies_and_plots_one_curve_per_family(dllm_dir, records, tmp_path, capsys):
    policies = (Policy("threshold", 0.9), Policy("threshold", 0.5), Policy("entropy_budget", 0.5),
                Policy("entropy_budget", 4.0), Policy("entropy_budget", 4.0, 0.2))
    rows = run_evaluation(str(dllm_dir), str(records), modes=("ar", "diffusion"), policies=policies, max_new_tokens=8)
    diffusion = [r for r in rows if r.mode == "diffusion" and r.task == "all"]
    assert [r.policy for r in diffusion] == ["thr 0.9", "thr 0.5", "eb 0.5", "eb 4", "eb 4 +d0.2"]
    assert [r.policy for r in rows if r.mode == "ar"] == ["-"] * 3  # tasks x, y and all
    assert {r.family for r in diffusion} == {"threshold", "entropy budget", "entropy budget + delimiter 0.2"}
    assert all(isinstance(EvalRow(**r.to_json()), EvalRow) for r in rows)  # the JSON keeps the policy fields
    assert "eb 4 +d0.2" in format_table(rows)
    (ax,) = accuracy_figure(rows).axes
    assert len(ax.lines) == 2 * 3  # tasks x and y, three families each
    labels = [line.get_label() for line in ax.lines]
    assert "x: " + dllm_dir.name + " (entropy budget)" in labels
    eb = [r for r in rows if r.task == "x" and r.family == "entropy budget"]
    line = ax.lines[labels.index("x: " + dllm_dir.name + " (entropy budget)")]
    assert list(line.get_xdata()) == [r.tokens_per_forward for r in eb]  # gamma ascending
    speculative = [dataclasses.replace(r, mode="speculative") for r in rows if r.mode == "diffusion"]
    (ax,) = accuracy_figure(rows + speculative).axes  # a curve per mode and family, both named
    assert len(ax.lines) == 2 * 2 * 3 and "y: " + dllm_dir.name + " (speculative, threshold)" in [
        line.get_label() for line in ax.lines]
    # the CLI: --policies replaces --thresholds
    out = tmp_path / "rows.json"
    main(["--model", str(dllm_dir), "--data", str(records), "--modes", "diffusion", "--policies", "thr=0.9,eb=1+delim=0.5",
          "--max-new-tokens", "4", "--output", str(out)])
    written = json.loads(out.read_text())
    assert [(r["selection"], r["threshold"], r["entropy_budget"], r["delimiter_threshold"]) for r in written
            if r["task"] == "all"] == [("threshold", 0.9, None, None), ("entropy_budget", None, 1.0, 0.5)]


def test_sub_block_size_replaces_the_checkpoints_at_decode_time(dllm_dir, records, tmp_path, capsys):
    """A threshold near 0 commits a whole sub-block per step: with the checkpoint's sub-block 4 steps commit up to
    4 tokens, with `--sub-block-size 2` never more than 2 (the cap the flag exists to move)."""
    as_saved = [r for r in run_evaluation(str(dllm_dir), str(records), thresholds=(1e-6,), max_new_tokens=16)
                if r.task == "all"]
    assert [(r.model, r.sub_block_size) for r in as_saved] == [(dllm_dir.name, 4)]
    assert as_saved[0].tokens_per_forward > 2
    out = tmp_path / "rows.json"
    main(["--model", str(dllm_dir), "--data", str(records), "--modes", "diffusion", "--thresholds", "1e-6",
          "--max-new-tokens", "16", "--sub-block-size", "2", "--output", str(out)])
    (row,) = [r for r in json.loads(out.read_text()) if r["task"] == "all"]
    assert (row["model"], row["sub_block_size"]) == (f"{dllm_dir.name} sb2", 2)
    assert 1 < row["tokens_per_forward"] <= 2
    with pytest.raises(SystemExit) as exit_:  # the CLI: a usage error, not a traceback
        main(["--model", str(dllm_dir), "--data", str(records), "--sub-block-size", "3"])
    assert exit_.value.code == 2
    assert "divisible by sub_block_size (3)" in capsys.readouterr().err
