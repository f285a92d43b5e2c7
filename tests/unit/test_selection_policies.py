"""Selection policies of docs/method.md §5 (entropy budget, adaptive sub-block boundary) beside the threshold rule.

- The rules on tiny hand-built inputs, chosen so that the usual slips fail: `<` for `<=` on the budget
  (sums that hit the budget exactly in binary floating point), `>=` for `>` on the delimiter
  threshold, the boundary one offset early or late, a delimiter at a decoded offset counted.
- The engine with the sub-block cache off against a no-cache recompute that implements every policy
  itself (nothing shared with `fdllm.decoding` or the engine but the model's forward).
- Batch = alone, and the static-bucket path = the dynamic path, for every policy, cache on and off.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import fdllm
from fdllm.decoding import (
    SelectionPolicy,
    delimiter_stop,
    next_sub_block,
    plan_block_step,
    select_block_step,
    select_entropy_budget,
    token_entropy,
)
from fdllm.masks import block_causal_mask
from tests.unit.test_engine import MASK, make_engine, params, random_prompts
from tests.unit.test_static_steps import dynamic_only, run_mixed

M = 99  # mask token id of the hand-built blocks


# -- the rules -----------------------------------------------------------------------------------


def test_entropy_budget_commits_the_longest_prefix_at_most_gamma():
    # ascending: 0.25 (i=2), 0.5 (i=0), 1.0 (i=1); binary-exact sums 0.25, 0.75, 1.75
    h = [0.5, 1.0, 0.25]
    assert select_entropy_budget(h, 0.75) == [True, False, True]  # the sum equals gamma: still committed
    assert select_entropy_budget(h, 0.7) == [False, False, True]
    assert select_entropy_budget(h, 1.75) == [True, True, True]
    assert select_entropy_budget(h, 1.74) == [True, False, True]
    assert select_entropy_budget(h, 0.0) == [False, False, True]  # always at least one: the most certain
    assert select_entropy_budget([2.0, 3.0], 1.0) == [True, False]  # even above gamma on its own
    assert select_entropy_budget([0.0, 0.0, 0.0, 5.0], 0.0) == [True, True, True, False]  # zero entropy is free
    assert select_entropy_budget([0.5, 0.25, 0.25], 0.25) == [False, True, False]  # ties: the lower offset first
    assert select_entropy_budget([], 1.0) == []
    # without forced progress (a block lookahead's step): nothing when the most certain alone exceeds gamma
    assert select_entropy_budget([2.0, 3.0], 1.0, force=False) == [False, False]
    assert select_entropy_budget([0.5, 0.25, 0.25], 0.25, force=False) == [False, True, False]
    assert select_entropy_budget([0.0, 5.0], 0.0, force=False) == [True, False]


def test_entropy_budget_does_not_skip_ahead_to_a_cheaper_position():
    # a prefix of the sorted order, not a knapsack: once 0.5 does not fit, 0.6 is not tried after it
    assert select_entropy_budget([0.1, 0.5, 0.6], 0.5) == [True, False, False]


def test_token_entropy_matches_a_hand_computation():
    logits = torch.tensor([[0.0, 0.0, 50.0, math.log(3.0)], [1.0, 2.0, 3.0, 4.0]])
    mask = 2  # the mask's logit is huge but it is no prediction: row 0 is p = (1/5, 1/5, 0, 3/5)
    p = [1 / 5, 1 / 5, 3 / 5]
    want0 = -sum(x * math.log(x) for x in p)
    q = torch.tensor([1.0, 2.0, 4.0]).softmax(-1).tolist()
    want1 = -sum(x * math.log(x) for x in q)
    got = token_entropy(logits, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([want0, want1]), rtol=1e-6, atol=1e-6)


def test_delimiter_stop_ends_the_sub_block_after_the_first_confident_delimiter():
    D = {7, 8}
    # sub-block [4, 8): offsets 4..7; row i predicts offset 4 + i
    tokens, cands = [7, 3, 8, 7], [True, True, True, True]
    assert delimiter_stop(tokens, [0.5, 0.9, 0.6, 0.9], cands, 4, 8, D, 0.5) == 7  # 0.5 is not above 0.5: offset 6
    assert delimiter_stop(tokens, [0.51, 0.9, 0.6, 0.9], cands, 4, 8, D, 0.5) == 5  # offset 4: ends after it
    assert delimiter_stop(tokens, [0.1, 0.9, 0.1, 0.2], cands, 4, 8, D, 0.5) == 8  # none confident: unchanged
    assert delimiter_stop([3, 3, 3, 8], [0.9] * 4, cands, 4, 8, D, 0.5) == 8  # at the last offset: still 8
    assert delimiter_stop([3, 3, 3, 8], [0.9] * 4, cands, 4, 8, D, 0.0) == 8
    # a delimiter at a decoded offset (no candidate) is no prediction
    assert delimiter_stop(tokens, [0.9] * 4, [False, True, True, True], 4, 8, D, 0.5) == 7
    assert delimiter_stop([7], [0.9], [True], 0, 1, D, 0.5) == 1
    # rows past an already shortened sub-block [4, 6) never move its end, not even one past it
    assert delimiter_stop([3, 3, 7, 7], [0.9] * 4, cands, 4, 6, D, 0.5) == 6


def test_select_block_step_bounds_first_then_selects_inside():
    block = [5, M, M, M, M, M, M, M]
    step = plan_block_step(block, 0, 8, first_step=True, use_sub_block_cache=True, mask_token_id=M)
    tokens, probs = [0, 1, 7, 2, 3, 4, 5, 6], [0.0, 0.6, 0.7, 0.95, 0.99, 0.99, 0.2, 0.99]
    fixed = SelectionPolicy(threshold=0.9)
    assert select_block_step(fixed, step, tokens, probs, None) == ([False, False, False, True, True, True, False, True], 8)
    adaptive = SelectionPolicy(threshold=0.9, delimiter_threshold=0.5, delimiter_ids=frozenset({7}))
    # offset 2 predicts delimiter 7 at 0.7 > 0.5: the sub-block is [0, 3); nothing in it passes 0.9,
    # so the most confident inside it (offset 2, 0.7) goes, not offset 4/5/7 outside it
    assert select_block_step(adaptive, step, tokens, probs, None) == ([False, False, True] + [False] * 5, 3)
    ents = [0.0, 0.25, 0.125, 0.0625, 0.5, 0.5, 0.5, 0.5]  # binary-exact sums
    budget = SelectionPolicy(selection="entropy_budget", entropy_budget=0.375, delimiter_threshold=0.5,
                             delimiter_ids=frozenset({7}))
    assert select_block_step(budget, step, tokens, probs, ents) == ([False, True, True] + [False] * 5, 3)
    budget_fixed = SelectionPolicy(selection="entropy_budget", entropy_budget=0.1875)
    assert select_block_step(budget_fixed, step, tokens, probs, ents)[0] == [False, False, True, True] + [False] * 4
    # without forced progress (a block lookahead's step), under either rule: nothing when nothing qualifies
    tiny = SelectionPolicy(selection="entropy_budget", entropy_budget=0.01)
    assert select_block_step(tiny, step, tokens, probs, ents)[0] == [False] * 3 + [True] + [False] * 4
    assert select_block_step(tiny, step, tokens, probs, ents, force=False)[0] == [False] * 8
    strict = SelectionPolicy(threshold=0.999)
    assert select_block_step(strict, step, tokens, probs, None, force=False)[0] == [False] * 8
    assert select_block_step(fixed, step, tokens, probs, None, force=False)[0] == [False, False, False, True, True,
                                                                                 True, False, True]


def test_next_sub_block_layout():
    L = 8
    assert next_sub_block([5, M, M, M, M, M, M, M], None, 4, M) == (0, 4)
    assert next_sub_block([5, 1, 2, 3, 4, M, M, M], None, 4, M) == (4, 8)  # the grid cell of the first mask
    assert next_sub_block([5, 1, M, 3, M, M, M, M], (0, 4), 4, M) == (0, 4)  # continues while masked
    assert next_sub_block([5, 1, 2, 3, M, M, M, M], (0, 4), 4, M) == (4, 8)
    # an adaptive boundary ended [0, 3): the next sub-block starts at 3, off the grid, and spans 4
    assert next_sub_block([5, 1, 9, M, M, M, M, M], (0, 3), 4, M) == (3, 7)
    assert next_sub_block([5, 1, 9, 1, 2, 3, 4, M], (3, 7), 4, M) == (7, 8)  # clipped to the block
    assert next_sub_block([5, 1, 9, 1, 2, 3, 4, 2], (7, 8), 4, M) is None
    # offsets after an early boundary that were decoded before it: skipped when wholly decoded
    assert next_sub_block([5, 9, 1, 2, M, M, M, M], (0, 2), 2, M) == (4, 6)
    assert len(next_sub_block([M] * L, None, 4, M)) == 2


def test_plan_block_step_with_an_off_grid_sub_block():
    block = [5, 1, 9, M, M, M, M, M]
    first = plan_block_step(block, 3, 4, first_step=True, use_sub_block_cache=True, mask_token_id=M, sub_stop=7)
    assert (first.feed_start, first.feed_stop, first.sub_stop) == (0, 8, 7)
    assert first.logit_rows == (2, 3, 4, 5) and first.candidates == (True,) * 4
    block[3] = 4
    cached = plan_block_step(block, 3, 4, first_step=False, use_sub_block_cache=True, mask_token_id=M, sub_stop=5)
    assert (cached.feed_start, cached.feed_stop) == (3, 5) and cached.logit_rows == (0, 0)


def test_sampling_params_validation():
    sp = fdllm.SamplingParams
    assert sp(selection="entropy_budget", entropy_budget=0.0).entropy_budget == 0.0
    for kwargs, field in [
        ({"selection": "top_k"}, "selection"),
        ({"selection": "entropy_budget", "entropy_budget": -0.1}, "entropy_budget"),
        ({"selection": "entropy_budget", "entropy_budget": float("nan")}, "entropy_budget"),
        ({"selection": "entropy_budget", "entropy_budget": True}, "entropy_budget"),
        ({"entropy_budget": 0.5}, "entropy_budget"),  # without selection="entropy_budget"
        ({"selection": "entropy_budget", "threshold": 0.9}, "threshold"),
        ({"delimiter_threshold": 1.5}, "delimiter_threshold"),
        ({"delimiter_threshold": -0.1}, "delimiter_threshold"),
        ({"delimiter_threshold": float("inf")}, "delimiter_threshold"),
        ({"delimiter_threshold": 0.5, "delimiters": ("",)}, "delimiters"),
        ({"delimiter_threshold": 0.5, "delimiters": "\n"}, "delimiters"),
        ({"delimiter_threshold": 0.5, "delimiters": ("x" * 33,)}, "delimiters"),
        ({"delimiter_threshold": 0.5, "delimiter_token_ids": (-1,)}, "delimiter_token_ids"),
        ({"delimiters": ("\n",)}, "delimiters"),  # without delimiter_threshold
        ({"delimiter_token_ids": (3,)}, "delimiters"),
        ({"block_lookahead": 1}, "block_lookahead"),
        ({"block_lookahead": True, "mode": "ar"}, "block_lookahead"),
        ({"block_lookahead": True, "mode": "speculative"}, "block_lookahead"),
    ]:
        with pytest.raises(ValueError, match=f"^{field} "):
            sp(**kwargs)


def test_text_delimiters_resolve_to_every_token_containing_them(dllm_dir):
    engine = fdllm.Engine.from_pretrained(dllm_dir, engine_config=fdllm.EngineConfig(num_pages=16))
    tok = engine.tokenizer
    newline = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    assert newline, "the test tokenizer has a newline token"
    default = engine.delimiter_ids(fdllm.SamplingParams(delimiter_threshold=0.5))
    assert default == newline | engine._tokenizer_stop_ids and tok.convert_tokens_to_ids("<|im_end|>") in default
    comma = engine.delimiter_ids(fdllm.SamplingParams(delimiter_threshold=0.5, delimiters=(",",),
                                                      delimiter_token_ids=(5,)))
    assert comma == {tok.convert_tokens_to_ids(",")} | {5} | engine._tokenizer_stop_ids
    with pytest.raises(ValueError, match="no token"):
        engine.add_request("hello", fdllm.SamplingParams(delimiter_threshold=0.5, delimiters=("@",)))
    with pytest.raises(ValueError, match="delimiter_token_ids must be in"):
        engine.add_request("hello", fdllm.SamplingParams(delimiter_threshold=0.5, delimiter_token_ids=(10**6,)))
    assert engine.num_waiting == 0


def test_a_servers_delimiter_cache_is_bounded_however_many_texts_clients_send(dllm_dir, monkeypatch):
    """Requests choose delimiter texts: each distinct one kept its token set for the engine's life (a
    one-character text of a 150k vocabulary holds tens of thousands of ids), an unbounded growth a client
    could drive. The engine keeps the most recent DELIMITER_CACHE_SIZE, and a text evicted resolves again alike."""
    from fdllm.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "DELIMITER_CACHE_SIZE", 8)
    engine = fdllm.Engine.from_pretrained(dllm_dir, engine_config=fdllm.EngineConfig(num_pages=16))
    vocab = [engine.tokenizer.decode([i]) for i in range(len(engine.tokenizer))]
    texts = sorted({t for t in vocab if t.strip() and len(t) == 1})[:20]
    assert len(texts) > 8, "the test tokenizer has enough one-character tokens"
    first = engine.delimiter_ids(fdllm.SamplingParams(delimiter_threshold=0.5, delimiters=(texts[0],)))
    for text in texts[1:]:
        engine.delimiter_ids(fdllm.SamplingParams(delimiter_threshold=0.5, delimiters=(text,)))
    assert engine._tokens_containing.cache_info().currsize == 8
    assert engine.delimiter_ids(fdllm.SamplingParams(delimiter_threshold=0.5, delimiters=(texts[0],))) == first


def test_text_delimiters_need_a_tokenizer(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request([1, 2, 3], fdllm.SamplingParams(delimiter_threshold=0.5, delimiters=("\n",)))
    # without a tokenizer the default is the end tokens and delimiter_token_ids only
    assert engine.delimiter_ids(fdllm.SamplingParams(delimiter_threshold=0.5, delimiter_token_ids=(4,))) >= {4}


# -- the engine against a no-cache recompute that implements the policies itself ------------------


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


@pytest.fixture(scope="module")
def delimiters(model):
    """Two tokens the sharp model predicts often (so boundaries fire), found by a plain threshold run."""
    prompts = random_prompts(6, [3, 9, 14], seed=77)
    counts = Counter(t for r in make_engine(model).generate(prompts, params(max_new_tokens=24)) for t in r.token_ids)
    return tuple(t for t, _ in counts.most_common(2))


def reference_policy_generate(model, prompt, max_new_tokens, L, S, rule, delimiter_ids=(), delimiter_threshold=None,
                              block_lookahead=False):
    """Greedy block diffusion recomputing the whole sequence under the block-causal mask every step.

    `rule`: ("threshold", tau) or ("entropy_budget", gamma). With `delimiter_threshold`, a sub-block
    ends after the first masked offset whose prediction is a delimiter with probability above it,
    and the next one starts there, S offsets long (clipped to the block). With `block_lookahead`,
    a block opened by a logit first gets a step over the sequence with the block wholly masked (its
    first offset too) that decodes offsets 1..S-1 like a step of the first sub-block, but commits
    nothing the rule does not pick on its own (no forced progress).
    """
    P = len(prompt)

    @torch.no_grad()
    def rows_of(seq):
        return model(torch.tensor([seq]), mask=block_causal_mask(len(seq), L))[0].double()

    def predict(row):
        row = row.clone()
        row[MASK] = float("-inf")
        p = row.softmax(-1)
        h = -sum(float(x) * math.log(float(x)) for x in p if x > 0)
        return int(p.argmax()), float(p.max()), h

    def denoise(rows, start, block, lo, hi, force=True):
        """One step over the sub-block [lo, hi) from the logit rows of the sequence; returns its end."""
        masked = [p for p in range(lo, hi) if block[p] == MASK]
        pred = {p: predict(rows[start + p - 1]) for p in masked}
        if delimiter_threshold is not None:
            hit = [p for p in masked if pred[p][0] in delimiter_ids and pred[p][1] > delimiter_threshold]
            if hit:
                hi = hit[0] + 1
        masked = [p for p in masked if p < hi]
        if rule[0] == "threshold":
            best = max(masked, key=lambda p: pred[p][1]) if force else None
            chosen = [p for p in masked if p == best or pred[p][1] > rule[1]]
        else:
            chosen, total = [], 0.0
            for p in sorted(masked, key=lambda p: (pred[p][2], p)):
                total += pred[p][2]
                if (chosen or not force) and total > rule[1]:
                    break
                chosen.append(p)
        for p in chosen:
            block[p] = pred[p][0]
        return hi

    def look_ahead(block):
        """The opened block's lookahead step, when asked; the first sub-block afterwards (None: none ran)."""
        if not block_lookahead or S == 1:
            return None
        start = len(committed)
        return 0, denoise(rows_of(committed + [MASK] * L), start, block, 0, S, force=False)

    full = P - P % L
    committed = list(prompt[:full])
    block = list(prompt[full:]) if P % L else [predict(rows_of(committed)[-1])[0]]
    block += [MASK] * (L - len(block))
    out, sub = [], None if P % L else look_ahead(block)
    while True:
        start = len(committed)
        for token in block[P + len(out) - start :]:
            if token == MASK:
                break
            out.append(token)
            if len(out) == max_new_tokens:
                return out
        if MASK not in block:
            committed += block
            block = [predict(rows_of(committed)[-1])[0]] + [MASK] * (L - 1)
            sub = look_ahead(block)
            continue
        if sub is None:
            first = block.index(MASK)
            lo = first - first % S
            sub = (lo, min(lo + S, L))
        while MASK not in block[sub[0] : sub[1]]:
            sub = (sub[1], min(sub[1] + S, L))
        lo, hi = sub
        sub = (lo, denoise(rows_of(committed + block), start, block, lo, hi))


