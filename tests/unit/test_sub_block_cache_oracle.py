"""The engine's sub-block (DualCache) path against an independent reference of docs/method.md §3.3.

The reference shares nothing with `fdllm.decoding`, `fdllm.cache` or `fdllm.engine`: it keeps one
sequence's K/V in dense tensors of its own, walks its own block / sub-block schedule and does its
own confidence, threshold and commit. Only the model's layers (`Transformer.hidden` with a
`CachedAttention` written here) are shared, for the arithmetic.

Schedule (docs/method.md §3.2-3.4), per block of L positions cut into sub-blocks of S:
- a step *refreshes* (feeds the whole block, rewrites its K/V) on the first step of every
  sub-block and while the sub-block's first position is masked;
- otherwise it feeds only the sub-block's S tokens, overwrites their K/V, and attends to the prefix
  plus the whole block's partly stale K/V;
- position p takes the logits of p - 1; the mask token is never predicted; every masked position
  of the sub-block whose probability exceeds the threshold is unmasked, and always the most
  confident one;
- a finished block is forwarded once more clean (exact K/V); its last logit opens the next block;
- with the block lookahead (SamplingParams.block_lookahead, beyond docs/method.md), every block opened by
  a logit (not by prompt tokens) first gets a forward of L masks over the prefix (its first position
  masked too): it writes the block's K/V, and the masked positions 1..S-1 it predicts above the
  threshold are unmasked (none forced); the first sub-block then continues as after its first step.

The requests use `P + max_new_tokens` = a block multiple, so the last block is decoded whole;
`test_truncation_and_stop_tokens_only_cut_the_schedules_output` holds requests that end mid-block
(max_new_tokens, stop tokens) to a cut of that whole-block output (docs/method.md §3.5, §5).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import fdllm
from tests.helpers import VOCAB

MASK = VOCAB - 1


class DenseKV:
    """One sequence's K/V in dense [layers, positions, K, H] tensors; a `CachedAttention` for the model.

    `forward(tokens, start, kv_len)` writes the K/V of `tokens` at positions start.. and lets every
    fed query attend to positions [0, kv_len) (whatever K/V they hold now, stale or not).
    """

    def __init__(self, model, max_len: int) -> None:
        cfg = model.config
        shape = (cfg.num_hidden_layers, max_len, cfg.n_kv_heads, cfg.dim_per_head)
        self.model = model
        self.k = torch.zeros(shape, dtype=model.dtype)
        self.v = torch.zeros(shape, dtype=model.dtype)
        self.start = self.kv_len = 0

    @torch.no_grad()
    def forward(self, tokens: list[int], start: int, kv_len: int) -> torch.Tensor:
        """fp32 logits [len(tokens), V]."""
        assert start + len(tokens) <= kv_len
        self.start, self.kv_len = start, kv_len
        ids = torch.tensor([tokens])
        positions = torch.arange(start, start + len(tokens))[None]
        return self.model.lm_head(self.model.hidden(ids, positions, cache=self))[0].float()

    def __call__(self, layer, q_BTNH, k_BTKH, v_BTKH):
        n = q_BTNH.shape[1]
        self.k[layer, self.start : self.start + n] = k_BTKH[0]
        self.v[layer, self.start : self.start + n] = v_BTKH[0]
        keys = self.k[layer, : self.kv_len].transpose(0, 1)[None]  # [1, K, X, H]
        values = self.v[layer, : self.kv_len].transpose(0, 1)[None]
        q = q_BTNH.transpose(1, 2)  # [1, N, n, H]
        out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=q.shape[1] != keys.shape[1])
        return out.transpose(1, 2)


def most_likely(logits_row: torch.Tensor) -> tuple[int, float]:
    """(token, probability) of the most likely token other than the mask token."""
    probs = logits_row.clone().index_fill_(0, torch.tensor([MASK]), float("-inf")).softmax(-1)
    prob, token = probs.max(-1)
    return int(token), float(prob)


def reference_generate(model, prompt, max_new_tokens, L, S, threshold, use_sub_block_cache=True, block_lookahead=False):
    """Generated tokens of greedy block diffusion with a block-level cache and (optionally) the sub-block
    cache and the block lookahead."""
    P = len(prompt)
    assert (P + max_new_tokens) % L == 0, "keep the last block whole (see the module docstring)"
    kv = DenseKV(model, P + max_new_tokens + L)
    full = P - P % L
    for b in range(0, full, L):  # prefill: block-causal, one block at a time
        logits = kv.forward(prompt[b : b + L], b, b + L)
    sequence = list(prompt[:full])  # committed tokens; the current block starts at len(sequence)
    opened = not P % L  # the block was opened by a logit
    if P % L:
        block = list(prompt[full:]) + [MASK] * (L - P % L)
    else:
        block = [most_likely(logits[-1])[0]] + [MASK] * (L - 1)
    while len(sequence) < P + max_new_tokens:
        start = len(sequence)
        looked_ahead = block_lookahead and opened and S > 1
        if looked_ahead:
            logits = kv.forward([MASK] * L, start, start + L)
            for p in range(1, S):
                token, prob = most_likely(logits[p - 1])
                if prob > threshold:
                    block[p] = token
        for s in range(0, L, S):
            first_step = not (looked_ahead and s == 0)
            while MASK in block[s : s + S]:
                if not use_sub_block_cache or first_step or block[s] == MASK:  # refresh the whole block
                    logits, first_row = kv.forward(block, start, start + L), 0
                else:  # only the sub-block, over prefix + the block's partly stale K/V
                    logits, first_row = kv.forward(block[s : s + S], start + s, start + L), s
                first_step = False
                masked = [p for p in range(s, s + S) if block[p] == MASK]
                guess = {p: most_likely(logits[p - 1 - first_row]) for p in masked}  # p reads p - 1
                best = max(masked, key=lambda p: guess[p][1])  # the first of equals, as argmax
                for p in masked:
                    if p == best or guess[p][1] > threshold:
                        block[p] = guess[p][0]
        logits = kv.forward(block, start, start + L)  # commit: exact K/V of the clean block
        sequence += block
        block, opened = [most_likely(logits[-1])[0]] + [MASK] * (L - 1), True
    return sequence[P:]


def random_prompts(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(MASK) for _ in range(rng.choice(lengths))] for _ in range(n)]


def whole_blocks(prompt: list[int], L: int, blocks: int = 2) -> int:
    """max_new_tokens that ends the request on a block boundary, at least `blocks` blocks on."""
    return (-len(prompt)) % L + blocks * L


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def make_engine(model, L, S, threshold, use_sub_block_cache=True, max_prefill_tokens=64, denoise="default"):
    """`denoise`: "batched" runs every plain sub-block step in a DenoiseBatch (even of one sequence),
    "per-work" none, "default" as the engine decides (batches of at least MIN_DENOISE_BATCH)."""
    cfg = fdllm.BlockDiffusionConfig(
        block_size=L, sub_block_size=S, threshold=threshold, use_sub_block_cache=use_sub_block_cache, mask_token_id=MASK
    )
    engine = fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=512, max_prefill_tokens=max_prefill_tokens))
    if denoise == "batched":
        engine.scheduler.min_denoise_batch = 1
    elif denoise == "per-work":
        engine.scheduler.array_batches = False
    return engine


def params(max_new_tokens: int, **kw) -> fdllm.SamplingParams:
    return fdllm.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize("denoise", ["batched", "per-work"])
@pytest.mark.parametrize(
    "L,S,threshold", [(8, 4, 0.4), (8, 2, 0.3), (16, 4, 0.25), (16, 8, 0.5), (8, 4, 1.0)]
)
def test_sub_block_cache_equals_independent_reference(model, L, S, threshold, denoise):
    lengths = [1, 2, 3, L - 1, L, L + 1, L + S + 1, 2 * L, 2 * L + 3]
    prompts = random_prompts(9, lengths, seed=L * 100 + S)
    budgets = [whole_blocks(p, L) for p in prompts]
    engine = make_engine(model, L, S, threshold, max_prefill_tokens=2 * L, denoise=denoise)  # long prompts prefill in chunks
    results = engine.generate(prompts, [params(n) for n in budgets])
    parallel = 0
    for prompt, n, res in zip(prompts, budgets, results):
        assert res.token_ids == reference_generate(model, prompt, n, L, S, threshold), f"prompt length {len(prompt)}"
        parallel += res.tokens_per_forward > 1
    if threshold < 1.0:
        assert parallel, "the threshold should unmask several tokens per forward somewhere"


def test_stale_kv_of_cached_steps_changes_some_outputs(model):
    """The comparisons above have power: with this model the sub-block cache's stale K/V change the
    output of some prompts, so an engine that always refreshed (or never cached) would be caught."""
    L, S, threshold = 16, 4, 0.25
    prompts = random_prompts(9, [1, 2, 3, 15, 16, 17, 21, 32, 35], seed=L * 100 + S)
    changed = [
        reference_generate(model, p, whole_blocks(p, L), L, S, threshold)
        != reference_generate(model, p, whole_blocks(p, L), L, S, threshold, use_sub_block_cache=False)
        for p in prompts
    ]
    assert any(changed)


@pytest.mark.parametrize("use_sub_block_cache", [True, False], ids=["sub-block-cache", "cache-off"])
def test_truncation_and_stop_tokens_only_cut_the_schedules_output(model, use_sub_block_cache):
    """max_new_tokens never changes which positions of a block are candidates, and a stop token ends a
    request once every position before it is decoded: a request that ends mid-block decodes the tokens
    the whole-block schedule decodes there, cut after max_new_tokens or after its first stop token."""
    from collections import Counter

    L, S, threshold = 8, 4, 0.4
    prompts = random_prompts(6, [1, 3, L, L + 3], seed=7)
    whole = [whole_blocks(p, L, blocks=3) for p in prompts]
    full = [reference_generate(model, p, n, L, S, threshold, use_sub_block_cache) for p, n in zip(prompts, whole)]
    budgets = [n - k for n, k in zip(whole, (1, 3, 5, 7, 2, 9))]  # every request ends inside a block
    engine = make_engine(model, L, S, threshold, use_sub_block_cache)
    for ref, n, res in zip(full, budgets, engine.generate(prompts, [params(n) for n in budgets])):
        assert (res.token_ids, res.finish_reason) == (ref[:n], "length")
    stopped = 0
    for stop, _ in Counter(t for ref in full for t in ref).most_common(2):  # tokens the schedule decodes often
        sp = [params(n, stop_token_ids=(stop,)) for n in budgets]
        for ref, n, res in zip(full, budgets, engine.generate(prompts, sp)):
            cut = ref[:n][: ref[:n].index(stop) + 1] if stop in ref[:n] else ref[:n]
            assert (res.token_ids, res.finish_reason) == (cut, "stop" if stop in ref[:n] else "length")
            stopped += stop in ref[:n]
    assert stopped >= 3, "the stop tokens should end several requests"


@pytest.mark.parametrize("denoise", ["batched", "per-work"])
def test_cache_off_equals_the_reference_without_sub_block_cache(model, denoise):
    L, S, threshold = 8, 4, 0.4
    prompts = random_prompts(6, [1, 5, 8, 13, 16], seed=3)
    budgets = [whole_blocks(p, L) for p in prompts]
    results = make_engine(model, L, S, threshold, use_sub_block_cache=False, denoise=denoise).generate(
        prompts, [params(n) for n in budgets]
    )
    for prompt, n, res in zip(prompts, budgets, results):
        assert res.token_ids == reference_generate(model, prompt, n, L, S, threshold, use_sub_block_cache=False)


@pytest.mark.parametrize("denoise", ["batched", "per-work"])
def test_sub_block_cache_matches_reference_with_mid_flight_joins(model, denoise):
    """Requests join a running batch at different steps; each still equals the single-sequence reference."""
    L, S, threshold = 8, 4, 0.4
    prompts = random_prompts(5, [2, 7, 8, 12, 19], seed=5)
    budgets = [whole_blocks(p, L, blocks=3) for p in prompts]
    engine = make_engine(model, L, S, threshold, denoise=denoise)
    results = {}
    for i, (prompt, n) in enumerate(zip(prompts, budgets)):
        engine.add_request(prompt, params(n), request_id=str(i))
        for _ in range(i + 1):  # join after 1, 2, 3, ... steps of the others
            results |= {r.request_id: r for r in engine.step()}
    while engine.has_unfinished():
        results |= {r.request_id: r for r in engine.step()}
    for i, (prompt, n) in enumerate(zip(prompts, budgets)):
        assert results[str(i)].token_ids == reference_generate(model, prompt, n, L, S, threshold)


@pytest.mark.parametrize("use_sub_block_cache", [True, False], ids=["sub-block-cache", "cache-off"])
@pytest.mark.parametrize("L,S,threshold", [(8, 4, 0.4), (16, 4, 0.25), (16, 8, 0.5), (8, 2, 0.3), (8, 2, 1.0)])
def test_block_lookahead_equals_independent_reference(model, L, S, threshold, use_sub_block_cache):
    """SamplingParams(block_lookahead=True) against the reference's lookahead schedule (module
    docstring), with prompts ending inside a block and on a block boundary (whose prefill's last chunk
    carries the lookahead), beside plain requests in the same batches."""
    prompts = random_prompts(8, [1, 3, L - 1, L, L + 1, 2 * L, 2 * L + 3], seed=L * 10 + S)
    budgets = [whole_blocks(p, L, blocks=3) for p in prompts]
    engine = make_engine(model, L, S, threshold, use_sub_block_cache, max_prefill_tokens=2 * L)
    results = engine.generate(prompts, [params(n, block_lookahead=i % 4 != 3) for i, n in enumerate(budgets)])
    for i, (prompt, n, res) in enumerate(zip(prompts, budgets, results)):
        want = reference_generate(model, prompt, n, L, S, threshold, use_sub_block_cache, block_lookahead=i % 4 != 3)
        assert res.token_ids == want, f"prompt length {len(prompt)}, lookahead {i % 4 != 3}"


@pytest.mark.parametrize("use_sub_block_cache", [True, False], ids=["sub-block-cache", "cache-off"])
def test_block_lookahead_saves_forwards_and_changes_some_outputs(model, use_sub_block_cache):
    """The comparisons above have power: the lookahead's masked first token changes some outputs
    (an engine ignoring block_lookahead would be caught), and its committed tokens save forwards.
    At threshold 1.0 nothing passes (c_i > 1 never holds; no progress is forced), so it changes nothing."""
    L, S = 8, 4
    prompts = random_prompts(8, [1, 3, 7, 8, 9, 16, 19], seed=84)
    budgets = [whole_blocks(p, L, blocks=3) for p in prompts]
    for threshold in (0.4, 1.0):
        runs = [make_engine(model, L, S, threshold, use_sub_block_cache).generate(
            prompts, [params(n, block_lookahead=look) for n in budgets]) for look in (True, False)]
        looked, plain = ([r.token_ids for r in rs] for rs in runs)
        forwards, plain_forwards = (sum(r.num_forwards for r in rs) for rs in runs)
        if threshold < 1.0:
            assert looked != plain and forwards < plain_forwards
        else:
            assert looked == plain and forwards == plain_forwards


def test_block_lookahead_with_mid_flight_joins(model):
    """Requests with and without the lookahead join a running batch at different steps."""
    L, S, threshold = 8, 4, 0.4
    prompts = random_prompts(6, [2, 7, 8, 12, 16, 19], seed=9)
    budgets = [whole_blocks(p, L, blocks=3) for p in prompts]
    engine = make_engine(model, L, S, threshold)
    results = {}
    for i, (prompt, n) in enumerate(zip(prompts, budgets)):
        engine.add_request(prompt, params(n, block_lookahead=i % 3 != 1), request_id=str(i))
        for _ in range(i + 1):
            results |= {r.request_id: r for r in engine.step()}
    while engine.has_unfinished():
        results |= {r.request_id: r for r in engine.step()}
    for i, (prompt, n) in enumerate(zip(prompts, budgets)):
        want = reference_generate(model, prompt, n, L, S, threshold, block_lookahead=i % 3 != 1)
        assert results[str(i)].token_ids == want
