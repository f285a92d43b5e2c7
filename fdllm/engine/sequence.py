"""Per-request state and its step-by-step decoding (plain Python, no tensors).

A diffusion sequence goes: prefill its complete prompt blocks (chunked, block-causal), then decode
the current block sub-block by sub-block, commit it (exact K/V + the next block's first token),
and so on until a stop. An AR sequence prefills its prompt causally and then feeds one token per
step. A speculative sequence prefills as AR does, then decodes in rounds (docs/method.md §5): draft
steps fill the rest of the current block in diffusion mode, one causal verify forward checks the
draft, and the longest agreeing prefix plus the verify's own next token are committed; the verify
(and the last prefill chunk) also drafts the next round from trailing masks (`lookahead`), used when
the draft it checks is accepted whole. Each step a sequence hands the scheduler one `Work` (what to feed, how it attends, which
logits to read) and gets back its logit rows' predictions (token, confidence c_i and, when its
selection policy needs it, entropy H_i); the sequence's `SelectionPolicy` (fdllm.decoding) decides
what they commit and where an adaptive sub-block ends. When many sequences are on a plain sub-block
step at once, a `DenoiseBatch` (fdllm.engine.denoise) runs those steps for them as array operations
(`batch_denoising`), with the same rules, and the sequences only `settle` what it decoded; a
`CommitBatch` (fdllm.engine.commit_batch) and an `ARBatch` (fdllm.engine.ar_batch) do the same for
block commits (`batch_commit`) and AR next-token steps (`batch_ar`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fdllm.cache import AttentionRow, block_hashes
from fdllm.decoding import (
    BlockStep,
    SelectionPolicy,
    StopCriteria,
    apply_unmask,
    decoded_prefix,
    new_block,
    next_sub_block,
    opening_step,
    plan_block_step,
    select_block_step,
)
from fdllm.engine.params import GenerationResult, SamplingParams

TokenCallback = Callable[[str, list[int], bool], None]  # (request_id, new_token_ids, finished)


@dataclass(kw_only=True)
class Work:
    """What one sequence contributes to a step's packed forward."""

    seq: Sequence
    token_ids: list[int]  # fed tokens, at consecutive positions from `start`
    start: int
    rows: list[AttentionRow]  # cover token_ids in order
    num_prefill: int = 0  # prompt tokens whose K/V this work writes for good
    logit_rows: list[int] = field(default_factory=list)  # indices into token_ids
    candidates: list[bool] = field(default_factory=list)  # per logit row: may be accepted
    step: BlockStep | None = None  # a denoising step of the current block
    commit: bool = False  # the forward of a clean block: exact K/V, next block's first token
    draft: bool = False  # speculative: a diffusion step over the rest of the block
    verify: bool = False  # speculative: the causal forward over [last known token, draft]
    # The trailing logit rows of a lookahead, read after the `settling_rows`: speculative prefill's
    # last chunk or verify drafts the next round (masks fed after the known/verified tokens, read only
    # if those turn out to be what was assumed); a diffusion block's opening forward runs the next
    # block's first denoising step (`opening`).
    lookahead: int = 0
    opening: BlockStep | None = None  # diffusion block lookahead: the step its lookahead rows make

    @property
    def sampled_rows(self) -> range:
        """The logit rows whose token is sampled (temperature > 0), not the argmax. A diffusion
        request samples only while denoising: the token that opens a block (block commit, or the
        last logit of a prompt that fills whole blocks) is the argmax for every request (docs/method.md
        §3.4), its block lookahead's rows denoise. A speculative request samples where AR would
        (prefill's last logit, verify rows); its drafts, lookahead rows included, are greedy proposals."""
        if self.seq.params.temperature <= 0:
            return range(0)
        if self.opening is not None:
            return range(self.settling_rows, len(self.logit_rows))
        if self.step is not None or (self.seq.is_causal and not self.draft):
            return range(self.settling_rows)
        return range(0)

    @property
    def settling_rows(self) -> int:
        """Leading logit rows that are this forward's own predictions (what it settles); the
        lookahead's rows come after them."""
        return len(self.logit_rows) - self.lookahead

    @property
    def kv_len(self) -> int:
        """Tokens of the sequence this work's attention reaches (pages needed: ceil(kv_len / S))."""
        return max(r.kv_len for r in self.rows)

    @property
    def needs_entropy(self) -> bool:
        """Whether the step must compute H_i of this work's candidates (its policy selects by entropy)."""
        return (self.step is not None or self.draft or self.lookahead > 0) and self.seq.policy.needs_entropy


