"""Sampling and the threshold rule through the public engine API, against analytic references.

- Temperature / top-p: many seeded one-token requests must follow the distribution computed here
  from the model's own logits (softmax(z / T), then the smallest top-p nucleus, renormalised).
- Threshold: a probability of exactly the threshold is *not* above it (docs/method.md §3.2 "exceeds");
  fp32 gives exactly 1.0 when the top logit leads by ~17 or more, so threshold 1.0 must still
  unmask one position per step.
- Seeded sampling with the sub-block cache on is the same whatever the batch around the request
  (position in the batch, other requests greedy or sampling, joining mid-flight).
"""

from __future__ import annotations

import random

import pytest
import torch

import fdllm
from fdllm.decoding import counter_uniform, sample_confidence, select_unmask
from tests.helpers import VOCAB, make_sharp_checkpoint

MASK = VOCAB - 1
PROMPT = [5, 17, 33, 2, 9]


def _engine(model, **cfg) -> fdllm.Engine:
    defaults = {"block_size": 8, "sub_block_size": 4, "threshold": 0.9, "use_sub_block_cache": True}
    cfg = defaults | {"mask_token_id": MASK} | cfg
    return fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(**cfg),
                        fdllm.EngineConfig(num_pages=4096, max_prefill_tokens=16384))


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    """Logits with a few clearly distinct leading tokens (scaled LM head), neither flat nor one-hot."""
    return fdllm.load_model(make_sharp_checkpoint(tmp_path_factory.mktemp("spread"), head_scale=12.0))


def analytic_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> dict[int, float]:
    """softmax(z / T) without the mask token, cut to the smallest set of most likely tokens whose
    mass reaches top_p, renormalised. Plain Python over the sorted probabilities."""
    z = logits.double().tolist()
    z[MASK] = float("-inf")
    top = max(z)
    weights = [pow(2.718281828459045, (v - top) / temperature) if v != float("-inf") else 0.0 for v in z]
    total = sum(weights)
    probs = sorted(((w / total, t) for t, w in enumerate(weights)), reverse=True)
    kept, mass = [], 0.0
    for p, t in probs:
        if mass >= top_p:
            break
        kept.append((t, p))
        mass += p
    return {t: p / mass for t, p in kept}


@pytest.mark.parametrize("temperature,top_p", [(0.6, 1.0), (1.5, 1.0), (0.8, 0.7)])
def test_seeded_draws_follow_the_temperature_and_top_p_distribution(spread_model, temperature, top_p):
    n = 2000
    with torch.no_grad():
        logits = spread_model(torch.tensor([PROMPT]))[0, -1]
    expected = analytic_distribution(logits, temperature, top_p)
    engine = _engine(spread_model)
    results = engine.generate(
        [PROMPT] * n,
        [fdllm.SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, seed=s, mode="ar",
                              ignore_eos=True) for s in range(n)],
    )
    counts: dict[int, int] = {}
    for r in results:
        counts[r.token_ids[0]] = counts.get(r.token_ids[0], 0) + 1
    assert set(counts) <= set(expected), "a token outside the top-p nucleus was sampled"
    # Pearson chi-square over the nucleus (cells with expected count >= 5, the rest pooled): for
    # k cells its mean is k - 1 and its sd sqrt(2(k - 1)); allow mean + 6 sd.
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for t, p in expected.items():
        if n * p >= 5:
            cells.append((counts.get(t, 0), n * p))
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(t, 0), pooled_exp + n * p
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    assert dof >= 3, "the distribution should have several likely tokens"
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)


def test_the_nucleus_is_the_smallest_set_reaching_top_p_exactly():
    """probs (1/2, 1/4, 1/4) are exact in fp32: top_p = 1/2 keeps the first token alone (the mass before the
    second is exactly top_p), top_p just above keeps two; per-row top_p tensors beside a plain top_k."""
    logits = torch.tensor([0.5, 0.25, 0.25, 0.0]).log().expand(64, 4)  # token 3: the mask, never a prediction
    draws = torch.linspace(0.005, 0.995, 64)
    tokens, probs = sample_confidence(logits, 3, 1.0, 0.5, 0, draws)
    assert tokens.tolist() == [0] * 64 and probs.tolist() == [1.0] * 64
    tokens, _ = sample_confidence(logits, 3, 1.0, 0.5001, 0, draws)
    kept = set(tokens.tolist())  # token 0 and one of the two equal others (either may sort first)
    assert len(kept) == 2 and 0 in kept and kept <= {0, 1, 2}
    top_p = torch.tensor([0.5, 1.0]).repeat(32)  # per row, with top_k an int
    tokens, _ = sample_confidence(logits, 3, 1.0, top_p, 0, draws)
    assert set(tokens[0::2].tolist()) == {0} and set(tokens[1::2].tolist()) == {0, 1, 2}


