"""KV pages on demand: admission reserves a request's start, later pages are taken as the output
reaches them, and when none is free the newest running request is preempted and prefilled again.

The oracle is the same workload on an engine whose cache never runs short: a preempted request must
decode the same tokens, stream them once and in order (nothing settled is taken back), and leave
the cache as it found it.
"""

from __future__ import annotations

import random

import pytest
import torch

import fdllm
from fdllm.cache import PageAllocator
from fdllm.engine.sequence import Sequence
from tests.unit.test_engine import make_engine, params, random_prompts

L = 8  # make_engine's block size
MODES = ["diffusion", "ar", "speculative"]
SEEDED = {"temperature": 0.8, "top_p": 0.95, "seed": 3}


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def serve(engine, requests):
    """Run `requests` ((prompt, params, step it arrives at), ...) to the end; returns the results in
    request order, after checking that what each streamed is its result."""
    streamed, done, step = {}, {}, 0
    pending = [(str(i), *r) for i, r in enumerate(requests)]
    while pending or engine.has_unfinished():
        for rid, prompt, sampling, _ in [r for r in pending if r[3] <= step]:
            engine.add_request(prompt, sampling, request_id=rid,
                               on_tokens=lambda r, new, fin: streamed.setdefault(r, []).extend(new))
        pending = [r for r in pending if r[3] > step]
        done |= {r.request_id: r for r in engine.step()}
        step += 1
    results = [done[str(i)] for i in range(len(requests))]
    for r in results:
        assert streamed.get(r.request_id, []) == r.token_ids, f"request {r.request_id} streamed other tokens"
    return results


def poison_fresh_pages(engine, seed=0):
    """Fill each page with random K/V as it is allocated: an engine that never reads K/V it did not
    write decodes the same tokens."""
    allocate, cache = engine.allocator.allocate, engine.runner.cache
    gen = torch.Generator().manual_seed(seed)

    def poisoned():
        page = allocate()
        for kv in (cache.k_LPSKH, cache.v_LPSKH):
            kv[:, page] = torch.rand(kv[:, page].shape, generator=gen).to(kv.dtype) * 20 - 10
        return page

    engine.allocator.allocate = poisoned


def workload(mode, sampling, n=12, seed=5):
    rng = random.Random(seed)
    return [(prompt, params(max_new_tokens=rng.choice([16, 30, 45]), mode=mode, **sampling), rng.randrange(6))
            for prompt in random_prompts(n, [3, 9, 14, 20, 30], seed=seed)]


def test_the_allocator_can_keep_pages_to_spare():
    alloc = PageAllocator(6)
    assert not alloc.reserve(3, spare=4) and alloc.num_unreserved == 6  # all or nothing
    assert alloc.reserve(3, spare=3) and alloc.num_unreserved == 3
    assert not alloc.reserve(1, spare=3) and alloc.reserve(1)


def test_admission_reserves_a_request_s_start_not_its_worst_case(model):
    """Requests that may decode 40 tokens (6 pages each at worst) in a 16-page cache: reserving the
    worst case (EngineConfig.deterministic) runs 2 at once; reserving each one's prompt and first
    block (one page: a 6-token prompt opens it), with a page to spare per running request, runs 8.
    Both decode the same tokens."""
    requests = [(prompt, params(max_new_tokens=40), 0) for prompt in random_prompts(8, [6], seed=3)]
    running = {}
    for deterministic in (True, False):
        engine = make_engine(model, num_pages=16, deterministic=deterministic)
        for prompt, sampling, _ in requests:
            engine.add_request(prompt, sampling)
        engine.step()
        running[deterministic] = engine.num_running
        while engine.has_unfinished():
            engine.step()
        assert engine.num_free_pages == 16
    assert running == {True: 2, False: 8}


