"""The block-diffusion training objective of docs/method.md §2, plus the plain AR loss it is compared to.

Pipeline for a batch of packed sequences (input_ids, labels) [B, L], L a multiple of block_size:
  1. `sample_noise_masks`: per-block p_b = (1-eps) t_b + eps, each loss-carrying token masked with
     prob p_b in copy 1 and exactly the complement in copy 2;
  2. `two_stream_batch`: rows [x_t ; x_0] of length 2L with positions [pos ; pos], copies stacked
     along the batch ([2B, 2L]); or, `share_clean=True`, rows [x_t ; x_t' ; x_0] of length 3L ([B, 3L]):
     the same attention for every query (`fdllm.masks`), the same loss and gradients, one clean
     stream instead of two identical ones (a quarter fewer tokens through the model);
  3. `compact_noisy_blocks` (the train loop's step): drop the noisy blocks whose logits predict no
     target (prompt-only blocks, padding): the same loss and gradients from ~20% fewer tokens;
  4. `block_diffusion_loss`: forward under the two-stream mask, logits of the noisy half, token
     shift (position j-1 predicts token j: `TwoStreamBatch.logit_targets`), cross-entropy over
     masked tokens of both copies.
`joint_loss` (docs/method.md §5, self-speculative decoding) adds, in the same forward, the AR next-token
loss of the clean half under a causal clean stream: one checkpoint with a good causal mode and a
good diffusion mode, whose prefix K/V are the same in both.
`certainty_forcing_loss` (docs/method.md §5, dParallel's self-distillation) adds to the block-diffusion
loss the entropy of the positions the model already predicts correctly (`certainty_forcing_entropy`).

Shape legend: B batch, L sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fdllm.config import IGNORE_INDEX
from fdllm.masks import block_causal_block_mask, block_causal_mask, two_stream_block_mask, two_stream_masks_by_stream

_LENGTH_BUCKETS = 8  # compact_noisy_blocks: distinct row lengths at most
MaskImpl = Literal["auto", "dense", "flex"]


@dataclass(frozen=True)
class TwoStreamBatch:
    """S = `noisy_streams` noisy copies per row before the clean one: S = 1 is METHOD's layout
    (R = 2B rows [x_t ; x_0], the complementary copies stacked along the batch), S = 2 the shared
    clean stream (R = B rows [x_t ; x_t' ; x_0]). Either way `targets` has one row per noisy copy."""

    input_ids: Tensor  # [R, (S+1)L]
    position_ids: Tensor  # [R, (S+1)L] every stream has the sequence's positions
    targets: Tensor  # [2B, L] token j where it is masked in that copy's x_t, IGNORE_INDEX elsewhere
    doc_ids: Tensor | None  # [R, L] or None
    ar_targets: Tensor | None = None  # [R, L] token j where it carries loss: the clean stream's AR loss
    noisy_streams: int = 1
    # [R, S*K] compacted noisy streams (`compact_noisy_blocks`): K blocks each, slot j of row r holds
    # source block slots[r, j] (-1: padding); None: every block in order, each noisy stream L long.
    slots: Tensor | None = None

    def to(self, device: torch.device | str) -> TwoStreamBatch:
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)

    @property
    def noisy_len(self) -> int:
        """Tokens of one noisy stream: L, or K blocks once compacted."""
        return (self.input_ids.shape[1] - self.targets.shape[1]) // self.noisy_streams

    @property
    def logit_targets(self) -> Tensor:
        """[2B, noisy_len] the target each noisy logit predicts (the token shift: position j predicts
        token j + 1), IGNORE_INDEX where none; rows as `targets`'."""
        shifted = F.pad(self.targets[:, 1:], (0, 1), value=IGNORE_INDEX)
        if self.slots is None:
            return shifted
        slots = self.slots.view(shifted.shape[0], -1)  # [2B, K]: row r's copies in order, as `targets`
        block = self.noisy_len // slots.shape[1]
        blocks = shifted.unflatten(1, (-1, block)).gather(1, slots.clamp(min=0)[..., None].expand(-1, -1, block))
        return torch.where(slots[..., None] >= 0, blocks, IGNORE_INDEX).flatten(1)


def check_block_multiple(seq_len: int, block_size: int) -> None:
    if seq_len % block_size:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of block_size {block_size}: "
            f"pack or pad sequences to a block multiple (e.g. {-(-seq_len // block_size) * block_size})"
        )


