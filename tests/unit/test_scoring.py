"""`Engine.score`: causal log-probabilities of token sequences, held against HF transformers' own
forward of the same checkpoint (an independent oracle), through the engine's chunked, paged prefill path."""

from __future__ import annotations

import math

import pytest
import torch

import fdllm
from fdllm.cache import OutOfPages
from tests.helpers import hf_causal_logprobs

pytest.importorskip("transformers")


def assert_matches_hf(scored: fdllm.SequenceLogprobs, path, ids: list[int], k: int, mask_token_id: int | None) -> None:
    assert scored.token_ids == ids
    assert scored.logprobs[0] is None and scored.top_logprobs[0] == []
    if len(ids) == 1:
        assert len(scored.logprobs) == len(scored.top_logprobs) == 1
        return
    ref = hf_causal_logprobs(path, ids, mask_token_id)
    want = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(scored.logprobs[1:], dtype=torch.float64), want.double(), atol=1e-5, rtol=0)
    top = ref.topk(k, dim=-1)
    for i, alternatives in enumerate(scored.top_logprobs[1:]):
        got_ids, got_values = zip(*alternatives) if alternatives else ((), ())
        assert list(got_ids) == top.indices[i].tolist(), i
        torch.testing.assert_close(torch.tensor(got_values, dtype=torch.float64), top.values[i].double(), atol=1e-5, rtol=0)
        values = dict(alternatives)
        if ids[i + 1] in values:  # one log-softmax: a top token's value is bit for bit its own logprob
            assert values[ids[i + 1]] == scored.logprobs[i + 1]


@pytest.fixture(scope="module")
def engine(causal_dllm_dir):
    # prefill chunks of 8 tokens (one block): sequences below cross chunks and pages
    return fdllm.Engine.from_pretrained(causal_dllm_dir, engine_config=fdllm.EngineConfig(max_prefill_tokens=8))


@pytest.mark.parametrize("length", [1, 2, 8, 9, 17, 40])
def test_score_equals_transformers_across_chunks(engine, causal_dllm_dir, length):
    ids = torch.randint(0, engine.config.mask_token_id, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    (scored,) = engine.score([ids], top_logprobs=3)
    assert_matches_hf(scored, causal_dllm_dir, ids, 3, engine.config.mask_token_id)
    assert engine.num_free_pages == engine.num_pages


def test_head_chunks_change_nothing(causal_dllm_dir, engine):
    """Logits are made a few rows at a time at a real vocabulary (`head_chunk_rows`); here 3."""
    chunked = fdllm.Engine.from_pretrained(causal_dllm_dir, engine_config=fdllm.EngineConfig(max_prefill_tokens=8))
    chunked.runner.max_head_rows = 3
    ids = list(range(4, 30))
    (got,), (want,) = chunked.score([ids], top_logprobs=4), engine.score([ids], top_logprobs=4)
    assert got.logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-6)  # GEMMs of other shapes: rounding
    assert [[t for t, _ in top] for top in got.top_logprobs] == [[t for t, _ in top] for top in want.top_logprobs]


def test_several_sequences_share_forwards(causal_dllm_dir, engine, monkeypatch):
    """A batch is packed into forwards of at most max_prefill_tokens (8 here) tokens, one causal row per
    sequence chunk, as prefill packs prompts: each sequence scores as it does alone."""
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (5, 5, 13, 2, 1, 5)]
    alone = [engine.score([ids], top_logprobs=2)[0] for ids in batch]
    forwards = []
    score = engine.runner.score
    monkeypatch.setattr(engine.runner, "score", lambda rows, k: forwards.append([len(r.ids) for r in rows]) or score(rows, k))
    packed = engine.score(batch, top_logprobs=2)
    # fed tokens: 4, 4, 12, 1, 0, 4 -> [4, 4], [8], [4, 1, 3], [1]: 4 forwards instead of 7
    assert forwards == [[4, 4], [8], [4, 1, 3], [1]]
    for got, want, ids in zip(packed, alone, batch):
        assert got.token_ids == ids and got.logprobs[0] is None
        assert got.logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-5)
        assert [[t for t, _ in top] for top in got.top_logprobs] == [[t for t, _ in top] for top in want.top_logprobs]
    assert_matches_hf(packed[2], causal_dllm_dir, batch[2], 2, engine.config.mask_token_id)
    assert engine.num_free_pages == engine.num_pages
    assert [engine.score_pages(ids) for ids in batch] == [1, 1, 2, 1, 0, 1]


