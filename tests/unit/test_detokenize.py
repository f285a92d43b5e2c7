"""Streaming detokenization against the tokenizer's own full decode (the oracle)."""

from __future__ import annotations

import random

import pytest

from fdllm.decoding import StopCriteria
from fdllm.tokenizer import load_tokenizer
from pipelines.world import DEFAULT_MODEL_DIR
from serve.detokenize import IncrementalDetokenizer

TEXT = "Reverse: 03 17 42 -> 42 17 03. Café, naïve, 漢字 and 🙂 done!"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL_DIR)  # byte-level BPE: multi-byte characters span tokens


def stream(tokenizer, ids, stop=(), seed=0):
    """Push `ids` in random chunk sizes; returns the emitted pieces and the final remainder."""
    rng, detok, pieces, i = random.Random(seed), IncrementalDetokenizer(tokenizer, stop), [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        pieces.append(detok.push(ids[i : i + n]))
        i += n
    return pieces, detok.finish(tokenizer.decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("seed", range(4))
def test_streamed_text_is_the_full_decode_and_never_a_broken_character(tokenizer, seed):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.encode()) // 4, "the test needs characters split over several tokens"
    pieces, rest = stream(tokenizer, ids, seed=seed)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(len(p) for p in pieces) >= len(TEXT) - 2  # held back only what was incomplete


def test_special_tokens_are_skipped_as_the_full_decode_does(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("ab", add_special_tokens=False) + [eos] + tokenizer.encode(" cd", add_special_tokens=False)
    pieces, rest = stream(tokenizer, ids)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True) == "ab cd"


def test_a_possible_stop_string_is_held_back_until_the_end(tokenizer):
    # The engine's output ends with the token that completes the stop string; its text is cut before it.
    ids = tokenizer.encode("one two thr", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=("thr", "xyz!"))
    sent = "".join(detok.push([t]) for t in ids)
    assert sent == "one two "  # the last len("xyz!") - 1 characters waited
    assert detok.finish("one two ") == ""


@pytest.mark.parametrize("text,stop", [("Hello world\nSecond line", ("\n",)), ("one two three four", ("two",)),
                                       ("x = 12, y = 3", (",", "= 1")), ("ab 漢字 cd", ("字",)), ("aaa", ("a",))])
@pytest.mark.parametrize("seed", range(3))
def test_a_stop_string_is_never_streamed(tokenizer, text, stop, seed):
    """As the engine sends them: the tokens up to the one that completes a stop string (in chunks of
    any size; that token's text may go on past the stop string), then the final text cut before the first stop string
    (`StopCriteria.cut_text`, OpenAI's semantics). Streamed or not, the client gets the same text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    criteria = StopCriteria(max_new_tokens=len(ids), stop=stop, decode=tokenizer.decode)
    n = next(n for n in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:n]) for s in stop))
    rng, detok, sent, i = random.Random(seed), IncrementalDetokenizer(tokenizer, stop), "", 0
    while i < n:
        k = min(rng.randint(1, 3), n - i)
        sent += detok.push(ids[i : i + k])
        i += k
    final = criteria.cut_text(tokenizer.decode(ids[:n]))
    assert not any(s in sent for s in stop)
    assert sent + detok.finish(final) == final


def test_work_per_token_does_not_grow_with_the_output(tokenizer, monkeypatch):
    """Incremental: the full-output decode of the old streamer (quadratic) is never called."""
    ids = tokenizer.encode(TEXT * 20, add_special_tokens=False)
    monkeypatch.setattr(type(tokenizer), "decode", lambda *a, **k: pytest.fail("full decode while streaming"))
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push([t]) for t in ids) == TEXT * 20


def test_the_detokenizer_sends_the_held_back_tail_at_the_end():
    """With a stop string, the last len(stop) - 1 characters wait until the end: `finish` sends them, so
    the stream adds up to the final text."""
    from serve.detokenize import IncrementalDetokenizer
    from tests.helpers import make_tokenizer

    tok = make_tokenizer()
    text = "the quick brown fox"
    detok = IncrementalDetokenizer(tok, stop=("hello world",))
    sent = "".join(detok.push([t]) for t in tok.encode(text))
    assert len(sent) < len(text)  # the premise: something was held back
    assert sent + detok.finish(text) == text


def test_the_stop_token_that_ends_a_request_sends_no_text(tokenizer):
    """A `stop_token_ids` entry with text of its own (no special token) ends the stream before that text,
    as the engine's final text ends (vLLM's)."""
    ids = tokenizer.encode("sorted 17 42", add_special_tokens=False)
    *head, stop = ids
    detok = IncrementalDetokenizer(tokenizer, stop_token_ids={stop})
    sent = detok.push(head[:2]) + detok.push(head[2:] + [stop])
    final = tokenizer.decode(head, skip_special_tokens=True)
    assert sent + detok.finish(final) == final
