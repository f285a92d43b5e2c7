"""Block-diffusion attention masks (METHOD.md §2.4 and §3.1), dense and as flex_attention BlockMasks.

Every mask comes from one rule function over (query index, key index) tensors, used both to fill a
dense boolean matrix (CPU training, tests) and as the flex_attention `mask_mod` (GPU training), so
the two cannot drift apart. True = the query may attend to the key.

Two-stream layout (length 2L): indices [0, L) are the noisy copy x_t, [L, 2L) the clean copy x_0.
With `noisy_streams=2` the two complementary noisy copies share one clean copy: `[x_t ; x_t' ; x_0]`
(length 3L). Every query then sees exactly the keys it sees in METHOD's layout (a noisy stream never
sees the other one), so the outputs are the same, and the identical clean stream is computed once:
a quarter fewer tokens per sequence in training.
Optional `doc_ids` [B, L] (packed sequences) forbid attention across documents.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # pragma: no cover
    BlockMask, create_block_mask = None, None


def two_stream_rule(
    q: Tensor, k: Tensor, seq_len: int, block_size: int, causal_prefix: bool = False, noisy_streams: int = 1
) -> Tensor:
    """Allowed[q, k] for the two-stream training input (index tensors broadcast together).

    `causal_prefix`: the clean stream attends causally instead of block-causally (the joint AR +
    diffusion objective of METHOD.md §5), so its K/V are the AR model's and its logits AR logits.
    `noisy_streams`: noisy copies before the clean one (streams `[0, noisy_streams)` noisy, the last clean).
    """
    q_stream, k_stream = q // seq_len, k // seq_len
    q_noisy, k_noisy = q_stream < noisy_streams, k_stream < noisy_streams
    q_blk, k_blk = (q % seq_len) // block_size, (k % seq_len) // block_size
    noisy_noisy = q_noisy & (k_stream == q_stream) & (q_blk == k_blk)  # bidirectional inside the block
    noisy_clean = q_noisy & ~k_noisy & (k_blk < q_blk)  # clean context of earlier blocks
    clean_order = (k <= q) if causal_prefix else (k_blk <= q_blk)  # both in the clean stream
    clean_clean = ~q_noisy & ~k_noisy & clean_order  # causal or block-causal
    return noisy_noisy | noisy_clean | clean_clean  # clean -> noisy: never


def block_causal_rule(q: Tensor, k: Tensor, block_size: int) -> Tensor:
    """Allowed[q, k] for one stream: bidirectional inside a block, causal across blocks (prefill)."""
    return k // block_size <= q // block_size


def _same_doc(doc_ids_BL: Tensor, b: Tensor, q: Tensor, k: Tensor, seq_len: int) -> Tensor:
    return doc_ids_BL[b, q % seq_len] == doc_ids_BL[b, k % seq_len]


def _check(seq_len: int, block_size: int, doc_ids: Tensor | None) -> None:
    if block_size < 1 or seq_len % block_size:
        raise ValueError(f"sequence length {seq_len} must be a positive multiple of block_size {block_size}")
    if doc_ids is not None and (doc_ids.dim() != 2 or doc_ids.shape[1] != seq_len):
        raise ValueError(f"doc_ids must be [B, {seq_len}], got {tuple(doc_ids.shape)}")


def two_stream_mask(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device=None, causal_prefix: bool = False,
    noisy_streams: int = 1,
) -> Tensor:
    """Dense bool mask [B|1, 1, N, N] for `[x_t ; x_0]` (N = 2L, L = seq_len), or for
    `[x_t ; x_t' ; x_0]` (N = 3L) with `noisy_streams=2`."""
    _check(seq_len, block_size, doc_ids)
    device = doc_ids.device if doc_ids is not None else device
    idx = torch.arange((noisy_streams + 1) * seq_len, device=device)
    allowed = two_stream_rule(idx[:, None], idx[None, :], seq_len, block_size, causal_prefix, noisy_streams)[None]
    if doc_ids is not None:
        b = torch.arange(doc_ids.shape[0], device=device)[:, None, None]
        allowed = allowed & _same_doc(doc_ids, b, idx[None, :, None], idx[None, None, :], seq_len)
    return allowed[:, None]


@dataclass(frozen=True)
class StreamMasks:
    """The dense two-stream mask cut by stream, for attention that skips the key ranges a stream never
    sees: each noisy stream attends `[itself ; the clean stream]` under `noisy` [B|1, 1, L, 2L] (the
    same for every noisy stream), the clean stream attends itself under `clean` [B|1, 1, L, L].
    Dense attention over all (S+1)L keys scores (S+1)^2 L^2 pairs; by stream, (2S+1) L^2: the CPU
    training path's saving (flex_attention's BlockMask skips the empty tiles by itself)."""

    noisy: Tensor
    clean: Tensor
    noisy_streams: int


def two_stream_masks_by_stream(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device=None, causal_prefix: bool = False,
    noisy_streams: int = 1,
) -> StreamMasks:
    """`two_stream_mask`'s entries, cut by stream (`StreamMasks`): one rule, so they cannot differ."""
    full = two_stream_mask(seq_len, block_size, doc_ids, device, causal_prefix, noisy_streams)
    clean = slice(noisy_streams * seq_len, None)
    own = full[..., :seq_len, :seq_len]  # stream 0 to itself; every noisy stream sees itself alike
    return StreamMasks(torch.cat([own, full[..., :seq_len, clean]], dim=-1), full[..., clean, clean], noisy_streams)


