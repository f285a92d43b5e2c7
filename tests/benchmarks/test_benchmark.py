"""`python -m benchmarks.benchmark decode` runs end to end on a tiny random model and prints every mode."""

from __future__ import annotations

import pytest

from benchmarks import benchmark


def test_decode_benchmark_smoke(capsys):
    benchmark.main([
        "decode", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--intermediate-size", "64", "--vocab-size", "64", "--batch-sizes", "1,2", "--prompt-len", "6",
        "--max-new-tokens", "8", "--block-size", "4", "--sub-block-size", "2", "--device", "cpu",
    ])
    out = capsys.readouterr().out
    for mode in ("ar", "diffusion, sub-block cache off", "diffusion, sub-block cache on", "diffusion, block lookahead",
                 "speculative", "speculative, no lookahead", "hf generate"):
        assert f"{mode}: batch 2 gives" in out
    assert "costs" in out and "tokens/s" in out
    # threshold ~0: the lookahead decodes each block's first sub-block in the forward that opens it
    rows = {line[:32].strip(): line.split() for line in out.splitlines() if line[32:38].strip() == "1"}
    assert float(rows["diffusion, block lookahead"][-5]) > float(rows["diffusion, sub-block cache on"][-5])  # tok/fwd


def test_prefix_benchmark_smoke(capsys):
    off, on = benchmark.main(["prefix", "--requests", "4", "--system-len", "20", "--question-len", "3", "--max-new-tokens", "4",
                              "--block-size", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "same tokens: yes" in out and "fewer prompt tokens prefilled" in out
    assert off.prefilled == 4 * 23 and on.prefilled == 23 + 3 * (23 - 20)  # later requests find the 5 system blocks cached


def test_paging_benchmark_smoke(capsys):
    """The world base's answers are short beside max_new_tokens: reserving the worst case runs
    `--fit` requests at a time, pages on demand run more, with the same tokens."""
    worst, demand = benchmark.main(["paging", "--requests", "12", "--fit", "2", "--max-new-tokens", "256",
                                    "--device", "cpu"])
    out = capsys.readouterr().out
    assert "same tokens: yes" in out and "requests running per step" in out
    assert worst.mean_running <= 2 < demand.mean_running and demand.steps < worst.steps
    assert worst.preemptions == 0 and all(worst.outputs)


def test_score_benchmark_smoke(capsys):
    off, on = benchmark.main(["score", "--contexts", "2", "--choices", "3", "--context-len", "40",
                              "--continuation-len", "3", "--device", "cpu"])
    assert "fewer tokens fed" in capsys.readouterr().out
    # 6 sequences of 43 tokens feed 42 each; sharing, the later two of each context start after its first block
    assert off.fed == 6 * 42 and on.fed == 2 * (42 + 2 * (42 - 32))
    assert all(a[0] is None and b[0] is None and a[1:] == pytest.approx(b[1:], abs=1e-5)
               for a, b in zip(off.logprobs, on.logprobs, strict=True))


@pytest.mark.parametrize("mode, block_lookahead", [("diffusion", True), ("speculative", False)])
def test_decode_rows_of_a_batch_run_the_whole_batch_together(mode, block_lookahead):
    """The decode table's KV pages hold a batch with its lookahead's next block: the lookahead rows of
    "batch N" ran N-1 requests at a time (N requests at their exact length, no page for that block)."""
    import torch

    import fdllm
    from fdllm.config import ModelConfig

    torch.manual_seed(0)
    model = fdllm.Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=64)).eval()
    batch, prompt_len, new, block = 3, 8, 8, 8
    cfg = fdllm.BlockDiffusionConfig(block_size=block, sub_block_size=4, threshold=1e-9, mask_token_id=63)
    engine = fdllm.Engine(model, None, cfg, fdllm.EngineConfig(
        num_pages=benchmark.kv_pages(batch, prompt_len, new, block), max_num_seqs=batch,
        max_prefill_tokens=batch * prompt_len))
    params = fdllm.SamplingParams(max_new_tokens=new, ignore_eos=True, mode=mode, block_lookahead=block_lookahead)
    for i in range(batch):
        engine.add_request(list(range(1 + i, 1 + i + prompt_len)), params)
    finished = []
    while not finished:
        finished = engine.step()
        assert len(finished) + engine.num_running == batch
