"""A completion's prompt in each of OpenAI's forms, /tokenize's one input, and the OpenAI features the
server refuses rather than ignores, the log-probability fields and the shapes their answers take: what
parses, and one clear 400 per wrong request, checked without a server (tests/integration/test_serve.py
sends them over HTTP)."""

from __future__ import annotations

import json
from functools import partial

import pytest

pytest.importorskip("pydantic")

from fdllm.engine import GenerationResult, SamplingParams, SequenceLogprobs  # noqa: E402
from fdllm.tokenizer import load_tokenizer, token_pieces  # noqa: E402
from pipelines.world import DEFAULT_MODEL_DIR  # noqa: E402
from serve.protocol import (  # noqa: E402
    LOGPROB_FLOOR,
    NOT_IMPLEMENTED,
    APIError,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    ResponseHead,
    TokenizeRequest,
    chat_logprobs,
    chat_response,
    choice_params,
    completion_logprobs,
    completion_response,
    fdllm_stats,
    generation_defaults,
    parse_request,
    prompt_chars,
    usage,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL_DIR)  # byte-level BPE, as Qwen2's


def prompt_of(prompt):
    return parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode()).prompt


@pytest.mark.parametrize("sent,prompts", [
    ("héllo ✓", ["héllo ✓"]), (["héllo"], ["héllo"]), ([5, 6], [[5, 6]]), ([[5, 6]], [[5, 6]]), ([10**12], [[10**12]]),
    (["a", "b c"], ["a", "b c"]), ([[5], [6, 7]], [[5], [6, 7]]),
])
def test_prompts_in_every_openai_form(sent, prompts):
    assert prompt_of(sent) == prompts


def test_the_openapi_docs_show_every_prompt_form():
    """The docs show what a client may send, not the list of prompts it is read as."""
    forms = CompletionRequest.model_json_schema()["properties"]["prompt"]["anyOf"]
    assert {"type": "string"} in forms and {"type": "array", "items": {"type": "integer"}} in forms


@pytest.mark.parametrize("sent,message", [
    ([1, "a"], "a string, a list of token ids"), ([True], "a string, a list of token ids"),
    ([1.5], "a string, a list of token ids"), ([["a"]], "a string, a list of token ids"),
    (["a", [5]], "one kind"), ([[5], [True]], "one kind"),
])
def test_wrong_prompt_shapes_are_one_clear_400(sent, message):
    with pytest.raises(APIError) as err:
        prompt_of(sent)
    assert err.value.status == 400 and err.value.param == "prompt" and message in err.value.message


def test_tokenize_takes_exactly_one_of_prompt_and_messages():
    user = [{"role": "user", "content": "x"}]
    assert parse_request(TokenizeRequest, json.dumps({"prompt": "x"}).encode()).prompt == "x"
    assert parse_request(TokenizeRequest, json.dumps({"messages": user}).encode()).message_dicts() == user
    for body in ({}, {"prompt": "x", "messages": user}, {"messages": []}):
        with pytest.raises(APIError) as err:
            parse_request(TokenizeRequest, json.dumps(body).encode())
        assert err.value.status == 400


def _request(model, /, **fields):
    base = {"model": "m", "prompt": "x"} if model is CompletionRequest else {"model": "m", "messages": [
        {"role": "user", "content": "x"}]}
    return parse_request(model, json.dumps(base | fields).encode())


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_null_is_the_default_as_the_openai_client_sends_it(model):
    """The official client sends null for a parameter passed as None (its types are Optional)."""
    fields = ["temperature", "top_p", "top_k", "n", "stream", "logprobs", "stream_options", "stop", "seed"]
    nulls = _request(model, **dict.fromkeys(fields + (["echo"] if model is CompletionRequest else [])))
    assert nulls.sampling_params(16) == _request(model).sampling_params(16)
    assert (nulls.n, nulls.stream, nulls.logprob_count(), nulls.ignored_fields()) == (1, False, None, [])


QWEN25_GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                            "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_the_models_generation_config_gives_the_defaults_of_what_a_request_does_not_set(model, caplog):
    """As vLLM's --generation-config auto: Qwen2.5 Instruct's recommended sampling for a request that sends
    none (or null, the official client's None); what a request sets, 0 included, is its own."""
    defaults = generation_defaults(QWEN25_GENERATION_CONFIG)
    assert defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    for request in (_request(model), _request(model, temperature=None, top_p=None, top_k=None, repetition_penalty=None)):
        got = request.sampling_params(16, model_defaults=defaults)
        assert (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    got = _request(model, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0).sampling_params(16, model_defaults=defaults)
    assert (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    assert _request(model).sampling_params(16) == _request(model).sampling_params(16, model_defaults={})
    # what the API would refuse is no default; JSON's 1 is a float's 1.0
    assert generation_defaults({"temperature": 3.0, "top_p": 0, "top_k": -5, "repetition_penalty": 1}) == {"repetition_penalty": 1.0}
    assert "temperature=3.0 is outside the API's range" in caplog.text
    assert generation_defaults(None) == {} == generation_defaults({"do_sample": False})


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_need_stream(model, stream):
    """As OpenAI and vLLM: stream_options on an unstreamed request is a 400, not silently dropped."""
    with pytest.raises(APIError) as err:
        _request(model, stream=stream, stream_options={"include_usage": True})
    assert (err.value.status, err.value.param) == (400, "stream_options")
    assert _request(model, stream=True, stream_options={"include_usage": True}).stream_options.include_usage


@pytest.mark.parametrize("model,fields,param", [
    (CompletionRequest, {"logprobs": 1, "stream": True}, "logprobs"),
    (CompletionRequest, {"logprobs": 0, "stream": True}, "logprobs"),
    (ChatCompletionRequest, {"logprobs": True, "stream": True}, "logprobs"),
])
def test_features_the_server_lacks_are_refused_not_ignored(model, fields, param):
    """What a response could not hold is a 400 saying why, not an answer without it."""
    with pytest.raises(APIError) as err:
        _request(model, **fields).sampling_params(16)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, "unsupported_value")


ASKS_FOR_SOMETHING = [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}), ("functions", [{"name": "f"}]),
    ("function_call", {"name": "f"}), ("suffix", "tail"),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}), ("web_search_options", {}),
    ("guided_choice", ["yes", "no"]), ("guided_json", {"type": "object"}), ("guided_regex", "[0-9]+"),
    ("guided_grammar", "root ::= 'a'"), ("structured_outputs", {"choice": ["yes", "no"]}), ("min_p", 0.1),
    ("use_beam_search", True), ("prompt_logprobs", 1), ("include_stop_str_in_output", True),
    ("skip_special_tokens", False), ("allowed_token_ids", [5]), ("bad_words", ["x"]), ("truncate_prompt_tokens", 8),
    ("continue_final_message", True), ("add_generation_prompt", False),
]
ASKS_FOR_NOTHING = [
    ("presence_penalty", 0), ("frequency_penalty", 0.0), ("presence_penalty", None), ("repetition_penalty", 1.0),
    ("logit_bias", {}), ("logit_bias", None), ("response_format", {"type": "text"}), ("tools", []),
    ("tool_choice", "none"), ("tool_choice", "auto"), ("suffix", ""), ("min_tokens", 0),
    ("parallel_tool_calls", True), ("store", False), ("some_backend_extension", {"x": 1}),  # meaning nothing here
    ("modalities", ["text"]), ("audio", None), ("guided_json", None), ("structured_outputs", None), ("min_p", 0.0),
    ("use_beam_search", False), ("include_stop_str_in_output", False), ("skip_special_tokens", True),
    ("continue_final_message", False), ("add_generation_prompt", True),
]


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
@pytest.mark.parametrize("field,value", ASKS_FOR_SOMETHING)
def test_openai_fields_the_server_does_not_implement_are_refused_when_they_ask_for_something(model, field, value):
    """Served anyway, the answer would not be what the client asked for (vLLM implements these; a
    client moving from it must hear that this server does not)."""
    with pytest.raises(APIError) as err:
        _request(model, **{field: value}).sampling_params(16)
    assert (err.value.status, err.value.param, err.value.code) == (400, field, "unsupported_value")
    assert err.value.message.startswith(f"{field} is not supported by this server (")


