"""The pure decoding functions of docs/method.md §3: confidence, selection, sub-block stepping, stopping."""

from __future__ import annotations

import random

import pytest
import torch

from fdllm.decoding import (
    StopCriteria,
    apply_unmask,
    counter_uniform,
    next_sub_block,
    decoded_prefix,
    new_block,
    plan_block_step,
    sample_confidence,
    select_unmask,
)
from fdllm.kernels.reference import greedy_confidence

M = 99  # mask token id in these tests


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_confidence_is_max_softmax_without_the_mask(dtype):
    logits = torch.randn(7, 120).to(dtype)
    logits[2, M] = 50.0  # the mask would win; it must never be predicted
    token, prob = greedy_confidence(logits, M)
    ref = logits.float().clone()
    ref[:, M] = float("-inf")
    ref_prob = ref.softmax(-1)
    assert token.dtype == torch.int64 and prob.dtype == torch.float32
    assert torch.equal(token, ref_prob.argmax(-1))
    torch.testing.assert_close(prob, ref_prob.max(-1).values)
    assert logits[2, M] == 50.0, "the caller's logits are left untouched"


def test_sampling_respects_filters_and_draws():
    logits = torch.randn(64, 50)
    logits[:, M % 50] = 30.0
    draw = lambda s: counter_uniform(torch.full((64,), s), torch.arange(64))  # noqa: E731
    greedy, _ = greedy_confidence(logits, M % 50)
    top1, p1 = sample_confidence(logits, M % 50, temperature=1.0, top_k=1, uniform_T=draw(0))
    assert torch.equal(top1, greedy) and torch.allclose(p1, torch.ones(64))
    tiny_p, _ = sample_confidence(logits, M % 50, temperature=1.0, top_p=1e-6, uniform_T=draw(0))
    assert torch.equal(tiny_p, greedy)
    a, pa = sample_confidence(logits, M % 50, temperature=0.7, top_p=0.9, top_k=10, uniform_T=draw(3))
    b, pb = sample_confidence(logits, M % 50, temperature=0.7, top_p=0.9, top_k=10, uniform_T=draw(3))
    assert torch.equal(a, b) and torch.equal(pa, pb)
    assert not (a == M % 50).any()
    top10 = logits.index_fill(1, torch.tensor([M % 50]), float("-inf")).topk(10, -1).indices  # mask excluded
    assert (top10 == a[:, None]).any(-1).all()
    # per-row parameters: row 0 greedy-like (top_k=1), row 1 unfiltered; each row as if alone
    mixed, _ = sample_confidence(logits[:2], M % 50, temperature=torch.tensor([1.0, 0.7]),
                                 top_p=torch.tensor([1.0, 1.0]), top_k=torch.tensor([1, 0]), uniform_T=draw(3)[:2])
    alone, _ = sample_confidence(logits[1:2], M % 50, temperature=0.7, uniform_T=draw(3)[1:2])
    assert mixed[0] == greedy[0] and mixed[1] == alone[0]
    with pytest.raises(ValueError, match="temperature"):
        sample_confidence(logits, None, temperature=0.0)


def test_select_unmask_threshold_and_always_one():
    # one work's candidates (non-candidate rows never reach the rule)
    assert select_unmask([0.5, 0.95, 0.2], 0.9) == [False, True, False]  # above the threshold
    assert select_unmask([0.1, 0.2, 0.05], 0.9) == [False, True, False]  # nothing above: the most confident
    assert select_unmask([0.4, 0.7, 0.7], 0.9) == [False, True, False]  # ties: the first
    assert select_unmask([0.99, 0.99], 0.5) == [True, True]
    assert select_unmask([], 0.5) == []  # no candidates: nothing
    assert sum(select_unmask([0.99, 0.999, 1.0], 1.0)) == 1  # threshold 1.0: one per step
    assert select_unmask([0.1, 0.2, 0.05], 0.9, force=False) == [False, False, False]  # a lookahead's step
    assert select_unmask([0.5, 0.95, 0.99], 0.9, force=False) == [False, True, True]


def test_a_blocks_first_sub_block_skips_decoded_positions():
    block = [5, 6, 7, 8, M, 1, M, M]
    assert next_sub_block(block, None, 4, M) == (4, 8)
    assert next_sub_block(block, None, 2, M) == (4, 6)
    assert next_sub_block([1, 2, 3, M, 5, 6, 7, 8], None, 2, M) == (2, 4)
    assert next_sub_block([1, 2, 3, 4], None, 2, M) is None


