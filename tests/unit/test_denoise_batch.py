"""`DenoiseBatch` (plain sub-block steps of many sequences as array operations) against one `Work`
per sequence, token for token, and its failure isolation.

The per-Work path is itself held against the no-cache and DualCache references (test_engine.py,
test_sub_block_cache_oracle.py, which also run the batch path against those references directly).
"""

from __future__ import annotations

import pytest

import fdllm
from fdllm.engine import denoise
from fdllm.engine.scheduler import MIN_DENOISE_BATCH
from tests.unit.test_engine import MASK, make_engine, make_sequence, params, random_prompts
from tests.unit.test_static_steps import dynamic_only, run_mixed


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def per_work(engine):
    engine.scheduler.array_batches = False
    return engine


def count_batches(engine, batches: list | None = None, kind: type = denoise.DenoiseBatch) -> list[int]:
    """The size of every array batch of `kind` the engine's steps make (0: none), and into `batches`
    each batch (or None)."""
    sizes, schedule = [], engine.scheduler.schedule

    def spy():
        works, step_batches, failed = schedule()
        batch = next((b for b in step_batches if isinstance(b, kind)), None)
        sizes.append(0 if batch is None else len(batch.seqs))
        if batches is not None:
            batches.append(batch)
        return works, step_batches, failed

    engine.scheduler.schedule = spy
    return sizes


# Logit adjustments of batched diffusion requests (`StepInputs.biased`): penalties over the prompt,
# output and block, a bias, and stop tokens banned before min_tokens.
ADJUSTED = [{"repetition_penalty": 1.3, "frequency_penalty": 0.4}, {"logit_bias": {5: 2.0, 9: -100.0}},
            {"presence_penalty": 0.8, "min_tokens": 9, "stop_token_ids": (3, 11), "ignore_eos": False}]


def mixed_requests(temperature: float, n: int = 12):
    """Mostly diffusion requests (greedy and seeded sampling, several thresholds, some with the block
    lookahead, some adjusting their logits) beside AR, speculative and entropy-budget ones, which stay Works."""
    prompts = random_prompts(n, [1, 3, 8, 9, 13, 17, 24], seed=23)
    out = []
    for i, p in enumerate(prompts):
        kw = {"max_new_tokens": 25 + i % 7, "temperature": temperature if i % 3 else 0.0, "top_p": 0.9, "top_k": 20,
              "seed": 7 + i, "threshold": 0.2 + 0.15 * (i % 4), "block_lookahead": i % 5 == 2}
        if i % 4 in (1, 2):
            kw |= ADJUSTED[i % len(ADJUSTED)]
        if i % 6 == 5:
            kw |= {"mode": ("ar", "speculative")[i % 2], "threshold": None, "block_lookahead": False}
        elif i == 4:
            kw |= {"selection": "entropy_budget", "threshold": None, "entropy_budget": 0.5}
        out.append((p, params(**kw)))
    return out


@pytest.mark.parametrize("use_sub_block_cache", [False, True], ids=["cache-off", "sub-block-cache"])
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "seeded-sampling"])
def test_batch_equals_one_work_per_sequence(model, use_sub_block_cache, temperature):
    requests = mixed_requests(temperature)
    batched = make_engine(model, use_sub_block_cache=use_sub_block_cache)
    batched.scheduler.min_denoise_batch = 2  # this sharp model decodes fast: batches would end early
    sizes = count_batches(batched)
    got = run_mixed(batched, requests)
    assert got == run_mixed(per_work(make_engine(model, use_sub_block_cache=use_sub_block_cache)), requests)
    assert max(sizes) >= 6 and sum(s > 0 for s in sizes) >= 5, sizes
    # the packed (dynamic) layout with batched rows, as prefill steps of joining requests run it
    assert got == run_mixed(dynamic_only(make_engine(model, use_sub_block_cache=use_sub_block_cache)), requests)


@pytest.mark.parametrize("block_size,sub_block_size", [(8, 8), (16, 4), (4, 1)])
def test_batch_of_every_size_equals_one_work_per_sequence(model, block_size, sub_block_size):
    """Batches down to one sequence (min_denoise_batch=1), sub-blocks as large as the block and of one token."""
    requests = mixed_requests(0.5, n=6)
    cfg = {"block_size": block_size, "sub_block_size": sub_block_size, "use_sub_block_cache": True}
    batched = make_engine(model, **cfg)
    batched.scheduler.min_denoise_batch = 1
    sizes = count_batches(batched)
    assert run_mixed(batched, requests) == run_mixed(per_work(make_engine(model, **cfg)), requests)
    assert 1 in sizes


