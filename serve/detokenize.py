"""Incremental detokenization for streaming: emit text as tokens arrive, never text the final
answer will not contain, at O(1) work per token.

Tokens go through the `tokenizers` library's streaming decoder (`DecodeStream`), which looks at a
few trailing tokens only, so a long answer costs no more per token than a short one (decoding the
whole output at every step, as before, was quadratic). Two things can make a prefix of the streamed
text wrong: a token that ends inside a multi-byte character (the streaming decoder holds it until a
later token completes the character), and a stop string that the engine cuts only once it is
complete, after the token that completes it has been sent. So the streamer holds back the last
`len(longest stop) - 1` characters until the request finishes, and never sends a stop string it
has received, nor anything after it (the engine's final text ends before the first one:
`StopCriteria.cut_text`). Nor does it send the text of the stop token that ends a request (a
`stop_token_ids` entry that is not a special token): the engine's final text leaves it out, as vLLM's.
"""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet
from typing import Any

from tokenizers.decoders import DecodeStream

log = logging.getLogger(__name__)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] | list[str] = (),
                 stop_token_ids: AbstractSet[int] = frozenset()) -> None:
        """`tokenizer`: an HF fast tokenizer (its `backend_tokenizer` does the decoding); `stop_token_ids`: the
        ids that end the request (`Engine.stop_token_ids_for`), whose text is never sent."""
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = tuple(stop)
        self._stop_ids = frozenset(stop_token_ids)
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._text = ""  # everything decoded so far
        self._num_emitted = 0  # characters of _text already sent

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the new text that is safe to send now (may be empty)."""
        for token_id in token_ids:
            if token_id in self._stop_ids:  # the request's last token: it ends the text, adds none
                break
            piece = self._stream.step(self._backend, token_id)
            if piece:
                self._text += piece
        safe_end = max(len(self._text) - self._holdback, self._num_emitted)
        # A stop string starts at or after the sent text (else it was whole when that was sent, and cut there).
        found = [i for i in (self._text.find(s, self._num_emitted) for s in self._stop) if i >= 0]
        safe_end = min([safe_end, *found])
        delta = self._text[self._num_emitted : safe_end]
        self._num_emitted = safe_end
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the answer, given the engine's final (stop-cut) text."""
        emitted = self._text[: self._num_emitted]
        if not final_text.startswith(emitted):  # cannot happen for byte-level BPE; say so if it does
            log.warning("streamed text %r is not a prefix of the final text %r", emitted[-40:], final_text[-40:])
            return ""
        self._num_emitted = len(final_text)
        return final_text[len(emitted) :]
