"""The engine against independent references: a no-cache block-causal recompute and HF generate."""

from __future__ import annotations

import gc
import json
import random
import shutil
import time

import pytest
import torch

import fdllm
from fdllm.masks import block_causal_mask
from fdllm.tokenizer import render_chat
from tests.helpers import VOCAB, make_bos_tokenizer
from tests.reference import MASK, reference_generate


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def make_engine(model, num_pages=256, max_prefill_tokens=64, tokenizer=None, attention_backend="auto",
                quantization=None, prefix_caching=True, deterministic=False, speculative_lookahead=True,
                linear_backend="torch", **cfg):
    cfg = {"block_size": 8, "sub_block_size": 4, "threshold": 0.4, "use_sub_block_cache": False, "mask_token_id": MASK} | cfg
    return fdllm.Engine(
        model, tokenizer, fdllm.BlockDiffusionConfig(**cfg),
        fdllm.EngineConfig(
            num_pages=num_pages, max_prefill_tokens=max_prefill_tokens, attention_backend=attention_backend,
            quantization=quantization, enable_prefix_caching=prefix_caching, deterministic=deterministic,
            speculative_lookahead=speculative_lookahead, linear_backend=linear_backend,
        ),
    )


def random_prompts(n, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(MASK) for _ in range(rng.choice(lengths))] for _ in range(n)]


def params(**kw):
    return fdllm.SamplingParams(**({"max_new_tokens": 20, "ignore_eos": True} | kw))


def run_to_end(engine, max_steps=500) -> dict:
    """Step until nothing is left: the results by request id; a request that never finishes (a page
    reservation leaked, an abort that frees nothing) is a failure here, not a hung test."""
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return done
        done |= {r.request_id: r for r in engine.step()}
    raise AssertionError(f"still unfinished after {max_steps} steps: {engine.num_running} running, "
                         f"{engine.num_waiting} waiting, {engine.num_free_pages} free pages")


@torch.no_grad()
def test_auto_attention_backend_is_torch_on_cpu(model):
    assert make_engine(model).attention_backend == "torch"  # never the (test-only) Triton interpreter


def test_unknown_attention_backend_is_a_clear_error(model):
    with pytest.raises(ValueError, match="attention_backend must be one of .*'sdpa'"):
        make_engine(model, attention_backend="sdpa")


def test_cache_off_equals_no_cache_reference(model):
    lengths = [1, 2, 5, 7, 8, 9, 13, 16, 17, 24, 31]
    prompts = random_prompts(14, lengths) + [[3] * 8, [5] * 16, [7] * 24]  # exact block multiples
    engine = make_engine(model)
    results = engine.generate(prompts, params(max_new_tokens=21))
    parallel = 0
    for prompt, res in zip(prompts, results):
        ref = reference_generate(model, prompt, 21, 8, 4, 0.4)
        assert res.token_ids == ref, f"prompt length {len(prompt)}"
        assert res.finish_reason == "length"
        parallel += res.tokens_per_forward > 1
    assert parallel, "the threshold should unmask several tokens per forward somewhere"


@pytest.mark.parametrize("block_size,sub_block_size,threshold", [(4, 2, 0.3), (8, 8, 1.0), (16, 4, 0.25)])
def test_cache_off_equals_reference_other_shapes(model, block_size, sub_block_size, threshold):
    prompts = random_prompts(5, [1, 4, block_size, block_size + 3, 2 * block_size], seed=block_size)
    engine = make_engine(model, block_size=block_size, sub_block_size=sub_block_size, threshold=threshold)
    for prompt, res in zip(prompts, engine.generate(prompts, params(max_new_tokens=13))):
        assert res.token_ids == reference_generate(model, prompt, 13, block_size, sub_block_size, threshold)


def test_stop_token_cuts_output_after_it(model):
    prompt = random_prompts(1, [6], seed=3)[0]
    full = reference_generate(model, prompt, 24, 8, 4, 0.4)
    stop = full[len(full) // 2]
    first = full.index(stop)
    engine = make_engine(model)
    res = engine.generate([prompt], params(max_new_tokens=24, stop_token_ids=(stop,)))[0]
    assert res.token_ids == full[: first + 1] == reference_generate(model, prompt, 24, 8, 4, 0.4, {stop})
    assert res.finish_reason == "stop"


def test_stop_token_id_ends_the_text_without_its_text(model):
    """A request that a stop token ends (a `stop_token_ids` entry that is no special token) ends its text
    before that token's text, as vLLM's does; the token itself stays in token_ids (usage counts it)."""
    tokenizer = make_bos_tokenizer()
    prompt = random_prompts(1, [6], seed=3)[0]
    full = reference_generate(model, prompt, 24, 8, 4, 0.4)
    stop = next(t for t in full[1:] if tokenizer.decode([t], skip_special_tokens=True))  # a token with text
    res = make_engine(model, tokenizer=tokenizer).generate([prompt], params(max_new_tokens=24, stop_token_ids=(stop,)))[0]
    assert res.finish_reason == "stop" and res.token_ids[-1] == stop
    assert res.text == tokenizer.decode(res.token_ids[:-1], skip_special_tokens=True)


def test_block_size_one_threshold_one_equals_hf_generate(sharp_dir, model):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(sharp_dir, dtype=torch.float32).eval()
    prompts = random_prompts(4, [1, 3, 6, 11], seed=5)
    diffusion = make_engine(model, block_size=1, sub_block_size=1, threshold=1.0)
    ar = make_engine(model)
    got_diffusion = diffusion.generate(prompts, params(max_new_tokens=12))
    got_ar = ar.generate(prompts, params(max_new_tokens=12, mode="ar"))
    for prompt, d, a in zip(prompts, got_diffusion, got_ar):
        ref = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12, do_sample=False, suppress_tokens=[MASK], pad_token_id=0,
        )[0, len(prompt):].tolist()
        assert d.token_ids == ref
        assert a.token_ids == ref
        assert a.num_forwards == 12 and a.tokens_per_forward == 1.0


