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
from dataclasses import dataclass, fields

import numpy as np

from fdllm.cache import page_table
from fdllm.engine.adjustments import NO_ADJUSTMENTS, Adjustments, AdjustmentsBuilder
from fdllm.engine.params import SamplingParams
from fdllm.engine.sequence import Work

ROW_STREAM = 1 << 12  # diffusion: counter = Sequence.num_decode_steps * ROW_STREAM + logit row (`draw_counter`)


def draw_counter(work: Work, r: int) -> int:
    """Where logit row r's draw is in its request's stream (`decoding.counter_uniform`). A causal row
    (AR, a speculative verify or prefill) draws by the position of the token it samples, so every
    position has one draw whatever forward samples it: a speculative request then samples AR's own
    tokens for its seed (a verify commits its sampled tokens; the rows a rejection discards decided
    nothing), with or without lookahead, whatever runs beside it. A diffusion step draws by the
    request's decode step and the row (positions are decoded over several steps)."""
    if work.seq.is_causal:
        return work.start + work.logit_rows[r] + 1
    return work.seq.num_decode_steps * ROW_STREAM + r


def stream_seed(params: SamplingParams) -> int:
    """A sampling request's seed as the int64 its counter-based draws take (`decoding.counter_uniform`):
    its 64 bits in two's complement, so no two seeds of SEED_RANGE share a stream unless equal mod 2**64."""
    return (params.seed + 2**63) % 2**64 - 2**63


@dataclass(frozen=True)
class SampledRows:
    """The candidates that are sampled (temperature > 0), with their requests' parameters."""

    rows: np.ndarray  # [S] index into the step's candidates
    temperature: np.ndarray  # [S] float64
    top_p: np.ndarray  # [S] float64
    top_k: np.ndarray  # [S] int64
    seed: np.ndarray  # [S] int64, the request's seed as int64
    counter: np.ndarray  # [S] int64, where the row's draw sits in its request's stream

    def __len__(self) -> int:
        return len(self.rows)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field by name (the sections the runner stages, in this order)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def join(self, other: SampledRows, shift: int) -> SampledRows:
        """These rows, then `other`'s moved `shift` candidates further (the candidates before them)."""
        if not len(other):
            return self
        theirs = other.arrays() | {"rows": other.rows + shift}
        return SampledRows(**{name: np.concatenate([mine, theirs[name]]) for name, mine in self.arrays().items()})


@dataclass(frozen=True)
class BiasedRows:
    """The candidates of requests that adjust their logits (`SamplingParams.adjusts_logits`: a logit
    bias, penalties, min_tokens): their tokens are decided from their logits adjusted
    (`fdllm.engine.adjustments`), greedy where its temperature is 0, else drawn as a sampled row is,
    not in the greedy or sampled paths."""

    draws: SampledRows  # [B] the rows (index into the step's candidates) and their parameters
    adjust: Adjustments  # [B] how each row adjusts its logits

    def __len__(self) -> int:
        return len(self.draws)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name (the sections the runner stages)."""
        return {f"bias_{name}": a for name, a in self.draws.arrays().items()} | {
            f"adj_{name}": a for name, a in self.adjust.arrays().items()}

    def join(self, other: BiasedRows, shift: int) -> BiasedRows:
        """These rows, then `other`'s moved `shift` candidates further (the candidates before them)."""
        if not len(other):
            return self
        return BiasedRows(self.draws.join(other.draws, shift), self.adjust.join(other.adjust))