@dataclass
class Predictions:
    """A work's predictions, one entry per logit row: the token, its probability c_i (greedy: max p_i;
    sampled: the sampled token's), and the entropy H_i when the work `needs_entropy` (else None).
    Rows that are no candidate hold a filler token and probability 0."""

    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    entropies: list[float] | None = None


class Sequence:
    """One request: prompt, pages, the current block and the settled output."""

    def __init__(
        self, *, request_id: str, prompt: list[int], params: SamplingParams, criteria: StopCriteria,
        block_size: int, sub_block_size: int, use_sub_block_cache: bool, threshold: float,
        mask_token_id: int | None, arrival: float, on_tokens: TokenCallback | None = None,
        causal_prefix: bool = False, policy: SelectionPolicy | None = None, lookahead: bool = True,
    ) -> None:
        """`causal_prefix`: the checkpoint's clean stream attends causally (BlockDiffusionConfig.prefix_attention),
        so diffusion prefill and block commit run causal rows. `policy`: how denoising steps select
        (None: the threshold rule at `threshold`). `lookahead`: speculative rounds draft the next
        round in the same forward (EngineConfig.speculative_lookahead); diffusion requests follow
        their own `params.block_lookahead` instead (it changes what they decode, so never the batch)."""
        self.request_id, self.prompt, self.params, self.criteria = request_id, prompt, params, criteria
        self.block_size, self.sub_block_size, self.use_sub_block_cache = block_size, sub_block_size, use_sub_block_cache
        self.threshold, self.mask_token_id, self.causal_prefix = threshold, mask_token_id, causal_prefix
        self.policy = policy or SelectionPolicy(threshold=threshold)
        self.arrival, self.on_tokens = arrival, on_tokens
        self.is_speculative = params.mode == "speculative"
        self.is_ar = params.mode == "ar"
        self.is_causal = self.is_ar or self.is_speculative  # prompt prefilled causally, output in self.tokens
        self.lookahead = lookahead and self.is_speculative
        # Its plain sub-block steps can run in a `DenoiseBatch` (fdllm.engine.denoise): threshold selection,
        # fixed sub-blocks.
        self._batchable = not self.is_causal and self.policy.selection == "threshold" and not self.policy.adaptive
        # Diffusion: a block's opening forward also runs its first step (with a sub-block to read).
        self.block_lookahead = params.block_lookahead and not self.is_causal and sub_block_size > 1
        P, L = len(prompt), block_size
        # Prompt tokens whose K/V prefill writes: AR all of them, diffusion its whole blocks (the rest
        # opens a block). After a preemption, every known token (`preempt`).
        self.prefill_target = P if self.is_causal else P - P % L
        # Worst case: every position up to prompt + max_new_tokens, in whole pages.
        self.max_pages = math.ceil((P + params.max_new_tokens) / L)
        self.pages: list[int] = []
        self.num_reserved = 0  # pages the scheduler reserved for it and it has not taken yet
        self.num_preemptions = 0
        self.num_cached = 0  # tokens whose exact K/V are in the pages
        # Prefix caching: the K/V of prefill and committed blocks are final once written, so their
        # pages are shared with later sequences that start with the same blocks (PageAllocator).
        self.hashes: list[bytes] = []  # `block_hash` of blocks 0, 1, ... as far as computed
        self.num_registered = 0  # leading blocks whose pages the prefix cache holds
        self.num_cached_tokens = 0  # prompt tokens whose K/V came from the prefix cache, not prefill
        if self.is_causal:
            self.tokens = list(prompt)  # every known token: prompt + output; all but the last have K/V
            self.block: list[int] | None = None
        else:
            full = self.prefill_target
            self.tokens = prompt[:full]  # tokens before the current block (prompt blocks + committed)
            # Leftover prompt tokens open the first block; an exact multiple waits for the last logit.
            self.block = new_block(prompt[full:], L, mask_token_id) if P % L else None
        self.sub: tuple[int, int] | None = None  # sub-block [start, stop) of the last denoising step in this block
        # The current block's K/V are not in its page (preempted): its next step feeds the whole block.
        self.refresh_block = False
        self.output: list[int] = []  # settled generated tokens (final, streamed)
        self.finish_reason: str | None = None
        self.num_forwards = 0
        # Forwards that read this sequence's logits: where a diffusion step's draws are in its stream
        # (fdllm.engine.inputs.draw_counter; causal rows draw by position). Prefill-only chunks do not
        # count, so how its prompt was chunked or served from the prefix cache never changes its samples.
        self.num_decode_steps = 0
        self.first_token_time: float | None = None
        # Speculative: the current round's draft of positions [len(tokens), block end), masks where undrafted.
        self.draft: list[int] | None = None
        self.num_drafted = self.num_accepted = 0
        self._token_array, self._token_array_len = np.zeros(0, dtype=np.int64), 0  # `token_array`'s buffer

    @property
    def block_start(self) -> int:
        return len(self.tokens)

    def token_array(self) -> np.ndarray:
        """`tokens` as int64 (a read-only view), converted as they come: they only ever grow, and a
        request that adjusts its logits reads its whole history every step (fdllm.engine.adjustments)."""
        n, have = len(self.tokens), self._token_array_len
        if n > have:
            if n > len(self._token_array):
                grown = np.empty(max(n, 2 * len(self._token_array)), dtype=np.int64)
                grown[:have] = self._token_array[:have]
                self._token_array = grown
            self._token_array[have:n] = self.tokens[have:n]
            self._token_array_len = n
        view = self._token_array[:n]
        view.flags.writeable = False
        return view

    @property
    def num_final(self) -> int:
        """Leading tokens whose K/V in the pages are exact and never written again (prompt blocks,
        committed blocks; AR: every known token but the last)."""
        return len(self.tokens) - 1 if self.is_causal and not self.num_prefill_left else self.num_cached

    def block_hash(self, j: int) -> bytes:
        """The prefix cache's key of block j (its tokens must be known: j < len(self.tokens) // L)."""
        if len(self.hashes) <= j:
            self.hashes = block_hashes(self.tokens, self.block_size, self.is_causal or self.causal_prefix, j + 1, self.hashes,
                                       self.params.cache_salt)
        return self.hashes[j]

    @property
    def num_shareable_blocks(self) -> int:
        """Leading blocks this sequence can take from the prefix cache at admission: the whole blocks of
        what it must prefill, except the last token's when a forward must still compute its logit (it
        opens the first block or gives the next AR token; a diffusion request preempted mid-output
        already has its current block)."""
        return (len(self.tokens) - (self.block is None)) // self.block_size

    @property
    def pages_to_start(self) -> int:
        """Pages admission reserves: all it prefills, the block after (the first AR tokens, the current
        diffusion block, a speculative round) and, with a lookahead, the one after that. Later pages
        are taken as the output reaches them (`Scheduler`)."""
        lookahead = self.block_lookahead or self.lookahead
        return min(len(self.tokens) // self.block_size + 1 + lookahead, self.max_pages)

    def use_cached_prefix(self, pages: list[int]) -> None:
        """Start from the prefix cache's pages of the first len(pages) blocks (admission): their K/V are not prefilled."""
        self.pages = list(pages)
        self.num_cached = len(pages) * self.block_size
        self.num_registered = len(pages)
        if not self.num_preemptions:  # what the prompt took from the cache, not a resumed output
            self.num_cached_tokens = self.num_cached

    def preempt(self) -> None:
        """Forget the K/V (the scheduler took the pages back; vLLM's recompute preemption): once
        re-admitted, it prefills every known token again (with prefix caching, many of their blocks
        may still be cached), then goes on from where it stopped. Settled output is never taken back. A
        diffusion request keeps what its current block has decoded; its next step feeds the whole
        block (`refresh_block`: the sub-block cache's K/V of the block are gone, also when the prefix
        cache gives back every block before it), so with the sub-block cache its next tokens can
        differ from an uninterrupted run's. A speculative
        request drops its draft (its output is AR's either way)."""
        self.pages, self.num_reserved, self.num_cached, self.num_registered = [], 0, 0, 0
        self.prefill_target = len(self.tokens)
        self.draft = None
        self.refresh_block = self.block is not None
        self.num_preemptions += 1

    @property
    def num_prefill_left(self) -> int:
        return max(self.prefill_target - self.num_cached, 0)

    @property
    def batch_denoising(self) -> bool:
        """This step is a plain sub-block step that a `DenoiseBatch` runs with others (nothing left
        to prefill, a mask left in the block, the threshold rule over fixed sub-blocks)."""
        return (self._batchable and not self.num_prefill_left and self.block is not None and not self.refresh_block
                and self.mask_token_id in self.block)

    @property
    def batch_commit(self) -> bool:
        """This step is a block commit that a `CommitBatch` runs with others (diffusion, nothing left to
        prefill, no mask left in the block, no block lookahead riding along)."""
        return (not self.is_causal and not self.num_prefill_left and self.block is not None
                and not self.block_lookahead and self.mask_token_id not in self.block)

    @property
    def batch_ar(self) -> bool:
        """This step is a plain AR next-token step that an `ARBatch` runs with others (AR mode, its
        prompt prefilled: the step `_ar_work` makes after prefill)."""
        return self.is_ar and not self.num_prefill_left

    def next_work(self, prefill_budget: int, lookahead: bool = True) -> Work | None:
        """This step's work; None if it is still prefilling and the step's prefill budget is spent.
        `lookahead`: the scheduler allows this step's speculative lookahead (a small enough batch)."""
        lookahead = lookahead and self.lookahead
        if self.is_speculative and not self.num_prefill_left:
            return self._speculative_work(lookahead)
        return self._ar_work(prefill_budget, lookahead) if self.is_causal else self._diffusion_work(prefill_budget)

    def _ar_work(self, prefill_budget: int, lookahead: bool) -> Work | None:
        left = self.num_prefill_left
        if left:
            n = min(left, prefill_budget)
            if n < 1:
                return None
            start = self.num_cached
            done = n == left
            work = Work(
                seq=self, token_ids=self.tokens[start : start + n], start=start, num_prefill=n,
                rows=[AttentionRow(n, start + n, self.pages, causal=True)],
                logit_rows=[n - 1] if done else [], candidates=[True] if done else [],
            )
            if done and lookahead:
                self._add_lookahead(work, next_known=start + n)
            return work
        pos = len(self.tokens) - 1  # the last token is the only one without K/V
        return Work(
            seq=self, token_ids=[self.tokens[pos]], start=pos, rows=[AttentionRow(1, pos + 1, self.pages)],
            logit_rows=[0], candidates=[True],
        )

    def _speculative_work(self, lookahead: bool) -> Work:
        """A draft step while the draft has masks, else the verify forward (docs/method.md §5).

        Known tokens end at c - 1 = e and positions < e have exact causal K/V (e, the last known
        token, has none yet, as in AR mode). Both kinds feed [e, block end): a draft step attends
        the cached prefix and bidirectionally among the fed rows (like a diffusion refresh step),
        the verify forward attends causally, so its rows are the AR logits and its K/V exact.
        Fed row r predicts position e + r + 1 (the token shift).
        """
        e = len(self.tokens) - 1
        end = (e + 1) // self.block_size * self.block_size + self.block_size  # the block holding c = e + 1
        if self.draft is None:
            self.draft = [self.mask_token_id] * (end - e - 1)
        fed = [self.tokens[e], *self.draft]
        if self.mask_token_id in self.draft:
            return Work(
                seq=self, token_ids=fed, start=e, rows=[AttentionRow(len(fed), end, self.pages)],
                logit_rows=list(range(len(self.draft))), candidates=[t == self.mask_token_id for t in self.draft],
                draft=True,
            )
        work = Work(
            seq=self, token_ids=fed, start=e, rows=[AttentionRow(len(fed), end, self.pages, causal=True)],
            logit_rows=list(range(len(fed))), candidates=[True] * len(fed), verify=True,
        )
        if lookahead:
            self._add_lookahead(work, next_known=end)
        return work

    def _add_lookahead(self, work: Work, next_known: int) -> None:
        """Let a causal forward that settles every token before `next_known` (the final prefill chunk;
        a verify, if it accepts the whole draft) also draft the round after it: masks fed at
        [next_known, end) attend the forward's causal K/V and bidirectionally each other, as a draft
        step does, except that the token at `next_known` (the forward's own prediction) is a mask
        too. Their rows predict [next_known + 1, end), the next draft, so a fully accepted round
        costs one forward instead of a draft plus a verify. Skipped past the request's last page (prompt
        + max_new_tokens)."""
        L = self.block_size
        end = (next_known + 1) // L * L + L  # the block holding next_known + 1, as `_speculative_work`
        if end > self.max_pages * L:
            return
        n = end - next_known
        first = len(work.token_ids)
        work.token_ids += [self.mask_token_id] * n
        work.rows.append(AttentionRow(n, end, self.pages))
        work.logit_rows += range(first, first + n - 1)
        work.candidates += [True] * (n - 1)
        work.lookahead = n - 1

    def _diffusion_work(self, prefill_budget: int) -> Work | None:
        L, start = self.block_size, self.num_cached
        token_ids: list[int] = []
        rows: list[AttentionRow] = []
        left = self.num_prefill_left
        if left:
            n = min(left, prefill_budget - prefill_budget % L)
            if n < 1:
                return None
            token_ids = self.tokens[start : start + n]
            if self.causal_prefix:  # the checkpoint's clean stream attends causally
                rows = [AttentionRow(n, start + n, self.pages, causal=True)]
            else:  # block-causal prefill: one row per block, each seeing the prefix and itself
                rows = [AttentionRow(L, j + L, self.pages) for j in range(start, start + n, L)]
            if n < left:
                return Work(seq=self, token_ids=token_ids, start=start, rows=rows, num_prefill=n)
            if self.block is None:  # exact block multiple: the last prompt logit opens the block
                return self._open_next_block(Work(seq=self, token_ids=token_ids, start=start, rows=rows,
                                                  num_prefill=n, logit_rows=[n - 1], candidates=[True]))
        # The current block rides along with the prefill's tail (saves a forward) or runs alone.
        offset, kv_len = len(token_ids), self.block_start + L
        sub = next_sub_block(self.block, self.sub, self.sub_block_size, self.mask_token_id)
        if sub is None:
            rows.append(AttentionRow(L, kv_len, self.pages, causal=self.causal_prefix))
            return self._open_next_block(Work(
                seq=self, token_ids=token_ids + self.block, start=start if left else self.block_start, rows=rows,
                num_prefill=left, logit_rows=[offset + L - 1], candidates=[True], commit=True,
            ))
        step = plan_block_step(self.block, sub[0], self.sub_block_size, sub != self.sub or self.refresh_block,
                               self.use_sub_block_cache, self.mask_token_id, sub_stop=sub[1])
        rows.append(AttentionRow(step.feed_stop - step.feed_start, kv_len, self.pages))
        return Work(
            seq=self, token_ids=token_ids + self.block[step.feed_start : step.feed_stop],
            start=start if left else self.block_start + step.feed_start, rows=rows, num_prefill=left,
            logit_rows=[offset + r for r in step.logit_rows], candidates=list(step.candidates), step=step,
        )

    def _open_next_block(self, work: Work) -> Work:
        """A forward whose last logit opens the next block (a commit, or the last chunk of a prompt
        that fills whole blocks) also runs that block's first denoising step when the request asks
        for it (SamplingParams.block_lookahead, beyond docs/method.md): L masks fed at the block's positions
        attend the cache, the K/V this forward writes, and each other, as a refresh step does, except
        that offset 0 (this forward's own prediction) is a mask too. What passes the selection rule
        among its first sub-block is committed with no forced progress, and the step counts as the
        sub-block's first (a refresh), so a block costs one forward fewer. The next block is within the
        request's pages (prompt + max_new_tokens): a block is opened only while the output is short of
        max_new_tokens."""
        if not self.block_lookahead:
            return work
        L = self.block_size
        start = work.start + len(work.token_ids)  # the next block's first position
        step = opening_step(L, self.sub_block_size)
        first, n = len(work.token_ids), step.feed_stop - step.feed_start  # n = L: the whole block, masked
        work.token_ids += [self.mask_token_id] * n
        work.rows.append(AttentionRow(n, start + L, self.pages))
        work.logit_rows += [first + r for r in step.logit_rows]
        work.candidates += step.candidates
        work.lookahead, work.opening = len(step.logit_rows), step
        return work

    def apply(self, work: Work, predictions: Predictions) -> list[int]:
        """Take a step's predictions for the work's logit rows; returns the newly settled tokens."""
        self.num_forwards += 1
        self.num_decode_steps += bool(work.logit_rows)
        self.num_cached += work.num_prefill
        tokens = predictions.tokens
        settling = work.settling_rows
        if work.draft:
            self._update_draft(work, predictions, first=0)
        elif work.verify:
            if self._accept(tokens[:settling]) and work.lookahead:
                self._start_draft_from_lookahead(work, predictions, settling)
        elif self.is_causal:
            if tokens:
                self.tokens.append(tokens[0])
                if work.lookahead:
                    self._start_draft_from_lookahead(work, predictions, settling)
        elif work.step is not None:
            selected, stop = select_block_step(self.policy, work.step, tokens, predictions.probs, predictions.entropies)
            apply_unmask(self.block, work.step, tokens, selected)
            self.sub, self.refresh_block = (work.step.sub_start, stop), False
        elif work.commit:
            self.tokens.extend(self.block)
            self.num_cached = len(self.tokens)
            self.block, self.sub = new_block(tokens[:settling], self.block_size, self.mask_token_id), None
            self.refresh_block = False
        elif tokens:  # the exact-multiple prompt's last logit
            self.block = new_block(tokens[:settling], self.block_size, self.mask_token_id)
        if work.opening is not None:
            self._take_opening_step(work.opening, predictions, settling)
        return self.settle()

    def _take_opening_step(self, step: BlockStep, predictions: Predictions, first: int) -> None:
        """Commit what a block lookahead's rows (from logit row `first`) select in the new block."""
        ents = predictions.entropies
        tokens = predictions.tokens[first:]
        selected, stop = select_block_step(self.policy, step, tokens, predictions.probs[first:],
                                           None if ents is None else ents[first:], force=False)
        apply_unmask(self.block, step, tokens, selected)
        self.sub = (step.sub_start, stop)

    def _update_draft(self, work: Work, predictions: Predictions, first: int) -> None:
        """Fill the draft's masks that the selection policy picks; logit row `first + i` predicts draft[i]."""
        rows = [r for r in range(first, len(work.candidates)) if work.candidates[r]]
        ents = predictions.entropies
        chosen = self.policy.select([predictions.probs[r] for r in rows], None if ents is None else [ents[r] for r in rows])
        for r, sel in zip(rows, chosen):
            if sel:
                self.draft[r - first] = predictions.tokens[r]

    def _start_draft_from_lookahead(self, work: Work, predictions: Predictions, first: int) -> None:
        self.draft = [self.mask_token_id] * work.lookahead
        self._update_draft(work, predictions, first)

    def _accept(self, verified: list[int]) -> bool:
        """Commit the longest draft prefix equal to the verify's predictions, then the verify's own
        next token (the AR correction, or after a fully accepted draft the token past the block).
        Every committed token is the verify's causal prediction, so the output is AR's; the K/V the
        verify wrote for the last known token and the accepted drafts are exact causal K/V.
        Returns whether the whole draft was accepted (the round's lookahead, if any, then holds)."""
        draft, k = self.draft, 0
        while k < len(draft) and draft[k] == verified[k]:
            k += 1
        self.num_drafted += len(draft)
        self.num_accepted += k
        self.tokens.extend(verified[: k + 1])
        self.draft = None
        return k == len(draft)

    def settle(self) -> list[int]:
        """Extend the output with the newly final tokens and apply the stop criteria."""
        before = len(self.output)
        pos = len(self.prompt) + before
        if self.is_causal:
            self.output.extend(self.tokens[pos:])
        elif self.block is not None:
            self.output.extend(decoded_prefix(self.block, pos - self.block_start, self.mask_token_id))
        verdict = self.criteria.check(self.output, before)
        if verdict is not None:
            cut, self.finish_reason = verdict
            del self.output[cut:]
        return self.output[before:]

    def result(self, now: float, text: str) -> GenerationResult:
        return GenerationResult(
            request_id=self.request_id, prompt_token_ids=list(self.prompt), token_ids=list(self.output), text=text,
            finish_reason=self.finish_reason, num_forwards=self.num_forwards, num_drafted=self.num_drafted,
            num_accepted=self.num_accepted, num_cached_tokens=self.num_cached_tokens,
            num_preemptions=self.num_preemptions,
            time_to_first_token_s=None if self.first_token_time is None else self.first_token_time - self.arrival,
            latency_s=now - self.arrival,
        )
