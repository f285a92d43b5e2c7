"""The OpenAI wire format: request models that validate, response builders, and error bodies.

Requests are pydantic models so malformed input fails before it reaches the engine; every error
leaves the server as `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status, as
OpenAI's API does. Size limits that do not depend on the deployment (stop strings) live here; the
per-deployment ones (body bytes, prompt characters) in `serve.app.ServerConfig`.

JSON types are checked as OpenAI's API checks them: integer fields take JSON integers only (not 7.0,
"7" or true), boolean fields true or false only, number fields integers or floats (never strings or
booleans). Hence pydantic's Strict* types on those fields: its lax mode would read "false" as False and
true as 1. Not a model-wide strict mode, which would also refuse what clients rightly send to enum-like
strings and nested objects. Every invalid value is answered as OpenAI answers it: code, param and words (serve.request_errors).
"""

from __future__ import annotations

import codecs
import copy
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from fdllm.config import is_int
from fdllm.engine import GenerationResult, SamplingParams, SequenceLogprobs
from fdllm.engine.params import (
    MAX_DELIMITER_CHARS,
    MAX_DELIMITERS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SEED_RANGE,
)
from serve.request_errors import (
    RequestError,
    empty,
    inline_schema,
    integer_above_max,
    integer_below_min,
    only_with,
    request_error,
    too_long,
)

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256  # a stop string is held back from the stream until it cannot match: keep it short
# Past any vocabulary (int32 ids). The engine refuses ids past its own vocabulary at admission; this bound
# only keeps an id of no tokenizer (10**400 is a JSON integer) from reaching it.
MAX_TOKEN_ID = 2**31 - 1
NO_CAUSAL_LOGPROBS = (
    "log-probabilities need a causal checkpoint: this one's prompt and committed blocks attend block-causally "
    "(bidirectionally inside a block), so no position's logits are a causal prediction. Checkpoints fine-tuned with "
    "the joint objective (prefix_attention: causal) serve them; evaluate this one with generation tasks "
    "(lm-eval's generate_until), not loglikelihood ones")
NO_STREAMED_LOGPROBS = ("logprobs are not available with stream=true: they come from one causal scoring forward "
                        "over the finished completion (diffusion commits tokens by confidence); request them unstreamed")
LOGPROB_FLOOR = -9999.0  # stands for -inf (the mask token's), which JSON cannot carry (vLLM's floor too)
# SamplingParams names whose OpenAI request field is called differently
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}
MAX_CACHE_SALT_CHARS = 1024  # vLLM suggests 43 (256 random bits, base64): room for any such, not a megabyte to hash


def _empty(*kinds: type) -> Callable[[Any], bool]:
    """The test of a value that asks for nothing: null, or an empty (false) value of one of `kinds` (its
    field's JSON types, so a value of the wrong type, `"tools": 0`, is no empty list but refused)."""
    return lambda v: v is None or (type(v) in kinds and not v)


# Request fields (OpenAI's, and vLLM's extensions clients send to OpenAI-compatible servers) that this
# server does not implement, each with the test of a value that asks for nothing (what clients send by
# default). Any other value is refused with a 400 naming the field: served anyway, the answer would
# not be what the client asked for. `response_format` is a declared field (its shape is checked first,
# `ResponseFormat`); the others arrive as sent, in `model_extra`.
NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (lambda v: v is None or v.model_dump() == {"type": "text"},
                        'only {"type": "text"}: no JSON or grammar mode'),
    "tools": (_empty(list), "no tool calling"),
    "functions": (_empty(list), "no function calling"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "no tool calling"),
    "function_call": (lambda v: v in (None, "none", "auto"), "no function calling"),
    "suffix": (_empty(str), "no insertion (suffix) completions"),
    # OpenAI's chat outputs other than text
    "modalities": (lambda v: v in (None, ["text"]), "text output only"),
    "audio": (lambda v: v is None, "text output only"),
    "web_search_options": (lambda v: v is None, "no web search"),
    # vLLM's structured outputs, sampling, output and chat-template options (their defaults ask for nothing)
    **dict.fromkeys(("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"),
                    (_empty(str, list, dict), "no structured outputs")),
    "min_p": (_empty(int, float), "no min_p sampling"),
    "use_beam_search": (_empty(bool), "no beam search"),
    "prompt_logprobs": (lambda v: v is None, "prompt log-probabilities come with a completion's echo and logprobs"),
    "include_stop_str_in_output": (_empty(bool), "stop strings are cut from the output"),
    "skip_special_tokens": (lambda v: v is None or v is True, "special tokens are skipped in the output"),
    "allowed_token_ids": (_empty(list), "no allowed_token_ids (logit_bias bans tokens)"),
    "bad_words": (_empty(list), "no bad_words (logit_bias bans tokens)"),
    "truncate_prompt_tokens": (lambda v: v is None, "prompts are not truncated"),
    "continue_final_message": (_empty(bool), "a chat's answer is a new assistant message"),
    "add_generation_prompt": (lambda v: v is None or v is True, "a chat's answer is a new assistant message"),
}
# A chat message's OpenAI fields this server does not have, as NOT_IMPLEMENTED: what a client replaying an
# answer sends (null, []) passes; any other value is refused with a 400 at the field's path
# (`messages[1].tool_calls`), never dropped on the way to the chat template. A message's `name` and
# `tool_call_id` reach the template, as vLLM gives them (the template decides what it writes of them);
# other fields are logged as ignored, as a request's are.
MESSAGE_NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tool_calls": (_empty(list), "no tool calling"),
    "function_call": (lambda v: v is None, "no function calling"),
    "refusal": (_empty(str), "a refusal is not written into the prompt: send its text as content"),
    "audio": (lambda v: v is None, "text only"),
}


