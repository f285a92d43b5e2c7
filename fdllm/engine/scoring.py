"""Causal log-probabilities of whole sequences (`Engine.score`), through prefill's own path.

Scoring is a prefill that reads every row's logits: the sequences are fed causally in forwards of
at most max_prefill_tokens tokens, each forward packing the next chunk of several sequences (one
causal row each, as a prefill step packs prompts), their K/V written into KV pages borrowed from the
free pool for the call and given back before the next step. So a batch of short sequences (an
lm-evaluation-harness batch of multiple-choice continuations) costs one forward, not one each, and
memory stays what the engine was sized for (`profile_peak_memory` covers a prefill chunk and the
head's chunk of logits). Continuations of one context compute its whole blocks once (`_siblings`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fdllm.cache import PageAllocator, block_hashes
from fdllm.engine.params import SequenceLogprobs
from fdllm.engine.runner import ModelRunner, ScoreRow


def score_pages(num_tokens: int, page_size: int) -> int:
    """KV pages the scoring of a sequence of `num_tokens` tokens borrows at most (its last token is fed
    nowhere: nothing after it is scored; cached leading blocks are shared instead of borrowed)."""
    return -(-(num_tokens - 1) // page_size)


def score_sequences(runner: ModelRunner, allocator: PageAllocator, sequences: list[list[int]], top_k: int,
                    page_size: int, max_tokens: int, score_from: list[int],
                    salts: list[str | None] | None = None) -> list[SequenceLogprobs]:
    """Each sequence's `SequenceLogprobs` from position `score_from[i]` on; the pages of all of them are
    borrowed at once (`fdllm.cache.OutOfPages` when the free pool is short).

    The logits that score position s come from position s - 1, so the K/V of the whole blocks before it
    are only read: those the prefix cache holds (the prompt of a request that just finished) are shared,
    held for the call, and fed nowhere. Within the call, a sequence that starts with the same blocks
    as an earlier one (lm-eval's continuations of one context) reads that one's pages and copies its
    log-probabilities there (`_Sibling`), so a shared context is computed once."""
    L = page_size
    salts = salts or [None] * len(sequences)  # each sequence's cache_salt: it reads only its salt's cached blocks
    hashes = [block_hashes(ids, L, True, (len(ids) - 1) // L, salt=salt) for ids, salt in zip(sequences, salts)]
    cached = [allocator.lookup(h[: (s - 1) // L]) if s < len(ids) else []
              for ids, s, h in zip(sequences, score_from, hashes)]
    if not allocator.reserve(0, [page for pages in cached for page in pages]):
        cached = [[] for _ in sequences]  # reservations leave no room to hold them: compute every block
    siblings = _siblings(sequences, hashes, score_from, L, [len(pages) for pages in cached])
    done = [(len(pages) if sib is None else sib.blocks) * L for pages, sib in zip(cached, siblings)]
    fed = [len(ids) - 1 if s < len(ids) else d for ids, s, d in zip(sequences, score_from, done)]
    tokens = [np.array(ids, dtype=np.int64) for ids in sequences]
    tables: list[list[np.ndarray]] = [[np.zeros((0, 1 + 2 * top_k))] for _ in sequences]
    needed = [score_pages(f + 1, L) - d // L if f > d else 0 for f, d in zip(fed, done)]
    try:
        with allocator.borrow(sum(needed)) as borrowed:
            ends = np.cumsum(needed).tolist()
            pages: list[list[int]] = []
            for i, (n, end) in enumerate(zip(needed, ends)):
                head = cached[i] if siblings[i] is None else pages[siblings[i].of][: siblings[i].blocks]
                pages.append(head + borrowed[end - n : end])
            start = list(done)
            while any(d < f for d, f in zip(done, fed)):
                # The next chunk of each unfinished sequence, in order, while the forward has room. Each
                # takes all it can, so a sequence fed at all comes after every earlier one has fed all
                # of its tokens (at the latest in this forward, whose K/V are written before any row
                # attends): the blocks it reads from a sibling are there.
                pieces, budget = [], max_tokens
                for i, (d, f) in enumerate(zip(done, fed)):
                    if d < f and budget:
                        take = min(f - d, budget)
                        pieces.append((i, d, d + take))
                        budget -= take
                table = runner.score([ScoreRow(tokens[i][a:b], a, pages[i], tokens[i][a + 1 : b + 1]) for i, a, b in pieces],
                                     top_k)
                offset = 0
                for i, a, b in pieces:
                    tables[i].append(table[offset : offset + b - a])
                    offset += b - a
                    done[i] = b
    finally:
        allocator.release([page for held in cached for page in held], 0)
    results: list[SequenceLogprobs] = []
    for ids, parts, s, first, sib in zip(sequences, tables, score_from, start, siblings):
        table = np.concatenate(parts)
        if sib is None or s > first:
            results.append(_logprobs(ids, table[s - first - 1 :], top_k, s))
        else:  # positions s..first scored by the sibling, from the same tokens
            own = _logprobs(ids, table, top_k, first + 1)
            copied = results[sib.of]
            results.append(SequenceLogprobs(
                token_ids=list(ids), logprobs=[None] * s + copied.logprobs[s : first + 1] + own.logprobs[first + 1 :],
                top_logprobs=[[] for _ in range(s)] + copied.top_logprobs[s : first + 1] + own.top_logprobs[first + 1 :],
            ))
    return results


class _Sibling(NamedTuple):
    """An earlier sequence of the same call whose first `blocks` blocks a sequence shares: it reads
    their K/V from that one's pages and takes its log-probabilities up to position blocks * L (the
    token there is the same too, so the logit before it scores the same target)."""

    of: int
    blocks: int


def _siblings(sequences: list[list[int]], hashes_of: list[list[bytes]], score_from: list[int], L: int,
              cached: list[int]) -> list[_Sibling | None]:
    """For each sequence, the earlier one it shares more leading blocks with than the prefix cache
    gives it (`cached`, in blocks), if any. The first sequence to compute a block owns it; a sequence
    shares only with one that scores at least the positions it will copy (score_from no later) and
    feeds them (it scores anything at all)."""
    owner: dict[bytes, int] = {}
    out: list[_Sibling | None] = []
    for i, (ids, hashes, s) in enumerate(zip(sequences, hashes_of, score_from)):
        blocks, of = 0, None
        for b, h in enumerate(hashes):
            j = owner.get(h)
            if j is None or score_from[j] > s:
                break
            blocks, of = b + 1, j
        if of is not None and (len(sequences[of]) <= blocks * L or sequences[of][blocks * L] != ids[blocks * L]):
            blocks -= 1  # the next token differs: the logit at the block's end scores another target
        out.append(_Sibling(of, blocks) if blocks > cached[i] and s < len(ids) else None)
        if s < len(ids):
            for h in hashes[blocks if out[-1] is not None else 0 :]:
                owner.setdefault(h, i)
    return out


def _logprobs(ids: list[int], table: np.ndarray, k: int, first: int) -> SequenceLogprobs:
    """A sequence's [T - first, 1 + 2k] table (`ModelRunner.score`, rows for positions first..T-1) as its
    `SequenceLogprobs`."""
    top_ids, top_values = table[:, 1 : 1 + k].astype(np.int64).tolist(), table[:, 1 + k :].tolist()
    return SequenceLogprobs(token_ids=list(ids), logprobs=[None] * first + table[:, 0].tolist(),
                            top_logprobs=[[] for _ in range(first)] + [list(zip(i, v)) for i, v in zip(top_ids, top_values)])