def opened(threshold: float):
    """A sequence whose prompt (two whole blocks) is prefilled and whose first block is opened with token 7."""
    from fdllm.engine.sequence import Predictions

    seq = make_sequence(random_prompts(1, [16])[0], threshold=threshold)
    seq.apply(seq.next_work(prefill_budget=64), Predictions(tokens=[7], probs=[1.0]))
    return seq


def test_the_threshold_rule_on_hand_made_predictions():
    """c_i > threshold commits (a probability equal to it does not), the most confident is always
    committed (the first of equal ones), known offsets are never written; the same as a Work's step."""
    from fdllm.engine.sequence import Predictions

    # per sequence: its threshold, and the predictions of its sub-block's masked offsets 1, 2, 3
    cases = [(0.9, [21, 22, 23], [0.9, 0.95, 0.9]), (0.9, [31, 32, 33], [0.5, 0.7, 0.7]), (0.25, [41, 42, 43], [0.3, 0.25, 0.5])]
    seqs = [opened(threshold) for threshold, _, _ in cases]
    batch = denoise.DenoiseBatch(seqs)
    assert batch.inputs.q_lens.tolist() == [8, 8, 8]  # a block's first step refreshes it
    batch.tokens = [t for _, tokens, _ in cases for t in tokens]
    batch.probs = [p for _, _, probs in cases for p in probs]
    batch.apply()
    assert [s.block[:4] for s in seqs] == [[7, MASK, 22, MASK], [7, MASK, 32, MASK], [7, 41, MASK, 43]]
    assert [s.sub for s in seqs] == [(0, 4)] * 3 and [s.num_forwards for s in seqs] == [2] * 3
    assert batch.settling == [seqs[2]]  # offset 1, the first mask, was committed there only
    for (threshold, tokens, probs), seq in zip(cases, seqs):  # one Work per sequence: the same blocks
        alone = opened(threshold)
        alone.apply(alone.next_work(prefill_budget=64), Predictions(tokens=[0, *tokens], probs=[0.0, *probs]))
        assert alone.block == seq.block and alone.sub == seq.sub


def test_fewer_sequences_than_the_minimum_run_as_works(model):
    prompts = random_prompts(MIN_DENOISE_BATCH, [5, 9], seed=3)
    for n, batched in ((MIN_DENOISE_BATCH - 1, False), (MIN_DENOISE_BATCH, True)):
        engine = make_engine(model)
        sizes = count_batches(engine)
        engine.generate(prompts[:n], params(max_new_tokens=16))
        assert (max(sizes) == n) is batched and max(sizes) in (0, n)


def test_a_failing_batch_fails_its_requests_alone_and_the_engine_keeps_serving(model, monkeypatch, caplog):
    prompts = random_prompts(MIN_DENOISE_BATCH + 1, [3, 6, 11], seed=29)
    ar = params(mode="ar", max_new_tokens=12)
    alone_ar = make_engine(model).generate(prompts[:1], ar)[0]
    engine = make_engine(model)
    rids = [engine.add_request(p, params()) for p in prompts[1:]]
    ar_id = engine.add_request(prompts[0], ar)
    engine.step()  # prefill
    apply = denoise.DenoiseBatch.apply

    def failing_once(self):
        monkeypatch.setattr(denoise.DenoiseBatch, "apply", apply)
        raise RuntimeError("injected batch failure")

    monkeypatch.setattr(denoise.DenoiseBatch, "apply", failing_once)
    done = {}
    with caplog.at_level("ERROR", logger="fdllm.engine.engine"):
        while engine.has_unfinished():
            done |= {r.request_id: r for r in engine.step()}
    assert {done[r].finish_reason for r in rids} == {"error"} and "injected batch failure" in done[rids[0]].error
    assert all(repr(r) in caplog.text for r in rids)  # the log names the requests it failed
    assert done[ar_id].token_ids == alone_ar.token_ids  # a Work beside the batch: unaffected
    assert engine.num_free_pages == engine.num_pages
    again = engine.generate(prompts[1:], params())
    assert [r.token_ids for r in again] == [r.token_ids for r in make_engine(model).generate(prompts[1:], params())]


def finish(engine) -> dict:
    """Step until every request is done; the results by request id."""
    done = {}
    while engine.has_unfinished():
        done |= {r.request_id: r for r in engine.step()}
    return done


