"""Automatic prefix caching: sequences that start with the same blocks share their K/V pages.

The oracles are independent of the cache: the no-cache block-diffusion recompute
(`reference_generate`) and an engine with prefix caching off, whose every prompt is prefilled
from scratch. A shared page that held the wrong K/V (another prompt's, another attention mode's,
a block not yet final, an evicted and reused page) changes the tokens decoded after it.
"""

from __future__ import annotations

import random

import pytest

import fdllm
from fdllm.cache import OutOfPages, PageAllocator, block_hash
from tests.reference import MASK, reference_generate
from tests.unit.test_engine import make_engine, make_sequence, params, random_prompts

L = 8  # make_engine's block size


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def _tokens(results):
    return [r.token_ids for r in results]


# -- the allocator's cache ---------------------------------------------------------------------------
def _hold(alloc: PageAllocator, n: int) -> list[int]:
    assert alloc.reserve(n)
    return [alloc.allocate() for _ in range(n)]


def test_block_hash_keys_the_tokens_everything_before_them_and_the_attention():
    a = block_hash(None, [1, 2, 3], causal=False)
    assert a == block_hash(None, [1, 2, 3], causal=False) and len(a) == 16
    assert len({a, block_hash(None, [1, 2, 4], False), block_hash(None, [1, 2, 3], True),
                block_hash(a, [1, 2, 3], False), block_hash(block_hash(None, [0], False), [1, 2, 3], False)}) == 5
    assert block_hash(None, [2**40], False) != block_hash(None, [0], False)  # ids are not truncated


def test_a_released_cached_page_counts_as_free_and_is_shared_back():
    alloc = PageAllocator(4)
    pages = _hold(alloc, 3)
    for i, page in enumerate(pages[:2]):
        alloc.register(page, bytes([i]) * 16)
    assert alloc.lookup([b"\0" * 16, b"\1" * 16, b"\2" * 16]) == pages[:2]  # the leading run only
    assert alloc.lookup([b"\1" * 16]) == [pages[1]] and alloc.lookup([b"\7" * 16, b"\0" * 16]) == []
    alloc.release(pages, 0)
    assert alloc.num_free == 4 and alloc.num_cached == 2
    # sharing the two idle pages leaves 2 free: 3 more is refused, all or nothing
    assert not alloc.reserve(3, shared=pages[:2]) and alloc.num_unreserved == 4
    assert alloc.reserve(2, shared=pages[:2]) and alloc.num_unreserved == 0
    assert alloc.reserve(0, shared=pages[:2])  # a page already held is shared at no cost
    alloc.release(pages[:2], 2)
    assert alloc.num_unreserved == 2  # still held once
    alloc.release(pages[:2], 0)
    assert alloc.num_free == 4 and alloc.num_cached == 2


def test_duplicate_blocks_keep_the_first_page():
    alloc = PageAllocator(3)
    first, second = _hold(alloc, 2)
    alloc.register(first, b"h" * 16)
    alloc.register(second, b"h" * 16)  # a second prefill of the same block: not cached
    alloc.register(first, b"g" * 16)  # a page is cached under one hash
    assert alloc.lookup([b"h" * 16]) == [first] and alloc.lookup([b"g" * 16]) == [] and alloc.num_cached == 1
    alloc.release([first, second], 0)
    assert alloc.num_free == 3 and alloc.num_cached == 1


def test_eviction_takes_free_pages_first_then_the_least_recently_released_tail_first():
    alloc = PageAllocator(4)
    a = _hold(alloc, 2)  # a prompt of two blocks
    b = _hold(alloc, 1)
    for i, page in enumerate(a + b):
        alloc.register(page, bytes([i]) * 16)
    alloc.release(a, 0)
    alloc.release(b, 0)  # idle, least recent first: a[1] (a's tail), a[0], b[0]
    hashes = [bytes([i]) * 16 for i in range(3)]
    assert _hold(alloc, 1) == [3]  # the never-cached page goes first
    assert _hold(alloc, 1) == [a[1]] and alloc.lookup(hashes[:2]) == [a[0]]
    assert _hold(alloc, 1) == [a[0]] and alloc.lookup(hashes[:2]) == []
    assert alloc.lookup(hashes[2:]) == b and alloc.num_cached == 1


