"""SFT data for block-diffusion fine-tuning: LLaMA-Nemotron post-training records -> packed sequences.

Records (one per jsonl line or parquet row) follow the LLaMA-Nemotron post-training schema:
  `input`          list of `{"role", "content"}` messages, or a string: a plain user turn, or (the
                   dataset's first release) a whole Llama-3-rendered prompt
                   (`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>`),
                   which is parsed back into messages so it is re-rendered with the target template;
  `output`         the assistant answer (may hold `<think>...</think>` reasoning, kept or stripped);
  `system_prompt`  optional system turn; `reasoning` ("on"/"off") and `category`: optional, validated;
or plain chat records `{"messages": [...]}` ending with an assistant turn; a record of both schemas is
skipped (`two_schemas`): which of its conversations is meant cannot be told.

Per document the pipeline renders the tokenizer's own chat template, tokenizes it in segments (the
prompt exactly as inference will tokenize it, then each assistant answer) and labels only assistant
tokens: `labels = -100` on system/user turns and template glue, the token id on every assistant
answer up to and including its end-of-turn token.

Packing (the layout the objective and masks expect):
  - each document is padded to a multiple of `block_size` *inside* the packed sequence, so block
    boundaries line up with document starts, as at inference where the prompt starts at block 0;
  - positions after the final end-of-turn token up to the block end are filled with that same
    end-of-turn token and **trained as targets**: at inference the decoder fills a whole block, and
    the model must learn that the tail of a block after the answer is end-of-turn (calibration runs
    showed this matters);
  - `position_ids` restart at 0 for every document; `doc_ids` give each document (and the padding at
    the end of a sequence) its own id, and `fdllm.masks` never lets attention cross ids;
  - documents are packed first-fit-decreasing within groups of at most `docs_per_batch`
    consecutive records; a group never crosses a pack window (in a jsonl file the lines starting in
    one `pack_window_bytes` range of the file, in a parquet file `docs_per_batch` rows of one row
    group), so the packing is a function of the file alone, not of how it is split across read
    tasks (`read_split_bytes`: a whole number of jsonl windows, or of parquet row groups).

Streaming (`build_dataset`): a jsonl file is read in byte-range splits by many tasks, a parquet
file in runs of whole row groups (only the columns records use), local or on an object store
through the same pyarrow filesystem (`fdllm.storage.filesystem`). A jsonl split starts at the first
line boundary at or after its start offset and owns every line that starts before its end, so each
line, a broken one included, is read and counted exactly once.

Bad rows never stop a run: any per-record failure (broken JSON or UTF-8 anywhere in a file, a chat
template that raises, a record that renders to no answer) is skipped and counted by reason
(`BAD_REASONS`); jsonl files are read as byte lines and decoded per record, so one invalid byte
costs one row. The counts travel
with the data (columns `bad_<reason>` on the first sequence of each batch; a batch with no good
document yields one all-padding row with `num_docs == 0` that carries them), so the training loop
reports exactly the counts of the rows it consumed; its first pass consumes every row (Ray Train's
equal split drops none when `build_dataset`'s `row_multiple` is the number of workers, and a worker
whose epoch another ended counts what its shard still holds: `ShardReader.drain`). A file that
cannot be read at all is a `DataError` from `check_data_files`, raised by the driver before any
worker starts.

Everything above is plain Python/numpy, tested without Ray; `build_dataset` only maps it with Ray Data.
Shape legend: N packed sequences in a batch, L sequence length (a multiple of block_size).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fdllm.config import IGNORE_INDEX
from fdllm.paths import is_uri, resolve_local
from fdllm.tokenizer import MASK_TOKEN, mask_token_id, stop_token_ids

if TYPE_CHECKING:
    import pyarrow
    import ray.data
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Why a row was skipped. Order is the order of the `bad_<reason>` columns and of log lines.
BAD_REASONS = (
    "invalid_json",  # a jsonl line that is not a JSON object
    "bad_unicode",  # a jsonl line (or parquet string) that is not UTF-8, or text with lone surrogates (a "\ud800" escape)
    "missing_field",  # neither `messages` nor `input` + `output`
    "two_schemas",  # both `messages` and `input`/`output`: which conversation is the record's is anyone's guess
    "wrong_type",  # a field of the wrong type (e.g. `output` a number, a message without `content`)
    "empty_field",  # an empty `output`, `input`, `messages` or message content
    "bad_chat",  # unknown role, no final assistant turn, an unparseable Llama-3 prompt string
    "unclosed_think",  # `<think>` without `</think>` while stripping reasoning
    "template_error",  # the tokenizer's chat template raised on the conversation
    "empty_render",  # the rendered conversation holds no answer tokens (template or tokenizer dropped it)
    "mask_token",  # the text contains the diffusion mask token itself
    "stop_token",  # an answer's text contains an EOS / end-of-turn token (e.g. a literal <|endoftext|>)
    "too_long",  # longer than seq_len after the overlong policy (distillation: prompt + max_new_tokens > the engine's context)
)
BAD_ROW_WARN_FRACTION = 0.01
OUTPUT_BLOCK_BYTES = 1 << 20  # bytes per Ray Data block (read windows, packed rows): small, so the first batch leaves early
ROLES = ("system", "user", "assistant")
# Marks an assistant turn that is context, not trained: every one in a Nemotron record's `input` (the record's
# answer is its `output`, as a prompt/completion pair trains only the completion), and a `messages` chat's
# answer that says `"context": true` (distilled records keep their prompt's context turns so)
CONTEXT_TURN = "context"
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

_LLAMA3_MARKER = "<|start_header_id|>"
_LLAMA3_TURN = re.compile(
    r"<\|start_header_id\|>(?P<role>.*?)<\|end_header_id\|>\n\n(?P<content>.*?)(?=<\|eot_id\|>|<\|start_header_id\|>|\Z)",
    re.DOTALL,
)
_LLAMA3_TRAILERS = ("<|eot_id|>", "<|end_of_text|>")
_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class DataError(RuntimeError):
    """A data source that cannot be used at all (missing, unreadable, wrong format)."""


class BadRow(ValueError):
    """A record to skip; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in BAD_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(kw_only=True)
