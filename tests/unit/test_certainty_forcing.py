"""The certainty-forcing self-distillation loss (docs/method.md §5, dParallel) against from-scratch computations."""

from __future__ import annotations

import math

import pytest
import torch

import fdllm
from fdllm.objective import (
    IGNORE_INDEX,
    certainty_forcing_entropy,
    certainty_forcing_loss,
    two_stream_batch,
)
from tests.unit.test_masks import allowed_by_method
from tests.unit.test_objective import MASK_ID, _batch


def _entropy_at(row: list[float], temperature: float) -> float:
    z = [x / temperature for x in row]
    top = max(z)
    w = [math.exp(x - top) for x in z]
    total = sum(w)
    return -sum((x / total) * math.log(x / total) for x in w)


def test_entropy_term_by_hand():
    # one row of 5 positions over a vocabulary of 4; logits[j-1] predict targets[j]
    logits = torch.tensor([[[3.0, 1.0, 0.0, 0.0],    # predicts position 1: argmax 0
                            [0.0, 2.0, 1.0, 0.5],    # position 2: argmax 1
                            [0.0, 0.0, 0.0, 4.0],    # position 3: argmax 3
                            [1.0, 1.5, 0.2, 0.1],    # position 4: argmax 1
                            [9.0, 0.0, 0.0, 0.0]]])  # (no position 5: never read)
    targets = torch.tensor([[2, 0, 2, 3, 1]])  # position 0 is never predicted; 2 is wrong (argmax 1)
    targets[0, 4] = IGNORE_INDEX  # position 4 is not masked: right or not, it does not count
    got, count = certainty_forcing_entropy(logits, targets, temperature=0.5)
    want = (_entropy_at([3.0, 1.0, 0.0, 0.0], 0.5) + _entropy_at([0.0, 0.0, 0.0, 4.0], 0.5)) / 2
    assert int(count) == 2
    assert math.isclose(got.item(), want, rel_tol=1e-6)
    # the temperature matters: T = 1 gives the plain entropies
    t1, _ = certainty_forcing_entropy(logits, targets, temperature=1.0)
    assert math.isclose(t1.item(), (_entropy_at([3.0, 1.0, 0.0, 0.0], 1) + _entropy_at([0.0, 0.0, 0.0, 4.0], 1)) / 2,
                        rel_tol=1e-6)
    # one correct position: the mean is that position's entropy
    targets[0, 1] = 1
    one, count = certainty_forcing_entropy(logits, targets, temperature=0.5)
    assert int(count) == 1 and math.isclose(one.item(), _entropy_at([0.0, 0.0, 0.0, 4.0], 0.5), rel_tol=1e-4)
    # nothing correct: 0 and a count of 0 (no division by zero)
    none, n = certainty_forcing_entropy(logits, torch.tensor([[1, 1, 0, 0, IGNORE_INDEX]]), temperature=0.5)
    assert none.item() == 0.0 and int(n) == 0


def test_entropy_term_pushes_correct_predictions_toward_certainty():
    logits = torch.tensor([[[2.0, 1.0, 0.5], [0.0, 0.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[IGNORE_INDEX, 0]])
    entropy, _ = certainty_forcing_entropy(logits, targets)
    entropy.backward()
    assert logits.grad[0, 0, 0] < 0  # raising the predicted (correct) token's logit lowers the entropy
    assert logits.grad[0, 1].abs().sum() == 0  # the row that predicts nothing gets no gradient


@pytest.mark.parametrize("weight,temperature", [(2.0, 0.5), (0.7, 1.0)])
def test_distill_loss_equals_an_independent_computation(qwen2_dir, weight, temperature):
    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=2, L=8, prompt=2, seed=3)
    bs = 4
    batch = two_stream_batch(ids, labels, MASK_ID, bs, generator=torch.Generator().manual_seed(5))
    dense = torch.tensor([[allowed_by_method(q, k, 8, bs) for k in range(16)] for q in range(16)])
    # A random model predicts nothing right: make every other masked target its own argmax (targets
    # only enter the loss, never the input), so both kinds of position are present.
    with torch.no_grad():
        argmax = model(batch.input_ids, batch.position_ids, dense[None, None])[:, :8].argmax(-1)
    masked = (batch.targets[:, 1:] != IGNORE_INDEX).nonzero().tolist()
    for row, j in masked[::2]:
        batch.targets[row, j + 1] = argmax[row, j]
    loss, count = certainty_forcing_loss(model, batch, bs, weight, temperature, mask_impl="dense")
    ce, n, ent, correct = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for row in range(4):  # both complementary copies, one row at a time, the mask from the rule
            logits = model(batch.input_ids[row : row + 1], batch.position_ids[row : row + 1], dense[None, None])[0]
            for j in range(1, 8):
                target = int(batch.targets[row, j])
                if target == IGNORE_INDEX:
                    continue
                z = logits[j - 1].double()
                ce += -torch.log_softmax(z, -1)[target].item()
                n += 1
                if int(z.argmax()) == target:
                    ent += _entropy_at(z.tolist(), temperature)
                    correct += 1
    assert 0 < correct < n and int(count) == n
    assert math.isclose(loss.item(), ce / n + weight * ent / correct, rel_tol=1e-5)


def test_distill_loss_defaults_are_dparallel_s(qwen2_dir):
    """lambda 2 and T 0.5 (docs/method.md §5) when not given."""
    from fdllm.objective import _noisy_logits

    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=2, L=8, prompt=2, seed=3)
    batch = two_stream_batch(ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # every masked target the model's own argmax: the entropy term is all there
        logits = _noisy_logits(model, batch, 4, "dense", False)
        masked = batch.targets[:, 1:] != IGNORE_INDEX
        batch.targets[:, 1:][masked] = logits[:, :-1].argmax(-1)[masked]
        default, _ = certainty_forcing_loss(model, batch, 4)
        losses = {(w, T): certainty_forcing_loss(model, batch, 4, w, T)[0].item() for w in (2.0, 3.0) for T in (0.5, 1.5)}
    assert default.item() == losses[(2.0, 0.5)]
    assert len(set(losses.values())) == 4  # each default matters


def test_certainty_entropy_defaults_to_temperature_one_half():
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(2, 6, 9, generator=g), torch.randint(0, 9, (2, 6), generator=g)
    targets[:, 1:] = logits[:, :-1].argmax(-1)  # every position predicted right: all count
    assert torch.equal(certainty_forcing_entropy(logits, targets)[0], certainty_forcing_entropy(logits, targets, 0.5)[0])
    assert not torch.equal(certainty_forcing_entropy(logits, targets)[0], certainty_forcing_entropy(logits, targets, 1.5)[0])

