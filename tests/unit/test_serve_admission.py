"""Admission of a request's choices (FdllmServer._admit) on a real AsyncEngine, without Ray running:
one refused choice answers the request at once and aborts the others; a prompt that with its
max_tokens does not fit the context is refused before (FdllmServer._fit_context)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import pytest

import fdllm
from tests.helpers import make_bos_tokenizer, make_tokenizer, slow_steps

pytest.importorskip("ray.serve")
from serve.app import FdllmServer  # noqa: E402
from serve.async_engine import AsyncEngine, EngineOverloaded  # noqa: E402
from serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, TokenizeRequest, parse_request  # noqa: E402

A_REQUEST = parse_request(CompletionRequest, b'{"model": "m", "prompt": "x"}')
LONG = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar", ignore_eos=True)  # ~20 s, slowed


def _prompt_ids_with(tokenizer) -> Callable:
    """FdllmServer._prompt_ids of a server holding `tokenizer` (no engine: it only renders and tokenizes)."""
    server = SimpleNamespace(tokenizer=tokenizer)
    server._encode = partial(FdllmServer.func_or_class._encode, server)
    return partial(FdllmServer.func_or_class._prompt_ids, server)


def _until(drv: AsyncEngine, done, timeout_s: float = 5.0) -> dict:
    """The driver's stats once `done(stats)` holds (or the last ones after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not done(stats := drv.stats()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return stats


def test_a_refused_choice_answers_503_at_once_and_aborts_its_siblings(dllm_dir):
    """Of a request's three choices, one runs, one waits behind the running requests, and one is refused
    once the first has stepped: the 503 comes at once, and neither sibling may decode on for nobody or
    keep pages."""
    engine = fdllm.Engine.from_pretrained(dllm_dir, engine_config=fdllm.EngineConfig(max_num_seqs=2))
    drv = AsyncEngine(engine, max_waiting=2)
    slow_steps(engine)  # 400 tokens of the running request: ~20 s
    # it reads no replica state (a replica needs Ray); the request only names the field of an engine refusal
    admit = partial(FdllmServer.func_or_class._admit, None, body=A_REQUEST)

    async def refused_later():
        """A choice refused after its siblings were added and the first of them stepped."""
        steps = drv.metrics.steps
        while drv.metrics.steps < steps + 3:
            await asyncio.sleep(0.01)
        raise EngineOverloaded("2 requests already waiting; retry later")

    async def main() -> tuple[APIError, float]:
        running = drv.generate([5, 6], LONG, "running")  # another client's: takes one of the two slots
        await anext(running)
        choices = [drv.add([7, 8], LONG, "req-0"), drv.add([9, 8], LONG, "req-1"), refused_later()]
        start = time.monotonic()
        with pytest.raises(APIError) as err:
            await asyncio.wait_for(admit(choices), timeout=5)
        took = time.monotonic() - start
        stats = await asyncio.to_thread(_until, drv, lambda s: s["running"] == 1 and s["waiting"] == 0)
        assert (stats["running"], stats["waiting"]) == (1, 0), stats  # only the other client's request is left
        await running.aclose()
        return err.value, took

    try:
        err, took = asyncio.run(main())
        assert (err.status, err.code) == (503, "overloaded") and took < 2.0, (err.status, err.message, took)
        stats = _until(drv, lambda s: s["running"] == s["waiting"] == 0 and s["free_pages"] == s["total_pages"])
        assert stats["running"] == stats["waiting"] == 0 and stats["free_pages"] == stats["total_pages"], stats
    finally:
        drv.shutdown()