def test_borrowing_evicts_cached_pages_and_gives_them_back_free():
    alloc = PageAllocator(2)
    pages = _hold(alloc, 2)
    alloc.register(pages[0], b"x" * 16)
    alloc.release(pages, 0)
    with alloc.borrow(2) as borrowed:
        assert sorted(borrowed) == sorted(pages) and alloc.num_free == 0
    assert alloc.num_free == 2 and alloc.num_cached == 0 and alloc.lookup([b"x" * 16]) == []
    with pytest.raises(OutOfPages):
        with alloc.borrow(3):
            pass


def test_a_sequence_shares_only_whole_blocks_before_its_last_prompt_token():
    assert [make_sequence(list(range(n))).num_shareable_blocks for n in (1, 7, 8, 9, 16, 17)] == [0, 0, 0, 1, 1, 2]
    seq = make_sequence(list(range(19)))
    seq.use_cached_prefix([5, 6])
    assert seq.pages == [5, 6] and seq.num_cached == seq.num_cached_tokens == 16 and seq.num_prefill_left == 0
    ar = make_sequence(list(range(19)), params(mode="ar"))
    ar.use_cached_prefix([5, 6])
    assert ar.num_prefill_left == 3  # the prompt's last block is prefilled causally as usual
    assert [w.start for w in [ar.next_work(prefill_budget=64)]] == [16]


# -- the engine ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_attention", ["block_causal", "causal"])
def test_a_repeated_prompt_is_served_from_the_cache_and_decodes_the_same(model, prefix_attention):
    causal = prefix_attention == "causal"
    engine = make_engine(model, prefix_attention=prefix_attention, use_sub_block_cache=True)
    for prompt in random_prompts(4, [9, 16, 21, 30], seed=21):
        ref = reference_generate(model, prompt, 20, L, 4, 0.4, causal_prefix=causal)
        first, again = engine.generate([prompt], params())[0], engine.generate([prompt], params())[0]
        assert first.token_ids == again.token_ids == ref, f"prompt length {len(prompt)}"
        assert first.num_cached_tokens == 0
        assert again.num_cached_tokens == (len(prompt) - 1) // L * L  # exact multiples recompute their last block
    assert engine.num_free_pages == engine.num_pages


@pytest.mark.parametrize("mode", ["diffusion", "ar", "speculative"])
def test_requests_joining_with_a_shared_system_prompt_decode_as_without_the_cache(model, mode):
    """A 24-token system prompt, then requests that add their own questions, joining while others run
    (some while the first still prefills): each equals a run with prefix caching off."""
    rng = random.Random(5)
    system = [rng.randrange(MASK) for _ in range(24)]
    prompts = [system + [rng.randrange(MASK) for _ in range(n)] for n in (1, 5, 8, 13, 0, 19)]
    sampling = [params(mode=mode), params(mode=mode, temperature=0.8, seed=3)] * 3
    outputs = {}
    for caching in (False, True):
        engine = make_engine(model, prefix_caching=caching, use_sub_block_cache=True, max_prefill_tokens=16)
        done = {}
        for i, (prompt, p) in enumerate(zip(prompts, sampling)):
            engine.add_request(prompt, p, request_id=str(i))
            done |= {r.request_id: r for r in engine.step()}
        while engine.has_unfinished():
            done |= {r.request_id: r for r in engine.step()}
        outputs[caching] = [done[str(i)] for i in range(len(prompts))]
        assert engine.num_free_pages == engine.num_pages
    assert _tokens(outputs[True]) == _tokens(outputs[False])
    assert [r.num_cached_tokens for r in outputs[False]] == [0] * 6
    # request 1 joins when the first has prefilled two of the three system blocks (16-token chunks): it
    # waits a step for the third; request 4's prompt is the system prompt, whose last block it computes
    assert [r.num_cached_tokens for r in outputs[True]] == [0, 24, 24, 24, 16, 24]


@pytest.mark.parametrize("mode,prefix_attention", [("diffusion", "block_causal"), ("diffusion", "causal"), ("ar", "block_causal"),
                                                   ("speculative", "block_causal")])
