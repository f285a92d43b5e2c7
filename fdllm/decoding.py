"""The per-sequence decoding algorithm of docs/method.md §3 as small pure functions.

Tensor functions (confidence, sampling) run on the device over a whole step's candidate rows;
block functions (which sub-block, what to feed, which logit predicts which position) work on a
sequence's current block as a host list of token ids, `mask_token_id` where still masked.

Block coordinates: offsets 0..L-1 inside the current block. Offset 0 is always known (the prompt's
leftover tokens, or the token predicted by the previous block's last logit), so the token shift
(offset j takes the logits of offset j-1) never needs a logit from outside the block.

Shape legend: T logit rows, V vocab, B sequences, W logit rows per sequence (a sub-block).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import compress

import torch
from torch import Tensor

from fdllm.kernels.reference import suppress_mask


_U32 = 0xFFFFFFFF
_STOP_WINDOW_MARGIN = 8  # extra tokens decoded before a stop string's earliest possible start
# tokens a tail's start may step back to leave a character it starts inside: the character's other
# bytes (at most 3) are that many tokens back, more only past tokens that decode to nothing
_PARTIAL_CHAR_TOKENS = 8


def _mix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap, the low bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _U32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _U32
    return x ^ (x >> 16)


def counter_uniform(seed_R: Tensor, counter_R: Tensor) -> Tensor:
    """One uniform draw in (0, 1) per row [R] (fp32), a pure function of (seed, counter) int64 [R].

    A counter-based generator (the idea of Philox, a simpler hash): a request's draw depends on
    its own seed and on where it is in its own stream, never on which other requests share the
    step, how they are ordered, or which code path (bucketed or not) ran it.
    """
    key = _mix32((counter_R >> 32) & _U32)
    key = _mix32((counter_R & _U32) ^ key)
    key = _mix32(((seed_R >> 32) & _U32) ^ key)
    key = _mix32((seed_R & _U32) ^ key)
    # 23 bits plus the half need 24 significant bits: exact in fp32, so never 0 nor 1 (with 24 bits,
    # (2**24 - 1 + 0.5) rounds to 2**24 and the draw to exactly 1.0)
    return ((key >> 9).to(torch.float32) + 0.5) * 2.0**-23


def sample_confidence(
    logits_TV: Tensor, mask_token_id: int | None, temperature: float | Tensor, top_p: float | Tensor = 1.0,
    top_k: int | Tensor = 0, uniform_T: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled token [T] and its probability [T] under the temperature/top-k/top-p filtered distribution.

    Vectorised over rows: temperature/top_p/top_k are scalars or per-row tensors [T]; `uniform_T`
    holds one draw in (0, 1) per row (`counter_uniform`; None: torch.rand). The token is read off
    the filtered distribution's CDF in vocabulary order (inverse transform), so a row's token is a
    function of its own logits and draw only. No multinomial, no host sync; one sort of the rows,
    and only when a row filters by top-k or top-p.
    """
    T, V = logits_TV.shape
    device = logits_TV.device
    as_row = lambda x, dtype: torch.as_tensor(x, dtype=dtype, device=device).expand(T)  # noqa: E731
    temperature_T, top_p_T, top_k_T = as_row(temperature, torch.float32), as_row(top_p, torch.float32), as_row(
        top_k, torch.int64)
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    logits_TV = suppress_mask(logits_TV, mask_token_id) / temperature_T[:, None]
    if isinstance(top_p, Tensor) or isinstance(top_k, Tensor) or top_p < 1.0 or 0 < top_k < V:
        sorted_TV, order_TV = logits_TV.sort(-1, descending=True)
        probs_TV = sorted_TV.softmax(-1)
        rank_V = torch.arange(V, device=device)
        drop_TV = ((top_k_T[:, None] > 0) & (rank_V[None] >= top_k_T[:, None])) | (
            # the smallest set of most likely tokens whose mass reaches top_p (HF's and vLLM's nucleus)
            (top_p_T[:, None] < 1.0) & (probs_TV.cumsum(-1) - probs_TV >= top_p_T[:, None])
        )
        drop_TV[:, 0] = False  # the most likely token always stays
        logits_TV = logits_TV.scatter(-1, order_TV, sorted_TV.masked_fill(drop_TV, float("-inf")))
    probs_TV = logits_TV.softmax(-1)
    cdf_TV = probs_TV.cumsum(-1)
    if uniform_T is None:
        uniform_T = torch.rand(T, device=device)
    target_T1 = uniform_T[:, None].to(torch.float32) * cdf_TV[:, -1:]
    token_T = torch.searchsorted(cdf_TV, target_T1)[:, 0]  # first token whose CDF reaches it
    # Only a row whose logits are not finite (a NaN CDF) finds none. It has no distribution, so any
    # token will do but the last, which may be the suppressed mask (committed, a diffusion block would
    # never fill): token 0, or 1 where 0 is the mask. No pass over the row for a case that is garbage anyway.
    token_T = torch.where(token_T < V, token_T, int(mask_token_id == 0))
    return token_T, probs_TV.gather(-1, token_T[:, None])[:, 0]