POLICIES = {
    "threshold": (("threshold", 0.4), {}),
    # this random model's H_i are mostly 1-3 nats: gamma 4 commits ~1.3 positions per step, 8 about 2
    "entropy_budget_small": (("entropy_budget", 4.0), {"selection": "entropy_budget", "entropy_budget": 4.0}),
    "entropy_budget_large": (("entropy_budget", 8.0), {"selection": "entropy_budget", "entropy_budget": 8.0}),
    "threshold_delimiter": (("threshold", 0.4), {"delimiter_threshold": 0.3}),
    "entropy_budget_delimiter": (("entropy_budget", 6.0), {"selection": "entropy_budget", "entropy_budget": 6.0,
                                                             "delimiter_threshold": 0.3}),
}


def policy_params(name, delimiters, **kw):
    fields = dict(POLICIES[name][1])
    if "delimiter_threshold" in fields:
        fields["delimiter_token_ids"] = delimiters
    return params(**fields, **kw)


@pytest.mark.parametrize("seed,name", list(enumerate(POLICIES)))
def test_cache_off_equals_the_no_cache_policy_reference(model, delimiters, seed, name):
    rule, fields = POLICIES[name]
    prompts = random_prompts(8, [1, 3, 7, 8, 9, 13, 16, 21], seed=seed)
    results = make_engine(model).generate(prompts, policy_params(name, delimiters, max_new_tokens=22))
    thr = fields.get("delimiter_threshold")
    for prompt, res in zip(prompts, results):
        want = reference_policy_generate(model, prompt, 22, 8, 4, rule, delimiters, thr)
        assert res.token_ids == want, f"prompt length {len(prompt)}"
    assert any(r.tokens_per_forward > 1 for r in results), "some step should commit several positions"


