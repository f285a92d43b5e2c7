"""The fused RMSNorm and RoPE kernels against HF transformers' Qwen2 modules (independent oracles), the K/V
store and SiLU gate against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from fdllm.model import rope_cos_sin

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def skip_interpreted_bf16(device, dtype: str) -> None:
    if device.type != "cuda" and dtype == "bf16":
        pytest.skip("the Triton interpreter's bf16 arithmetic does not round as a GPU does (the gpu test covers bf16)")


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = Qwen2RMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=weight.dtype)
    norm.weight.data.copy_(weight)
    return norm(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e-20], ids=["unit", "huge", "tiny"])
def test_rms_norm_matches_hf(device, dtype, scale):
    from fdllm.kernels.fused_ops import rms_norm

    skip_interpreted_bf16(device, dtype)
    g = torch.Generator().manual_seed(0)
    D, eps = 96, 1e-6
    x = (torch.randn(2, 5, D, generator=g) * scale).to(device=device, dtype=DTYPES[dtype])
    x[0, 0] = 0  # an all-zero row: eps alone keeps it finite
    weight = (1 + 0.1 * torch.randn(D, generator=g)).to(device=device, dtype=DTYPES[dtype])
    got, want = rms_norm(x, weight, eps), hf_rms_norm(x, weight, eps)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    # only the mean's summation order differs: fp32 to rounding, 16-bit to an ulp or two (bf16's is 2**-8..2**-7)
    torch.testing.assert_close(got.float(), want.float(), rtol={"fp32": 1e-5, "fp16": 8e-3, "bf16": 1.6e-2}[dtype],
                               atol=1e-6)


def test_rms_norm_of_a_strided_input_and_fp32_weight(device):
    """A view with a row stride (the packed step's rows), and HF's promotion: fp16 x, fp32 weight -> fp32."""
    from fdllm.kernels.fused_ops import rms_norm

    x = torch.randn(7, 2 * 40, device=device, dtype=torch.float16)[:, :40]
    weight = torch.rand(40, device=device) + 0.5
    got, want = rms_norm(x, weight, 1e-5), hf_rms_norm(x, weight, 1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",  # the interpreter's numpy, on the
                            "ignore:invalid value encountered:RuntimeWarning")  # row that overflows on purpose
def test_add_rms_norm_is_torchs_sum_and_hfs_norm_of_it(device, dtype):
    """The residual add fused into the norm after it: the sum is eager torch's bit for bit (the residual
    stream must not drift from the unfused forward's), the norm HF's of that sum. Sums that overflow
    the dtype, cancel to zero, and strided rows (the packed step's views) included."""
    from fdllm.kernels.fused_ops import add_rms_norm

    skip_interpreted_bf16(device, dtype)
    g = torch.Generator().manual_seed(2)
    D, eps, dt = 48, 1e-6, DTYPES[dtype]
    x = torch.randn(3, 4, 2 * D, generator=g).to(device=device, dtype=dt)[..., :D]  # a row stride past D
    delta = torch.randn(3, 4, D, generator=g).to(device=device, dtype=dt)
    delta[0, 0] = -x[0, 0]  # cancels to an all-zero row
    big = torch.finfo(dt).max
    x[0, 1, :2], delta[0, 1, :2] = big, big  # overflows to inf in the dtype, as torch's sum does
    weight = (1 + 0.1 * torch.randn(D, generator=g)).to(device=device, dtype=dt)
    total, normed = add_rms_norm(x, delta, weight, eps)
    assert torch.equal(total, x + delta) and total.dtype == dt
    finite = torch.isfinite(total).all(-1)
    assert finite.sum() == 11 and torch.isfinite(normed[finite]).all()
    torch.testing.assert_close(normed[finite].float(), hf_rms_norm(total, weight, eps)[finite].float(),
                               rtol={"fp32": 1e-5, "fp16": 8e-3, "bf16": 1.6e-2}[dtype], atol=1e-6)
    with pytest.raises(ValueError, match="shape and dtype"):
        add_rms_norm(x, delta.float() if dt != torch.float32 else delta.half(), weight, eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy exp(1e4)
def test_silu_mul_is_torchs(device, dtype):
    """SiLU(gate) x up from the two halves of one stacked GEMM output (strided views, read in place), over
    rows wider than one program's block: torch's `F.silu(gate) * up` (bitwise on a GPU: the gpu test; here
    numpy's exp against torch's CPU exp, so to a few ulps), zeros, huge, infinite and NaN gates included."""
    from fdllm.kernels.fused_ops import silu_mul

    skip_interpreted_bf16(device, dtype)
    g = torch.Generator().manual_seed(4)
    dt, N = DTYPES[dtype], 1500
    stacked = (torch.randn(2, 3, 2 * N, generator=g) * 4).to(device=device, dtype=dt)
    gate, up = stacked.split(N, dim=-1)
    gate[0, 0, :6] = torch.tensor([0.0, -0.0, 1e4, -1e4, float("inf"), float("nan")], dtype=dt)
    got, want = silu_mul(gate, up), torch.nn.functional.silu(gate) * up
    assert got.shape == want.shape and got.dtype == dt and got.is_contiguous()
    assert torch.equal(got.isnan(), want.isnan())
    ulp = {"fp32": 2**-23, "fp16": 2**-10, "bf16": 2**-7}[dtype]
    torch.testing.assert_close(got, want, rtol=4 * ulp, atol=0, equal_nan=True)  # two roundings of an ulp-off exp
    with pytest.raises(ValueError, match="shape and dtype"):
        silu_mul(gate, up[..., 1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_writes_what_index_copy_writes(device, dtype):
    """K and V of a step's tokens into their cache slots in one launch, from the strided views of the
    stacked q/k/v GEMM's output, exactly as the two `index_copy_`s it replaces; other slots untouched."""
    from fdllm.kernels.fused_ops import store_kv

    g = torch.Generator().manual_seed(3)
    T, N, K, H, slots = 5, 6, 2, 16, 40
    qkv = torch.randn(T, (N + 2 * K) * H, generator=g).to(device=device, dtype=DTYPES[dtype]).view(T, N + 2 * K, H)
    k, v = qkv[:, N : N + K], qkv[:, N + K :]
    slots_T = torch.tensor([7, 0, 39, 12, 13], device=device)
    k_cache, v_cache = (torch.randn(slots, K, H, generator=g).to(device=device, dtype=DTYPES[dtype]) for _ in range(2))
    want_k, want_v = k_cache.clone().index_copy_(0, slots_T, k), v_cache.clone().index_copy_(0, slots_T, v)
    store_kv(k_cache, v_cache, slots_T, k, v)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(ValueError, match="int64"):
        store_kv(k_cache, v_cache, slots_T.int(), k, v)
    with pytest.raises(ValueError, match="do not fit"):
        store_kv(k_cache[:, :1], v_cache[:, :1], slots_T, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,H", [(6, 2, 16), (7, 1, 10), (4, 4, 64)], ids=["gqa", "odd_group", "mha"])
def test_rope_store_kv_is_rope_then_store_kv(device, dtype, N, K, H):
    """RoPE of the stacked projection's q and k heads with the K/V cache write in one launch: bit for bit what
    the two kernels it replaces give (q rotated, k rotated into its slots, v copied), whatever the head counts;
    a repeated slot (padding's scratch) gets one of its writes, other slots untouched."""
    from fdllm.kernels.fused_ops import apply_rope_fused, rope_store_kv

    g = torch.Generator().manual_seed(N)
    T, slots, dt = 5, 40, DTYPES[dtype]
    qkv = torch.randn(T, N + 2 * K, H, generator=g).to(device=device, dtype=dt)
    positions = torch.tensor([[3, 4, 5, 4000, 7]], device=device)
    cos, sin = (c[0] for c in rope_cos_sin(positions, H, 1e6, dt))
    slots_T = torch.tensor([7, 0, 39, 12, 39], device=device)
    caches = [torch.randn(slots, K, H, generator=g).to(device=device, dtype=dt) for _ in range(2)]
    rotated = apply_rope_fused(qkv[None, :, : N + K], cos[None], sin[None])[0]
    wants = []
    for last in (2, 4):  # the repeated slot holds one of its two writes, in no promised order
        k_cache, v_cache = (c.clone() for c in caches)
        for i in [i for i in range(T) if i != last] + [last]:
            k_cache[slots_T[i]], v_cache[slots_T[i]] = rotated[i, N:], qkv[i, N + K :]
        wants.append((k_cache, v_cache))
    q = rope_store_kv(qkv, cos, sin, N, *caches, slots_T)
    assert torch.equal(q, rotated[:, :N])
    assert any(torch.equal(caches[0], k) and torch.equal(caches[1], v) for k, v in wants)
    with pytest.raises(ValueError, match="n_q"):
        rope_store_kv(qkv[:, :-1], cos, sin, N, *caches, slots_T)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_store_kv(qkv, cos.float() if dt != torch.float32 else cos.half(), sin, N, *caches, slots_T)
    with pytest.raises(ValueError, match="int64"):
        rope_store_kv(qkv, cos, sin, N, *caches, slots_T.int())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_matches_hf(device, dtype):
    from fdllm.kernels.fused_ops import apply_rope_fused

    skip_interpreted_bf16(device, dtype)  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest)
    g = torch.Generator().manual_seed(1)
    B, T, n, H = 2, 5, 3, 16
    positions = torch.tensor([[0, 1, 2, 3, 4], [9, 9, 10, 4000, 7]], device=device)  # repeated, far apart
    cos, sin = rope_cos_sin(positions, H, 1e6, DTYPES[dtype])
    x = torch.randn(B, T, n, H, generator=g).to(device=device, dtype=DTYPES[dtype])
    got = apply_rope_fused(x, cos, sin)
    want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)  # HF: [B, n, T, H]
    want = want.transpose(1, 2)
    assert torch.equal(got, want)  # each product and the sum rounded as eager torch rounds them


def test_rope_refuses_mixed_dtypes_and_odd_heads(device):
    from fdllm.kernels.fused_ops import apply_rope_fused

    cos, sin = rope_cos_sin(torch.arange(3, device=device)[None], 8, 1e4, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        apply_rope_fused(torch.zeros(1, 3, 2, 8, device=device, dtype=torch.bfloat16), cos, sin)
    with pytest.raises(ValueError, match="even"):
        apply_rope_fused(torch.zeros(1, 3, 2, 7, device=device), cos[..., :7], sin[..., :7])


@pytest.mark.gpu
def test_fused_ops_at_qwen2_shape_on_gpu(cuda_device):
    from fdllm.kernels.fused_ops import add_rms_norm, apply_rope_fused, rms_norm, silu_mul

    x = torch.randn(64, 1536, device=cuda_device, dtype=torch.bfloat16)
    weight = torch.rand(1536, device=cuda_device, dtype=torch.bfloat16) + 0.5
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), hf_rms_norm(x, weight, 1e-6), rtol=1.6e-2, atol=1e-6)
    delta = torch.randn_like(x)
    total, normed = add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, hf_rms_norm(total, weight, 1e-6), rtol=1.6e-2, atol=1e-6)
    cos, sin = rope_cos_sin(torch.arange(64, device=cuda_device)[None] * 37, 128, 1e6, torch.bfloat16)
    q = torch.randn(1, 64, 12, 128, device=cuda_device, dtype=torch.bfloat16)
    want, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
    assert torch.equal(apply_rope_fused(q, cos, sin), want.transpose(1, 2))
    gate, up = (torch.randn(512, 2 * 8960, device=cuda_device, dtype=torch.bfloat16) * 4).split(8960, dim=-1)
    got, want = silu_mul(gate, up), torch.nn.functional.silu(gate) * up
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} differ"


@pytest.mark.parametrize("arch,overrides", [("qwen2", {}), ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_fused_forward_matches_transformers_and_keeps_the_checkpoint(tmp_path, device, arch, overrides, monkeypatch):
    """The engine's Triton-backend forward (`hidden(fused=True)`: these kernels, and q/k/v and gate/up as
    one GEMM each after `fuse_projections`, q and k rotated in one launch): the logits are HF's, the
    weights take no more memory, and the model still saves to a checkpoint HF loads."""
    import transformers

    import fdllm
    from fdllm.kernels import fused_ops
    from tests.helpers import VOCAB, tiny_hf_model

    ropes = []
    rope = fused_ops.apply_rope_fused
    monkeypatch.setattr(fused_ops, "apply_rope_fused", lambda x, *a: ropes.append(x.shape[2]) or rope(x, *a))

    hf = tiny_hf_model(arch, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    ours = fdllm.load_model(tmp_path / "hf", device=device)
    hf = hf.to(device)
    names, nbytes = list(ours.state_dict()), sum(p.numel() * p.element_size() for p in ours.parameters())
    ours.fuse_projections()
    ours.fuse_projections()  # idempotent
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in ours.parameters()}
    assert list(ours.state_dict()) == names and sum(storages.values()) == nbytes
    layer = ours.model.layers[0]
    assert layer.self_attn.qkv.valid and layer.mlp.gate_up.valid
    calls = []
    layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append("q_proj"))
    layer.mlp.up_proj.register_forward_hook(lambda *a: calls.append("up_proj"))
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = hf(ids).logits
        fused = ours.lm_head(ours.hidden(ids, fused=True))
        assert calls == []  # the fused GEMMs ran, not the separate linears
        cfg = ours.config
        assert ropes == [cfg.num_attention_heads + cfg.n_kv_heads] * cfg.num_hidden_layers  # q and k: one launch a layer
        plain = ours(ids)
    assert (fused - ref).abs().max().item() < 1e-4 and (plain - ref).abs().max().item() < 1e-4
    ours.save_pretrained(tmp_path / "ours")  # views of one weight (safetensors writes each slice on its own)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    saved, original = back.state_dict(), hf.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[n], original[n].cpu()) for n in saved)