def select_unmask(probs: Sequence[float], threshold: float, force: bool = True) -> list[bool]:
    """Which candidates of one work to unmask (host side, after the step's one transfer): every one
    whose probability exceeds `threshold`, and (`force`) always the most confident (the first on
    ties), so every step makes progress."""
    if not probs:
        return []
    chosen = [p > threshold for p in probs]
    if force:
        chosen[probs.index(max(probs))] = True  # index: the first of equal maxima
    return chosen


def token_entropy(logits_TV: Tensor, mask_token_id: int | None) -> Tensor:
    """Entropy H_i (nats, fp32) [T] of the model's distribution softmax(z_i) of each row, the mask
    token excluded (docs/method.md §5 notation), at temperature 1 whatever the request samples with."""
    probs_TV = suppress_mask(logits_TV, mask_token_id).softmax(-1)
    return torch.special.entr(probs_TV).sum(-1)  # entr(0) = 0: the suppressed mask adds nothing


def select_entropy_budget(entropies: Sequence[float], budget: float, force: bool = True) -> list[bool]:
    """Entropy-budget selection (EB-sampler style, docs/method.md §5), one work's candidates M: sort them
    by entropy H_i ascending (ties: the lower offset first) and commit the longest prefix whose summed
    entropy is at most `budget` (gamma); (`force`) always at least the first, so every step makes progress."""
    chosen = [False] * len(entropies)
    total = 0.0
    for rank, i in enumerate(sorted(range(len(entropies)), key=lambda i: (entropies[i], i))):
        total += entropies[i]
        if (rank or not force) and total > budget:
            break
        chosen[i] = True
    return chosen


def delimiter_stop(
    tokens: Sequence[int], probs: Sequence[float], candidates: Sequence[bool], sub_start: int, sub_stop: int,
    delimiter_ids: Collection[int], delimiter_threshold: float,
) -> int:
    """Adaptive sub-block boundary (AdaBlock's idea inside a block, docs/method.md §5): the end offset of
    the sub-block [sub_start, sub_stop) after this step's predictions.

    `tokens`/`probs`/`candidates` are per sub-block offset (row i predicts offset sub_start + i). When
    a still-masked offset is predicted as a delimiter with confidence c_i strictly above
    `delimiter_threshold`, the sub-block ends right after the first such offset (the next sub-block
    starts there); otherwise its end is unchanged.
    """
    for i, (token, prob, cand) in enumerate(zip(tokens, probs, candidates)):
        if cand and token in delimiter_ids and prob > delimiter_threshold and sub_start + i < sub_stop:
            return sub_start + i + 1
    return sub_stop


SELECTIONS = ("threshold", "entropy_budget")


