"""Triton paged attention vs the torch reference `fdllm.kernels.reference.paged_attention_torch`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fdllm.kernels.reference import paged_attention_torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Case:
    q_BTNH: torch.Tensor
    k_pool_PSKH: torch.Tensor
    v_pool_PSKH: torch.Tensor
    block_tables_BM: torch.Tensor
    kv_lens_B: torch.Tensor
    q_lens_B: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.q_BTNH, self.k_pool_PSKH, self.v_pool_PSKH, self.block_tables_BM, self.kv_lens_B, self.q_lens_B)


def make_case(
    *, q_lens: list[int], kv_lens: list[int], T: int, K: int, G: int, H: int, S: int,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0,
) -> Case:
    """A ragged batch whose pages are scattered over a larger pool: shuffled page ids, spare pages
    between sequences, -1 past each sequence's last page (and one spare -1 column)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    pages = [-(-n // S) for n in kv_lens]
    M = max(pages) + 1
    P = 2 * sum(pages) + 3  # holes: half the pool belongs to nobody
    page_ids = torch.randperm(P, generator=gen)
    block_tables_BM = torch.full((B, M), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        block_tables_BM[b, :n] = page_ids[used:used + n].int()
        used += n
    q_BTNH = torch.randn(B, T, K * G, H, generator=gen)
    k_pool_PSKH = torch.randn(P, S, K, H, generator=gen)
    v_pool_PSKH = torch.randn(P, S, K, H, generator=gen)
    return Case(
        q_BTNH.to(device, dtype), k_pool_PSKH.to(device, dtype), v_pool_PSKH.to(device, dtype),
        block_tables_BM.to(device),
        torch.tensor(kv_lens, dtype=torch.int32, device=device),
        torch.tensor(q_lens, dtype=torch.int32, device=device),
    )


def reference(case: Case, causal: bool, scale: float | None = None) -> torch.Tensor:
    """The reference in fp32 on the same (possibly rounded) inputs."""
    args = [x.float() if x.is_floating_point() else x for x in case.args()]
    return paged_attention_torch(*args, causal=causal, scale=scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# A ragged batch: a full-block step, a sub-block step, a sequence whose kv_len ends exactly on a
# page boundary, and a padding-only sequence (q_len 0).
RAGGED_Q = [8, 3, 8, 0]


def ragged_kv(S: int) -> list[int]:
    return [2 * S + 5, S + 3, 3 * S, 9]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("S", [8, 16, 32])
def test_matches_reference_fp32(device, S, G, causal):
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=RAGGED_Q, kv_lens=ragged_kv(S), T=8, K=2, G=G, H=16, S=S, device=device, seed=S + G)
    out = paged_attention(*case.args(), causal=causal)
    assert out.shape == case.q_BTNH.shape and out.dtype == torch.float32
    assert_close(out, reference(case, causal), torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference_half(device, dtype, causal):
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=RAGGED_Q, kv_lens=ragged_kv(16), T=8, K=2, G=7, H=32, S=16, dtype=dtype, device=device)
    out = paged_attention(*case.args(), causal=causal)
    assert out.dtype == dtype
    assert_close(out, reference(case, causal), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_split_kv_matches_reference(device, causal):
    """Key range cut into 4 chunks merged by the second kernel; some chunks are empty for short sequences."""
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=[8, 3, 1, 0], kv_lens=[200, 70, 3, 130], T=8, K=2, G=7, H=16, S=8, device=device)
    out = paged_attention(*case.args(), causal=causal, num_splits=4)
    assert_close(out, reference(case, causal), torch.float32)


def one_by_one(case: Case, flags: list[int]) -> torch.Tensor:
    """The reference run on each sequence alone with its own bool flag: what per-sequence flags mean."""
    q, k, v, bt, kv, ql = case.args()
    return torch.cat([paged_attention_torch(q[i : i + 1], k, v, bt[i : i + 1], kv[i : i + 1], ql[i : i + 1],
                                            causal=bool(f)) for i, f in enumerate(flags)])


@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_per_sequence_causal_flags(device, num_splits, index_dtype):
    """`causal` as a tensor [B]: each sequence is causal or not on its own, in one call (a static
    decode step mixing speculative verifies and causal-prefix commits with bidirectional rows)."""
    from fdllm.kernels.paged_attention import paged_attention

    flags = [1, 0, 1, 0, 1]
    case = make_case(q_lens=[8, 8, 3, 0, 1], kv_lens=[200, 70, 11, 9, 40], T=8, K=2, G=3, H=16, S=8, device=device)
    causal = torch.tensor(flags, dtype=index_dtype, device=device)
    want = one_by_one(case, flags)
    assert not torch.allclose(want, one_by_one(case, [0] * 5)), "the flags must matter here"
    assert_close(paged_attention_torch(*case.args(), causal=causal), want, torch.float32)
    assert_close(paged_attention(*case.args(), causal=causal, num_splits=num_splits), want, torch.float32)
    with pytest.raises(ValueError, match="causal must be"):
        paged_attention(*case.args(), causal=causal[:3])
    with pytest.raises(TypeError, match="causal must be int32 or int64"):
        paged_attention(*case.args(), causal=causal.float())


@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_chunked_rows_attend_as_the_whole_row(device, causal, num_splits):
    """A static step cuts long attention rows into entries of Q queries (`fdllm.engine.runner.cut_rows`):
    the chunks, side by side in one call (with their per-entry flags), give each query the output
    the whole row gave it, for chunks of 4 of a 13-query row (the last one short) and of 8. A causal
    chunk's q_len runs to the row's end (more than the entry holds): on a GPU the Triton kernel's
    result is then bitwise the whole row's (same kv_len, same key splits); the interpreter's tl.dot
    rounds a row by its place in the tile, so there it is compared with a tolerance."""
    from fdllm.engine.runner import cut_rows
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=[13], kv_lens=[300], T=13, K=2, G=2, H=16, S=8, device=device)
    whole = paged_attention_torch(*case.args(), causal=causal)
    whole_kernel = paged_attention(*case.args(), causal=causal, num_splits=num_splits, min_keys_per_split=64)
    for q_len in (4, 8):
        rows, firsts, held, q_lens = (x.tolist() for x in cut_rows(np.array([13]), np.array([causal]), q_len))
        assert rows == [0] * len(firsts) and firsts == list(range(0, 13, q_len))
        assert held == [min(q_len, 13 - f) for f in firsts] and q_lens == [13 - f if causal else n for f, n in zip(firsts, held)]
        q = torch.zeros(len(firsts), q_len, *case.q_BTNH.shape[2:], device=device)
        for e, (first, n) in enumerate(zip(firsts, held)):
            q[e, :n] = case.q_BTNH[0, first : first + n]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        args = (q, case.k_pool_PSKH, case.v_pool_PSKH, case.block_tables_BM.expand(len(firsts), -1).contiguous(),
                as_tensor([300] * len(firsts)), as_tensor(q_lens))
        flags = as_tensor([causal] * len(firsts))
        rejoin = lambda out: torch.cat([out[e, :n] for e, n in enumerate(held)])  # noqa: E731
        assert_close(rejoin(paged_attention_torch(*args, causal=flags)), whole[0], torch.float32)
        kernel = rejoin(paged_attention(*args, causal=flags, num_splits=num_splits, min_keys_per_split=64))
        assert_close(kernel, whole[0], torch.float32)
        if device.type == "cuda":
            assert torch.equal(kernel, whole_kernel[0])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_single_query_decode_and_custom_scale(device, causal):
    """T = 1 (AR decode / threshold 1.0 with block size 1), 64-bit index tensors, an explicit scale."""
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=[1, 1, 1], kv_lens=[1, 17, 40], T=1, K=1, G=4, H=16, S=8, device=device)
    case.block_tables_BM, case.kv_lens_B, case.q_lens_B = (x.long() for x in case.args()[3:])
    out = paged_attention(*case.args(), causal=causal, scale=0.3)
    assert_close(out, reference(case, causal, scale=0.3), torch.float32)