# Falsy values of the wrong JSON type: no empty list, string or false (OpenAI and vLLM refuse them), nor
# true for skip_special_tokens (1 == True in Python)
WRONG_TYPED_NOTHING = [
    ("tools", 0), ("tools", False), ("tools", ""), ("tools", {}), ("functions", False), ("suffix", 0), ("suffix", []),
    ("guided_json", 0), ("min_p", False), ("use_beam_search", 0), ("include_stop_str_in_output", ""),
    ("allowed_token_ids", {}), ("bad_words", 0), ("continue_final_message", []), ("skip_special_tokens", 1),
    ("add_generation_prompt", 1.0),
]


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
@pytest.mark.parametrize("field,value", WRONG_TYPED_NOTHING)
def test_a_falsy_value_of_the_wrong_type_is_refused_not_read_as_the_default(model, field, value):
    """`"tools": 0` was read as no tools and served: a wrong type passed in silence."""
    with pytest.raises(APIError) as err:
        _request(model, **{field: value}).sampling_params(16)
    assert (err.value.status, err.value.param, err.value.code) == (400, field, "unsupported_value")


@pytest.mark.parametrize("field,value", [("tool_calls", 0), ("tool_calls", {}), ("refusal", False), ("refusal", [])])
def test_a_message_field_of_the_wrong_type_is_refused_at_its_path(field, value):
    with pytest.raises(APIError) as err:
        _request(ChatCompletionRequest, messages=[{"role": "assistant", "content": "a", field: value}])
    assert (err.value.status, err.value.param, err.value.code) == (400, f"messages[0].{field}", "unsupported_value")


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
@pytest.mark.parametrize("field,value", ASKS_FOR_NOTHING)
def test_their_default_values_and_unknown_fields_are_accepted(model, field, value):
    request = _request(model, **{field: value})
    assert request.sampling_params(16) == _request(model).sampling_params(16)
    known = field in ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", *NOT_IMPLEMENTED)
    assert request.ignored_fields() == ([] if known else [field])  # the server logs the unknown ones


MESSAGE_ASKS_FOR_SOMETHING = [
    ("tool_calls", [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
    ("function_call", {"name": "f", "arguments": "{}"}), ("refusal", "I can't help with that."), ("audio", {"id": "a1"}),
]


@pytest.mark.parametrize("model", [ChatCompletionRequest, TokenizeRequest])
@pytest.mark.parametrize("field,value", MESSAGE_ASKS_FOR_SOMETHING)
def test_message_fields_the_server_does_not_implement_are_refused_at_their_path(model, field, value):
    """An assistant's tool calls were dropped on the way to the chat template, which then showed the model a
    turn that called nothing: refused as the request's `tools` is, at the field's path, whatever the
    content (OpenAI's client sends null beside tool calls)."""
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, field: value}]
    with pytest.raises(APIError) as err:
        _request(model, messages=messages)
    assert (err.value.status, err.value.param, err.value.code) == (400, f"messages[1].{field}", "unsupported_value")
    assert err.value.message.startswith(f"{field} is not supported by this server (")


@pytest.mark.parametrize("model", [ChatCompletionRequest, TokenizeRequest])
def test_message_fields_asking_for_nothing_pass_and_name_and_tool_call_id_reach_the_template(model):
    """What a client replaying an answer sends (null, []) asks for nothing; `name` and `tool_call_id` are
    the template's to write, as vLLM passes them; other fields are the request's ignored ones, logged."""
    named = {"role": "user", "content": "q", "name": "alice"}
    replayed = {"role": "assistant", "content": "a", "tool_calls": [], "function_call": None, "refusal": None, "audio": None}
    tool = {"role": "tool", "content": "20C", "tool_call_id": "c1"}
    body = _request(model, messages=[named, replayed | {"x_trace": 1}, tool])
    assert body.message_dicts() == [named, {"role": "assistant", "content": "a"}, tool]
    if model is ChatCompletionRequest:
        assert body.ignored_fields() == ["messages[1].x_trace"]


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_penalties_reach_the_engine(model):
    body = {"model": "m", "presence_penalty": 0.5, "frequency_penalty": -2, "repetition_penalty": 1.3, "min_tokens": 3}
    body |= {"prompt": "x"} if model is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]}
    got = parse_request(model, json.dumps(body).encode()).sampling_params(16)
    assert (got.presence_penalty, got.frequency_penalty, got.repetition_penalty, got.min_tokens) == (0.5, -2.0, 1.3, 3)
    for name, bad in (("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("presence_penalty", "high"),
                      ("repetition_penalty", 0), ("repetition_penalty", -1), ("min_tokens", -1), ("min_tokens", 17)):
        with pytest.raises(APIError) as err:
            parse_request(model, json.dumps(body | {name: bad}).encode()).sampling_params(16)
        assert (err.value.status, err.value.param) == (400, name), bad


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_logit_bias_reaches_the_engine_by_token_id(model):
    body = {"model": "m", "logit_bias": {"5": 2.5, " 7 ": -100, "0": 100}}
    body |= {"prompt": "x"} if model is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]}
    assert parse_request(model, json.dumps(body).encode()).sampling_params(16).logit_bias == {5: 2.5, 7: -100.0, 0: 100.0}
    for bad in ({"abc": 1}, {"-1": 1}, {"²": 1}, {"": 1}, {"5": "high"}, {"5": 101}, {"5": -1e9}, [5], {"9" * 5000: 1}):
        with pytest.raises(APIError) as err:
            parse_request(model, json.dumps(body | {"logit_bias": bad}).encode()).sampling_params(16)
        assert (err.value.status, err.value.param) in ((400, "logit_bias"), (400, "logit_bias.5")), bad