@dataclass(frozen=True, kw_only=True)
class SelectionPolicy:
    """Which masked positions a denoising step commits, and where the current sub-block ends.

    In docs/method.md terms (M = the masked positions of the current sub-block, c_i = max p_i, H_i the
    entropy of p_i):
    - `selection="threshold"` (the paper's rule, §3.2, the default): commit every i in M with
      c_i > `threshold`, and always the most confident one;
    - `selection="entropy_budget"` (§5): sort M by H_i ascending and commit the longest prefix whose
      summed entropy is at most `entropy_budget` (gamma), always at least one; gamma replaces the threshold;
    - `delimiter_threshold` not None (§5, adaptive sub-block boundary, with either selection): when
      a token of `delimiter_ids` is predicted at a masked position of the current sub-block with
      c_i > `delimiter_threshold`, the sub-block ends after it and the next sub-block starts there
      (it spans sub_block_size positions from there, clipped to the block). A sub-block only shrinks;
      positions past its new end are not committed by this step and wait for the next sub-block.
    With sampling, the "predicted" token is the sampled one and c_i its probability (as §3.2).
    Speculative drafts (mode="speculative") use the selection rule only: a draft spans the rest of
    the block in one piece, so there is no sub-block boundary to move.
    """

    selection: str = "threshold"
    threshold: float = 0.9
    entropy_budget: float = 1.0
    delimiter_threshold: float | None = None  # None: fixed sub-blocks of sub_block_size
    delimiter_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")

    @property
    def needs_entropy(self) -> bool:
        """Whether a step must compute H_i of this policy's candidates."""
        return self.selection == "entropy_budget"

    @property
    def adaptive(self) -> bool:
        return self.delimiter_threshold is not None and bool(self.delimiter_ids)

    def select(self, probs: Sequence[float], entropies: Sequence[float] | None, force: bool = True) -> list[bool]:
        """Which of one work's candidates (their c_i, and H_i when `needs_entropy`) to commit; `force`:
        at least one (every step must make progress, except a block lookahead's, whose forward
        already settled the block's first token)."""
        if self.selection == "entropy_budget":
            return select_entropy_budget(entropies, self.entropy_budget, force)
        return select_unmask(probs, self.threshold, force)


def select_block_step(
    policy: SelectionPolicy, step: BlockStep, tokens: Sequence[int], probs: Sequence[float],
    entropies: Sequence[float] | None, force: bool = True,
) -> tuple[list[bool], int]:
    """One denoising step's decision under `policy`: (selected per logit row, the sub-block's stop).

    The boundary comes first (it may shrink the sub-block), then the selection runs over the
    candidates that are still inside it (`force`: `SelectionPolicy.select`'s).
    """
    stop = step.sub_stop
    if policy.adaptive:
        stop = delimiter_stop(tokens, probs, step.candidates, step.sub_start, stop, policy.delimiter_ids,
                              policy.delimiter_threshold)
    inside = list(compress(range(min(stop - step.sub_start, len(step.candidates))), step.candidates))
    chosen = policy.select([probs[i] for i in inside], None if entropies is None else [entropies[i] for i in inside],
                           force)
    selected = [False] * len(step.candidates)
    for i in compress(inside, chosen):
        selected[i] = True
    return selected, stop


def next_sub_block(
    block: Sequence[int], current: tuple[int, int] | None, sub_block_size: int, mask_token_id: int,
) -> tuple[int, int] | None:
    """The sub-block [start, stop) the next step decodes; None when the block has no mask left.

    `current`: the sub-block of the sequence's last step in this block (None: the block just opened).
    It continues while it has a masked offset; the next one starts where it stopped (which with
    fixed sub-blocks is the next multiple of sub_block_size) and spans sub_block_size offsets,
    clipped to the block. A block's first sub-block is the one of the sub_block_size grid holding its
    first masked offset (the leading offsets are known). Sub-blocks with nothing masked are skipped.
    Every masked offset is decoded, also past max_new_tokens: the limit cuts the output afterwards
    and never changes which positions compete for selection (docs/method.md §5, truncation).
    """
    if mask_token_id not in block:
        return None
    if current is None:
        first = block.index(mask_token_id)
        start = first - first % sub_block_size
    else:
        start, stop = current
        if mask_token_id in block[start:stop]:
            return current
        start = stop
    while start < len(block):
        stop = min(start + sub_block_size, len(block))
        if mask_token_id in block[start:stop]:
            return start, stop
        start = stop
    raise AssertionError("unreachable: every offset before the current sub-block is decoded")


