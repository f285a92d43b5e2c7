"""`ARBatch` (AR next-token steps of many sequences as array operations) against one `Work` per
sequence, token for token and input array for input array, and its failure isolation.

The per-Work path is itself held against HF transformers' generate (test_engine.py's
test_block_size_one_threshold_one_equals_hf_generate, whose four AR requests run as an ARBatch).
"""

from __future__ import annotations

import numpy as np
import pytest

import fdllm
from fdllm.decoding import StopCriteria
from fdllm.engine import ar_batch, denoise
from fdllm.engine.inputs import StepInputs
from fdllm.engine.scheduler import MIN_AR_BATCH, MIN_DENOISE_BATCH
from fdllm.engine.sequence import Predictions
from tests.unit.test_denoise_batch import (
    check_a_batched_request_failing_to_settle_fails_alone,
    check_callback_aborting_batched_requests_mid_step,
    count_batches,
    finish,
    per_work,
)
from tests.unit.test_engine import make_engine, make_sequence, params, random_prompts
from tests.unit.test_static_steps import dynamic_only, run_mixed


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


# AR requests of every kind an ARBatch plans: greedy, seeded sampling, logits adjusted (greedy and
# sampled), stop tokens, stop tokens banned before min_tokens.
AR_KINDS = [{}, {"temperature": 0.8, "top_p": 0.9, "top_k": 20}, {"repetition_penalty": 1.3, "frequency_penalty": 0.4},
            {"logit_bias": {5: 2.0, 9: -100.0}}, {"temperature": 1.2, "repetition_penalty": 1.2, "presence_penalty": 0.5},
            {"presence_penalty": 0.8, "min_tokens": 9, "stop_token_ids": (67, 11), "ignore_eos": False},
            {"stop_token_ids": (70, 37), "ignore_eos": False}]  # tokens the test model often gives


def mixed_requests(n: int = 14):
    """Mostly AR requests of every kind beside diffusion and speculative ones (Works or a DenoiseBatch)."""
    out = []
    for i, p in enumerate(random_prompts(n, [1, 3, 8, 9, 13, 17, 24], seed=43)):
        kw = {"mode": "ar", "max_new_tokens": 18 + i % 9, "seed": 11 + i} | AR_KINDS[i % len(AR_KINDS)]
        if i % 5 == 4:
            kw["mode"] = ("diffusion", "speculative")[i % 2]
        out.append((p, params(**kw)))
    return out


def sequences(n: int):
    """n AR sequences of every kind, their prompts prefilled by hand, some with output already."""
    seqs = []
    for i, prompt in enumerate(random_prompts(n, [1, 5, 8, 17], seed=47)):
        sampling = params(mode="ar", seed=3 + i, **AR_KINDS[i % len(AR_KINDS)])
        seq = make_sequence(prompt, sampling)
        seq.criteria = StopCriteria(max_new_tokens=20, stop_token_ids=frozenset(sampling.stop_token_ids))
        seq.pages = list(range(10 * i, 10 * i + 4))
        seq.apply(seq.next_work(prefill_budget=64), Predictions(tokens=[20 + i], probs=[1.0]))
        for t in range(i % 3):  # a few more tokens
            seq.apply(seq.next_work(prefill_budget=64), Predictions(tokens=[30 + t], probs=[1.0]))
        seqs.append(seq)
    return seqs


