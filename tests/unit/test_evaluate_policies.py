"""`pipelines/evaluate.py` sweeps selection policies: rows carry their policy, the figure draws one
frontier curve per policy family, the CLI parses `--policies`."""

from __future__ import annotations

import dataclasses
import json

import pytest

import fdllm
from pipelines.evaluate import EvalRow, Policy, accuracy_figure, format_table, main, run_evaluation


def test_policy_parse():
    assert Policy.parse("thr=0.9") == Policy("threshold", 0.9)
    assert Policy.parse("eb=0.5") == Policy("entropy_budget", 0.5)
    assert Policy.parse("eb=2+delim=0.3") == Policy("entropy_budget", 2.0, 0.3)
    sp = Policy.parse("thr=0.7+delim=0.4").sampling_params(8, "diffusion")
    assert (sp.selection, sp.threshold, sp.entropy_budget, sp.delimiter_threshold) == ("threshold", 0.7, None, 0.4)
    sp = Policy.parse("eb=1").sampling_params(8, "speculative")
    assert (sp.selection, sp.threshold, sp.entropy_budget, sp.mode) == ("entropy_budget", None, 1.0, "speculative")
    assert Policy.parse("thr=0.9+look") == Policy("threshold", 0.9, None, True)
    assert Policy.parse("eb=1+look+delim=0.2") == Policy.parse("eb=1+delim=0.2+look") == Policy("entropy_budget", 1.0, 0.2, True)
    assert Policy.parse("thr=0.9+look").sampling_params(8, "diffusion").block_lookahead
    for bad in ("top=3", "thr", "eb=-1", "thr=0.9+d=0.3", "thr=2", "thr=0.9+look+look", "thr=0.9+delim=0.1+delim=0.2",
                "thr=0.9+look=1", "thr=0.9+"):
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
    x, y = accuracy_figure(rows).axes  # a panel per task
    assert [ax.get_title() for ax in (x, y)] == ["x", "y"] and len(x.lines) == len(y.lines) == 3  # three families
    labels = [line.get_label() for line in x.lines]
    eb = [r for r in rows if r.task == "x" and r.family == "entropy budget"]
    line = x.lines[labels.index(dllm_dir.name + " (entropy budget)")]
    assert list(line.get_xdata()) == [r.tokens_per_forward for r in eb]  # gamma ascending
    speculative = [dataclasses.replace(r, mode="speculative") for r in rows if r.mode == "diffusion"]
    fig = accuracy_figure(rows + speculative)  # a curve per mode and family, both named; one legend
    assert [len(ax.lines) for ax in fig.axes] == [2 * 3, 2 * 3]
    (legend,) = fig.legends
    assert dllm_dir.name + " (speculative, threshold)" in [t.get_text() for t in legend.get_texts()]
    # the CLI: --policies replaces --thresholds
    out = tmp_path / "rows.json"
    main(["--model", str(dllm_dir), "--data", str(records), "--modes", "diffusion", "--policies", "thr=0.9,eb=1+delim=0.5",
          "--max-new-tokens", "4", "--output", str(out)])
    written = json.loads(out.read_text())
    assert [(r["selection"], r["threshold"], r["entropy_budget"], r["delimiter_threshold"]) for r in written
            if r["task"] == "all"] == [("threshold", 0.9, None, None), ("entropy_budget", None, 1.0, 0.5)]


def test_block_lookahead_rows_are_diffusion_rows_of_their_own_family(dllm_dir, records):
    """A `+look` policy gives a diffusion row (its own curve, labelled) and no speculative row: the
    lookahead is a diffusion-mode schedule (speculative mode has its own, engine-wide)."""
    policies = (Policy("threshold", 0.9), Policy("threshold", 0.9, block_lookahead=True))
    rows = [r for r in run_evaluation(str(dllm_dir), str(records), modes=("diffusion", "speculative"), policies=policies,
                                      max_new_tokens=8) if r.task == "all"]
    assert [(r.mode, r.policy, r.block_lookahead) for r in rows] == [
        ("diffusion", "thr 0.9", False), ("diffusion", "thr 0.9 +look", True), ("speculative", "thr 0.9", False)]
    assert rows[1].family == "threshold + lookahead" and EvalRow(**rows[1].to_json()).block_lookahead