def loss_carrying(labels_BL: Tensor, doc_ids_BL: Tensor | None = None) -> Tensor:
    """Tokens that may be masked and trained: labelled, not the first token of a row or document
    (nothing before it in the same document could predict it after the token shift)."""
    keep = labels_BL != IGNORE_INDEX
    keep[:, 0] = False
    if doc_ids_BL is not None:
        keep[:, 1:] &= doc_ids_BL[:, 1:] == doc_ids_BL[:, :-1]
    return keep


def sample_noise_masks(
    labels_BL: Tensor,
    block_size: int,
    eps: float = 1e-3,
    doc_ids_BL: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Complementary bool masks (copy 1, copy 2) [B, L]: True = replaced by the mask token."""
    B, L = labels_BL.shape
    check_block_multiple(L, block_size)
    t_Bn = torch.rand(B, L // block_size, generator=generator, device=labels_BL.device)
    p_BL = ((1 - eps) * t_Bn + eps).repeat_interleave(block_size, dim=1)
    draw_BL = torch.rand(B, L, generator=generator, device=labels_BL.device)
    trainable = loss_carrying(labels_BL, doc_ids_BL)
    first = trainable & (draw_BL < p_BL)
    return first, trainable & ~first


def two_stream_batch(
    input_ids_BL: Tensor,
    labels_BL: Tensor,
    mask_token_id: int,
    block_size: int,
    eps: float = 1e-3,
    position_ids_BL: Tensor | None = None,
    doc_ids_BL: Tensor | None = None,
    generator: torch.Generator | None = None,
    share_clean: bool = False,
) -> TwoStreamBatch:
    """Noise a batch twice (complementary masks) and lay it out as the two-stream input: METHOD's
    `[x_t ; x_0]` per copy, or with `share_clean` both copies beside one clean stream."""
    B, L = input_ids_BL.shape
    if labels_BL.shape != input_ids_BL.shape:
        raise ValueError(f"labels {tuple(labels_BL.shape)} must match input_ids {tuple(input_ids_BL.shape)}")
    if position_ids_BL is None:
        position_ids_BL = torch.arange(L, device=input_ids_BL.device).expand(B, L)
    masks = sample_noise_masks(labels_BL, block_size, eps, doc_ids_BL, generator)
    noisy = [torch.where(m, torch.full_like(input_ids_BL, mask_token_id), input_ids_BL) for m in masks]
    targets = [torch.where(m, input_ids_BL, torch.full_like(input_ids_BL, IGNORE_INDEX)) for m in masks]
    ar_targets = torch.where(loss_carrying(labels_BL, doc_ids_BL), input_ids_BL, IGNORE_INDEX)
    if share_clean:  # rows [x_t ; x_t' ; x_0]; targets row-major over (row, copy), as the logits come out
        return TwoStreamBatch(
            torch.cat([*noisy, input_ids_BL], dim=1), position_ids_BL.repeat(1, 3),
            torch.stack(targets, dim=1).flatten(0, 1), doc_ids_BL, ar_targets, noisy_streams=2,
        )
    rows = [torch.cat([x_t, input_ids_BL], dim=1) for x_t in noisy]  # [B, 2L] per copy
    positions = position_ids_BL.repeat(2, 2)
    docs = None if doc_ids_BL is None else doc_ids_BL.repeat(2, 1)
    return TwoStreamBatch(torch.cat(rows), positions, torch.cat(targets), docs, ar_targets.repeat(2, 1))


def compact_noisy_blocks(batch: TwoStreamBatch, block_size: int) -> TwoStreamBatch:
    """Drop the noisy blocks whose logits predict no target (prompt-only blocks, padding, blocks whose
    loss tokens all landed in the other copy): each noisy stream keeps its K target-carrying blocks
    (K the most of any stream in the batch; shorter streams padded with blocks that see only
    themselves). Loss and gradients are the uncut batch's: nothing attends a noisy block but the block
    itself, so its rows only matter through its own logits. The world corpus's batches lose ~30% of
    their noisy blocks this way; SFT data with long prompts more.

    K is rounded up to a multiple of an eighth of the blocks, so a compiled attention (flex on a GPU)
    sees at most 8 sequence lengths instead of recompiling for every batch."""
    if batch.slots is not None:
        return batch
    S, L = batch.noisy_streams, batch.targets.shape[1]
    carries = (batch.logit_targets != IGNORE_INDEX).unflatten(1, (-1, block_size)).any(-1)  # [2B, L/bs]
    n = carries.shape[1]
    step = max(1, n // _LENGTH_BUCKETS)
    K = min(-(-max(int(carries.sum(1).max()), 1) // step) * step, n)
    rank = torch.where(carries, 0, n) + torch.arange(n, device=carries.device)  # kept blocks first, in order
    order = rank.argsort(dim=1)[:, :K]
    slots = torch.where(carries.gather(1, order), order, -1)  # [2B, K]

    def kept(t_RN: Tensor) -> Tensor:  # the noisy streams' kept blocks, then the clean stream
        blocks = t_RN[:, :S * L].reshape(len(order), -1, block_size)
        noisy = blocks.gather(1, order[..., None].expand(-1, -1, block_size)).reshape(t_RN.shape[0], -1)
        return torch.cat([noisy, t_RN[:, S * L:]], dim=1)

    return dataclasses.replace(batch, input_ids=kept(batch.input_ids), position_ids=kept(batch.position_ids),
                               slots=slots.view(batch.input_ids.shape[0], -1))


def resolve_mask_impl(mask_impl: MaskImpl, device: torch.device) -> Literal["dense", "flex"]:
    # flex_attention has no CPU backward (torch 2.13): training on CPU must use the dense mask.
    if mask_impl not in ("auto", "dense", "flex"):
        raise ValueError(f"mask_impl must be 'auto', 'dense' or 'flex', got {mask_impl!r}")
    if mask_impl == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return mask_impl


def shifted_cross_entropy(logits_BLV: Tensor, targets_BL: Tensor) -> tuple[Tensor, Tensor]:
    """Mean CE of logits[:, j-1] against targets[:, j] over non-ignored targets; also their count."""
    return _cross_entropy(logits_BLV[:, :-1], targets_BL[:, 1:])


def _cross_entropy(logits_BLV: Tensor, targets_BL: Tensor) -> tuple[Tensor, Tensor]:
    """Mean CE of logits[:, j] against targets[:, j] over non-ignored targets; also their count."""
    targets = targets_BL.flatten()
    count = (targets != IGNORE_INDEX).sum()
    loss_sum = F.cross_entropy(logits_BLV.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum / count.clamp(min=1), count


def block_diffusion_loss(
    model: torch.nn.Module,
    input_ids_BL: Tensor,
    labels_BL: Tensor,
    mask_token_id: int,
    block_size: int,
    eps: float = 1e-3,
    position_ids_BL: Tensor | None = None,
    doc_ids_BL: Tensor | None = None,
    mask_impl: MaskImpl = "auto",
    generator: torch.Generator | None = None,
    share_clean: bool = True,
    compact: bool = True,
) -> tuple[Tensor, Tensor]:
    """Block-diffusion loss of a batch (scalar, mean over masked tokens) and the masked-token count.
    `compact`: leave the noisy blocks that carry no target out of the forward (`compact_noisy_blocks`)."""
    batch = two_stream_batch(
        input_ids_BL, labels_BL, mask_token_id, block_size, eps, position_ids_BL, doc_ids_BL, generator, share_clean
    )
    return two_stream_loss(model, compact_noisy_blocks(batch, block_size) if compact else batch, block_size, mask_impl)


def _two_stream_attention(batch: TwoStreamBatch, block_size: int, mask_impl: MaskImpl, causal_prefix: bool):
    """The flex BlockMask, or the dense mask cut by stream (no scores for keys a stream never sees)."""
    L, device = batch.targets.shape[1], batch.input_ids.device
    build = two_stream_block_mask if resolve_mask_impl(mask_impl, device) == "flex" else two_stream_masks_by_stream
    return build(L, block_size, batch.doc_ids, device=device, causal_prefix=causal_prefix,
                 noisy_streams=batch.noisy_streams, slots=batch.slots)


def _per_copy(logits_RNV: Tensor, batch: TwoStreamBatch) -> Tensor:
    """Logits of the noisy streams [R, S*n, V] as one row per noisy copy [2B, n, V] (`targets`' rows)."""
    return logits_RNV.flatten(0, 1).unflatten(0, (-1, batch.noisy_len))


def two_stream_loss(
    model: torch.nn.Module, batch: TwoStreamBatch, block_size: int, mask_impl: MaskImpl = "auto",
    causal_prefix: bool = False,
) -> tuple[Tensor, Tensor]:
    """Forward an already noised two-stream batch under its mask; mean CE over masked tokens, and their count.

    `causal_prefix`: the clean stream attends causally (the joint objective's mask; its diffusion part alone).
    """
    return _cross_entropy(_noisy_logits(model, batch, block_size, mask_impl, causal_prefix), batch.logit_targets)


def _noisy_logits(model: torch.nn.Module, batch: TwoStreamBatch, block_size: int, mask_impl: MaskImpl,
                  causal_prefix: bool) -> Tensor:
    """Logits [2B, n, V] of the noisy copies of a two-stream batch (n = `noisy_len`)."""
    mask = _two_stream_attention(batch, block_size, mask_impl, causal_prefix)
    noisy = slice(0, batch.noisy_streams * batch.noisy_len)
    return _per_copy(model(batch.input_ids, batch.position_ids, mask, logit_positions=noisy), batch)


def certainty_forcing_entropy(logits_BLV: Tensor, targets_BL: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """dParallel's certainty-forcing term (docs/method.md §5): the mean, over masked positions that the model
    already predicts correctly, of the entropy of softmax(z / T); also the number of those positions.

    With the token shift: logits[:, j-1] predict targets[:, j] (non-ignored targets are the masked
    positions). "Correct" means argmax z = target (a selection, no gradient through it); the softmax
    is over the whole vocabulary, at temperature `temperature` (T = 0.5 sharpens it, so the gradient
    pushes already-right predictions toward certainty). Rows of both complementary copies count alike.
    Returns (mean entropy in nats, 0 when no position is correct; count).
    """
    return _certainty_entropy(logits_BLV[:, :-1], targets_BL[:, 1:], temperature)


def _certainty_entropy(logits_BLV: Tensor, targets_BL: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """`certainty_forcing_entropy` of logits[:, j] against targets[:, j] (the shift already applied)."""
    logits_NV = logits_BLV.flatten(0, 1)
    targets_N = targets_BL.flatten()
    correct_N = (targets_N != IGNORE_INDEX) & (logits_NV.argmax(-1) == targets_N)
    logp_CV = (logits_NV[correct_N].float() / temperature).log_softmax(-1)  # C correct positions
    entropy_C = -(logp_CV.exp() * logp_CV).sum(-1)
    count = correct_N.sum()
    return entropy_C.sum() / count.clamp(min=1), count


def certainty_forcing_loss(
    model: torch.nn.Module, batch: TwoStreamBatch, block_size: int, weight: float = 2.0, temperature: float = 0.5,
    mask_impl: MaskImpl = "auto", causal_prefix: bool = False,
) -> tuple[Tensor, Tensor]:
    """Self-distillation loss (docs/method.md §5): the block-diffusion loss of both complementary views (§2)
    + `weight` (lambda) * `certainty_forcing_entropy` at `temperature`, from one forward. Returns the
    loss and the masked-token count (the train loop normalises by it across workers)."""
    logits = _noisy_logits(model, batch, block_size, mask_impl, causal_prefix)
    return _diffusion_cross_entropy(logits, batch.logit_targets, (weight, temperature))


def _diffusion_cross_entropy(logits_BLV: Tensor, logit_targets_BL: Tensor,
                             certainty: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """The noisy copies' loss and masked-token count against `TwoStreamBatch.logit_targets`: the
    cross-entropy, plus lambda x the certainty-forcing entropy at T when `certainty` = (lambda, T)."""
    ce, count = _cross_entropy(logits_BLV, logit_targets_BL)
    if certainty is None:
        return ce, count
    weight, temperature = certainty
    return ce + weight * _certainty_entropy(logits_BLV, logit_targets_BL, temperature)[0], count


def joint_loss(
    model: torch.nn.Module, batch: TwoStreamBatch, block_size: int, ar_weight: float = 0.5,
    diffusion_weight: float = 0.5, mask_impl: MaskImpl = "auto", certainty: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """`ar_weight` * AR next-token loss of the clean half + `diffusion_weight` * block-diffusion loss of
    the noisy half, from one forward under the two-stream mask with a causal clean stream (the clean
    half's logits are then exactly a causal LM's). Returns the weighted loss and the masked-token count
    (the diffusion part's, which the train loop normalises by across workers).

    `certainty` (lambda, T): the diffusion part becomes `certainty_forcing_loss`'s (CE + lambda x the
    certainty-forcing entropy): self-distillation of a joint checkpoint that keeps its causal mode."""
    if batch.ar_targets is None:
        raise ValueError("the joint loss needs TwoStreamBatch.ar_targets (built by two_stream_batch)")
    mask = _two_stream_attention(batch, block_size, mask_impl, causal_prefix=True)
    n_noisy = batch.noisy_streams * batch.noisy_len
    logits = model(batch.input_ids, batch.position_ids, mask)  # every stream
    diffusion, count = _diffusion_cross_entropy(_per_copy(logits[:, :n_noisy], batch), batch.logit_targets, certainty)
    ar, _ = shifted_cross_entropy(logits[:, n_noisy:], batch.ar_targets)
    return ar_weight * ar + diffusion_weight * diffusion, count


def ar_loss(
    model: torch.nn.Module,
    input_ids_BL: Tensor,
    labels_BL: Tensor,
    position_ids_BL: Tensor | None = None,
    doc_ids_BL: Tensor | None = None,
    mask_impl: MaskImpl = "auto",
) -> tuple[Tensor, Tensor]:
    """Plain next-token loss (the AR baseline and pretraining objective) and the target count.

    Packed documents attend causally within themselves, as a flex BlockMask on a GPU like the
    diffusion objectives' masks (a dense mask there leaves SDPA few kernels, with GQA maybe only the
    math one: the AR baseline would look slower than it is), dense on CPU."""
    mask = None
    if doc_ids_BL is not None:
        build = block_causal_block_mask if resolve_mask_impl(mask_impl, input_ids_BL.device) == "flex" else block_causal_mask
        mask = build(input_ids_BL.shape[1], 1, doc_ids_BL)
    targets = torch.where(loss_carrying(labels_BL, doc_ids_BL), labels_BL, IGNORE_INDEX)
    return shifted_cross_entropy(model(input_ids_BL, position_ids_BL, mask), targets)
