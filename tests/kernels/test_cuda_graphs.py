"""CUDA graphs of decode steps (GPU only): replayed steps decode exactly like eager ones, with one sync
per step, and the memory they hold stays within the engine's KV sizing."""

from __future__ import annotations

import pytest
import torch

import fdllm
from benchmarks.gpu_suite import syncs_of_full_decode_steps
from tests.unit.test_engine import MASK, params, random_prompts

pytestmark = pytest.mark.gpu


def _engine(model, eager: bool, cache: bool, linears: str = "torch"):
    cfg = fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.4, use_sub_block_cache=cache,
                                     mask_token_id=MASK)
    return fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=256, max_num_seqs=16, enforce_eager=eager,
                                                             linear_backend=linears))


@pytest.mark.parametrize("cache,linears", [(False, "torch"), (True, "torch"), (True, "triton")],
                         ids=["cache-off", "sub-block-cache", "triton-gemm"])
def test_graphs_decode_like_eager(sharp_dir, cuda_device, cache, linears):
    """`linears`: EngineConfig.linear_backend (the Triton decode GEMM's steps captured like cuBLAS's)."""
    model = fdllm.load_model(sharp_dir, device=cuda_device)
    prompts = random_prompts(7, [1, 5, 8, 13], seed=4)
    ps = [params(max_new_tokens=20, temperature=0.8 if i % 2 else 0.0, seed=i, mode="ar" if i == 3 else "diffusion")
          for i in range(7)]
    graphed = _engine(model, eager=False, cache=cache, linears=linears)
    assert graphed.runner.graphs is not None
    got = [r.token_ids for r in graphed.generate(prompts, ps)]
    assert graphed.runner.graphs.steps, "no decode step was captured"
    assert got == [r.token_ids for r in _engine(model, eager=True, cache=cache, linears=linears).generate(prompts, ps)]


def test_one_sync_per_decode_step(sharp_dir, cuda_device):
    model = fdllm.load_model(sharp_dir, device=cuda_device)
    engine = _engine(model, eager=False, cache=True)
    for i, p in enumerate(random_prompts(4, [8], seed=2)):
        engine.add_request(p, params(max_new_tokens=40, temperature=0.7, seed=i))
    counts = syncs_of_full_decode_steps(engine, 4)
    assert counts and max(counts) <= 1, counts


def test_kv_sizing_leaves_room_for_the_largest_steps(cuda_device):
    """gpu_memory_utilization is a bound the engine keeps: with a fraction that leaves the KV cache and
    the steps 3 GiB, batches growing from 1 to 128 requests (each new shape captured, smallest first,
    into the graphs' one pool), up to a full batch of speculative verifies (the largest captured
    step: 128 rows of 33 queries, whose Triton split-KV partials alone are ~1 GiB unsliced) beside a
    whole prefill chunk, never take the process past it. Sizing that left out the partials or the
    graphs' pool, or graphs that each kept their own output, went past it."""
    from benchmarks.gpu_suite import random_model

    model = random_model("sizing", cuda_device, torch.bfloat16)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(cuda_device)
    elsewhere = total - free - torch.cuda.memory_reserved(cuda_device)  # other processes, the CUDA context
    fraction = (torch.cuda.memory_reserved(cuda_device) + elsewhere + 3 * 2**30) / total
    mask = model.config.vocab_size - 1
    cfg = fdllm.BlockDiffusionConfig(block_size=32, sub_block_size=8, threshold=0.9, mask_token_id=mask)
    ecfg = fdllm.EngineConfig(gpu_memory_utilization=fraction, max_num_seqs=128, max_prefill_tokens=2048,
                              max_model_len=4096, enable_prefix_caching=False)
    torch.cuda.reset_peak_memory_stats(cuda_device)
    engine = fdllm.Engine(model, None, cfg, ecfg)
    assert engine.num_pages < 128 * 4096 // 32, "the budget, not max_num_seqs whole sequences, must bound the cache"
    for n in (1, 3, 8, 24, 64):
        engine.generate(random_prompts(n, [40], seed=n), params(max_new_tokens=40, mode="speculative"))
    engine.generate(random_prompts(127, [40], seed=5) + [[7] * 2048], params(max_new_tokens=40, mode="speculative"))
    assert len(engine.runner.graphs.steps) > 5, "decode steps of many shapes should have been captured"
    peak = torch.cuda.max_memory_reserved(cuda_device) + elsewhere
    kv_gib = 2 * engine.runner.cache.k_LPSKH.nbytes / 2**30
    assert peak <= fraction * total + 2**28, (
        f"{(peak - fraction * total) / 2**30:.2f} GiB past the budget; KV cache {kv_gib:.2f} GiB, peak allocated "
        f"{torch.cuda.max_memory_allocated(cuda_device) / 2**30:.2f} GiB, reserved now: {reserved_by_pool(cuda_device)}")


def reserved_by_pool(device: torch.device) -> str:
    """The caching allocator's reserved bytes by pool (default or a graph pool) and stream: what a budget
    overrun was made of."""
    sizes: dict[str, int] = {}
    for seg in torch.cuda.memory_snapshot():
        if seg["device"] == device.index:
            key = f"{'default' if tuple(seg['segment_pool_id']) == (0, 0) else 'graph'} pool, stream {seg['stream']}"
            sizes[key] = sizes.get(key, 0) + seg["total_size"]
    return ", ".join(f"{key}: {size / 2**30:.2f} GiB" for key, size in sorted(sizes.items()))
