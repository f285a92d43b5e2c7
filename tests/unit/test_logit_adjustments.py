"""SamplingParams.logit_bias, the presence/frequency penalties (OpenAI's) and the repetition penalty
(HF's, vLLM's): applied to the logits at every position a request decodes, in every mode. Oracles:
transformers' generate with `sequence_bias` / `repetition_penalty` and a from-scratch AR loop over
transformers' logits (AR), the no-cache block-diffusion recompute with the same adjustments
(diffusion), AR mode (speculative: its output is AR's)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import fdllm
from tests.reference import MASK, reference_generate
from tests.unit.test_engine import make_engine, params, random_prompts

BIAS = {17: -3.0, 70: -2.5, 9: 2.0, 52: 1.5}  # the sharp model's favourite tokens down, others up: outputs change


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


@pytest.fixture(scope="module")
def hf(sharp_dir):
    """The same checkpoint in transformers: the AR oracle."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(sharp_dir, dtype=torch.float32).eval()


def test_ar_with_logit_bias_equals_transformers_generate_with_sequence_bias(hf, model):
    prompts = random_prompts(4, [1, 3, 6, 11], seed=5)
    engine = make_engine(model)
    biased = engine.generate(prompts, params(max_new_tokens=12, mode="ar", logit_bias=BIAS))
    plain = engine.generate(prompts, params(max_new_tokens=12, mode="ar"))
    for prompt, got, unbiased in zip(prompts, biased, plain):
        ref = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=12,
            do_sample=False, suppress_tokens=[MASK], pad_token_id=0, sequence_bias={(t,): b for t, b in BIAS.items()},
        )[0, len(prompt):].tolist()
        assert got.token_ids == ref
    assert sum(g.token_ids != u.token_ids for g, u in zip(biased, plain)) >= 3  # the bias decides something


@pytest.mark.parametrize("lookahead", [False, True])
def test_diffusion_with_logit_bias_equals_the_no_cache_reference(model, lookahead):
    prompts = random_prompts(6, [1, 5, 8, 9, 13, 16], seed=3)
    biased = make_engine(model).generate(prompts, params(max_new_tokens=21, logit_bias=BIAS, block_lookahead=lookahead))
    changed = 0
    for prompt, got in zip(prompts, biased):
        if not lookahead:
            assert got.token_ids == reference_generate(model, prompt, 21, 8, 4, 0.4, logit_bias=BIAS), len(prompt)
        changed += got.token_ids != reference_generate(model, prompt, 21, 8, 4, 0.4)
    assert changed >= 4


@pytest.mark.parametrize("use_sub_block_cache", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_biased_request_beside_unbiased_ones_decodes_as_alone(model, use_sub_block_cache, temperature):
    """The others' plain sub-block steps run as one DenoiseBatch, the biased one as a Work, in one forward."""
    prompts = random_prompts(10, [3, 8, 13], seed=11)
    p = [params(temperature=temperature, seed=i) for i in range(len(prompts))]
    p[4] = params(temperature=temperature, seed=4, logit_bias=BIAS)
    p[7] = params(temperature=temperature, seed=7, logit_bias={9: 100.0}, mode="ar")
    p[2] = params(temperature=temperature, seed=2, presence_penalty=1.0, frequency_penalty=0.5)
    together = make_engine(model, use_sub_block_cache=use_sub_block_cache).generate(prompts, p)
    for prompt, sp, got in zip(prompts, p, together):
        alone = make_engine(model, use_sub_block_cache=use_sub_block_cache).generate([prompt], sp)[0]
        assert got.token_ids == alone.token_ids
    assert together[7].token_ids == [9] * 20


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.8, 3)])
def test_speculative_with_logit_bias_is_ar_with_logit_bias(model, temperature, seed):
    prompts = random_prompts(5, [1, 7, 8, 9, 16], seed=2)
    engine = make_engine(model)
    kw = {"max_new_tokens": 24, "temperature": temperature, "seed": seed, "logit_bias": BIAS}
    ar = engine.generate(prompts, params(mode="ar", **kw))
    spec = engine.generate(prompts, params(mode="speculative", **kw))
    assert [r.token_ids for r in spec] == [r.token_ids for r in ar]
    if temperature:
        plain = engine.generate(prompts, params(mode="ar", **(kw | {"logit_bias": None})))
        assert [r.token_ids for r in plain] != [r.token_ids for r in ar]