@pytest.mark.parametrize("use_sub_block_cache", [False, True])
def test_batch_equals_each_prompt_alone(model, use_sub_block_cache):
    prompts = random_prompts(6, [1, 3, 8, 11, 16, 21], seed=7)
    engine = make_engine(model, use_sub_block_cache=use_sub_block_cache)
    batched = engine.generate(prompts, params())
    for prompt, res in zip(prompts, batched):
        alone = make_engine(model, use_sub_block_cache=use_sub_block_cache).generate([prompt], params())[0]
        assert res.token_ids == alone.token_ids
        assert res.num_forwards == alone.num_forwards


def run_joining_mid_flight(engine, prompts, param_list) -> dict:
    """Request i (id "i") joins after 2i steps; returns every result by request id."""
    results = {}
    for i, (prompt, p) in enumerate(zip(prompts, param_list)):
        engine.add_request(prompt, p, request_id=str(i))
        for _ in range(2):
            results |= {r.request_id: r for r in engine.step()}
    while engine.has_unfinished():
        results |= {r.request_id: r for r in engine.step()}
    return results


def test_requests_joining_mid_flight_match_alone(model):
    prompts = random_prompts(4, [2, 8, 13], seed=11)
    mixed = [params(), params(mode="ar"), params(threshold=0.9), params(max_new_tokens=9)]
    results = run_joining_mid_flight(make_engine(model, use_sub_block_cache=True), prompts, mixed)
    for i, (prompt, p) in enumerate(zip(prompts, mixed)):
        alone = make_engine(model, use_sub_block_cache=True).generate([prompt], p)[0]
        assert results[str(i)].token_ids == alone.token_ids


def test_sub_block_cache_with_whole_block_sub_blocks_is_exact(model):
    # With sub_block_size == block_size a cached step feeds the whole block: identical to a refresh.
    prompts = random_prompts(4, [3, 8, 12], seed=13)
    off = make_engine(model, sub_block_size=8).generate(prompts, params())
    on = make_engine(model, sub_block_size=8, use_sub_block_cache=True).generate(prompts, params())
    assert [r.token_ids for r in on] == [r.token_ids for r in off]


def test_abort_frees_pages_and_reports(model):
    engine = make_engine(model, num_pages=40)
    start = engine.num_free_pages
    seen = {}
    rids = [
        engine.add_request(p, params(max_new_tokens=30), on_tokens=lambda r, t, f: seen.setdefault(r, []).append(f))
        for p in random_prompts(5, [4, 9, 17], seed=17)
    ]
    for _ in range(3):
        engine.step()
    assert engine.num_free_pages < start
    engine.abort(rids[0])
    engine.abort(rids[3])
    engine.abort("no-such-request")  # ignored
    aborted = engine.step()
    assert sorted(r.request_id for r in aborted if r.finish_reason == "abort") == sorted([rids[0], rids[3]])
    run_to_end(engine)
    assert engine.num_free_pages == start
    assert all(calls[-1] is True and calls.count(True) == 1 for calls in seen.values())


def test_admission_waits_for_free_pages(model):
    prompts = random_prompts(5, [6, 12], seed=19)
    # Each reserves its prompt's and first block's pages (6 tokens: 1, opening the block; 12: 2), leaving a
    # page to spare per running request: 1, 2 + 1 and 1 + 2 of the 8 fit, the fourth's 2 + 3 do not.
    engine = make_engine(model, num_pages=8)
    for p in prompts:
        engine.add_request(p, params())
    engine.step()
    assert engine.num_running == 3 and engine.num_waiting == 2
    done = []
    while engine.has_unfinished():
        done += engine.step()
    ref = make_engine(model).generate(prompts, params())
    assert [r.token_ids for r in sorted(done, key=lambda r: int(r.request_id))] == [r.token_ids for r in ref]
    assert engine.num_free_pages == 8


def test_block_size_one_decodes_as_ar(model):
    """Blocks of one token leave nothing to decode in parallel: diffusion is AR, whatever the threshold
    (every prompt is a whole number of one-token blocks: its prefill opens the first block)."""
    prompts = random_prompts(4, [1, 3, 6, 11], seed=5)
    engine = make_engine(model, block_size=1, sub_block_size=1, threshold=0.9)
    diffusion = engine.generate(prompts, params(max_new_tokens=8))
    ar = make_engine(model).generate(prompts, params(max_new_tokens=8, mode="ar"))
    assert [d.token_ids for d in diffusion] == [a.token_ids for a in ar]
    assert [a.num_forwards for a in ar] == [8] * 4  # AR: the prefill's last logit is the first token
    assert [d.prompt_token_ids for d in diffusion] == [a.prompt_token_ids for a in ar] == prompts
    assert all(0 < r.latency_s < 60 for r in diffusion + ar)  # seconds since the request arrived


def make_sequence(prompt: list[int], sampling: fdllm.SamplingParams | None = None, **sequence_kw):
    """One request's state alone (block 8 / sub-block 4, threshold 0.9; `sequence_kw` adds to or replaces
    those), to drive its steps by hand. Arguments not given keep `Sequence`'s own defaults."""
    from fdllm.decoding import StopCriteria
    from fdllm.engine.sequence import Sequence

    settings = {"block_size": 8, "sub_block_size": 4, "use_sub_block_cache": False, "threshold": 0.9} | sequence_kw
    return Sequence(request_id="r", prompt=prompt, params=sampling or params(), criteria=StopCriteria(max_new_tokens=20),
                    mask_token_id=MASK, arrival=0.0, **settings)


