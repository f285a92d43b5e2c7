"""A completion's prompt in each of OpenAI's forms, /tokenize's one input, and the OpenAI features the
server refuses rather than ignores: what parses, and one clear 400 per wrong request, checked without a
server (tests/integration/test_serve.py sends them over HTTP)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydantic")

from serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, TokenizeRequest, parse_request  # noqa: E402


def prompt_of(prompt):
    return parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode()).prompt


@pytest.mark.parametrize("sent,prompt", [
    ("héllo ✓", "héllo ✓"), (["héllo"], "héllo"), ([5, 6], [5, 6]), ([[5, 6]], [5, 6]), ([10**12], [10**12]),
])
def test_one_prompt_in_every_openai_form(sent, prompt):
    assert prompt_of(sent) == prompt


@pytest.mark.parametrize("sent,message", [
    ([[5], [6]], "batched prompts are not supported"), (["a", "b"], "batched prompts are not supported"),
    ("", "must not be empty"), ([], "must not be empty"), ([[]], "must not be empty"), ([""], "must not be empty"),
    (7, "a string or a list of token ids"), ([1, "a"], "a string or a list of token ids"),
    ([True], "a string or a list of token ids"), ([1.5], "a string or a list of token ids"),
    ([["a"]], "a string or a list of token ids"), (None, "a string or a list of token ids"),
    ({"text": "x"}, "a string or a list of token ids"),
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


@pytest.mark.parametrize("model,fields,param", [
    (CompletionRequest, {"echo": True}, "echo"),
    (CompletionRequest, {"logprobs": 1}, "logprobs"),
    (CompletionRequest, {"logprobs": 0}, "logprobs"),
    (ChatCompletionRequest, {"logprobs": True}, "logprobs"),
    (ChatCompletionRequest, {"top_logprobs": 3}, "top_logprobs"),
])
def test_features_the_server_lacks_are_refused_not_ignored(model, fields, param):
    """lm-eval's loglikelihood requests (echo + logprobs) get a 400 saying so, not a completion without them."""
    base = {"model": "m", "prompt": "x"} if model is CompletionRequest else {"model": "m", "messages": [
        {"role": "user", "content": "x"}]}
    request = parse_request(model, json.dumps(base | fields).encode())
    with pytest.raises(APIError) as err:
        request.sampling_params(16)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, "unsupported_value")
    off = {"echo": False, "logprobs": None} if model is CompletionRequest else {"logprobs": False, "top_logprobs": 0}
    assert parse_request(model, json.dumps(base | off).encode()).sampling_params(16).max_new_tokens == 16
