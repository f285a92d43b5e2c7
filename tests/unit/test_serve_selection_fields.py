"""The HTTP API's selection-policy fields (serve/protocol.py) reach SamplingParams, and bad values are
OpenAI-style 400s naming the field, checked without a server (tests/integration/test_serve.py sends
some of them over HTTP)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydantic")

from serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request  # noqa: E402


def params_of(body: dict, model=CompletionRequest):
    base = {"model": "m", "prompt": "x"} if model is CompletionRequest else {"model": "m", "messages": [
        {"role": "user", "content": "x"}]}
    return parse_request(model, json.dumps(base | body).encode()).sampling_params(16)


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_policy_fields_reach_sampling_params(model):
    sp = params_of({"selection": "entropy_budget", "entropy_budget": 0.75, "delimiter_threshold": 0.4,
                    "delimiters": ["\n", ";"], "delimiter_token_ids": [3]}, model)
    assert (sp.selection, sp.entropy_budget, sp.delimiter_threshold) == ("entropy_budget", 0.75, 0.4)
    assert sp.delimiters == ("\n", ";") and sp.delimiter_token_ids == (3,)
    sp = params_of({"block_lookahead": True}, model)
    assert sp.block_lookahead and sp.mode == "diffusion"
    default = params_of({}, model)
    assert (default.selection, default.entropy_budget, default.delimiter_threshold, default.delimiters) == (
        "threshold", None, None, None)
    assert default.block_lookahead is False


def test_empty_delimiter_lists_ask_for_nothing():
    """`delimiters: []` asks for no delimiter, as `delimiter_token_ids: []` does: no delimiter_threshold
    needed (it was refused as if it asked for the boundary), and with one, only the end tokens delimit."""
    assert params_of({"delimiters": []}).delimiters == () and params_of({"delimiter_token_ids": []}).delimiter_token_ids == ()
    assert params_of({"delimiters": [], "delimiter_threshold": 0.3}).delimiters == ()


def test_the_servers_block_lookahead_default_applies_to_diffusion_requests_that_do_not_set_it():
    def lookahead(body, default):
        request = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "x"} | body).encode())
        return request.sampling_params(16, default_block_lookahead=default).block_lookahead

    assert lookahead({}, True) and not lookahead({}, False)
    assert not lookahead({"block_lookahead": False}, True) and lookahead({"block_lookahead": True}, False)
    assert not lookahead({"mode": "ar"}, True) and not lookahead({"mode": "speculative"}, True)


@pytest.mark.parametrize("body,param", [
    ({"selection": "greedy"}, "selection"),
    ({"selection": "entropy_budget", "entropy_budget": -1}, "entropy_budget"),
    ({"selection": "entropy_budget", "entropy_budget": "lots"}, "entropy_budget"),
    ({"entropy_budget": 0.5}, "entropy_budget"),  # needs selection="entropy_budget"
    ({"selection": "entropy_budget", "threshold": 0.9}, "threshold"),
    ({"delimiter_threshold": 1.2}, "delimiter_threshold"),
    ({"delimiter_threshold": -0.2}, "delimiter_threshold"),
    ({"delimiter_threshold": 0.5, "delimiters": [""]}, "delimiters[0]"),
    ({"delimiter_threshold": 0.5, "delimiters": ["x" * 33]}, "delimiters[0]"),
    ({"delimiter_threshold": 0.5, "delimiters": "\n"}, "delimiters"),
    ({"delimiter_threshold": 0.5, "delimiters": ["a"] * 17}, "delimiters"),
    ({"delimiter_threshold": 0.5, "delimiter_token_ids": [-4]}, "delimiter_token_ids[0]"),
    ({"delimiters": ["\n"]}, "delimiters"),  # needs delimiter_threshold
    ({"block_lookahead": True, "mode": "ar"}, "block_lookahead"),  # diffusion mode only
    ({"block_lookahead": True, "mode": "speculative"}, "block_lookahead"),
    ({"block_lookahead": "sometimes"}, "block_lookahead"),
])
def test_bad_policy_values_are_400s_naming_the_field(body, param):
    with pytest.raises(APIError) as err:
        params_of(body)
    assert err.value.status == 400 and err.value.param == param, err.value.message
    assert err.value.body()["error"]["type"] == "invalid_request_error"