@pytest.mark.parametrize("bias,message", [
    ({"AI": 1}, "Invalid key in 'logit_bias': AI. You should only be submitting non-negative integers."),
    ({"-1": 1}, "Invalid key in 'logit_bias': -1. You should only be submitting non-negative integers."),
    ({"²": 1}, "Invalid key in 'logit_bias': ². You should only be submitting non-negative integers."),
    ({"2147483648": 1}, "Invalid key in 'logit_bias': 2147483648. Maximum value is 2147483647."),
    ({"9" * 5000: 1}, f"Invalid key in 'logit_bias': {'9' * 32}... (5000 characters). Maximum value is 2147483647."),
    ({str(i): 1 for i in range(1025)}, "Invalid 'logit_bias': too many token ids. Expected at most 1024, but got 1025 instead."),
])
def test_logit_bias_keys_that_are_no_token_id_get_openais_error(bias, message):
    """OpenAI's words for a key that is no token id ("Invalid key in 'logit_bias': ..."), code null; before,
    a key of 19+ digits got a generic message, and more than 1024 keys the engine's, with the whole dict."""
    err = _refusal(CompletionRequest, {"logit_bias": bias})
    assert err.body() == {"error": {"message": message, "type": "invalid_request_error", "param": "logit_bias",
                                    "code": None}}


def test_a_logit_bias_value_past_100_is_openais_range_error_at_its_key():
    err = _refusal(CompletionRequest, {"logit_bias": {"5": 100.5}})
    assert (err.param, err.code) == ("logit_bias.5", "decimal_above_max_value")
    assert err.message == "Invalid 'logit_bias.5': decimal above maximum value. Expected a value <= 100, but got 100.5 instead."


def test_a_logit_bias_key_past_the_vocabulary_names_the_key():
    body = _request(CompletionRequest, logit_bias={"5": 1, " 0099 ": -100})
    body.check_logit_bias(100)
    with pytest.raises(APIError) as err:
        body.check_logit_bias(99)
    assert (err.value.param, err.value.code) == ("logit_bias", None)
    assert err.value.message == "Invalid key in 'logit_bias':  0099 . Maximum value is 98."


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_vllms_stop_token_ids_and_ignore_eos_reach_the_engine(model):
    got = _request(model, stop_token_ids=[5, 9], ignore_eos=True).sampling_params(16)
    assert (got.stop_token_ids, got.ignore_eos) == ((5, 9), True)
    assert _request(model, stop_token_ids=None, ignore_eos=None).sampling_params(16) == _request(model).sampling_params(16)
    for bad, param in (([-1], "stop_token_ids[0]"), (list(range(65)), "stop_token_ids"), (["5"], "stop_token_ids[0]"),
                       (5, "stop_token_ids"), ([3, 10**400], "stop_token_ids[1]")):
        with pytest.raises(APIError) as err:
            _request(model, stop_token_ids=bad).sampling_params(16)
        assert (err.value.status, err.value.param) == (400, param), bad


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
@pytest.mark.parametrize("fields,limit,shown", [
    ({"max_tokens": 8, "min_tokens": 9}, 8, "9"), ({"min_tokens": 10**400}, 16, "1E+400"),  # 16: the server's default
    ({"max_completion_tokens": 4, "max_tokens": 8, "min_tokens": 5}, 4, "5"),
])
def test_min_tokens_past_the_requests_token_limit_is_openais_range_error(model, fields, limit, shown):
    """Its bound is another field's (max_tokens, else the server's default): the engine's refusal had no code
    and wrote every digit of what was sent."""
    with pytest.raises(APIError) as err:
        _request(model, **fields).sampling_params(16)
    assert err.value.status == 400
    assert err.value.body() == {"error": {
        "message": f"Invalid 'min_tokens': integer above maximum value. Expected a value <= {limit}, but got {shown} instead.",
        "type": "invalid_request_error", "param": "min_tokens", "code": "integer_above_max_value"}}
    assert _request(model, **fields | {"min_tokens": limit}).sampling_params(16).min_tokens == limit


@pytest.mark.parametrize("model,message,param", [
    (CompletionRequest, "max_new_tokens must be a positive int, got 0", "max_tokens"),
    (ChatCompletionRequest, "stop_token_ids token ids must be in [0, 100), got 100", "stop_token_ids"),
    (CompletionRequest, "delimiters: no token of the tokenizer contains '@'", "delimiters"),
    (CompletionRequest, "prompt token ids must be in [0, 100)", "prompt"),
    (ChatCompletionRequest, "prompt token ids must be in [0, 100)", "messages"),  # a chat's prompt is its messages
    (ChatCompletionRequest, "prompt is empty: at least one token is needed", "messages"),  # rendered to no token
    (CompletionRequest, "prompt is empty: at least one token is needed", "prompt"),  # text that tokenizes to none
    (CompletionRequest, "the request needs 9 KV pages but the cache has 4; shorten it or give the engine more pages", None),
])
def test_an_engine_refusal_names_the_field_its_message_starts_with(model, message, param):
    """The engine's refusals (SamplingParams', and admission's: token ids past the vocabulary) start with
    the field's name; one that names no field of the request keeps its message, with neither param nor code."""
    err = _request(model).engine_refusal(ValueError(message))
    assert err.status == 400
    assert err.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def test_an_engine_refusal_showing_a_long_value_is_cut_short():
    """The engine's messages show the value refused; a body's megabytes of it must not come back in the 400."""
    message = f"delimiters: no token of the tokenizer contains {'@' * 100_000!r}"
    err = _request(CompletionRequest).engine_refusal(ValueError(message))
    assert err.param == "delimiters" and err.message.startswith(message[:400])
    assert len(err.message) < 600 and err.message.endswith(f"... ({len(message)} characters)")


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_a_temperature_under_the_engines_least_samples_at_it(model):
    """OpenAI takes any temperature in [0, 2]; under 0.01 the engine's division would overflow, so such a
    request samples at 0.01 (vLLM's answer too), and 0 stays greedy."""
    for sent, used in ((1e-300, 0.01), (0.005, 0.01), (0.01, 0.01), (0.5, 0.5), (0, 0.0)):
        assert _request(model, temperature=sent).sampling_params(16).temperature == used


@pytest.mark.parametrize("best_of,n,refused", [(None, 1, False), (1, 1, False), (3, 3, False), (2, 1, True), (1, 2, True)])
def test_best_of_is_only_accepted_as_n(best_of, n, refused):
    request = _request(CompletionRequest, best_of=best_of, n=n)
    if not refused:
        assert request.sampling_params(16) and request.ignored_fields() == []
        return
    with pytest.raises(APIError) as err:
        request.sampling_params(16)
    assert (err.value.status, err.value.param) == (400, "best_of")


@pytest.mark.parametrize("model,fields,count", [
    (CompletionRequest, {}, None), (CompletionRequest, {"logprobs": None, "echo": True}, None),
    (CompletionRequest, {"logprobs": 0}, 0), (CompletionRequest, {"logprobs": 5, "echo": True}, 5),
    (ChatCompletionRequest, {}, None), (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 0}, None),
    (ChatCompletionRequest, {"logprobs": True}, 0), (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 20}, 20),
])
def test_logprob_requests_are_read_as_openai_means_them(model, fields, count):
    request = _request(model, **fields)
    assert request.logprob_count() == count
    assert request.sampling_params(16).max_new_tokens == 16


