"""The sub-block steps of many diffusion sequences at once, as array operations.

In a full batch most sequences are in the middle of a block, and their step is the plain sub-block
step of docs/method.md §3.2-3.3: the sub-block holding the block's first mask, fed alone (sub-block
cache) or with the whole block (refresh), its masked offsets committed by the threshold rule.
Planned, staged and applied one `Work` at a time, that costs ~20 us of Python per sequence per step;
`DenoiseBatch` stacks those sequences' blocks [N, L] and does the same with a fixed handful of
numpy operations (`fdllm.engine.array_batch`). Every other diffusion step (prefill, block commit,
entropy-budget or adaptive selection) stays a `Work`, and every kind runs in one forward.

It computes what `decoding.next_sub_block`, `plan_block_step`, `select_block_step` (threshold rule,
fixed sub-blocks) and `apply_unmask` compute one sequence at a time; tests hold the two paths
equal token for token. With fixed sub-blocks every offset before the current sub-block is decoded,
so the sub-block is the grid cell of the block's first mask.

Shape legend: N sequences, L block size, S sub-block size, C candidates (masked sub-block offsets);
`cand_NX` is [N, S].
"""

from __future__ import annotations

import numpy as np

from fdllm.engine.array_batch import ArrayBatch, stacked_blocks
from fdllm.engine.inputs import NO_ROWS, ROW_STREAM, StepInputs
from fdllm.engine.sequence import Sequence


class DenoiseBatch(ArrayBatch):
    """One step's sub-block steps of `seqs` (each `Sequence.batch_denoising`): planned on
    construction, staged by `inputs`, applied by `apply` once the forward's results are in."""

    def __init__(self, seqs: list[Sequence]) -> None:
        super().__init__(seqs)
        first = seqs[0]
        L, S, mask = first.block_size, first.sub_block_size, first.mask_token_id
        N = len(seqs)
        self.sub_block_size = S
        # one pass over the sequences; the previous sub-block is the one its last step decoded (-1: none yet in this block)
        blocks, block_starts, previous, thresholds, pages = zip(*[
            (s.block, s.block_start, -1 if s.sub is None else s.sub[0], s.policy.threshold, s.pages) for s in seqs
        ])
        self.block_NL = stacked_blocks(blocks, L)
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
        self.cand_NX = masked_NL[n_N[:, None], self.offset_NS]
        candidates = ((np.cumsum(feed_len_N) - feed_len_N)[:, None] + row_NS)[self.cand_NX]
        self.inputs = StepInputs(
            ids=self.block_NL[fed_NL], starts=self.block_start_N + feed_start_N, q_lens=feed_len_N,
            kv_lens=self.block_start_N + L, causal=np.zeros(N, dtype=bool), pages=list(pages), prefill=False,
            max_q_len=int(feed_len_N.max()), max_pages=max(map(len, pages)), any_causal=False,
            candidates=candidates, entropy=NO_ROWS, sampled=self.sampling(), biased=self.biasing(),
        )

    def counter_NX(self, picked: list[int]) -> np.ndarray:
        """A diffusion row draws by its request's decode step and its offset in the sub-block."""
        steps_N = np.zeros(len(self.seqs), dtype=np.int64)
        steps_N[picked] = [self.seqs[i].num_decode_steps for i in picked]
        return steps_N[:, None] * ROW_STREAM + np.arange(self.sub_block_size)

    def position_NX(self) -> np.ndarray:
        """Offset i of the sub-block predicts position block start + sub-block start + i."""
        return self.block_start_N[:, None] + self.offset_NS

    def apply(self) -> None:
        """Commit what the threshold rule selects from the forward's predictions (`tokens`, `probs`:
        per candidate, in the order of `inputs.candidates`): every candidate above its request's
        threshold, and always the most confident (the first of equal ones); then the blocks,
        sub-blocks and forward counts go back to the sequences. Settling the new tokens
        (`Sequence.settle`) of the sequences in `settling` is the caller's, one request at a time."""
        S, N = self.sub_block_size, len(self.seqs)
        token_NS = np.zeros(self.cand_NX.shape, dtype=np.int64)
        token_NS[self.cand_NX] = self.tokens
        prob_NS = np.full(self.cand_NX.shape, -np.inf)
        prob_NS[self.cand_NX] = self.probs
        best_N = prob_NS.argmax(1)
        selected_NS = self.cand_NX & ((prob_NS > self.threshold_N[:, None]) | (np.arange(S) == best_N[:, None]))
        n, i = np.nonzero(selected_NS)
        self.block_NL[n, self.offset_NS[n, i]] = token_NS[n, i]
        for seq, block, start in zip(self.seqs, self.block_NL.tolist(), self.sub_start_N.tolist()):
            seq.block, seq.sub = block, (start, start + S)
            seq.num_forwards += 1
            seq.num_decode_steps += 1
        # the decoded prefix ends at the first mask: it grows when that offset is committed
        grew_N = selected_NS[np.arange(N), self.first_mask_N - self.sub_start_N]
        self.settling = [self.seqs[i] for i in np.flatnonzero(grew_N).tolist()]