def test_a_queued_stream_starts_at_admission_not_at_its_first_tokens(dllm_dir):
    """A streamed chat queued behind running requests gets its stream, and its role chunk, as soon as the
    engine admits it: before, the response began with its first tokens (a whole decode of the running
    request away, here ~20 s), so a client with a read timeout saw a stalled connection."""
    from serve.metrics import RequestCounters
    from serve.protocol import ResponseHead

    engine = fdllm.Engine.from_pretrained(dllm_dir, engine_config=fdllm.EngineConfig(max_num_seqs=1))
    drv = AsyncEngine(engine, max_waiting=2)
    slow_steps(engine)
    chat = parse_request(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}')
    replica = SimpleNamespace(tokenizer=engine.tokenizer, counters=RequestCounters())
    sse = partial(FdllmServer.func_or_class._sse, replica)

    async def main() -> tuple[str, dict, float]:
        running = drv.generate([5, 6], LONG, "running")
        await anext(running)
        start = time.monotonic()
        streams = await asyncio.wait_for(FdllmServer.func_or_class._admit(None, [drv.add([7, 8], LONG, "queued")], chat), 5)
        events = sse(streams, ResponseHead("chatcmpl-1", "m"), "chat", (), [""], 1, False)
        first = await asyncio.wait_for(anext(events), 5)
        took, stats = time.monotonic() - start, drv.stats()
        await events.aclose()  # the client leaves: the queued request is aborted
        await running.aclose()
        return first, stats, took

    try:
        first, stats, took = asyncio.run(main())
        assert (stats["running"], stats["waiting"]) == (1, 1) and took < 2.0, (stats, took)  # still queued
        chunk = json.loads(first.removeprefix("data: "))
        assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}, chunk
        stats = _until(drv, lambda s: s["running"] == s["waiting"] == 0 and s["free_pages"] == s["total_pages"])
        assert stats["running"] == stats["waiting"] == 0 and stats["free_pages"] == stats["total_pages"], stats
    finally:
        drv.shutdown()


def test_a_client_gone_during_admission_closes_every_choice():
    """Cancelled while admitting (the client hung up), admission closes the choice already added too, not
    only those still being added: its request must not decode on for nobody."""
    admit = partial(FdllmServer.func_or_class._admit, None, body=A_REQUEST)
    closed: list[int] = []

    class Added:
        def __init__(self, i: int) -> None:
            self.i = i

        async def aclose(self) -> None:
            closed.append(self.i)

    async def add(i: int, admitted_after_s: float) -> Added:
        try:
            await asyncio.sleep(admitted_after_s)
        except asyncio.CancelledError:  # as AsyncEngine.add: a cancelled add aborts its own request
            closed.append(i)
            raise
        return Added(i)

    async def main() -> list[int]:
        admitting = asyncio.ensure_future(admit([add(0, 0.0), add(1, 100.0)]))
        await asyncio.sleep(0.05)  # choice 0 is added; choice 1 is still being added
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        return sorted(closed)  # before asyncio.run's end closes what is left

    assert asyncio.run(main()) == [0, 1]


def test_an_engine_refusal_at_admission_is_a_400_naming_the_field(dllm_dir, qwen2_dir):
    """What only the engine can check (token ids past its vocabulary, text delimiters no token holds, the
    mask token in a diffusion prompt, diffusion on a checkpoint without a mask token) was a 400 without a
    param: admission names the field the engine's message starts with (a chat's prompt: `messages`)."""
    dllm, ar = fdllm.Engine.from_pretrained(dllm_dir), fdllm.Engine.from_pretrained(qwen2_dir)
    vocab, mask = dllm.model.config.vocab_size, dllm.config.mask_token_id
    drivers = {engine: AsyncEngine(engine, max_waiting=4) for engine in (dllm, ar)}
    admit = partial(FdllmServer.func_or_class._admit, None)
    chat = {"messages": [{"role": "user", "content": "x"}]}
    cases = [(dllm, {"stop_token_ids": [3, vocab]}, "stop_token_ids"), (dllm, {"logit_bias": {str(vocab): 1}}, "logit_bias"),
             (dllm, {"delimiter_threshold": 0.5, "delimiter_token_ids": [vocab]}, "delimiter_token_ids"),
             (dllm, {"delimiter_threshold": 0.5, "delimiters": ["\u2603"]}, "delimiters"),  # no token's text holds it
             (dllm, {"prompt": [5, vocab]}, "prompt"), (dllm, {"prompt": [5, mask]}, "prompt"),
             (dllm, {**chat, "prompt": [5, mask]}, "messages"),  # "prompt": the ids its messages rendered to
             (ar, {"prompt": [5, 6]}, "mode")]  # diffusion without a mask token

    async def refusal(engine: fdllm.Engine, body: CompletionRequest | ChatCompletionRequest, ids: list[int]) -> APIError:
        with pytest.raises(APIError) as err:
            await admit([drivers[engine].add(ids, body.sampling_params(16), "r")], body)
        return err.value

    try:
        for engine, fields, param in cases:
            ids = fields.get("prompt", [5, 6])
            if "messages" in fields:
                body = parse_request(ChatCompletionRequest, json.dumps({"model": "m", **chat}).encode())
            else:
                body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": ids} | fields).encode())
            err = asyncio.run(refusal(engine, body, ids))
            assert (err.status, err.param, err.type) == (400, param, "invalid_request_error"), (fields, err.message)
            assert err.message.startswith("prompt" if param == "messages" else param), err.message
        assert all(d.stats()["running"] == d.stats()["waiting"] == 0 for d in drivers.values())
    finally:
        for driver in drivers.values():
            driver.shutdown()


