"""Fused confidence: argmax token and its softmax probability over the vocab, straight from hidden states.

Greedy threshold decoding (docs/method.md §3.2) needs, per masked position, only the top-1 token and
its probability under softmax over the full vocabulary with the mask token's logit at -inf. The
unfused path builds logits [T, V] in fp32, then a softmax [T, V], then reduces them; for a 150k
vocabulary that is tens of MB of traffic per step on top of reading the LM head. Here the logits
exist only as [BLOCK_T, BLOCK_V] tiles in registers.

Tiling. The vocab is cut into contiguous chunks of V_PER_SPLIT (split-K style, so a handful of
query rows still fills the GPU); program (i, j) computes logit tiles h[rows_i] @ W[chunk_j]^T over the hidden
dim and keeps, per row, a running max, its first argmax and a running sum of exp(logit - max)
(online log-sum-exp). A second tiny kernel merges a row's partials [SPLITS], all loaded at once: the
global max, the lowest token id of the chunks attaining it (so ties resolve to the lowest token id, as
torch.argmax does), and prob = exp(max - lse) = 1 / sum_j s_j exp(max_j - max).

Batch invariance: the row tile (BLOCK_T) and the vocab chunks (V_PER_SPLIT) are constants and the
merge's reduction depends on the vocabulary alone, so a row's token and probability are bitwise the
same for any T.

Precision: logits accumulate in fp32 (IEEE dots for fp32 inputs); under the Triton interpreter
tiles are upcast to fp32 before tl.dot (its bf16 dot is wrong).

Shape legend: T positions to decode, D model dim, V vocab, S vocab splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fdllm.kernels import interpreter_enabled
from fdllm.kernels.reference import greedy_confidence

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E); a global must be a tl.constexpr value to compile
NO_TOKEN = tl.constexpr(2147483647)  # int32's max: above every token id, so a min over ids ignores it


@triton.jit
def _confidence_partials_kernel(
    h_ptr, w_ptr, max_ptr, arg_ptr, sum_ptr,
    T, V, D, mask_token_id, v_per_split,
    stride_ht, stride_wv, stride_pt,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    v_begin = split * v_per_split
    v_end = tl.minimum(V, v_begin + v_per_split)

    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)  # running max logit
    arg_i = tl.zeros([BLOCK_T], dtype=tl.int32)  # token id of the running max
    s_i = tl.zeros([BLOCK_T], dtype=tl.float32)  # running sum of exp(logit - m_i)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        logits = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = d0 + offs_d < D
            h = tl.load(h_ptr + offs_t[:, None] * stride_ht + (d0 + offs_d)[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            w = tl.load(w_ptr + offs_v[None, :] * stride_wv + (d0 + offs_d)[:, None],
                        mask=v_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_V]
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            logits = tl.dot(h, w, acc=logits, input_precision=DOT_PRECISION)
        # the mask token is never a prediction; slots past the chunk are not tokens
        logits = tl.where(v_ok[None, :] & (offs_v != mask_token_id)[None, :], logits, float("-inf"))

        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.min(tl.where(logits == tile_max[:, None], offs_v[None, :], NO_TOKEN), axis=1)
        arg_i = tl.where(tile_max > m_i, tile_arg, arg_i)  # strict: an earlier tile wins ties
        m_new = tl.maximum(m_i, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing but -inf seen so far
        s_i = s_i * tl.exp2((m_i - m_safe) * LOG2E) + tl.sum(
            tl.exp2((logits - m_safe[:, None]) * LOG2E), axis=1
        )
        m_i = m_new

    out = offs_t * stride_pt + split
    tl.store(max_ptr + out, m_i, mask=t_ok)
    tl.store(arg_ptr + out, arg_i, mask=t_ok)
    tl.store(sum_ptr + out, s_i, mask=t_ok)


@triton.jit
def _confidence_merge_kernel(
    max_ptr, arg_ptr, sum_ptr, token_ptr, prob_ptr, splits, stride_pt, BLOCK_S: tl.constexpr,
):
    """Per row: merge the vocab chunks' partials, all loaded at once (a loop over them waited on one
    dependent load per chunk: ~150 at a 152k vocabulary). The reduction's shape depends on the
    vocabulary alone, so a row's result does on no other row (batch-invariant)."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    ok = offs < splits
    base = t * stride_pt
    m = tl.load(max_ptr + base + offs, mask=ok, other=float("-inf"))
    s = tl.load(sum_ptr + base + offs, mask=ok, other=0.0)
    a = tl.load(arg_ptr + base + offs, mask=ok, other=NO_TOKEN)
    m_max = tl.max(m, axis=0)
    arg = tl.min(tl.where(m == m_max, a, NO_TOKEN), axis=0)  # of the chunks at the max, the lowest token id
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.sum(s * tl.exp2((m - m_safe) * LOG2E), axis=0)  # an empty chunk: s = 0 and exp2(-inf) = 0
    tl.store(token_ptr + t, arg.to(tl.int64))
    tl.store(prob_ptr + t, 1.0 / total)  # exp(max - lse) = 1 / sum exp(logit - max)


