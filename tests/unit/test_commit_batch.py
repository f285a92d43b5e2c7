"""`CommitBatch` (the block commits of many diffusion sequences as array operations) against one `Work`
per sequence, token for token and input array for input array, and its failure isolation.

The per-Work path is itself held against the no-cache and DualCache references (test_engine.py,
test_sub_block_cache_oracle.py), whose requests' commits now run batched where four or more coincide.
"""

from __future__ import annotations

import numpy as np
import pytest

import fdllm
from fdllm.engine import commit_batch
from fdllm.engine.inputs import StepInputs
from fdllm.engine.scheduler import MIN_COMMIT_BATCH
from fdllm.engine.sequence import Predictions
from tests.unit.test_ar_batch import AR_KINDS
from tests.unit.test_denoise_batch import (
    check_a_batched_request_failing_to_settle_fails_alone,
    check_callback_aborting_batched_requests_mid_step,
    count_batches,
    per_work,
)
from tests.unit.test_engine import MASK, make_engine, make_sequence, params, random_prompts
from tests.unit.test_static_steps import dynamic_only, run_mixed


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def committing(n: int, causal_prefix: bool = False):
    """n diffusion sequences (block 8) of every kind of request, their prompts prefilled and their first
    block decoded by hand: each one's next step commits it."""
    seqs = []
    for i, prompt in enumerate(random_prompts(n, [3, 8, 13, 17], seed=71)):
        seq = make_sequence(prompt, params(seed=5 + i, **AR_KINDS[i % len(AR_KINDS)]), causal_prefix=causal_prefix)
        seq.pages = list(range(10 * i, 10 * i + 5))
        while seq.block is None or MASK in seq.block:  # prefill (and open the block), then fill its masks
            work = seq.next_work(prefill_budget=64)
            seq.apply(work, Predictions(tokens=[40 + r for r in range(len(work.logit_rows))], probs=[1.0] * len(work.logit_rows)))
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("causal_prefix", [False, True], ids=["block-causal", "causal-prefix"])
def test_inputs_are_those_of_one_work_per_sequence(causal_prefix):
    """Every array the runner reads (the fed blocks, rows, the candidate row, the logit adjustments,
    greedy even for sampling requests) is what `StepInputs.from_works` builds from each commit's Work."""
    seqs = committing(9, causal_prefix)
    assert all(s.batch_commit for s in seqs)
    works = [s.next_work(prefill_budget=64) for s in seqs]
    assert all(w.commit for w in works)
    batch = commit_batch.CommitBatch(seqs)
    want, _ = StepInputs.from_works(works)
    got, want = vars(batch.inputs), vars(want)
    for name in ("ids", "starts", "q_lens", "kv_lens", "causal", "candidates", "entropy"):
        assert np.array_equal(got[name], want[name]), name
    for name in ("pages", "prefill", "max_q_len", "max_pages", "any_causal"):
        assert got[name] == want[name], name
    assert len(batch.inputs.sampled) == 0 and len(batch.inputs.biased) == 4  # sampling requests commit greedily
    for name, a in want["biased"].arrays().items():
        assert np.array_equal(batch.inputs.biased.arrays()[name], a), name


def test_apply_commits_each_block_as_a_work_does():
    seqs, alone = committing(5), committing(5)
    batch = commit_batch.CommitBatch(seqs)
    batch.tokens, batch.probs = np.array([61.0, 62.0, 63.0, 64.0, 65.0], dtype=np.float32), np.full(5, 0.5)
    batch.apply()
    assert batch.settling == batch.finalizing == seqs
    settled = [s.settle() for s in seqs]
    for seq, token, other, new in zip(seqs, [61, 62, 63, 64, 65], alone, settled):
        expected = other.apply(other.next_work(prefill_budget=64), Predictions(tokens=[token], probs=[0.5]))
        assert seq.tokens == other.tokens and seq.block == other.block and seq.block[0] == token
        assert (seq.sub, seq.refresh_block, seq.num_cached) == (other.sub, other.refresh_block, other.num_cached)
        assert (seq.num_forwards, seq.num_decode_steps) == (other.num_forwards, other.num_decode_steps)
        assert seq.output == other.output and new == expected


def mixed_requests(n: int = 14):
    """Diffusion requests of every kind (greedy and sampled, adjusted logits, stop tokens; some with the
    block lookahead, whose commits stay Works) beside AR and speculative ones."""
    out = []
    for i, p in enumerate(random_prompts(n, [1, 3, 8, 9, 13, 17, 24], seed=73)):
        kw = {"max_new_tokens": 18 + i % 9, "seed": 11 + i, "threshold": 0.2 + 0.1 * (i % 3),
              "block_lookahead": i % 6 == 3} | AR_KINDS[i % len(AR_KINDS)]
        if i % 5 == 4:
            kw |= {"mode": ("ar", "speculative")[i % 2], "threshold": None, "block_lookahead": False}
        out.append((p, params(**kw)))
    return out


@pytest.mark.parametrize("layout", ["static", "dynamic"])
@pytest.mark.parametrize("prefix_attention", ["block_causal", "causal"])
def test_batch_equals_one_work_per_sequence(model, layout, prefix_attention):
    requests = mixed_requests()
    batched = make_engine(model, use_sub_block_cache=True, prefix_attention=prefix_attention)
    batched.scheduler.min_commit_batch = 2
    sizes = count_batches(batched, kind=commit_batch.CommitBatch)
    if layout == "dynamic":  # the packed layout, as prefill steps of joining requests run it
        dynamic_only(batched)
    got = run_mixed(batched, requests)
    assert got == run_mixed(per_work(make_engine(model, use_sub_block_cache=True, prefix_attention=prefix_attention)),
                            requests)
    assert max(sizes) >= 4 and sum(s > 0 for s in sizes) >= 4, sizes


def test_batch_of_every_size_equals_one_work_per_sequence(model):
    requests = mixed_requests(5)
    batched = make_engine(model)
    batched.scheduler.min_commit_batch = 1
    sizes = count_batches(batched, kind=commit_batch.CommitBatch)
    assert run_mixed(batched, requests, join_at=2) == run_mixed(per_work(make_engine(model)), requests, join_at=2)
    assert sizes.count(1) >= 3, sizes


# One-block prompts prefilled together, every masked offset of a sub-block committed in its step: every
# request commits its blocks in the same steps.
LOCKSTEP = params(max_new_tokens=24, threshold=0.01)


def test_fewer_sequences_than_the_minimum_run_as_works(model):
    prompts = random_prompts(MIN_COMMIT_BATCH, [8], seed=79)
    for n, batched in ((MIN_COMMIT_BATCH - 1, False), (MIN_COMMIT_BATCH, True)):
        engine = make_engine(model)
        sizes = count_batches(engine, kind=commit_batch.CommitBatch)
        engine.generate(prompts[:n], LOCKSTEP)
        assert (max(sizes) == n) is batched and max(sizes) in (0, n)


def test_a_batched_request_failing_to_settle_fails_alone(model):
    prompts = random_prompts(MIN_COMMIT_BATCH + 2, [8], seed=83)
    check_a_batched_request_failing_to_settle_fails_alone(model, commit_batch.CommitBatch, LOCKSTEP, prompts)


def test_callback_aborting_batched_requests_mid_step_is_safe(model):
    prompts = random_prompts(MIN_COMMIT_BATCH + 1, [8], seed=89)
    check_callback_aborting_batched_requests_mid_step(model, commit_batch.CommitBatch, params(mode="ar", max_new_tokens=24),
                                                      LOCKSTEP, prompts)