def test_the_speculative_lookahead_can_be_turned_off_and_changes_forwards_not_tokens(dllm_dir, records):
    """`--no-speculative-lookahead` measures the lossless mode without its lookahead (docs/decoding.md's
    "lookahead off / on" column): the same outputs in another count of forwards (on this random model's
    rejected drafts, not fewer)."""
    on, off = (run_evaluation(str(dllm_dir), str(records), modes=("speculative",), thresholds=(0.9,), max_new_tokens=16,
                              speculative_lookahead=flag)[-1] for flag in (True, False))
    assert on.outputs == off.outputs and on.generated_tokens == off.generated_tokens
    assert off.tokens_per_forward != on.tokens_per_forward


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


def test_a_comma_list_of_models_is_one_table_with_the_base_once(dllm_dir, qwen2_dir, records, tmp_path):
    """`--model A,B` (a fine-tuned model and its distilled version, say): each model's rows in turn, the
    AR base's once, one figure with a curve per model."""
    import shutil

    other = shutil.copytree(dllm_dir, tmp_path / "distilled")
    plot = tmp_path / "frontier.png"
    rows = main(["--model", f"{dllm_dir},{other}", "--base", str(qwen2_dir), "--data", str(records), "--modes",
                 "diffusion", "--thresholds", "0.9,0.5", "--max-new-tokens", "4", "--plot", str(plot)])
    whole = [(r.model, r.mode, r.policy) for r in rows if r.task == "all"]
    assert whole == [(qwen2_dir.name, "ar", "-"), (dllm_dir.name, "diffusion", "thr 0.9"),
                     (dllm_dir.name, "diffusion", "thr 0.5"), ("distilled", "diffusion", "thr 0.9"),
                     ("distilled", "diffusion", "thr 0.5")]
    assert [len(ax.lines) for ax in accuracy_figure(rows).axes] == [2, 2]  # tasks x, y: one curve per model
    assert plot.stat().st_size > 0


def test_cli_errors_are_one_line_before_any_decoding(dllm_dir, tmp_path, capsys):
    """A bad argument or path is argparse's exit 2 with one message, not a traceback after the work."""
    records = tmp_path / "r.jsonl"
    records.write_text('{"prompt": "the fox", "answer": "12"}\n')
    (tmp_path / "adir").mkdir()
    for argv, needle in [(["--batch-size", "-1"], "--batch-size"), (["--limit", "0"], "--limit"),
                         (["--modes", ","], "no mode"), (["--output", str(tmp_path / "adir")], "is a directory"),
                         (["--model", str(tmp_path / "missing")], "missing: no such checkpoint directory"),
                         (["--model", str(tmp_path / "adir")], "adir: not an HF checkpoint directory")]:
        args = {"--model": str(dllm_dir), "--data": str(records)} | dict(zip(argv[::2], argv[1::2]))
        with pytest.raises(SystemExit) as e:
            main([x for kv in args.items() for x in kv])
        assert e.value.code == 2 and needle in capsys.readouterr().err, argv


def test_data_output_and_plot_may_be_object_store_uris(dllm_dir, tmp_path, monkeypatch, s3_env, capsys):
    """As every data path: `--data`, `--output` and `--plot` read and write through the
    storage filesystems; an s3:// output used to land in a local `./s3:/...` file."""
    import pyarrow.fs as pafs

    from tests.s3_server import make_bucket

    bucket = make_bucket("evaluate")
    fs, _ = pafs.FileSystem.from_uri(bucket)
    with fs.open_output_stream("evaluate/data/test.jsonl") as f:
        f.write(b'{"prompt": "the fox", "answer": "12"}\n')
    monkeypatch.chdir(tmp_path)
    rows = main(["--model", str(dllm_dir), "--data", f"{bucket}/data/test.jsonl", "--modes", "ar", "--max-new-tokens",
                 "2", "--output", f"{bucket}/out/rows.json", "--plot", f"{bucket}/out/acc.png"])
    with fs.open_input_stream("evaluate/out/rows.json") as f:
        assert [r["mode"] for r in json.loads(f.read())] == [r.mode for r in rows] == ["ar"] * len(rows)
    with fs.open_input_stream("evaluate/out/acc.png") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.iterdir())  # nothing written locally
    with pytest.raises(SystemExit) as e:  # a missing object is one line, exit 2
        main(["--model", str(dllm_dir), "--data", f"{bucket}/data/missing.jsonl"])
    assert e.value.code == 2 and "missing.jsonl" in capsys.readouterr().err


