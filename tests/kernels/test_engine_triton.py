"""The engine on the Triton backend (paged attention + fused greedy confidence) decodes token for
token like the torch backend and the no-cache reference of tests/unit/test_engine.py.

On CUDA when present, else on the CPU under the Triton interpreter (see conftest.py): a tiny model
and a few short requests keep that to seconds.
"""

from __future__ import annotations

import pytest

import fdllm
from tests.reference import reference_generate
from tests.unit.test_engine import MASK, make_engine, params, random_prompts

N = 12  # new tokens per request: past the first block of 8
GREEDY = [random_prompts(1, [n], seed=n)[0] for n in (3, 8, 13)]  # partial block, exact block, block + partial
PROMPTS = [*GREEDY, *random_prompts(2, [5], seed=41)]
# Greedy diffusion rows take the fused confidence kernel; a greedy AR request adds causal attention
# rows; a seeded sampling request's rows take the logits path within the same steps.
PARAMS = [params(max_new_tokens=N)] * len(GREEDY) + [
    params(max_new_tokens=N, mode="ar"),
    params(max_new_tokens=N, temperature=0.7, seed=5),
]


@pytest.fixture(scope="module")
def model(sharp_dir, device):
    return fdllm.load_model(sharp_dir, device=device)


@pytest.mark.parametrize("use_sub_block_cache", [False, True], ids=["refresh", "sub_block_cache"])
def test_triton_backend_decodes_like_torch_and_reference(model, use_sub_block_cache, monkeypatch):
    """Its steps run the fused norm (with the residual add), RoPE with the K/V store, and SiLU gate kernels
    too (counted), the torch backend's do not."""
    from fdllm.kernels import fused_ops

    calls = {"rms_norm": 0, "add_rms_norm": 0, "rope_store_kv": 0, "silu_mul": 0}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(fused_ops, name)):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(fused_ops, name, counted)
    engines = {name: make_engine(model, attention_backend=name, use_sub_block_cache=use_sub_block_cache)
               for name in ("triton", "torch")}
    assert engines["triton"].runner.fused_confidence is not None
    assert model.model.layers[0].self_attn.qkv.valid and model.model.layers[0].mlp.gate_up.valid  # one GEMM each
    got = {"triton": engines["triton"].generate(PROMPTS, PARAMS)}
    assert all(calls.values()), calls
    before = dict(calls)
    got["torch"] = engines["torch"].generate(PROMPTS, PARAMS)
    assert calls == before
    assert [r.token_ids for r in got["triton"]] == [r.token_ids for r in got["torch"]]
    assert all(len(r.token_ids) == N for r in got["triton"])
    assert any(r.tokens_per_forward > 1 for r in got["triton"]), "thresholds should unmask several tokens at once"
    if not use_sub_block_cache:  # the sub-block cache approximates, the reference does not
        for prompt, res in zip(GREEDY, got["triton"]):
            assert res.token_ids == reference_generate(model, prompt, N, 8, 4, 0.4)


def test_causal_entries_and_block_lookahead_on_triton_decode_like_torch(model):
    """Per-entry causal flags through the Triton kernel: a causal-prefix checkpoint's commits (with
    and without the block lookahead's second row) and speculative verifies share static steps with
    bidirectional rows."""
    causal_params = [params(max_new_tokens=N, block_lookahead=True), params(max_new_tokens=N, mode="speculative"),
                     params(max_new_tokens=N), params(max_new_tokens=N, mode="speculative", temperature=0.7, seed=3)]
    prompts = PROMPTS[: len(causal_params)]
    engines = {name: make_engine(model, attention_backend=name, prefix_attention="causal") for name in ("triton", "torch")}
    shapes, inner = [], engines["triton"].runner.static_shape
    engines["triton"].runner.static_shape = lambda inputs: shapes.append(inner(inputs)) or shapes[-1]
    got = {name: [r.token_ids for r in engine.generate(prompts, causal_params)] for name, engine in engines.items()}
    assert got["triton"] == got["torch"]
    assert any(s is not None and s.causal for s in shapes)


