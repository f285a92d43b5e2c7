"""The block-diffusion objective of docs/method.md §2: noising, two-stream layout, shifted masked loss."""

from __future__ import annotations

import math

import pytest
import torch

import fdllm
from fdllm.masks import two_stream_mask
from fdllm.objective import (
    IGNORE_INDEX,
    TwoStreamBatch,
    ar_loss,
    block_diffusion_loss,
    compact_noisy_blocks,
    resolve_mask_impl,
    sample_noise_masks,
    shifted_cross_entropy,
    two_stream_batch,
    two_stream_loss,
)
from tests.unit.test_masks import allowed_by_method

MASK_ID = 90


def _batch(B: int = 4, L: int = 16, prompt: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 80, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    return ids, labels


def test_complementary_masks_cover_every_loss_token_exactly_once():
    ids, labels = _batch(B=8, L=32)
    a, b = sample_noise_masks(labels, block_size=8, generator=torch.Generator().manual_seed(3))
    carrying = labels != IGNORE_INDEX
    carrying[:, 0] = False
    assert torch.equal(a ^ b, carrying)  # exactly one copy masks each loss-carrying token
    assert not (a & b).any()
    assert not (a | b)[labels == IGNORE_INDEX].any()  # prompt tokens never masked


def test_noise_level_is_per_block():
    labels = torch.zeros(2000, 16, dtype=torch.long)
    a, _ = sample_noise_masks(labels, block_size=8, eps=0.0, generator=torch.Generator().manual_seed(0))
    block0, block1 = a[:, 1:8].float().mean(1), a[:, 8:].float().mean(1)  # token 0 never carries loss
    # each block draws its own t ~ U(0,1): fractions vary like a uniform (var 1/12), far more than a
    # shared p = 0.5 would give (0.25/8), and the two blocks are uncorrelated
    assert block1.var().item() > 0.06
    assert abs(torch.corrcoef(torch.stack([block0, block1]))[0, 1].item()) < 0.1
    assert 0.45 < block1.mean().item() < 0.55


def test_two_stream_layout():
    ids, labels = _batch(B=2, L=8, prompt=2)
    pos = torch.arange(8).expand(2, 8)
    batch = two_stream_batch(ids, labels, MASK_ID, 4, position_ids_BL=pos, generator=torch.Generator().manual_seed(1))
    assert batch.input_ids.shape == (4, 16) and batch.targets.shape == (4, 8)
    assert torch.equal(batch.input_ids[:, 8:], ids.repeat(2, 1))  # clean half untouched
    noisy = batch.input_ids[:, :8]
    assert torch.equal(noisy == MASK_ID, batch.targets != IGNORE_INDEX)
    assert torch.equal(batch.position_ids, torch.arange(8).repeat(2)[None].expand(4, 16))


def _loss_carrying_by_hand(labels, doc_ids=None):
    """docs/method.md §2.1 with the token shift: labelled, and something before it in its row and document."""
    B, L = labels.shape
    same_doc = (lambda b, j: True) if doc_ids is None else (lambda b, j: bool(doc_ids[b, j] == doc_ids[b, j - 1]))
    return torch.tensor([[bool(labels[b, j] != IGNORE_INDEX) and j > 0 and same_doc(b, j) for j in range(L)]
                         for b in range(B)])


@pytest.mark.parametrize("with_docs", [False, True])
def test_two_stream_copies_carry_complementary_masks(with_docs):
    """The batch the loss trains on: copy 2's noisy half masks exactly what copy 1's leaves clean."""
    B, L = 6, 32
    ids, labels = _batch(B=B, L=L, prompt=5, seed=2)
    doc_ids = torch.tensor([[0] * 12 + [1] * 20] * B) if with_docs else None
    batch = two_stream_batch(ids, labels, MASK_ID, 8, doc_ids_BL=doc_ids, generator=torch.Generator().manual_seed(4))
    first, second = batch.input_ids[:B, :L] == MASK_ID, batch.input_ids[B:, :L] == MASK_ID
    carrying = _loss_carrying_by_hand(labels, doc_ids)
    assert torch.equal(first ^ second, carrying) and not (first & second).any()
    assert 0 < int(first.sum()) < int(carrying.sum())  # both copies really are noised
    for copy, masked in ((batch.targets[:B], first), (batch.targets[B:], second)):
        assert torch.equal(copy != IGNORE_INDEX, masked)
        assert torch.equal(copy[masked], ids[masked])
    assert torch.equal(batch.input_ids[:B, :L][~first], ids[~first])  # unmasked tokens are the clean ones
    assert torch.equal(batch.input_ids[B:, :L][~second], ids[~second])


def test_loss_trains_every_response_token_exactly_once_per_step(qwen2_dir):
    """block_diffusion_loss counts each loss-carrying token once (one of the two copies), whatever the noise."""
    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=3, L=16, prompt=4, seed=7)
    carrying = int(_loss_carrying_by_hand(labels).sum())
    with torch.no_grad():
        for seed in range(4):
            loss, count = block_diffusion_loss(model, ids, labels, MASK_ID, 4, mask_impl="dense",
                                               generator=torch.Generator().manual_seed(seed))
            assert int(count) == carrying and torch.isfinite(loss)