def test_the_console_script_exits_0(dllm_dir, tmp_path, monkeypatch):
    """`fdllm-evaluate` runs sys.exit(its function()): it returned the rows, so a success exited 1."""
    import sys
    from importlib.metadata import entry_points

    records = tmp_path / "r.jsonl"
    records.write_text('{"prompt": "the fox", "answer": "12"}\n')
    (script,) = entry_points(group="console_scripts", name="fdllm-evaluate")
    monkeypatch.setattr(sys, "argv", ["fdllm-evaluate", "--model", str(dllm_dir), "--data", str(records), "--modes", "ar"])
    assert script.load()() == 0


def test_no_row_reads_prompts_an_earlier_row_prefilled(dllm_dir, records, monkeypatch):
    """Rows share an engine (the model's modes and policies); with a prefix cache, every row after the first
    found the prompts the first had prefilled, an edge over the AR base's row, which runs first on its own."""
    seen = []
    generate = fdllm.Engine.generate

    def counting(engine, *args, **kwargs):
        results = generate(engine, *args, **kwargs)
        seen.extend(r.num_cached_tokens for r in results)
        return results

    monkeypatch.setattr(fdllm.Engine, "generate", counting)
    run_evaluation(str(dllm_dir), str(records), base=str(dllm_dir), modes=("ar", "diffusion"), max_new_tokens=8,
                   thresholds=(0.9, 0.5))
    assert len(seen) > 0 and set(seen) == {0}


def test_evaluate_scores_answers_up_to_surrounding_whitespace_and_takes_a_prompt_that_exactly_fits(dllm_dir, monkeypatch):
    """Exact match ignores the whitespace around an answer (a decoded "42\\n" is right); a record whose
    prompt plus max_new_tokens is exactly the context is decoded, not refused as too long."""
    import fdllm
    from fdllm.engine import GenerationResult
    from pipelines.evaluate import evaluate, prompt_ids

    engine = fdllm.Engine.from_pretrained(dllm_dir)
    records = [{"prompt": "the fox", "answer": "12"}, {"prompt": "hello world 7", "answer": " 7 "},
               {"prompt": "hi", "answer": "19"}]
    outputs = iter(["12\n", "7", " 18"])
    monkeypatch.setattr(engine, "generate", lambda prompts, params, progress=False: [
        GenerationResult(request_id=str(i), prompt_token_ids=p, token_ids=[1], text=next(outputs), num_forwards=1)
        for i, p in enumerate(prompts)])
    longest = max(len(prompt_ids(engine, r)) for r in records)
    params = fdllm.SamplingParams(max_new_tokens=engine.max_model_len - longest, temperature=0.0)
    row = evaluate(engine, records, params, "m", progress=False)
    assert (row.correct, row.total) == (2, 3)


def test_a_plot_without_matplotlib_is_refused_before_the_evaluation(dllm_dir, records, tmp_path, monkeypatch, capsys):
    """matplotlib comes with the train extra only: the plot failed after the whole evaluation had run."""
    import importlib.util

    from pipelines import evaluate

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a, **k: pytest.fail("the evaluation ran"))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(dllm_dir), "--data", str(records), "--plot", str(tmp_path / "f.png")])
    assert e.value.code == 2 and "--plot needs matplotlib: pip install 'fdllm[train]'" in capsys.readouterr().err