def test_inputs_are_those_of_one_work_per_sequence():
    """Every array the runner reads (fed tokens, rows, candidates, sampling parameters and draw counters,
    logit adjustments) is what `StepInputs.from_works` builds from each sequence's `Work`."""
    seqs = sequences(9)
    assert all(s.batch_ar for s in seqs)
    batch = ar_batch.ARBatch(seqs)
    works, _ = StepInputs.from_works([s.next_work(prefill_budget=64) for s in seqs])
    got, want = vars(batch.inputs), vars(works)
    for name in ("ids", "starts", "q_lens", "kv_lens", "causal", "candidates", "entropy"):
        assert np.array_equal(got[name], want[name]), name
    assert got["pages"] == want["pages"]
    for name in ("prefill", "max_q_len", "max_pages", "any_causal"):
        assert got[name] == want[name], name
    for name, a in works.sampled.arrays().items():
        assert np.array_equal(batch.inputs.sampled.arrays()[name], a), name
    assert len(batch.inputs.sampled) == 2 and len(batch.inputs.biased) == 4  # the kinds are all there
    for name, a in works.biased.arrays().items():
        assert np.array_equal(batch.inputs.biased.arrays()[name], a), name


def test_apply_appends_each_token_as_a_work_does():
    seqs, alone = sequences(7), sequences(7)
    tokens = [41, 42, 43, 44, 45, 67, 70]  # the last two: stop tokens of their requests
    batch = ar_batch.ARBatch(seqs)
    batch.tokens, batch.probs = np.array(tokens, dtype=np.float32), np.full(7, 0.5)
    batch.apply()
    assert batch.settling == seqs
    settled = [s.settle() for s in seqs]
    for seq, token, other in zip(seqs, tokens, alone):
        expected = other.apply(other.next_work(prefill_budget=64), Predictions(tokens=[token], probs=[0.5]))
        assert seq.tokens == other.tokens and seq.tokens[-1] == token
        assert (seq.num_forwards, seq.num_decode_steps) == (other.num_forwards, other.num_decode_steps)
        assert seq.output == other.output and settled[seqs.index(seq)] == expected
        assert seq.finish_reason == other.finish_reason
    assert [s.finish_reason for s in seqs] == [None] * 5 + ["stop"] * 2


@pytest.mark.parametrize("layout", ["static", "dynamic"])
def test_batch_equals_one_work_per_sequence(model, layout):
    requests = mixed_requests()
    batched = make_engine(model, use_sub_block_cache=True)
    batched.scheduler.min_ar_batch = 2
    sizes = count_batches(batched, kind=ar_batch.ARBatch)
    if layout == "dynamic":  # the packed layout, as prefill steps of joining requests run it
        dynamic_only(batched)
    got = run_mixed(batched, requests)
    assert got == run_mixed(per_work(make_engine(model, use_sub_block_cache=True)), requests)
    assert max(sizes) >= 10 and sum(s > 0 for s in sizes) >= 8, sizes
    assert any(len(t) < 18 for t in got)  # some stopped on a stop token


def test_batch_of_every_size_equals_one_work_per_sequence(model):
    requests = mixed_requests(4)
    batched = make_engine(model)
    batched.scheduler.min_ar_batch = 1
    sizes = count_batches(batched, kind=ar_batch.ARBatch)
    assert run_mixed(batched, requests, join_at=2) == run_mixed(per_work(make_engine(model)), requests, join_at=2)
    assert {1, 2, 3} <= set(sizes), sizes


def test_fewer_sequences_than_the_minimum_run_as_works(model):
    prompts = random_prompts(MIN_AR_BATCH, [5, 9], seed=3)
    for n, batched in ((MIN_AR_BATCH - 1, False), (MIN_AR_BATCH, True)):
        engine = make_engine(model)
        sizes = count_batches(engine, kind=ar_batch.ARBatch)
        engine.generate(prompts[:n], params(mode="ar", max_new_tokens=8))
        assert (max(sizes) == n) is batched and max(sizes) in (0, n)


