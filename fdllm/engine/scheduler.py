"""Continuous-batching scheduler: waiting/running queues, admission by free pages, chunked prefill.

Plain Python over `Sequence` objects. Every step each running sequence contributes one `Work`
(its current sub-block step, block commit, speculative round or prefill chunk), or joins one of the
step's array batches, planned for all their sequences at once (`fdllm.engine.array_batch`): the
`DenoiseBatch` of plain sub-block steps, the `CommitBatch` of block commits, the `ARBatch` of AR
next-token steps. Sequences still prefilling share a per-step budget of prompt tokens, taken in
whole blocks.

Pages are taken as they are needed (vLLM's scheme). Admission is FIFO: a request is admitted when the
pages of its prompt and first blocks (`Sequence.pages_to_start`) can be reserved with a page to spare
for each running sequence's next block. A running sequence that reaches a new block takes a free
page; when none is left, the most recently admitted sequence is preempted (`Sequence.preempt`: its
pages go back, its final blocks stay in the prefix cache when caching is on) and waits at the head
of the queue to be prefilled again (a speculative lookahead, which changes no token, is dropped
instead). `reserve_worst_case` (EngineConfig.deterministic) instead reserves every page a request
may reach (prompt + max_new_tokens) at admission, so nothing is ever preempted, at the cost of
admitting fewer requests when they stop well short of max_new_tokens.
"""

from __future__ import annotations

import logging
from collections import deque

from fdllm.cache import PageAllocator
from fdllm.engine.ar_batch import ARBatch
from fdllm.engine.array_batch import ArrayBatch
from fdllm.engine.commit_batch import CommitBatch
from fdllm.engine.denoise import DenoiseBatch
from fdllm.engine.sequence import Sequence, Work

log = logging.getLogger(__name__)

