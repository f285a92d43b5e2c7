"""The sub-block steps of many diffusion sequences at once, as array operations.

In a full batch most sequences are in the middle of a block, and their step is the plain sub-block
step of docs/method.md §3.2-3.3: the sub-block holding the block's first mask, fed alone (sub-block
cache) or with the whole block (refresh), its masked offsets committed by the threshold rule.
Planned, staged and applied one `Work` at a time, that costs ~20 us of Python per sequence per step
(over a millisecond at 64 sequences: as much as a 1.5B model's whole forward on a GPU).
`DenoiseBatch` stacks those sequences' blocks [N, L] and does the same with a fixed handful of
numpy operations (vLLM's persistent-batch idea applied to Fast-dLLM v2's step); what stays per
sequence is what is per request anyway: its pages and the tokens that settle (stop checks,
streaming). Every other step (prefill, block commit, AR and speculative, entropy-budget or adaptive
selection) stays a `Work`, and both kinds run in one forward.

It computes what `decoding.next_sub_block`, `plan_block_step`, `select_block_step` (threshold rule,
fixed sub-blocks) and `apply_unmask` compute one sequence at a time; tests hold the two paths
equal token for token. With fixed sub-blocks every offset before the current sub-block is decoded,
so the sub-block is the grid cell of the block's first mask.

Shape legend: N sequences, L block size, S sub-block size, C candidates (masked sub-block offsets).
"""

from __future__ import annotations

import itertools

import numpy as np

from fdllm.engine.adjustments import AdjustmentsBuilder
from fdllm.engine.inputs import NO_BIASED, NO_ROWS, NO_SAMPLED, ROW_STREAM, BiasedRows, SampledRows, StepInputs, stream_seed
from fdllm.engine.sequence import Sequence


