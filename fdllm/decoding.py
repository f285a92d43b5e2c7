"""The per-sequence decoding algorithm of METHOD.md §3 as small pure functions.

Tensor functions (confidence, threshold selection) run on the device over a whole step's logits;
block functions (which sub-block, what to feed, which logit predicts which position) work on a
sequence's current block as a host list of token ids, `mask_token_id` where still masked.

Block coordinates: offsets 0..L-1 inside the current block. Offset 0 is always known (the prompt's
leftover tokens, or the token predicted by the previous block's last logit), so the token shift
(offset j takes the logits of offset j-1) never needs a logit from outside the block.

Shape legend: T logit rows, V vocab, B sequences, W logit rows per sequence (a sub-block).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _suppress_mask(logits_TV: Tensor, mask_token_id: int | None) -> Tensor:
    """fp32 copy of the logits with the mask token's logit at -inf: it is never a prediction."""
    logits_TV = logits_TV.to(torch.float32, copy=True)
    if mask_token_id is not None:
        logits_TV[:, mask_token_id] = float("-inf")
    return logits_TV


def greedy_confidence(logits_TV: Tensor, mask_token_id: int | None) -> tuple[Tensor, Tensor]:
    """Argmax token [T] (int64) and its softmax probability [T] (fp32), mask token excluded."""
    logits_TV = _suppress_mask(logits_TV, mask_token_id)
    top_T, token_T = logits_TV.max(-1)
    prob_T = torch.exp(top_T - torch.logsumexp(logits_TV, -1))  # max softmax prob, no [T, V] softmax
    return token_T, prob_T