def test_plan_block_step_refresh_rules_and_token_shift():
    block = [5, M, M, M, 6, M, M, M]
    # First step of a sub-block: whole block, offsets 4..7 read rows 3..6 (the row before each).
    first = plan_block_step(block, 4, 4, first_step=True, use_sub_block_cache=True, mask_token_id=M)
    assert (first.feed_start, first.feed_stop) == (0, 8)
    assert first.logit_rows == (3, 4, 5, 6) and first.candidates == (False, True, True, True)
    # Later step with the sub-block's first offset decoded: only the sub-block, shift inside it.
    cached = plan_block_step(block, 4, 4, first_step=False, use_sub_block_cache=True, mask_token_id=M)
    assert (cached.feed_start, cached.feed_stop) == (4, 8)
    assert cached.logit_rows == (0, 0, 1, 2)
    # Later step with the first offset still masked: refresh (its logit comes from offset 3).
    masked_first = [5, 1, 2, 3, M, 9, M, M]
    step = plan_block_step(masked_first, 4, 4, first_step=False, use_sub_block_cache=True, mask_token_id=M)
    assert (step.feed_start, step.feed_stop) == (0, 8) and step.candidates == (True, False, True, True)
    # No sub-block cache: always the whole block.
    off = plan_block_step(block, 4, 4, first_step=False, use_sub_block_cache=False, mask_token_id=M)
    assert (off.feed_start, off.feed_stop) == (0, 8)
    # Offset 0 is known and never a candidate; every masked offset is one (max_new_tokens cuts later).
    sub0 = plan_block_step(block, 0, 4, first_step=True, use_sub_block_cache=True, mask_token_id=M)
    assert sub0.logit_rows == (0, 0, 1, 2) and sub0.candidates == (False, True, True, True)


def test_apply_unmask_only_writes_selected_candidates():
    block = new_block([5, 6], 8, M)
    assert block == [5, 6, M, M, M, M, M, M]
    step = plan_block_step(block, 0, 4, first_step=True, use_sub_block_cache=True, mask_token_id=M)
    apply_unmask(block, step, [11, 12, 13, 14], [True, True, False, True])
    assert block == [5, 6, M, 14, M, M, M, M]  # offsets 0/1 are no candidates
    assert decoded_prefix(block, 1, M) == [6]
    assert decoded_prefix([1, 2, 3], 0, M) == [1, 2, 3]


def test_stop_criteria():
    crit = StopCriteria(max_new_tokens=6, stop_token_ids={7})
    assert crit.check([1, 2], 0) is None
    assert crit.check([1, 2, 7, 9], 2) == (3, "stop")
    assert crit.check([1, 2, 3, 4, 5, 6], 4) == (6, "length")
    assert crit.check([1, 2, 3, 4, 5, 7], 4) == (6, "stop")  # the stop on the last allowed token wins
    # a step may settle tokens past the limit: a stop among them goes with them (max_new_tokens holds)
    assert crit.check([1, 2, 3, 4, 5, 6, 7], 4) == (6, "length")
    assert StopCriteria(max_new_tokens=1, stop_token_ids={2}).check([9, 2], 0) == (1, "length")
    text = StopCriteria(max_new_tokens=9, stop=("cd",), decode=lambda ids: "".join(chr(96 + t) for t in ids))
    assert text.check([1, 2], 0) is None
    assert text.check([1, 2, 3, 4, 5], 2) == (4, "stop")  # "abcd": cut after the token completing it
    assert text.check([3, 4, 5], 0) == (2, "stop")  # a stop string from the very first token
    assert StopCriteria(max_new_tokens=9, stop=("c",), decode=text.decode).check([3, 4], 0) == (1, "stop")
    assert StopCriteria(max_new_tokens=3, stop=("cd",), decode=text.decode).check([1, 2, 3, 4], 0) == (3, "length")
    assert text.cut_text("abcde") == "ab"
    assert text.cut_text("xyz") == "xyz"
    assert text.cut_text("cdab") == ""  # a stop string at the very start leaves nothing
    assert text.cut_text("abcdecd") == "ab"  # the first occurrence cuts, not the last


@pytest.mark.parametrize("seed", range(4))
def test_a_request_ends_where_one_token_a_step_would_end_it(seed):
    """A diffusion or speculative step settles several tokens at once; the request must end where AR,
    settling one a step, ends it. A stop string completed before a stop token in the same step was
    missed (the stop token was looked for first): the output ran on to the stop token, longer than AR's."""
    decode = lambda ids: "".join("_abcdef"[t] for t in ids)  # noqa: E731 - token 0 decodes to nothing, like EOS
    rng = random.Random(seed)
    for _ in range(200):
        crit = StopCriteria(max_new_tokens=rng.randint(1, 30), stop_token_ids=frozenset({0}),
                            stop=tuple(rng.sample(["c", "de", "fa", "bb"], rng.randint(0, 2))), decode=decode)
        output = [rng.randrange(7) for _ in range(35)]
        one_a_step = next((v for n in range(1, 36) if (v := crit.check(output[:n], n - 1))), None)
        verdict, checked = None, 0
        while verdict is None and checked < len(output):
            grown = min(len(output), checked + rng.randint(1, 8))
            verdict, checked = crit.check(output[:grown], checked), grown
        assert verdict == one_a_step, (crit, output)
    assert StopCriteria(10, frozenset({0}), ("c",), decode).check([1, 2, 3, 4, 0], 0) == (3, "stop")


