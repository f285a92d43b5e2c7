"""fdllm.engine.adjustments against a from-scratch oracle, row by row: what every row of a step knows
(prompt, output, the block's or draft's decoded offsets before it, never masks) and its adjusted
logits, for many requests at once, the head's chunks cutting through requests anywhere.
The end-to-end oracles (transformers, the no-cache recompute) are in test_logit_adjustments.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fdllm.engine.adjustments import NO_ADJUSTMENTS, Adjustments, AdjustmentsBuilder, ChunkAdjustments, adjust_logits

V, MASK = 40, 39
STOPS = frozenset({0, 5})


def random_work(rng: random.Random, kind: str):
    """A duck-typed Work of a diffusion step (a block with masks), a speculative verify (a draft) or
    an AR step, maybe with lookahead rows, with random adjustments, and its candidate rows."""
    P = rng.randrange(1, 12)
    prompt = [rng.randrange(MASK) for _ in range(P)]
    output = [rng.randrange(MASK) for _ in range(rng.randrange(0, 10))]
    tokens, block, draft = prompt + output, None, None
    if kind == "diffusion":
        block = [rng.choice([MASK, rng.randrange(MASK)]) for _ in range(8)]
        n_logits = 8
    elif kind == "speculative":
        draft = [rng.randrange(MASK) for _ in range(rng.randrange(1, 6))]
        n_logits = len(draft) + 1
    else:
        n_logits = 1
    n_logits += rng.randrange(3)  # lookahead rows: they predict past every known token
    params = SimpleNamespace(
        logit_bias=rng.choice([None, {rng.randrange(V - 1): rng.uniform(-100, 100) for _ in range(3)}]),
        repetition_penalty=rng.choice([1.0, 0.7, 1.5]), presence_penalty=rng.choice([0.0, 1.2, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.6, -1.1]), min_tokens=rng.choice([0, 3, 30]))
    seq = SimpleNamespace(prompt=prompt, tokens=tokens, block=block, draft=draft, params=params, mask_token_id=MASK,
                          criteria=SimpleNamespace(stop_token_ids=STOPS), token_array=lambda: np.array(tokens))
    start = len(tokens) - 1 if kind != "diffusion" else len(tokens)  # causal rows feed the last known token
    rows = sorted(rng.sample(range(n_logits), rng.randrange(1, n_logits + 1)))
    return SimpleNamespace(seq=seq, start=start, logit_rows=list(range(n_logits))), rows


def oracle(work, row: int, z: torch.Tensor) -> torch.Tensor:
    """One row's logits adjusted from scratch: what it knows listed, the rules applied token by token."""
    seq, p = work.seq, work.seq.params
    predicted = work.start + work.logit_rows[row] + 1
    known = seq.tokens + (seq.block or seq.draft or [])
    P = len(seq.prompt)
    generated = [t for t in known[P:predicted] if t != MASK]
    z = z.clone().double()
    for t, b in (p.logit_bias or {}).items():
        z[t] += b
    if p.min_tokens and predicted - P < p.min_tokens:
        z[sorted(STOPS)] = float("-inf")
    for t in set(seq.prompt) | set(generated) if p.repetition_penalty != 1 else ():
        z[t] = z[t] / p.repetition_penalty if z[t] > 0 else z[t] * p.repetition_penalty
    for t in set(generated):
        z[t] -= p.frequency_penalty * generated.count(t) + p.presence_penalty
    return z.float()


def build(works) -> Adjustments:
    builder = AdjustmentsBuilder()
    for work, rows in works:
        builder.add(work.seq, [work.start + work.logit_rows[r] + 1 for r in rows])
    return builder.build()


def staged(adj: Adjustments, device: str):
    """`get(name, dtype)` over the arrays, as the runner's stage serves them."""
    tensors = {name: torch.from_numpy(a).to(device) for name, a in adj.arrays().items()}
    return lambda name, dtype: tensors[name].to(dtype)


def adjusted_as_the_oracle(seed: int, chunk: int, device: str) -> None:
    rng = random.Random(seed)
    works = [random_work(rng, rng.choice(["diffusion", "speculative", "ar"])) for _ in range(7)]
    adj = build(works)
    expected_rows = [(w, r) for w, rows in works for r in rows]
    assert len(adj) == len(expected_rows) and adj.num_requests == len(works)
    logits = torch.randn(len(adj), V, generator=torch.Generator().manual_seed(seed)) * 3
    get = staged(adj, device)
    chunks = [(a, min(a + chunk, len(adj))) for a in range(0, len(adj), chunk)]
    got = torch.cat([adjust_logits(logits[a:b].to(device), ChunkAdjustments.of_rows(adj, get, a, b)) for a, b in chunks])
    want = torch.stack([oracle(w, r, z) for (w, r), z in zip(expected_rows, logits)])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_every_row_is_adjusted_as_the_oracle_adjusts_it(seed, chunk):
    adjusted_as_the_oracle(seed, chunk, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk", [2, 1000])
def test_every_row_is_adjusted_as_the_oracle_adjusts_it_on_cuda(chunk):
    """The device's atomic adds (index_put with accumulate) count as the CPU does."""
    for seed in range(6):
        adjusted_as_the_oracle(seed, chunk, "cuda")


def test_a_request_that_only_biases_stages_no_history():
    rng = random.Random(0)
    work, rows = random_work(rng, "diffusion")
    work.seq.params = SimpleNamespace(logit_bias={3: 1.0}, repetition_penalty=1.0, presence_penalty=0.0,
                                      frequency_penalty=0.0, min_tokens=0)
    adj = build([(work, rows)])
    assert len(adj.prompt_token) == len(adj.output_token) == len(adj.recent_token) == 0
    assert adj.bias_token.tolist() == [3] * len(rows)


@pytest.mark.parametrize("seed", range(3))
def test_steps_joined_number_the_second_steps_rows_and_requests_after_the_first(seed):
    """StepInputs.concat (an array batch beside the works): joining two steps' adjustments must
    adjust every row as building them in one step does."""
    rng = random.Random(seed)
    works = [random_work(rng, rng.choice(["diffusion", "speculative", "ar"])) for _ in range(6)]
    whole, joined = build(works), build(works[:2]).join(build(works[2:]))
    assert all(np.array_equal(a, b) for a, b in zip(whole.arrays().values(), joined.arrays().values()))
    assert NO_ADJUSTMENTS.join(whole) is whole and whole.join(NO_ADJUSTMENTS) is whole
    assert len(AdjustmentsBuilder().build()) == 0