@dataclass(frozen=True)
class BlockStep:
    """One denoising step of a sub-block: feed block offsets [feed_start, len(block)) or just the
    sub-block, and read `logit_rows[i]` (an index into the fed tokens) to predict offset sub_start+i."""

    feed_start: int
    feed_stop: int
    sub_start: int
    logit_rows: tuple[int, ...]
    candidates: tuple[bool, ...]

    @property
    def sub_stop(self) -> int:
        """One past the sub-block's last offset (one logit row per sub-block offset)."""
        return self.sub_start + len(self.logit_rows)


def plan_block_step(
    block: Sequence[int], sub_start: int, sub_block_size: int, first_step: bool, use_sub_block_cache: bool,
    mask_token_id: int, sub_stop: int | None = None,
) -> BlockStep:
    """What a step of the sub-block [sub_start, sub_stop) feeds and reads (docs/method.md §3.2-3.3).

    `sub_stop` None: sub_start + sub_block_size (fixed sub-blocks); an adaptive boundary
    (`SelectionPolicy.delimiter_threshold`) may end a sub-block earlier or start one off the grid.
    Refresh (feed the whole block, rewrite its K/V) without the sub-block cache, on the first step
    of every sub-block, and whenever the sub-block's first offset is still masked (its logit comes
    from the offset before it). Otherwise feed only the sub-block: its first offset is known, so its
    token shift stays inside it.
    """
    if sub_stop is None:
        sub_stop = sub_start + sub_block_size
    refresh = not use_sub_block_cache or first_step or block[sub_start] == mask_token_id
    feed_start, feed_stop = (0, len(block)) if refresh else (sub_start, sub_stop)
    # Token shift: offset p reads the logit of p-1. Offset feed_start has no predecessor in the feed
    # but is known (offset 0, or a cached step's decoded first offset): any row will do, it is no candidate.
    rows = (max(sub_start - 1, feed_start) - feed_start, *range(sub_start - feed_start, sub_stop - 1 - feed_start))
    candidates = tuple(map(mask_token_id.__eq__, block[sub_start:sub_stop]))
    return BlockStep(feed_start, feed_stop, sub_start, rows, candidates)


def opening_step(block_size: int, sub_block_size: int) -> BlockStep:
    """The first step of a block that its opening forward runs (SamplingParams.block_lookahead): the
    whole block is fed (every offset still masked, offset 0 too), the first sub-block's offsets are
    read, and offset 0, which the same forward settles, is no candidate."""
    return BlockStep(0, block_size, 0, (0, *range(sub_block_size - 1)), (False,) + (True,) * (sub_block_size - 1))


def apply_unmask(block: list[int], step: BlockStep, tokens: Sequence[int], selected: Sequence[bool]) -> None:
    """Write the selected predictions into the block (in place); never over a known offset."""
    for i in compress(range(len(selected)), selected):
        if step.candidates[i]:
            block[step.sub_start + i] = tokens[i]


def new_block(known: Sequence[int], block_size: int, mask_token_id: int) -> list[int]:
    """A block opened with its known leading tokens, the rest masked."""
    return list(known) + [mask_token_id] * (block_size - len(known))


def decoded_prefix(block: Sequence[int], start: int, mask_token_id: int) -> list[int]:
    """The contiguous decoded tokens of `block` from offset `start` (they are final)."""
    try:
        return block[start : block.index(mask_token_id, start)]
    except ValueError:  # no mask from `start` on
        return block[start:]