@pytest.mark.parametrize("first_len,final_blocks", [(13, 4), (12, 3)])
def test_the_next_turn_of_a_chat_reuses_the_blocks_the_last_answer_committed(model, mode, prefix_attention, first_len,
                                                                            final_blocks):
    """20 answer tokens after 13 prompt tokens reach position 32: blocks 0-3 are final (diffusion commits
    the block after it is decoded; AR has K/V for every token but the last). After 12 they end at 31,
    in block 3, which diffusion never commits and whose last token AR never feeds: 3 final blocks."""
    if mode == "speculative" and first_len == 12:
        final_blocks = 4  # its last verify also wrote K/V for position 31 (and settled tokens past the output's cut)
    engine = make_engine(model, prefix_attention=prefix_attention)
    off = make_engine(model, prefix_attention=prefix_attention, prefix_caching=False)
    first = random_prompts(1, [first_len], seed=41)[0]
    answer = engine.generate([first], params(mode=mode))[0]
    assert engine.allocator.num_cached == final_blocks
    turn = first + answer.token_ids + random_prompts(1, [6], seed=42)[0]
    again = engine.generate([turn], params(mode=mode))[0]
    assert again.num_cached_tokens == final_blocks * L
    assert again.token_ids == off.generate([turn], params(mode=mode))[0].token_ids


def test_blocks_prefilled_under_one_attention_are_never_shared_with_the_other(model):
    """A block-causal checkpoint prefills a diffusion prompt block-causally and an AR prompt causally:
    the same tokens have different K/V. A causal-prefix checkpoint's are the same, so they share."""
    prompt = random_prompts(1, [21], seed=43)[0]
    for prefix_attention, shared in (("block_causal", 0), ("causal", 16)):
        engine = make_engine(model, prefix_attention=prefix_attention)
        off = make_engine(model, prefix_attention=prefix_attention, prefix_caching=False)
        for first, second in (("diffusion", "ar"), ("ar", "diffusion")):
            engine.generate([prompt], params(mode=first))
            got = engine.generate([prompt], params(mode=second))[0]
            assert got.num_cached_tokens == shared, (prefix_attention, first, second)
            assert got.token_ids == off.generate([prompt], params(mode=second))[0].token_ids
            engine.allocator.__init__(engine.num_pages)  # an empty cache for the next pair


def test_an_aborted_prefill_shares_only_what_it_finished(model):
    engine = make_engine(model, max_prefill_tokens=8)
    prompt = random_prompts(1, [30], seed=44)[0]
    engine.add_request(prompt, params(), request_id="a")
    engine.step()  # one 8-token chunk of 24
    engine.abort("a")
    engine.step()
    assert engine.num_free_pages == engine.num_pages and engine.allocator.num_cached == 1
    got = engine.generate([prompt], params())[0]
    assert got.num_cached_tokens == 8 and got.token_ids == reference_generate(model, prompt, 20, L, 4, 0.4)


def test_a_small_cache_under_churn_evicts_and_decodes_as_without_it(model):
    """Prompts drawn from three shared prefixes with their own tails, every mode, greedy and seeded,
    joining at random steps into a cache of 16 pages (two or three requests' worth): cached pages
    are shared, evicted and reused many times over, and every request decodes as with caching off."""
    rng = random.Random(45)
    heads = [[rng.randrange(MASK) for _ in range(n)] for n in (16, 20, 9)]
    requests = []
    for i in range(24):
        prompt = rng.choice(heads) + [rng.randrange(MASK) for _ in range(rng.randrange(0, 12))]
        sampling = params(mode=rng.choice(["diffusion", "ar", "speculative"]), max_new_tokens=rng.randrange(4, 20),
                          **rng.choice([{}, {"temperature": 0.8, "seed": i}]))
        requests.append((prompt, sampling, rng.randrange(3)))
    outputs = {}
    for caching in (False, True):
        engine = make_engine(model, num_pages=16, prefix_caching=caching, use_sub_block_cache=True, max_prefill_tokens=16)
        done = {}
        for i, (prompt, sampling, wait) in enumerate(requests):
            engine.add_request(prompt, sampling, request_id=str(i))
            for _ in range(wait):
                done |= {r.request_id: r for r in engine.step()}
        while engine.has_unfinished():
            done |= {r.request_id: r for r in engine.step()}
        outputs[caching] = [done[str(i)] for i in range(len(requests))]
        assert engine.num_free_pages == engine.num_pages
        assert all(r.finish_reason == "length" for r in done.values())
    assert _tokens(outputs[True]) == _tokens(outputs[False])
    hits = [r.num_cached_tokens for r in outputs[True]]
    assert sum(h > 0 for h in hits) >= 8, hits


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_requests_sent_together_prefill_their_shared_prompt_once(model, mode):
    """n choices of one prompt (or a burst sharing a system prompt) arrive in one step: the first
    prefills the shared blocks (in 8-token chunks here, over three steps), the others wait for them
    instead of computing them again, and everyone decodes as with caching off."""
    prompts = [random_prompts(1, [26], seed=46)[0]] * 3 + [random_prompts(1, [26], seed=46)[0][:20] + [1, 2]]
    p = [params(mode=mode), params(mode=mode, temperature=0.8, seed=1), params(mode=mode, temperature=0.8, seed=2),
         params(mode=mode)]
    on = make_engine(model, max_prefill_tokens=8).generate(prompts, p)
    off = make_engine(model, max_prefill_tokens=8, prefix_caching=False).generate(prompts, p)
    assert _tokens(on) == _tokens(off)
    assert [r.num_cached_tokens for r in on] == [0, 24, 24, 16]


