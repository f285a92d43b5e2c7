"""Block-diffusion attention masks (docs/method.md §2.4 and §3.1), dense and as flex_attention BlockMasks.

Every mask comes from one rule function over (query index, key index) tensors, used both to fill a
dense boolean matrix (CPU training, tests) and as the flex_attention `mask_mod` (GPU training), so
the two cannot drift apart. True = the query may attend to the key.

Two-stream layout (length 2L): indices [0, L) are the noisy copy x_t, [L, 2L) the clean copy x_0.
With `noisy_streams=2` the two complementary noisy copies share one clean copy: `[x_t ; x_t' ; x_0]`
(length 3L). Every query then sees exactly the keys it sees in METHOD's layout (a noisy stream never
sees the other one), so the outputs are the same, and the identical clean stream is computed once:
a quarter fewer tokens per sequence in training.
Compacted noisy streams (`slots`, made by `fdllm.objective.compact_noisy_blocks`) keep only the
blocks that carry a target: each kept block still sees itself and the clean blocks before its source
block, so the rule is the same one, read through a per-row table of which block each slot holds.
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
    q: Tensor, k: Tensor, seq_len: int, block_size: int, causal_prefix: bool = False, noisy_streams: int = 1,
    slots: Tensor | None = None, b: Tensor | None = None,
) -> Tensor:
    """Allowed[q, k] for the two-stream training input (index tensors broadcast together).

    `causal_prefix`: the clean stream attends causally instead of block-causally (the joint AR +
    diffusion objective of docs/method.md §5), so its K/V are the AR model's and its logits AR logits.
    `noisy_streams`: noisy copies before the clean one (streams `[0, noisy_streams)` noisy, the last clean).
    `slots` [R, S*K] (with the row index `b`): compacted noisy streams of K blocks each, slot j holding
    source block `slots[b, j]` (-1: padding, which sees only itself), as `fdllm.objective.
    compact_noisy_blocks` lays them out; None: every block of every stream in order.
    """
    n_noisy = _noisy_tokens(seq_len, block_size, noisy_streams, slots)
    q_noisy, k_noisy = q < n_noisy, k < n_noisy
    q_slot, k_slot = q // block_size, k // block_size  # a noisy block's slot: unique across streams
    q_src = q_slot % (seq_len // block_size) if slots is None else _slot_block(slots, b, q_slot)
    q_blk, k_blk = (q - n_noisy) // block_size, (k - n_noisy) // block_size  # clean stream blocks
    noisy_noisy = q_noisy & k_noisy & (q_slot == k_slot)  # bidirectional inside the block
    noisy_clean = q_noisy & ~k_noisy & (k_blk < q_src)  # clean context of earlier blocks
    clean_order = (k <= q) if causal_prefix else (k_blk <= q_blk)  # both in the clean stream
    clean_clean = ~q_noisy & ~k_noisy & clean_order  # causal or block-causal
    return noisy_noisy | noisy_clean | clean_clean  # clean -> noisy: never


def _slot_block(slots: Tensor, b: Tensor, slot: Tensor) -> Tensor:
    """The sequence block a noisy slot holds (clamped: clean indices read the last slot, which no caller uses)."""
    return slots[b, slot.clamp(max=slots.shape[1] - 1)]


def _source_position(idx: Tensor, seq_len: int, block_size: int, slots: Tensor | None, b: Tensor | None) -> Tensor:
    """The sequence position of each index of the layout (padding slots: 0, so a padding block is one
    document and attends itself)."""
    if slots is None:
        return idx % seq_len
    n_noisy = slots.shape[1] * block_size
    src = _slot_block(slots, b, idx // block_size)
    noisy = torch.where(src < 0, 0, src * block_size + idx % block_size)
    return torch.where(idx < n_noisy, noisy, idx - n_noisy)


def block_causal_rule(q: Tensor, k: Tensor, block_size: int) -> Tensor:
    """Allowed[q, k] for one stream: bidirectional inside a block, causal across blocks (prefill)."""
    return k // block_size <= q // block_size


def _same_doc(doc_ids_BL: Tensor, b: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    return doc_ids_BL[b, q_pos] == doc_ids_BL[b, k_pos]


def _two_stream_same_doc(doc_ids_BL: Tensor, b: Tensor, q: Tensor, k: Tensor, seq_len: int, block_size: int,
                         slots: Tensor | None) -> Tensor:
    """`_same_doc` of two layout indices, read at their sequence positions."""
    def source(idx: Tensor) -> Tensor:
        return _source_position(idx, seq_len, block_size, slots, b)

    return _same_doc(doc_ids_BL, b, source(q), source(k))


def _check(seq_len: int, block_size: int, doc_ids: Tensor | None) -> None:
    if block_size < 1 or seq_len % block_size:
        raise ValueError(f"sequence length {seq_len} must be a positive multiple of block_size {block_size}")
    if doc_ids is not None and (doc_ids.dim() != 2 or doc_ids.shape[1] != seq_len):
        raise ValueError(f"doc_ids must be [B, {seq_len}], got {tuple(doc_ids.shape)}")


def _check_slots(slots: Tensor | None, noisy_streams: int, doc_ids: Tensor | None) -> None:
    if slots is None:
        return
    if slots.dim() != 2 or slots.shape[1] % noisy_streams or (doc_ids is not None and doc_ids.shape[0] != slots.shape[0]):
        raise ValueError(f"slots must be [R, {noisy_streams} x K] with doc_ids' R rows, got {tuple(slots.shape)}")


def _noisy_tokens(seq_len: int, block_size: int, noisy_streams: int, slots: Tensor | None) -> int:
    """Tokens of a row's noisy streams (whole, or their kept slots); the clean stream's L follow them."""
    return noisy_streams * seq_len if slots is None else slots.shape[1] * block_size


def two_stream_mask(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device=None, causal_prefix: bool = False,
    noisy_streams: int = 1, slots: Tensor | None = None,
) -> Tensor:
    """Dense bool mask [B|1, 1, N, N] for `[x_t ; x_0]` (N = 2L, L = seq_len), or for
    `[x_t ; x_t' ; x_0]` (N = 3L) with `noisy_streams=2`; with `slots` [R, S*K] (compacted noisy
    streams, `two_stream_rule`) [R, 1, N, N], N = S*K*block_size + L."""
    _check(seq_len, block_size, doc_ids)
    _check_slots(slots, noisy_streams, doc_ids)
    rows = doc_ids if doc_ids is not None else slots
    device = rows.device if rows is not None else device
    idx = torch.arange(_noisy_tokens(seq_len, block_size, noisy_streams, slots) + seq_len, device=device)
    q, k = idx[None, :, None], idx[None, None, :]
    b = None if rows is None else torch.arange(rows.shape[0], device=device)[:, None, None]
    allowed = two_stream_rule(q, k, seq_len, block_size, causal_prefix, noisy_streams, slots, b)
    if doc_ids is not None:
        allowed = allowed & _two_stream_same_doc(doc_ids, b, q, k, seq_len, block_size, slots)
    return allowed[:, None]


@dataclass(frozen=True)
class StreamMasks:
    """The dense two-stream mask cut by stream, for attention that skips the key ranges a stream never
    sees: noisy stream s attends `[itself ; the clean stream]` under `noisy[s]` [B|1, 1, n, n + L]
    (n = L, or the compacted stream's length), the clean stream attends itself under `clean` [B|1, 1, L, L].
    Dense attention over all (S+1)L keys scores (S+1)^2 L^2 pairs; by stream, (2S+1) L^2: the CPU
    training path's saving (flex_attention's BlockMask skips the empty tiles by itself)."""

    noisy: tuple[Tensor, ...]
    clean: Tensor

    @property
    def noisy_streams(self) -> int:
        return len(self.noisy)


def two_stream_masks_by_stream(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device=None, causal_prefix: bool = False,
    noisy_streams: int = 1, slots: Tensor | None = None,
) -> StreamMasks:
    """`two_stream_mask`'s entries, cut by stream (`StreamMasks`): one rule, so they cannot differ."""
    full = two_stream_mask(seq_len, block_size, doc_ids, device, causal_prefix, noisy_streams, slots)
    n = (full.shape[-1] - seq_len) // noisy_streams
    clean = slice(noisy_streams * n, None)
    noisy = tuple(torch.cat([full[..., s * n:(s + 1) * n, s * n:(s + 1) * n], full[..., s * n:(s + 1) * n, clean]], -1)
                  for s in range(noisy_streams))
    return StreamMasks(noisy, full[..., clean, clean])