@pytest.mark.parametrize("name", list(POLICIES))
def test_block_lookahead_equals_the_no_cache_policy_reference(model, delimiters, name):
    """Every selection policy with the block lookahead (cache off: the engine's steps recompute what
    the reference recomputes), beside requests without it."""
    rule, fields = POLICIES[name]
    prompts = random_prompts(8, [1, 3, 7, 8, 9, 13, 16, 21], seed=40)
    looks = [i % 3 != 2 for i in range(len(prompts))]
    results = make_engine(model).generate(prompts, [policy_params(name, delimiters, max_new_tokens=22, block_lookahead=look)
                                                    for look in looks])
    for prompt, res, look in zip(prompts, results, looks):
        want = reference_policy_generate(model, prompt, 22, 8, 4, rule, delimiters, fields.get("delimiter_threshold"),
                                         block_lookahead=look)
        assert res.token_ids == want, f"prompt length {len(prompt)}, lookahead {look}"


def test_the_policies_change_decoding(model, delimiters):
    """Power of the comparisons above: each policy decodes differently from plain threshold somewhere."""
    prompts = random_prompts(8, [1, 3, 7, 8, 9, 13, 16, 21], seed=5)
    engine = make_engine(model)
    runs = {name: engine.generate(prompts, policy_params(name, delimiters, max_new_tokens=22)) for name in POLICIES}
    key = lambda rs: [(r.token_ids, r.num_forwards) for r in rs]  # noqa: E731
    for name in POLICIES:
        if name != "threshold":
            assert key(runs[name]) != key(runs["threshold"]), name
    # the small budget decodes fewer tokens per forward than the large one
    fwd = {n: sum(r.num_forwards for r in rs) for n, rs in runs.items()}
    assert fwd["entropy_budget_small"] > fwd["entropy_budget_large"]