def test_text_prompts_and_several_sequences(engine, causal_dllm_dir):
    tok = engine.tokenizer
    texts = ["hello world", "héllo ✓ the quick, brown fox"]
    scored = engine.score(texts, top_logprobs=0)
    for s, text in zip(scored, texts):
        assert s.token_ids == tok.encode(text)
        assert all(top == [] for top in s.top_logprobs)
        assert_matches_hf(s, causal_dllm_dir, s.token_ids, 0, engine.config.mask_token_id)


def test_the_mask_token_is_never_a_prediction(engine):
    mask = engine.config.mask_token_id
    (scored,) = engine.score([[5, mask, 6]], top_logprobs=engine.model.config.vocab_size)
    assert scored.logprobs[1] == -math.inf and math.isfinite(scored.logprobs[2])
    assert scored.top_logprobs[1][-1] == (mask, -math.inf)  # the whole vocabulary: the mask comes last
    assert math.isclose(sum(math.exp(v) for _, v in scored.top_logprobs[1]), 1.0, rel_tol=1e-5)


def test_an_ar_checkpoint_scores_with_its_whole_vocabulary(qwen2_dir):
    engine = fdllm.Engine.from_pretrained(qwen2_dir)  # no mask token: an AR model
    assert engine.scores_causally
    ids = [3, 9, 27, 4, 81, 5]
    (scored,) = engine.score([ids], top_logprobs=2)
    assert_matches_hf(scored, qwen2_dir, ids, 2, None)


def test_a_plain_ar_checkpoint_with_a_mask_token_in_its_tokenizer_scores():
    """The world's AR base carries |<MASK>| in its tokenizer for the fine-tune to come, so it was taken for
    a block-causal fine-tune and refused; it has no fdllm_config.json (never fine-tuned): its causal
    distribution is its own, HF's."""
    from pipelines.world import DEFAULT_MODEL_DIR

    engine = fdllm.Engine.from_pretrained(DEFAULT_MODEL_DIR)
    assert engine.config.mask_token_id is not None and engine.ar_checkpoint and engine.scores_causally
    ids = engine.tokenizer.encode("Sort: 5 3 9 1")
    (scored,) = engine.score([ids], top_logprobs=3)
    assert_matches_hf(scored, DEFAULT_MODEL_DIR, ids, 3, engine.config.mask_token_id)


def test_a_block_causal_checkpoint_is_refused(dllm_dir):
    engine = fdllm.Engine.from_pretrained(dllm_dir)
    assert not engine.scores_causally
    with pytest.raises(ValueError, match="causal checkpoint"):
        engine.score([[5, 6, 7]])


@pytest.mark.parametrize("prompts,top,message", [
    ([[]], 0, "prompt is empty"),
    ([[5, 96]], 0, r"token ids must be in \[0, 96\)"),
    ([[-1, 5]], 0, r"token ids must be in \[0, 96\)"),
    ([[5] * 513], 0, "max_model_len"),
    ([[5, 6]], -1, "top_logprobs"),
    ([[5, 6]], 97, "top_logprobs"),
    ([[5, 6]], True, "top_logprobs"),
    ([[5, 6]], 1.5, "top_logprobs"),
    ([[5, 6], "x", [5.5]], 0, "a prompt's token ids are ints, got float at index 0"),
    ([[5, 6], 7], 0, "a prompt is a string or a list of token ids, got int"),
])
def test_bad_input_is_a_value_error_and_changes_nothing(engine, prompts, top, message):
    with pytest.raises(ValueError, match=message):
        engine.score(prompts, top_logprobs=top)
    assert engine.num_free_pages == engine.num_pages and not engine.has_unfinished()