def sample_confidence(
    logits_TV: Tensor, mask_token_id: int | None, temperature: float, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled token [T] and its probability [T] under the temperature/top-k/top-p filtered distribution."""
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    logits_TV = _suppress_mask(logits_TV, mask_token_id) / temperature
    if 0 < top_k < logits_TV.shape[-1]:
        kth_T1 = logits_TV.topk(top_k, dim=-1).values[:, -1:]
        logits_TV = logits_TV.masked_fill(logits_TV < kth_T1, float("-inf"))
    if top_p < 1.0:
        sorted_TV, order_TV = logits_TV.sort(-1, descending=True)
        probs_TV = sorted_TV.softmax(-1)
        drop_TV = probs_TV.cumsum(-1) - probs_TV > top_p  # keep the smallest prefix with mass >= top_p
        logits_TV = logits_TV.scatter(-1, order_TV, sorted_TV.masked_fill(drop_TV, float("-inf")))
    probs_TV = logits_TV.softmax(-1)
    token_T = torch.multinomial(probs_TV, 1, generator=generator)[:, 0]
    return token_T, probs_TV.gather(-1, token_T[:, None])[:, 0]


def select_unmask(prob_BW: Tensor, candidate_BW: Tensor, threshold_B: Tensor) -> Tensor:
    """Positions to unmask [B, W] bool: candidates with prob > threshold, and always the most
    confident candidate of each sequence that has one (so every step makes progress)."""
    select_BW = candidate_BW & (prob_BW > threshold_B[:, None])
    best_B = prob_BW.masked_fill(~candidate_BW, -1.0).argmax(-1)
    has_candidate_B = candidate_BW.any(-1)
    rows_B = torch.arange(prob_BW.shape[0], device=prob_BW.device)
    select_BW[rows_B, best_B] |= has_candidate_B
    return select_BW


def current_sub_block(block: Sequence[int], sub_block_size: int, mask_token_id: int) -> int | None:
    """Start offset of the leftmost sub-block with a masked offset; None when the block is done.

    Every masked offset is decoded, also past max_new_tokens: the limit cuts the output afterwards
    and never changes which positions compete for the threshold (METHOD.md §5, truncation).
    """
    for offset, token in enumerate(block):
        if token == mask_token_id:
            return offset - offset % sub_block_size
    return None


@dataclass(frozen=True)
class BlockStep:
    """One denoising step of a sub-block: feed block offsets [feed_start, len(block)) or just the
    sub-block, and read `logit_rows[i]` (an index into the fed tokens) to predict offset sub_start+i."""

    feed_start: int
    feed_stop: int
    sub_start: int
    logit_rows: tuple[int, ...]
    candidates: tuple[bool, ...]


def plan_block_step(
    block: Sequence[int], sub_start: int, sub_block_size: int, first_step: bool, use_sub_block_cache: bool,
    mask_token_id: int,
) -> BlockStep:
    """What a step of the sub-block at `sub_start` feeds and reads (METHOD.md §3.2-3.3).

    Refresh (feed the whole block, rewrite its K/V) without the sub-block cache, on the first step
    of every sub-block, and whenever the sub-block's first offset is still masked (its logit comes
    from the offset before it). Otherwise feed only the sub-block: its first offset is known, so its
    token shift stays inside it.
    """
    sub_stop = sub_start + sub_block_size
    refresh = not use_sub_block_cache or first_step or block[sub_start] == mask_token_id
    feed_start, feed_stop = (0, len(block)) if refresh else (sub_start, sub_stop)
    # Token shift: offset p reads the logit of p-1. Offset feed_start has no predecessor in the feed
    # but is known (offset 0, or a cached step's decoded first offset): any row will do, it is no candidate.
    rows = tuple(max(p - 1, feed_start) - feed_start for p in range(sub_start, sub_stop))
    candidates = tuple(block[p] == mask_token_id for p in range(sub_start, sub_stop))
    return BlockStep(feed_start, feed_stop, sub_start, rows, candidates)


def apply_unmask(block: list[int], step: BlockStep, tokens: Sequence[int], selected: Sequence[bool]) -> int:
    """Write the selected predictions into the block (in place); returns how many were unmasked."""
    n = 0
    for i, (token, sel, cand) in enumerate(zip(tokens, selected, step.candidates)):
        if sel and cand:
            block[step.sub_start + i] = token
            n += 1
    return n


def new_block(known: Sequence[int], block_size: int, mask_token_id: int) -> list[int]:
    """A block opened with its known leading tokens, the rest masked."""
    return list(known) + [mask_token_id] * (block_size - len(known))


def decoded_prefix(block: Sequence[int], start: int, mask_token_id: int) -> list[int]:
    """The contiguous decoded tokens of `block` from offset `start` (they are final)."""
    out = []
    for token in block[start:]:
        if token == mask_token_id:
            break
        out.append(token)
    return out


@dataclass(frozen=True)
class StopCriteria:
    """When a request ends (METHOD.md §3.5): a stop token, a stop string, or max_new_tokens."""

    max_new_tokens: int
    stop_token_ids: Collection[int] = frozenset()
    stop: Sequence[str] = ()
    decode: Callable[[Sequence[int]], str] | None = None  # token ids -> text, for stop strings

    def check(self, output: Sequence[int], num_checked: int) -> tuple[int, str] | None:
        """(kept length, "stop"|"length") if the final tokens `output` end the request, else None.

        `output[:num_checked]` were checked before; the output is cut after the stop token, or after
        the token that completes a stop string.
        """
        for i in range(num_checked, len(output)):
            if output[i] in self.stop_token_ids:
                return i + 1, "stop"
        cut = self._stop_string_cut(output, num_checked)
        if cut is not None:
            return cut, "stop"
        if len(output) >= self.max_new_tokens:
            return self.max_new_tokens, "length"
        return None

    def _stop_string_cut(self, output: Sequence[int], num_checked: int) -> int | None:
        if not self.stop or len(output) == num_checked:
            return None
        if not any(s in self.decode(output) for s in self.stop):
            return None
        for n in range(max(num_checked, 1), len(output) + 1):  # the first token that completes one
            text = self.decode(output[:n])
            if any(s in text for s in self.stop):
                return n
        raise AssertionError("unreachable: the full output contains a stop string")

    def cut_text(self, text: str) -> str:
        """The output text, ending before the first stop string (OpenAI semantics)."""
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(ends)] if ends else text