def _first_stop_by_full_decode(decode, output, stops):
    """The oracle: the shortest prefix whose whole decode contains a stop string."""
    return next((n for n in range(1, len(output) + 1) if any(s in decode(output[:n]) for s in stops)), None)


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_found_from_a_decoded_tail_match_full_decodes(seed):
    """Stop strings are checked on a tail of the output each step; the cut must be the one a full
    decode of every prefix gives, for multi-byte characters split over byte-level tokens and for
    long outputs fed a few tokens at a time."""
    from fdllm.tokenizer import load_tokenizer
    from pipelines.world import DEFAULT_MODEL_DIR

    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(seed)
    words = ["Café", "naïve", "漢字", "🙂", "Sort", "0123", " ", "\n", "->", "ok."]
    text = "".join(rng.choice(words) for _ in range(120))
    ids = tok.encode(text, add_special_tokens=False)
    for stop in ("漢字🙂", "ok.Sort", "ïve ", "🙂🙂", "zzz"):
        crit = StopCriteria(max_new_tokens=10_000, stop=(stop,), decode=decode)
        found, checked = None, 0
        while found is None and checked < len(ids):
            grown = min(len(ids), checked + rng.randint(1, 5))
            verdict = crit.check(ids[:grown], checked)
            found, checked = (verdict[0] if verdict else None), grown
        assert found == _first_stop_by_full_decode(decode, ids, (stop,)), stop


@pytest.mark.parametrize("char", ["é", "🙂"])
def test_a_decoded_tail_starting_inside_a_character_matches_no_stop_string(char):
    """A tail whose first token is the second byte of "é" decodes to U+FFFD there, a character the output's
    text does not have: with a stop string holding U+FFFD it matched that phantom, cutting the output
    before the real stop (an audit of the server found it through `logit_bias` and a seeded sample)."""
    from tokenizers import pre_tokenizers

    from fdllm.tokenizer import load_tokenizer
    from pipelines.world import DEFAULT_MODEL_DIR

    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    symbols = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(char)[0][0]  # a symbol a byte
    byte_tokens = tok.convert_tokens_to_ids(list(symbols))  # a token a byte
    ids = byte_tokens * 40 + byte_tokens[-1:] + byte_tokens * 3  # a stray continuation byte: one real U+FFFD
    assert decode(ids) == char * 40 + "\ufffd" + char * 3
    for stop in ("\ufffd" + char, "\ufffd" + char * 2):
        crit = StopCriteria(max_new_tokens=10_000, stop=(stop,), decode=decode)
        for step in (1, 2, 3):
            found, checked = None, 0
            while found is None and checked < len(ids):
                grown = min(len(ids), checked + step)
                verdict = crit.check(ids[:grown], checked)
                found, checked = (verdict[0] if verdict else None), grown
            assert found == _first_stop_by_full_decode(decode, ids, (stop,)), (stop, step)


@pytest.mark.parametrize("gap", [0, 5, 40, 300])
def test_a_stop_string_split_by_tokens_that_decode_to_nothing_is_found(gap):
    """Special tokens (skipped by decoding) and a padded vocabulary's unused ids are tokens of no byte:
    `gap` of them inside "hello" once hid it from the decoded tail (4c + margin tokens), so the request
    ran to "length" with the stop string in its text."""
    from tests.helpers import make_tokenizer

    tok = make_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    special = tok.convert_tokens_to_ids("<|im_start|>")
    ids = tok.encode("say he") + [special] * gap + tok.encode("llo there")
    assert decode(ids) == "say hello there"
    crit = StopCriteria(max_new_tokens=10_000, stop=("hello",), decode=decode)
    for step in (1, 3):  # AR's one token a check, and a few (diffusion blocks)
        found, checked = None, 0
        while found is None and checked < len(ids):
            grown = min(len(ids), checked + step)
            verdict = crit.check(ids[:grown], checked)
            found, checked = (verdict[0] if verdict else None), grown
        assert found == _first_stop_by_full_decode(decode, ids, ("hello",)) == len(ids) - len(tok.encode(" there"))