def test_scoring_on_triton_equals_torch(model):
    """`Engine.score`'s packed causal rows (three sequences over prefill chunks of 16 tokens) through the
    Triton kernel give the torch backend's log-probabilities."""
    sequences = [random_prompts(1, [n], seed=n)[0] for n in (5, 21, 9)]
    engines = {name: make_engine(model, attention_backend=name, prefix_attention="causal", max_prefill_tokens=16)
               for name in ("triton", "torch")}
    got = {name: engine.score(sequences, top_logprobs=2) for name, engine in engines.items()}
    for triton, torch_ in zip(got["triton"], got["torch"]):
        assert triton.logprobs[1:] == pytest.approx(torch_.logprobs[1:], abs=1e-4)
        assert [[t for t, _ in top] for top in triton.top_logprobs] == [[t for t, _ in top] for top in torch_.top_logprobs]


def test_fuse_kernels_off_runs_eager_torch_ops_on_the_triton_backend(sharp_dir, device, monkeypatch):
    """`EngineConfig(fuse_kernels=False)` (the GPU suite's A/B row): Triton attention, but the norm, RoPE
    and projections as eager torch runs them, and the same tokens."""
    from fdllm.kernels import fused_ops

    for name in ("rms_norm", "add_rms_norm", "apply_rope_fused", "store_kv", "rope_store_kv", "silu_mul"):
        monkeypatch.setattr(fused_ops, name, lambda *a: pytest.fail("a fused kernel ran"))
    model = fdllm.load_model(sharp_dir, device=device)  # its own: never stacked by another engine
    cfg = fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.4, mask_token_id=MASK)
    engine = fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=64, attention_backend="triton", fuse_kernels=False))
    assert engine.runner.fused_ops is False and model.model.layers[0].self_attn.qkv is None
    got = [r.token_ids for r in engine.generate(GREEDY, params(max_new_tokens=N))]
    assert got == [r.token_ids for r in make_engine(model, attention_backend="torch").generate(GREEDY, params(max_new_tokens=N))]
    with pytest.raises(ValueError, match="fuse_kernels must be a bool"):
        fdllm.EngineConfig(fuse_kernels="no")


def test_triton_gemm_engine_decodes_like_torch_alone_and_batched(sharp_dir, device, monkeypatch):
    """`EngineConfig(linear_backend="triton")`: decode steps' projections on `fdllm.kernels.linear` (counted),
    the torch backend's tokens and the no-cache reference's, and each request's tokens the same alone as in
    the batch; refused where the fused forward does not run."""
    from fdllm.kernels import linear

    calls = []
    real = linear.skinny_linear
    monkeypatch.setattr(linear, "skinny_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = fdllm.load_model(sharp_dir, device=device)  # its own: the backend is the last engine's choice
    engine = make_engine(model, attention_backend="triton", linear_backend="triton")
    got = [r.token_ids for r in engine.generate(PROMPTS, PARAMS)]
    assert calls, "no decode step ran the Triton GEMM"
    assert got == [r.token_ids for r in make_engine(model, attention_backend="torch").generate(PROMPTS, PARAMS)]
    for prompt, tokens in zip(GREEDY, got):
        assert tokens == reference_generate(model, prompt, N, 8, 4, 0.4)
    assert [engine.generate([p], [q])[0].token_ids for p, q in zip(PROMPTS, PARAMS)] == got
    with pytest.raises(ValueError, match="fused forward of the Triton attention backend"):
        make_engine(model, attention_backend="torch", linear_backend="triton")
    with pytest.raises(ValueError, match="fuse_kernels=True and quantization=None"):
        fdllm.EngineConfig(linear_backend="triton", quantization="int8")
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        fdllm.EngineConfig(linear_backend="cublas")