def test_head_dim_not_power_of_two_and_strided_q(device):
    """H = 24 is padded to 32 inside the kernel; q sliced out of a packed qkv buffer (strided T and N)."""
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=[5, 8], kv_lens=[30, 12], T=8, K=2, G=3, H=24, S=8, device=device)
    B, T, N, H = case.q_BTNH.shape
    qkv = torch.randn(B, T, N + 4, H, device=device)  # q heads followed by k/v heads, as a fused projection gives
    qkv[:, :, :N] = case.q_BTNH
    case.q_BTNH = qkv[:, :, :N]
    assert not case.q_BTNH.is_contiguous()
    assert_close(paged_attention(*case.args()), reference(case, False), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_stale_slots_never_read_and_padding_rows_zero(device, causal, num_splits):
    """NaN in every slot a sequence doesn't own (holes, slots past kv_len, padding query rows) must not leak."""
    from fdllm.kernels.paged_attention import paged_attention

    S = 8
    case = make_case(q_lens=[6, 2, 0], kv_lens=[150, 6, 5], T=8, K=2, G=4, H=16, S=S, device=device)
    owned = torch.zeros(case.k_pool_PSKH.shape[:2], dtype=torch.bool, device=device)  # [P, S]
    for b in range(3):
        for j in range(int(case.kv_lens_B[b])):
            owned[case.block_tables_BM[b, j // S], j % S] = True
    ref = reference(case, causal)  # on the clean pool: the reference itself gathers (and masks) stale slots
    real_BT = torch.arange(8, device=device)[None] < case.q_lens_B[:, None]
    for pool in (case.k_pool_PSKH, case.v_pool_PSKH):
        pool[~owned] = float("nan")
    case.q_BTNH[~real_BT] = float("nan")
    out = paged_attention(*case.args(), causal=causal, num_splits=num_splits)
    assert torch.isfinite(out).all()
    assert (out[~real_BT] == 0).all()
    assert_close(out, ref, torch.float32)


def test_a_call_past_its_workspace_runs_in_slices_with_the_same_result(device, monkeypatch):
    """A call whose split-KV partials would exceed `max_workspace_bytes` runs in slices of sequences,
    or of queries when one sequence alone is too large (a 4k-token prefill chunk, a full static batch
    at 7B: gigabytes unsliced). The result is bitwise the unsliced call's, for causal rows (whose
    positions hang on q_len) beside bidirectional and empty ones, and the partials allocated stay
    within the bound and within what `split_workspace_bytes` tells the engine's KV sizing."""
    from fdllm.kernels import paged_attention as pa

    flags = [1, 0, 1]
    case = make_case(q_lens=[40, 30, 0], kv_lens=[160, 60, 9], T=40, K=2, G=2, H=16, S=8, device=device)
    causal = torch.tensor(flags, dtype=torch.int32, device=device)
    allocated = []
    empty = torch.empty

    def recording_empty(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        if out.dim() == 1 and out.dtype == torch.float32:  # the partials (outputs are [B, T, N, H])
            allocated.append(out.numel() * 4)
        return out

    def call(cap: int) -> tuple[torch.Tensor, int]:
        """The output, and the bytes of partials the call allocated."""
        allocated.clear()
        out = pa.paged_attention(*case.args(), causal=causal, min_keys_per_split=64, max_workspace_bytes=cap)
        return out, sum(allocated)

    monkeypatch.setattr(torch, "empty", recording_empty)
    whole, whole_bytes = call(1 << 30)
    assert_close(whole, one_by_one(case, flags), torch.float32)
    per_query = whole_bytes // (3 * 40)  # 3 splits of 16 + 2 fp32 per head and query token
    assert per_query == 4 * 4 * 3 * 18
    max_keys = case.block_tables_BM.shape[1] * 8
    for cap, slice_bytes in ((2 * 40 * per_query, 2 * 40 * per_query),  # two sequences per slice
                             (39 * per_query, 32 * per_query)):  # 32 queries (a whole BLOCK_M tile) per slice
        out, used = call(cap)
        assert torch.equal(out, whole) and used == slice_bytes, cap
        assert slice_bytes <= pa.split_workspace_bytes(4, 16, max_keys, 3 * 40, min_keys_per_split=64,
                                                       max_workspace_bytes=cap)
    bound = functools.partial(pa.split_workspace_bytes, 4, 16, max_keys, min_keys_per_split=64)
    assert bound(3 * 40) == 3 * 40 * per_query  # below the default bound: the call's own
    assert bound(10**6) == bound() == pa.WORKSPACE_BYTES  # any call
    assert pa._slice_shape(3, 40, per_query, 1) == (1, 32)  # below one tile's worth: still a whole tile per slice
    assert pa.split_workspace_bytes(4, 16, pa.MIN_KEYS_PER_SPLIT) == 0  # one split at most: no partials


def test_empty_batch(device):
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=[0, 0], kv_lens=[8, 8], T=0, K=1, G=1, H=16, S=8, device=device)
    assert paged_attention(*case.args()).shape == (2, 0, 1, 16)


def test_rejects_bad_inputs(device):
    from fdllm.kernels.paged_attention import paged_attention

    case = make_case(q_lens=[2], kv_lens=[9], T=2, K=2, G=2, H=16, S=8, device=device)
    q, k, v, bt, kv, ql = case.args()
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention(q[:, :, :3], k, v, bt, kv, ql)
    with pytest.raises(ValueError, match="head dim"):
        paged_attention(q[..., :8], k, v, bt, kv, ql)
    with pytest.raises(TypeError, match="share a dtype"):
        paged_attention(q.half(), k, v, bt, kv, ql)
    with pytest.raises(TypeError, match="int32 or int64"):
        paged_attention(q, k, v, bt.float(), kv, ql)
    with pytest.raises(ValueError, match="block_tables must be"):
        paged_attention(q, k, v, bt[0], kv, ql)
    with pytest.raises(ValueError, match="kv_lens must be"):
        paged_attention(q, k, v, bt, kv[None], ql)
    with pytest.raises(ValueError, match="contiguous in the head dim"):
        paged_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, bt, kv, ql)
    with pytest.raises(ValueError, match="same shape"):
        paged_attention(q, k, v[:-1], bt, kv, ql)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention(q, k, v, bt, kv, ql, num_splits=0)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1], ids=["auto-splits", "one-split"])
@pytest.mark.parametrize("causal", [False, True, "flags"], ids=["bidir", "causal", "per-sequence"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_qwen2_shape_on_gpu(cuda_device, dtype, causal, num_splits):
    """Qwen2-1.5B attention (N=12, K=2, H=128), 32-token pages, contexts up to ~2k, a ragged batch
    (6 sequences x 2 kv heads x 3 row tiles is too few programs for a GPU, so auto picks split-KV)."""
    from fdllm.kernels.paged_attention import paged_attention

    kv_lens = [2048, 1000, 37, 513, 32, 1500]
    q_lens = [32, 8, 32, 1, 0, 17]
    case = make_case(q_lens=q_lens, kv_lens=kv_lens, T=32, K=2, G=6, H=128, S=32, dtype=dtype, device=cuda_device)
    if causal == "flags":
        causal = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.int64, device=cuda_device)
    out = paged_attention(*case.args(), causal=causal, num_splits=num_splits)
    assert_close(out, reference(case, causal), dtype)
