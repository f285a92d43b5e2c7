"""Plain torch references: paged attention (the "torch" backend) and greedy confidence.

Attention of a query block over a paged KV cache.

The KV pool holds pages of `page_size` tokens (one page = one diffusion block) for one layer;
a sequence's tokens live in the pages listed by its block table, in order. The current
(uncommitted) block occupies the sequence's last page, so "committed prefix + current block" is
simply the first `kv_lens[b]` tokens of its pages. Every query sees all of them (bidirectional
inside the block, which is all block diffusion needs); `causal=True` is for AR prefill, where query
t of sequence b sits at position kv_lens[b] - q_lens[b] + t and sees keys up to it. `causal` may
also be a per-sequence flag tensor [B] (nonzero: causal), so one call (one captured CUDA graph)
serves a batch mixing causal rows (a speculative verify, a causal-prefix commit) with the others.
q_lens[b] may exceed T: sequence b then holds the first T queries of a longer causal row (a static
decode step cuts long rows into entries of T; each keeps the whole row's kv_len and positions).

This is the semantic contract every backend (Triton, flash-attn) is tested against.

Shape legend: B sequences, T query tokens (padded to the longest), N query heads, K kv heads,
H head dim, P pages in the pool, S page size, M max pages per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def paged_attention_torch(
    q_BTNH: Tensor,
    k_pool_PSKH: Tensor,
    v_pool_PSKH: Tensor,
    block_tables_BM: Tensor,
    kv_lens_B: Tensor,
    q_lens_B: Tensor,
    causal: bool | Tensor = False,
    scale: float | None = None,
) -> Tensor:
    """Output [B, T, N, H]; rows t >= q_lens[b] are padding and come back as zeros.

    block_tables [B, M] int32 (entries past a sequence's last page are ignored, may be -1);
    kv_lens [B] int32 tokens visible to every query of b; q_lens [B] int32 real queries of b;
    causal: for every sequence, or per sequence (an integer or bool tensor [B]).
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_pool_PSKH.shape[1], k_pool_PSKH.shape[2]
    M = block_tables_BM.shape[1]
    pages_BM = block_tables_BM.clamp(min=0).long()
    k_BMSKH = k_pool_PSKH[pages_BM]  # gather every listed page: [B, M, S, K, H]
    v_BMSKH = v_pool_PSKH[pages_BM]
    k_BKXH = k_BMSKH.reshape(B, M * S, K, H).transpose(1, 2)  # X = M*S key slots
    v_BKXH = v_BMSKH.reshape(B, M * S, K, H).transpose(1, 2)
    key_pos_X = torch.arange(M * S, device=q_BTNH.device)
    allowed_BTX = key_pos_X[None, None, :] < kv_lens_B.long()[:, None, None]  # [B, 1, X]
    if isinstance(causal, Tensor) or causal:
        q_pos_BT = (kv_lens_B - q_lens_B).long()[:, None] + torch.arange(T, device=q_BTNH.device)[None]
        seen_BTX = key_pos_X[None, None, :] <= q_pos_BT[:, :, None]
        if isinstance(causal, Tensor):  # non-causal sequences see every key
            seen_BTX = seen_BTX | (causal == 0)[:, None, None]
        allowed_BTX = allowed_BTX & seen_BTX
    else:
        allowed_BTX = allowed_BTX.expand(B, T, M * S)
    real_BT = torch.arange(T, device=q_BTNH.device)[None] < q_lens_B.long()[:, None]
    # Padding query rows would have no visible key under causal; let them see slot 0 and zero them after.
    allowed_BTX = allowed_BTX | (~real_BT[:, :, None] & (key_pos_X == 0)[None, None])
    o_BNTH = F.scaled_dot_product_attention(
        q_BTNH.transpose(1, 2), k_BKXH, v_BKXH, attn_mask=allowed_BTX[:, None], scale=scale, enable_gqa=N != K
    )
    return o_BNTH.transpose(1, 2) * real_BT[:, :, None, None]


def suppress_mask(logits_TV: Tensor, mask_token_id: int | None) -> Tensor:
    """fp32 logits with the mask token's logit at -inf: it is never a prediction. A copy when there
    is a mask token to suppress; without one, the fp32 logits themselves (no copy if already fp32)."""
    if mask_token_id is None:
        return logits_TV.float()
    logits_TV = logits_TV.to(torch.float32, copy=True)
    logits_TV[:, mask_token_id] = float("-inf")
    return logits_TV


def greedy_confidence(logits_TV: Tensor, mask_token_id: int | None) -> tuple[Tensor, Tensor]:
    """Argmax token [T] (int64) and its softmax probability [T] (fp32), mask token excluded
    (ties: the lowest token id). The contract of the fused confidence kernel.

    The token is the argmax of the logits themselves (softmax can round neighbours to one value);
    its probability is the largest softmax value, since softmax keeps the order. Three ops: a decode
    step is launch-bound at small batch (logsumexp alone is a composite of about ten on CPU), and
    `max` rather than `argmax`, which is 2.5x slower on CPU."""
    logits_TV = suppress_mask(logits_TV, mask_token_id)
    _, token_T = logits_TV.max(-1)
    prob_T = logits_TV.softmax(-1).amax(-1)
    return token_T, prob_T