def both_batches(model):
    """An engine running MIN_DENOISE_BATCH diffusion and MIN_AR_BATCH AR requests (prefilled): each
    step makes a DenoiseBatch and an ARBatch. Returns the engine, each kind's request ids, and each
    kind's results when the requests run alone."""
    prompts = random_prompts(MIN_DENOISE_BATCH + MIN_AR_BATCH, [4, 9, 12], seed=59)
    kinds = {denoise.DenoiseBatch: (prompts[:MIN_DENOISE_BATCH], params(max_new_tokens=16)),
             ar_batch.ARBatch: (prompts[MIN_DENOISE_BATCH:], params(mode="ar", max_new_tokens=16))}
    engine = make_engine(model, max_prefill_tokens=256)  # every prompt prefilled in the first step
    rids = {kind: [engine.add_request(p, sp) for p in ps] for kind, (ps, sp) in kinds.items()}
    engine.step()
    alone = {kind: [make_engine(model).generate([p], sp)[0].token_ids for p in ps] for kind, (ps, sp) in kinds.items()}
    return engine, rids, alone


@pytest.mark.parametrize("failing", [denoise.DenoiseBatch, ar_batch.ARBatch], ids=["denoise", "ar"])
def test_a_failing_batch_fails_its_requests_alone_and_the_engine_keeps_serving(model, monkeypatch, caplog, failing):
    """One array batch's code fails once: its requests fail, the other batch of the same step is still
    applied (its requests decode as they do alone), and the engine serves the next requests."""
    engine, rids, alone = both_batches(model)
    (other,) = set(rids) - {failing}
    apply, failed = failing.apply, []

    def failing_once(self):
        monkeypatch.setattr(failing, "apply", apply)
        failed.append(self)
        raise RuntimeError("injected batch failure")

    monkeypatch.setattr(failing, "apply", failing_once)
    others, done = [engine.scheduler.find(r) for r in rids[other]], {}
    with caplog.at_level("ERROR", logger="fdllm.engine.engine"):
        while not failed:
            forwards = [seq.num_forwards for seq in others]
            done |= {r.request_id: r for r in engine.step()}
        assert [seq.num_forwards for seq in others] == [n + 1 for n in forwards]  # the failing step's results taken
        done |= finish(engine)
    assert {done[r].finish_reason for r in rids[failing]} == {"error"}
    assert "injected batch failure" in done[rids[failing][0]].error
    assert all(repr(r) in caplog.text for r in rids[failing]) and failing.__name__ in caplog.text
    assert [done[r].token_ids for r in rids[other]] == alone[other]
    assert engine.num_free_pages == engine.num_pages
    prompts = random_prompts(MIN_AR_BATCH, [4, 9], seed=71)
    ar_params = params(mode="ar", max_new_tokens=10)
    again = engine.generate(prompts, ar_params)
    assert [r.token_ids for r in again] == [r.token_ids for r in make_engine(model).generate(prompts, ar_params)]


def test_a_batch_that_cannot_be_planned_fails_its_requests_alone(model, monkeypatch):
    engine, rids, alone = both_batches(model)
    monkeypatch.setattr(ar_batch.ARBatch, "__init__", lambda self, seqs: 1 / 0)
    done = finish(engine)
    assert {done[r].finish_reason for r in rids[ar_batch.ARBatch]} == {"error"}
    assert "ZeroDivisionError" in done[rids[ar_batch.ARBatch][0]].error
    assert [done[r].token_ids for r in rids[denoise.DenoiseBatch]] == alone[denoise.DenoiseBatch]
    assert engine.num_free_pages == engine.num_pages


def test_a_batched_request_failing_to_settle_fails_alone(model):
    prompts = random_prompts(MIN_AR_BATCH + 2, [4, 9, 12], seed=61)
    check_a_batched_request_failing_to_settle_fails_alone(model, ar_batch.ARBatch, params(mode="ar", max_new_tokens=14),
                                                          prompts)


def test_callback_aborting_batched_requests_mid_step_is_safe(model):
    prompts = random_prompts(MIN_AR_BATCH + 1, [4, 9, 12], seed=67)
    check_callback_aborting_batched_requests_mid_step(model, ar_batch.ARBatch, params(max_new_tokens=16),
                                                      params(mode="ar", max_new_tokens=16), prompts)
