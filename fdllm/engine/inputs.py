"""A step's inputs as flat host arrays: what the model runner lays out, stages and reads back.

The scheduler hands over one `Work` per sequence; `StepInputs.from_works` gathers them in a single
pass into arrays (attention rows, fed tokens, the candidate rows the LM head reads and their
sampling parameters), so the runner's layout (static entries or packed tokens, cache slots, block
tables) is a fixed handful of numpy operations whatever the batch, instead of a loop per row.

Shape legend: N fed tokens (every row's, back to back), R attention rows, C candidate rows,
S sampled rows (C ⊇ S), E entropy rows (C ⊇ E), M pages per block table.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fdllm.engine.sequence import Work

_ROW_STREAM = 1 << 12  # counter = forwards * _ROW_STREAM + logit row: one draw per row per forward


@dataclass
class StepInputs:
    """Everything one step feeds and reads. Rows are `fdllm.cache.AttentionRow`s split into arrays,
    in order; `ids` holds their fed tokens back to back."""

    ids: np.ndarray  # [N] int64
    starts: np.ndarray  # [R] position of each row's first query
    q_lens: np.ndarray  # [R]
    kv_lens: np.ndarray  # [R]
    causal: np.ndarray  # [R] bool
    pages: list[Sequence[int]]  # [R] the pages of each row's sequence
    prefill: bool  # some row writes prompt K/V for good (the step runs the packed layout)
    candidates: np.ndarray  # [C] index into `ids` of each token whose logits the head reads
    entropy: np.ndarray  # [E] index into the candidates of those whose entropy H_i is needed
    sampled: np.ndarray  # [S] index into the candidates of those sampled (temperature > 0)
    temperature: np.ndarray  # [S] float64
    top_p: np.ndarray  # [S] float64
    top_k: np.ndarray  # [S] int64
    seed: np.ndarray  # [S] int64, the request's seed as int64
    counter: np.ndarray  # [S] int64, where the row's draw sits in its request's stream

    @classmethod
    def from_works(cls, works: list[Work]) -> tuple[StepInputs, list[list[int]]]:
        """The step's inputs, and per work the logit rows that are candidates (in the order their
        results come back)."""
        ids: list[int] = []
        starts, q_lens, kv_lens, causal, pages = [], [], [], [], []
        cands, entropy, sampled = [], [], []
        temperature, top_p, top_k, seed, counter = [], [], [], [], []
        candidate_rows, prefill = [], False
        for w in works:
            base = len(ids)
            ids += w.token_ids
            pos = w.start
            for q_len, kv_len, row_pages, row_causal in w.rows:
                starts.append(pos)
                q_lens.append(q_len)
                kv_lens.append(kv_len)
                causal.append(row_causal)
                pages.append(row_pages)
                pos += q_len
            prefill = prefill or w.num_prefill > 0
            rows = list(itertools.compress(range(len(w.candidates)), w.candidates))
            candidate_rows.append(rows)
            if not rows:
                continue
            first, logit_rows = len(cands), w.logit_rows
            cands += [base + logit_rows[r] for r in rows]
            if w.needs_entropy:
                entropy += range(first, len(cands))
            sampled_rows = w.sampled_rows
            if sampled_rows:
                p, forwards = w.seq.params, w.seq.num_forwards
                for c, r in enumerate(rows, first):
                    if r in sampled_rows:
                        sampled.append(c)
                        temperature.append(p.temperature)
                        top_p.append(p.top_p)
                        top_k.append(p.top_k)
                        seed.append(p.seed & 0x7FFFFFFFFFFFFFFF)
                        counter.append(forwards * _ROW_STREAM + r)
        i64 = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
        f64 = lambda xs: np.array(xs, dtype=np.float64)  # noqa: E731
        inputs = cls(i64(ids), i64(starts), i64(q_lens), i64(kv_lens), np.array(causal, dtype=bool), pages, prefill,
                     i64(cands), i64(entropy), i64(sampled), f64(temperature), f64(top_p), i64(top_k), i64(seed),
                     i64(counter))
        return inputs, candidate_rows

    @property
    def row_tokens(self) -> np.ndarray:
        """[R] index into `ids` of each row's first token."""
        return np.cumsum(self.q_lens) - self.q_lens

    def page_table(self, width: int) -> np.ndarray:
        """[R, width] each row's pages, -1 past its last."""
        lens = np.fromiter(map(len, self.pages), np.int64, len(self.pages))
        table = np.full((len(self.pages), width), -1, dtype=np.int64)
        total = int(lens.sum())
        cols = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        table[np.repeat(np.arange(len(lens)), lens), cols] = np.fromiter(itertools.chain.from_iterable(self.pages),
                                                                        np.int64, total)
        return table


def cache_slots(table_XM: np.ndarray, positions_XQ: np.ndarray, page_size: int) -> np.ndarray:
    """Flat cache slots (page * page_size + offset) of tokens at `positions`, each row of `table`
    the pages of the tokens in the same row of `positions`. Positions past the table read its last
    column (padding: the caller overwrites their slots)."""
    page_XQ = np.minimum(positions_XQ // page_size, table_XM.shape[1] - 1)
    return np.take_along_axis(table_XM, page_XQ, axis=1) * page_size + positions_XQ % page_size