def test_a_prefill_chunk_is_whole_blocks_within_the_step_budget():
    seq = make_sequence(random_prompts(1, [45])[0])
    work = seq.next_work(prefill_budget=12)  # 40 prompt tokens in whole blocks; room for one block of 8
    assert work.num_prefill == len(work.token_ids) == 8 and not work.logit_rows
    assert [(r.q_len, r.kv_len, r.causal) for r in work.rows] == [(8, 8, False)]  # block-causal by default
    assert seq.next_work(prefill_budget=7) is None  # less than a block: it waits for a step with room


def test_a_prompt_of_whole_blocks_is_prefilled_once():
    """Its last logit opens the first block; the prompt's K/V are then cached for good (the next step
    decodes that block alone instead of prefilling the prompt again)."""
    from fdllm.engine.sequence import Predictions

    seq = make_sequence(random_prompts(1, [16])[0])
    work = seq.next_work(prefill_budget=64)
    assert (work.num_prefill, work.logit_rows) == (16, [15])
    seq.apply(work, Predictions(tokens=[7], probs=[1.0]))
    assert seq.num_cached == 16 and seq.num_prefill_left == 0
    after = seq.next_work(prefill_budget=64)
    assert after.num_prefill == 0 and after.start == 16 and after.step is not None
    # a denoising step of sub-block [0, 4): offset 0 is known; the default threshold 0.9 commits 1 and 3
    seq.apply(after, Predictions(tokens=[0, 11, 12, 13], probs=[0.0, 0.95, 0.5, 0.92]))
    assert seq.block == [7, 11, MASK, 13] + [MASK] * 4


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_chunked_prefill_matches_single_chunk(model, mode):
    prompt = random_prompts(1, [45], seed=23)[0]
    small = make_engine(model, max_prefill_tokens=8).generate([prompt], params(mode=mode))[0]
    large = make_engine(model, max_prefill_tokens=64).generate([prompt], params(mode=mode))[0]
    assert small.token_ids == large.token_ids
    assert small.num_forwards > large.num_forwards


def test_streaming_and_stats(model):
    chunks, flags = [], []

    def on_tokens(rid, tokens, finished):
        chunks.extend(tokens)
        flags.append(finished)

    engine = make_engine(model, use_sub_block_cache=True)
    engine.add_request(random_prompts(1, [5])[0], params(max_new_tokens=17), on_tokens=on_tokens)
    (res,) = [r for _ in range(100) for r in engine.step()]
    assert chunks == res.token_ids and len(res.token_ids) == 17
    assert flags[-1] and not any(flags[:-1])
    assert res.time_to_first_token_s is not None and 0 < res.time_to_first_token_s <= res.latency_s
    assert res.tokens_per_forward == 17 / res.num_forwards


def test_failing_callback_does_not_stop_other_requests(model):
    def broken(rid, tokens, finished):
        raise RuntimeError("client went away")

    engine = make_engine(model)
    engine.add_request([1, 2, 3], params(max_new_tokens=9), on_tokens=broken)
    engine.add_request([4, 5], params(max_new_tokens=9))
    done = [r for _ in range(40) for r in engine.step()]
    assert sorted(len(r.token_ids) for r in done) == [9, 9]


def test_seeded_sampling_is_reproducible_and_batch_invariant(model):
    prompts = random_prompts(3, [4, 9], seed=29)
    p = params(temperature=0.8, top_p=0.9, top_k=20, seed=1234)
    a = make_engine(model).generate(prompts, p)
    b = make_engine(model).generate(prompts[:1], p)
    assert a[0].token_ids == b[0].token_ids
    c = make_engine(model).generate(prompts[:1], params(temperature=0.8, top_p=0.9, top_k=20, seed=99))
    assert c[0].token_ids != a[0].token_ids


def test_results_come_back_in_fp64_where_fp32_cannot_hold_every_token_id(model):
    """A vocabulary past 2**24 reads the step's results back in fp64 (fp32 would round its ids): the
    same tokens as the fp32 read-back, for greedy, sampled and entropy-budget rows."""
    prompts = random_prompts(4, [3, 9, 17], seed=31)
    kinds = [params(), params(temperature=0.8, seed=5), params(selection="entropy_budget", entropy_budget=0.5)]
    fast = make_engine(model)
    assert fast.runner.ids_fit_fp32
    wide = make_engine(model)
    wide.runner.ids_fit_fp32 = False
    for p in kinds:
        assert [r.token_ids for r in wide.generate(prompts, p)] == [r.token_ids for r in fast.generate(prompts, p)]


@pytest.mark.parametrize("mode", ["diffusion", "ar", "speculative"])
def test_seeded_samples_do_not_depend_on_how_the_prompt_was_chunked(model, mode):
    """A prompt prefilled in one chunk alone is prefilled in two beside another request's prefill (they
    share the step's prefill budget); its draws must not move with that."""
    prompt, other = random_prompts(2, [16], seed=31)
    p = params(mode=mode, temperature=0.9, seed=7)
    alone = make_engine(model, max_prefill_tokens=16).generate([prompt], p)[0]
    beside = make_engine(model, max_prefill_tokens=16).generate([other[:9], prompt], [params(mode=mode), p])[1]
    assert beside.num_forwards > alone.num_forwards  # the prompt did take an extra prefill chunk
    assert beside.token_ids == alone.token_ids