MIN_DENOISE_BATCH = 8
MIN_COMMIT_BATCH = 4
MIN_AR_BATCH = 4
PREEMPTION_WARNING_EVERY = 50  # preemptions between two warnings (vLLM's interval)


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_num_seqs: int, max_prefill_tokens: int, block_size: int,
                 lookahead_max_batch: int | None = None, prefix_caching: bool = True,
                 reserve_worst_case: bool = False) -> None:
        """`lookahead_max_batch`: speculative lookahead only in steps with at most this many running
        sequences (EngineConfig.speculative_lookahead_max_batch; None: in every step). `prefix_caching`:
        share the pages of final blocks between sequences (EngineConfig.enable_prefix_caching).
        `reserve_worst_case`: reserve each request's every page at admission, never preempt."""
        self.allocator, self.prefix_caching = allocator, prefix_caching
        self.reserve_worst_case = reserve_worst_case
        self.num_preemptions = 0
        self.max_num_seqs, self.max_prefill_tokens, self.block_size = max_num_seqs, max_prefill_tokens, block_size
        self.lookahead_max_batch = lookahead_max_batch
        self.held_pages = 0  # free pages admission leaves alone (Engine.hold_free_pages)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.array_batches = True  # False: every step a Work (the tests' reference for the array batches)
        # Fewer steps of a kind than this run as Works: a batch's array set-up costs about as much as
        # that many Works' Python (CPU, `python -m benchmarks.bench_host --stub-model`).
        self.min_denoise_batch = MIN_DENOISE_BATCH
        self.min_commit_batch = MIN_COMMIT_BATCH
        self.min_ar_batch = MIN_AR_BATCH

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Work], list[ArrayBatch], list[tuple[Sequence, Exception]]]:
        """Admit what fits, then one step per running sequence (prefill within the step's budget):
        a `Work` each, except the plain sub-block steps, the block commits and the AR next-token steps,
        each kind run together in one array batch when there are enough of them (none with
        `array_batches` off).

        Also returns the sequences whose planning raised (with the error): the caller fails those
        alone, the others still run this step.
        """
        self._admit()
        return self._plan()

    def _admit(self) -> None:
        """Move waiting sequences to running, in order, while their start's pages can be reserved."""
        deferred = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            shared = self._cached_prefix(seq)
            if self._being_prefilled(seq, len(shared)):
                # share it from a coming step rather than prefill it twice (SGLang's in-batch prefix
                # check); the requests behind it do not wait for that
                deferred.append(self.waiting.popleft())
                continue
            need = (seq.max_pages if self.reserve_worst_case else seq.pages_to_start) - len(shared)
            spare = (0 if self.reserve_worst_case else len(self.running)) + self.held_pages  # their next blocks
            if not self.allocator.reserve(need, shared, spare=spare):
                break  # FIFO: a large request is not overtaken by smaller ones behind it
            seq.use_cached_prefix(shared)
            seq.num_reserved = need
            self.running.append(self.waiting.popleft())
        self.waiting.extendleft(reversed(deferred))  # back at the head, in order

    def _plan(self) -> tuple[list[Work], list[ArrayBatch], list[tuple[Sequence, Exception]]]:
        """Every running sequence's step (`schedule`'s answer), taking the pages each reaches."""
        budget = self.max_prefill_tokens
        lookahead = self.lookahead_max_batch is None or len(self.running) <= self.lookahead_max_batch
        works, failed = [], []
        denoising, committing, ar = [], [], []  # sequences whose step an array batch may run
        # Oldest first, so a sequence short of pages preempts only sequences not yet planned (the
        # newest, at the end), or itself when it is the newest.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            try:
                work, batch_seqs = None, None
                if self.array_batches and seq.batch_denoising:
                    batch_seqs, kv_len = denoising, seq.block_start + self.block_size
                elif self.array_batches and seq.batch_commit:
                    batch_seqs, kv_len = committing, seq.block_start + self.block_size
                elif self.array_batches and seq.batch_ar:
                    batch_seqs, kv_len = ar, len(seq.tokens)
                else:
                    work = seq.next_work(budget, lookahead)
                    if work is not None and work.lookahead and seq.is_speculative and not self._fits(seq, work.kv_len):
                        work = seq.next_work(budget, False)  # same tokens without it: not worth a preemption
                    kv_len = 0 if work is None else work.kv_len
                if not self._reach(seq, kv_len):
                    continue  # preempted itself: running[i] is the next sequence now
            except Exception as exc:  # noqa: BLE001 - one request's bug must not stop the others
                failed.append((seq, exc))
            else:
                if work is not None:
                    works.append(work)
                    budget -= work.num_prefill
                elif batch_seqs is not None:
                    batch_seqs.append(seq)
            i += 1
        batches = []
        kinds = ((DenoiseBatch, denoising, self.min_denoise_batch), (CommitBatch, committing, self.min_commit_batch),
                 (ARBatch, ar, self.min_ar_batch))
        for batch_class, seqs, minimum in kinds:
            if len(seqs) < minimum:  # too few to pay for the batch's array set-up: Works (no prefill, pages taken above)
                for seq in seqs:
                    try:
                        works.append(seq.next_work(budget, lookahead))
                    except Exception as exc:  # noqa: BLE001 - one request's bug must not stop the others
                        failed.append((seq, exc))
            elif seqs:
                try:
                    batches.append(batch_class(seqs))
                except Exception as exc:  # noqa: BLE001 - it cannot be attributed: those requests fail, the others run
                    failed += [(seq, exc) for seq in seqs]
        return works, batches, failed

    def _fits(self, seq: Sequence, kv_len: int) -> bool:
        """Whether the sequence can have pages up to `kv_len` tokens without preempting anyone."""
        short = -(-kv_len // self.block_size) - len(seq.pages) - seq.num_reserved
        return short <= self.allocator.num_unreserved

    def _reach(self, seq: Sequence, kv_len: int) -> bool:
        """Pages up to `kv_len` tokens (its rows hold seq.pages itself): from the sequence's reservation,
        then from the free pages, preempting the newest running sequences while none is free. False
        when that preempted `seq` itself (it is the newest): it takes no step now."""
        while len(seq.pages) * self.block_size < kv_len:
            if not seq.num_reserved:
                while not self.allocator.reserve(1):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        return False
                seq.num_reserved = 1
            seq.num_reserved -= 1
            seq.pages.append(self.allocator.allocate())
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Give a running sequence's pages back and queue it first, to be prefilled again (recompute
        preemption); its final blocks stay in the prefix cache."""
        self._release(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        if self.num_preemptions % PREEMPTION_WARNING_EVERY == 1:
            log.warning(
                "request %s was preempted: the KV cache has no free page for the running requests' next "
                "blocks, so it gives its pages back and is prefilled again later (%d preemptions so far). "
                "This costs throughput; give the engine more KV pages (gpu_memory_utilization, num_pages) "
                "or run fewer requests at once (max_num_seqs)", seq.request_id, self.num_preemptions,
            )

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

    def register(self, seq: Sequence) -> None:
        """Put the sequence's newly final blocks in the prefix cache. The engine calls it once a step's
        results are taken, for each sequence whose step can have made blocks final (a `Work`'s, an
        `ArrayBatch`'s `finalizing`), so the next admission shares them; releasing a sequence calls it too."""
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
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.pages = []

    def _release(self, seq: Sequence) -> None:
        """Take a running sequence out, its final blocks into the prefix cache, its pages and reservation back."""
        self.register(seq)
        self.running.remove(seq)
        self.allocator.release(seq.pages, seq.num_reserved)
        seq.num_reserved = 0

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