# A JSON value of the wrong type: OpenAI's API answers a 400 with code "invalid_type", `param` the
# value's path, and one wording for every field, as clients quote it (e.g. "Invalid type for 'n': expected
# an integer, but got a string instead."; "Invalid type for 'messages[0].content': expected one of a string
# or array of objects, but got an integer instead."). Integer fields take integers only (not 7.0, "7" or
# true), booleans only true/false, numbers no strings or booleans; null only where a field is optional.
PROMPT_TYPES = "one of a string, array of integers, array of strings, or array of arrays of integers"
ROLES = "one of 'system', 'user', 'assistant', 'developer', or 'tool'"
WRONG_JSON_TYPES = [
    # (request model, fields, param, expected, sent)
    (CompletionRequest, {"max_tokens": True}, "max_tokens", "an integer", "a boolean"),
    (CompletionRequest, {"max_tokens": "7"}, "max_tokens", "an integer", "a string"),
    (CompletionRequest, {"max_tokens": 7.0}, "max_tokens", "an integer", "a decimal number"),
    (ChatCompletionRequest, {"max_completion_tokens": "7"}, "max_completion_tokens", "an integer", "a string"),
    (CompletionRequest, {"n": 1.0}, "n", "an integer", "a decimal number"),
    (ChatCompletionRequest, {"n": True}, "n", "an integer", "a boolean"),
    (CompletionRequest, {"n": ""}, "n", "an integer", "a string"),
    (CompletionRequest, {"seed": "7"}, "seed", "an integer", "a string"),
    (ChatCompletionRequest, {"seed": 1.5}, "seed", "an integer", "a decimal number"),
    (CompletionRequest, {"top_k": 2.0}, "top_k", "an integer", "a decimal number"),
    (CompletionRequest, {"min_tokens": False}, "min_tokens", "an integer", "a boolean"),
    (CompletionRequest, {"logprobs": True}, "logprobs", "an integer", "a boolean"),
    (CompletionRequest, {"best_of": "1"}, "best_of", "an integer", "a string"),
    (ChatCompletionRequest, {"logprobs": True, "top_logprobs": "2"}, "top_logprobs", "an integer", "a string"),
    (CompletionRequest, {"stream": "false"}, "stream", "a boolean", "a string"),
    (ChatCompletionRequest, {"stream": 0}, "stream", "a boolean", "an integer"),
    (CompletionRequest, {"echo": "true"}, "echo", "a boolean", "a string"),
    (ChatCompletionRequest, {"logprobs": 1}, "logprobs", "a boolean", "an integer"),
    (CompletionRequest, {"ignore_eos": "yes"}, "ignore_eos", "a boolean", "a string"),
    (CompletionRequest, {"block_lookahead": 1}, "block_lookahead", "a boolean", "an integer"),
    (CompletionRequest, {"stream": True, "stream_options": "yes"}, "stream_options", "an object", "a string"),
    (CompletionRequest, {"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage",
     "a boolean", "a string"),
    (CompletionRequest, {"stream": True, "stream_options": {"include_usage": None}}, "stream_options.include_usage",
     "a boolean", "null"),
    (CompletionRequest, {"temperature": "0.5"}, "temperature", "a decimal", "a string"),
    (ChatCompletionRequest, {"temperature": True}, "temperature", "a decimal", "a boolean"),
    (ChatCompletionRequest, {"top_p": "1"}, "top_p", "a decimal", "a string"),
    (CompletionRequest, {"threshold": "0.9"}, "threshold", "a decimal", "a string"),
    (CompletionRequest, {"presence_penalty": False}, "presence_penalty", "a decimal", "a boolean"),
    (ChatCompletionRequest, {"repetition_penalty": [1.0]}, "repetition_penalty", "a decimal", "an array"),
    (CompletionRequest, {"mode": 5}, "mode", "one of 'diffusion', 'ar', or 'speculative'", "an integer"),
    (CompletionRequest, {"model": None}, "model", "a string", "null"),
    (CompletionRequest, {"user": {"a": 1}}, "user", "a string", "an object"),
    # nested: the value's path, as OpenAI writes it (`messages[0].content`, `metadata.k`)
    (CompletionRequest, {"logit_bias": {"5": "1"}}, "logit_bias.5", "a decimal", "a string"),
    (CompletionRequest, {"logit_bias": {"5": True}}, "logit_bias.5", "a decimal", "a boolean"),
    (CompletionRequest, {"logit_bias": {"5": None}}, "logit_bias.5", "a decimal", "null"),
    (CompletionRequest, {"logit_bias": {"é🙂": {}}}, "logit_bias.é🙂", "a decimal", "an object"),
    (CompletionRequest, {"logit_bias": [5]}, "logit_bias", "an object", "an array"),
    (CompletionRequest, {"delimiter_token_ids": ["5"]}, "delimiter_token_ids[0]", "an integer", "a string"),
    (CompletionRequest, {"stop_token_ids": [True]}, "stop_token_ids[0]", "an integer", "a boolean"),
    (CompletionRequest, {"stop_token_ids": [1, None]}, "stop_token_ids[1]", "an integer", "null"),
    (CompletionRequest, {"stop_token_ids": 5}, "stop_token_ids", "an array of integers", "an integer"),
    (ChatCompletionRequest, {"response_format": "json_object"}, "response_format", "an object", "a string"),
    (CompletionRequest, {"response_format": {"type": 5}}, "response_format.type",
     "one of 'text', 'json_object', or 'json_schema'", "an integer"),
    (CompletionRequest, {"stop": 7}, "stop", "one of a string or array of strings", "an integer"),
    (CompletionRequest, {"stop": {"": "🙂"}}, "stop", "one of a string or array of strings", "an object"),
    (CompletionRequest, {"stop": ["a", None]}, "stop[1]", "a string", "null"),
    (CompletionRequest, {"stop": [["a"]]}, "stop[0]", "a string", "an array"),
    (CompletionRequest, {"prompt": 7}, "prompt", PROMPT_TYPES, "an integer"),
    (CompletionRequest, {"prompt": None}, "prompt", PROMPT_TYPES, "null"),
    (CompletionRequest, {"prompt": {"text": "x"}}, "prompt", PROMPT_TYPES, "an object"),
    (ChatCompletionRequest, {"messages": "hi"}, "messages", "an array of objects", "a string"),
    (ChatCompletionRequest, {"messages": ["hi"]}, "messages[0]", "an object", "a string"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": 7}]}, "messages[0].content",
     "one of a string or array of objects", "an integer"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": None}]}, "messages[0].content",
     "one of a string or array of objects", "null"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]", "an object",
     "an integer"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}, {"role": ["user"], "content": "y"}]},
     "messages[1].role", ROLES, "an array"),
    (TokenizeRequest, {"prompt": "x", "add_special_tokens": "false"}, "add_special_tokens", "a boolean", "a string"),
    (TokenizeRequest, {"prompt": "x", "add_generation_prompt": 0}, "add_generation_prompt", "a boolean", "an integer"),
    (TokenizeRequest, {"prompt": 5}, "prompt", "a string", "an integer"),
    (DetokenizeRequest, {"tokens": ["5"]}, "tokens[0]", "an integer", "a string"),
    (DetokenizeRequest, {"tokens": [True]}, "tokens[0]", "an integer", "a boolean"),
    (DetokenizeRequest, {"tokens": "abc"}, "tokens", "an array of integers", "a string"),
]