def test_text_prompts_stop_strings_and_eos(sharp_dir):
    engine = fdllm.Engine.from_pretrained(sharp_dir, config=fdllm.BlockDiffusionConfig(
        block_size=8, sub_block_size=4, threshold=0.4, mask_token_id=MASK))
    assert engine.num_pages == 64 * 512 // 8  # capped at max_num_seqs full-length sequences
    free = engine.generate(["hello world"], params(max_new_tokens=24))[0]
    assert free.text == engine.tokenizer.decode(free.token_ids, skip_special_tokens=True)
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    assert stop.strip(), "pick a visible stop string"
    res = engine.generate(["hello world"], params(max_new_tokens=24, stop=(stop,)))[0]
    assert res.finish_reason == "stop"
    assert res.text == free.text[: free.text.index(stop)]
    assert stop in engine.tokenizer.decode(res.token_ids) and stop not in engine.tokenizer.decode(res.token_ids[:-1])
    eos = engine.tokenizer.eos_token_id  # stop tokens of the tokenizer apply unless ignore_eos
    assert eos in engine._tokenizer_stop_ids


def test_a_rendered_chat_prompt_has_one_bos_as_transformers_tokenizes_the_chat(model):
    """The README's path: `render_chat`'s text to `generate`. Llama 3's tokenizer adds BOS to any text and
    its template writes one: the model got two, as neither training nor the server gives it. Oracle:
    transformers' apply_chat_template(tokenize=True); plain text still gets the tokenizer's BOS."""
    tok = make_bos_tokenizer()
    chat = [{"role": "user", "content": "hi"}]
    chat_out, plain_out = make_engine(model, tokenizer=tok).generate([render_chat(tok, chat), "hello"],
                                                                     params(max_new_tokens=1))
    assert chat_out.prompt_token_ids == tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert plain_out.prompt_token_ids == tok("hello").input_ids and plain_out.prompt_token_ids[0] == tok.bos_token_id


@pytest.mark.parametrize(
    "prompt,kwargs,match",
    [
        ([], {}, "prompt is empty"),
        ([1] * 500, {"max_new_tokens": 20}, "exceeds the context"),
        ([1, 2], {"stop": "x"}, "stop must be"),
        ([1, 2], {"stop": (3,)}, "stop must be"),
        ([1, 2], {"threshold": 0.0}, "threshold"),
        ([1, 2], {"threshold": 1.5}, "threshold"),
        ([1, VOCAB + 3], {}, "token ids"),
        ([1, 2], {"mode": "beam"}, "mode"),
        # pathological sampling values: each would otherwise reach a step other requests share
        ([1, 2], {"temperature": float("nan")}, "temperature"),
        ([1, 2], {"temperature": float("inf")}, "temperature"),
        ([1, 2], {"temperature": 1e-300}, "temperature"),  # logits / 1e-300 overflow to inf/nan
        ([1, 2], {"temperature": 1e6}, "temperature"),
        ([1, 2], {"temperature": True}, "temperature"),
        ([1, 2], {"top_p": float("nan")}, "top_p"),
        ([1, 2], {"top_p": 0.0}, "top_p"),
        ([1, 2], {"top_k": 2.5}, "top_k"),
        ([1, 2], {"top_k": -1}, "top_k"),
        ([1, 2], {"seed": 2**64}, "seed"),  # torch.Generator.manual_seed overflows
        ([1, 2], {"seed": 1.5}, "seed"),
        ([1, 2], {"threshold": float("nan")}, "threshold"),
        ([1, 2], {"max_new_tokens": 0}, "max_new_tokens"),
        ([1, 2], {"max_new_tokens": True}, "max_new_tokens"),
        ([1, 2], {"stop_token_ids": tuple(range(65))}, "stop_token_ids"),
        # would fail the step it is staged in (every request of it), or never finish
        ([1, 2], {"stop_token_ids": (VOCAB + 5,), "min_tokens": 3}, r"stop_token_ids token ids must be in \[0, "),
        ([1, 2], {"top_k": 2**63}, "top_k"),  # no int64
        ([1, 2], {"temperature": 1.0, "repetition_penalty": 1e-300}, "repetition_penalty"),  # logits / 1e-300: inf
        ([1, 2], {"repetition_penalty": 1e300}, "repetition_penalty"),
        ([1, MASK, 2], {}, "mask token"),  # diffusion would decode over the prompt's mask position
        ([1, 2.0], {}, "a prompt's token ids are ints, got float at index 1"),
        ((1, "2"), {}, "a prompt's token ids are ints, got str at index 1"),
        ({1: 2}, {}, "a prompt is a string or a list of token ids, got dict"),
        ([True, 2], {}, "a prompt's token ids are ints, got bool at index 0"),  # was read as token 1
        ([1, 2], {"ignore_eos": "false"}, "ignore_eos must be a bool"),  # was truthy: EOS ignored
    ],
)
def test_bad_input_is_rejected_while_serving(model, prompt, kwargs, match):
    engine = make_engine(model)
    good = engine.add_request([1, 2, 3], params(max_new_tokens=8))
    engine.step()
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params(**kwargs))
    done = [r for _ in range(50) for r in engine.step()]
    assert [r.request_id for r in done] == [good] and done[0].finish_reason == "length"
    alone = make_engine(model).generate([[1, 2, 3]], params(max_new_tokens=8))[0]
    assert done[0].token_ids == alone.token_ids  # the good request's answer is the one it gets alone


def test_a_text_prompt_that_is_not_unicode_text_is_a_value_error(dllm_dir):
    """A lone surrogate (a JSON escape "\\ud800", a file name read with surrogateescape) reached the
    tokenizer, whose TypeError spoke of TextEncodeInput."""
    engine = fdllm.Engine.from_pretrained(dllm_dir)
    for prompt, index in (("\ud800", 0), ("ok \udcff end", 3)):
        with pytest.raises(ValueError, match=f"the prompt is not valid Unicode text: surrogates not allowed at index {index}$"):
            engine.generate([prompt], params(max_new_tokens=4))
    assert engine.num_free_pages == engine.num_pages and not engine.has_unfinished()
    assert engine.generate(["ok \u2028 end \U0001f600"], params(max_new_tokens=4))[0].finish_reason == "length"


