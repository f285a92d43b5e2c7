"""Continuous-batching scheduler: waiting/running queues, admission by free pages, chunked prefill.

Plain Python over `Sequence` objects. Every step each running sequence contributes one `Work`
(its current sub-block step, block commit or AR token); sequences still prefilling share a per-step
budget of prompt tokens, taken in whole blocks. Admission is FIFO and reserves a request's
worst-case page count up front, so running sequences never run out of pages (no preemption).
"""

from __future__ import annotations

import math
from collections import deque

from fdllm.cache import PageAllocator
from fdllm.engine.sequence import Sequence, Work


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_num_seqs: int, max_prefill_tokens: int, block_size: int,
                 lookahead_max_batch: int | None = None) -> None:
        """`lookahead_max_batch`: speculative lookahead only in steps with at most this many running
        sequences (EngineConfig.speculative_lookahead_max_batch; None: in every step)."""
        self.allocator = allocator
        self.max_num_seqs, self.max_prefill_tokens, self.block_size = max_num_seqs, max_prefill_tokens, block_size
        self.lookahead_max_batch = lookahead_max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Work], list[tuple[Sequence, Exception]]]:
        """Admit what fits, then one work per running sequence (prefill within the step's budget).

        Returns the works and the sequences whose planning raised (with the error): the caller fails
        those alone, the others still run this step.
        """
        while self.waiting and len(self.running) < self.max_num_seqs:
            if not self.allocator.reserve(self.waiting[0].max_pages):
                break  # FIFO: a large request is not overtaken by smaller ones behind it
            self.running.append(self.waiting.popleft())
        budget = self.max_prefill_tokens
        lookahead = self.lookahead_max_batch is None or len(self.running) <= self.lookahead_max_batch
        works, failed = [], []
        for seq in self.running:
            try:
                work = seq.next_work(budget, lookahead)
            except Exception as exc:  # noqa: BLE001 - one request's bug must not stop the others
                failed.append((seq, exc))
                continue
            if work is None:
                continue
            budget -= work.num_prefill
            # Pages the work reaches are taken from the reservation now; its rows hold seq.pages itself.
            while len(seq.pages) < math.ceil(work.kv_len / self.block_size):
                seq.pages.append(self.allocator.allocate())
            works.append(work)
        return works, failed

    def finish(self, seq: Sequence) -> None:
        """Remove a finished, aborted or failed sequence and give its pages and reservation back
        (a no-op for one already removed)."""
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.release(seq.pages, seq.max_pages - len(seq.pages))
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.pages = []

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