@pytest.mark.parametrize("caching", [True, False], ids=["prefix_cache", "no_prefix_cache"])
@pytest.mark.parametrize("sampling", [{}, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("mode", MODES)
def test_preempted_requests_decode_as_if_never_preempted(model, mode, sampling, caching):
    """A 14-page cache for requests that need up to 10 pages each, arriving over six steps: the
    newest is preempted, mid-block, mid-draft or at a block's end, one or more times, and recomputes
    what it had (from the prefix cache where its blocks are still there)."""
    requests = workload(mode, sampling)
    ref = serve(make_engine(model, prefix_caching=caching), requests)
    engine = make_engine(model, num_pages=14, prefix_caching=caching)
    poison_fresh_pages(engine)  # below: no K/V is read before it is written
    got = serve(engine, requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert engine.num_preemptions > 0 and sum(r.num_preemptions for r in got) == engine.num_preemptions
    assert [r.num_cached_tokens for r in got] == [r.num_cached_tokens for r in ref]  # the prompt's, not a resumption's
    assert engine.num_free_pages == 14 and engine.allocator.num_unreserved == 14


def test_a_speculative_request_without_lookahead_drafts_afresh_after_preemption(model):
    """Without the lookahead nothing redrafts at the end of the prefill: the draft the request had
    when preempted (positions after its last known token then) must not survive into the resumption."""
    requests = workload("speculative", {})
    ref = serve(make_engine(model, speculative_lookahead=False), requests)
    engine = make_engine(model, num_pages=14, speculative_lookahead=False)
    assert [r.token_ids for r in serve(engine, requests)] == [r.token_ids for r in ref]
    assert engine.num_preemptions > 0


def test_a_speculative_lookahead_is_dropped_rather_than_preempt_anyone(model):
    """The lookahead changes no token (it only saves a forward when a draft is accepted whole), so a
    verify whose lookahead would need a page the cache does not have runs without it."""
    requests = workload("speculative", {})
    ref = serve(make_engine(model), requests)
    plans = []
    next_work = Sequence.next_work

    def spy(seq, budget, lookahead=True):
        plans.append((seq, lookahead))
        return next_work(seq, budget, lookahead)

    engine = make_engine(model, num_pages=12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Sequence, "next_work", spy)
        got = serve(engine, requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    dropped = sum(a[0] is b[0] and a[1] and not b[1] for a, b in zip(plans, plans[1:]))
    assert dropped > 0


def test_a_resumed_request_takes_its_own_blocks_back_from_the_prefix_cache(model):
    """What a preempted request had prefilled and committed stays cached (until evicted): its
    resumption prefills from there, not from its prompt's blocks."""
    resumed = []
    next_work = Sequence.next_work

    def spy(seq, *args):
        work = next_work(seq, *args)
        if work is not None and seq.num_preemptions and work.num_prefill:
            resumed.append((work.start, seq.prefill_target, len(seq.prompt)))
        return work

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Sequence, "next_work", spy)
        serve(make_engine(model, num_pages=14), workload("diffusion", {}, seed=7))
    assert resumed and any(start > prompt for start, _, prompt in resumed)
    assert all(start % L == 0 and target > prompt - L for start, target, prompt in resumed)


@pytest.mark.parametrize("batched", [False, True], ids=["works", "denoise_batch"])
@pytest.mark.parametrize("caching", [True, False], ids=["prefix_cache", "no_prefix_cache"])
@pytest.mark.parametrize("sampling", [{}, SEEDED], ids=["greedy", "seeded"])
def test_a_request_preempted_mid_block_resumes_with_a_refresh_of_the_block(model, sampling, caching, batched):
    """With the sub-block cache, a block's K/V live in its page between steps; a preempted request
    has lost that page, so the step that resumes it feeds the whole block (what it decoded before is
    kept), whether it rides with a prefill or, every block it had being in the prefix cache, runs
    alone. Fresh pages hold random K/V here: reading the lost ones would change the tokens. On this
    model a refresh decides what the cached step would have: same tokens as never preempted.
    `batched`: plain sub-block steps run as one DenoiseBatch whenever there is one (else as Works)."""
    requests = workload("diffusion", sampling, seed=11)
    ref = make_engine(model, use_sub_block_cache=True, prefix_caching=caching)
    engine = make_engine(model, num_pages=14, use_sub_block_cache=True, prefix_caching=caching)
    for e in (ref, engine):
        e.scheduler.min_denoise_batch = 1 if batched else 10**9
    ref = serve(ref, requests)
    poison_fresh_pages(engine)
    resumed, first_steps = set(), []
    preempt, next_work = Sequence.preempt, Sequence.next_work

    def spy_preempt(seq):
        preempt(seq)
        resumed.add(seq)

    def spy_next_work(seq, *args):
        work = next_work(seq, *args)
        if seq in resumed and work is not None and (work.step is not None or work.commit):
            resumed.discard(seq)
            if work.step is not None:
                first_steps.append((work.step.feed_start, work.step.feed_stop, bool(work.num_prefill),
                                    seq.block.count(engine.config.mask_token_id)))
        return work

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Sequence, "preempt", spy_preempt)
        mp.setattr(Sequence, "next_work", spy_next_work)
        got = serve(engine, requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert first_steps and all((start, stop) == (0, L) for start, stop, *_ in first_steps)
    assert any(masks < L - 1 for *_, masks in first_steps), "some request should be preempted with part of its block decoded"
    if caching:
        assert any(not prefilled for _, _, prefilled, _ in first_steps), "some should resume from the cache alone"


def test_a_request_needing_the_whole_cache_preempts_the_others_and_finishes(model):
    """8 pages; one request needs all 8, three small ones run beside it. Nothing hangs, every request
    decodes what it decodes alone."""
    big = (random_prompts(1, [20], seed=2)[0], params(max_new_tokens=44), 1)
    small = [(prompt, params(max_new_tokens=20), 0) for prompt in random_prompts(3, [5, 9], seed=4)]
    engine = make_engine(model, num_pages=8)
    got = serve(engine, [*small, big])
    alone = make_engine(model)
    assert [r.token_ids for r in got] == [alone.generate([p], sp)[0].token_ids for p, sp, _ in [*small, big]]
    assert engine.num_preemptions > 0 and engine.num_free_pages == 8


def test_aborting_a_preempted_request_gives_nothing_back_twice(model):
    engine = make_engine(model, num_pages=10)
    for prompt, sampling, _ in workload("diffusion", {}, n=6):
        engine.add_request(prompt, sampling)
    preempted = None
    while preempted is None and engine.has_unfinished():
        engine.step()
        preempted = next((s for s in engine.scheduler.waiting if s.num_preemptions), None)
    assert preempted is not None and not preempted.pages and not preempted.num_reserved
    engine.abort(preempted.request_id)
    results = []
    while engine.has_unfinished():
        results += engine.step()
    assert {r.request_id: r.finish_reason for r in results}[preempted.request_id] == "abort"
    assert engine.num_free_pages == 10 and engine.allocator.num_unreserved == 10


def test_the_deterministic_engine_never_preempts(model):
    requests = workload("diffusion", SEEDED)
    engine = make_engine(model, num_pages=14, deterministic=True)
    got = serve(engine, requests)
    assert engine.num_preemptions == 0 and not any(r.num_preemptions for r in got)
    assert [r.token_ids for r in got] == [r.token_ids for r in serve(make_engine(model), requests)]