@dataclass(frozen=True)
class StopCriteria:
    """When a request ends (docs/method.md §3.5): a stop token, a stop string, or max_new_tokens."""

    max_new_tokens: int
    stop_token_ids: AbstractSet[int] = frozenset()
    stop: Sequence[str] = ()
    decode: Callable[[Sequence[int]], str] | None = None  # token ids -> text, for stop strings

    def check(self, output: Sequence[int], num_checked: int) -> tuple[int, str] | None:
        """(kept length, "stop"|"length") if the final tokens `output` end the request, else None.

        `output[:num_checked]` were checked before; the output is cut after the stop token, or after
        the token that completes a stop string. Tokens past max_new_tokens (a step may settle several)
        are never looked at: a stop among them is cut away with them ("length").
        """
        if len(output) > self.max_new_tokens:  # a copy only then: every step of every request checks
            output = output[: self.max_new_tokens]
        token_cut = None
        if not self.stop_token_ids.isdisjoint(output[num_checked:]):
            token_cut = next(i + 1 for i in range(num_checked, len(output)) if output[i] in self.stop_token_ids)
            output = output[:token_cut]  # a stop string completed before it, in the same step, ends the request first
        cut = self._stop_string_cut(output, num_checked)
        if cut is not None or token_cut is not None:
            return cut or token_cut, "stop"
        if len(output) == self.max_new_tokens:
            return self.max_new_tokens, "length"
        return None

    def _stop_string_cut(self, output: Sequence[int], num_checked: int) -> int | None:
        """The length after the first new token that completes a stop string, decoding only a tail.

        A stop string not found before must end in a new token, and its c characters are at most
        4c bytes, so the tokens that hold it start at most 4c + 1 tokens before `num_checked`
        (every token that decodes to text is at least one byte; `_tail_start` steps over those that
        decode to nothing). Decoding from a little further back (margin for
        tokenizers that drop a leading space of the first token) finds the same first stop as
        decoding the whole output, at O(new tokens) per step instead of O(output).
        """
        if not self.stop or len(output) == num_checked:
            return None
        start = self._tail_start(output, num_checked)
        if not any(s in self.decode(output[start:]) for s in self.stop):
            return None
        for n in range(max(num_checked, start + 1), len(output) + 1):  # the first token that completes one
            text = self.decode(output[start:n])
            if any(s in text for s in self.stop):
                return n
        raise AssertionError("unreachable: the decoded tail contains a stop string")

    def _tail_start(self, output: Sequence[int], num_checked: int) -> int:
        """Where `_stop_string_cut`'s tail starts: 4c + margin tokens before `num_checked`, further back
        (doubling) while those decode to fewer than c + margin characters. Tokens that decode to nothing
        (special tokens, which decoding skips; a padded vocabulary's unused ids) break the byte-a-token
        bound: a stop string split by 4c of them was missed, and the output ran on to "length" with the
        stop string in its text."""
        longest = max(map(len, self.stop))
        span = 4 * longest + _STOP_WINDOW_MARGIN
        start = max(0, num_checked - span)
        while start > 0 and len(self.decode(output[start:num_checked])) < longest + _STOP_WINDOW_MARGIN:
            span *= 2
            start = max(0, num_checked - span)
        # Nor may the tail start inside a character: its first bytes would decode to a U+FFFD the output's
        # text does not have, which a stop string holding U+FFFD matched. A token that starts with a UTF-8
        # continuation byte always decodes to U+FFFD first, so step back while the tail does (a real U+FFFD
        # there costs a few tokens more of tail).
        for _ in range(_PARTIAL_CHAR_TOKENS):
            if start == 0 or not self.decode(output[start:num_checked]).startswith("\ufffd"):
                break
            start -= 1
        return start

    def cut_text(self, text: str) -> str:
        """The output text, ending before the first stop string (OpenAI semantics)."""
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(ends)] if ends else text