NO_ROWS = np.zeros(0, dtype=np.int64)  # shared: never written to
NO_SAMPLED = SampledRows(NO_ROWS, np.zeros(0), np.zeros(0), NO_ROWS, NO_ROWS, NO_ROWS)
NO_BIASED = BiasedRows(NO_SAMPLED, NO_ADJUSTMENTS)


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
    # What the layout decides on, as Python values (a numpy reduction costs more than the loop that
    # gathers them, at small batches): the longest row, the most pages, whether some row is causal.
    max_q_len: int
    max_pages: int
    any_causal: bool
    candidates: np.ndarray  # [C] index into `ids` of each token whose logits the head reads
    entropy: np.ndarray  # [E] index into the candidates of those whose entropy H_i is needed
    sampled: SampledRows  # [S]
    biased: BiasedRows = NO_BIASED  # [B] (disjoint from the sampled rows)

    @classmethod
    def from_works(cls, works: list[Work]) -> tuple[StepInputs, list[list[int]]]:
        """The step's inputs, and per work the logit rows that are candidates (in the order their
        results come back)."""
        ids: list[int] = []
        rows_R4, pages = [], []  # per row: start, q_len, kv_len, causal (flat, one conversion)
        cands, entropy = [], []
        sampled, biased = _Draws(), _Draws()
        adjust = AdjustmentsBuilder()
        candidate_rows, prefill = [], False
        for w in works:
            base = len(ids)
            ids += w.token_ids
            pos = w.start
            for q_len, kv_len, row_pages, row_causal in w.rows:
                rows_R4 += (pos, q_len, kv_len, row_causal)
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
            if w.seq.params.adjusts_logits:  # every candidate, greedy or sampled, decided from adjusted logits
                adjust.add(w.seq, [w.start + logit_rows[r] + 1 for r in rows])  # the token shift
                for c, r in enumerate(rows, first):
                    biased.add(c, w, r, sampled=r in sampled_rows)
            elif sampled_rows:
                for c, r in enumerate(rows, first):
                    if r in sampled_rows:
                        sampled.add(c, w, r, sampled=True)
        starts, q_lens, kv_lens, causal = _i64(rows_R4).reshape(-1, 4).T
        inputs = cls(_i64(ids), starts, q_lens, kv_lens, causal.astype(bool), pages, prefill,
                     max(rows_R4[1::4], default=0), max(map(len, pages), default=0), any(rows_R4[3::4]), _i64(cands),
                     _i64(entropy) if entropy else NO_ROWS, sampled.rows_and_parameters(),
                     BiasedRows(biased.rows_and_parameters(), adjust.build()))
        return inputs, candidate_rows

    @classmethod
    def concat(cls, parts: list[StepInputs]) -> StepInputs:
        """One step's inputs: the parts in order (each one's indices moved past those before it)."""
        parts = [p for p in parts if len(p.q_lens)] or parts[:1]  # parts without rows add nothing
        if len(parts) == 1:
            return parts[0]
        shift_N = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
        shift_C = np.cumsum([0] + [len(p.candidates) for p in parts[:-1]]).tolist()

        def cat(name: str, shifts=None) -> np.ndarray:
            arrays = [getattr(p, name) for p in parts]
            return np.concatenate(arrays if shifts is None else [a + k for a, k in zip(arrays, shifts)])

        sampled, biased = parts[0].sampled, parts[0].biased
        for p, k in zip(parts[1:], shift_C[1:]):
            sampled, biased = sampled.join(p.sampled, shift=k), biased.join(p.biased, shift=k)
        return cls(
            cat("ids"), cat("starts"), cat("q_lens"), cat("kv_lens"), cat("causal"), [r for p in parts for r in p.pages],
            any(p.prefill for p in parts), max(p.max_q_len for p in parts), max(p.max_pages for p in parts),
            any(p.any_causal for p in parts), cat("candidates", shift_N), cat("entropy", shift_C), sampled, biased,
        )

    @property
    def row_tokens(self) -> np.ndarray:
        """[R] index into `ids` of each row's first token."""
        return np.cumsum(self.q_lens) - self.q_lens

    def page_table(self, width: int) -> np.ndarray:
        """[R, width] each row's pages, -1 past its last."""
        return page_table(self.pages, width)


def _i64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class _Draws:
    """Candidate rows and their sampling parameters as `StepInputs.from_works` gathers them."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.temperature: list[float] = []
        self.top_p: list[float] = []
        self.top_k: list[int] = []
        self.seed: list[int] = []
        self.counter: list[int] = []

    def add(self, candidate: int, work: Work, r: int, sampled: bool) -> None:
        """Candidate `candidate`, the work's logit row r: sampled with its request's parameters, or greedy
        (temperature 0)."""
        p = work.seq.params
        self.rows.append(candidate)
        self.temperature.append(p.temperature if sampled else 0.0)
        self.top_p.append(p.top_p)
        self.top_k.append(p.top_k)
        self.seed.append(stream_seed(p) if sampled else 0)
        self.counter.append(draw_counter(work, r) if sampled else 0)

    def rows_and_parameters(self) -> SampledRows:
        if not self.rows:
            return NO_SAMPLED
        return SampledRows(_i64(self.rows), np.array(self.temperature), np.array(self.top_p), _i64(self.top_k),
                           _i64(self.seed), _i64(self.counter))


def cache_slots(table_RM: np.ndarray, positions_XQ: np.ndarray, page_size: int, rows_X: np.ndarray | None = None) -> np.ndarray:
    """Flat cache slots (page * page_size + offset) of tokens at `positions`: row x of `positions` reads
    the pages of table row `rows_X[x]` (default: row x itself). Positions past the table read its last
    column (padding: the caller overwrites their slots)."""
    page_XQ, offset_XQ = np.divmod(positions_XQ, page_size)
    np.minimum(page_XQ, table_RM.shape[1] - 1, out=page_XQ)
    rows_X = np.arange(len(positions_XQ)) if rows_X is None else rows_X
    return table_RM[rows_X[:, None], page_XQ] * page_size + offset_XQ