def test_ar_loss_is_next_token_cross_entropy_within_documents(qwen2_dir):
    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=2, L=12, prompt=3, seed=9)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    loss, count = ar_loss(model, ids, labels, doc_ids_BL=doc_ids)
    total, n = 0.0, 0
    with torch.no_grad():
        for row in range(2):  # each document alone, plain causal attention, its own positions from 0
            for doc in doc_ids[row].unique():
                cols = (doc_ids[row] == doc).nonzero()[:, 0]
                logits = model(ids[row : row + 1, cols])[0]
                for j in range(1, len(cols)):
                    if labels[row, cols[j]] != IGNORE_INDEX:
                        total += -torch.log_softmax(logits[j - 1], -1)[ids[row, cols[j]]].item()
                        n += 1
    assert int(count) == n
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, 12).clone()
    positions[1] = torch.arange(12)
    loss, count = ar_loss(model, ids, labels, position_ids_BL=positions, doc_ids_BL=doc_ids)
    assert int(count) == n and math.isclose(loss.item(), total / n, rel_tol=1e-5)
    plain, plain_count = ar_loss(model, ids, labels)  # no documents: one causal sequence per row
    assert int(plain_count) == int((labels[:, 1:] != IGNORE_INDEX).sum()) and math.isfinite(plain.item())
    # Explicit positions are used (RoPE sees only differences, so spread them rather than shift them).
    spread = 3 * torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        logits = model(ids, spread)
    targets = torch.where(labels[:, 1:] != IGNORE_INDEX, ids[:, 1:], IGNORE_INDEX)
    by_hand = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
    )
    assert math.isclose(ar_loss(model, ids, labels, position_ids_BL=spread)[0].item(), by_hand.item(), rel_tol=1e-5)
    assert not math.isclose(by_hand.item(), plain.item(), rel_tol=1e-5)
    # the flex BlockMask a GPU uses: the same loss (forward only: flex has no CPU backward)
    with torch.no_grad():
        flex, flex_count = ar_loss(model, ids, labels, position_ids_BL=positions, doc_ids_BL=doc_ids, mask_impl="flex")
    assert int(flex_count) == n and math.isclose(flex.item(), total / n, rel_tol=1e-5)


def test_mask_implementation_choice():
    # flex_attention has no CPU backward: "auto" trains with the dense mask on CPU, flex on CUDA.
    assert resolve_mask_impl("auto", torch.device("cpu")) == "dense"
    assert resolve_mask_impl("auto", torch.device("cuda")) == "flex"
    for impl in ("dense", "flex"):
        for device in ("cpu", "cuda"):
            assert resolve_mask_impl(impl, torch.device(device)) == impl


