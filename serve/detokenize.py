"""Incremental detokenization for streaming: emit text as tokens arrive, never text the final
answer will not contain.

Two things can make a prefix of the streamed text wrong: a token that ends inside a multi-byte
character (decodes to U+FFFD until the next token completes it), and a stop string that the
engine cuts only once it is complete. So the streamer holds back a partial character and the last
`len(longest stop) - 1` characters until the request finishes.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] | list[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the new text that is safe to send now (may be empty)."""
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        safe = text.rstrip("\ufffd")
        if self._holdback:
            safe = safe[: max(len(safe) - self._holdback, 0)]
        return self._advance(safe)

    def finish(self, final_text: str) -> str:
        """The rest of the answer, given the engine's final (stop-cut) text."""
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self._emitted) or not text.startswith(self._emitted):
            return ""
        delta = text[len(self._emitted):]
        self._emitted = text
        return delta