# rows per program: a constant, so a row's tiles never depend on how many rows there are. Each tile of rows
# reads the whole LM head. 64 on the H200 (bench_kernels --tune, 152k x 1536, with V_PER_SPLIT 256): 0.37 ms
# at 256 rows (16: 0.92), 0.15 at 64 (16: 0.25), but 0.146 at 8 rows, a batch-1 step's (16: 0.113): 0.03 ms
# lost at batch 1 for 0.1-0.55 ms gained from batch 8 up
BLOCK_T = 64
# vocab entries per program: from the vocab alone, never from the batch. 256 on the H200 (bench_kernels
# --tune, 152k x 1536 bf16 LM head): 0.113 ms at 8 rows vs 1024's 0.197 (594 programs spread the read
# over the SMs: 86% of HBM peak), no slower at 64 or 256 rows
V_PER_SPLIT = 256
BLOCK_V = 64  # vocab entries per logit tile: a program's chunk is whole tiles


def fused_confidence(hidden_TD: Tensor, weight_VD: Tensor, mask_token_id: int | None, *,
                     block_t: int = BLOCK_T, v_per_split: int = V_PER_SPLIT) -> tuple[Tensor, Tensor]:
    """(token [T] int64, prob [T] float32): argmax of h @ W^T and its softmax probability over the vocab.

    hidden [T, D] and weight [V, D] (the LM head, no bias) share a dtype in fp16/bf16/fp32 and are
    contiguous along D. The logit of `mask_token_id` is -inf (None: no token excluded). Ties go to
    the lowest token id. Never materialises [T, V]. For tuning (batch invariance holds for any values
    kept fixed): `block_t`, rows per program (a power of two >= 16; each tile of rows reads the whole
    LM head once), and `v_per_split`, vocab entries per program (a multiple of 64; fewer: more programs
    to spread the LM head's read over the GPU, more partials to merge).
    """
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
    if v_per_split < BLOCK_V or v_per_split % BLOCK_V:
        raise ValueError(f"v_per_split must be a positive multiple of {BLOCK_V}, got {v_per_split}")
    h, w = hidden_TD, weight_VD
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"expected hidden [T, D] and weight [V, D], got {tuple(h.shape)} and {tuple(w.shape)}")
    if h.dtype not in _DTYPES or w.dtype != h.dtype:
        raise TypeError(f"hidden and weight must share a dtype in {_DTYPES}, got {h.dtype} and {w.dtype}")
    if h.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"hidden and weight must be contiguous along D, got strides {h.stride()} and {w.stride()}")
    if h.device != w.device:
        raise ValueError(f"hidden on {h.device} but weight on {w.device}")
    if h.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"the Triton confidence kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {h.device}")
    T, D = hidden_TD.shape
    V = weight_VD.shape[0]
    if V == 0 or (V == 1 and mask_token_id == 0):
        raise ValueError("the vocabulary has no token other than the mask token")
    device = hidden_TD.device
    if T == 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)

    block_d = min(64, max(16, triton.next_power_of_2(D)))
    t_tiles = triton.cdiv(T, block_t)
    splits = triton.cdiv(V, v_per_split)
    max_TS = torch.empty((T, splits), dtype=torch.float32, device=device)
    arg_TS = torch.empty((T, splits), dtype=torch.int32, device=device)
    sum_TS = torch.empty((T, splits), dtype=torch.float32, device=device)
    _confidence_partials_kernel[(t_tiles, splits)](
        hidden_TD, weight_VD, max_TS, arg_TS, sum_TS,
        T, V, D, -1 if mask_token_id is None else int(mask_token_id), v_per_split,
        hidden_TD.stride(0), weight_VD.stride(0), max_TS.stride(0),
        BLOCK_T=block_t, BLOCK_V=BLOCK_V, BLOCK_D=block_d,
        UPCAST=interpreter_enabled(),
        DOT_PRECISION="ieee" if hidden_TD.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    token_T = torch.empty(T, dtype=torch.int64, device=device)
    prob_T = torch.empty(T, dtype=torch.float32, device=device)
    block_s = triton.next_power_of_2(splits)
    _confidence_merge_kernel[(T,)](max_TS, arg_TS, sum_TS, token_T, prob_T, splits, max_TS.stride(0),
                                   BLOCK_S=block_s, num_warps=max(1, min(8, block_s // 256)))
    return token_T, prob_T


def fused_confidence_ref(hidden_TD: Tensor, weight_VD: Tensor, mask_token_id: int | None) -> tuple[Tensor, Tensor]:
    """Plain torch reference of `fused_confidence`: the engine's own greedy confidence of fp32 logits."""
    return greedy_confidence(hidden_TD.float() @ weight_VD.float().T, mask_token_id)