def test_a_scoring_refusal_is_a_400_not_a_500():
    """Engine.score's ValueError is a bad request (AsyncEngine.score's contract), not a server failure."""
    asked = []

    async def score(*args):
        asked.append(args)
        raise ValueError("top_logprobs must be an integer in [0, 16], got 20")

    logprobs = partial(FdllmServer.func_or_class._logprobs, SimpleNamespace(engine=SimpleNamespace(score=score)))
    result = fdllm.GenerationResult(request_id="r", prompt_token_ids=[1, 2], token_ids=[3])
    with pytest.raises(APIError) as err:
        asyncio.run(logprobs([1, 2], result, 20, "chat", False, "salt"))
    assert asked == [([1, 2, 3], 20, 2, "salt")]  # scored under the request's cache_salt: its own cached prompt
    assert (err.value.status, err.value.type) == (400, "invalid_request_error")
    assert err.value.message == "top_logprobs must be an integer in [0, 16], got 20"


@pytest.mark.parametrize("model,prompt_tokens,max_tokens,message", [
    (ChatCompletionRequest, 60, 10, "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
     "(60 in the messages, 10 in the completion). Please reduce the length of the messages or completion."),
    (CompletionRequest, 1, 10**30, "This model's maximum context length is 64 tokens. However, you requested "
     f"{10**30 + 1} tokens (1 in the prompt, {10**30} in the completion). Please reduce the length of the prompt or "
     "completion."),
    (CompletionRequest, 64, None, "This model's maximum context length is 64 tokens. However, your prompt resulted in "
     "64 tokens. Please reduce the length of the prompt."),
    (ChatCompletionRequest, 70, 1, "This model's maximum context length is 64 tokens. However, you requested 71 tokens "
     "(70 in the messages, 1 in the completion). Please reduce the length of the messages or completion."),
    (ChatCompletionRequest, 2, 10**400, "This model's maximum context length is 64 tokens. However, you requested "  # JSON's
     f"{10**400 + 2} tokens (2 in the messages, {10**400} in the completion). Please reduce the length of the messages "
     "or completion."),  # 10**400 is an int: formatted whole, no 500
])
def test_a_prompt_past_the_context_with_its_max_tokens_is_openais_context_length_exceeded(model, prompt_tokens,
                                                                                        max_tokens, message):
    """In OpenAI's words (NextChat#3195 quotes them), naming the prompt's field: a huge max_tokens reached the
    engine, whose refusal named no field and had no code."""
    fit = partial(FdllmServer.func_or_class._fit_context,
                  SimpleNamespace(max_model_len=64, cfg=SimpleNamespace(default_max_tokens=None)))
    prompt = {"messages": [{"role": "user", "content": "x"}]} if model is ChatCompletionRequest else {"prompt": "x"}
    body = parse_request(model, json.dumps({"model": "m", "max_tokens": max_tokens, **prompt}).encode())
    with pytest.raises(APIError) as err:
        fit(body.sampling_params(64), list(range(prompt_tokens)), body)
    param = "messages" if model is ChatCompletionRequest else "prompt"
    assert err.value.status == 400
    assert err.value.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                          "code": "context_length_exceeded"}}


