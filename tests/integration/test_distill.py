"""pipelines/distill.py end to end on a local Ray instance (2 CPUs) with a tiny random block-diffusion
checkpoint: trajectories by a Ray Data engine actor, wrong ones counted and dropped, a few certainty-
forcing training steps, a servable checkpoint. (Resume is the fine-tune's, tested in test_finetune.py;
reusing written trajectories is tested in tests/unit/test_distill.py.)"""

from __future__ import annotations

import json

import pytest
import torch

ray = pytest.importorskip("ray")

import fdllm  # noqa: E402
from pipelines.distill import SUMMARY_FILE, TRAJECTORIES_FILE, run  # noqa: E402
from pipelines.finetune_config import DistillConfig  # noqa: E402
from tests.helpers import start_local_ray  # noqa: E402
from tests.unit.test_distill import own_answers  # noqa: E402

PROMPTS = ["hello world", "one two", "a b c", "hi there", "hello", "seven"]  # the random model answers each


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_distill_end_to_end(local_ray, dllm_dir, tmp_path):
    answers = own_answers(dllm_dir, PROMPTS, 12)
    records = [{"input": [{"role": "user", "content": p}], "output": a if i % 3 else "wrong 0"}  # 2 of 6 wrong
               for i, (p, a) in enumerate(zip(PROMPTS, answers))]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    out, storage = tmp_path / "servable", tmp_path / "runs"
    cfg = DistillConfig(model=str(dllm_dir), data=[str(data)], output=str(out), storage_path=str(storage),
                        run_name="distill", block_size=8, sub_block_size=4, seq_len=64, batch_size=2, max_steps=2,
                        save_every=2, log_every=1, lr=1e-3, cpus_per_worker=0.5, data_cpus=0.5, engine_cpus=0.5,
                        trajectory_max_new_tokens=12, trajectory_batch_size=4)
    result = run(cfg)

    summary = json.loads((storage / "distill" / "trajectories" / SUMMARY_FILE).read_text())["counts"]
    assert summary == {"correct": 4, "wrong_dropped": 2, "bad_invalid_json": 1}
    lines = (storage / "distill" / "trajectories" / TRAJECTORIES_FILE).read_text().splitlines()
    assert sorted(json.loads(x)["messages"][-1]["content"] for x in lines) == sorted(
        a for i, a in enumerate(answers) if i % 3)
    assert result.metrics["step"] == 2 and torch.isfinite(torch.tensor(result.metrics["loss"]))

    # servable: loads in the engine (block layout and mask token kept), and the weights moved
    block = fdllm.BlockDiffusionConfig.load(out)
    assert (block.block_size, block.sub_block_size) == (8, 4)
    assert block.mask_token_id == fdllm.BlockDiffusionConfig.load(dllm_dir).mask_token_id
    assert not (out / "train_state.pt").exists()
    engine = fdllm.Engine.from_pretrained(out)
    assert engine.generate(["hello"], fdllm.SamplingParams(max_new_tokens=4))[0].num_forwards >= 1
    assert not torch.equal(fdllm.load_model(dllm_dir).lm_head.weight, engine.model.lm_head.weight)
