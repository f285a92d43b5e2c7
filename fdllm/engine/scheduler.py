"""Continuous-batching scheduler: waiting/running queues, admission by free pages, chunked prefill.

Plain Python over `Sequence` objects. Every step each running sequence contributes one `Work`
(its current sub-block step, block commit or AR token), or joins the step's `DenoiseBatch` (plain
sub-block steps, planned for all at once); sequences still prefilling share a per-step
budget of prompt tokens, taken in whole blocks. Admission is FIFO and reserves a request's
worst-case page count up front, so running sequences never run out of pages (no preemption).
"""

from __future__ import annotations

from collections import deque

from fdllm.cache import PageAllocator
from fdllm.engine.denoise import DenoiseBatch
from fdllm.engine.sequence import Sequence, Work


MIN_DENOISE_BATCH = 8


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_num_seqs: int, max_prefill_tokens: int, block_size: int,
                 lookahead_max_batch: int | None = None, prefix_caching: bool = True) -> None:
        """`lookahead_max_batch`: speculative lookahead only in steps with at most this many running
        sequences (EngineConfig.speculative_lookahead_max_batch; None: in every step). `prefix_caching`:
        share the pages of final blocks between sequences (EngineConfig.enable_prefix_caching)."""
        self.allocator, self.prefix_caching = allocator, prefix_caching
        self.max_num_seqs, self.max_prefill_tokens, self.block_size = max_num_seqs, max_prefill_tokens, block_size
        self.lookahead_max_batch = lookahead_max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.batch_denoising = True  # False: every step a Work (the tests' reference for DenoiseBatch)
        # Fewer plain sub-block steps than this run as Works: a batch's array set-up costs about as
        # much as 8 Works' Python (CPU, `python -m benchmarks.bench_host --stub-model`).
        self.min_denoise_batch = MIN_DENOISE_BATCH

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Work], DenoiseBatch | None, list[tuple[Sequence, Exception]]]:
        """Admit what fits, then one step per running sequence (prefill within the step's budget):
        a `Work` each, except the plain sub-block steps, which run together in one `DenoiseBatch`
        (None: no such step, or `batch_denoising` off).

        Also returns the sequences whose planning raised (with the error): the caller fails those
        alone, the others still run this step.
        """
        for seq in self.running:  # what the last step made final, before anyone is admitted
            self._register(seq)
        deferred = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            shared = self._cached_prefix(seq)
            if self._being_prefilled(seq, len(shared)):
                # share it from a coming step rather than prefill it twice (SGLang's in-batch prefix
                # check); the requests behind it do not wait for that
                deferred.append(self.waiting.popleft())
                continue
            if not self.allocator.reserve(seq.max_pages - len(shared), shared):
                break  # FIFO: a large request is not overtaken by smaller ones behind it
            seq.use_cached_prefix(shared)
            self.running.append(self.waiting.popleft())
        self.waiting.extendleft(reversed(deferred))  # back at the head, in order
        budget = self.max_prefill_tokens
        lookahead = self.lookahead_max_batch is None or len(self.running) <= self.lookahead_max_batch
        works, batched, failed = [], [], []
        for seq in self.running:
            try:
                if self.batch_denoising and seq.batch_denoising:
                    batched.append(seq)
                    continue
            except Exception as exc:  # noqa: BLE001 - one request's bug must not stop the others
                failed.append((seq, exc))
                continue
            budget = self._plan(seq, budget, lookahead, works, failed)
        if len(batched) < self.min_denoise_batch:  # too few to pay for the batch's array set-up
            for seq in batched:
                budget = self._plan(seq, budget, lookahead, works, failed)
            batched = []
        batch = None
        if batched:
            try:
                for seq in batched:
                    self._reach(seq, seq.block_start + self.block_size)
                batch = DenoiseBatch(batched)
            except Exception as exc:  # noqa: BLE001 - it cannot be attributed: those requests fail, the others run
                failed += [(seq, exc) for seq in batched]
        return works, batch, failed

    def _plan(self, seq: Sequence, budget: int, lookahead: bool, works: list[Work],
              failed: list[tuple[Sequence, Exception]]) -> int:
        """Add the sequence's work (if it has one within the prefill budget); returns the budget left."""
        try:
            work = seq.next_work(budget, lookahead)
            if work is not None:
                self._reach(seq, work.kv_len)
                works.append(work)
                budget -= work.num_prefill
        except Exception as exc:  # noqa: BLE001 - one request's bug must not stop the others
            failed.append((seq, exc))
        return budget

    def _reach(self, seq: Sequence, kv_len: int) -> None:
        """Pages up to `kv_len` tokens, taken from the sequence's reservation now (its rows hold seq.pages itself)."""
        while len(seq.pages) * self.block_size < kv_len:
            seq.pages.append(self.allocator.allocate())

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The prefix cache's pages of the sequence's leading prompt blocks."""
        if not self.prefix_caching:
            return []
        return self.allocator.lookup([seq.block_hash(j) for j in range(seq.num_shareable_blocks)])

    def _being_prefilled(self, seq: Sequence, cached: int) -> bool:
        """Whether a running sequence's prefill is about to make the first of `seq`'s prompt blocks that
        the cache lacks (block `cached`) final: requests sent together with one prompt (n choices, a burst
        sharing a system prompt) then prefill it once. Prefill goes first come first served, so the wait
        is a step or a few; requests behind it that share nothing are admitted meanwhile."""
        if not self.prefix_caching or cached >= seq.num_shareable_blocks:
            return False
        L = self.block_size
        return any(
            other.num_prefill_left and other.num_final // L <= cached < other.prefill_target // L
            and other.block_hash(cached) == seq.block_hash(cached)
            for other in self.running
        )

    def _register(self, seq: Sequence) -> None:
        """Put the sequence's newly final blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        final = min(seq.num_final // self.block_size, len(seq.pages))
        for j in range(seq.num_registered, final):
            self.allocator.register(seq.pages[j], seq.block_hash(j))
        seq.num_registered = max(seq.num_registered, final)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished, aborted or failed sequence and give its pages and reservation back
        (a no-op for one already removed); its final blocks stay in the prefix cache."""
        if seq in self.running:
            self._register(seq)
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