@pytest.mark.parametrize("mode", ["diffusion", "ar", "speculative"])
def test_plus_100_forces_a_token_and_minus_100_bans_it(model, mode):
    prompts = random_prompts(3, [4, 9], seed=1)
    engine = make_engine(model)
    for temperature in (0.0, 1.0):
        forced = engine.generate(prompts, params(mode=mode, temperature=temperature, seed=0, logit_bias={33: 100}))
        assert all(r.token_ids == [33] * 20 for r in forced)
        favourite = engine.generate(prompts, params(mode=mode, temperature=temperature, seed=0))[0].token_ids[0]
        banned = engine.generate(prompts, params(mode=mode, temperature=temperature, seed=0, logit_bias={favourite: -100}))
        assert all(favourite not in r.token_ids for r in banned)


def test_logit_bias_is_validated(model):
    for bad in ({-1: 1.0}, {5: 100.5}, {5: float("nan")}, {5: float("inf")}, {True: 1.0}, {"5": 1.0}, [(5, 1.0)],
                {t: 1.0 for t in range(1025)}):
        with pytest.raises(ValueError, match="logit_bias"):
            params(logit_bias=bad)
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, "):
        make_engine(model).add_request([1, 2, 3], params(logit_bias={10**6: 1.0}))
    assert params(logit_bias={}).logit_bias == {} and params(logit_bias={MASK: 100}).logit_bias == {MASK: 100}


@pytest.mark.parametrize("mode", ["diffusion", "ar", "speculative"])
def test_a_zero_bias_changes_nothing(model, mode):
    """A bias of 0 takes the biased path (its own logits, draws and selection) to the same tokens as
    no bias at all, greedy and sampled with top-k/top-p: the path adds the bias and nothing else."""
    prompts = random_prompts(4, [2, 8, 11], seed=9)
    engine = make_engine(model)
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 5}, {"temperature": 1.3, "seed": 6, "top_k": 5, "top_p": 0.8}):
        plain = engine.generate(prompts, params(mode=mode, **kw))
        zero = engine.generate(prompts, params(mode=mode, logit_bias={9: 0.0, 17: 0.0}, **kw))
        assert [r.token_ids for r in zero] == [r.token_ids for r in plain], kw


@pytest.mark.parametrize("mode", ["diffusion", "speculative"])
def test_biased_rows_made_a_few_at_a_time_decide_the_same(model, mode):
    """At a real vocabulary the head makes logits a chunk of rows at a time (ModelRunner.max_head_rows:
    220 rows at 152k): each chunk must add its own rows' entries and count its own requests' tokens,
    with chunks that start inside a request and requests that penalize beside some that only bias."""
    prompts = random_prompts(6, [3, 9, 16], seed=4)
    penalties = [{}, {"repetition_penalty": 1.3, "frequency_penalty": 0.5}, {"presence_penalty": 1.0}]
    p = [params(mode=mode, temperature=t, seed=i, logit_bias=BIAS | {i: 1.0}, **penalties[i % 3])
         for i, t in enumerate([0, 0.9] * 3)]
    whole = make_engine(model).generate(prompts, p)
    engine = make_engine(model)
    engine.runner.max_head_rows = 3
    assert [r.token_ids for r in engine.generate(prompts, p)] == [r.token_ids for r in whole]


