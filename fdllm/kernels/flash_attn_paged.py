"""Paged attention through flash-attn's `flash_attn_with_kvcache` (optional, CUDA only).

Same signature and semantics as `fdllm.kernels.reference.paged_attention_torch`, with flash-attn's limits:
- pages (`page_block_size`, our S) must hold a multiple of 256 tokens, so fdllm's usual diffusion
  block sizes (8..32) cannot use it: the page size equals the block size by design;
- fp16/bf16 only;
- causal attention is aligned bottom-right on the padded query length T (query t sees keys up to
  kv_len - T + t), which matches our kv_len - q_len + t only when no row is padding, so causal
  calls require q_lens == T (checked on the device, without a host sync).
Non-causal padded rows are computed and then zeroed, like the reference.

Shape legend: B sequences, T query tokens, N query heads, K kv heads, H head dim, P pages,
S page size, M max pages per sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdllm.kernels import FLASH_ATTN_PAGE_MULTIPLE


def paged_attention_flash_attn(
    q_BTNH: Tensor,
    k_pool_PSKH: Tensor,
    v_pool_PSKH: Tensor,
    block_tables_BM: Tensor,
    kv_lens_B: Tensor,
    q_lens_B: Tensor,
    causal: bool | Tensor = False,
    scale: float | None = None,
) -> Tensor:
    """Output [B, T, N, H]; rows t >= q_lens[b] are zeros. See paged_attention_torch for the arguments
    (`causal` a bool only: flash-attn has no per-sequence flag)."""
    from flash_attn import flash_attn_with_kvcache

    T, S = q_BTNH.shape[1], k_pool_PSKH.shape[1]
    if S % FLASH_ATTN_PAGE_MULTIPLE != 0:
        raise ValueError(
            f"flash-attn paged KV needs pages of a multiple of {FLASH_ATTN_PAGE_MULTIPLE} tokens, got {S}; "
            "use the 'triton' attention backend for small diffusion blocks"
        )
    if q_BTNH.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"flash-attn runs fp16/bf16 only, got {q_BTNH.dtype}")
    if isinstance(causal, Tensor):
        raise ValueError("the flash_attn backend takes one causal flag for the whole call, not one per sequence")
    if causal:
        # checked on the device: no host sync
        torch._assert_async((q_lens_B == T).all(), "flash_attn backend: causal needs q_lens == T (no padding)")
    o_BTNH = flash_attn_with_kvcache(
        q_BTNH, k_pool_PSKH, v_pool_PSKH,
        cache_seqlens=kv_lens_B.to(torch.int32),
        block_table=block_tables_BM.to(torch.int32),
        softmax_scale=scale,
        causal=causal,
    )
    real_BT = torch.arange(T, device=q_BTNH.device)[None] < q_lens_B[:, None]
    return o_BTNH * real_BT[:, :, None, None]