def test_sampling_keeps_every_tensor_on_the_logits_device():
    """The `meta` device stands in for a GPU: a helper tensor made on the CPU would not mix with it."""
    logits = torch.randn(3, 10, device="meta")
    for temperature, top_p, top_k in [(0.7, 0.9, 3), (torch.full((3,), 0.7, device="meta"), 1.0, 0)]:
        for uniform in (torch.rand(3, device="meta"), None):  # None: the function draws its own
            tokens, probs = sample_confidence(logits, 9, temperature, top_p, top_k, uniform)
            assert tokens.device.type == probs.device.type == "meta" and tokens.shape == probs.shape == (3,)


def test_the_last_vocabulary_token_is_sampled_like_any_other():
    """Nothing is cut off the top of the CDF: with the last token holding all but 1e-4 of the mass (and no
    mask token), draws across (0.01, 0.99) all pick it; without draws given, nearly all do."""
    logits = torch.tensor([0.0, 0.0, 10.0]).expand(100, 3)
    tokens, probs = sample_confidence(logits, None, 1.0, uniform_T=torch.linspace(0.01, 0.99, 100))
    assert tokens.tolist() == [2] * 100
    torch.testing.assert_close(probs, logits.softmax(-1)[:, 2])
    tokens, _ = sample_confidence(logits, None, 1.0)
    assert tokens.shape == (100,) and (tokens == 2).sum() > 90


def test_a_row_of_non_finite_logits_never_draws_the_mask_token():
    """A NaN or inf row (a broken model, an overflow) finds no token on its NaN CDF: it must not fall
    on the last token, the mask here (committed, the request's block would never fill)."""
    logits = torch.randn(4, 10)
    logits[1] = float("nan")
    logits[2, 3] = float("inf")
    tokens, _ = sample_confidence(logits, 9, 1.0, 0.9, 0, torch.full((4,), 0.999))
    assert 9 not in tokens.tolist() and tokens[0] == sample_confidence(logits[:1], 9, 1.0, 0.9, 0, torch.full((1,), 0.999))[0]


def _fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser, from its reference (Python ints, no torch)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _reference_uniform(seed: int, counter: int) -> float:
    """counter_uniform's documented stream: the counter's high then low word, then the seed's, chained
    through fmix32 (as unsigned 64-bit values); the top 23 bits of the key, centred in their interval."""
    s, c = seed % 2**64, counter % 2**64
    key = _fmix32(c >> 32)
    for word in (c & 0xFFFFFFFF, s >> 32, s & 0xFFFFFFFF):
        key = _fmix32(word ^ key)
    return ((key >> 9) + 0.5) * 2.0**-23


def test_counter_uniform_is_the_documented_hash_of_seed_and_counter():
    """Pinned against an independent reference, so a seeded request's draws never change silently (a
    different hash would still look uniform). Extremes of both int64 inputs included; the fp32 draws equal
    the exact values (the 24-bit version rounded, and its largest draw was exactly 1.0)."""
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 123456789, -987654321987, 2**40 + 7]
    counters = [0, 1, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1, 17, 99]
    got = counter_uniform(torch.tensor(seeds), torch.tensor(counters))
    assert got.dtype == torch.float32
    assert got.tolist() == [_reference_uniform(s, c) for s, c in zip(seeds, counters)]
    assert _fmix32(1) == 0x514E28B7  # murmur3's published fmix32(1): the reference itself is right


def test_a_probability_equal_to_the_threshold_is_not_above_it():
    # 0.5 == threshold is not above it, only the most confident (0.75) goes; threshold 1.0 with
    # three probabilities of exactly 1.0: only the first of them
    assert select_unmask([0.75, 0.5, 0.5, 0.25], 0.5) == [True, False, False, False]
    assert select_unmask([1.0, 1.0, 1.0, 0.5], 1.0) == [True, False, False, False]
    assert select_unmask([0.75, 0.5, 0.5, 0.25], 0.4999) == [True, True, True, False]
    assert select_unmask([1.0, 1.0, 1.0, 0.5], 0.9999) == [True, True, True, False]