@pytest.mark.parametrize("max_tokens,default,prompt_tokens,granted", [
    (4, None, 60, 4), (None, None, 60, 4), (None, 2, 60, 2),
    (None, 16, 60, 4), (None, 16, 10, 16),  # the server's default_max_tokens, never past the rest of the context
])
def test_a_prompt_that_fits_keeps_its_max_tokens_or_gets_the_rest_of_the_context(max_tokens, default, prompt_tokens,
                                                                                  granted):
    fit = partial(FdllmServer.func_or_class._fit_context,
                  SimpleNamespace(max_model_len=64, cfg=SimpleNamespace(default_max_tokens=default)))
    body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "x", "max_tokens": max_tokens}).encode())
    assert fit(body.sampling_params(64), list(range(prompt_tokens)), body).max_new_tokens == granted


def test_min_tokens_past_what_the_context_grants_is_openais_range_error():
    """Without max_tokens a request gets the rest of the context: a min_tokens past it was the engine's
    refusal, with no code."""
    fit = partial(FdllmServer.func_or_class._fit_context,
                  SimpleNamespace(max_model_len=64, cfg=SimpleNamespace(default_max_tokens=None)))
    body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "x", "min_tokens": 10}).encode())
    with pytest.raises(APIError) as err:
        fit(body.sampling_params(64), list(range(60)), body)
    assert err.value.body() == {"error": {
        "message": "Invalid 'min_tokens': integer above maximum value. Expected a value <= 4, but got 10 instead.",
        "type": "invalid_request_error", "param": "min_tokens", "code": "integer_above_max_value"}}


@pytest.mark.parametrize("prompt", [[5, 100], [-1], [[5], [10**12]], [10**400]])
def test_token_id_prompts_outside_the_vocabulary_are_a_400_before_echo_decodes_them(prompt):
    """echo decodes a completion's token-id prompts before admission, where the engine refuses them: the
    tokenizer raised OverflowError on ids past 32 bits or below 0, a 500."""
    prompt_ids = partial(FdllmServer.func_or_class._prompt_ids, SimpleNamespace(vocab_size=100))
    body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": prompt, "echo": True}).encode())
    with pytest.raises(APIError) as err:
        prompt_ids(body)
    assert (err.value.status, err.value.param, err.value.message) == (400, "prompt", "token ids must be in [0, 100)")
    assert prompt_ids(parse_request(CompletionRequest, b'{"model": "m", "prompt": [[0, 99], [5]]}')) == [[0, 99], [5]]