@torch.no_grad()
def penalized_ar_reference(hf, prompt, max_new_tokens, presence, frequency, bias=None, repetition=1.0):
    """Greedy AR from transformers' logits, recomputed every token: the bias added, HF's repetition
    penalty on the prompt's and the generated tokens, OpenAI's penalties on the tokens generated so far
    subtracted (transformers' and vLLM's order), the mask token never predicted."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        row = hf(torch.tensor([ids])).logits[0, -1].float()
        for token, b in (bias or {}).items():
            row[token] += b
        for token in set(ids) if repetition != 1 else ():
            row[token] = row[token] / repetition if row[token] > 0 else row[token] * repetition
        for token in set(out):
            row[token] -= frequency * out.count(token) + presence
        row[MASK] = float("-inf")
        out.append(int(row.argmax()))
        ids.append(out[-1])
    return out


PENALTIES = [(0.0, 1.5), (0.8, 0.0), (1.2, 0.6), (-0.7, -0.4)]  # (presence, frequency): pure, mixed, rewarding repeats


@pytest.mark.parametrize("presence,frequency", PENALTIES)
def test_ar_with_penalties_equals_the_from_scratch_loop(hf, model, presence, frequency):
    prompts = random_prompts(3, [1, 6, 11], seed=5)
    kw = {"max_new_tokens": 16, "mode": "ar", "presence_penalty": presence, "frequency_penalty": frequency}
    got = make_engine(model).generate(prompts, params(**kw, logit_bias={33: 0.5}))
    plain = make_engine(model).generate(prompts, params(max_new_tokens=16, mode="ar"))
    for prompt, g in zip(prompts, got):
        assert g.token_ids == penalized_ar_reference(hf, prompt, 16, presence, frequency, {33: 0.5})
    assert any(g.token_ids != p.token_ids for g, p in zip(got, plain))


@pytest.mark.parametrize("presence,frequency", PENALTIES)
@pytest.mark.parametrize("use_sub_block_cache", [False, True])
def test_diffusion_with_penalties_equals_the_no_cache_reference(model, presence, frequency, use_sub_block_cache):
    """Counts as each step starts: the output and the block's offsets decoded before the position. With
    the sub-block cache on, the reference holds only in steps it does not change (checked where it agrees
    with cache off: the penalised requests beside unpenalised ones are held to each alone below)."""
    prompts = random_prompts(5, [1, 8, 9, 13, 16], seed=3)
    kw = {"max_new_tokens": 21, "presence_penalty": presence, "frequency_penalty": frequency}
    got = make_engine(model, use_sub_block_cache=use_sub_block_cache).generate(prompts, params(**kw))
    changed = 0
    for prompt, g in zip(prompts, got):
        if not use_sub_block_cache:
            assert g.token_ids == reference_generate(model, prompt, 21, 8, 4, 0.4, presence=presence, frequency=frequency)
        changed += g.token_ids != reference_generate(model, prompt, 21, 8, 4, 0.4)
    assert changed >= 2


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.8, 3)])
@pytest.mark.parametrize("lookahead", [False, True])
def test_speculative_with_penalties_is_ar_with_penalties(model, temperature, seed, lookahead):
    """Each verify row counts the draft before it, as AR would have generated it."""
    prompts = random_prompts(5, [1, 7, 8, 9, 16], seed=2)
    engine = make_engine(model, speculative_lookahead=lookahead)
    kw = {"max_new_tokens": 24, "temperature": temperature, "seed": seed, "presence_penalty": 0.9, "frequency_penalty": 0.5}
    ar = engine.generate(prompts, params(mode="ar", **kw))
    spec = engine.generate(prompts, params(mode="speculative", **kw))
    assert [r.token_ids for r in spec] == [r.token_ids for r in ar]
    assert sum(r.num_accepted for r in spec) > 0  # drafts were verified, not only AR steps


def test_penalties_are_validated():
    for name in ("presence_penalty", "frequency_penalty"):
        for bad in (2.01, -2.5, float("nan"), float("inf"), True, "1"):
            with pytest.raises(ValueError, match=name):
                params(**{name: bad})
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1.2"):
        with pytest.raises(ValueError, match="repetition_penalty"):
            params(repetition_penalty=bad)
    assert params(repetition_penalty=1.2).adjusts_logits
    assert params(presence_penalty=-2, frequency_penalty=2).adjusts_logits and not params().adjusts_logits


@pytest.mark.parametrize("repetition", [1.4, 0.7])
def test_ar_with_repetition_penalty_equals_transformers_generate(hf, model, repetition):
    """HF's RepetitionPenaltyLogitsProcessor (the prompt's and generated tokens) after its SequenceBias."""
    prompts = random_prompts(4, [1, 6, 11], seed=8)
    got = make_engine(model).generate(prompts, params(max_new_tokens=14, mode="ar", repetition_penalty=repetition,
                                                      logit_bias=BIAS))
    for prompt, g in zip(prompts, got):
        ref = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=14,
            do_sample=False, suppress_tokens=[MASK], pad_token_id=0, repetition_penalty=repetition,
            sequence_bias={(t,): b for t, b in BIAS.items()},
        )[0, len(prompt):].tolist()
        assert g.token_ids == ref
        assert g.token_ids == penalized_ar_reference(hf, prompt, 14, 0.0, 0.0, BIAS, repetition)


def batched_below(engine, batched: bool):
    """`batched`: every plain sub-block step runs in a `DenoiseBatch` (fdllm.engine.denoise), even one
    sequence's; else one Work per sequence (this file's few requests are below the batch's minimum)."""
    engine.scheduler.min_denoise_batch = 1 if batched else 10**9
    return engine