class DataConfig:
    """How records become packed training sequences."""

    block_size: int  # diffusion block; documents are padded to a multiple of it
    seq_len: int  # packed sequence length, a multiple of block_size
    strip_reasoning: bool = False  # drop `<think>...</think>` from answers
    overlong: Literal["skip", "truncate"] = "skip"  # a document longer than seq_len: skip it, or cut it
    docs_per_batch: int = 256  # at most this many consecutive records are tokenized and packed together
    # jsonl: the records whose lines start in one `pack_window_bytes` window of a file are packed
    # together (in groups of docs_per_batch); a read task owns `read_split_bytes` of a file, a whole
    # number of windows, so the packing never depends on how a file is split across tasks.
    pack_window_bytes: int = 1 << 20
    read_split_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.seq_len < self.block_size or self.seq_len % self.block_size:
            raise ValueError(f"seq_len ({self.seq_len}) must be a positive multiple of block_size ({self.block_size})")
        if self.overlong not in ("skip", "truncate"):
            raise ValueError(f"overlong must be 'skip' or 'truncate', got {self.overlong!r}")
        if self.docs_per_batch < 1:
            raise ValueError(f"docs_per_batch must be >= 1, got {self.docs_per_batch}")
        if self.pack_window_bytes < 1 or self.read_split_bytes < 1 or self.read_split_bytes % self.pack_window_bytes:
            raise ValueError(f"read_split_bytes ({self.read_split_bytes}) must be a positive multiple of "
                             f"pack_window_bytes ({self.pack_window_bytes})")


# ---------------------------------------------------------------------------------------------
# Records -> chat messages