def test_a_request_waiting_for_a_shared_prefix_holds_back_no_one_behind_it(model):
    """W waits for the blocks O is prefilling (8 tokens a step); X, queued behind W and sharing
    nothing, is admitted at once and starts decoding the next step, as with caching off."""
    head = random_prompts(1, [40], seed=47)[0]
    engine = make_engine(model, max_prefill_tokens=8)
    engine.add_request(head, params(), request_id="O")
    engine.step()
    engine.add_request(head[:32] + [1, 2], params(), request_id="W")
    engine.add_request([7, 8, 9], params(), request_id="X")
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["O", "X"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["W"]
    done = {}
    while engine.has_unfinished():
        done |= {r.request_id: r for r in engine.step()}
    assert done["W"].num_cached_tokens == 32
    off = make_engine(model, prefix_caching=False)
    assert [done[r].token_ids for r in "OWX"] == [off.generate([p], params())[0].token_ids
                                                  for p in (head, head[:32] + [1, 2], [7, 8, 9])]


@pytest.mark.parametrize("array_batches", [True, False], ids=["array-batches", "per-work"])
def test_blocks_are_in_the_cache_as_soon_as_a_step_makes_them_final(model, array_batches):
    """After every step, each running request's final blocks are in the prefix cache (a request arriving
    next shares them): its prompt blocks once prefilled, a diffusion request's committed blocks, every
    block of an AR or speculative request whose tokens all have K/V (all known tokens but the last)."""
    modes = ["ar"] * 5 + ["diffusion"] * 3 + ["speculative"] * 2
    engine = make_engine(model, max_prefill_tokens=24)  # prompts prefill over a few steps
    engine.scheduler.array_batches = array_batches
    for prompt, mode in zip(random_prompts(len(modes), [3, 9, 17, 20], seed=53), modes):
        engine.add_request(prompt, params(mode=mode, max_new_tokens=30))
    grown = 0  # blocks found final past the prompt's, while the request runs
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.num_prefill_left:
                known = seq.num_cached
            else:
                known = len(seq.tokens) - 1 if seq.is_causal else len(seq.tokens)
            final = known // L
            assert engine.allocator.lookup([seq.block_hash(j) for j in range(final)]) == seq.pages[:final], seq.request_id
            grown += final > len(seq.prompt) // L
    assert grown > 20


@pytest.mark.parametrize("first_salt,again_salt,shared", [("tenant-a", "tenant-a", True), ("tenant-a", "tenant-b", False),
                                                         (None, "tenant-a", False), ("tenant-a", None, False)])
def test_a_cache_salt_shares_blocks_only_with_the_same_salt(model, first_salt, again_salt, shared):
    """Without salts any client read from `cached_tokens` (or its time to first token) whether another had
    sent a prompt; vLLM's cache_salt keys a request's blocks by its salt too. The tokens are the same."""
    engine = make_engine(model)  # no sub-block cache: the reference's exact schedule
    prompt = random_prompts(1, [21], seed=5)[0]
    first = engine.generate([prompt], params(max_new_tokens=12, cache_salt=first_salt))[0]
    again = engine.generate([prompt], params(max_new_tokens=12, cache_salt=again_salt))[0]
    assert first.token_ids == again.token_ids == reference_generate(model, prompt, 12, L, 4, 0.4)
    assert again.num_cached_tokens == (16 if shared else 0)
    assert engine.num_free_pages == engine.num_pages


@pytest.mark.parametrize("salt", ["", 5, b"x"])
def test_a_cache_salt_is_a_non_empty_string(salt):
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        fdllm.SamplingParams(cache_salt=salt)