def first_unsupported(table: dict[str, tuple[Callable[[Any], bool], str]],
                      value_of: Callable[[str], Any]) -> tuple[str, str] | None:
    """(field, why) of the first field of `table` (NOT_IMPLEMENTED's shape) whose value, `value_of(field)`,
    asks for something this server does not have."""
    for name, (asks_nothing, hint) in table.items():
        if not asks_nothing(value_of(name)):
            return name, f"{name} is not supported by this server ({hint})"
    return None


class APIError(Exception):
    """An error that becomes an OpenAI-style JSON body with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, err: RequestError) -> APIError:
        """The 400 of an invalid value (serve.request_errors)."""
        return cls(400, err.message, param=err.param, code=err.code)

    @classmethod
    def from_validation(cls, errors: list[dict[str, Any]], model: type[BaseModel] | None = None) -> APIError:
        """A 400 naming the first invalid field, from the error dicts of validating `model` directly (loc
        starts with the field; OpenAI's code, param and words: serve.request_errors) or, without `model`,
        of FastAPI's parsing (loc starts with "body")."""
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return cls(400, f"request body is not valid JSON: {first.get('msg', '')}".rstrip(": "))
        if model is not None:
            return cls.of(request_error(errors, model))
        loc = tuple(first.get("loc", ()))[1:]
        param = str(loc[0]) if loc else None
        message = first.get("msg", "invalid request")
        return cls(400, f"{message} ({param})" if param else message, param=param)


def parse_request(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Validate a raw JSON body as `model`; APIError 400 on any failure (bad JSON or UTF-8, lone
    surrogates, wrong fields)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise APIError.from_validation(exc.errors(include_url=False), model) from None


MAX_REFUSAL_CHARS = 500  # an engine refusal's message at most (it shows the value refused)

# Fields that are not Optional here but are in OpenAI's API: null is their default (completions'
# `echo`, chat's `logprobs`: each request type's own).
NULL_MEANS_DEFAULT = ("temperature", "top_p", "top_k", "n", "stream", "echo", "logprobs")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False  # a last chunk with no choices carries the request's usage (OpenAI's)


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`, checked as OpenAI checks it: an object (invalid_type), with a `type`
    (missing_required_parameter) among OpenAI's (invalid_value, "Supported values are: ..."). A typo
    is then not answered as a format this server lacks; of the valid types only "text" is served
    (NOT_IMPLEMENTED refuses the others with unsupported_value)."""

    model_config = ConfigDict(extra="allow")  # json_schema's own fields: kept, so a "text" with them is refused

    type: Literal["text", "json_object", "json_schema"]


# Token ids a request sends (stop_token_ids, delimiter_token_ids): >= 0 and at most MAX_STOP_TOKEN_IDS of them
# (fdllm.SamplingParams' checks), <= MAX_TOKEN_ID; refused here in OpenAI's words at the id's own path
# (`stop_token_ids[2]`), where SamplingParams' refusal had no code and named the whole list
_TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]], Field(max_length=MAX_STOP_TOKEN_IDS)]


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names, plus fdllm's `threshold`, `mode`
    and selection policy fields)."""

    # "allow": unknown fields land in `model_extra`, where `unsupported` finds those it must refuse
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1, le=MAX_TOP_K)  # extension, as vLLM: 0 or -1 = off
    n: StrictInt = Field(default=1, ge=1, le=128)  # choices per prompt (OpenAI's bound)
    stop: str | list[str] | None = None
    # fdllm.SamplingParams' range (torch.Generator's), checked here so that it is OpenAI's range error
    seed: StrictInt | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1] - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    threshold: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)  # fdllm: per-request confidence threshold
    # fdllm: "ar" decodes one token per forward; "speculative" drafts by diffusion, verifies causally (= AR output);
    # None: the server's default (ServerConfig.default_mode: diffusion for a block-diffusion checkpoint)
    mode: Literal["diffusion", "ar", "speculative"] | None = None
    # fdllm selection policy (fdllm.SamplingParams, docs/method.md §5): "threshold" (with `threshold`) or
    # "entropy_budget" (with `entropy_budget`, gamma in nats); an adaptive sub-block boundary at a
    # delimiter predicted with confidence above `delimiter_threshold` (`delimiters` as text: default
    # newline, plus the end tokens; `delimiter_token_ids` as ids)
    selection: Literal["threshold", "entropy_budget"] = "threshold"
    entropy_budget: StrictFloat | None = Field(default=None, ge=0.0)
    delimiter_threshold: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)
    delimiters: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_DELIMITER_CHARS)]],
                          Field(max_length=MAX_DELIMITERS)] | None = None
    delimiter_token_ids: _TokenIds | None = None
    # fdllm: diffusion mode runs each block's first step in the forward that opens it (one forward fewer
    # per block; outputs may differ from the plain schedule: fdllm.SamplingParams.block_lookahead).
    # None: the server's default (ServerConfig.block_lookahead, for diffusion-mode requests)
    block_lookahead: StrictBool | None = None
    # OpenAI's: token id (as a JSON key string) -> bias in [-100, 100], added to that token's logit;
    # penalties in [-2, 2] on the tokens generated so far (fdllm.SamplingParams); null: 0
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's (and HF's); null: 1 (off)
    repetition_penalty: StrictFloat | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: StrictInt | None = Field(default=None, ge=0)  # vLLM's: no stop token before this many; null: 0
    # vLLM's: token ids that end the request besides the tokenizer's EOS / end-of-turn tokens, and
    # `ignore_eos` (only these, `stop` and the token limit end it)
    stop_token_ids: _TokenIds | None = None
    ignore_eos: StrictBool | None = None
    # vLLM's: the request shares prefix-cache blocks only with requests of the same salt (fdllm.SamplingParams)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    response_format: ResponseFormat | None = None  # OpenAI's; only {"type": "text"} is served (NOT_IMPLEMENTED)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """The official client sends null for a parameter passed as None (its types are Optional), and
        OpenAI reads it as the default, as vLLM does: dropped here, the field is unset, so the model's
        own default (`model_defaults`) applies to it as to a field not sent."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULL_MEANS_DEFAULT)}
        return data

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise only_with("stream_options", "stream")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids as strings (OpenAI's errors for those that are not); at most the engine's
        MAX_LOGIT_BIAS_TOKENS of them."""
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS_TOKENS:
            raise RequestError("logit_bias", f"Invalid 'logit_bias': too many token ids. Expected at most "
                               f"{MAX_LOGIT_BIAS_TOKENS}, but got {len(v)} instead.")
        for key in v:
            token = key.strip()
            if not (token.isascii() and token.isdigit()):
                raise invalid_logit_bias_key(key, "You should only be submitting non-negative integers.")
            if len(token.lstrip("0")) > len(str(MAX_TOKEN_ID)) or int(token) > MAX_TOKEN_ID:  # no int() of 10**5000
                raise invalid_logit_bias_key(key, f"Maximum value is {MAX_TOKEN_ID}.")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise too_long("stop", "array", MAX_STOP_SEQUENCES, len(stops))
        for i, stop in enumerate(stops):
            param = "stop" if isinstance(v, str) else f"stop[{i}]"
            if not stop:
                raise empty(param, "string")
            if len(stop) > MAX_STOP_CHARS:
                raise too_long(param, "string", MAX_STOP_CHARS, len(stop))
        return stops

    def sampling_params(self, default_max_tokens: int, default_mode: str = "diffusion",
                        default_block_lookahead: bool = False, model_defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The engine's SamplingParams; APIError 400 naming the field when a value is out of range.
        `default_mode` for requests that give no `mode`; `default_block_lookahead` for diffusion-mode
        requests that do not set `block_lookahead`; `model_defaults` (`generation_defaults`) for the
        sampling fields the request does not set."""
        refused = self.unsupported()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_value")
        given = self.max_tokens_given()
        self.check_min_tokens(default_max_tokens if given is None else given)
        unset = {k: v for k, v in (model_defaults or {}).items() if k not in self.model_fields_set or getattr(self, k) is None}
        request = self.model_copy(update=unset) if unset else self  # as if it had sent the model's defaults
        try:
            return request._sampling_params(default_max_tokens, self.mode or default_mode, default_block_lookahead)
        except ValueError as exc:
            raise self.engine_refusal(exc) from None

    def check_logit_bias(self, vocab_size: int) -> None:
        """APIError 400 in OpenAI's words when a logit_bias key is past the model's vocabulary (the engine's
        own refusal names the field, not the key)."""
        for key in self.logit_bias or ():
            if int(key) >= vocab_size:
                raise APIError.of(invalid_logit_bias_key(key, f"Maximum value is {vocab_size - 1}."))

    def check_min_tokens(self, max_new_tokens: int) -> None:
        """APIError 400 (OpenAI's integer_above_max_value) when min_tokens passes the tokens the request may
        generate, `max_new_tokens` (its max_tokens, else the server's grant): a bound another field sets, so
        the schema cannot hold it, and the engine's own refusal has no code."""
        if self.min_tokens is not None and self.min_tokens > max_new_tokens:
            raise APIError.of(integer_above_max("min_tokens", max_new_tokens, self.min_tokens))

    def engine_refusal(self, exc: ValueError) -> APIError:
        """The 400 of the engine refusing this request: fdllm.SamplingParams, or the engine at admission
        (token ids past its vocabulary, text delimiters no token holds, the mask token in a diffusion
        prompt), whose messages start with the field's name. That field is the param when this request
        has it (max_new_tokens: max_tokens; a chat's prompt: messages); a refusal naming none keeps its
        message, which says what is wrong, with no param, and no code either way (no OpenAI code fits
        what only the engine checks)."""
        message = str(exc)
        field = message.split(" ", 1)[0].removesuffix(":")
        field = _PARAM_NAMES.get(field, field)
        if field == "prompt" and "messages" in type(self).model_fields:  # a chat's prompt is its messages
            field = "messages"
        if len(message) > MAX_REFUSAL_CHARS:  # the engine's messages show the value: a body's megabytes, maybe
            message = f"{message[:MAX_REFUSAL_CHARS]}... ({len(message)} characters)"
        return APIError(400, message, param=field if field in type(self).model_fields else None)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of a requested feature this server does not have: refused with a 400, never
        silently ignored (a client would read a different answer than it asked for)."""
        if self.stream and self.logprob_count() is not None:
            return "logprobs", NO_STREAMED_LOGPROBS
        return first_unsupported(NOT_IMPLEMENTED, lambda name: getattr(self, name) if name in type(self).model_fields
                                 else (self.model_extra or {}).get(name))

    def ignored_fields(self) -> list[str]:
        """Fields the request sent that mean nothing here (not OpenAI's or fdllm's): the server logs
        them, as vLLM does, rather than refuse a client that sends extras to every backend."""
        return sorted(set(self.model_extra or {}) - set(NOT_IMPLEMENTED))

    def max_tokens_given(self) -> int | None:
        """The request's bound on generated tokens (max_completion_tokens, OpenAI's newer name, first)."""
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """How many most likely alternatives to return per token when log-probabilities are asked for, else None."""
        return None

    @property
    def scores_only(self) -> bool:
        """Whether the request asks for its prompt's scores alone, nothing decoded (only completions can)."""
        return False

    def _sampling_params(self, default_max_tokens: int, mode: str, default_block_lookahead: bool) -> SamplingParams:
        lookahead = self.block_lookahead
        if lookahead is None:
            lookahead = default_block_lookahead and mode == "diffusion"
        return SamplingParams(
            max_new_tokens=self.max_tokens_given() or default_max_tokens,
            # OpenAI takes any temperature in [0, 2]; the engine samples from 0.01 up (below, dividing by
            # it overflows fp32), and one under that samples at 0.01, as vLLM does: within a hair of greedy
            temperature=max(self.temperature, MIN_TEMPERATURE) if self.temperature else 0.0,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=tuple(self.stop or ()),
            threshold=self.threshold,
            mode=mode,
            selection=self.selection,
            entropy_budget=self.entropy_budget,
            delimiter_threshold=self.delimiter_threshold,
            delimiters=None if self.delimiters is None else tuple(self.delimiters),
            delimiter_token_ids=tuple(self.delimiter_token_ids or ()),
            block_lookahead=lookahead,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            min_tokens=self.min_tokens or 0,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            cache_salt=self.cache_salt,
        )


def invalid_logit_bias_key(key: str, why: str) -> RequestError:
    """OpenAI's error for a logit_bias key that is no token id (its code is null); a long key is shortened."""
    shown = key if len(key) <= 32 else f"{key[:32]}... ({len(key)} characters)"
    return RequestError("logit_bias", f"Invalid key in 'logit_bias': {shown}. {why}")


# What a client may send as a completion's prompt (the OpenAPI docs show this, not the list it is read as)
_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "integer"}},
    {"type": "array", "items": {"type": "string"}}, {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
]}


class CompletionRequest(_SamplingFields):
    # OpenAI's forms: text, token ids, or a batch of either (lm-evaluation-harness sends token-id
    # batches); read as the list of prompts, each answered by n choices (choice i * n + j: prompt i)
    prompt: Annotated[list[str] | list[list[int]], WithJsonSchema(_PROMPT_SCHEMA)]
    echo: StrictBool = False  # the response's text (and logprobs) start with the prompt's
    # 0 with echo: the legacy completions API's scoring request (the prompt and its logprobs, nothing generated)
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    best_of: StrictInt | None = Field(default=None, ge=1)  # only as many as n: no server-side ranking
    # vLLM's: false tokenizes text prompts without the tokenizer's special tokens (fdllm.tokenizer.encode_prompt)
    add_special_tokens: StrictBool = True

    @model_validator(mode="after")
    def _no_tokens_only_to_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise integer_below_min("max_tokens", 1, 0)  # without echo it asks for nothing at all
        return self

    @property
    def scores_only(self) -> bool:
        """Echo with max_tokens 0: the prompt (with its logprobs when asked), nothing decoded."""
        return self.max_tokens == 0

    def logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by this server (sample n choices instead)"
        return super().unsupported()

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> list[str] | list[list[int]]:
        """The prompts, with one clear message per wrong shape of array (the union's own first complaint,
        "Input should be a valid string", misleads a client that sent token ids). Neither a string nor
        an array: left to the union, whose errors say so as OpenAI does (serve.request_errors). An empty
        prompt is OpenAI's empty string or array error at its path (`prompt`, `prompt[1]`)."""
        single = isinstance(v, str) or _token_ids(v)
        if single:
            v = [v]
        elif not isinstance(v, list):
            return v
        elif not v:
            raise empty("prompt", "array")
        elif not (all(isinstance(x, str) for x in v) or all(map(_token_ids, v))):
            raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of either (one kind)")
        for i, prompt in enumerate(v):
            if not prompt:
                param = "prompt" if single else f"prompt[{i}]"
                raise empty(param, "string" if isinstance(prompt, str) else "array")
        return v

    @property
    def num_choices(self) -> int:
        return len(self.prompt) * self.n


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


class ChatMessage(BaseModel):
    # "allow": other fields land in `model_extra`, logged as ignored (MESSAGE_NOT_IMPLEMENTED's refused before)
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]
    name: str | None = None  # OpenAI's participant name: the template's to write or not
    tool_call_id: str | None = None  # a tool message's call: the template's to write or not

    def template_message(self) -> dict[str, str]:
        """The message as the chat template takes it (OpenAI's "developer" is the templates' "system")."""
        given = {"name": self.name, "tool_call_id": self.tool_call_id}
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()} | {k: v for k, v in given.items() if v is not None}

    def chars(self) -> int:
        """Characters of text the template may write from this message (max_prompt_chars counts them)."""
        texts = [self.content] if isinstance(self.content, str) else [str(p.get("text", "")) for p in self.content]
        return sum(len(t) for t in (*texts, self.name or "", self.tool_call_id or ""))

    def ignored_fields(self) -> list[str]:
        return sorted(set(self.model_extra or {}) - set(MESSAGE_NOT_IMPLEMENTED))

    def text(self) -> str:
        """The content's text: its text parts joined (`_text_parts` refused any other part at parse time)."""
        return self.content if isinstance(self.content, str) else "".join(part["text"] for part in self.content)


@functools.cache
def _rendering_arguments() -> frozenset[str]:
    """apply_chat_template's own arguments (`tokenize`, `add_generation_prompt`, ...), read once, and the
    template variables it sets from them."""
    import inspect

    from transformers import PreTrainedTokenizerBase

    own = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
    return own | {"messages", "tools", "documents"}  # the variables rendering itself gives the template


def _template_variables(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """vLLM's `chat_template_kwargs`: variables the chat template reads (Qwen3's `enable_thinking`), never
    one of the rendering's own arguments, which would change what rendering returns rather than what
    the template writes."""
    if clash := sorted(set(v or ()) & _rendering_arguments()):
        raise RequestError("chat_template_kwargs", f"Invalid 'chat_template_kwargs': {', '.join(map(repr, clash))} "
                           "is set by the template's rendering (its arguments, and the messages, tools and documents "
                           "it passes), not a variable a request may give.")
    return v


# Variables for the chat template (messages only).
TemplateVariables = Annotated[dict[str, Any] | None, AfterValidator(_template_variables)]


def _supported_messages(messages: Any) -> Any:
    """OpenAI's 400 at the field's path for a message field asking for what this server does not have
    (MESSAGE_NOT_IMPLEMENTED), before the messages are validated: an assistant's tool calls come with
    null content, which would be refused first as a content of the wrong type."""
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        refused = first_unsupported(MESSAGE_NOT_IMPLEMENTED, message.get) if isinstance(message, dict) else None
        if refused is not None:
            raise RequestError(f"messages[{i}].{refused[0]}", refused[1], "unsupported_value")
    return messages


def _text_parts(messages: Any) -> Any:
    """OpenAI's 400 at the part's path (`messages[1].content[0].type`) for content this server cannot take:
    a part that is not text, a text part without its text. Checked when the request is parsed, where the
    message's index is known (the template's rendering, later, knew neither which message nor which part).
    An empty array of parts is an empty message, as vLLM takes it (clients replaying a history send `[]`
    for an assistant turn that wrote nothing)."""
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        parts = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(parts if isinstance(parts, list) else ()):  # a string or another type: pydantic's
            at = f"messages[{i}].content[{j}]"
            if isinstance(part, dict) and part.get("type") != "text":
                raise RequestError(f"{at}.type", f"only text content parts are supported, got a part of type "
                                   f"{part.get('type')!r}", "unsupported_value")
            if isinstance(part, dict) and not isinstance(part.get("text"), str):
                raise RequestError(f"{at}.text", "a text content part needs its 'text', a string", "invalid_type")
    return messages


Messages = Annotated[list[ChatMessage], BeforeValidator(_supported_messages), BeforeValidator(_text_parts)]


class ChatCompletionRequest(_SamplingFields):
    messages: Messages = Field(min_length=1)
    chat_template_kwargs: TemplateVariables = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise only_with("top_logprobs", "logprobs")
        return v

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def num_choices(self) -> int:
        return self.n

    def ignored_fields(self) -> list[str]:
        return super().ignored_fields() + [f"messages[{i}].{name}" for i, m in enumerate(self.messages)
                                           for name in m.ignored_fields()]

    def message_dicts(self) -> list[dict[str, str]]:
        return message_dicts(self.messages)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as the chat template takes it."""
    return [m.template_message() for m in messages]


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` body: a prompt, or chat messages as the chat template renders them (clients
    such as lm-evaluation-harness count and truncate prompts with the server's own tokenizer)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: Messages | None = Field(default=None, min_length=1)
    add_special_tokens: StrictBool = True  # prompts only (a chat template writes its own)
    add_generation_prompt: StrictBool = True  # messages only
    chat_template_kwargs: TemplateVariables = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        return message_dicts(self.messages or [])


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize` body: token ids back to text (special tokens included: the inverse of `/tokenize`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body the route parses itself (definitions inlined; a copy:
    FastAPI merges it into its own document)."""
    schema = copy.deepcopy(inline_schema(model))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def prompt_chars(body: CompletionRequest | ChatCompletionRequest | TokenizeRequest) -> int:
    """Characters of text the request asks to tokenize (token-id prompts count nothing)."""
    messages = getattr(body, "messages", None)
    if messages:  # and the template variables, which a template may write (a client's `bos_token` replaces the tokenizer's)
        variables = getattr(body, "chat_template_kwargs", None)
        return sum(m.chars() for m in messages) + (len(json.dumps(variables)) if variables else 0)
    prompts = body.prompt if isinstance(body, CompletionRequest) else [body.prompt]
    return sum(len(p) for p in prompts if isinstance(p, str))


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


def error_event(err: APIError) -> str:
    """The server-sent event that ends a stream which failed after it started (then `[DONE]`)."""
    return sse(err.body())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ResponseHead:
    """What a response, or every chunk of a stream, repeats (OpenAI's `id`, `created`, `model`):
    `created` is when the request was answered, one value for all of a stream's chunks."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def fields(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(results: list[GenerationResult], n: int = 1) -> dict[str, Any]:
    """A request's token counts: each prompt once (results i * n .. i * n + n - 1 share prompt i),
    every choice's completion; of the prompt tokens, those served from the prefix cache (OpenAI's
    `prompt_tokens_details.cached_tokens`), per prompt the most any of its choices took from it (the
    first choice usually prefills what the others then share)."""
    per_prompt = [prompt_usage(results[i : i + n]) for i in range(0, len(results), n)]
    prompt, cached = sum(p for p, _ in per_prompt), sum(c for _, c in per_prompt)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def prompt_usage(choices: list[GenerationResult]) -> tuple[int, int]:
    """One prompt's (prompt tokens, cached prompt tokens) over the choices that answer it: the prompt once,
    and the most any choice took from the prefix cache (the first usually prefills what the others share)."""
    return len(choices[0].prompt_token_ids), max(r.num_cached_tokens for r in choices)


def fdllm_stats(results: list[GenerationResult]) -> dict[str, float | int | None]:
    """fdllm's extension block: how parallel the decoding was, over the request's choices."""
    forwards, tokens = sum(r.num_forwards for r in results), sum(len(r.token_ids) for r in results)
    return {
        "num_forwards": forwards,
        "tokens_per_forward": round(tokens / forwards, 4) if forwards else 0.0,
        "time_to_first_token_s": min((r.time_to_first_token_s for r in results if r.time_to_first_token_s is not None),
                                     default=None),
        "num_drafted": sum(r.num_drafted for r in results),  # speculative mode; 0 otherwise
        "num_accepted": sum(r.num_accepted for r in results),
    }


# The sampling fields a checkpoint's generation_config.json gives defaults for, as vLLM's
# `--generation-config auto` reads them (Qwen2.5 Instruct: temperature 0.7, top_p 0.8, top_k 20,
# repetition_penalty 1.05): a request that does not set one gets the model's value, not OpenAI's.
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def generation_defaults(generation_config: dict[str, Any] | None) -> dict[str, Any]:
    """The sampling defaults `generation_config` (a checkpoint's generation_config.json) recommends, each
    checked as a request's value would be; one the API would refuse is left out, with a warning."""
    defaults = {}
    for name in GENERATION_DEFAULT_FIELDS:
        value = (generation_config or {}).get(name)
        if value is None:
            continue
        if name != "top_k" and is_int(value):  # JSON's 1 for 1.0: the fields are strict floats
            value = float(value)
        try:
            _SamplingFields.model_validate({"model": "", name: value})
        except ValidationError:
            log.warning("generation_config.json's %s=%r is outside the API's range: not used as a default", name, value)
            continue
        defaults[name] = value
    return defaults


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j's parameters among a prompt's n: choice 0 keeps the request's seed, choice j a seed
    derived from (seed, j), so a seeded request's choices are reproducible and differ (no seed: each
    choice draws its own)."""
    if j == 0 or params.seed is None:
        return params
    digest = hashlib.blake2b(f"{params.seed}:{j}".encode(), digest_size=8).digest()
    return replace(params, seed=int.from_bytes(digest, "big") >> 1)


@dataclass(frozen=True)
class Choice:
    """One answer of a request: its engine result, its text (with echo, the prompt's first) and logprobs."""

    result: GenerationResult
    text: str
    logprobs: dict[str, Any] | None = None


def completion_response(head: ResponseHead, choices: list[Choice], n: int = 1) -> dict[str, Any]:
    results = [c.result for c in choices]
    return head.fields("text_completion") | {
        "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.result.finish_reason}
                    for i, c in enumerate(choices)],
        "usage": usage(results, n), "fdllm": fdllm_stats(results),
    }


def chat_response(head: ResponseHead, choices: list[Choice]) -> dict[str, Any]:
    results = [c.result for c in choices]
    return head.fields("chat.completion") | {
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": c.logprobs,
                     "finish_reason": c.result.finish_reason} for i, c in enumerate(choices)],
        "usage": usage(results, len(results)), "fdllm": fdllm_stats(results),
    }


# token ids -> each one's text decoded alone and the bytes it stands for (fdllm.tokenizer.token_pieces)
TokenPieces = Callable[[list[int]], list[tuple[str, bytes]]]


def _scored_tokens(scored: SequenceLogprobs, first: int, token_pieces: TokenPieces):
    """From position `first` on: per token its (text, bytes), log-probability (None at position 0) and
    top alternatives as ((text, bytes), log-probability); -inf floored to LOGPROB_FLOOR."""
    ids, tops = scored.token_ids[first:], scored.top_logprobs[first:]
    alternatives = sorted({t for top in tops for t, _ in top} - set(ids))
    piece = dict(zip(ids + alternatives, token_pieces(ids + alternatives)))
    floor = lambda lp: None if lp is None else max(lp, LOGPROB_FLOOR)  # noqa: E731
    return [(piece[t], floor(lp), [(piece[a], floor(alp)) for a, alp in top])
            for t, lp, top in zip(ids, scored.logprobs[first:], tops)]


def completion_logprobs(scored: SequenceLogprobs, first: int, token_pieces: TokenPieces) -> dict[str, Any]:
    """A completion choice's `logprobs` (OpenAI's legacy shape) for the tokens from position `first`
    (0 with echo: the prompt's too). `top_logprobs` maps token text to log-probability, the chosen
    token included, as OpenAI and vLLM return it (so up to logprobs + 1 entries); at position 0,
    which nothing predicts, both are None. `text_offset`: where each token starts in the text, from
    the tokens' bytes (a token that ends inside a character starts where that character does; the
    texts of such tokens, U+FFFD alone, do not add up to the text)."""
    rows = _scored_tokens(scored, first, token_pieces)
    offsets, at, utf8 = [], 0, codecs.getincrementaldecoder("utf-8")("replace")
    for (_, raw), _, _ in rows:
        offsets.append(at)
        at += len(utf8.decode(raw))
    return {
        "tokens": [text for (text, _), _, _ in rows],
        "token_logprobs": [lp for _, lp, _ in rows],
        "top_logprobs": [None if lp is None else _by_text([(t, alp) for (t, _), alp in top] + [(text, lp)])
                         for (text, _), lp, top in rows],
        "text_offset": offsets,
    }


def _by_text(pairs: list[tuple[str, float]]) -> dict[str, float]:
    """{text: log-probability}, most likely first; of tokens that decode to the same text (bytes of a
    split character, ids past the tokenizer's vocabulary) the likeliest's value stays."""
    by_text: dict[str, float] = {}
    for text, lp in sorted(pairs, key=lambda pair: -pair[1]):
        by_text.setdefault(text, lp)
    return by_text


def chat_logprobs(scored: SequenceLogprobs, first: int, token_pieces: TokenPieces) -> dict[str, Any]:
    """A chat choice's `logprobs` ({"content": [...]}, OpenAI's shape) for the tokens from position `first`
    (the completion's); `bytes` are the bytes each token stands for, which join into the text where a
    character spans tokens (OpenAI's purpose for them)."""

    def entry(piece: tuple[str, bytes], lp: float) -> dict[str, Any]:
        return {"token": piece[0], "logprob": lp, "bytes": list(piece[1])}

    return {"content": [entry(piece, lp) | {"top_logprobs": [entry(*alt) for alt in top]}
                        for piece, lp, top in _scored_tokens(scored, first, token_pieces)],
            "refusal": None}


def completion_chunk(head: ResponseHead, text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
    return head.fields("text_completion") | {
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(head: ResponseHead, delta: dict[str, str], finish_reason: str | None, index: int = 0) -> dict[str, Any]:
    return head.fields("chat.completion.chunk") | {
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(head: ResponseHead, chat: bool, results: list[GenerationResult], n: int) -> dict[str, Any]:
    """A stream's last chunk with `stream_options.include_usage`: no choices, the request's usage."""
    return head.fields("chat.completion.chunk" if chat else "text_completion") | {"choices": [], "usage": usage(results, n)}
