"""Causal log-probabilities of whole sequences (`Engine.score`), through prefill's own path.

Scoring is a prefill that reads every row's logits: the sequences are fed causally in forwards of
at most max_prefill_tokens tokens, each forward packing the next chunk of several sequences (one
causal row each, as a prefill step packs prompts), their K/V written into KV pages borrowed from the
free pool for the call and given back before the next step. So a batch of short sequences (an
lm-evaluation-harness batch of multiple-choice continuations) costs one forward, not one each, and
memory stays what the engine was sized for (`profile_peak_memory` covers a prefill chunk and the
head's chunk of logits).
"""

from __future__ import annotations

import numpy as np

from fdllm.cache import PageAllocator, block_hashes
from fdllm.engine.params import SequenceLogprobs
from fdllm.engine.runner import ModelRunner, ScoreRow


def score_pages(num_tokens: int, page_size: int) -> int:
    """KV pages the scoring of a sequence of `num_tokens` tokens borrows at most (its last token is fed
    nowhere: nothing after it is scored; cached leading blocks are shared instead of borrowed)."""
    return -(-(num_tokens - 1) // page_size)


def score_sequences(runner: ModelRunner, allocator: PageAllocator, sequences: list[list[int]], top_k: int,
                    page_size: int, max_tokens: int, score_from: list[int]) -> list[SequenceLogprobs]:
    """Each sequence's `SequenceLogprobs` from position `score_from[i]` on; the pages of all of them are
    borrowed at once (`fdllm.cache.OutOfPages` when the free pool is short).

    The logits that score position s come from position s - 1, so the K/V of the whole blocks before it
    are only read: those the prefix cache holds (the prompt of a request that just finished) are shared,
    held for the call, and fed nowhere."""
    L = page_size
    shared = [allocator.lookup(block_hashes(ids, L, True, (s - 1) // L)) if s < len(ids) else []
              for ids, s in zip(sequences, score_from)]
    if not allocator.reserve(0, [page for pages in shared for page in pages]):
        shared = [[] for _ in sequences]  # reservations leave no room to hold them: compute every block
    done = [len(pages) * L for pages in shared]
    fed = [len(ids) - 1 if s < len(ids) else d for ids, s, d in zip(sequences, score_from, done)]
    tokens = [np.array(ids, dtype=np.int64) for ids in sequences]
    tables: list[list[np.ndarray]] = [[np.zeros((0, 1 + 2 * top_k))] for _ in sequences]
    needed = [score_pages(f + 1, L) - len(pages) if f > d else 0 for f, d, pages in zip(fed, done, shared)]
    try:
        with allocator.borrow(sum(needed)) as borrowed:
            ends = np.cumsum(needed).tolist()
            pages = [held + borrowed[end - n : end] for held, n, end in zip(shared, needed, ends)]
            start = list(done)
            while any(d < f for d, f in zip(done, fed)):
                pieces, budget = [], max_tokens  # the next chunk of each unfinished sequence, while the forward has room
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
        allocator.release([page for held in shared for page in held], 0)
    return [_logprobs(ids, np.concatenate(parts)[s - first - 1 :], top_k, s)
            for ids, parts, s, first in zip(sequences, tables, score_from, start)]


def _logprobs(ids: list[int], table: np.ndarray, k: int, first: int) -> SequenceLogprobs:
    """A sequence's [T - first, 1 + 2k] table (`ModelRunner.score`, rows for positions first..T-1) as its
    `SequenceLogprobs`."""
    top_ids, top_values = table[:, 1 : 1 + k].astype(np.int64).tolist(), table[:, 1 + k :].tolist()
    return SequenceLogprobs(token_ids=list(ids), logprobs=[None] * first + table[:, 0].tolist(),
                            top_logprobs=[[] for _ in range(first)] + [list(zip(i, v)) for i, v in zip(top_ids, top_values)])
