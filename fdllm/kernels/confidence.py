"""Fused confidence: argmax token and its softmax probability over the vocab, straight from hidden states.

Greedy threshold decoding (METHOD.md §3.2) needs, per masked position, only the top-1 token and
its probability under softmax over the full vocabulary with the mask token's logit at -inf. The
unfused path builds logits [T, V] in fp32, then a softmax [T, V], then reduces them; for a 150k
vocabulary that is tens of MB of traffic per step on top of reading the LM head. Here the logits
exist only as [BLOCK_T, BLOCK_V] tiles in registers.

Tiling. The vocab is cut into SPLITS contiguous chunks (split-K style, so a handful of query rows
still fills the GPU); program (i, j) computes logit tiles h[rows_i] @ W[chunk_j]^T over the hidden
dim and keeps, per row, a running max, its first argmax and a running sum of exp(logit - max)
(online log-sum-exp). Partials [T, SPLITS] are merged in torch (tiny): the global max, the argmax
of the first chunk attaining it (so ties resolve to the lowest token id, as torch.argmax does),
and prob = exp(max - lse) = 1 / sum_j sum_j' exp(max_j - max).

Precision: logits accumulate in fp32 (IEEE dots for fp32 inputs); under the Triton interpreter
tiles are upcast to fp32 before tl.dot (its bf16 dot is wrong).

Shape legend: T positions to decode, D model dim, V vocab, S vocab splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fdllm.decoding import greedy_confidence
from fdllm.kernels import interpreter_enabled

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E: tl.constexpr = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)


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
        tile_arg = tl.min(tl.where(logits == tile_max[:, None], offs_v[None, :], 2147483647), axis=1)
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


def _num_splits(V: int, block_v: int, t_tiles: int, device: torch.device) -> int:
    """Vocab chunks per row tile: enough programs to fill the GPU a few times over."""
    v_tiles = triton.cdiv(V, block_v)
    if device.type != "cuda":  # the interpreter runs programs one after another
        return min(v_tiles, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, triton.cdiv(4 * sms, t_tiles)))


def fused_confidence(hidden_TD: Tensor, weight_VD: Tensor, mask_token_id: int | None) -> tuple[Tensor, Tensor]:
    """(token [T] int64, prob [T] float32): argmax of h @ W^T and its softmax probability over the vocab.

    hidden [T, D] and weight [V, D] (the LM head, no bias) share a dtype in fp16/bf16/fp32 and are
    contiguous along D. The logit of `mask_token_id` is -inf (None: no token excluded). Ties go to
    the lowest token id. Never materialises [T, V].
    """
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

    block_t = min(64, max(16, triton.next_power_of_2(T)))
    block_v = 64
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    t_tiles = triton.cdiv(T, block_t)
    splits = _num_splits(V, block_v, t_tiles, device)
    v_per_split = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    splits = triton.cdiv(V, v_per_split)
    max_TS = torch.empty((T, splits), dtype=torch.float32, device=device)
    arg_TS = torch.empty((T, splits), dtype=torch.int32, device=device)
    sum_TS = torch.empty((T, splits), dtype=torch.float32, device=device)
    _confidence_partials_kernel[(t_tiles, splits)](
        hidden_TD, weight_VD, max_TS, arg_TS, sum_TS,
        T, V, D, -1 if mask_token_id is None else int(mask_token_id), v_per_split,
        hidden_TD.stride(0), weight_VD.stride(0), max_TS.stride(0),
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d,
        UPCAST=interpreter_enabled(),
        DOT_PRECISION="ieee" if hidden_TD.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    max_T, best_split_T = max_TS.max(dim=1)  # first split attaining the max: lowest token id on ties
    token_T = arg_TS.gather(1, best_split_T[:, None]).squeeze(1).long()
    # prob = exp(max - lse) = 1 / sum over splits j of sum_j * exp(max_j - max); all -inf splits add 0
    prob_T = 1.0 / (sum_TS * torch.exp(max_TS - max_T[:, None])).sum(dim=1)
    return token_T, prob_T


def fused_confidence_ref(hidden_TD: Tensor, weight_VD: Tensor, mask_token_id: int | None) -> tuple[Tensor, Tensor]:
    """Plain torch reference of `fused_confidence`: the engine's own greedy confidence of fp32 logits."""
    return greedy_confidence(hidden_TD.float() @ weight_VD.float().T, mask_token_id)