def parse_jsonl_line(line: str | bytes) -> dict[str, Any]:
    """One jsonl record; bytes are decoded here so that invalid UTF-8 fails only its own line."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow("bad_unicode", f"not UTF-8 at byte {e.start}") from None
    try:  # a UTF-8 BOM (a file saved by some editors) opens the first line
        record = json.loads(line.removeprefix("\ufeff"))
    except (ValueError, RecursionError) as e:  # also: integers past Python's 4300 digits, nesting past its stack
        raise BadRow("invalid_json", f"{type(e).__name__}: {e}"[:300]) from None
    if not isinstance(record, dict):
        raise BadRow("invalid_json", f"a JSON {type(record).__name__}, not an object")
    return record


def parse_llama3_prompt(text: str) -> list[dict[str, str]]:
    """Messages of a prompt rendered with the Llama-3 chat template (the trailing empty assistant
    header, i.e. the generation prompt, is dropped)."""
    messages = [{"role": m["role"].strip(), "content": m["content"]} for m in _LLAMA3_TURN.finditer(text)]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    if not messages:
        raise BadRow("bad_chat", "input looks like a Llama-3 prompt but no turn could be parsed")
    return messages


def strip_reasoning_text(text: str) -> str:
    """Remove `<think>...</think>` spans (and the whitespace after them)."""
    if text.count("<think>") != text.count("</think>"):
        raise BadRow("unclosed_think", "unbalanced <think> ... </think>")
    return _THINK.sub("", text)


def _check_unicode(text: str, where: str) -> None:
    """Lone surrogates (JSON escapes such as \\ud800 decode to them) cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("bad_unicode", f"{where} holds a lone surrogate") from None


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise BadRow("wrong_type", f"{where} must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise BadRow("empty_field", f"{where} is empty")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow("wrong_type", f"each message in {where} needs string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRow("bad_chat", f"unknown role {m['role']!r}")
        if not m["content"].strip():
            raise BadRow("empty_field", f"empty {m['role']} message in {where}")
        _check_unicode(m["content"], where)
        out.append({"role": m["role"], "content": m["content"]})
        if m["role"] == "assistant" and m.get(CONTEXT_TURN) is True:  # a chat's answer marked as context
            out[-1][CONTEXT_TURN] = True
    return out


def record_to_messages(record: dict[str, Any], strip_reasoning: bool = False) -> list[dict[str, str]]:
    """Chat messages of one record (either schema), ending with the assistant answer; BadRow if unusable."""
    for key in ("system_prompt", "reasoning", "category"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise BadRow("wrong_type", f"{key} must be a string")
    if record.get("reasoning") not in (None, "on", "off"):
        raise BadRow("wrong_type", f"reasoning must be 'on' or 'off', got {record['reasoning']!r}")

    if record.get("messages") is not None and (record.get("input") is not None or record.get("output") is not None):
        raise BadRow("two_schemas", "a record holds `messages` or Nemotron's `input` and `output`, not both")
    if record.get("messages") is not None:
        messages = _check_messages(record["messages"], "messages")
    elif record.get("input") is not None or record.get("output") is not None:
        prompt, answer = record.get("input"), record.get("output")
        if prompt is None or answer is None:
            raise BadRow("missing_field", "a record with `input` needs `output` and vice versa")
        if not isinstance(answer, str):
            raise BadRow("wrong_type", f"output must be a string, got {type(answer).__name__}")
        _check_unicode(answer, "output")
        for trailer in _LLAMA3_TRAILERS:  # the first release ends answers with Llama-3 specials
            answer = answer.removesuffix(trailer)
        if not answer.strip():
            raise BadRow("empty_field", "empty output")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRow("empty_field", "empty input")
            turns = parse_llama3_prompt(prompt) if _LLAMA3_MARKER in prompt else [{"role": "user", "content": prompt}]
            messages = _check_messages(turns, "input")
        else:
            messages = _check_messages(prompt, "input")
        if messages[-1]["role"] == "assistant":
            raise BadRow("bad_chat", "input already ends with an assistant turn")
        for m in messages:
            if m["role"] == "assistant":
                m[CONTEXT_TURN] = True
        messages.append({"role": "assistant", "content": answer})
    else:
        raise BadRow("missing_field", "a record needs `messages`, or `input` and `output`")

    system = record.get("system_prompt")
    if system and system.strip() and messages[0]["role"] != "system":
        _check_unicode(system, "system_prompt")
        messages.insert(0, {"role": "system", "content": system})
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRow("bad_chat", "a system message after the first turn")
    if messages[-1]["role"] != "assistant":
        raise BadRow("bad_chat", "the conversation does not end with an assistant turn")
    if strip_reasoning:
        for m in messages:
            if m["role"] == "assistant":
                m["content"] = strip_reasoning_text(m["content"])
                if not m["content"].strip():
                    raise BadRow("empty_field", "assistant answer is empty once reasoning is stripped")
    return messages


# ---------------------------------------------------------------------------------------------
# Messages -> labelled token ids


def render_segments(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]],
                    stop_texts: Sequence[str] = ()) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_answer) pieces that concatenate to it.

    Each assistant answer starts where the template's generation prompt ends, so tokenizing the
    pieces separately reproduces inference's prompt tokens exactly (a tokenizer that prepends to every
    text, SentencePiece's "▁", tokenizes each piece after the one before it: `TokenSpec.prepends_to_pieces`).
    Templates that rewrite history (e.g. dropping earlier reasoning) are not prefix-stable: then only the
    last answer is trained.
    A trained answer whose text writes out one of `stop_texts` (the tokenizer's stop tokens) is a
    BadRow: the model would learn to stop there.
    """

    def render(msgs: list[dict[str, str]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    trained = [m["role"] == "assistant" and not m.get(CONTEXT_TURN) for m in messages]
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]  # what the template sees
    full = render(messages, False)
    segments, cursor = [], 0
    for i, m in enumerate(messages):
        if not trained[i]:
            continue
        prompt = render(messages[:i], True)
        end = _turn_end(render(messages[: i + 1], False), full, stop_texts)
        if len(prompt) < cursor or end is None or not full.startswith(prompt) or end < len(prompt):
            break  # not prefix-stable: fall back below
        segments += [(full[cursor : len(prompt)], False), (full[len(prompt) : end], True)]
        cursor = end
    else:
        _check_answers([m for m, t in zip(messages, trained) if t], stop_texts)
        segments.append((full[cursor:], False))
        return [s for s in segments if s[0]]
    prompt = render(messages[:-1], True)
    if not full.startswith(prompt):
        raise BadRow("bad_chat", "the chat template renders the prompt differently inside the conversation")
    _check_answers(messages[-1:], stop_texts)
    return [(prompt, False), (full[len(prompt) :], True)]


def _turn_end(upto: str, full: str, stop_texts: Sequence[str]) -> int | None:
    """Where the conversation rendered up to an answer ends inside the whole one (None: it is not a
    prefix). Templates that close a conversation with EOS (Phi-3's) end `upto` with stop tokens the
    whole conversation has only at its end: those (and whitespace between them) are not the turn's."""
    while not full.startswith(upto):
        trimmed = upto.rstrip()
        closing = next((s for s in stop_texts if s and trimmed.endswith(s)), None)
        if closing is None:
            return None
        upto = trimmed[: -len(closing)]
    return len(upto)


def _check_answers(answers: list[dict[str, str]], stop_texts: Sequence[str]) -> None:
    held = next((s for m in answers for s in stop_texts if s and s in m["content"]), None)
    if held is not None:
        raise BadRow("stop_token", f"an answer holds a stop token ({held!r}: EOS or end of turn, written out) before "
                     "its end; trained, the model would learn to stop there")


@dataclass
class Document:
    """One tokenized conversation, padded to a block multiple (see the module docstring)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant answers (and their block fill)


@dataclass(frozen=True)
class TokenSpec:
    """Token ids the encoder needs from the tokenizer."""

    stop_ids: frozenset[int]  # end-of-turn / EOS ids: an answer's labels end at the first of them
    stop_texts: tuple[str, ...]  # their strings, which an answer must not write out
    eos_id: int  # appended when a template gives an answer no end-of-turn token
    pad_id: int  # the unused tail of a packed sequence
    mask_id: int | None  # the diffusion mask token; must not occur in the data
    # The most characters one token stands for (its vocabulary string's length: a byte-level or
    # SentencePiece token's text has at most as many): text longer than seq_len of them cannot fit.
    max_token_chars: int
    # Whether a piece of text tokenized alone gets tokens it does not have inside the text it continues: a
    # SentencePiece tokenizer's prepended "▁" (Llama 2's, TinyLlama's: " b" alone is "▁", "▁b"; after "a", "▁b").
    # Such a tokenizer's answers are tokenized after the piece before them (`encode_conversations`).
    prepends_to_pieces: bool = False

    @classmethod
    def from_tokenizer(cls, tokenizer: "PreTrainedTokenizerBase") -> "TokenSpec":
        stops = stop_token_ids(tokenizer)
        if not stops:
            raise ValueError("the tokenizer has no EOS or end-of-turn token to end answers with")
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else stops[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        texts = tuple(tokenizer.convert_ids_to_tokens(sorted(stops)))
        enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        return cls(frozenset(stops), texts, eos, pad, mask_token_id(tokenizer), max(map(len, tokenizer.get_vocab())),
                   enc("a b") != enc("a") + enc(" b"))


def build_document(
    pieces: Sequence[tuple[list[int], bool]], spec: TokenSpec, cfg: DataConfig
) -> Document:
    """Labelled, block-padded document from tokenized (ids, is_answer) pieces; BadRow if unusable.

    Each answer is labelled up to and including its first stop token (its text holds none:
    `render_segments`); the template glue after it, stop tokens that close the conversation
    included, is not. The document ends at the last answer's stop token, then is filled with it to
    the block end.
    """
    ids: list[int] = []
    labels: list[int] = []
    answers = [i for i, (_, is_answer) in enumerate(pieces) if is_answer]
    if not answers:
        raise BadRow("empty_render", "the chat template rendered no assistant answer")
    last_answer = answers[-1]
    for i, (toks, is_answer) in enumerate(pieces[: last_answer + 1]):
        if not is_answer:
            ids += toks
            labels += [IGNORE_INDEX] * len(toks)
            continue
        stop = next((j for j, t in enumerate(toks) if t in spec.stop_ids), None)
        if i == last_answer:
            if not (toks[:stop] if stop is not None else toks):
                raise BadRow("empty_render", "the answer tokenizes to no token before its end of turn")
            toks = toks[: stop + 1] if stop is not None else toks + [spec.eos_id]
            stop = len(toks) - 1
        ids += toks
        n_labelled = len(toks) if stop is None else stop + 1
        labels += toks[:n_labelled] + [IGNORE_INDEX] * (len(toks) - n_labelled)
    if spec.mask_id is not None and spec.mask_id in ids:
        raise BadRow("mask_token", f"the text contains {MASK_TOKEN}")

    bs = cfg.block_size
    padded = math.ceil(len(ids) / bs) * bs
    if padded <= cfg.seq_len:
        fill = ids[-1]  # the end-of-turn token
        ids += [fill] * (padded - len(ids))
        labels += [fill] * (padded - len(labels))
    elif cfg.overlong == "truncate" and any(t != IGNORE_INDEX for t in labels[1 : cfg.seq_len]):
        ids, labels = ids[: cfg.seq_len], labels[: cfg.seq_len]
    else:
        raise BadRow("too_long", f"{len(ids)} tokens > seq_len {cfg.seq_len} (overlong={cfg.overlong})")
    return Document(ids, labels)


def truncate_chars(cfg: DataConfig, spec: TokenSpec) -> int:
    """Characters of a conversation that `overlong="truncate"` tokenizes at most: twice what seq_len tokens
    can span (at most `max_token_chars` each), so the seq_len tokens it keeps are the whole text's, and
    the few a cut tokenizes otherwise lie far past them. A 50 MB row took minutes a pass, in silence."""
    return 2 * cfg.seq_len * spec.max_token_chars


def cut_segments(segments: list[tuple[str, bool]], max_chars: int) -> list[tuple[str, bool]] | BadRow:
    """The rendered (text, is_answer) segments cut to their first `max_chars` characters; too_long when no
    answer starts within them (the kept tokens would carry no label)."""
    kept, left = [], max_chars
    for text, is_answer in segments:
        if left <= 0:
            break
        kept.append((text[:left], is_answer))
        left -= len(text)
    if not any(is_answer for _, is_answer in kept):
        return BadRow("too_long", f"no answer in the first {max_chars} characters (overlong=truncate)")
    return kept


def encode_conversations(
    tokenizer: "PreTrainedTokenizerBase",
    conversations: Sequence[list[dict[str, str]]],
    spec: TokenSpec,
    cfg: DataConfig,
) -> list[Document | BadRow]:
    """Render and tokenize a batch of conversations (one tokenizer call for all pieces)."""
    rendered: list[list[tuple[str, bool]] | BadRow] = []
    truncate_at = truncate_chars(cfg, spec)
    for messages in conversations:
        try:
            rendered.append(render_segments(tokenizer, messages, spec.stop_texts))
        except BadRow as e:
            rendered.append(e)
        except Exception as e:  # noqa: BLE001 - templates reject conversations with any error (raise_exception)
            rendered.append(BadRow("template_error", f"{type(e).__name__}: {e}"))
        else:  # a row too long for seq_len tokens is skipped untokenized (tokenizing an 18 MB row took 86 s)
            chars = sum(len(text) for text, _ in rendered[-1])
            if cfg.overlong == "skip" and chars > cfg.seq_len * spec.max_token_chars:
                rendered[-1] = BadRow("too_long", f"{chars} characters cannot fit seq_len {cfg.seq_len} "
                                      f"(at most {spec.max_token_chars} a token; overlong=skip)")
            elif cfg.overlong == "truncate" and chars > truncate_at:
                rendered[-1] = cut_segments(rendered[-1], truncate_at)
    texts = [text for r in rendered if not isinstance(r, BadRow) for text, _ in r]
    if spec.prepends_to_pieces:  # each piece also after the one before it, to take its tokens in that context
        texts += [r[j - 1][0] + r[j][0] for r in rendered if not isinstance(r, BadRow) for j in range(1, len(r))]
    token_lists = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    rows = [r if isinstance(r, BadRow) else [next(token_lists) for _ in r] for r in rendered]
    if spec.prepends_to_pieces:
        for i, alone in enumerate(rows):
            if isinstance(alone, BadRow):
                continue
            rows[i] = alone[:1]
            for j in range(1, len(alone)):
                joint = next(token_lists)
                # the piece's tokens after the one before it; alone where a token spans their boundary
                rows[i].append(joint[len(alone[j - 1]) :] if joint[: len(alone[j - 1])] == alone[j - 1] else alone[j])
    out: list[Document | BadRow] = []
    for r, ids in zip(rendered, rows):
        if isinstance(r, BadRow):
            out.append(r)
            continue
        pieces = [(toks, is_answer) for toks, (_, is_answer) in zip(ids, r)]
        try:
            out.append(build_document(pieces, spec, cfg))
        except BadRow as e:
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------------
# Documents -> packed sequences


def pack_documents(docs: Sequence[Document], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing of block-padded documents into rows of `seq_len` tokens.

    Returns int32 arrays `input_ids`, `labels`, `position_ids`, `doc_ids` [N, L] and `num_docs`,
    `num_tokens` [N]. Each document keeps its own positions (from 0) and doc id; the unused tail of
    a row is padding (`pad_id`, label -100) with an id of its own.
    """
    bins: list[list[Document]] = []
    room: list[int] = []
    for doc in sorted(docs, key=lambda d: len(d.input_ids), reverse=True):
        n = len(doc.input_ids)
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([])
            room.append(seq_len)
            j = len(bins) - 1
        bins[j].append(doc)
        room[j] -= n
    N = len(bins)
    ids_NL = np.full((N, seq_len), pad_id, dtype=np.int32)
    labels_NL = np.full((N, seq_len), IGNORE_INDEX, dtype=np.int32)
    pos_NL = np.zeros((N, seq_len), dtype=np.int32)
    docs_NL = np.zeros((N, seq_len), dtype=np.int32)
    for row, members in enumerate(bins):
        start = 0
        for d, doc in enumerate(members):
            end = start + len(doc.input_ids)
            ids_NL[row, start:end] = doc.input_ids
            labels_NL[row, start:end] = doc.labels
            pos_NL[row, start:end] = np.arange(end - start)
            docs_NL[row, start:end] = d
            start = end
        pos_NL[row, start:] = np.arange(seq_len - start)
        docs_NL[row, start:] = len(members)
    return {
        "input_ids": ids_NL,
        "labels": labels_NL,
        "position_ids": pos_NL,
        "doc_ids": docs_NL,
        "num_docs": np.array([len(m) for m in bins], dtype=np.int32),
        "num_tokens": np.array([seq_len - r for r in room], dtype=np.int32),
    }


def process_records(
    rows: Iterable[str | bytes | dict[str, Any]],
    tokenizer: "PreTrainedTokenizerBase",
    cfg: DataConfig,
    spec: TokenSpec | None = None,
) -> dict[str, np.ndarray]:
    """Raw rows (jsonl lines, as text or bytes, or parsed records) -> packed sequences plus `bad_<reason>` count columns.

    The counts sit on the first row; when no row is good, one padding row with `num_docs == 0`
    carries them, so counts are never lost when the output is streamed.
    """
    spec = spec or TokenSpec.from_tokenizer(tokenizer)
    bad: Counter[str] = Counter()
    conversations = []
    for row in rows:
        try:
            record = parse_jsonl_line(row) if isinstance(row, (str, bytes)) else row
            conversations.append(record_to_messages(record, cfg.strip_reasoning))
        except BadRow as e:
            bad[e.reason] += 1
    docs = []
    for result in encode_conversations(tokenizer, conversations, spec, cfg):
        if isinstance(result, BadRow):
            bad[result.reason] += 1
        else:
            docs.append(result)
    out = pack_documents(docs, cfg.seq_len, spec.pad_id)
    if not docs:
        out = pack_documents([Document([], [])], cfg.seq_len, spec.pad_id)  # one padding row
        out["num_docs"][:] = 0
    N = len(out["num_docs"])
    for reason in BAD_REASONS:
        column = np.zeros(N, dtype=np.int64)
        column[0] = bad[reason]
        out[f"bad_{reason}"] = column
    return out


def bad_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
    """Sum of the `bad_<reason>` columns of a batch of packed rows."""
    return {reason: int(batch[f"bad_{reason}"].sum()) for reason in BAD_REASONS}


def summarize_bad_rows(bad: dict[str, int], good_docs: int) -> tuple[str, list[str]]:
    """A one-line summary of skipped rows, and one warning per reason above BAD_ROW_WARN_FRACTION
    of all rows read (`good_docs` + every skipped row)."""
    total = good_docs + sum(bad.values())
    line = f"rows skipped: {sum(bad.values())} of {total} (" + (
        ", ".join(f"{r}={n}" for r, n in bad.items() if n) or "none") + ")"
    warnings = [
        f"{n} of {total} rows ({n / total:.1%}) were skipped as {reason}: check the data (see BAD_REASONS)"
        for reason, n in bad.items() if total and n / total > BAD_ROW_WARN_FRACTION
    ]
    return line, warnings


# ---------------------------------------------------------------------------------------------
# Files and Ray Data


@dataclass
class DataSources:
    jsonl: list[str] = field(default_factory=list)
    parquet: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each file, as listed
    # each parquet file's row groups, uncompressed bytes, from the footer read to check the file
    # (`plan_parquet_splits` plans from them without opening it again)
    row_group_bytes: dict[str, list[int]] = field(default_factory=dict)


def _file_format(path: str) -> Literal["jsonl", "parquet"] | None:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _resolve(path: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """(filesystem, path inside it) of a data path, local or any pyarrow/fsspec URI (`fdllm.storage`)."""
    from fdllm.storage import filesystem

    try:
        return filesystem(path)
    except Exception as e:  # an unknown scheme, a missing fsspec backend, a malformed URI
        raise DataError(f"cannot open data path {path}: {e}") from e


def _hidden(relative: str) -> bool:
    """A file below a data directory that is no data: a component starting with `.` or `_`
    (`.ipynb_checkpoints/`, Spark's `_temporary/` and `_SUCCESS`), as pyarrow datasets skip them."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def check_data_files(paths: Sequence[str]) -> DataSources:
    """Expand files/dirs (local or any pyarrow/fsspec URI) into readable jsonl/parquet files, or raise
    DataError naming the first unusable one. Cheap: reads only file heads and parquet footers.

    A directory's files are read recursively, but not those under a name starting with `.` or `_`
    (`_hidden`). Each file is named by its directory's URI joined with the file's path below it
    (`fdllm.storage.join`), so it keeps the URI's host and query (`hdfs://host:port/...`,
    `s3://b/k?endpoint_override=...`), which the filesystem's own paths lack: the readers open that."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from fdllm.storage import join

    if not paths:
        raise DataError("no data paths given")
    sources = DataSources()
    for path in paths:
        fs, inner = _resolve(path)
        try:
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"data path not found: {path}")
            if info.type == pafs.FileType.Directory:
                root = inner.rstrip("/") + "/"
                infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                visible = [i for i in infos if i.type == pafs.FileType.File and not _hidden(i.path.removeprefix(root))]
                files = {i.path: i.size for i in visible if _file_format(i.path)}
                if others := sorted(i.path.removeprefix(root) for i in visible if not _file_format(i.path)):
                    log.warning("%s: %d file(s) of another type skipped (only .jsonl, .json and .parquet are read): %s%s",
                                path, len(others), ", ".join(others[:5]), ", ..." if len(others) > 5 else "")
                if not files:
                    raise DataError(f"no .jsonl/.json/.parquet files under {path} (names starting with . or _ "
                                    "are skipped)")
                sizes = {(file, join(path, file.removeprefix(root)) if is_uri(path) else file): size
                         for file, size in files.items()}
            else:
                sizes = {(inner, resolve_local(path)): info.size}
            for (file, uri), size in sorted(sizes.items()):
                fmt = _file_format(file)
                if fmt is None:
                    raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")
                sources.sizes[uri] = size
                if fmt == "jsonl":  # contents are checked per line when read (bad lines are counted)
                    with fs.open_input_file(file) as f:
                        if f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                            raise DataError(f"{uri}: a JSON array; give one JSON object per line (jsonl)")
                    sources.jsonl.append(uri)
                else:
                    with fs.open_input_file(file) as f:
                        meta = pq.ParquetFile(f).metadata
                    schema = meta.schema.to_arrow_schema()
                    if "messages" not in schema.names and not {"input", "output"} <= set(schema.names):
                        raise DataError(f"{uri}: parquet columns {sorted(schema.names)} lack `messages` or "
                                        "`input`+`output`")
                    sources.parquet.append(uri)
                    sources.row_group_bytes[uri] = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
        except DataError:
            raise
        except Exception as e:  # permission denied, corrupt parquet footer, network errors...
            raise DataError(f"cannot read data path {path}: {type(e).__name__}: {e}") from e
    if not sources.parquet and not any(sources.sizes.values()):
        raise DataError(f"no data: every file is empty ({', '.join(sources.jsonl)})")
    if not sources.parquet and all(_blank(uri) for uri in sources.jsonl):  # only whitespace: Ray started for nothing
        raise DataError(f"no data: every file holds only whitespace ({', '.join(sources.jsonl)})")
    log.info("data: %d jsonl and %d parquet file(s)", len(sources.jsonl), len(sources.parquet))
    return sources


def _blank(uri: str, limit: int = 1 << 16) -> bool:
    """Whether a jsonl file of at most `limit` bytes holds only whitespace (a larger one is taken to hold data)."""
    fs, inner = _resolve(uri)
    if fs.get_file_info(inner).size > limit:
        return False
    with fs.open_input_file(inner) as f:
        return not f.read().strip()


@dataclass(frozen=True)
class JsonlSplit:
    """Bytes [start, end) of jsonl file number `file_index`: the split owns every line that starts
    in that range, from the first line boundary at or after `start` (a line that straddles `end` is
    read to its end here, and skipped by the next split)."""

    file_index: int
    uri: str
    start: int
    end: int

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


def plan_jsonl_splits(files: Sequence[tuple[str, int]], cfg: DataConfig) -> list[JsonlSplit]:
    """Splits of `cfg.read_split_bytes` of (uri, size) files, in file order."""
    return [JsonlSplit(i, uri, start, min(start + cfg.read_split_bytes, size))
            for i, (uri, size) in enumerate(files) for start in range(0, size, cfg.read_split_bytes)]


def _owned_lines(f: Any, start: int, end: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(file offset, line without its newline) of every line starting in [start, end) of an open
    binary file with `seek`/`read`."""
    pos = 0
    if start > 0:  # skip the line that straddles `start` unless byte start-1 is its newline
        f.seek(start - 1)
        pos = start - 1
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                return
            newline = chunk.find(b"\n")
            if newline >= 0:
                buf, pos = chunk[newline + 1:], pos + newline + 1
                break
            pos += len(chunk)
    else:
        f.seek(0)
        buf = b""
    cursor = 0  # buf[cursor:] starts at file offset `pos`, a line start
    while pos < end:
        newline = buf.find(b"\n", cursor)
        if newline >= 0:
            yield pos, buf[cursor:newline]
            pos += newline + 1 - cursor
            cursor = newline + 1
            continue
        # a line that goes on past the buffer: its chunks are kept apart and each searched once (joining and
        # searching the whole line again per chunk was quadratic: a 256 MiB line took 6.5 s, a GB minutes)
        parts = [buf[cursor:]]
        while (chunk := f.read(chunk_bytes)) and (newline := chunk.find(b"\n")) < 0:
            parts.append(chunk)
        if not chunk:  # the last line of a file without a final newline
            if line := b"".join(parts):
                yield pos, line
            return
        line = b"".join([*parts, chunk[:newline]])
        yield pos, line
        pos += len(line) + 1
        buf, cursor = chunk, newline + 1


def read_jsonl_split(split: JsonlSplit, cfg: DataConfig, chunk_bytes: int = 1 << 22) -> Iterator[dict[str, Any]]:
    """The split's non-blank lines grouped by pack window, in line order: one dict per window with
    `file_index`, `offset` (its first line's byte offset) and `lines` (those lines joined by b"\\n")."""
    from fdllm.storage import filesystem

    fs, inner = filesystem(split.uri)
    window, lines, first = -1, [], 0
    with fs.open_input_file(inner) as f:
        for offset, line in _owned_lines(f, split.start, split.end, chunk_bytes):
            if offset == 0:  # a UTF-8 BOM (some editors save one) opens the file, not a record
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            if offset // cfg.pack_window_bytes != window and lines:
                yield {"file_index": split.file_index, "offset": first, "lines": b"\n".join(lines)}
                lines = []
            if not lines:
                window, first = offset // cfg.pack_window_bytes, offset
            lines.append(line)
    if lines:
        yield {"file_index": split.file_index, "offset": first, "lines": b"\n".join(lines)}


# The columns `record_to_messages` reads: a parquet read takes only these (files carry others, such as
# the Nemotron release's `license` and `generator`)
RECORD_COLUMNS = ("messages", "input", "output", "system_prompt", "reasoning", "category")


@dataclass(frozen=True)
class ParquetSplit:
    """Row groups [first, stop) of parquet file number `file_index` (numbered after the jsonl files)."""

    file_index: int
    uri: str
    first: int
    stop: int
    size_bytes: int  # uncompressed, as the file's footer says


def plan_parquet_splits(files: Sequence[tuple[str, Sequence[int]]], cfg: DataConfig,
                        first_index: int = 0) -> list[ParquetSplit]:
    """Runs of whole row groups of at least `cfg.read_split_bytes` of (uri, row group bytes) files
    (`DataSources.row_group_bytes`; a file's last run may be less), in file order."""
    splits = []
    for i, (uri, groups) in enumerate(files, start=first_index):
        first, size = 0, 0
        for group, group_bytes in enumerate(groups):
            size += group_bytes
            if size >= cfg.read_split_bytes or group == len(groups) - 1:
                splits.append(ParquetSplit(i, uri, first, group + 1, size))
                first, size = group + 1, 0
    return splits


def read_parquet_split(split: ParquetSplit, cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """The split's rows as pack windows, as `read_jsonl_split` gives a jsonl file's: each window holds
    `docs_per_batch` consecutive rows of one row group (fewer at its end), one JSON line per row, with
    `offset` its first row's number in the file. Windows never cross a row group, so the packing is a
    function of the file alone, not of how its row groups are split across read tasks."""
    import pyarrow.parquet as pq

    from fdllm.storage import filesystem

    fs, inner = filesystem(split.uri)
    n = cfg.docs_per_batch
    with fs.open_input_file(inner) as f:
        parquet = pq.ParquetFile(f)
        columns = [c for c in RECORD_COLUMNS if c in parquet.schema_arrow.names]
        offset = sum(parquet.metadata.row_group(g).num_rows for g in range(split.first))
        for group in range(split.first, split.stop):
            lines: list[bytes] = []
            for batch in parquet.iter_batches(batch_size=n, row_groups=[group], columns=columns):
                lines += _parquet_lines(batch)
                while len(lines) >= n:
                    yield {"file_index": split.file_index, "offset": offset, "lines": b"\n".join(lines[:n])}
                    offset, lines = offset + n, lines[n:]
            if lines:
                yield {"file_index": split.file_index, "offset": offset, "lines": b"\n".join(lines)}
                offset += len(lines)


# The line of a parquet row holding a string that is not UTF-8 (parquet readers do not check it): not
# UTF-8 either, so the row is `bad_unicode`, as a jsonl line with such bytes is.
_NOT_UTF8_LINE = b"\xff"


def _parquet_lines(batch: "pyarrow.RecordBatch") -> list[bytes]:
    """One JSON line per row of a parquet batch. A value Python cannot hold (a string that is not
    UTF-8, a timestamp past year 9999) would fail the whole batch's conversion, and with it the read
    task and the run: then the rows are converted one value at a time (`_parquet_row`), so such a
    value costs only its own row."""
    import pyarrow as pa

    try:
        rows = batch.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):  # UnicodeDecodeError is a ValueError
        return [_parquet_row(batch.slice(i, 1)) for i in range(batch.num_rows)]
    return [json.dumps(r, ensure_ascii=False, default=_not_json).encode() for r in rows]


def _parquet_row(row: "pyarrow.RecordBatch") -> bytes:
    """The JSON line of a one-row batch, value by value: `_NOT_UTF8_LINE` if a string is not UTF-8
    (`bad_unicode`), a value Python cannot hold otherwise as `_not_json` has it (`wrong_type` where
    records use it)."""
    import pyarrow as pa

    record = {}
    for name, column in zip(row.schema.names, row.columns):
        try:
            record[name] = column[0].as_py()
        except UnicodeDecodeError:
            return _NOT_UTF8_LINE
        except (ValueError, OverflowError, pa.ArrowException):
            record[name] = _not_json(column[0])
    return json.dumps(record, ensure_ascii=False, default=_not_json).encode()


def _not_json(value: Any) -> dict[str, str]:
    """A parquet value JSON cannot hold (bytes, a timestamp, a decimal) as its row's line has it: an
    object, which no field takes where a string or messages go, so the row is `wrong_type` as it was."""
    return {"not_json": type(value).__name__}


def pack_jsonl_windows(windows: Iterable[bytes], **kwargs: Any) -> dict[str, np.ndarray]:
    """Packed sequences of pack windows (`read_jsonl_split`, `read_parquet_split`): each window's lines
    in groups of `docs_per_batch`, each group packed on its own, outputs in window then group order."""
    cfg: DataConfig = kwargs["cfg"]
    outs = []
    for blob in windows:
        lines = blob.split(b"\n")
        for i in range(0, len(lines), cfg.docs_per_batch):
            outs.append(process_records(lines[i : i + cfg.docs_per_batch], **kwargs))
    return {column: np.concatenate([o[column] for o in outs]) for column in outs[0]}


def _split_datasource(splits: Sequence[JsonlSplit | ParquetSplit], cfg: DataConfig) -> Any:
    """Ray Data source with one read task per split (`plan_jsonl_splits`, `plan_parquet_splits`),
    yielding one row per pack window.

    A window is one row (its records as lines in one binary value), so however Ray Data groups rows
    into blocks and batches, a window is never cut in two. Lines are decoded with their record, so one
    invalid byte costs one row (`bad_unicode`).
    """
    import pyarrow as pa
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    schema = pa.schema([("file_index", pa.int32()), ("offset", pa.int64()), ("lines", pa.large_binary())])

    def read(split: JsonlSplit | ParquetSplit) -> Iterator["pyarrow.Table"]:
        windows = read_jsonl_split(split, cfg) if isinstance(split, JsonlSplit) else read_parquet_split(split, cfg)
        for window in windows:
            yield pa.Table.from_pylist([window], schema=schema)

    class RawSplits(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(s.size_bytes for s in splits)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            # The splits, not Ray's parallelism hint (which grows with the data), define the tasks.
            return [ReadTask(lambda s=s: read(s), BlockMetadata(num_rows=None, size_bytes=s.size_bytes,
                                                                 input_files=[s.uri], exec_stats=None))
                    for s in splits]

    return RawSplits()


def _pack_windows(batch: "pyarrow.Table", row_multiple: int = 1, **kwargs: Any) -> dict[str, np.ndarray]:
    """A block of pack windows packed, then empty rows (`num_docs` 0, no counts) up to a multiple of
    `row_multiple` rows."""
    out = pack_jsonl_windows(batch.column("lines").to_pylist(), **kwargs)
    pad = -len(out["num_docs"]) % row_multiple
    if not pad:
        return out
    empty = process_records([], **kwargs)  # one row: no document, no count
    return {column: np.concatenate([values, np.repeat(empty[column], pad, axis=0)]) for column, values in out.items()}


def build_dataset(
    sources: DataSources, tokenizer: "PreTrainedTokenizerBase", cfg: DataConfig, num_cpus: float = 1.0,
    row_multiple: int = 1,
) -> "ray.data.Dataset":
    """A lazy Ray Dataset of packed sequences (see `pack_documents` for the columns), as many as a
    multiple of `row_multiple` (empty rows make up the count).

    One task of `num_cpus` per split (a jsonl byte range, `plan_jsonl_splits`; a run of parquet row
    groups, `plan_parquet_splits`) reads it window by window (`read_jsonl_split`, `read_parquet_split`)
    and tokenizes and packs each window as it goes; as many run at once as
    the cluster has free CPUs for (Ray Train keeps the trainers' CPUs and GPUs out of the data's
    budget), and a large file is many splits, so it keeps them all busy. A task holds one window and a
    small output block (`OUTPUT_BLOCK_BYTES`) at a time, but its packed rows are ~20x its text, and
    an ingest faster than the trainers runs ahead until Ray Data's object-store budget is full: what
    bounds its memory is that budget (the fine-tune's `--data-memory-mb`; Ray Data's own default is
    half the object store).
    Read in order (`preserve_order`), the rows follow file order, then line order, for any split size.

    `row_multiple` is for Ray Train's split among N workers (`streaming_split(N, equal=True)`), which
    drops as many rows as its total exceeds a multiple of N by, and which rows is not up to us (it cuts
    blocks and requeues their halves): each tokenizing task pads its output with empty rows to a
    multiple of N, so the total divides, nothing is dropped, and every document and count is read.
    The cost is at most N - 1 rows per pack window (1 MiB of text: ~128 rows of 2048 tokens), which
    the trainer's reader skips.
    """
    import ray.data

    # Ray Data's default block (128 MiB) would hold back a task's first packed rows until that much
    # was tokenized: small blocks let the first training batch leave after one window. A dataset
    # keeps the context current at its creation, so the setting is made for that moment only.
    context = ray.data.DataContext.get_current()
    default_block_bytes, context.target_max_block_size = context.target_max_block_size, OUTPUT_BLOCK_BYTES
    try:
        return _build_dataset(sources, tokenizer, cfg, num_cpus, row_multiple)
    finally:
        context.target_max_block_size = default_block_bytes


def _build_dataset(
    sources: DataSources, tokenizer: "PreTrainedTokenizerBase", cfg: DataConfig, num_cpus: float, row_multiple: int
) -> "ray.data.Dataset":
    kwargs = {"tokenizer": tokenizer, "cfg": cfg, "spec": TokenSpec.from_tokenizer(tokenizer), "row_multiple": row_multiple}
    # The same resources and runtime_env as the read: Ray fuses the two, so raw text is never queued in
    # the object store, and a split's task reads only as fast as it tokenizes. batch_size=None (whole
    # blocks): a batch size would stop Ray fusing the map into the read
    return read_raw_records(sources, cfg, num_cpus).map_batches(
        _pack_windows, batch_size=None, batch_format="pyarrow", fn_kwargs=kwargs, num_cpus=num_cpus,
        runtime_env=SINGLE_THREADED)


# Each tokenizing task gets `num_cpus` from Ray: the tokenizer must not fan out over every core
# on its own (its Rust thread pool would oversubscribe them, one pool per task).
SINGLE_THREADED = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}


def read_raw_records(sources: DataSources, cfg: DataConfig, num_cpus: float = 1.0) -> "ray.data.Dataset":
    """The sources' records, unparsed, as a lazy Ray Dataset of pack windows (a `lines` column: jsonl
    lines as read, parquet rows as JSON lines; `read_jsonl_split`, `read_parquet_split`), jsonl files
    first, then parquet, each in file order; `raw_rows` turns a batch into records for
    `process_records`-style consumers (the fine-tune's packing, distillation's decoding)."""
    import ray.data

    splits: list[JsonlSplit | ParquetSplit] = plan_jsonl_splits([(uri, sources.sizes[uri]) for uri in sources.jsonl], cfg)
    jsonl_splits = len(splits)
    splits += plan_parquet_splits([(uri, sources.row_group_bytes[uri]) for uri in sources.parquet], cfg,
                                  first_index=len(sources.jsonl))
    log.info("data: %d jsonl file(s), %.1f MB, in %d read split(s); %d parquet file(s) in %d split(s)", len(sources.jsonl),
             sum(sources.sizes[uri] for uri in sources.jsonl) / 1e6, jsonl_splits, len(sources.parquet),
             len(splits) - jsonl_splits)
    # One block per split: below Ray's parallelism hint (twice the cluster's CPUs), Ray would cut each
    # read's output in pieces, which stops it fusing the tokenizing map into the read.
    return ray.data.read_datasource(_split_datasource(splits, cfg), num_cpus=num_cpus,
                                    override_num_blocks=len(splits), runtime_env=SINGLE_THREADED)


def raw_rows(batch: "pyarrow.Table") -> list[bytes]:
    """The records of a `read_raw_records` batch, one line each (parsed by the consumer, so a bad line
    is one bad row)."""
    return [line for blob in batch.column("lines").to_pylist() for line in blob.split(b"\n")]