def test_a_prompt_with_the_mask_token_is_a_token_in_causal_modes(sharp_dir, model):
    """AR and speculative take the prompt's mask id as a token (diffusion refuses it: above), as HF does."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(sharp_dir, dtype=torch.float32).eval()
    for prompt in ([1, 2, 3, 4, 5, 6, 7, 8, MASK], [1, 2, 3, 4, 5, 6, 7, 8, 9, MASK, 10], [MASK, 3]):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, suppress_tokens=[MASK], pad_token_id=0)[0, len(prompt):]
        for mode in ("ar", "speculative"):
            assert make_engine(model).generate([prompt], params(mode=mode, max_new_tokens=8))[0].token_ids == ref.tolist()


def test_automatic_request_ids_skip_the_ones_callers_chose(model):
    engine = make_engine(model)
    engine.add_request([1, 2], params(max_new_tokens=4), request_id="1")
    ids = [engine.add_request([3, 4], params(max_new_tokens=4)) for _ in range(3)]
    assert ids == ["0", "2", "3"]
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([3, 4], params(), request_id="2")


def test_generate_with_one_bad_prompt_runs_none_of_them(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[1, 2, 3], [4, 5, 6], [1, VOCAB + 1]], params(max_new_tokens=4))
    assert not engine.has_unfinished() and engine.step() == []


def test_one_prompt_not_in_a_list_and_params_not_sampling_params_are_value_errors(dllm_dir, causal_dllm_dir):
    """generate("text") / score("text") answered one request per character; a dict as params raised
    AttributeError from inside add_request."""
    engine = fdllm.Engine.from_pretrained(dllm_dir)
    for prompts in ("hello", b"hello"):
        with pytest.raises(ValueError, match="prompts must be a list of prompts.*wrap one prompt as"):
            engine.generate(prompts, params(max_new_tokens=2))
    with pytest.raises(ValueError, match="params must be a fdllm.SamplingParams, got dict"):
        engine.generate(["hello"], [{"max_new_tokens": 2}])
    with pytest.raises(ValueError, match="params must be a fdllm.SamplingParams or a list of them .one per prompt., got dict"):
        engine.generate(["hello"], {"max_new_tokens": 2})  # was iterated as its keys: "got str", or "1 prompts but 2"
    for name, bad in (("config", {"block_size": 8}), ("engine_config", {"num_pages": 8})):  # AttributeErrors inside
        with pytest.raises(ValueError, match=f"{name} must be a fdllm.{'BlockDiffusionConfig' if name == 'config' else 'EngineConfig'}, got dict"):
            fdllm.Engine.from_pretrained(dllm_dir, **{name: bad})
    with pytest.raises(ValueError, match="params must be a fdllm.SamplingParams, got dict"):
        engine.add_request("hello", {"max_new_tokens": 2})
    for request_id in (5, "", ["r"]):  # an int 5 and the engine's own id "5" would be two requests
        with pytest.raises(ValueError, match="request id must be a non-empty str"):
            engine.add_request("hello", params(max_new_tokens=2), request_id=request_id)
    with pytest.raises(ValueError, match="prompts must be a list of prompts, got int"):
        engine.generate(7, params(max_new_tokens=2))
    assert engine.num_free_pages == engine.num_pages and not engine.has_unfinished()
    listed = engine.generate(["hello", [5, 6]], params(max_new_tokens=4))
    assert [r.token_ids for r in engine.generate((p for p in ("hello", [5, 6])), params(max_new_tokens=4))] == [
        r.token_ids for r in listed]  # any iterable of prompts, a generator too
    scorer = fdllm.Engine.from_pretrained(causal_dllm_dir)
    with pytest.raises(ValueError, match="prompts must be a list of prompts"):
        scorer.score("hello")
    assert [s.logprobs for s in scorer.score(iter([[5, 6, 7]]))] == [s.logprobs for s in scorer.score([[5, 6, 7]])]


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_seeds_that_differ_mod_2_64_draw_different_streams(model, mode):
    """The seed's 64 bits reach the draws (SEED_RANGE): 0 and 2**63, -1 and 2**63 - 1 are different seeds."""
    def out(seed):
        return make_engine(model).generate([[1, 2, 3]], params(mode=mode, temperature=1.0, seed=seed))[0].token_ids

    assert out(0) != out(2**63) and out(-1) != out(2**63 - 1)
    assert out(-1) == out(2**64 - 1)  # equal mod 2**64: one stream, as torch.Generator.manual_seed's


@pytest.mark.parametrize("kwargs,match", [
    ({"kv_cache_gib": float("nan")}, "kv_cache_gib"), ({"kv_cache_gib": float("inf")}, "kv_cache_gib"),
    ({"max_num_seqs": 2.5}, "max_num_seqs"), ({"num_pages": float("nan")}, "num_pages"),
    ({"max_model_len": float("nan")}, "max_model_len"), ({"max_prefill_tokens": True}, "max_prefill_tokens"),
    ({"gpu_memory_utilization": float("nan")}, "gpu_memory_utilization"), ({"enforce_eager": "no"}, "enforce_eager"),
    ({"max_num_seqs": 2**63}, "max_num_seqs must be at most 65536"),  # its batch buckets were built until OOM
])
def test_bad_engine_config_values_are_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fdllm.EngineConfig(**kwargs)


