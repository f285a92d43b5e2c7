"""Triton attention of a block of queries per sequence over the paged KV cache.

A drop-in for `fdllm.kernels.reference.paged_attention_torch` (same signature and semantics; that function
is the reference the tests compare against). One launch serves a ragged batch: every sequence has
its own kv_len (committed prefix + current block) and q_len (real queries; the rest are padding).

Tiling. One program owns (sequence b, kv head k, a tile of BLOCK_M query rows). Its rows are the
flattened (query token t, head-in-group g) pairs, row = t * G + g with G = N // K query heads per kv
head, so every row of the tile reads the same K/V stream and each K/V tile fetched from memory is
used by G query heads at once (the point of GQA). Flattening handles any G, including 7, without
padding the head group to a power of two: only the last tile of a sequence has idle rows.
The program walks the sequence's keys BLOCK_N at a time; key j lives in page
block_tables[b, j // S] at slot j % S, so a key tile may span several pages (S = 8 gives tl.dot a
tile of at least 16 keys) or part of one. Softmax is online (running max / sum in fp32, base-2
exponentials with log2(e) folded into the scale); the output is normalised once at the end.

Split-KV (flash-decoding). Few sequences x few kv heads x a few row tiles can be far fewer
programs than the GPU has SMs (batch 1 of Qwen2-1.5B: 2 kv heads x 3 tiles = 6), so the key range
can also be cut into chunks, one program each; those write unnormalised partial outputs with
their running max and sum (fp32), and a second small kernel merges them, a row's all at once.
With one split the first kernel writes the normalised output directly (bitwise what the merge of
one split gives).

Batch invariance. How a sequence's keys are chunked depends only on its own kv_len (MAX_SPLITS,
MIN_KEYS_PER_SPLIT), the query tile is a constant BLOCK_M, and the merge reduces a sequence's splits
in a tile of MAX_SPLITS whatever the call's split count: a request's attention output is bitwise the
same alone or in any batch, padded or not.
Launch parameters come from shapes only (no host sync), so CUDA graphs can capture the launch.

Masking. Keys j >= kv_len are never loaded, so -1 block-table entries and stale slots of the last
page are never dereferenced. With causal, query t of b sits at kv_len - q_len + t and sees keys up
to it; the key loop stops at the last position any row of the tile can see. Causality is a
compile-time mode: none, every sequence, or per sequence from a flag tensor (one launch, one
captured graph, for a batch mixing causal rows with bidirectional ones). Rows t >= q_len are
written as zeros (tiles made only of padding skip the key loop). q_len may exceed T: the entry
holds the first T queries of a longer causal row (a static decode step cuts long rows into
entries), whose positions and kv_len, hence key splits, stay those of the whole row.

Workspace. The partials take N x splits x (H + 2) fp32 per query token (about 100 KB at
Qwen2-1.5B's 12 heads and 16 splits): a full static decode batch of 8k query tokens would need
~0.8 GB per call, 2 GB at 7B. A call whose partials would exceed `max_workspace_bytes` runs in
slices of sequences (and of queries, when one sequence alone is larger), one launch pair each over
one set of reused buffers, so its memory is bounded whatever the batch (`split_workspace_bytes` says how
much, for the engine's KV sizing). Query slices are whole BLOCK_M tiles, and a slice's q_lens are
the queries left from its first one (a causal row's positions stay kv_len - q_len + t): every
program sees what it saw unsliced, so slicing changes no result bit.

Precision. Inputs fp16/bf16/fp32; scores, softmax and the output accumulator are fp32; P is cast
to the value dtype for the second matmul (as flash-attention does). fp32 inputs use IEEE fp32
dots (not TF32) so fp32 results match the reference to ~1e-5. Under the Triton interpreter,
bf16 tl.dot is wrong, so interpreted runs upcast tiles to fp32 before every tl.dot.

Shape legend: B sequences, T query tokens (padded), N query heads, K kv heads, G = N // K,
H head dim, P pages in the pool, S page size (tokens per page), M max pages per sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fdllm.kernels import interpreter_enabled

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, block_tables_ptr, kv_lens_ptr, q_lens_ptr, causal_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,  # split-KV partials, fp32: [B, T, N, splits, BLOCK_H], [B, T, N, splits] x2
    stride_qb, stride_qt, stride_qn,
    stride_kp, stride_ks, stride_kk,
    stride_vp, stride_vs, stride_vk,
    stride_ob, stride_ot, stride_on,
    stride_btb, stride_btm,
    stride_kvl, stride_ql, stride_c,
    T, N, H, qk_scale_log2, num_splits, keys_per_split, min_keys_per_split,
    G: tl.constexpr,  # query heads per kv head
    PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,  # 0: none, 1: every sequence, 2: sequence b iff causal_ptr[b] != 0
    BLOCK_M: tl.constexpr,  # flattened (t, g) query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_H: tl.constexpr,  # head dim padded to a power of two
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter: bf16 dots are wrong there)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs; ignored by 16-bit dots
    SPLIT: tl.constexpr,  # num_splits > 1: write partials instead of the output
):
    pid_m = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    kv_len = tl.load(kv_lens_ptr + b * stride_kvl).to(tl.int32)
    q_len = tl.load(q_lens_ptr + b * stride_ql).to(tl.int32)
    kps = _keys_per_split(kv_len, keys_per_split, min_keys_per_split, num_splits, BLOCK_N)
    if split * kps >= tl.maximum(kv_len, 1):  # past this sequence's own splits: the merge never reads it
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    t = rows // G
    head = kv_head * G + rows % G  # query head of each row
    real_row = (t < q_len) & (t < T)  # padded query rows come back as zeros
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H

    q_ptrs = q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qn + offs_h[None, :]
    q = tl.load(q_ptrs, mask=real_row[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_H]
    if UPCAST:
        q = q.to(tl.float32)

    q_pos = kv_len - q_len + t  # absolute position of each query row (used by causal)
    # Keys this tile needs: all kv_len, or up to the last real row's position under causal;
    # none for a tile made only of padding rows.
    first_t = (pid_m * BLOCK_M) // G
    last_t = tl.minimum(tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, q_len - 1), T - 1)
    kv_end = kv_len
    if CAUSAL == 1:
        kv_end = tl.minimum(kv_len, kv_len - q_len + last_t + 1)
    if CAUSAL == 2:
        causal_flag = tl.load(causal_ptr + b * stride_c)
        kv_end = tl.where(causal_flag != 0, tl.minimum(kv_len, kv_len - q_len + last_t + 1), kv_len)
    kv_end = tl.where(first_t < q_len, kv_end, 0)
    kv_begin = split * kps  # this program's chunk of the key range
    kv_end = tl.minimum(kv_end, kv_begin + kps)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = block_tables_ptr + b * stride_btb
    for start in range(kv_begin, kv_end, BLOCK_N):
        keys = start + offs_n  # [BLOCK_N] key positions in the sequence
        key_ok = keys < kv_end
        page = tl.load(bt_row + (keys // PAGE_SIZE) * stride_btm, mask=key_ok, other=0).to(tl.int64)
        slot = keys % PAGE_SIZE
        k_ptrs = k_ptr + page[None, :] * stride_kp + slot[None, :] * stride_ks + kv_head * stride_kk + offs_h[:, None]
        k = tl.load(k_ptrs, mask=key_ok[None, :] & h_ok[:, None], other=0.0)  # [BLOCK_H, BLOCK_N]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
        visible = key_ok[None, :]
        if CAUSAL == 1:
            visible = visible & (keys[None, :] <= q_pos[:, None])
        if CAUSAL == 2:
            visible = visible & ((keys[None, :] <= q_pos[:, None]) | (causal_flag == 0))
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_ptrs = v_ptr + page[:, None] * stride_vp + slot[:, None] * stride_vs + kv_head * stride_vk + offs_h[None, :]
        v = tl.load(v_ptrs, mask=key_ok[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    row_ok = t < T
    if SPLIT:
        # partial rows of padding queries are zero with l = 0, so the merge returns zeros for them
        part = ((b * T + t).to(tl.int64) * N + head) * num_splits + split  # [BLOCK_M] index into [B, T, N, splits]
        acc = tl.where(real_row[:, None], acc, 0.0)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_H + offs_h[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, tl.where(real_row, l_i, 0.0), mask=row_ok)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = tl.where(real_row[:, None], acc / l_safe[:, None], 0.0)
        o_ptrs = o_ptr + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_on + offs_h[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _keys_per_split(kv_len, keys_per_split, min_keys_per_split, max_splits, BLOCK_N: tl.constexpr):
    """Keys per split of one sequence: the caller's fixed chunk, or (keys_per_split == 0) a chunk
    chosen from this sequence's own kv_len, never from the batch: at most max_splits chunks of at
    least min_keys_per_split keys, in whole key tiles. So a sequence's partials, and the order the
    merge adds them in, are the same whatever else is in the launch (batch invariance)."""
    if keys_per_split > 0:
        return keys_per_split
    per = tl.cdiv(tl.cdiv(kv_len, max_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(per, min_keys_per_split)


@triton.jit
def _merge_splits_kernel(
    o_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, kv_lens_ptr,
    stride_ob, stride_ot, stride_on, stride_kvl,
    T, N, H, num_splits, keys_per_split, min_keys_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)  # flattened (b, t, n)
    n = row % N
    t = (row // N) % T
    b = row // (N * T)
    kv_len = tl.load(kv_lens_ptr + b * stride_kvl).to(tl.int32)
    kps = _keys_per_split(kv_len, keys_per_split, min_keys_per_split, num_splits, BLOCK_N)
    own_splits = tl.maximum(tl.cdiv(kv_len, kps), 1)
    offs_h = tl.arange(0, BLOCK_H)
    # all of the row's partials at once, in a tile of MAX_SPLITS whatever the call's split count: the
    # reduction's shape, so the sum, is the same for any batch (splits past the row's own add zeros)
    offs_s = tl.arange(0, MAX_SPLITS_TILE)
    own = offs_s < own_splits
    part = row.to(tl.int64) * num_splits + offs_s
    m_s = tl.load(part_m_ptr + part, mask=own, other=float("-inf"))
    l_s = tl.load(part_l_ptr + part, mask=own, other=0.0)
    acc_s = tl.load(part_acc_ptr + part[:, None] * BLOCK_H + offs_h[None, :], mask=own[:, None], other=0.0)
    m_max = tl.max(m_s, axis=0)
    w = tl.exp2(m_s - tl.where(m_max == float("-inf"), 0.0, m_max))  # padding rows: nothing seen, w = 0
    l_run = tl.sum(l_s * w, axis=0)
    acc = tl.sum(acc_s * w[:, None], axis=0)
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)  # padding rows: 0 / 1
    tl.store(o_ptr + b * stride_ob + t * stride_ot + n * stride_on + offs_h, out.to(o_ptr.dtype.element_ty),
             mask=offs_h < H)


MAX_SPLITS = 16  # key-range chunks per sequence at most
MAX_SPLITS_TILE = tl.constexpr(MAX_SPLITS)  # the merge's tile (a global must be a tl.constexpr to compile)
# a chunk is worth a program only above this many keys. 128 on the H200 (bench_kernels --tune, Qwen2-1.5B
# heads, 8 queries a sequence): 256 keys at batch 1 take 9.2 us vs 256's 11.4, 1024 keys 10.0 vs 14.1; 64
# was faster still at batch 1 (7.2, 8.5) but slower from batch 8 up at 1024 keys (16.1 vs 12.9 at batch 8)
MIN_KEYS_PER_SPLIT = 128
BLOCK_M = 32  # flattened query rows per program: a constant, so a row's tile never depends on the batch
WORKSPACE_BYTES = 256 << 20  # split-KV partials one call holds at most (larger calls run in slices)


def _check_inputs(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, kv_lens: Tensor, q_lens: Tensor,
    causal: bool | Tensor,
) -> None:
    if q.dim() != 4 or k_pool.dim() != 4:
        raise ValueError(
            f"expected q [B, T, N, H] and k_pool [P, S, K, H], got {tuple(q.shape)} and {tuple(k_pool.shape)}"
        )
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} must have the same shape")
    B, _, N, H = q.shape
    K, Hk = k_pool.shape[2:]
    if Hk != H:
        raise ValueError(f"head dim of q ({H}) and of the KV pool ({Hk}) differ")
    if K == 0 or N % K != 0:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be one of {_DTYPES}, got {q.dtype}")
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise TypeError(f"q, k_pool and v_pool must share a dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, M], got {tuple(block_tables.shape)}")
    flags = {"causal": causal} if isinstance(causal, Tensor) else {}
    for name, lens in {"kv_lens": kv_lens, "q_lens": q_lens, **flags}.items():
        if lens.shape != (B,):
            raise ValueError(f"{name} must be [B={B}], got {tuple(lens.shape)}")
    for name, x in {"block_tables": block_tables, "kv_lens": kv_lens, "q_lens": q_lens, **flags}.items():
        if x.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    for name, x in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the head dim (stride(-1) == 1), got strides {x.stride()}")
    devices = {x.device for x in (q, k_pool, v_pool, block_tables, kv_lens, q_lens, *flags.values())}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"the Triton paged-attention kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}"
        )


class _SplitPlan(NamedTuple):
    """How a call cuts its sequences' key ranges (from shapes only: graph-capturable)."""

    block_h: int
    block_n: int
    num_splits: int  # chunks per sequence at most: the partials' and the grid's split dimension
    keys_per_split: int  # 0: each sequence chooses from its own kv_len (batch-invariant)
    min_keys: int

    def bytes_per_query(self, num_heads: int) -> int:
        """fp32 partials of one query token: an accumulator row and a running max and sum per head and split."""
        return 0 if self.num_splits == 1 else 4 * num_heads * self.num_splits * (self.block_h + 2)


