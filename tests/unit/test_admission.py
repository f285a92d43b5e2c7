"""Admission and the request's bounds: first come, first served (a large request at the head of the
queue is not overtaken, nor is one waiting for a shared prefix); `max_num_seqs` bounds the running
batch; a request that ends before using its page reservation gives it back; `max_model_len` bounds
prompt + max_new_tokens inclusively. The sharp model decodes; 8-token blocks, 8-token pages."""

from __future__ import annotations

import pytest

import fdllm
from tests.unit.test_engine import make_engine, params, random_prompts, run_to_end


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def bounded_engine(model, **engine_config) -> fdllm.Engine:
    """An engine of 8-token blocks whose EngineConfig holds the bounds under test (max_num_seqs, max_model_len)."""
    return fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.4,
                                                                mask_token_id=model.config.vocab_size - 1),
                        fdllm.EngineConfig(**engine_config))


def admission_order(engine) -> tuple[list[str], dict]:
    """The order requests entered the running batch, and the results, stepping to the end."""
    admitted, done = [], {}
    while engine.has_unfinished():
        done |= {r.request_id: r for r in engine.step()}
        admitted += [s.request_id for s in engine.scheduler.running if s.request_id not in admitted]
    return admitted, done


def test_a_large_request_at_the_head_of_the_queue_is_not_overtaken(model):
    """8 pages. A runs (1 page and one spare for its next block). B, next in line, needs 7 pages to start
    (6 prompt blocks and the block it opens), which do not fit; C, behind it, needs 1. C waits behind B
    (else a stream of small requests starves B), and B is admitted first once pages free."""
    engine = make_engine(model, num_pages=8, prefix_caching=False)
    small, large = random_prompts(2, [6], seed=1), random_prompts(1, [48], seed=2)[0]
    engine.add_request(small[0], params(max_new_tokens=10), request_id="A")
    engine.step()
    engine.add_request(large, params(max_new_tokens=8), request_id="B")
    engine.add_request(small[1], params(max_new_tokens=4), request_id="C")
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["A"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["B", "C"]
    admitted, done = admission_order(engine)
    assert admitted.index("B") < admitted.index("C")
    assert {r.finish_reason for r in done.values()} == {"length"} and len(done) == 3


def test_a_request_waiting_for_a_shared_prefix_keeps_its_place(model):
    """12 pages, 8 prefill tokens a step. A prefills a 32-token prompt over 4 steps; B (the same prompt,
    then more) waits for A's blocks rather than prefill them twice; C, behind B, needs 8 pages, which
    do not fit while A runs. B is admitted as soon as A's blocks are cached, before C."""
    engine = make_engine(model, num_pages=12, max_prefill_tokens=8)
    shared = random_prompts(1, [32], seed=4)[0]
    engine.add_request(shared, params(max_new_tokens=12), request_id="A")
    engine.step()
    engine.add_request(shared + [5, 6, 7], params(max_new_tokens=4), request_id="B")
    engine.add_request(random_prompts(1, [60], seed=6)[0], params(max_new_tokens=4), request_id="C")
    admitted, done = admission_order(engine)
    assert admitted == ["A", "B", "C"]
    assert done["B"].num_cached_tokens == 32  # it did share A's blocks


def test_a_request_aborted_mid_prefill_gives_its_unused_reservation_back(model):
    """Admission reserves a request's first pages (here 6); one aborted after taking one of them (its first
    8-token prefill chunk) returns the other 5: a request that then needs every page of the cache is
    admitted and finishes (a leaked reservation keeps it waiting forever, the cache idle)."""
    engine = make_engine(model, num_pages=8, max_prefill_tokens=8)
    engine.add_request(random_prompts(1, [40], seed=7)[0], params(max_new_tokens=8), request_id="A")
    engine.step()
    engine.abort("A")
    assert run_to_end(engine)["A"].finish_reason == "abort"
    assert engine.num_free_pages == 8
    engine.add_request(random_prompts(1, [56], seed=8)[0], params(max_new_tokens=8), request_id="B")  # all 8 pages
    result = run_to_end(engine)["B"]
    assert result.finish_reason == "length" and len(result.token_ids) == 8


@pytest.mark.parametrize("max_num_seqs", [1, 3])
def test_running_requests_never_exceed_max_num_seqs(model, max_num_seqs):
    """max_num_seqs bounds the running batch (the static steps' buckets are sized by it): with pages for
    everyone, 6 requests run at most max_num_seqs at a time, and all finish."""
    engine = bounded_engine(model, num_pages=256, max_num_seqs=max_num_seqs)
    for i, prompt in enumerate(random_prompts(6, [5, 12], seed=12)):
        engine.add_request(prompt, params(max_new_tokens=12), request_id=str(i))
    most, done = 0, {}
    while engine.has_unfinished():
        done |= {r.request_id: r for r in engine.step()}
        most = max(most, engine.num_running)
    assert most == max_num_seqs and len(done) == 6


def test_a_request_that_exactly_fills_the_context_is_served(model):
    """30 prompt tokens + 10 new = max_model_len 40: served, all 10 tokens; 30 + 11 is refused."""
    engine = bounded_engine(model, num_pages=64, max_model_len=40)
    prompt = random_prompts(1, [30], seed=9)[0]
    assert len(engine.generate([prompt], params(max_new_tokens=10))[0].token_ids) == 10
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.add_request(prompt, params(max_new_tokens=11))