def _refusal(model, fields) -> APIError:
    with pytest.raises(APIError) as err:
        if model in (TokenizeRequest, DetokenizeRequest):
            parse_request(model, json.dumps(fields).encode())
        else:
            _request(model, **fields)
    return err.value


@pytest.mark.parametrize("model,fields,param,expected,sent", WRONG_JSON_TYPES)
def test_a_json_value_of_the_wrong_type_is_openais_invalid_type_error(model, fields, param, expected, sent):
    """pydantic's lax mode read these as the field's type ("false" as False, true as 1); its strict mode's
    own words ("Input should be a valid integer") name neither the path nor what was sent."""
    err = _refusal(model, fields)
    assert err.status == 400
    assert err.body() == {"error": {"message": f"Invalid type for '{param}': expected {expected}, but got {sent} instead.",
                                    "type": "invalid_request_error", "param": param, "code": "invalid_type"}}


@pytest.mark.parametrize("body,sent", [(b"[]", "an array"), (b"5", "an integer"), (b"null", "null"), (b'"x"', "a string")])
def test_a_body_that_is_no_json_object_is_a_type_error_without_a_param(body, sent):
    with pytest.raises(APIError) as err:
        parse_request(ChatCompletionRequest, body)
    assert err.value.status == 400
    assert err.value.body() == {"error": {
        "message": f"Invalid type for the request body: expected an object, but got {sent} instead.",
        "type": "invalid_request_error", "param": None, "code": "invalid_type"}}


@pytest.mark.parametrize("model,fields", [
    (CompletionRequest, {"user": ""}), (CompletionRequest, {"user": "\u0000é\u0301🙂\u200b\U0010ffff"}),
    (CompletionRequest, {"model": ""}), (CompletionRequest, {"prompt": "🙂\u202e\ufeff"}),
    (CompletionRequest, {"stop": ["🙂", "\u200b"]}), (CompletionRequest, {"logit_bias": {}}),
    (CompletionRequest, {"max_tokens": None, "seed": None, "stop": None, "logit_bias": None, "stop_token_ids": None}),
    (CompletionRequest, {"temperature": 0, "top_p": 1, "presence_penalty": -2, "seed": -(2**63)}),
    (CompletionRequest, {"seed": 2**64 - 1, "top_k": 2**31 - 1, "stop_token_ids": [0, 2**31 - 1] * 32,
                         "delimiter_token_ids": [0, 2**31 - 1]}),
    (ChatCompletionRequest, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
    (CompletionRequest, {"🙂 not a field": [None, {"x": 1}]}), (ChatCompletionRequest, {"messages": [
        {"role": "user", "content": ""}, {"role": "assistant", "content": []}, {"role": "user", "content": "é"}]}),
    (DetokenizeRequest, {"tokens": []}), (TokenizeRequest, {"prompt": ""}),
])
def test_type_valid_extremes_are_no_type_errors(model, fields):
    if model in (TokenizeRequest, DetokenizeRequest):
        parse_request(model, json.dumps(fields).encode())
    else:
        _request(model, **fields)


@pytest.mark.parametrize("model,body,param", [
    (ChatCompletionRequest, {"model": "m"}, "messages"), (CompletionRequest, {"model": "m"}, "prompt"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}, "model"),
    (CompletionRequest, {"prompt": "x"}, "model"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "user"}]},
     "messages[1].content"),
    (DetokenizeRequest, {}, "tokens"),
    (CompletionRequest, {"model": "m", "prompt": "x", "response_format": {}}, "response_format.type"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                             "response_format": {"json_schema": {"name": "x"}}}, "response_format.type"),
])
def test_a_missing_field_is_openais_missing_required_parameter(model, body, param):
    """As OpenAI answers it (`Missing required parameter: 'input[79].id'.`, openai/codex#6725): pydantic's
    own "Field required" carried no code, and for a nested field only the top-level name."""
    with pytest.raises(APIError) as err:
        parse_request(model, json.dumps(body).encode())
    assert err.value.status == 400
    assert err.value.body() == {"error": {"message": f"Missing required parameter: '{param}'.", "type": "invalid_request_error",
                                          "param": param, "code": "missing_required_parameter"}}