def _split_plan(head_dim: int, max_keys: int, num_splits: int | None, min_keys_per_split: int,
                block_n: int | None = None) -> _SplitPlan:
    block_h = max(16, triton.next_power_of_2(head_dim))
    if block_n is None:
        block_n = 64 if block_h <= 64 else 32  # keeps the K/V tiles within registers for H = 128
    if num_splits is None:  # per-sequence chunks (computed in the kernel); the grid covers the longest
        min_keys = max(block_n, triton.cdiv(min_keys_per_split, block_n) * block_n)
        return _SplitPlan(block_h, block_n, max(1, min(MAX_SPLITS, triton.cdiv(max_keys, min_keys))), 0, min_keys)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    keys_per_split = max(block_n, triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n)
    return _SplitPlan(block_h, block_n, max(1, triton.cdiv(max_keys, keys_per_split)), keys_per_split, keys_per_split)


def _slice_shape(B: int, T: int, per_query: int, max_bytes: int) -> tuple[int, int]:
    """(sequences, queries) per slice so that a slice's partials fit `max_bytes`; queries are cut only
    when one sequence alone exceeds it, in whole BLOCK_M tiles (at least one: the bound is soft)."""
    if B * T * per_query <= max_bytes:
        return B, T
    if T * per_query > max_bytes:
        return 1, min(T, max(BLOCK_M, max_bytes // per_query // BLOCK_M * BLOCK_M))
    return max(1, max_bytes // (T * per_query)), T


def split_workspace_bytes(num_heads: int, head_dim: int, max_keys: int, num_tokens: int | None = None, *,
                          min_keys_per_split: int = MIN_KEYS_PER_SPLIT, max_workspace_bytes: int = WORKSPACE_BYTES) -> int:
    """The most split-KV partials (bytes) a `paged_attention` call over block tables of `max_keys` keys
    allocates with per-sequence splits (the default), for `num_tokens` query tokens (B x T) or, with
    None, for any call: what the engine's KV sizing leaves room for."""
    per_query = _split_plan(head_dim, max_keys, None, min_keys_per_split).bytes_per_query(num_heads)
    bound = max(max_workspace_bytes, BLOCK_M * per_query) if per_query else 0
    return bound if num_tokens is None else min(num_tokens * per_query, bound)


def paged_attention(
    q_BTNH: Tensor,
    k_pool_PSKH: Tensor,
    v_pool_PSKH: Tensor,
    block_tables_BM: Tensor,
    kv_lens_B: Tensor,
    q_lens_B: Tensor,
    causal: bool | Tensor = False,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    min_keys_per_split: int = MIN_KEYS_PER_SPLIT,
    max_workspace_bytes: int = WORKSPACE_BYTES,
    block_n: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """Output [B, T, N, H] in q's dtype; rows t >= q_lens[b] are zeros. Same contract as paged_attention_torch.

    q [B, T, N, H], k_pool/v_pool [P, S, K, H] (fp16/bf16/fp32, one dtype, head dim contiguous,
    N a multiple of K; query head n reads kv head n // (N // K)); block_tables [B, M] int32/int64,
    entries past a sequence's last page are ignored (may be -1); kv_lens [B] tokens visible to b's
    queries; q_lens [B] real queries of b (q_lens <= kv_lens when causal; q_lens > T: b holds the
    first T queries of a longer causal row, at positions kv_len - q_len + t);
    causal: a bool for every sequence, or per sequence an int32/int64 tensor [B] (nonzero: causal).
    Values of kv_lens/q_lens/block_tables are not checked (that would sync with the device).
    num_splits: None (default) cuts each sequence's key range by its own kv_len (at most MAX_SPLITS
    chunks of at least `min_keys_per_split` keys): the result for a sequence is bitwise the same
    whatever else is in the batch and whatever the table width. An int fixes the chunk size from
    the table width M * S instead (for tests and benchmarks; batch-dependent).
    max_workspace_bytes: the split-KV partials' bound; larger calls run in slices (same results).
    block_n (keys per step of a program's loop; None: 64, or 32 for head dims over 64) and num_warps: tuning
    values for benchmarks (`bench_kernels --tune`); any fixed values keep a sequence's result batch-invariant.
    """
    _check_inputs(q_BTNH, k_pool_PSKH, v_pool_PSKH, block_tables_BM, kv_lens_B, q_lens_B, causal)
    B, T, N, H = q_BTNH.shape
    o_BTNH = torch.empty((B, T, N, H), dtype=q_BTNH.dtype, device=q_BTNH.device)
    if o_BTNH.numel() == 0:
        return o_BTNH
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    plan = _split_plan(H, block_tables_BM.shape[1] * k_pool_PSKH.shape[1], num_splits, min_keys_per_split, block_n)
    per_query = plan.bytes_per_query(N)
    parts = None
    if plan.num_splits > 1:
        bs, tq = _slice_shape(B, T, per_query, max_workspace_bytes)
        n = bs * tq * N * plan.num_splits  # per head, split and query token of a slice: each on its own (aligned) base
        parts = tuple(torch.empty(n * width, dtype=torch.float32, device=q_BTNH.device) for width in (plan.block_h, 1, 1))
    else:
        bs, tq = B, T
    for b0 in range(0, B, bs):
        b1 = min(b0 + bs, B)
        for t0 in range(0, T, tq):
            q_lens = q_lens_B[b0:b1] if t0 == 0 else (q_lens_B[b0:b1] - t0).clamp_(min=0)  # the queries left
            causal_b = causal[b0:b1] if isinstance(causal, Tensor) else causal
            _launch(plan, parts, scale, q_BTNH[b0:b1, t0 : t0 + tq], k_pool_PSKH, v_pool_PSKH, o_BTNH[b0:b1, t0 : t0 + tq],
                    block_tables_BM[b0:b1], kv_lens_B[b0:b1], q_lens, causal_b, num_warps)
    return o_BTNH


def _launch(plan: _SplitPlan, parts: tuple[Tensor, ...] | None, scale: float, q_BTNH: Tensor, k_pool_PSKH: Tensor,
            v_pool_PSKH: Tensor, o_BTNH: Tensor, block_tables_BM: Tensor, kv_lens_B: Tensor, q_lens_B: Tensor,
            causal: bool | Tensor, num_warps: int) -> None:
    """One slice of a call: the attention kernel, then (with splits) the merge, into `o_BTNH` (a view)."""
    flags = isinstance(causal, Tensor)
    B, T, N, H = q_BTNH.shape
    S, K = k_pool_PSKH.shape[1], k_pool_PSKH.shape[2]
    G = N // K
    split = plan.num_splits > 1
    if split:  # views of the call's reused buffers, laid out [B, T, N, splits] (x BLOCK_H for the accumulator)
        n = B * T * N * plan.num_splits
        part_acc, part_m, part_l = parts[0][: n * plan.block_h], parts[1][:n], parts[2][:n]
    else:
        part_acc = part_m = part_l = o_BTNH  # unused
    _paged_attention_kernel[(triton.cdiv(T * G, BLOCK_M) * plan.num_splits, B, K)](
        q_BTNH, k_pool_PSKH, v_pool_PSKH, o_BTNH, block_tables_BM, kv_lens_B, q_lens_B,
        causal if flags else kv_lens_B,  # the flags (unread without them)
        part_acc, part_m, part_l,
        q_BTNH.stride(0), q_BTNH.stride(1), q_BTNH.stride(2),
        k_pool_PSKH.stride(0), k_pool_PSKH.stride(1), k_pool_PSKH.stride(2),
        v_pool_PSKH.stride(0), v_pool_PSKH.stride(1), v_pool_PSKH.stride(2),
        o_BTNH.stride(0), o_BTNH.stride(1), o_BTNH.stride(2),
        block_tables_BM.stride(0), block_tables_BM.stride(1),
        kv_lens_B.stride(0), q_lens_B.stride(0), causal.stride(0) if flags else 0,
        T, N, H, scale * _LOG2E, plan.num_splits, plan.keys_per_split, plan.min_keys,
        G=G, PAGE_SIZE=S, CAUSAL=2 if flags else int(bool(causal)),
        BLOCK_M=BLOCK_M, BLOCK_N=plan.block_n, BLOCK_H=plan.block_h,
        UPCAST=interpreter_enabled(),
        DOT_PRECISION="ieee" if q_BTNH.dtype == torch.float32 else "tf32",
        SPLIT=split,
        num_warps=num_warps,
    )
    if split:
        _merge_splits_kernel[(B * T * N,)](
            o_BTNH, part_acc, part_m, part_l, kv_lens_B,
            o_BTNH.stride(0), o_BTNH.stride(1), o_BTNH.stride(2), kv_lens_B.stride(0),
            T, N, H, plan.num_splits, plan.keys_per_split, plan.min_keys,
            BLOCK_N=plan.block_n, BLOCK_H=plan.block_h,
            num_warps=2,
        )