def test_scoring_between_steps_leaves_running_requests_as_they_were(causal_dllm_dir):
    """Scoring borrows free pages between two steps: the requests running around it decode exactly
    what they decode alone, and every page comes back."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]]
    params = [fdllm.SamplingParams(max_new_tokens=24, temperature=0.0),
              fdllm.SamplingParams(max_new_tokens=20, temperature=0.8, seed=3, mode="speculative")]
    alone = fdllm.Engine.from_pretrained(causal_dllm_dir).generate(prompts, params)
    engine = fdllm.Engine.from_pretrained(causal_dllm_dir, engine_config=fdllm.EngineConfig(max_prefill_tokens=8))
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    scored, results = [], {}
    while engine.has_unfinished():
        scored.append(engine.score([list(range(3, 40))], top_logprobs=2)[0])
        results.update({r.request_id: r for r in engine.step()})
    assert [results[r].token_ids for r in rids] == [a.token_ids for a in alone]
    assert all(s == scored[0] for s in scored)  # and the scores do not depend on what runs beside them
    assert engine.num_free_pages == engine.num_pages


def test_a_full_cache_is_out_of_pages_until_requests_finish(causal_dllm_dir):
    engine = fdllm.Engine.from_pretrained(causal_dllm_dir, engine_config=fdllm.EngineConfig(num_pages=6))
    engine.add_request([5] * 30, fdllm.SamplingParams(max_new_tokens=10))  # 5 pages reserved
    engine.step()  # its prompt prefilled and its first block opened: 4 pages taken
    assert engine.num_free_pages == 2
    with pytest.raises(OutOfPages):
        engine.score([[5] * 30])  # 4 pages
    engine.score([[5] * 17])  # 2 pages: free ones, reserved or not (given back before the next step)
    assert engine.num_free_pages == 2
    while engine.has_unfinished():
        engine.step()
    assert engine.score([[5] * 30])[0].logprobs[1] < 0


def test_scoring_a_finished_completion_reads_its_cached_prompt(causal_dllm_dir, engine, monkeypatch):
    """Only the completion of a request that just finished is scored (`score_from`, OpenAI logprobs
    without echo): the whole blocks of its prompt before the first scored position come from the
    prefix cache, so only the rest is fed; the values are the full scoring's and transformers'."""
    prompt = torch.randint(0, 90, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    done = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    ids = prompt + done.token_ids
    full = engine.score([ids], top_logprobs=2)[0]
    fed = []
    score = engine.runner.score
    monkeypatch.setattr(engine.runner, "score", lambda rows, k: fed.extend(len(r.ids) for r in rows) or score(rows, k))
    cached_before = engine.num_cached_pages
    (got,) = engine.score([ids], top_logprobs=2, score_from=len(prompt))
    assert sum(fed) == len(ids) - 1 - 16  # the prompt's first two blocks (16 tokens) are read, not fed
    assert got.logprobs[:21] == [None] * 21 and got.top_logprobs[:21] == [[]] * 21
    assert got.logprobs[21:] == pytest.approx(full.logprobs[21:], abs=1e-5)
    assert [[t for t, _ in top] for top in got.top_logprobs[21:]] == [[t for t, _ in top] for top in full.top_logprobs[21:]]
    ref = hf_causal_logprobs(causal_dllm_dir, ids, engine.config.mask_token_id)
    want = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got.logprobs[21:], dtype=torch.float64), want[20:].double(), atol=1e-5, rtol=0)
    assert engine.num_cached_pages == cached_before and engine.num_free_pages == engine.num_pages
    fed.clear()
    nothing, part = engine.score([ids, ids], score_from=[len(ids), 26])
    assert nothing.logprobs == [None] * len(ids) and part.logprobs[26:] == pytest.approx(full.logprobs[26:], abs=1e-5)
    assert sum(fed) == len(ids) - 1 - 24  # three blocks lie before position 25, whose logits score 26


@pytest.mark.parametrize("prompt_len", [16, 24])
def test_scoring_after_a_prompt_of_whole_blocks_feeds_its_last_block(engine, prompt_len):
    """A prompt of whole blocks (2 or 3 of 8): the logits that score the first completion token are the
    prompt's last position's, inside its last cached block, so that block is fed again (only the blocks
    before position score_from - 1 may be read from the cache); the values are the full scoring's."""
    prompt = [(7 * i + 3) % engine.config.mask_token_id for i in range(prompt_len)]
    done = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    ids = prompt + done.token_ids
    full = engine.score([ids], top_logprobs=2)[0]
    (got,) = engine.score([ids], top_logprobs=2, score_from=prompt_len)
    assert got.logprobs[:prompt_len] == [None] * prompt_len
    assert got.logprobs[prompt_len:] == pytest.approx(full.logprobs[prompt_len:], abs=1e-5)
    assert [[t for t, _ in top] for top in got.top_logprobs[prompt_len:]] == [
        [t for t, _ in top] for top in full.top_logprobs[prompt_len:]]
    assert engine.num_free_pages == engine.num_pages