def check_a_batched_request_failing_to_settle_fails_alone(model, kind: type, sampling: fdllm.SamplingParams,
                                                          prompts: list[list[int]]) -> None:
    """One request of an array batch of `kind` fails in `settle` (its stop checks and streaming, per
    request): it alone ends with the error, the others decode as they do alone."""
    alone = make_engine(model).generate(prompts, sampling)
    engine = make_engine(model)
    batches = []
    count_batches(engine, batches, kind=kind)
    rids = [engine.add_request(p, sampling) for p in prompts]
    engine.step()
    victim = engine.scheduler.find(rids[1])
    settle = victim.settle

    def broken_settle():  # in a batched step only (a Work's apply settles too)
        if batches[-1] is None or victim not in batches[-1].seqs:
            return settle()
        raise RuntimeError("injected failure")

    victim.settle = broken_settle
    done = finish(engine)
    assert done[rids[1]].finish_reason == "error" and "injected failure" in done[rids[1]].error
    assert [done[r].token_ids for i, r in enumerate(rids) if i != 1] == [a.token_ids for i, a in enumerate(alone) if i != 1]
    assert engine.num_free_pages == engine.num_pages


def test_a_batched_request_failing_to_settle_fails_alone(model):
    prompts = random_prompts(MIN_DENOISE_BATCH + 2, [4, 9, 12], seed=31)
    check_a_batched_request_failing_to_settle_fails_alone(model, denoise.DenoiseBatch, params(), prompts)


def test_a_batch_that_cannot_be_planned_fails_its_requests_alone(model, monkeypatch):
    prompts = random_prompts(MIN_DENOISE_BATCH, [4, 9], seed=37)
    engine = make_engine(model)
    rids = [engine.add_request(p, params()) for p in prompts]
    ar_id = engine.add_request([5, 6, 7], params(mode="ar", max_new_tokens=8))
    engine.step()
    monkeypatch.setattr(denoise.DenoiseBatch, "__init__", lambda self, seqs: 1 / 0)
    done = {}
    while engine.has_unfinished():
        done |= {r.request_id: r for r in engine.step()}
    assert {done[r].finish_reason for r in rids} == {"error"} and "ZeroDivisionError" in done[rids[0]].error
    assert done[ar_id].finish_reason == "length" and len(done[ar_id].token_ids) == 8
    assert engine.num_free_pages == engine.num_pages


def test_mask_token_is_never_committed_by_a_batch(model):
    """Every batched candidate's token comes from the head, whose mask logit is -inf: no output
    token is the mask, and every request finishes."""
    prompts = random_prompts(MIN_DENOISE_BATCH + 4, [2, 7, 15], seed=41)
    for res in make_engine(model, threshold=0.05).generate(prompts, params(max_new_tokens=24)):
        assert len(res.token_ids) == 24 and MASK not in res.token_ids


def check_callback_aborting_batched_requests_mid_step(model, kind: type, caller: fdllm.SamplingParams,
                                                       batched: fdllm.SamplingParams, prompts: list[list[int]]) -> None:
    """The first request (a Work's) aborts the others, which run in an array batch of `kind`, from its
    streaming callback in the middle of a step: they end as "abort" (their pages back at once), the
    batch's results for them are dropped (what they streamed is their result), the caller's own request
    decodes as it does alone."""
    alone = make_engine(model).generate(prompts[:1], caller)[0]
    engine = make_engine(model)
    batches, rids, streamed = [], [], {}
    count_batches(engine, batches, kind=kind)

    def abort_the_others(rid, tokens, finished):
        if any(b is not None for b in batches):  # once the others run batched
            for other in rids[1:]:
                engine.abort(other)

    def record(rid, tokens, finished):
        streamed.setdefault(rid, []).extend(tokens)

    rids.append(engine.add_request(prompts[0], caller, on_tokens=abort_the_others))
    rids += [engine.add_request(p, batched, on_tokens=record) for p in prompts[1:]]
    results = []
    while engine.has_unfinished():
        results += engine.step()
    done = {r.request_id: r for r in results}
    assert sorted(r.request_id for r in results) == sorted(rids)  # each reported once
    assert [done[r].finish_reason for r in rids] == ["length"] + ["abort"] * (len(rids) - 1)
    assert done[rids[0]].token_ids == alone.token_ids
    assert all(streamed.get(r, []) == done[r].token_ids for r in rids[1:])
    assert engine.num_free_pages == engine.num_pages


def test_callback_aborting_batched_requests_mid_step_is_safe(model):
    prompts = random_prompts(MIN_DENOISE_BATCH + 2, [4, 9, 12], seed=53)
    check_callback_aborting_batched_requests_mid_step(model, denoise.DenoiseBatch, params(mode="ar", max_new_tokens=12),
                                                      params(), prompts)