@pytest.mark.parametrize("use_sub_block_cache", [False, True], ids=["cache-off", "sub-block-cache"])
@pytest.mark.parametrize("name", [n for n in POLICIES if n != "threshold"])
def test_batch_equals_alone_and_static_equals_dynamic(model, delimiters, name, use_sub_block_cache):
    prompts = random_prompts(5, [2, 7, 9, 12, 19], seed=9)
    requests = [(p, policy_params(name, delimiters, max_new_tokens=19, temperature=0.8 if i % 2 else 0.0, seed=i))
                for i, p in enumerate(prompts)]
    engine = make_engine(model, use_sub_block_cache=use_sub_block_cache)
    batched = run_mixed(engine, requests)  # joins mid-flight, batch sizes change
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in requests]
    assert batched == alone
    dynamic = run_mixed(dynamic_only(make_engine(model, use_sub_block_cache=use_sub_block_cache)), requests)
    assert batched == dynamic


def test_policies_mix_in_one_batch(model, delimiters):
    """Requests with different policies share steps; each decodes as it would alone."""
    prompts = random_prompts(len(POLICIES), [4, 9, 17], seed=12)
    per = [policy_params(n, delimiters, max_new_tokens=20) for n in POLICIES]
    engine = make_engine(model, use_sub_block_cache=True)
    together = [r.token_ids for r in engine.generate(prompts, per)]
    assert together == [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, per)]


