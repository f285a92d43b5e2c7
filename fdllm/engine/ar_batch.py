"""The next-token steps of many AR sequences at once, as array operations.

Once its prompt is prefilled, an AR request's step is always the same: feed its last known token
(the only one without K/V) at its position, attending every token before it, and append the
token its logit row gives. `ARBatch` plans that for all such sequences with a few numpy
operations (`fdllm.engine.array_batch`) instead of one `Work` each; prefill chunks and speculative
rounds stay `Work`s, and every kind runs in one forward. It computes what `Sequence._ar_work`,
`StepInputs.from_works` and `Sequence.apply` compute one sequence at a time; tests hold the two
paths equal token for token.
"""

from __future__ import annotations

import numpy as np

from fdllm.engine.array_batch import ArrayBatch
from fdllm.engine.inputs import NO_ROWS, StepInputs
from fdllm.engine.sequence import Sequence


class ARBatch(ArrayBatch):
    """One step's next tokens of `seqs` (each `Sequence.batch_ar`): planned on construction, staged
    by `inputs`, applied by `apply` once the forward's results are in. One candidate per sequence."""

    def __init__(self, seqs: list[Sequence]) -> None:
        super().__init__(seqs)
        N = len(seqs)
        lasts, lengths, pages = zip(*[(s.tokens[-1], len(s.tokens), s.pages) for s in seqs])
        self.length_N = np.array(lengths, dtype=np.int64)  # known tokens; the row predicts position length
        self.cand_NX = np.ones((N, 1), dtype=bool)
        self.inputs = StepInputs(
            ids=np.array(lasts, dtype=np.int64), starts=self.length_N - 1, q_lens=np.ones(N, dtype=np.int64),
            kv_lens=self.length_N, causal=np.zeros(N, dtype=bool), pages=list(pages), prefill=False, max_q_len=1,
            max_pages=max(map(len, pages)), any_causal=False, candidates=np.arange(N), entropy=NO_ROWS,
            sampled=self.sampling(), biased=self.biasing(),
        )

    def counter_NX(self, picked: list[int]) -> np.ndarray:
        """A causal row draws by the position of the token it samples (`inputs.draw_counter`)."""
        return self.length_N[:, None]

    def position_NX(self) -> np.ndarray:
        return self.length_N[:, None]

    def apply(self) -> None:
        """Append each sequence's token; every sequence settles it. The token it fed now has its K/V
        for good, so a sequence whose fed token ended a block finalizes that block."""
        for seq, token in zip(self.seqs, np.asarray(self.tokens, dtype=np.int64).tolist()):
            seq.tokens.append(token)
            seq.num_forwards += 1
            seq.num_decode_steps += 1
        self.settling = self.seqs
        ends_block_N = self.length_N % self.seqs[0].block_size == 0  # the fed token at length - 1 is a block's last
        self.finalizing = [self.seqs[i] for i in np.flatnonzero(ends_block_N).tolist()]