class _MaskRecorder(torch.nn.Module):
    """Stands in for the model: records what the loss feeds it and returns flat logits."""

    def forward(self, input_ids, position_ids, mask, logit_positions):
        self.input_ids, self.position_ids, self.mask = input_ids, position_ids, mask
        return torch.zeros(input_ids.shape[0], logit_positions.stop - logit_positions.start, 100)


@pytest.mark.parametrize("mask_impl", [None, "auto", "dense", "flex"])
def test_two_stream_loss_feeds_the_chosen_mask(mask_impl):
    from torch.nn.attention.flex_attention import BlockMask

    ids, labels = _batch(B=2, L=128, prompt=5)
    doc_ids = torch.tensor([[0] * 48 + [1] * 80] * 2)
    batch = two_stream_batch(ids, labels, MASK_ID, 32, doc_ids_BL=doc_ids, generator=torch.Generator().manual_seed(0))
    model = _MaskRecorder()
    kwargs = {} if mask_impl is None else {"mask_impl": mask_impl}
    loss, count = two_stream_loss(model, batch, 32, **kwargs)
    assert model.input_ids is batch.input_ids and model.position_ids is batch.position_ids
    assert math.isclose(loss.item(), math.log(100), rel_tol=1e-6) and int(count) == int((batch.targets != -100).sum())
    if mask_impl == "flex":  # evaluated eagerly: the same rule as the dense mask
        assert isinstance(model.mask, BlockMask)
        q, k = torch.arange(256)[:, None], torch.arange(256)[None, :]
        for b in range(4):  # both complementary copies of both rows
            dense = two_stream_mask(128, 32, batch.doc_ids)[b, 0]
            assert torch.equal(model.mask.mask_mod(torch.tensor(b), torch.tensor(0), q, k), dense)
    else:  # CPU: "auto" and the default mean the dense mask (flex has no CPU backward), cut by stream
        dense = two_stream_mask(128, 32, batch.doc_ids)
        assert torch.equal(model.mask.noisy[0], torch.cat([dense[..., :128, :128], dense[..., :128, 128:]], -1))
        assert torch.equal(model.mask.clean, dense[..., 128:, 128:]) and model.mask.noisy_streams == 1


def test_wrong_length_is_a_clear_error(qwen2_dir):
    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(L=12)
    with pytest.raises(ValueError, match=r"not a multiple of block_size 8: .* \(e\.g\. 16\)"):
        block_diffusion_loss(model, ids, labels, MASK_ID, block_size=8)  # 12 tokens: pad to 16


