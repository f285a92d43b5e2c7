"""The embedded default, scaled down: world corpus -> tokenizer -> a few AR steps -> a few
block-diffusion fine-tune steps on local Ray -> decode -> evaluate, checking each artifact."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fdllm
from fdllm.tokenizer import load_tokenizer
from pipelines import world
from pipelines.evaluate import format_table, run_evaluation

ray = pytest.importorskip("ray")


def test_scaled_down_chain(tmp_path):
    from pipelines.finetune import FinetuneConfig, run

    data, base, dllm = tmp_path / "world", tmp_path / "base", tmp_path / "dllm"
    world.main(["data", "--out", str(data), "--num-train", "96", "--num-test", "6"])
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert len(train) == 96 and {"input", "output"} <= set(train[0])
    world.main(["tokenizer", "--data", str(data), "--out", str(base), "--vocab-size", "300"])
    world.main(["pretrain", "--data", str(data), "--out", str(base), "--steps", "3", "--batch-size", "8",
                "--num-examples", "96", "--hidden-size", "32", "--layers", "1", "--eval-every", "0"])
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
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
    out = engine.generate([[1, 2, 3]], fdllm.SamplingParams(max_new_tokens=8))[0]
    assert 1 <= len(out.token_ids) <= 8 and out.num_forwards >= 1

    rows = run_evaluation(str(dllm), str(data / "test.jsonl"), base=str(base), thresholds=(1.0, 0.5), max_new_tokens=40)
    assert [(r.mode, r.threshold) for r in rows] == [("ar", None), ("diffusion", 1.0), ("diffusion", 0.5)]
    for r in rows:
        assert r.total == 6 and r.accuracy == r.correct / r.total
        assert r.tokens_per_s == pytest.approx(r.generated_tokens / r.seconds, rel=1e-6)
    ar, thr1, _ = rows
    assert ar.tokens_per_forward == 1.0  # AR: exactly one token per forward
    assert 0 < thr1.tokens_per_forward <= 1.0  # threshold 1.0: one position per step, plus block commits
    assert len(format_table(rows).splitlines()) == 2 + len(rows)  # header, rule, one line per row
