"""What the step kinds that run as array operations share (`DenoiseBatch`, `ARBatch`, `CommitBatch`).

Planned, staged and applied one `Work` at a time, a sequence's step costs ~10-20 us of Python (a
`Work`, its attention row, its share of `StepInputs.from_works`, its `Predictions`): over half a
millisecond at 64 sequences, a sizable share of a GPU step. The most common steps of a full batch
(a plain sub-block step, a block commit, a plain AR step) are the same few operations for every
sequence, so a batch plans them for all its sequences at once with a fixed handful of numpy
operations (vLLM's persistent-batch idea). What stays per sequence is what is per request anyway: its pages and the
tokens that settle (stop checks, streaming).

A batch hands the runner its `inputs`, gets back its candidates' `tokens` and `probs` as arrays,
`apply`s them to its sequences, and names in `settling` those whose output grew (the engine settles
them one request at a time). Shape legend: N sequences, X candidate columns per sequence (a
sub-block's offsets, or the one token an AR step or a commit reads).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq

import numpy as np

from fdllm.engine.adjustments import AdjustmentsBuilder
from fdllm.engine.inputs import NO_BIASED, NO_ROWS, NO_SAMPLED, BiasedRows, SampledRows, StepInputs, stream_seed
from fdllm.engine.sequence import Sequence


def stacked_blocks(blocks: Seq[list[int]], block_size: int) -> np.ndarray:
    """[N, L] int64: the sequences' current blocks (Python ints) in one conversion (`np.fromiter` over
    them all was the fastest of five ways measured)."""
    count = len(blocks) * block_size
    return np.fromiter(itertools.chain.from_iterable(blocks), dtype=np.int64, count=count).reshape(-1, block_size)


class ArrayBatch(ABC):
    """The steps of `seqs` as arrays. A subclass plans them on construction (`inputs`, and `cand_NX`:
    which columns of each sequence are candidates, in the order of `inputs.candidates` when read
    row-major) and applies them in `apply`."""

    inputs: StepInputs
    cand_NX: np.ndarray  # [N, X] bool
    # Whether a request with temperature > 0 samples its candidates (else every one is its argmax: a
    # commit's token opens a block, docs/method.md §3.4).
    draws_sample: bool = True

    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs
        # the forward's results per candidate, in the order of `inputs.candidates` (ModelRunner.run)
        self.tokens: np.ndarray | list[float] = NO_ROWS
        self.probs: np.ndarray | list[float] = NO_ROWS
        self.settling: list[Sequence] = []  # after `apply`: the sequences whose settled prefix may have grown
        self.finalizing: list[Sequence] = []  # after `apply`: those whose K/V may now fill a block for good

    @abstractmethod
    def apply(self) -> None:
        """Take the forward's `tokens` and `probs` into the sequences and set `settling` and `finalizing`
        (`Scheduler.register`)."""

    @abstractmethod
    def counter_NX(self, picked: list[int]) -> np.ndarray:
        """[N, X] where each candidate's draw sits in its request's stream (`inputs.draw_counter`),
        valid at the rows of `picked`."""

    @abstractmethod
    def position_NX(self) -> np.ndarray:
        """[N, X] the position each candidate column predicts (what its logit adjustments count before)."""

    def sampling(self) -> SampledRows:
        """The sampled candidates (every candidate of a request with temperature > 0, as
        `Work.sampled_rows`) of requests that take their logits as the model gives them."""
        if not self.draws_sample:
            return NO_SAMPLED
        return self._draws([i for i, s in enumerate(self.seqs) if s.params.temperature > 0 and not s.params.adjusts_logits])

    def biasing(self) -> BiasedRows:
        """Every candidate of the requests that adjust their logits (`StepInputs.biased`), greedy or
        sampled, with how each row adjusts them."""
        picked = [i for i, s in enumerate(self.seqs) if s.params.adjusts_logits]
        if not picked:
            return NO_BIASED
        adjust = AdjustmentsBuilder()
        position_NX = self.position_NX()
        for i in picked:
            adjust.add(self.seqs[i], position_NX[i][self.cand_NX[i]].tolist())
        return BiasedRows(self._draws(picked), adjust.build())

    def _draws(self, picked: list[int]) -> SampledRows:
        """The candidates of the sequences `picked` and their draws' parameters; a greedy request's rows
        draw nothing (temperature 0)."""
        if not picked:
            return NO_SAMPLED
        rows_NX = np.zeros_like(self.cand_NX)
        rows_NX[picked] = self.cand_NX[picked]
        counts = rows_NX[picked].sum(1)  # each picked request's candidates, which come in request order
        params = [self.seqs[i].params for i in picked]

        def per_row(values: list, dtype) -> np.ndarray:  # one value per picked request -> per row
            return np.repeat(np.array(values, dtype=dtype), counts)

        samples = [self.draws_sample and p.temperature > 0 for p in params]
        sampled = per_row(samples, bool)
        return SampledRows(
            rows=np.flatnonzero(rows_NX[self.cand_NX]),
            temperature=per_row([p.temperature if s else 0.0 for p, s in zip(params, samples)], np.float64),
            top_p=per_row([p.top_p for p in params], np.float64),
            top_k=per_row([p.top_k for p in params], np.int64),
            seed=per_row([stream_seed(p) if s else 0 for p, s in zip(params, samples)], np.int64),
            counter=np.where(sampled, self.counter_NX(picked)[rows_NX], 0),
        )