def test_shifted_cross_entropy_of_one_target_and_of_none():
    """The mean over exactly one target is that target's CE (not halved by a clamp); no target: 0, counted 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.full((2, 5), IGNORE_INDEX)
    loss, count = shifted_cross_entropy(logits, targets)
    assert int(count) == 0 and loss.item() == 0.0
    targets[1, 3] = 4  # predicted by logits[1, 2]
    loss, count = shifted_cross_entropy(logits, targets)
    assert int(count) == 1
    assert loss.item() == pytest.approx(-torch.log_softmax(logits[1, 2], -1)[4].item(), rel=1e-6)


def test_loss_equals_a_hand_computed_reference(qwen2_dir):
    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=2, L=8, prompt=3)
    bs = 4
    loss, count = block_diffusion_loss(
        model, ids, labels, MASK_ID, bs, mask_impl="dense", generator=torch.Generator().manual_seed(5)
    )
    batch = two_stream_batch(ids, labels, MASK_ID, bs, generator=torch.Generator().manual_seed(5))
    dense = torch.tensor([[allowed_by_method(q, k, 8, bs) for k in range(16)] for q in range(16)])
    total, n = 0.0, 0
    with torch.no_grad():
        for row in range(4):  # one row at a time, the mask written from the rule directly
            logits = model(batch.input_ids[row : row + 1], batch.position_ids[row : row + 1], dense[None, None])[0]
            for j in range(1, 8):
                target = int(batch.targets[row, j])
                if target != IGNORE_INDEX:
                    total += -torch.log_softmax(logits[j - 1], -1)[target].item()
                    n += 1
    assert int(count) == n == int(((labels != IGNORE_INDEX).sum() - (labels[:, 0] != IGNORE_INDEX).sum()))
    assert math.isclose(loss.item(), total / n, rel_tol=1e-5)


def test_clean_stream_never_sees_the_noisy_stream(qwen2_dir):
    model = fdllm.load_model(qwen2_dir)
    L, bs = 16, 4
    ids = torch.randint(0, 80, (1, 2 * L))
    other = ids.clone()
    other[:, :L] = torch.randint(0, 80, (1, L))  # change every noisy token
    pos = torch.arange(L).repeat(2)[None]
    mask = two_stream_mask(L, bs)
    with torch.no_grad():
        h1, h2 = model.hidden(ids, pos, mask), model.hidden(other, pos, mask)
    assert torch.equal(h1[:, L:], h2[:, L:])
    assert not torch.allclose(h1[:, :L], h2[:, :L])


def test_short_training_lowers_the_loss():
    from fdllm.config import ModelConfig
    from fdllm.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Transformer(cfg)
    # a fixed toy set: count up from a random start (mod 30), prompt = first 4 tokens
    starts = torch.arange(16)[:, None]
    ids = (starts + torch.arange(32)[None]) % 30
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        loss, _ = block_diffusion_loss(model, ids, labels, mask_token_id=31, block_size=8, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.25 * first, (first, last)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, 1.2)])
def test_joint_loss_is_hf_causal_lm_loss_plus_the_causal_prefix_diffusion_loss(qwen2_dir, weights):
    """docs/method.md §5: w_ar * (the plain causal LM loss, computed by HF transformers on the clean tokens)
    + w_diff * (the block-diffusion loss of the same noised batch with a causal clean stream)."""
    import transformers

    from fdllm.objective import joint_loss

    model = fdllm.load_model(qwen2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32).eval()
    ids, labels = _batch(B=2, L=16, prompt=5, seed=3)
    batch = two_stream_batch(ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss, count = joint_loss(model, batch, 4, *weights, mask_impl="dense")
        hf_labels = labels.clone()
        hf_labels[:, 0] = IGNORE_INDEX  # never a target (HF shifts it away anyway)
        hf_ar = hf(input_ids=ids, labels=hf_labels).loss
        diffusion, diffusion_count = two_stream_loss(model, batch, 4, mask_impl="dense", causal_prefix=True)
        block_causal, _ = two_stream_loss(model, batch, 4, mask_impl="dense")
    assert int(count) == int(diffusion_count)
    assert math.isclose(loss.item(), weights[0] * hf_ar.item() + weights[1] * diffusion.item(), rel_tol=1e-5)
    # the clean stream's attention reaches the noisy half's loss: causal and block-causal prefixes differ
    assert not math.isclose(diffusion.item(), block_causal.item(), rel_tol=1e-4)


def test_joint_loss_with_certainty_adds_the_entropy_term_to_its_diffusion_part(qwen2_dir):
    """joint-certainty = w_ar * AR + w_diff * (diffusion CE + lambda * the certainty-forcing entropy of the
    same noisy logits), those logits taken under the causal clean stream."""
    import dataclasses

    from fdllm.objective import _noisy_logits, certainty_forcing_entropy, joint_loss

    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=2, L=16, prompt=5, seed=3)
    batch = two_stream_batch(ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = _noisy_logits(model, batch, 4, "dense", causal_prefix=True)
        targets = batch.targets.clone()  # every masked target what the model predicts: all "correct"
        masked = targets[:, 1:] != IGNORE_INDEX
        targets[:, 1:][masked] = logits[:, :-1].argmax(-1)[masked]
        batch = dataclasses.replace(batch, targets=targets)
        plain, _ = joint_loss(model, batch, 4, 0.3, 1.2, mask_impl="dense")
        both, _ = joint_loss(model, batch, 4, 0.3, 1.2, mask_impl="dense", certainty=(2.0, 0.25))
        entropy, correct = certainty_forcing_entropy(logits, targets, 0.25)  # not the default T
    assert int(correct) == int(masked.sum()) > 0 and entropy.item() > 0
    assert math.isclose(both.item(), plain.item() + 1.2 * 2.0 * entropy.item(), rel_tol=1e-5)


def test_joint_loss_needs_ar_targets(qwen2_dir):
    from fdllm.objective import joint_loss

    ids, labels = _batch(B=1, L=8)
    b = two_stream_batch(ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^the joint loss needs TwoStreamBatch\.ar_targets"):
        joint_loss(fdllm.load_model(qwen2_dir), TwoStreamBatch(b.input_ids, b.position_ids, b.targets, None), 4)


def _loss_and_grads(model, batch, objective: str):
    from fdllm.objective import certainty_forcing_loss, joint_loss

    model.zero_grad()
    if objective == "joint":
        loss, count = joint_loss(model, batch, 4, 0.4, 0.6, mask_impl="dense")
    elif objective == "certainty":
        loss, count = certainty_forcing_loss(model, batch, 4, 2.0, 0.5, mask_impl="dense")
    else:
        loss, count = two_stream_loss(model, batch, 4, mask_impl="dense")
    loss.backward()
    return loss.item(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_loss_and_gradients(model, batch: TwoStreamBatch, oracle: TwoStreamBatch, objective: str) -> None:
    loss, count, grads = _loss_and_grads(model, batch, objective)
    loss_o, count_o, grads_o = _loss_and_grads(model, oracle, objective)
    assert count == count_o > 0
    assert math.isclose(loss, loss_o, rel_tol=1e-5), (loss, loss_o)
    for name, g in grads_o.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("objective", ["diffusion", "joint", "certainty"])
def test_shared_clean_stream_gives_method_s_loss_and_gradients(qwen2_dir, objective):
    """`[x_t ; x_t' ; x_0]` (the train loop's layout) against METHOD's two rows `[x_t ; x_0]` of the
    same noise: the same loss, count and gradient of every weight (packed documents, own positions)."""
    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=3, L=16, prompt=3, seed=11)
    docs = torch.tensor([[0] * 8 + [1] * 8, [0] * 16, [0] * 4 + [1] * 12])
    pos = torch.cat([torch.arange(8), torch.arange(8)]).expand(3, 16).clone()
    pos[1], pos[2] = torch.arange(16), torch.cat([torch.arange(4), torch.arange(12)])
    built = {share: two_stream_batch(ids, labels, MASK_ID, 4, 1e-3, pos, docs, torch.Generator().manual_seed(2),
                                     share_clean=share) for share in (False, True)}
    shared, method = built[True], built[False]
    assert shared.input_ids.shape == (3, 48) and method.input_ids.shape == (6, 32)
    # the same noisy copies: METHOD's copy c of row b is the shared layout's row b, stream c
    assert torch.equal(shared.input_ids[:, :32].reshape(3, 2, 16).transpose(0, 1).flatten(0, 1), method.input_ids[:, :16])
    assert torch.equal(shared.targets.unflatten(0, (3, 2)).transpose(0, 1).flatten(0, 1), method.targets)
    _assert_same_loss_and_gradients(model, shared, method, objective)


def _prompted_batch(share: bool, L: int = 32) -> TwoStreamBatch:
    """Rows whose first blocks are prompt only, and one with no prompt and a padded tail (so padding
    slots sit beside a first block that carries targets): noisy blocks with no target."""
    ids, labels = _batch(B=3, L=L, prompt=13, seed=5)
    labels[1] = torch.where(torch.arange(L) < 12, ids[1], IGNORE_INDEX)
    docs = torch.tensor([[0] * 16 + [1] * (L - 16), [0] * L, [0] * 6 + [1] * (L - 6)])
    pos = torch.stack([torch.cat([torch.arange(16), torch.arange(L - 16)]), torch.arange(L),
                       torch.cat([torch.arange(6), torch.arange(L - 6)])])
    return two_stream_batch(ids, labels, MASK_ID, 4, 1e-3, pos, docs, torch.Generator().manual_seed(3), share_clean=share)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("objective", ["diffusion", "joint", "certainty"])
def test_compacted_noisy_blocks_give_the_uncut_loss_and_gradients(qwen2_dir, objective, share):
    """Dropping the noisy blocks whose logits predict nothing changes no loss and no gradient: the uncut
    batch is the oracle (both layouts, every objective, packed documents, rows padded to the longest)."""
    model = fdllm.load_model(qwen2_dir)
    uncut = _prompted_batch(share)
    cut = compact_noisy_blocks(uncut, 4)
    assert cut.input_ids.shape[1] < uncut.input_ids.shape[1] and (cut.slots == -1).any()
    assert cut.input_ids.shape[1] == cut.noisy_streams * cut.noisy_len + 32
    _assert_same_loss_and_gradients(model, cut, uncut, objective)


def test_block_diffusion_loss_compacts_by_default(qwen2_dir):
    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=2, L=32, prompt=20, seed=2)
    recorder, losses = _MaskRecorder(), {}
    for compact in (True, False):
        kw = {} if compact else {"compact": False}  # the default compacts
        block_diffusion_loss(recorder, ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(1), **kw)
        losses[compact] = block_diffusion_loss(model, ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(1),
                                               **kw)[0].item()
        assert recorder.input_ids.shape[1] < 96 if compact else recorder.input_ids.shape[1] == 96
    assert math.isclose(losses[True], losses[False], rel_tol=1e-5)


def test_compacted_logit_targets_are_the_uncut_ones_in_order():
    """Each noisy logit predicts the next token (`logit_targets`), and compaction keeps every predicted
    target, in order, with its position: only blocks predicting nothing go."""
    uncut = _prompted_batch(share=True)
    assert torch.equal(uncut.logit_targets[:, :-1], uncut.targets[:, 1:])
    assert (uncut.logit_targets[:, -1] == IGNORE_INDEX).all()
    cut = compact_noisy_blocks(uncut, 4)
    noisy = cut.noisy_streams * cut.noisy_len
    positions = cut.position_ids[:, :noisy].reshape(cut.logit_targets.shape)  # [2B, K*bs]: rows as the targets'
    for got, want, pos, want_pos in zip(cut.logit_targets, uncut.logit_targets, positions,
                                        uncut.position_ids[:, :64].reshape(6, 32)):
        assert got[got != IGNORE_INDEX].tolist() == want[want != IGNORE_INDEX].tolist()
        assert pos[got != IGNORE_INDEX].tolist() == want_pos[want != IGNORE_INDEX].tolist()
    assert compact_noisy_blocks(cut, 4) is cut  # already compacted


def test_a_two_stream_batch_moves_whole():
    """The train loop compacts on the host and then moves the batch: every tensor, the slots included."""
    cut = compact_noisy_blocks(_prompted_batch(share=True), 4).to("meta")
    tensors = (cut.input_ids, cut.position_ids, cut.targets, cut.doc_ids, cut.ar_targets, cut.slots)
    assert all(t.device.type == "meta" for t in tensors) and cut.noisy_streams == 2


def test_compacted_lengths_come_in_at_most_eight_sizes():
    """K (kept blocks per stream) rounds up to an eighth of the blocks: a compiled attention sees few shapes."""
    ids, labels = _batch(B=1, L=256, prompt=230, seed=1)  # 64 blocks of 4, targets in the last 7
    cut = compact_noisy_blocks(two_stream_batch(ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(0)), 4)
    assert cut.noisy_len == 8 * 4 and int((cut.slots >= 0).sum(1).max()) <= 7


def test_a_batch_with_no_target_compacts_to_padding_and_a_finite_loss(qwen2_dir):
    ids, labels = _batch(B=2, L=16, prompt=16)
    cut = compact_noisy_blocks(two_stream_batch(ids, labels, MASK_ID, 4, share_clean=True), 4)
    assert cut.noisy_len == 4 and (cut.slots == -1).all()
    loss, count = two_stream_loss(fdllm.load_model(qwen2_dir), cut, 4, mask_impl="dense")
    assert int(count) == 0 and loss.item() == 0.0


@pytest.mark.parametrize("share", [False, True])
def test_compacted_loss_is_the_same_under_dense_and_flex_masks(qwen2_dir, share):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = fdllm.load_model(qwen2_dir)
    cut = compact_noisy_blocks(_prompted_batch(share), 4)
    with torch.no_grad():
        dense, flex = (two_stream_loss(model, cut, 4, mask_impl=impl)[0].item() for impl in ("dense", "flex"))
    assert math.isclose(dense, flex, rel_tol=1e-5), (dense, flex)


def test_unknown_mask_impl_is_a_clear_error():
    for bad in ("AUTO", "sparse", None):
        with pytest.raises(ValueError, match="mask_impl"):
            resolve_mask_impl(bad, torch.device("cpu"))


def test_block_diffusion_loss_feeds_the_shared_clean_layout_with_positions_and_documents():
    """What `block_diffusion_loss` hands the model: one `[x_t ; x_t' ; x_0]` row per sequence, every
    stream with the sequence's own positions, under the by-stream mask of its documents."""
    ids, labels = _batch(B=2, L=16, prompt=3)
    pos = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    docs = torch.tensor([[0] * 6 + [1] * 10] * 2)
    model = _MaskRecorder()
    block_diffusion_loss(model, ids, labels, MASK_ID, 4, position_ids_BL=pos, doc_ids_BL=docs,
                         generator=torch.Generator().manual_seed(0), compact=False)
    assert model.input_ids.shape == (2, 48) and torch.equal(model.input_ids[:, 32:], ids)
    assert torch.equal(model.position_ids, pos.repeat(1, 3))
    expected = two_stream_mask(16, 4, docs, noisy_streams=2)
    assert model.mask.noisy_streams == 2 and torch.equal(model.mask.clean, expected[..., 32:, 32:])
    assert torch.equal(model.mask.noisy[0], torch.cat([expected[..., :16, :16], expected[..., :16, 32:]], -1))


def test_joint_loss_weights_default_to_half_and_half(qwen2_dir):
    from fdllm.objective import joint_loss

    model = fdllm.load_model(qwen2_dir)
    ids, labels = _batch(B=2, L=16, prompt=5, seed=3)
    batch = two_stream_batch(ids, labels, MASK_ID, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ar_only, _ = joint_loss(model, batch, 4, 1.0, 0.0)
        diffusion_only, _ = joint_loss(model, batch, 4, 0.0, 1.0)
        default, _ = joint_loss(model, batch, 4)
    assert math.isclose(default.item(), 0.5 * ar_only.item() + 0.5 * diffusion_only.item(), rel_tol=1e-6)


def test_first_token_of_a_row_and_of_a_document_never_carries_loss():
    """Nothing before it in its document predicts it after the token shift: not masked, no AR target."""
    ids = torch.arange(10, 26)[None]
    labels = ids.clone()  # every token labelled, position 0 included
    docs = torch.tensor([[0] * 6 + [1] * 10])
    batch = two_stream_batch(ids, labels, MASK_ID, 4, doc_ids_BL=docs, generator=torch.Generator().manual_seed(0))
    assert (batch.ar_targets[:, [0, 6]] == IGNORE_INDEX).all()
    assert (batch.ar_targets[:, [1, 5, 7, 15]] != IGNORE_INDEX).all()
    assert (batch.targets[:, [0, 6]] == IGNORE_INDEX).all()  # never masked in either copy
    a, b = sample_noise_masks(labels, 4, generator=torch.Generator().manual_seed(1))  # default eps
    assert torch.equal(a ^ b, torch.ones_like(a).index_fill_(1, torch.tensor([0]), False))
    assert 0 < int(a.sum()) < 15  # p = (1 - eps) t + eps: not everything in one copy


def test_two_stream_batch_names_both_shapes_when_labels_do_not_match():
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^labels \(2, 4\) must match input_ids \(2, 8\)$"):
        two_stream_batch(ids, ids[:, :4], MASK_ID, 4)