# A value of the right JSON type that is not allowed: OpenAI's code, the value's path and its words, as
# clients quote the API's 400 bodies (integer_below_min_value: OpenBMB/ChatDev#446; integer_above_max_value:
# thisisartium/continuous-alignment-testing#25; array_above_max_length: continuedev/continue#2461;
# empty_array: CopilotKit/CopilotKit#529; invalid_value: moeru-ai/airi#137; string_above_max_length:
# AnswerDotAI/fastllm#45; stream_options: BerriAI/litellm#5803). Bounds past OpenAI's own are fdllm's
# (top_p > 0, its extension fields).
ROLES_SUPPORTED = "'system', 'user', 'assistant', 'developer', and 'tool'"
VALUE_ERRORS = [
    # (request model, fields, param, code, message)
    (CompletionRequest, {"temperature": 2.5}, "temperature", "decimal_above_max_value",
     "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.5 instead."),
    (ChatCompletionRequest, {"temperature": 3}, "temperature", "decimal_above_max_value",
     "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."),
    (ChatCompletionRequest, {"temperature": -0.5}, "temperature", "decimal_below_min_value",
     "Invalid 'temperature': decimal below minimum value. Expected a value >= 0, but got -0.5 instead."),
    (CompletionRequest, {"temperature": 10**400}, "temperature", "decimal_above_max_value",  # past a double: not 500
     "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 1E+400 instead."),
    (ChatCompletionRequest, {"top_p": 1.5}, "top_p", "decimal_above_max_value",
     "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 1.5 instead."),
    (CompletionRequest, {"top_p": 0}, "top_p", "decimal_below_min_value",
     "Invalid 'top_p': decimal below minimum value. Expected a value > 0, but got 0 instead."),
    (ChatCompletionRequest, {"presence_penalty": -2.5}, "presence_penalty", "decimal_below_min_value",
     "Invalid 'presence_penalty': decimal below minimum value. Expected a value >= -2, but got -2.5 instead."),
    (CompletionRequest, {"repetition_penalty": 1000}, "repetition_penalty", "decimal_above_max_value",
     "Invalid 'repetition_penalty': decimal above maximum value. Expected a value <= 100, but got 1000 instead."),
    (ChatCompletionRequest, {"repetition_penalty": 0.001}, "repetition_penalty", "decimal_below_min_value",
     "Invalid 'repetition_penalty': decimal below minimum value. Expected a value >= 0.01, but got 0.001 instead."),
    (CompletionRequest, {"delimiters": ["\n", "x" * 4_000_000]}, "delimiters[1]", "string_above_max_length",  # not echoed
     "Invalid 'delimiters[1]': string too long. Expected a string with maximum length 32, but got a string with "
     "length 4000000 instead."),
    (CompletionRequest, {"threshold": 1.5}, "threshold", "decimal_above_max_value",
     "Invalid 'threshold': decimal above maximum value. Expected a value <= 1, but got 1.5 instead."),
    (CompletionRequest, {"n": 0}, "n", "integer_below_min_value",
     "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
    (ChatCompletionRequest, {"n": 129}, "n", "integer_above_max_value",
     "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead."),
    (CompletionRequest, {"n": 10**30}, "n", "integer_above_max_value",
     "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 1E+30 instead."),
    (CompletionRequest, {"n": 10**400}, "n", "integer_above_max_value",  # JSON's 10**400 is an int: no 500 either
     "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 1E+400 instead."),
    (ChatCompletionRequest, {"n": -(10**400)}, "n", "integer_below_min_value",
     "Invalid 'n': integer below minimum value. Expected a value >= 1, but got -1E+400 instead."),
    # integers the engine range-checks (fdllm.SamplingParams): refused by the request model in OpenAI's words,
    # not by the engine with neither code nor path
    (CompletionRequest, {"seed": 10**400}, "seed", "integer_above_max_value",
     "Invalid 'seed': integer above maximum value. Expected a value <= 18446744073709551615, but got 1E+400 instead."),
    (ChatCompletionRequest, {"seed": -(10**400)}, "seed", "integer_below_min_value",
     "Invalid 'seed': integer below minimum value. Expected a value >= -9223372036854775808, but got -1E+400 instead."),
    (CompletionRequest, {"seed": 2**64}, "seed", "integer_above_max_value",
     "Invalid 'seed': integer above maximum value. Expected a value <= 18446744073709551615, but got "
     "18446744073709551616 instead."),
    (ChatCompletionRequest, {"top_k": 10**400}, "top_k", "integer_above_max_value",
     "Invalid 'top_k': integer above maximum value. Expected a value <= 2147483647, but got 1E+400 instead."),
    (CompletionRequest, {"delimiter_threshold": 0.5, "delimiter_token_ids": [1, 2, 10**400]}, "delimiter_token_ids[2]",
     "integer_above_max_value",
     "Invalid 'delimiter_token_ids[2]': integer above maximum value. Expected a value <= 2147483647, but got 1E+400 "
     "instead."),
    (CompletionRequest, {"delimiter_threshold": 0.5, "delimiter_token_ids": [-4]}, "delimiter_token_ids[0]",
     "integer_below_min_value",
     "Invalid 'delimiter_token_ids[0]': integer below minimum value. Expected a value >= 0, but got -4 instead."),
    (ChatCompletionRequest, {"stop_token_ids": [7, -(10**400)]}, "stop_token_ids[1]", "integer_below_min_value",
     "Invalid 'stop_token_ids[1]': integer below minimum value. Expected a value >= 0, but got -1E+400 instead."),
    (CompletionRequest, {"stop_token_ids": [10**400]}, "stop_token_ids[0]", "integer_above_max_value",
     "Invalid 'stop_token_ids[0]': integer above maximum value. Expected a value <= 2147483647, but got 1E+400 "
     "instead."),
    (CompletionRequest, {"stop_token_ids": list(range(65))}, "stop_token_ids", "array_above_max_length",
     "Invalid 'stop_token_ids': array too long. Expected an array with maximum length 64, but got an array with "
     "length 65 instead."),
    (CompletionRequest, {"max_tokens": 0}, "max_tokens", "integer_below_min_value",
     "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead."),
    (ChatCompletionRequest, {"max_completion_tokens": -5}, "max_completion_tokens", "integer_below_min_value",
     "Invalid 'max_completion_tokens': integer below minimum value. Expected a value >= 1, but got -5 instead."),
    (CompletionRequest, {"top_k": -3}, "top_k", "integer_below_min_value",
     "Invalid 'top_k': integer below minimum value. Expected a value >= -1, but got -3 instead."),
    (CompletionRequest, {"logprobs": -1}, "logprobs", "integer_below_min_value",
     "Invalid 'logprobs': integer below minimum value. Expected a value >= 0, but got -1 instead."),
    (CompletionRequest, {"logprobs": 6}, "logprobs", "integer_above_max_value",
     "Invalid 'logprobs': integer above maximum value. Expected a value <= 5, but got 6 instead."),
    (CompletionRequest, {"logprobs": 10**400}, "logprobs", "integer_above_max_value",
     "Invalid 'logprobs': integer above maximum value. Expected a value <= 5, but got 1E+400 instead."),
    (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 10**400}, "top_logprobs", "integer_above_max_value",
     "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got 1E+400 instead."),
    (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "integer_above_max_value",
     "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got 21 instead."),
    (ChatCompletionRequest, {"top_logprobs": 3}, "top_logprobs", None,
     "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled."),
    (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 1}, "top_logprobs", None,
     "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled."),
    (CompletionRequest, {"stream_options": {"include_usage": True}}, "stream_options", None,
     "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
    # enums: a string of the right type that names no choice
    (CompletionRequest, {"mode": "beam"}, "mode", "invalid_value",
     "Invalid value: 'beam'. Supported values are: 'diffusion', 'ar', and 'speculative'."),
    (CompletionRequest, {"mode": ""}, "mode", "invalid_value",
     "Invalid value: ''. Supported values are: 'diffusion', 'ar', and 'speculative'."),
    (ChatCompletionRequest, {"selection": "greedy"}, "selection", "invalid_value",
     "Invalid value: 'greedy'. Supported values are: 'threshold' and 'entropy_budget'."),
    (ChatCompletionRequest, {"response_format": {"type": "foo"}}, "response_format.type", "invalid_value",
     "Invalid value: 'foo'. Supported values are: 'text', 'json_object', and 'json_schema'."),
    (CompletionRequest, {"response_format": {"type": "JSON_OBJECT"}}, "response_format.type", "invalid_value",
     "Invalid value: 'JSON_OBJECT'. Supported values are: 'text', 'json_object', and 'json_schema'."),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}, {"role": "🙂", "content": "x"}]},
     "messages[1].role", "invalid_value", f"Invalid value: '🙂'. Supported values are: {ROLES_SUPPORTED}."),
    # lengths: OpenAI's four stop sequences, fdllm's 256 characters each; no empty prompt or conversation
    (CompletionRequest, {"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length",
     "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length 5 instead."),
    (CompletionRequest, {"stop": ["a", "s" * 300]}, "stop[1]", "string_above_max_length",
     "Invalid 'stop[1]': string too long. Expected a string with maximum length 256, but got a string with length 300 "
     "instead."),
    (CompletionRequest, {"stop": "s" * 257}, "stop", "string_above_max_length",
     "Invalid 'stop': string too long. Expected a string with maximum length 256, but got a string with length 257 "
     "instead."),
    (CompletionRequest, {"stop": ["a", ""]}, "stop[1]", "empty_string",
     "Invalid 'stop[1]': empty string. Expected a string with minimum length 1, but got an empty string instead."),
    (CompletionRequest, {"stop": ""}, "stop", "empty_string",
     "Invalid 'stop': empty string. Expected a string with minimum length 1, but got an empty string instead."),
    (ChatCompletionRequest, {"messages": []}, "messages", "empty_array",
     "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."),
    (TokenizeRequest, {"messages": []}, "messages", "empty_array",
     "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."),
    (CompletionRequest, {"prompt": ""}, "prompt", "empty_string",
     "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead."),
    (CompletionRequest, {"prompt": []}, "prompt", "empty_array",
     "Invalid 'prompt': empty array. Expected an array with minimum length 1, but got an empty array instead."),
    (CompletionRequest, {"prompt": [[]]}, "prompt[0]", "empty_array",
     "Invalid 'prompt[0]': empty array. Expected an array with minimum length 1, but got an empty array instead."),
    (CompletionRequest, {"prompt": ["a", ""]}, "prompt[1]", "empty_string",
     "Invalid 'prompt[1]': empty string. Expected a string with minimum length 1, but got an empty string instead."),
    (CompletionRequest, {"prompt": [[5], []]}, "prompt[1]", "empty_array",
     "Invalid 'prompt[1]': empty array. Expected an array with minimum length 1, but got an empty array instead."),
    (ChatCompletionRequest, {"cache_salt": ""}, "cache_salt", "empty_string",
     "Invalid 'cache_salt': empty string. Expected a string with minimum length 1, but got an empty string instead."),
]


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_a_cache_salt_reaches_the_engine(model):
    """vLLM's cache_salt: the request shares prefix-cache blocks only with requests of the same salt."""
    assert _request(model, cache_salt="tenant-7").sampling_params(16).cache_salt == "tenant-7"
    assert _request(model).sampling_params(16).cache_salt is None