class DenoiseBatch:
    """One step's sub-block steps of `seqs` (each `Sequence.batch_denoising`): planned on
    construction, staged by `inputs`, applied by `apply` once the forward's results are in."""

    def __init__(self, seqs: list[Sequence]) -> None:
        first = seqs[0]
        L, S, mask = first.block_size, first.sub_block_size, first.mask_token_id
        N = len(seqs)
        self.seqs, self.sub_block_size = seqs, S
        # the forward's results per candidate, in the order of `inputs.candidates` (ModelRunner.run)
        self.tokens: np.ndarray | list[float] = NO_ROWS
        self.probs: np.ndarray | list[float] = NO_ROWS
        self.settling: list[Sequence] = []  # after `apply`: the sequences whose decoded prefix grew
        # one pass over the sequences; the previous sub-block is the one its last step decoded (-1: none yet in this block)
        blocks, block_starts, previous, thresholds, pages = zip(*[
            (s.block, s.block_start, -1 if s.sub is None else s.sub[0], s.policy.threshold, s.pages) for s in seqs
        ])
        self.block_NL = np.fromiter(itertools.chain.from_iterable(blocks), dtype=np.int64, count=N * L).reshape(N, L)
        self.block_start_N, previous_N = np.array(block_starts, dtype=np.int64), np.array(previous, dtype=np.int64)
        self.threshold_N = np.array(thresholds, dtype=np.float64)
        masked_NL = self.block_NL == mask
        n_N = np.arange(N)
        self.first_mask_N = masked_NL.argmax(1)  # every block here has one; the offsets before it are settled
        self.sub_start_N = self.first_mask_N - self.first_mask_N % S
        # refresh: no sub-block cache, the sub-block's first step, or its first offset still masked
        refresh_N = (self.sub_start_N != previous_N) | masked_NL[n_N, self.sub_start_N] | (not first.use_sub_block_cache)
        feed_start_N = np.where(refresh_N, 0, self.sub_start_N)
        feed_len_N = np.where(refresh_N, L, S)
        cols_L = np.arange(L)
        fed_NL = (cols_L >= feed_start_N[:, None]) & (cols_L < (feed_start_N + feed_len_N)[:, None])
        # offset sub_start + i takes the logits of the fed row before it (the token shift); the first
        # fed offset is known, any row will do
        self.offset_NS = self.sub_start_N[:, None] + np.arange(S)
        row_NS = np.maximum(self.offset_NS - 1, feed_start_N[:, None]) - feed_start_N[:, None]
        self.cand_NS = masked_NL[n_N[:, None], self.offset_NS]
        candidates = ((np.cumsum(feed_len_N) - feed_len_N)[:, None] + row_NS)[self.cand_NS]
        self.inputs = StepInputs(
            ids=self.block_NL[fed_NL], starts=self.block_start_N + feed_start_N, q_lens=feed_len_N,
            kv_lens=self.block_start_N + L, causal=np.zeros(N, dtype=bool), pages=list(pages), prefill=False,
            max_q_len=int(feed_len_N.max()), max_pages=max(map(len, pages)), any_causal=False,
            candidates=candidates, entropy=NO_ROWS, sampled=self._sampling(), biased=self._biasing(),
        )

    def _sampling(self) -> SampledRows:
        """The sampled candidates (every candidate of a request with temperature > 0, as
        `Work.sampled_rows`) of requests that take their logits as the model gives them."""
        return self._draws([i for i, s in enumerate(self.seqs)
                            if s.params.temperature > 0 and not s.params.adjusts_logits])

    def _biasing(self) -> BiasedRows:
        """Every candidate of the requests that adjust their logits (`StepInputs.biased`), greedy or
        sampled, with how each row adjusts them: it predicts position block start + offset."""
        picked = [i for i, s in enumerate(self.seqs) if s.params.adjusts_logits]
        if not picked:
            return NO_BIASED
        adjust = AdjustmentsBuilder()
        for i in picked:
            adjust.add(self.seqs[i], (self.block_start_N[i] + self.offset_NS[i][self.cand_NS[i]]).tolist())
        return BiasedRows(self._draws(picked), adjust.build())

    def _draws(self, picked: list[int]) -> SampledRows:
        """The candidates of the sequences `picked` and their draws' parameters: a row's draw is the
        logit row's place in its request's stream; a greedy request's rows draw nothing (temperature 0)."""
        if not picked:
            return NO_SAMPLED
        S = self.sub_block_size
        rows_NS = np.zeros_like(self.cand_NS)
        rows_NS[picked] = self.cand_NS[picked]
        params = [self.seqs[i].params for i in picked]

        def per_row(values: list, dtype) -> np.ndarray:  # one value per picked request -> per row
            full_N = np.zeros(len(self.seqs), dtype=dtype)
            full_N[picked] = values
            return np.broadcast_to(full_N[:, None], rows_NS.shape)[rows_NS]

        sampled = per_row([p.temperature > 0 for p in params], bool)
        steps = per_row([self.seqs[i].num_decode_steps for i in picked], np.int64)
        row = np.broadcast_to(np.arange(S), rows_NS.shape)[rows_NS]
        return SampledRows(
            rows=np.flatnonzero(rows_NS[self.cand_NS]),
            temperature=per_row([p.temperature for p in params], np.float64),
            top_p=per_row([p.top_p for p in params], np.float64),
            top_k=per_row([p.top_k for p in params], np.int64),
            seed=per_row([stream_seed(p) if p.temperature > 0 else 0 for p in params], np.int64),
            counter=np.where(sampled, steps * ROW_STREAM + row, 0),
        )

    def apply(self) -> None:
        """Commit what the threshold rule selects from the forward's predictions (`tokens`, `probs`:
        per candidate, in the order of `inputs.candidates`): every candidate above its request's
        threshold, and always the most confident (the first of equal ones); then the blocks,
        sub-blocks and forward counts go back to the sequences. Settling the new tokens
        (`Sequence.settle`) of the sequences in `settling` is the caller's, one request at a time."""
        S, N = self.sub_block_size, len(self.seqs)
        token_NS = np.zeros(self.cand_NS.shape, dtype=np.int64)
        token_NS[self.cand_NS] = self.tokens
        prob_NS = np.full(self.cand_NS.shape, -np.inf)
        prob_NS[self.cand_NS] = self.probs
        best_N = prob_NS.argmax(1)
        selected_NS = self.cand_NS & ((prob_NS > self.threshold_N[:, None]) | (np.arange(S) == best_N[:, None]))
        n, i = np.nonzero(selected_NS)
        self.block_NL[n, self.offset_NS[n, i]] = token_NS[n, i]
        for seq, block, start in zip(self.seqs, self.block_NL.tolist(), self.sub_start_N.tolist()):
            seq.block, seq.sub = block, (start, start + S)
            seq.num_forwards += 1
            seq.num_decode_steps += 1
        # the decoded prefix ends at the first mask: it grows when that offset is committed
        grew_N = selected_NS[np.arange(N), self.first_mask_N - self.sub_start_N]
        self.settling = [self.seqs[i] for i in np.flatnonzero(grew_N).tolist()]
