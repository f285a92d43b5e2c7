"""The block commits of many diffusion sequences at once, as array operations.

A diffusion request whose current block has no mask left commits it (docs/method.md §3.2): one
forward over the clean block writes its exact K/V (block-causal, or causal for a checkpoint whose
clean stream attends causally) and the block's last logit gives the argmax token that opens the next
block. That step is the same for every such sequence, so `CommitBatch` plans it for all of them
with a few numpy operations (`fdllm.engine.array_batch`) instead of one `Work` each; a commit that
also runs the next block's first step (`SamplingParams.block_lookahead`) stays a `Work`. It computes
what `Sequence._diffusion_work`'s commit, `StepInputs.from_works` and `Sequence.apply` compute one
sequence at a time; tests hold the two paths equal token for token.
"""

from __future__ import annotations

import numpy as np

from fdllm.decoding import new_block
from fdllm.engine.array_batch import ArrayBatch, stacked_blocks
from fdllm.engine.inputs import NO_ROWS, StepInputs
from fdllm.engine.sequence import Sequence


class CommitBatch(ArrayBatch):
    """One step's block commits of `seqs` (each `Sequence.batch_commit`): planned on construction,
    staged by `inputs`, applied by `apply` once the forward's results are in. One candidate per
    sequence, its block's last row; always the argmax (a commit's token opens a block)."""

    draws_sample = False

    def __init__(self, seqs: list[Sequence]) -> None:
        super().__init__(seqs)
        L, N = seqs[0].block_size, len(seqs)
        blocks, starts, causal, pages = zip(*[(s.block, s.block_start, s.causal_prefix, s.pages) for s in seqs])
        self.start_N = np.array(starts, dtype=np.int64)
        self.cand_NX = np.ones((N, 1), dtype=bool)
        causal_N = np.array(causal, dtype=bool)
        self.inputs = StepInputs(
            ids=stacked_blocks(blocks, L).reshape(-1), starts=self.start_N,
            q_lens=np.full(N, L, dtype=np.int64), kv_lens=self.start_N + L, causal=causal_N, pages=list(pages),
            prefill=False, max_q_len=L, max_pages=max(map(len, pages)), any_causal=bool(causal_N.any()),
            candidates=np.arange(L - 1, N * L, L), entropy=NO_ROWS, sampled=self.sampling(), biased=self.biasing(),
        )

    def counter_NX(self, picked: list[int]) -> np.ndarray:
        """Commits draw nothing (`draws_sample` is off)."""
        return np.zeros((len(self.seqs), 1), dtype=np.int64)

    def position_NX(self) -> np.ndarray:
        """The block's last row predicts the next block's first position."""
        return (self.start_N + self.seqs[0].block_size)[:, None]

    def apply(self) -> None:
        """The blocks join the sequences' known tokens (their K/V now final), and each token opens the next block."""
        L = self.seqs[0].block_size
        for seq, token in zip(self.seqs, np.asarray(self.tokens, dtype=np.int64).tolist()):
            seq.tokens.extend(seq.block)
            seq.num_cached = len(seq.tokens)
            seq.block, seq.sub, seq.refresh_block = new_block([token], L, seq.mask_token_id), None, False
            seq.num_forwards += 1
            seq.num_decode_steps += 1
        self.settling = self.finalizing = self.seqs