def test_speculative_drafts_under_the_entropy_budget_still_equal_ar(model):
    prompts = random_prompts(3, [4, 9, 12], seed=31)
    engine = make_engine(model)
    ar = [r.token_ids for r in engine.generate(prompts, params(mode="ar", max_new_tokens=16))]
    spec = engine.generate(prompts, params(mode="speculative", selection="entropy_budget", entropy_budget=0.5,
                                           max_new_tokens=16))
    assert [r.token_ids for r in spec] == ar


# -- adaptive sub-blocks with the sub-block cache, against the DualCache oracle's own K/V ---------


def reference_adaptive_dualcache(model, prompt, max_new_tokens, L, S, threshold, delimiter_ids, delimiter_threshold):
    """docs/method.md §3.2-3.3 with adaptive sub-blocks (§5), on tests/unit/test_sub_block_cache_oracle.py's
    dense K/V: a sub-block refreshes on its first step and while its first offset is masked, else feeds
    just its own offsets [lo, hi) (hi shrunk by a delimiter) against the block's partly stale K/V."""
    from tests.unit.test_sub_block_cache_oracle import DenseKV, most_likely

    P = len(prompt)
    assert (P + max_new_tokens) % L == 0
    kv = DenseKV(model, P + max_new_tokens + L)
    full = P - P % L
    for b in range(0, full, L):
        logits = kv.forward(prompt[b : b + L], b, b + L)
    sequence = list(prompt[:full])
    block = list(prompt[full:]) + [MASK] * (L - P % L) if P % L else [most_likely(logits[-1])[0]] + [MASK] * (L - 1)
    while len(sequence) < P + max_new_tokens:
        start = len(sequence)
        first = block.index(MASK)
        lo = first - first % S
        while MASK in block:
            hi = min(lo + S, L)
            first_step = True
            while MASK in block[lo:hi]:
                if first_step or block[lo] == MASK:
                    logits, first_row = kv.forward(block, start, start + L), 0
                else:
                    logits, first_row = kv.forward(block[lo:hi], start + lo, start + L), lo
                first_step = False
                masked = [p for p in range(lo, hi) if block[p] == MASK]
                guess = {p: most_likely(logits[p - 1 - first_row]) for p in masked}
                hits = [p for p in masked if guess[p][0] in delimiter_ids and guess[p][1] > delimiter_threshold]
                if hits:
                    hi = hits[0] + 1
                masked = [p for p in masked if p < hi]
                best = max(masked, key=lambda p: guess[p][1])
                for p in masked:
                    if p == best or guess[p][1] > threshold:
                        block[p] = guess[p][0]
            lo = hi
        logits = kv.forward(block, start, start + L)
        sequence += block
        block = [most_likely(logits[-1])[0]] + [MASK] * (L - 1)
    return sequence[P:]


def test_adaptive_sub_blocks_with_the_sub_block_cache_equal_the_dualcache_reference(model, delimiters):
    from tests.unit.test_sub_block_cache_oracle import whole_blocks

    L, S, threshold, dthr = 8, 4, 0.4, 0.3
    prompts = random_prompts(8, [1, 3, 7, 8, 9, 13, 16, 21], seed=21)
    budgets = [whole_blocks(p, L) for p in prompts]
    engine = make_engine(model, use_sub_block_cache=True, max_prefill_tokens=2 * L)
    results = engine.generate(prompts, [params(max_new_tokens=n, delimiter_threshold=dthr, delimiter_token_ids=delimiters)
                                        for n in budgets])
    changed = 0
    for prompt, n, res in zip(prompts, budgets, results):
        assert res.token_ids == reference_adaptive_dualcache(model, prompt, n, L, S, threshold, delimiters, dthr)
        changed += res.token_ids != reference_adaptive_dualcache(model, prompt, n, L, S, threshold, (), dthr)
    assert changed, "the delimiters should move some sub-block boundary and change some output"


def test_an_unknown_selection_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^selection must be one of \('threshold', 'entropy_budget'\), got 'top'$"):
        SelectionPolicy(selection="top")