@pytest.mark.parametrize("model", [ChatCompletionRequest, TokenizeRequest])
@pytest.mark.parametrize("content,param,code,message", [
    ([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
     "messages[1].content[1].type", "unsupported_value", "only text content parts are supported, got a part of type 'image_url'"),
    ([{"type": "text"}], "messages[1].content[0].text", "invalid_type", "a text content part needs its 'text', a string"),
    ([{"type": "text", "text": 5}], "messages[1].content[0].text", "invalid_type", "a text content part needs its 'text', a string"),
])
def test_content_the_server_cannot_take_is_a_400_at_its_parts_path(model, content, param, code, message):
    """An image part was refused inside the template's try, blaming the chat template; then at `messages`,
    naming neither the message nor the part."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": content}]
    with pytest.raises(APIError) as err:
        parse_request(model, json.dumps({"model": "m", "messages": messages}).encode())
    assert err.value.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


@pytest.mark.parametrize("model", [ChatCompletionRequest, TokenizeRequest])
def test_text_parts_are_the_text_they_join(model):
    prompt_ids = _prompt_ids_with(make_tokenizer())
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    text_only = parse_request(model, json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}).encode())
    assert prompt_ids(text_only) == prompt_ids(parse_request(model, json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()))


@pytest.mark.parametrize("model", [ChatCompletionRequest, TokenizeRequest])
def test_chat_template_kwargs_reach_the_template_and_cannot_change_how_it_renders(model):
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking switch) are variables the template reads; they
    were logged as ignored, so a client turning thinking off got it on. The template's rendering
    arguments (tokenize, add_generation_prompt, ...) are no variables: a 400 naming the field."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}no thinking{% endif %}")
    prompt_ids = _prompt_ids_with(tokenizer)

    def rendered(**fields) -> str:
        body = parse_request(model, json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]} | fields).encode())
        return tokenizer.decode(prompt_ids(body)[0])

    assert rendered() == rendered(chat_template_kwargs=None) == rendered(chat_template_kwargs={"enable_thinking": True}) == "hi\n"
    assert rendered(chat_template_kwargs={"enable_thinking": False}) == "hi\nno thinking"
    # the rendering's arguments, and the variables it sets: {"messages": []} was a Jinja TypeError blamed on `messages`
    for clash in ({"tokenize": True}, {"add_generation_prompt": False, "x": 1}, {"messages": []}, {"tools": []}):
        with pytest.raises(APIError) as err:
            rendered(chat_template_kwargs=clash)
        assert (err.value.status, err.value.param) == (400, "chat_template_kwargs") and "not a variable" in err.value.message


def test_the_prompt_past_the_context_in_a_batch_is_named_by_its_index():
    fit = partial(FdllmServer.func_or_class._fit_context,
                  SimpleNamespace(max_model_len=64, cfg=SimpleNamespace(default_max_tokens=None)))
    body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 8}).encode())
    params = body.sampling_params(64)
    assert fit(params, list(range(50)), body, 0) == params
    with pytest.raises(APIError) as err:
        fit(params, list(range(60)), body, 1)
    assert err.value.body()["error"]["param"] == "prompt[1]"
    assert err.value.body()["error"]["code"] == "context_length_exceeded"


def test_a_client_hanging_up_is_logged_as_a_disconnect_not_an_unhandled_error(caplog):
    """Ray Serve's `receive()` raises TaskCancelledError (or a RayTaskError of it) into a handler whose client
    disconnected; the catch-all logged each one as "unhandled error" with a traceback, at ERROR."""
    import logging

    from ray.exceptions import RayTaskError, TaskCancelledError
    from starlette.requests import Request

    from serve.app import _unexpected_error

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""})
    hung_up = (TaskCancelledError(), RayTaskError("receive_asgi_messages", "", TaskCancelledError()).as_instanceof_cause())
    with caplog.at_level(logging.INFO, logger="fdllm.serve"):
        answers = [asyncio.run(_unexpected_error(request, err)) for err in hung_up]
    assert [r.status_code for r in answers] == [499, 499]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "client disconnected during POST /v1/completions")] * 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fdllm.serve"):
        assert asyncio.run(_unexpected_error(request, RuntimeError("bug"))).status_code == 500
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_a_completion_prompt_that_begins_with_bos_gets_no_second_one():
    """A chat rendered by the client (lm-evaluation-harness's apply_chat_template) sent to /v1/completions
    is the chat request's prompt, one BOS, as transformers tokenizes the chat; other text gets the
    tokenizer's BOS unless add_special_tokens is false."""
    tok = make_bos_tokenizer()
    prompt_ids = _prompt_ids_with(tok)
    chat = [{"role": "user", "content": "hi"}]

    def ids(model, **fields) -> list[int]:
        return prompt_ids(parse_request(model, json.dumps({"model": "m"} | fields).encode()))[0]

    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ids(CompletionRequest, prompt=rendered) == ids(ChatCompletionRequest, messages=chat) \
        == tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids(CompletionRequest, prompt="hello") == tok("hello").input_ids != tok("hello", add_special_tokens=False).input_ids
    assert ids(CompletionRequest, prompt="hello", add_special_tokens=False) == tok("hello", add_special_tokens=False).input_ids
    with pytest.raises(APIError) as err:  # a truthy string was read as true, and the field logged as ignored
        ids(CompletionRequest, prompt="hello", add_special_tokens="false")
    assert (err.value.param, err.value.code) == ("add_special_tokens", "invalid_type")