@pytest.mark.parametrize("model,fields,param,code,message", VALUE_ERRORS)
def test_a_value_openai_does_not_allow_is_its_error(model, fields, param, code, message):
    """pydantic's own words ("Input should be less than or equal to 2 (temperature)") carried no code, named
    only the top-level field and not what was sent."""
    err = _refusal(model, fields)
    assert err.status == 400
    assert err.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


@pytest.mark.parametrize("sent,param,code,message", [
    ({"temperature": float("nan")}, "temperature", None,
     "Invalid 'temperature': expected a finite number (>= 0 and <= 2), but got NaN instead."),
    ({"temperature": float("inf")}, "temperature", "decimal_above_max_value",
     "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got Infinity instead."),
    ({"top_p": float("-inf")}, "top_p", "decimal_below_min_value",
     "Invalid 'top_p': decimal below minimum value. Expected a value > 0, but got -Infinity instead."),
    ({"entropy_budget": float("inf")}, "entropy_budget", None,
     "Invalid 'entropy_budget': expected a finite number (>= 0), but got Infinity instead."),
    ({"logit_bias": {"5": float("nan")}}, "logit_bias.5", None,
     "Invalid 'logit_bias.5': expected a finite number (>= -100 and <= 100), but got NaN instead."),
    ('"repetition_penalty": 1e400', "repetition_penalty", "decimal_above_max_value",  # valid JSON, read as Infinity
     "Invalid 'repetition_penalty': decimal above maximum value. Expected a value <= 100, but got Infinity instead."),
])
def test_nan_and_infinity_are_a_400_naming_the_field_and_its_range(sent, param, code, message):
    """Not JSON, but Python's json writes them (`json.dumps(float("nan"))` is `NaN`) and the parser reads
    them: past a bound they are out of range as OpenAI words it, else not a finite number."""
    fields = sent if isinstance(sent, str) else json.dumps(sent)[1:-1]
    with pytest.raises(APIError) as err:
        parse_request(CompletionRequest, f'{{"model": "m", "prompt": "x", {fields}}}'.encode())
    assert err.value.status == 400
    assert err.value.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_number_fields_take_json_integers_as_openai_does(model):
    """A number may be written as an integer (the official client sends Python's 0 and 1 so)."""
    params = _request(model, temperature=1, top_p=1, threshold=1, presence_penalty=0, frequency_penalty=-1,
                      repetition_penalty=2, logit_bias={"5": 100}, max_tokens=7, seed=3, n=2, stream=False).sampling_params(16)
    assert (params.temperature, params.top_p, params.threshold, params.presence_penalty) == (1.0, 1.0, 1.0, 0.0)
    assert (params.frequency_penalty, params.repetition_penalty, params.logit_bias) == (-1.0, 2.0, {5: 100.0})
    assert (params.max_new_tokens, params.seed) == (7, 3)


SCORED = SequenceLogprobs(
    token_ids=[7, 8, 9, 7],
    logprobs=[None, -0.5, float("-inf"), -2.0],
    top_logprobs=[[], [(8, -0.5), (3, -1.5)], [(3, -0.1), (8, -3.0)], [(3, -1.0), (8, -1.25)]],
)
TEXTS = {3: "a", 7: "hé", 8: " ✓", 9: "\n"}


def texts(ids):
    """As fdllm.tokenizer.token_pieces gives them, for tokens of whole characters."""
    return [(TEXTS[t], TEXTS[t].encode()) for t in ids]


def test_completion_logprobs_in_openais_legacy_shape():
    echoed = completion_logprobs(SCORED, 0, texts)
    assert echoed["tokens"] == ["hé", " ✓", "\n", "hé"]
    assert echoed["token_logprobs"] == [None, -0.5, LOGPROB_FLOOR, -2.0]  # -inf floored: JSON has no infinity
    assert echoed["text_offset"] == [0, 2, 4, 5]
    # the top alternatives, and the chosen token too (OpenAI: up to logprobs + 1 entries); nothing at position 0
    assert echoed["top_logprobs"] == [None, {" ✓": -0.5, "a": -1.5}, {"a": -0.1, " ✓": -3.0, "\n": LOGPROB_FLOOR},
                                      {"a": -1.0, " ✓": -1.25, "hé": -2.0}]
    json.dumps(echoed, allow_nan=False)
    completion = completion_logprobs(SCORED, 2, texts)  # without echo: the completion's tokens only
    assert completion["tokens"] == ["\n", "hé"] and completion["text_offset"] == [0, 1]
    assert completion["top_logprobs"] == echoed["top_logprobs"][2:]