def test_threshold_one_unmasks_one_position_per_step_even_at_probability_one(tmp_path_factory):
    model = fdllm.load_model(make_sharp_checkpoint(tmp_path_factory.mktemp("onehot"), head_scale=1000.0))
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8]]  # + max_new_tokens: whole blocks (13 + 3, 15 + 9)
    with torch.no_grad():  # the premise: fp32 rounds the top probability to exactly 1.0 here
        logits = model(torch.tensor([prompts[1]]))[0].float()
    logits[:, MASK] = float("-inf")
    assert (logits.softmax(-1).max(-1).values == 1.0).any()
    results = _engine(model, threshold=1.0).generate(
        prompts, [fdllm.SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (13, 15)]
    )
    # One masked position per denoising step; each block commit yields the next block's first
    # token: exactly one token per forward (more would mean several unmasked in one step).
    assert [len(r.token_ids) for r in results] == [13, 15]
    assert [r.num_forwards for r in results] == [13, 15]


def test_block_lookahead_opens_blocks_greedily_and_samples_its_step(spread_model):
    """Under sampling, the token that opens a block stays the argmax (docs/method.md §3.4) while the block
    lookahead's step samples, like any denoising step. A prompt of one whole block: its prefill
    forward opens the next block and looks ahead; at a tiny threshold every sampled candidate of the
    first sub-block passes, so two tokens come out of that single forward."""
    prompt = [5, 17, 33, 2, 9, 40, 11, 23]  # one block of 8
    n = 64
    results = _engine(spread_model).generate([prompt] * n, [fdllm.SamplingParams(
        max_new_tokens=2, temperature=1.5, seed=s, threshold=1e-6, block_lookahead=True, ignore_eos=True)
        for s in range(n)])
    greedy = _engine(spread_model).generate([prompt], fdllm.SamplingParams(max_new_tokens=1, ignore_eos=True))[0]
    assert all(r.num_forwards == 1 and len(r.token_ids) == 2 for r in results)
    assert {r.token_ids[0] for r in results} == {greedy.token_ids[0]}, "the opening token must be the argmax"
    assert len({r.token_ids[1] for r in results}) > 3, "the lookahead's step must sample"


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_unseeded_sampling_requests_draw_independent_streams(spread_model, mode):
    """Without a seed each sampling request gets a stream of its own: 8 copies of one prompt at temperature
    1 (`n` choices, or users sending the same prompt) do not all decode the same 16 tokens, which several
    likely tokens a position make all but impossible unless they share a stream; 8 seeded copies, the
    control, are equal."""
    engine = _engine(spread_model)
    sampling = dict(max_new_tokens=16, temperature=1.0, mode=mode, ignore_eos=True)
    unseeded = engine.generate([[5, 17, 33, 2, 9]] * 8, fdllm.SamplingParams(**sampling))
    seeded = engine.generate([[5, 17, 33, 2, 9]] * 8, fdllm.SamplingParams(**sampling, seed=11))
    assert len({tuple(r.token_ids) for r in seeded}) == 1
    assert len({tuple(r.token_ids) for r in unseeded}) > 1


def _sharp_prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(MASK) for _ in range(rng.choice([2, 5, 8, 11, 17]))] for _ in range(n)]


def test_seeded_sampling_with_the_cache_on_is_independent_of_the_batch(sharp_dir):
    model = fdllm.load_model(sharp_dir)
    target = [7, 3, 11, 19, 2, 40]
    seeded = fdllm.SamplingParams(max_new_tokens=21, temperature=0.9, top_p=0.95, seed=4321, ignore_eos=True)
    others = _sharp_prompts(4, seed=1)
    other_params = [
        fdllm.SamplingParams(max_new_tokens=17, ignore_eos=True),
        fdllm.SamplingParams(max_new_tokens=25, temperature=1.0, seed=7, ignore_eos=True),
        fdllm.SamplingParams(max_new_tokens=9, mode="ar", ignore_eos=True),
        fdllm.SamplingParams(max_new_tokens=30, temperature=0.7, ignore_eos=True),  # unseeded
    ]
    alone = _engine(model).generate([target], seeded)[0].token_ids
    assert len(alone) == 21
    first = _engine(model).generate([target] + others, [seeded] + other_params)[0].token_ids
    middle = _engine(model).generate(others[:2] + [target] + others[2:],
                                     other_params[:2] + [seeded] + other_params[2:])[2].token_ids
    assert first == alone and middle == alone
    engine = _engine(model)  # the seeded request joins a batch that is already decoding
    for p, sp in zip(others, other_params):
        engine.add_request(p, sp)
    for _ in range(3):
        engine.step()
    rid = engine.add_request(target, seeded)
    late = {}
    while engine.has_unfinished():
        late |= {r.request_id: r for r in engine.step()}
    assert late[rid].token_ids == alone
    reseeded = _engine(model).generate([target], fdllm.SamplingParams(
        max_new_tokens=21, temperature=0.9, top_p=0.95, seed=4322, ignore_eos=True))[0].token_ids
    assert reseeded != alone, "the seed should matter (else the checks above are vacuous)"