def test_bad_engine_config_is_rejected(model):
    with pytest.raises(ValueError, match="divisible"):
        make_engine(model, block_size=8, sub_block_size=3)
    with pytest.raises(ValueError, match="threshold"):
        make_engine(model, threshold=0.0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        make_engine(model, mask_token_id=VOCAB)
    with pytest.raises(ValueError, match=r"KV cache of 1099511627776 pages \(.* GiB\) does not fit on cpu"):
        make_engine(model, num_pages=2**40)  # torch's "can't allocate ... bytes"


@pytest.mark.parametrize("field,value", [
    ("block_size", 32.0), ("sub_block_size", 8.0), ("mask_token_id", 1.5), ("mask_token_id", True), ("mask_token_id", -1),
    ("threshold", "0.9"), ("threshold", True), ("threshold", float("nan")), ("eps", None), ("use_sub_block_cache", "no"),
])
def test_block_diffusion_config_values_of_the_wrong_type_are_one_clear_error(field, value):
    """fdllm_config.json's values arrive as JSON wrote them: a true mask_token_id was token 1 (every request
    ended at once), a float block size failed deep in torch, "no" turned the sub-block cache on."""
    with pytest.raises(ValueError, match=field):
        fdllm.BlockDiffusionConfig(**{field: value})


def test_a_mask_token_that_is_an_end_token_is_refused(dllm_dir):
    """The mask token is never predicted, so with it an end token no request would ever stop on it."""
    from tests.helpers import make_tokenizer

    eos = make_tokenizer().convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match=f"mask_token_id {eos} is an end token"):
        fdllm.Engine.from_pretrained(dllm_dir, config=fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4,
                                                                                mask_token_id=eos))


def test_devices_and_dtypes_that_name_no_place_or_type_for_weights(dllm_dir):
    """"cpu:0" is the CPU (safetensors refused it, blaming the checkpoint: "not a readable safetensors file");
    "meta" and int8 hold no model: one clear error, before anything is read."""
    assert fdllm.Engine.from_pretrained(dllm_dir, device="cpu:0").model.device == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'meta' holds no data"):
        fdllm.Engine.from_pretrained(dllm_dir, device="meta")
    with pytest.raises(ValueError, match="unsupported dtype torch.int8"):
        fdllm.Engine.from_pretrained(dllm_dir, dtype=torch.int8)


def test_a_reused_request_id_waits_until_its_aborted_result_is_delivered(model):
    """Results are told apart by id: a request added under an aborted one's id before the next step took the
    aborted result (the async engine handed it to the new stream, whose own result was dropped)."""
    engine = make_engine(model)
    engine.add_request([1, 2, 3], params(max_new_tokens=30), request_id="x")
    engine.step()
    engine.abort("x")
    with pytest.raises(ValueError, match="request id 'x' is already in use"):
        engine.add_request([4, 5], params(max_new_tokens=3), request_id="x")
    [aborted] = engine.step()
    assert (aborted.request_id, aborted.finish_reason, aborted.prompt_token_ids) == ("x", "abort", [1, 2, 3])
    engine.add_request([4, 5], params(max_new_tokens=3), request_id="x")
    results = []
    while engine.has_unfinished():
        results += engine.step()
    assert [(r.request_id, r.prompt_token_ids, len(r.token_ids)) for r in results] == [("x", [4, 5], 3)]


def test_an_interrupted_generate_leaves_nothing_behind(model, monkeypatch):
    """Ctrl-C in generate() left its requests running and waiting for nobody: the next generate() waited for
    all of them (28 s in the audit) and their results piled up undelivered."""
    engine = fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, mask_token_id=MASK),
                          fdllm.EngineConfig(num_pages=256, max_num_seqs=4))
    other = engine.add_request([9, 9], params(max_new_tokens=40))  # a step-API caller's request: it stays
    step, calls = engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([[1, 2, 3]] * 20, params(max_new_tokens=200))
    monkeypatch.undo()
    assert engine.num_running + engine.num_waiting == 1 and engine.scheduler.find(other) is not None
    [res] = engine.generate([[1, 2, 3]], params(max_new_tokens=3))
    assert len(res.token_ids) == 3
    while engine.has_unfinished():
        assert [r.request_id for r in engine.step()] in ([], [other])
    assert engine.num_free_pages == engine.num_pages


def test_generate_with_every_page_held_is_an_error_not_a_hang(model):
    engine = make_engine(model)
    engine.hold_free_pages(engine.num_pages)
    with pytest.raises(RuntimeError, match=r"cannot be admitted while hold_free_pages\(256\) keeps the pages"):
        engine.generate([[1, 2, 3]], params(max_new_tokens=3))
    assert not engine.has_unfinished()
    engine.hold_free_pages(0)
    assert len(engine.generate([[1, 2, 3]], params(max_new_tokens=3))[0].token_ids) == 3


def test_a_built_engine_freezes_the_start_up_heap_unless_told_not_to(model):
    """The collector's full passes must not re-scan the start-up heap mid-serving (EngineConfig.freeze_gc)."""
    def tracked(obj):  # frozen objects are in no generation
        return any(o is obj for o in gc.get_objects())

    gc.unfreeze()
    kept = fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(mask_token_id=MASK),
                        fdllm.EngineConfig(num_pages=8, freeze_gc=False))
    assert gc.get_freeze_count() == 0 and tracked(kept.scheduler)
    frozen = make_engine(model)
    assert gc.get_freeze_count() > 0 and not tracked(kept.scheduler) and not tracked(frozen.scheduler)
    [out] = frozen.generate([[1, 2, 3]], params(max_new_tokens=8))  # decodes as usual
    assert len(out.token_ids) == 8


def test_request_larger_than_the_cache_is_rejected(model):
    engine = make_engine(model, num_pages=2)
    with pytest.raises(ValueError, match="KV pages"):
        engine.add_request([1] * 10, params(max_new_tokens=10))