@pytest.mark.parametrize("score_from,message", [(0, "score_from"), (5, "score_from"), (True, "score_from"),
                                                (1.5, "score_from"), ([1, 2], "2 score_from positions")])
def test_bad_score_from_is_a_value_error(engine, score_from, message):
    with pytest.raises(ValueError, match=message):
        engine.score([[5, 6, 7, 8]], score_from=score_from)


def _fed_tokens(engine, monkeypatch) -> list[list[int]]:
    """Tokens each forward of `engine.score` feeds, per sequence chunk (recorded from now on)."""
    forwards = []
    score = engine.runner.score
    monkeypatch.setattr(engine.runner, "score", lambda rows, k: forwards.append([len(r.ids) for r in rows]) or score(rows, k))
    return forwards


def _assert_same_scores(got: list[fdllm.SequenceLogprobs], want: list[fdllm.SequenceLogprobs]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and len(g.logprobs) == len(w.logprobs)
        assert [v is None for v in g.logprobs] == [v is None for v in w.logprobs]
        assert [v for v in g.logprobs if v is not None] == pytest.approx([v for v in w.logprobs if v is not None], abs=1e-5)
        assert [[t for t, _ in top] for top in g.top_logprobs] == [[t for t, _ in top] for top in w.top_logprobs]


def _random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # 80+: markers


def test_continuations_of_one_context_compute_it_once(causal_dllm_dir, engine, monkeypatch):
    """lm-eval's loglikelihood batch: one 37-token context, four continuations (echo: every position
    scored). The context's four whole blocks are fed once, in 8-token forwards; the other
    continuations read their pages and copy the log-probabilities there, starting after them."""
    context = _random_ids(37, 5)
    batch = [context + [80 + i] + _random_ids(n, i) for i, n in enumerate((0, 2, 11, 4))]
    alone = [engine.score([ids], top_logprobs=2)[0] for ids in batch]
    forwards = _fed_tokens(engine, monkeypatch)
    got = engine.score(batch, top_logprobs=2)
    _assert_same_scores(got, alone)
    assert sum(map(sum, forwards)) == (len(batch[0]) - 1) + sum(len(ids) - 1 - 32 for ids in batch[1:])
    assert all(sum(f) <= 8 for f in forwards)
    assert_matches_hf(got[3], causal_dllm_dir, batch[3], 2, engine.config.mask_token_id)
    assert engine.num_free_pages == engine.num_pages


def test_a_context_of_whole_blocks_is_shared_but_its_last_logit_is_not(engine, monkeypatch):
    """Continuations that differ right at a block boundary: the logit of the context's last token scores
    each one's own first token, so that block is computed by each (it is not a copy)."""
    context = _random_ids(32, 6)
    batch = [context + [81 + i, 7, 8] for i in range(3)] + [context + [81, 7, 9]]
    alone = [engine.score([ids], top_logprobs=1)[0] for ids in batch]
    forwards = _fed_tokens(engine, monkeypatch)
    _assert_same_scores(engine.score(batch, top_logprobs=1), alone)
    # the first feeds 34; the next two share 3 blocks (feed 34 - 24); the last shares the first's 4 (and token 32)
    assert sum(map(sum, forwards)) == 34 + 2 * 10 + 2


@pytest.mark.parametrize("order", ["scored_first", "scored_later"])
def test_only_positions_the_sibling_scored_are_copied(engine, order):
    """A sequence scored from position 1 shares the pages of one scored from 30 (OpenAI logprobs without
    echo), but cannot copy log-probabilities it never computed; the other way round it can."""
    a = _random_ids(45, 7)
    b = a[:40] + [82, 83]
    batch, starts = ([a, b], [30, 1]) if order == "scored_later" else ([b, a], [1, 30])
    alone = [engine.score([ids], top_logprobs=1, score_from=s)[0] for ids, s in zip(batch, starts)]
    _assert_same_scores(engine.score(batch, top_logprobs=1, score_from=starts), alone)


def test_repeated_sequences_and_chains_of_shared_blocks(engine, monkeypatch):
    x = _random_ids(29, 8)
    batch = [x, x, x[:20] + [85] * 9, x + [86] * 10, x + [86] * 10 + [87]]
    alone = [engine.score([ids], top_logprobs=0)[0] for ids in batch]
    forwards = _fed_tokens(engine, monkeypatch)
    _assert_same_scores(engine.score(batch, top_logprobs=0), alone)
    # x: 28; again: its 3 blocks, feeds 4; x[:20]+..: 2 blocks, feeds 12; x + 10: 3 blocks of x, feeds 38 - 24;
    # and one more token: the 4 blocks of the previous, feeds 39 - 32
    assert sum(map(sum, forwards)) == 28 + 4 + 12 + 14 + 7


def test_a_salted_completion_is_scored_from_its_own_cached_prompt_only(engine, monkeypatch):
    """The server scores a choice's logprobs under its request's cache_salt: its own cached prompt is read;
    under another salt (or none) nothing cached is, and the values are the same."""
    prompt = torch.randint(0, 90, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    done = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=6, ignore_eos=True, cache_salt="a"))[0]
    ids = prompt + done.token_ids
    chunks = []
    score = engine.runner.score
    monkeypatch.setattr(engine.runner, "score", lambda rows, k: chunks.extend(len(r.ids) for r in rows) or score(rows, k))

    def fed(salt):  # tokens the scoring forwards took
        chunks.clear()
        return engine.score([ids], score_from=len(prompt), cache_salt=salt)[0], sum(chunks)

    (own, own_fed), (other, other_fed), (unsalted, unsalted_fed) = (fed(salt) for salt in ("a", "b", None))
    assert (own_fed, other_fed, unsalted_fed) == (len(ids) - 1 - 16, len(ids) - 1, len(ids) - 1)  # 2 blocks read under "a"
    assert own.logprobs[21:] == pytest.approx(other.logprobs[21:], abs=1e-5) == unsalted.logprobs[21:]
    with pytest.raises(ValueError, match="2 sequences but 1 cache salts"):
        engine.score([ids, ids], cache_salt=["a"])
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string or None, got ''"):
        engine.score([ids, ids], cache_salt=["a", ""])