def test_tokens_that_split_a_character_give_its_bytes_and_offsets_in_the_text(tokenizer):
    """Through the byte-level tokenizer (a character of 3 or 4 bytes spans tokens, each alone U+FFFD):
    chat's `bytes` join into the text, and each `text_offset` is where its token starts in the text
    (a token that ends inside a character: where that character starts)."""
    text = "a ✓ 漢字 🙂 b"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in tokenizer.batch_decode([[t] for t in ids]), "the test needs split characters"
    scored = SequenceLogprobs(token_ids=ids, logprobs=[None] + [-1.0] * (len(ids) - 1),
                              top_logprobs=[[]] + [[(t, -1.0)] for t in ids[1:]])
    pieces = partial(token_pieces, tokenizer)
    content = chat_logprobs(scored, 0, pieces)["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == text
    assert all(bytes(c["top_logprobs"][0]["bytes"]) == bytes(c["bytes"]) for c in content[1:])
    offsets = completion_logprobs(scored, 0, pieces)["text_offset"]
    starts = [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]  # the oracle: prefixes decoded
    assert offsets == starts and offsets[-1] == len(text) - 1


def test_token_pieces_are_the_text_bytes_for_any_text(tokenizer):
    """Byte-level vocabularies: the tokens' bytes join into the encoded text, whatever it holds;
    special and unknown ids stand for their text."""
    text = "Reverse: 03 17 -> Café, naïve, 漢字 and 🙂\n\t  x\u200b\U0001F468\u200d\U0001F469 ü"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(raw for _, raw in token_pieces(tokenizer, ids)) == text.encode()
    eos = tokenizer.eos_token_id
    assert token_pieces(tokenizer, [eos, 10**7]) == [(tokenizer.eos_token, tokenizer.eos_token.encode()), ("", b"")]


def test_chat_logprobs_in_openais_shape():
    content = chat_logprobs(SCORED, 1, texts)["content"]
    assert [c["token"] for c in content] == [" ✓", "\n", "hé"]
    assert [c["logprob"] for c in content] == [-0.5, LOGPROB_FLOOR, -2.0]
    assert content[0]["bytes"] == list(" ✓".encode()) and content[2]["bytes"] == [104, 195, 169]
    assert content[1]["top_logprobs"] == [{"token": "a", "logprob": -0.1, "bytes": [97]},
                                          {"token": " ✓", "logprob": -3.0, "bytes": list(" ✓".encode())}]
    json.dumps(content, allow_nan=False)


@pytest.mark.parametrize("model,fields,choices", [
    (CompletionRequest, {}, 1), (CompletionRequest, {"n": 3}, 3), (CompletionRequest, {"prompt": ["a", "b"], "n": 2}, 4),
    (CompletionRequest, {"prompt": [[5], [6], [7]]}, 3), (ChatCompletionRequest, {"n": 5}, 5),
])
def test_choices_are_prompts_times_n(model, fields, choices):
    assert _request(model, **fields).num_choices == choices


def test_choice_seeds_are_reproducible_and_distinct():
    seeded = SamplingParams(temperature=0.8, seed=7)
    seeds = [choice_params(seeded, j).seed for j in range(50)]
    assert seeds[0] == 7 and len(set(seeds)) == 50  # choice 0 is the request as sent
    assert seeds == [choice_params(seeded, j).seed for j in range(50)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert choice_params(SamplingParams(temperature=0.8), 3).seed is None  # unseeded: each choice draws its own


def test_usage_counts_each_prompt_once_and_every_choice():
    def result(prompt: int, completion: int, forwards: int) -> GenerationResult:
        return GenerationResult(request_id="r", prompt_token_ids=[1] * prompt, token_ids=[2] * completion,
                                num_forwards=forwards, time_to_first_token_s=0.1 * forwards)

    results = [result(3, 4, 2), result(3, 6, 3), result(5, 2, 1), result(5, 0, 0)]  # 2 prompts x n=2
    results[1].num_cached_tokens, results[2].num_cached_tokens = 2, 4  # choice 1 shared what choice 0 prefilled
    assert usage(results, n=2) == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20,
                                   "prompt_tokens_details": {"cached_tokens": 6}}
    stats = fdllm_stats(results)
    assert stats["num_forwards"] == 6 and stats["tokens_per_forward"] == 2.0
    assert stats["time_to_first_token_s"] == pytest.approx(0.0)


def test_a_streams_chunks_share_the_responses_id_and_creation_time(monkeypatch):
    """OpenAI's `created` is when the completion was created: one value for every chunk of a stream (each
    chunk read the clock, so a stream longer than a second changed it midway)."""
    from serve import protocol

    clock = iter(range(1_700_000_000, 1_700_000_100))
    monkeypatch.setattr(protocol.time, "time", lambda: next(clock))
    head = protocol.ResponseHead("chatcmpl-1", "m")
    chunks = [protocol.chat_chunk(head, {"content": "a"}, None), protocol.chat_chunk(head, {}, "stop"),
              protocol.completion_chunk(head, "a", None), protocol.usage_chunk(head, True, [], 1)]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {("chatcmpl-1", 1_700_000_000, "m")}
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 2 + ["text_completion", "chat.completion.chunk"]


def test_top_k_minus_one_is_off_as_vllm_reads_it():
    """vLLM's clients (RL frameworks among them) send top_k -1 for no top-k filter, which was a 400."""
    for top_k in (-1, 0):
        body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "x", "top_k": top_k}).encode())
        assert body.sampling_params(16).top_k == 0


def test_a_chat_of_n_choices_counts_its_prompt_once_and_maps_each_finish_reason():
    """A chat's choices share its one prompt: usage counts it once (as OpenAI does), every choice's
    completion, and each choice keeps its own finish_reason and text."""
    results = [GenerationResult(request_id="r", prompt_token_ids=[1] * 5, token_ids=[2] * k, text="x" * k,
                                finish_reason=reason)
               for k, reason in [(3, "stop"), (4, "length"), (0, "stop")]]
    body = chat_response(ResponseHead("chatcmpl-1", "m"), [Choice(r, r.text) for r in results])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert [(c["index"], c["finish_reason"], c["message"]) for c in body["choices"]] == [
        (0, "stop", {"role": "assistant", "content": "xxx"}), (1, "length", {"role": "assistant", "content": "xxxx"}),
        (2, "stop", {"role": "assistant", "content": ""})]
    completion = completion_response(ResponseHead("cmpl-1", "m"), [Choice(r, r.text) for r in results[:2]], n=2)
    assert completion["usage"]["prompt_tokens"] == 5 and completion["usage"]["total_tokens"] == 12


def test_a_request_that_sets_nothing_gets_openais_defaults():
    """OpenAI's documented defaults (temperature 1, top_p 1, n 1, no stop, not streamed), written out
    here rather than read from the model's own field defaults."""
    for body in (_request(CompletionRequest), _request(ChatCompletionRequest)):
        params = body.sampling_params(16)
        assert (params.temperature, params.top_p, params.top_k, params.stop, params.max_new_tokens) == (1.0, 1.0, 0, (), 16)
        assert (body.n, body.stream, body.stream_options, body.seed) == (1, False, None, None)


def test_up_to_four_stop_strings_are_taken_and_a_fifth_is_refused():
    """OpenAI takes up to 4 stop sequences."""
    assert _request(CompletionRequest, stop=["a", "b", "c", "d"]).sampling_params(16).stop == ("a", "b", "c", "d")
    with pytest.raises(APIError) as err:
        _request(CompletionRequest, stop=["a", "b", "c", "d", "e"])
    assert (err.value.status, err.value.param) == (400, "stop")


def test_stream_options_without_include_usage_ask_for_no_usage_chunk():
    assert _request(CompletionRequest, stream=True, stream_options={}).stream_options.include_usage is False
    assert _request(CompletionRequest, stream=True, stream_options={"include_usage": True}).stream_options.include_usage is True


def test_template_variables_count_towards_max_prompt_chars():
    """A template writes the variables a request gives (`bos_token` replaces the tokenizer's): a chat of
    one short message with a 7 MB variable was tokenized past max_prompt_chars, up to max_body_bytes."""
    body = parse_request(ChatCompletionRequest, json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"bos_token": "x" * 5000}}).encode())
    assert prompt_chars(body) > 5000