def test_generate_alongside_step_api_keeps_other_results(model):
    engine = make_engine(model)
    rid = engine.add_request([1, 2, 3], params(max_new_tokens=4))
    (res,) = engine.generate([[4, 5, 6, 7, 8]], params(max_new_tokens=30))
    assert res.request_id != rid and len(res.token_ids) == 30
    assert engine.has_unfinished()
    assert [r.request_id for r in engine.step()] == [rid]
    assert not engine.has_unfinished()


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}])
def test_max_new_tokens_cuts_the_output_and_never_changes_it(model, sampling):
    """Truncation invariance (docs/method.md §5): every masked position of a sub-block competes, whatever
    the limit; the limit only cuts. Checked against the longest run at every limit across two blocks."""
    prompts = random_prompts(4, [3, 8, 13], seed=41)
    engine = make_engine(model, use_sub_block_cache=True)
    full = engine.generate(prompts, params(max_new_tokens=20, **sampling))
    for k in range(1, 20):
        cut = engine.generate(prompts, params(max_new_tokens=k, **sampling))
        for prompt, whole, short in zip(prompts, full, cut):
            assert short.token_ids == whole.token_ids[:k], f"prompt length {len(prompt)}, max_new_tokens {k}"
            assert short.finish_reason == "length"
    assert engine.num_free_pages == engine.num_pages


@torch.no_grad()
def test_block_opening_token_is_the_argmax_for_sampling_requests(model):
    """The token that opens a block (commit, or a prompt of whole blocks) comes from the clean prefix's
    last logit as an argmax (docs/method.md §3.4), also when the request samples inside blocks."""
    prompts = random_prompts(3, [5, 8, 16], seed=43)
    results = make_engine(model).generate(prompts, params(max_new_tokens=30, temperature=2.0, seed=3))
    checked = 0
    for prompt, res in zip(prompts, results):
        seq = prompt + res.token_ids
        for pos in range(len(prompt), len(seq)):
            if pos % 8:
                continue  # not the first position of a block
            prefix = torch.tensor([seq[:pos]])
            logits = model(prefix, mask=block_causal_mask(pos, 8))[0, -1].float()
            logits[MASK] = float("-inf")
            assert seq[pos] == int(logits.argmax()), f"prompt length {len(prompt)}, position {pos}"
            checked += 1
    assert checked >= 8


def _finish_all(engine, limit=400):
    done = {}
    for _ in range(limit):
        done |= {r.request_id: r for r in engine.step()}
        if not engine.has_unfinished():
            return done
    raise AssertionError("the engine did not finish its requests")


def test_error_applying_one_request_fails_it_alone(model, caplog):
    prompts = random_prompts(3, [4, 9, 12], seed=47)
    alone = make_engine(model).generate(prompts, params())
    engine = make_engine(model)
    rids = [engine.add_request(p, params()) for p in prompts]
    engine.step()
    victim = engine.scheduler.find(rids[1])

    def broken_apply(*args, **kwargs):
        raise RuntimeError("injected failure")

    victim.apply = broken_apply
    with caplog.at_level("ERROR", logger="fdllm.engine.engine"):
        done = _finish_all(engine)
    assert done[rids[1]].finish_reason == "error" and "injected failure" in done[rids[1]].error
    assert rids[1] in caplog.text
    assert [done[r].token_ids for r in (rids[0], rids[2])] == [alone[0].token_ids, alone[2].token_ids]
    assert engine.num_free_pages == engine.num_pages
    assert engine.generate(prompts[:1], params())[0].token_ids == alone[0].token_ids  # still serving


def test_error_in_the_forward_fails_that_batch_and_the_engine_keeps_serving(model, caplog):
    prompts = random_prompts(2, [4, 9], seed=53)
    alone = make_engine(model).generate(prompts, params())
    engine = make_engine(model)
    rids = [engine.add_request(p, params()) for p in prompts]
    engine.step()
    run = engine.runner.run

    def failing_once(works, batch=None):
        engine.runner.run = run
        raise RuntimeError("injected CUDA-like failure")

    engine.runner.run = failing_once
    late = engine.add_request(prompts[0], params())  # joins the failing step's batch
    with caplog.at_level("ERROR", logger="fdllm.engine.engine"):
        done = _finish_all(engine)
    assert {r: done[r].finish_reason for r in [*rids, late]} == {r: "error" for r in [*rids, late]}
    assert all(r in caplog.text for r in [*rids, late])
    assert engine.num_free_pages == engine.num_pages and not engine.has_unfinished()
    again = engine.generate(prompts, params())
    assert [r.token_ids for r in again] == [r.token_ids for r in alone]


def test_error_planning_one_request_fails_it_alone(model):
    engine = make_engine(model)
    good = engine.add_request([1, 2, 3], params(max_new_tokens=8))
    bad = engine.add_request([4, 5, 6], params(max_new_tokens=8))
    engine.scheduler.find(bad).next_work = lambda budget, lookahead=True: 1 / 0
    done = _finish_all(engine)
    assert done[bad].finish_reason == "error" and "ZeroDivisionError" in done[bad].error
    assert done[good].finish_reason == "length" and len(done[good].token_ids) == 8
    assert engine.num_free_pages == engine.num_pages


def test_callback_aborting_another_request_mid_step_is_safe(model):
    prompts = random_prompts(3, [4, 9, 12], seed=59)
    alone = make_engine(model).generate(prompts, params())
    engine = make_engine(model)
    rids = []

    def abort_the_others(rid, tokens, finished):
        for other in rids[1:]:
            engine.abort(other)  # requests later in the same step's loop

    rids.append(engine.add_request(prompts[0], params(), on_tokens=abort_the_others))
    rids += [engine.add_request(p, params()) for p in prompts[1:]]
    done = _finish_all(engine)
    assert [done[r].finish_reason for r in rids] == ["length", "abort", "abort"]
    assert done[rids[0]].token_ids == alone[0].token_ids
    assert engine.num_free_pages == engine.num_pages