def block_causal_mask(seq_len: int, block_size: int, doc_ids: Tensor | None = None, device=None) -> Tensor:
    """Dense bool mask [B|1, 1, L, L]: block-causal, as in prefill and the clean stream."""
    _check(seq_len, block_size, doc_ids)
    device = doc_ids.device if doc_ids is not None else device
    idx = torch.arange(seq_len, device=device)
    allowed = block_causal_rule(idx[:, None], idx[None, :], block_size)[None]
    if doc_ids is not None:
        b = torch.arange(doc_ids.shape[0], device=device)[:, None, None]
        allowed = allowed & _same_doc(doc_ids, b, idx[None, :, None], idx[None, None, :], seq_len)
    return allowed[:, None]


def two_stream_block_mask(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device: str | torch.device = "cpu",
    causal_prefix: bool = False, noisy_streams: int = 1,
) -> "BlockMask":
    """The same mask as `two_stream_mask`, as a sparse flex_attention BlockMask."""
    _check(seq_len, block_size, doc_ids)
    if doc_ids is None:
        return _cached_two_stream_block_mask(seq_len, block_size, str(device), causal_prefix, noisy_streams)

    def mask_mod(b, h, q, k):
        allowed = two_stream_rule(q, k, seq_len, block_size, causal_prefix, noisy_streams)
        return allowed & _same_doc(doc_ids, b, q, k, seq_len)

    n = (noisy_streams + 1) * seq_len
    return create_block_mask(mask_mod, doc_ids.shape[0], None, n, n, device=doc_ids.device)


def block_causal_block_mask(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device: str | torch.device = "cpu"
) -> "BlockMask":
    """The same mask as `block_causal_mask`, as a flex_attention BlockMask."""
    _check(seq_len, block_size, doc_ids)

    def mask_mod(b, h, q, k):
        allowed = block_causal_rule(q, k, block_size)
        return allowed if doc_ids is None else allowed & _same_doc(doc_ids, b, q, k, seq_len)

    batch = None if doc_ids is None else doc_ids.shape[0]
    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device if doc_ids is None else doc_ids.device)


@functools.lru_cache(maxsize=16)
def _cached_two_stream_block_mask(
    seq_len: int, block_size: int, device: str, causal_prefix: bool, noisy_streams: int
) -> "BlockMask":
    # Building a BlockMask costs ~1 s on CPU for a few hundred tokens; training reuses one shape.
    def mask_mod(b, h, q, k):
        return two_stream_rule(q, k, seq_len, block_size, causal_prefix, noisy_streams)

    n = (noisy_streams + 1) * seq_len
    return create_block_mask(mask_mod, None, None, n, n, device=device)
