"""Tokenizer helpers: the `|<MASK>|` token, chat rendering, stop tokens.

Tokenizers are HF fast tokenizers loaded from the checkpoint dir, as users ship them.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fdllm.paths import is_uri
from fdllm.storage import local_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fdllm.model import Transformer

log = logging.getLogger(__name__)

MASK_TOKEN = "|<MASK>|"
# End-of-turn markers of the chat templates we meet (Qwen/ChatML, Llama 3: eom ends a tool call's
# message, as its generation_config.json lists); all stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")


def mask_token_id(tokenizer: "PreTrainedTokenizerBase | None") -> int | None:
    """The id of `|<MASK>|` in the tokenizer's vocabulary; None for a plain AR tokenizer (or none)."""
    return None if tokenizer is None else tokenizer.get_vocab().get(MASK_TOKEN)


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerBase":
    """The checkpoint's tokenizer; `path` may be an object-store URI (its weights are not fetched)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(local_checkpoint(path, weights=False)))


def has_tokenizer(path: str | Path) -> bool:
    local = local_checkpoint(path, weights=False) if is_uri(str(path)) else Path(path)
    return any((local / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def check_text_tokenizer(tokenizer: "PreTrainedTokenizerBase | None", path: str | Path) -> "PreTrainedTokenizerBase":
    """`tokenizer`, the checkpoint at `path`'s (None: it has no tokenizer files), if it can read prompts
    and write text: a fast tokenizer that turns text into tokens. Else ValueError, one line saying what
    is missing and how to fix it. A tokenizer that loads is not enough: transformers 5 loads a
    checkpoint with tokenizer_config.json but without tokenizer.json as a tokenizer with no
    vocabulary, which encodes every text to no tokens at all."""
    if tokenizer is None:
        problem = "has no tokenizer (tokenizer.json)"
    elif not tokenizer.is_fast:
        problem = f"has no fast tokenizer (tokenizer.json), only a {type(tokenizer).__name__}"
    elif not tokenizer("hello world 12", add_special_tokens=False).input_ids:
        problem = "has a tokenizer without a vocabulary, which encodes text to no tokens (tokenizer.json missing?)"
    else:
        return tokenizer
    raise ValueError(f"{path} {problem}; reading prompts and writing text take a fast tokenizer with a vocabulary: "
                     "save the model's tokenizer there (tokenizer.save_pretrained(DIR); a fine-tune's is its base model's)")


def load_text_tokenizer(path: str | Path, label: str | Path | None = None) -> "PreTrainedTokenizerBase":
    """The checkpoint's tokenizer at `path`, refused with one line (ValueError) unless it loads and reads
    prompts and writes text (`check_text_tokenizer`); `label` names the checkpoint in errors (its URI,
    when `path` is a local copy)."""
    label = path if label is None else label
    if not has_tokenizer(path):
        return check_text_tokenizer(None, label)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - transformers fails on a broken file in its own ways (KeyError, ...)
        raise ValueError(f"{label}'s tokenizer does not load ({type(e).__name__}: {e}): save the model's tokenizer there "
                         "again (tokenizer.save_pretrained(DIR))") from None
    return check_text_tokenizer(tokenizer, label)


def add_mask_token(tokenizer: "PreTrainedTokenizerBase", model: "Transformer") -> int:
    """Make sure `|<MASK>|` exists in the tokenizer and has an embedding row; return its id.

    A tokenizer smaller than the (padded) embedding, as Qwen2.5's, gets the mask on its first unused
    row; otherwise the embedding grows. Either way a new row starts at the mean embedding, which
    fine-tunes faster than a random row.
    """
    vocab_before = len(tokenizer)
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]}, replace_extra_special_tokens=False)
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    rows = model.config.vocab_size
    if mask_id >= rows:
        model.resize_token_embeddings(mask_id + 1)
        log.info("grew the vocabulary %d -> %d for %s", rows, mask_id + 1, MASK_TOKEN)
    elif mask_id >= vocab_before:  # a padded, never-trained row: give it a sensible start
        import torch  # here: the data pipeline's processes import this module without torch

        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            emb[mask_id] = emb[:vocab_before].mean(0)
        log.info("placed %s on unused embedding row %d", MASK_TOKEN, mask_id)
    return mask_id


def stop_token_ids(tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """EOS plus every end-of-turn marker the tokenizer knows."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def encode_prompt(tokenizer: "PreTrainedTokenizerBase", text: str, add_special_tokens: bool = True) -> list[int]:
    """The token ids of prompt text: with the special tokens the tokenizer adds (Llama 3's BOS) when
    `add_special_tokens`, except to text that already begins with the BOS token, as a chat template's
    rendering (`render_chat`) does: a second BOS, which training (the data pipeline's
    add_special_tokens=False) never showed the model, changes its answers. The engine's text prompts
    and the server's completions share this rule (vLLM's generate and /v1/completions double it)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        add_special_tokens = False
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def render_chat(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                template_variables: dict[str, Any] | None = None) -> str:
    """The prompt text of a chat conversation under the tokenizer's own template; `template_variables`
    are more variables the template reads (e.g. Qwen3's `enable_thinking`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; send a plain prompt to /v1/completions instead")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **(template_variables or {}))


def token_pieces(tokenizer: "PreTrainedTokenizerBase", ids: list[int]) -> list[tuple[str, bytes]]:
    """Per token id: its text decoded alone, and the bytes it stands for (OpenAI's logprob `bytes`).

    A byte-level BPE token (GPT-2's alphabet: Qwen2, Llama 3) may hold part of a multi-byte character,
    which alone decodes to U+FFFD; its bytes are its vocabulary string mapped back character by
    character, so a client can join them into the text. Added (special) tokens, ids the tokenizer
    does not know and other vocabularies' tokens stand for their text's UTF-8 bytes."""
    texts = tokenizer.batch_decode([[t] for t in ids])
    if type(tokenizer.backend_tokenizer.decoder).__name__ != "ByteLevel":
        return [(text, text.encode()) for text in texts]
    added, to_byte = tokenizer.added_tokens_decoder, _byte_level_alphabet()
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [(text, text.encode() if t in added or piece is None or not set(piece) <= to_byte.keys()
             else bytes(to_byte[c] for c in piece)) for t, text, piece in zip(ids, texts, pieces)]


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    other 68 for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