BATCHED = pytest.mark.parametrize("batched", [False, True], ids=["works", "denoise-batch"])


@BATCHED
def test_all_adjustments_together_in_each_mode(hf, model, batched):
    """Repetition penalty, bias and OpenAI's penalties at once: AR against the from-scratch loop,
    diffusion against the no-cache recompute, speculative against AR (greedy and sampled)."""
    prompts = random_prompts(4, [1, 8, 9, 13], seed=6)
    kw = {"max_new_tokens": 18, "repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.3,
          "logit_bias": BIAS}
    engine = batched_below(make_engine(model), batched)
    ar = engine.generate(prompts, params(mode="ar", **kw))
    diffusion = engine.generate(prompts, params(**kw))
    for prompt, a, d in zip(prompts, ar, diffusion):
        assert a.token_ids == penalized_ar_reference(hf, prompt, 18, 0.4, 0.3, BIAS, 1.3)
        assert d.token_ids == reference_generate(model, prompt, 18, 8, 4, 0.4, logit_bias=BIAS, presence=0.4,
                                                 frequency=0.3, repetition=1.3)
    assert [r.token_ids for r in engine.generate(prompts, params(mode="speculative", **kw))] == [r.token_ids for r in ar]
    sampled = {"temperature": 0.9, "seed": 4, **kw}
    assert [r.token_ids for r in engine.generate(prompts, params(mode="speculative", **sampled))] == [
        r.token_ids for r in engine.generate(prompts, params(mode="ar", **sampled))]


@BATCHED
def test_min_tokens_keeps_the_stop_tokens_out_of_the_first_outputs(hf, model, batched):
    """vLLM's min_tokens: AR equals transformers generate with min_new_tokens (its eos the stop token),
    diffusion the no-cache recompute with the stop token at -inf there, speculative AR; the request
    may stop right after."""
    prompts = random_prompts(5, [1, 6, 8, 11], seed=12)
    engine = batched_below(make_engine(model), batched)
    unstopped = engine.generate(prompts, params(mode="ar", max_new_tokens=16))
    stop = Counter(t for r in unstopped for t in r.token_ids[:4]).most_common(1)[0][0]  # an early favourite
    plain = engine.generate(prompts, params(mode="ar", max_new_tokens=16, stop_token_ids=(stop,)))
    assert sum(len(r.token_ids) < 5 for r in plain) >= 2  # without min_tokens, these stop early
    kw = {"max_new_tokens": 16, "stop_token_ids": (stop,), "min_tokens": 5}
    ar = engine.generate(prompts, params(mode="ar", **kw))
    diffusion = engine.generate(prompts, params(**kw))
    for prompt, a, d in zip(prompts, ar, diffusion):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, min_new_tokens=5, do_sample=False, suppress_tokens=[MASK], pad_token_id=0,
                          eos_token_id=stop)[0, len(prompt):].tolist()
        assert a.token_ids == ref and stop not in a.token_ids[:5] and len(a.token_ids) >= 5
        assert d.token_ids == reference_generate(model, prompt, 16, 8, 4, 0.4, stop_ids=(stop,), min_tokens=5)
        assert stop not in d.token_ids[:5] and len(d.token_ids) >= 5
    assert [r.token_ids for r in engine.generate(prompts, params(mode="speculative", **kw))] == [r.token_ids for r in ar]
    with pytest.raises(ValueError, match="min_tokens"):
        params(max_new_tokens=4, min_tokens=5)