def block_causal_mask(seq_len: int, block_size: int, doc_ids: Tensor | None = None, device=None) -> Tensor:
    """Dense bool mask [B|1, 1, L, L]: block-causal, as in prefill and the clean stream."""
    _check(seq_len, block_size, doc_ids)
    device = doc_ids.device if doc_ids is not None else device
    idx = torch.arange(seq_len, device=device)
    allowed = block_causal_rule(idx[:, None], idx[None, :], block_size)[None]
    if doc_ids is not None:
        b = torch.arange(doc_ids.shape[0], device=device)[:, None, None]
        allowed = allowed & _same_doc(doc_ids, b, idx[None, :, None], idx[None, None, :])
    return allowed[:, None]


def two_stream_block_mask(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device: str | torch.device = "cpu",
    causal_prefix: bool = False, noisy_streams: int = 1, slots: Tensor | None = None,
) -> "BlockMask":
    """The same mask as `two_stream_mask`, as a sparse flex_attention BlockMask."""
    _check(seq_len, block_size, doc_ids)
    _check_slots(slots, noisy_streams, doc_ids)
    if doc_ids is None and slots is None:
        return _cached_two_stream_block_mask(seq_len, block_size, str(device), causal_prefix, noisy_streams)

    def mask_mod(b, h, q, k):
        allowed = two_stream_rule(q, k, seq_len, block_size, causal_prefix, noisy_streams, slots, b)
        return allowed if doc_ids is None else allowed & _two_stream_same_doc(doc_ids, b, q, k, seq_len, block_size, slots)

    rows = doc_ids if doc_ids is not None else slots
    n = _noisy_tokens(seq_len, block_size, noisy_streams, slots) + seq_len
    return create_block_mask(mask_mod, rows.shape[0], None, n, n, device=rows.device)


def block_causal_block_mask(
    seq_len: int, block_size: int, doc_ids: Tensor | None = None, device: str | torch.device = "cpu"
) -> "BlockMask":
    """The same mask as `block_causal_mask`, as a flex_attention BlockMask."""
    _check(seq_len, block_size, doc_ids)

    def mask_mod(b, h, q, k):
        allowed = block_causal_rule(q, k, block_size)
        return allowed if doc_ids is None else allowed & _same_doc(doc_ids, b, q, k)

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