def test_requests_without_a_mode_decode_as_the_checkpoint_was_trained(model, dllm_dir, caplog):
    """SamplingParams() names no mode: a block-diffusion fine-tune (fdllm_config.json) decodes diffusion, a
    plain AR checkpoint AR. Diffusion by default decoded noise on the world's AR base (its vocabulary has
    the mask token) and refused a model without a mask token. A request's mode, or the engine's
    default_mode, still chooses."""
    import logging

    with caplog.at_level(logging.INFO, logger="fdllm"):
        assert fdllm.Engine.from_pretrained(dllm_dir).default_mode == "diffusion"
        assert "plain AR checkpoint" not in caplog.text
        base = fdllm.Engine.from_pretrained("assets/tiny-ar-base")
    assert base.default_mode == "ar" and "no fdllm_config.json: a plain AR checkpoint" in caplog.text
    prompt = base.tokenizer.encode("Reverse: 0412659885")
    by_default, ar, diffusion = (base.generate([prompt], fdllm.SamplingParams(max_new_tokens=12, ignore_eos=True, **mode))[0]
                                 for mode in ({}, {"mode": "ar"}, {"mode": "diffusion"}))
    assert by_default.token_ids == ar.token_ids and by_default.num_forwards == ar.num_forwards == 12
    assert diffusion.num_forwards < 12  # asked for, it still decodes diffusion (several tokens a forward)
    assert fdllm.Engine.from_pretrained("assets/tiny-ar-base", default_mode="diffusion").default_mode == "diffusion"
    with pytest.raises(ValueError, match="block_lookahead applies to mode='diffusion' only"):
        base.generate([prompt], fdllm.SamplingParams(block_lookahead=True))

    assert make_engine(model).default_mode == "diffusion"  # built from a model and a block-diffusion config
    no_mask = make_engine(model, mask_token_id=None)
    assert no_mask.default_mode == "ar" and len(no_mask.generate([[1, 2, 3]], params())[0].token_ids) == 20
    for mode in ("diffusion", "beam"):
        with pytest.raises(ValueError, match="default_mode must be one of"):
            fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4), default_mode=mode)


def test_held_free_pages_are_not_given_to_new_requests(model):
    """Engine.hold_free_pages(n): a request arriving after a caller that waits for pages (a score between
    steps) is not admitted into them, so it cannot overtake that caller; the hold lifted, it is."""
    engine = make_engine(model, num_pages=8)
    engine.add_request([5] * 20, params(max_new_tokens=8), request_id="running")
    engine.step()  # prefilled: 3 pages and a spare for its next block
    free = engine.num_free_pages
    engine.hold_free_pages(free)
    engine.add_request([6, 7], params(max_new_tokens=4), request_id="later")
    engine.step()
    assert engine.num_waiting == 1 and engine.num_free_pages == free
    engine.hold_free_pages(0)
    engine.step()
    assert engine.num_waiting == 0  # admitted (and perhaps already done)
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="held pages"):
            engine.hold_free_pages(bad)


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
def test_the_model_s_eos_ends_a_request_unless_ignore_eos(sharp_dir, tmp_path, mode, file):
    """The oracle is a run of the same model without an EOS: with its EOS set in the checkpoint to a token
    that run decodes, a request stops right after its first occurrence ("stop"), and one with ignore_eos
    decodes exactly the run without EOS ("length"). The EOS is config.json's eos_token_id or in
    generation_config.json's list, where Qwen2.5 and Llama 3 Instruct keep all their end tokens and vLLM
    stops on each (no tokenizer here: the token's name is no end-of-turn marker)."""
    shutil.copytree(sharp_dir, tmp_path, dirs_exist_ok=True)
    model = fdllm.load_model(tmp_path)
    assert model.config.end_token_ids == frozenset()
    sampling = dict(max_new_tokens=20, mode=mode)
    free = make_engine(model).generate([[5, 9, 14]], params(**sampling))[0]
    eos = free.token_ids[5]
    saved = json.loads((tmp_path / file).read_text())
    (tmp_path / file).write_text(json.dumps(saved | {"eos_token_id": eos if file == "config.json" else [eos]}))
    model = fdllm.load_model(tmp_path)
    stopped, ignored = make_engine(model).generate([[5, 9, 14]] * 2, [params(**sampling, ignore_eos=False), params(**sampling)])
    assert (stopped.token_ids, stopped.finish_reason) == (free.token_ids[: free.token_ids.index(eos) + 1], "stop")
    assert (ignored.token_ids, ignored.finish_reason) == (free.token_ids, "length")


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_time_to_first_token_counts_until_the_first_token_not_the_first_step(model, mode):
    """A 40-token prompt prefilled 8 tokens a step streams nothing for several steps: its
    time_to_first_token_s reaches the start of the step whose tokens were streamed first (steps 50 ms
    apart), not the first prefill step's."""
    engine = make_engine(model, max_prefill_tokens=8)
    first_streamed, started, step = [], [], 0
    engine.add_request(random_prompts(1, [40], seed=10)[0], params(max_new_tokens=8, mode=mode), request_id="A",
                       on_tokens=lambda rid, new, fin: new and not first_streamed and first_streamed.append(step))
    added = time.perf_counter()
    done = {}
    while engine.has_unfinished():
        time.sleep(0.05)
        started.append(time.perf_counter())
        done |= {r.request_id: r for r in engine.step()}
        step += 1
    assert first_streamed and first_streamed[0] >= 4  # prefill-only steps came first
    assert done["A"].time_to_first_token_s >= started[first_streamed[0]] - added
