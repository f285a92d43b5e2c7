"""CUDA graphs of decode steps (GPU only): replayed steps decode exactly like eager ones, with one sync per step."""

from __future__ import annotations

import pytest

import fdllm
from benchmarks.gpu_suite import syncs_of_full_decode_steps
from tests.unit.test_engine import MASK, params, random_prompts

pytestmark = pytest.mark.gpu


def _engine(model, eager: bool, cache: bool):
    cfg = fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.4, use_sub_block_cache=cache,
                                     mask_token_id=MASK)
    return fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=256, max_num_seqs=16, enforce_eager=eager))


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "sub-block-cache"])
def test_graphs_decode_like_eager(sharp_dir, cuda_device, cache):
    model = fdllm.load_model(sharp_dir, device=cuda_device)
    prompts = random_prompts(7, [1, 5, 8, 13], seed=4)
    ps = [params(max_new_tokens=20, temperature=0.8 if i % 2 else 0.0, seed=i, mode="ar" if i == 3 else "diffusion")
          for i in range(7)]
    graphed = _engine(model, eager=False, cache=cache)
    assert graphed.runner.graphs is not None
    got = [r.token_ids for r in graphed.generate(prompts, ps)]
    assert graphed.runner.graphs.steps, "no decode step was captured"
    assert got == [r.token_ids for r in _engine(model, eager=True, cache=cache).generate(prompts, ps)]


def test_one_sync_per_decode_step(sharp_dir, cuda_device):
    model = fdllm.load_model(sharp_dir, device=cuda_device)
    engine = _engine(model, eager=False, cache=True)
    for i, p in enumerate(random_prompts(4, [8], seed=2)):
        engine.add_request(p, params(max_new_tokens=40, temperature=0.7, seed=i))
    counts = syncs_of_full_decode_steps(engine, 4)
    assert counts and max(counts) <= 1, counts
