"""The decode GEMM (`fdllm.kernels.linear.skinny_linear`) against float64 torch, its row invariance bit for
bit, and its refusals; the fused forward on it (the engine's: tests/kernels/test_engine_triton.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.test_fused_ops import skip_interpreted_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (rows, N, K): one split and several; N and K off the tiles; Qwen2.5-1.5B's o projection at an AR row
SHAPES = [(1, 96, 64), (5, 200, 1000), (16, 1536, 1536), (32, 70, 300), (17, 130, 257)]


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu_gate: bool) -> torch.Tensor:
    """float64 torch of the same product (the gate computed as torch computes it in x's dtype)."""
    if silu_gate:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def operands(rows: int, N: int, K: int, dtype: torch.dtype, device, *, bias: bool, silu_gate: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2 * K if silu_gate else K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,N,K", SHAPES)
@pytest.mark.parametrize("bias,silu_gate", [(False, False), (True, False), (False, True)], ids=["plain", "bias", "gated"])
def test_matches_float64_torch(device, dtype, rows, N, K, bias, silu_gate):
    from fdllm.kernels.linear import skinny_linear

    skip_interpreted_bf16(device, dtype)
    x, w, b = operands(rows, N, K, DTYPES[dtype], device, bias=bias, silu_gate=silu_gate)
    got = skinny_linear(x, w, b, silu_gate=silu_gate)
    assert got.shape == (rows, N) and got.dtype == x.dtype
    want = reference(x, w, b, silu_gate)
    # fp32: summation order alone (IEEE dots, not TF32); 16-bit: the output's rounding, as torch's own GEMM
    tol = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch_err = (F.linear(x, w, b) if not silu_gate else reference(x, w, b, True).to(x.dtype)).double() - want
    assert (got.double() - want).abs().max() <= 2 * torch_err.abs().max() + 1e-5  # no worse than torch's, twice over


def test_a_rows_result_is_the_same_alone_and_in_any_batch(device):
    """Row invariance: each row's output bit for bit alone, at any index of batches of 2..32 rows of
    different company, with and without the split of K and the gate; a NaN row leaks into no other."""
    from fdllm.kernels.linear import MAX_ROWS, skinny_linear, split_plan

    # (N, K, gate, tuning): split and not; a small target_programs splits K below the MIN_K_PER_SPLIT cap
    # (at these sizes the default's split is that cap), so a split chosen by the row count would show
    for N, K, silu_gate, tiles in ((300, 1024, False, {}), (96, 200, False, {}), (130, 512, True, {}),
                                   (96, 1024, False, {"target_programs": 4})):
        x, w, b = operands(MAX_ROWS, N, K, torch.float32, device, bias=True, silu_gate=silu_gate, seed=N)
        alone = [skinny_linear(x[i : i + 1], w, b, silu_gate=silu_gate, **tiles)[0] for i in range(MAX_ROWS)]
        for size in (2, 7, 16, 17, MAX_ROWS):
            order = torch.randperm(MAX_ROWS, generator=torch.Generator().manual_seed(size))[:size]
            batch = x[order].clone()
            batch[-1] = float("nan")  # a poisoned neighbour
            got = skinny_linear(batch, w, b, silu_gate=silu_gate, **tiles)
            assert torch.isnan(got[-1]).all()
            for j, i in enumerate(order[:-1].tolist()):
                assert torch.equal(got[j], alone[i]), (N, K, size, j)
        assert split_plan(N, K, **tiles).num_splits > 1 or N == 96  # both code paths ran
    assert split_plan(96, 1024, target_programs=4).num_splits < split_plan(96, 1024).num_splits  # under the cap


def test_split_plan_comes_from_the_weight_alone():
    """Whole BLOCK_K steps that cover K, split only while the output's tiles are too few to fill the GPU."""
    from fdllm.kernels.linear import BLOCK_K, BLOCK_N, MIN_K_PER_SPLIT, TARGET_PROGRAMS, split_plan

    for N, K in ((2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960), (3584, 18944), (7, 5), (64, 256)):
        splits, per = split_plan(N, K)
        assert per % BLOCK_K == 0 and (splits - 1) * per < K <= splits * per
        assert splits == 1 or (per >= MIN_K_PER_SPLIT and -(-N // BLOCK_N) * (splits - 1) < TARGET_PROGRAMS)
    assert split_plan(17920, 1536).num_splits == 1  # 280 column tiles fill the GPU
    assert split_plan(1536, 8960).num_splits > 1  # 24 column tiles over a long K


def test_shapes_at_the_edges(device):
    """No rows, no reduction; a 3-d input keeps its leading dims; a weight with a row stride (a view of a
    stacked weight); overflow."""
    from fdllm.kernels.linear import skinny_linear

    w = torch.randn(48, 40, device=device)
    assert skinny_linear(torch.empty(0, 40, device=device), w).shape == (0, 48)
    x = torch.randn(2, 3, 40, device=device)
    torch.testing.assert_close(skinny_linear(x, w), F.linear(x, w), rtol=2e-5, atol=2e-5)
    stacked = torch.randn(100, 40, device=device)
    torch.testing.assert_close(skinny_linear(x, stacked[10:58]), F.linear(x, stacked[10:58]), rtol=2e-5, atol=2e-5)
    huge = torch.full((1, 40), 3e38, device=device)  # past fp32's range once summed: inf, as torch gives
    assert torch.isinf(skinny_linear(huge, torch.ones(4, 40, device=device))).all()
    bias = torch.randn(5, device=device)  # an empty reduction: the bias alone, as F.linear gives
    assert torch.equal(skinny_linear(torch.empty(3, 0, device=device), torch.empty(5, 0, device=device), bias),
                       bias.expand(3, 5))


def test_refuses_what_it_cannot_take(device):
    from fdllm.kernels.linear import MAX_ROWS, fits, skinny_linear

    w = torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        skinny_linear(torch.randn(MAX_ROWS + 1, 16, device=device), w)
    with pytest.raises(ValueError, match="x's dtype"):
        skinny_linear(torch.randn(2, 16, device=device, dtype=torch.float16), w)
    with pytest.raises(ValueError, match=r"x \[\.\.\., 32\]"):
        skinny_linear(torch.randn(2, 16, device=device), w, silu_gate=True)
    with pytest.raises(ValueError, match="bias must be"):
        skinny_linear(torch.randn(2, 16, device=device), w, torch.zeros(9, device=device))

    class Quantized(torch.Tensor):  # what torchao's weights are: a tensor subclass the kernel cannot read
        pass

    assert not fits(torch.randn(2, 16, device=device), w.as_subclass(Quantized))
    assert fits(torch.randn(MAX_ROWS, 16, device=device), torch.nn.Parameter(w))


@pytest.mark.parametrize("arch,overrides", [("qwen2", {}), ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_fused_forward_on_the_triton_gemm_matches_transformers(device, arch, overrides, tmp_path, monkeypatch):
    """`fuse_projections("triton")`: a decode step's few rows run every projection on the Triton GEMM
    (q/k/v, o, gate/up, and down with the gate in its prologue), logits HF's to fp32 rounding; a
    prefill's many rows stay on torch's."""
    import fdllm
    from fdllm.kernels import linear
    from tests.helpers import VOCAB, tiny_hf_model

    calls = []
    real = linear.skinny_linear
    monkeypatch.setattr(linear, "skinny_linear", lambda x, w, *a, **kw: calls.append(kw["silu_gate"]) or real(x, w, *a, **kw))
    hf = tiny_hf_model(arch, **overrides)
    hf.save_pretrained(tmp_path)
    ours = fdllm.load_model(tmp_path, device=device)
    ours.fuse_projections("triton")
    layers = ours.config.num_hidden_layers
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for shape, gemms in (((2, 9), 4 * layers), ((3, 40), 0)):
            calls.clear()
            ids = torch.randint(0, VOCAB, shape, generator=gen).to(device)
            got = ours.lm_head(ours.hidden(ids, fused=True))
            want = hf.to(device)(ids).logits
            assert (got - want).abs().max().item() < 1e-4
            assert len(calls) == gemms and calls.count(True) == gemms // 4
    with pytest.raises(ValueError, match="linear_backend"):
        ours.fuse_projections("cublas")


@pytest.mark.gpu
def test_skinny_linear_at_qwen2_shapes_on_gpu(cuda_device):
    """Compiled: Qwen2.5-1.5B's four projections in bf16 at 1, 8 and 32 rows, against float64 torch within
    twice cuBLAS's own error, and each row bitwise the same alone."""
    from fdllm.kernels.linear import skinny_linear

    for N, K, gated in ((2048, 1536, False), (1536, 1536, False), (17920, 1536, False), (1536, 8960, True)):
        x, w, b = operands(32, N, K, torch.bfloat16, cuda_device, bias=N == 2048, silu_gate=gated)
        want = reference(x, w, b, gated)
        for rows in (1, 8, 32):
            got = skinny_linear(x[:rows], w, b, silu_gate=gated)
            ours = (got.double() - want[:rows]).abs().max()
            cublas = (reference(x[:rows], w, b, gated).to(x.dtype).double() if gated else F.linear(x[:rows], w, b).double())
            assert ours <= 2 * (cublas - want[:rows]).abs().max() + 1e-3, (N, K, rows)
            assert torch.equal(got[:1], skinny_linear(x[:1], w, b, silu_gate=gated)), (N, K, rows)
