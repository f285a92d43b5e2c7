"""The embedded default, scaled down: world corpus -> tokenizer -> a few AR steps -> a few
block-diffusion fine-tune steps on local Ray -> decode -> evaluate per task, table, JSON-able rows
and the accuracy-vs-tokens-per-forward picture, checking each artifact."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fdllm
from fdllm.tokenizer import load_tokenizer
from pipelines import world
from pipelines.evaluate import ALL_TASKS, accuracy_figure, format_table, plot_rows, run_evaluation
from pipelines.world.corpus import WorldConfig
from tests.helpers import start_local_ray

ray = pytest.importorskip("ray")


def test_scaled_down_chain(tmp_path):
    from pipelines.finetune import FinetuneConfig, run

    data, base, dllm = tmp_path / "world", tmp_path / "base", tmp_path / "dllm"
    world.main(["data", "--out", str(data), "--num-train", "96", "--num-test", "2", "--num-beyond", "0"])
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert len(train) == 96 and {"input", "output"} <= set(train[0])
    world.main(["tokenizer", "--data", str(data), "--out", str(base), "--vocab-size", "300"])
    world.main(["pretrain", "--data", str(data), "--out", str(base), "--steps", "3", "--batch-size", "8",
                "--num-examples", "96", "--hidden-size", "32", "--layers", "1", "--eval-every", "0"])
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()

    start_local_ray(num_cpus=2)
    try:
        result = run(FinetuneConfig(model=str(base), data=[str(data / "train.jsonl")], output=str(dllm),
                           storage_path=str(tmp_path / "ray"), run_name="chain", num_workers=1, cpus_per_worker=1,
                           data_cpus=0.5, block_size=8, sub_block_size=4, seq_len=128, batch_size=4, lr=1e-3,
                           max_steps=3, save_every=3))
    finally:
        ray.shutdown()
    block_cfg = fdllm.BlockDiffusionConfig.load(dllm)
    assert block_cfg.block_size == 8 and block_cfg.sub_block_size == 4 and block_cfg.mask_token_id is not None
    # Three steps of the block-diffusion loss on a barely trained base: finite, about ln(V), and the
    # weights moved (the mask row aside, every tensor of the base is still there, same shape).
    vocab = len(load_tokenizer(dllm))
    assert result.metrics["step"] == 3 and math.isfinite(result.metrics["loss"])
    assert 0.5 * math.log(vocab) < result.metrics["loss"] < 1.5 * math.log(vocab)
    before, after = fdllm.load_model(base).state_dict(), fdllm.load_model(dllm).state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k].shape == after[k].shape and not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed

    engine = fdllm.Engine.from_pretrained(dllm)
    prompt = [t for t in range(1, 9) if t != block_cfg.mask_token_id][:3]  # diffusion refuses a prompt with the mask
    out = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=8))[0]
    assert 1 <= len(out.token_ids) <= 8 and out.num_forwards >= 1

    rows = run_evaluation(str(dllm), str(data / "test.jsonl"), base=str(base), thresholds=(1.0, 0.5), max_new_tokens=40)
    tasks = sorted(WorldConfig().task_weights)
    runs = [("ar", None), ("diffusion", 1.0), ("diffusion", 0.5)]
    # per run: one row per task (decoded on its own), then the whole set summed from them
    assert [(r.mode, r.threshold, r.task) for r in rows] == [(*run, t) for run in runs for t in [*sorted(tasks), ALL_TASKS]]
    for r in rows:
        assert r.total == (2 if r.task != ALL_TASKS else 2 * len(tasks)) and r.accuracy == r.correct / r.total
        assert r.tokens_per_s == pytest.approx(r.generated_tokens / r.seconds, rel=1e-6)
    for whole in (r for r in rows if r.task == ALL_TASKS):
        parts = [r for r in rows if (r.mode, r.threshold) == (whole.mode, whole.threshold) and r.task != ALL_TASKS]
        assert whole.correct == sum(r.correct for r in parts) and whole.generated_tokens == sum(r.generated_tokens for r in parts)
    ar = [r for r in rows if r.mode == "ar"]
    thr1 = [r for r in rows if r.threshold == 1.0]
    assert all(r.tokens_per_forward == 1.0 for r in ar)  # AR: exactly one token per forward
    assert all(0 < r.tokens_per_forward <= 1.0 for r in thr1)  # threshold 1.0: one position per step, plus block commits
    table = format_table(rows).splitlines()
    assert len(table) == 3 + len(rows)  # header, rule, one line per row, which AR rows "vs AR" divides by
    assert table[-1] == f"vs AR: tok/s over {ar[0].model}'s AR row of the same task and batch"

    # The picture: accuracy (y) against tokens per forward (x); a panel per task with an AR point and a
    # diffusion line through the thresholds, at the rows' own coordinates; a non-empty PNG on disk.
    fig = accuracy_figure(rows)
    assert [ax.get_title() for ax in fig.axes] == tasks
    assert all(ax.get_xlabel() == "tokens per forward" for ax in fig.axes) and "accuracy" in fig.axes[0].get_ylabel()
    assert all(len(ax.lines) == 1 and len(ax.collections) == 1 for ax in fig.axes)  # lines: diffusion, points: AR
    first = fig.axes[0].lines[0]
    curve = [r for r in rows if r.mode == "diffusion" and r.task == tasks[0]]
    assert list(first.get_xdata()) == [r.tokens_per_forward for r in curve]
    assert list(first.get_ydata()) == [100 * r.accuracy for r in curve]
    png = plot_rows(rows, tmp_path / "report" / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
