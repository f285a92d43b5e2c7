"""The replica's own methods without Ray or a model: `_sse` on hand-made choice streams (what a streaming
client reads, checked against OpenAI's stream format), `_read_body`'s size limit, `_serve` over a fake engine
(one engine request per choice, each choice its own prompt's echo, a streamed 200 counted)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")
# a replica made without Ray (object.__new__ of the deployment's class) leaves Serve's ingress wrapper an
# un-awaited __del__ coroutine when collected: Ray's, not these tests'
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__. was never awaited")
from fdllm.engine import GenerationResult  # noqa: E402
from serve.app import FdllmServer  # noqa: E402
from serve.async_engine import RequestFailed, TokenDelta  # noqa: E402
from serve.metrics import RequestCounters  # noqa: E402
from serve.protocol import CompletionRequest, ResponseHead  # noqa: E402
from tests.helpers import make_tokenizer  # noqa: E402


def _choice(tok, text: str, prompt: list[int], finish: str, fail: bool = False):
    ids = tok.encode(text)

    async def events():
        await asyncio.sleep(0)
        yield TokenDelta(ids[:2])
        await asyncio.sleep(0)
        if fail:
            raise RequestFailed("boom")
        yield TokenDelta(ids[2:])
        yield GenerationResult(request_id="r", prompt_token_ids=prompt, token_ids=ids, text=text, finish_reason=finish)

    return events()


def _read(chunks_source, tok, chat=True, n=2, include_usage=True):
    replica = SimpleNamespace(tokenizer=tok, counters=RequestCounters())

    async def main():
        events = FdllmServer.func_or_class._sse(replica, chunks_source, ResponseHead("chatcmpl-1", "m"),
                                                "chat" if chat else "completions", (), [""], n, include_usage)
        return [e async for e in events]

    return asyncio.run(main()), replica.counters


def test_a_chat_stream_of_n_choices_with_include_usage_is_openais():
    tok = make_tokenizer()
    texts, prompt = ["the quick brown fox", "hello world 12"], [5, 6, 7]
    lines, counters = _read([_choice(tok, texts[0], prompt, "stop"), _choice(tok, texts[1], prompt, "length")], tok)
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    # the usage chunk: exactly one, the last, no choices; prompt counted once for the n choices
    with_usage = [c for c in chunks if c.get("usage") is not None]
    assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
    completion = sum(len(tok.encode(t)) for t in texts)
    assert chunks[-1]["usage"]["prompt_tokens"] == 3 and chunks[-1]["usage"]["completion_tokens"] == completion
    assert chunks[-1]["usage"]["total_tokens"] == 3 + completion
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # stream_options: null on every other
    for k, (text, finish) in enumerate(zip(texts, ["stop", "length"])):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == k]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == text
        finishes = [c for c in mine if c["finish_reason"] is not None]
        assert finishes == [mine[-1]] and mine[-1]["finish_reason"] == finish
        assert mine[-1]["delta"] == {}  # OpenAI's last chunk of a choice: an empty delta
    assert (counters.prompt_tokens, counters.completion_tokens, counters.stream_errors) == (3, completion, 0)  # as usage


def test_a_stream_without_include_usage_has_no_usage_and_ends_with_done():
    tok = make_tokenizer()
    lines, _ = _read([_choice(tok, "the fox", [1], "stop")], tok, chat=False, n=1, include_usage=False)
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "the fox"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"


def test_a_stream_failing_midway_ends_with_an_error_event_then_done_and_is_counted():
    tok = make_tokenizer()
    lines, counters = _read([_choice(tok, "the quick brown fox", [1], "stop", fail=True)], tok, n=1)
    assert lines[-1] == "data: [DONE]\n\n"
    error = json.loads(lines[-2][len("data: "):])
    assert error["error"]["code"] == "engine_error" and error["error"]["type"] == "server_error"
    assert counters.stream_errors == 1


@pytest.mark.parametrize("declare", [True, False])
def test_a_body_of_exactly_max_body_bytes_is_read_and_one_byte_more_is_413(declare):
    from serve.protocol import APIError

    replica = SimpleNamespace(cfg=SimpleNamespace(max_body_bytes=10, body_timeout_s=5.0))

    def request(body: bytes):
        async def stream():
            for i in range(0, len(body), 3):
                yield body[i : i + 3]

        return SimpleNamespace(headers={"content-length": str(len(body))} if declare else {}, stream=stream)

    read = lambda body: asyncio.run(FdllmServer.func_or_class._read_body(replica, request(body)))  # noqa: E731
    assert read(b"x" * 10) == b"x" * 10
    with pytest.raises(APIError) as err:
        read(b"x" * 11)
    assert (err.value.status, err.value.code) == (413, "request_too_large")


def test_a_body_trickled_past_body_timeout_s_is_408():
    """Serve's replica reads a body from the proxy as it arrives: a client sending a byte now and then
    (slowloris) held one of the replica's max_ongoing_requests for as long as it liked."""
    from serve.protocol import APIError

    replica = SimpleNamespace(cfg=SimpleNamespace(max_body_bytes=100, body_timeout_s=0.3))

    async def trickle():
        while True:
            yield b"{"
            await asyncio.sleep(0.05)

    start = time.monotonic()
    with pytest.raises(APIError) as err:
        asyncio.run(FdllmServer.func_or_class._read_body(replica, SimpleNamespace(headers={}, stream=trickle)))
    assert (err.value.status, err.value.code) == (408, "request_timeout") and time.monotonic() - start < 2.0


def _replica(tok, engine):
    """An FdllmServer without Ray or a checkpoint: its routes' own methods over `engine` (a fake AsyncEngine)."""
    from serve.app import ServerConfig

    replica = object.__new__(FdllmServer.func_or_class)
    cfg = object.__new__(ServerConfig)  # no checkpoint to resolve: the fields _serve reads
    cfg.__dict__.update(default_max_tokens=None, block_lookahead=False, max_waiting=64, max_prompt_chars=10_000,
                        fault_injection=False)
    replica.__dict__.update(cfg=cfg, tokenizer=tok, engine=engine, counters=RequestCounters(), model_name="m",
                            default_mode="diffusion", vocab_size=len(tok), scores_causally=False, max_model_len=256,
                            sampling_defaults={}, stop_token_ids_for=lambda params: frozenset(params.stop_token_ids))
    return replica


class _EchoEngine:
    """Answers each request at once: two tokens, the text "<k>" (k: its order of arrival)."""

    def __init__(self):
        self.ids = []

    async def add(self, ids, params, request_id, inject_fault=False):
        self.ids.append(request_id)

        async def stream():
            yield GenerationResult(request_id=request_id, prompt_token_ids=ids, token_ids=[7, 7], text=f"<{len(self.ids)}>",
                                   finish_reason="length")

        return stream()


def test_a_batch_of_prompts_times_n_gets_distinct_engine_requests_and_each_choice_its_own_prompts_echo():
    from serve.protocol import CompletionRequest, parse_request

    tok = make_tokenizer()
    engine = _EchoEngine()
    replica = _replica(tok, engine)
    body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": ["the fox", "hello world"], "n": 2,
                                                        "max_tokens": 2, "echo": True}).encode())
    response = asyncio.run(FdllmServer.func_or_class._serve(replica, body, "completions", SimpleNamespace(headers={})))
    answer = json.loads(response.body)
    assert len(engine.ids) == len(set(engine.ids)) == 4  # one engine request per choice, none sharing an id
    texts = [c["text"] for c in answer["choices"]]
    assert [t.split("<")[0] for t in texts] == ["the fox", "the fox", "hello world", "hello world"]  # choice i*n+j: prompt i
    assert answer["usage"]["prompt_tokens"] == len(tok.encode("the fox")) + len(tok.encode("hello world"))
    assert answer["usage"]["completion_tokens"] == 8


def test_ignored_field_names_are_logged_escaped_and_bounded(caplog):
    """The names of unknown fields are the client's: one holding a newline wrote a forged line into the
    replica's log, and a body of many thousand keys one line of its whole size per request."""
    from serve.protocol import CompletionRequest, parse_request

    replica = _replica(make_tokenizer(), _EchoEngine())
    fields = {"a\nERROR forged": 1, **{f"k{i}" + "y" * 100: 1 for i in range(50)}}
    body = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "the fox", "max_tokens": 2, **fields}).encode())
    with caplog.at_level(logging.WARNING, logger="fdllm.serve"):
        asyncio.run(FdllmServer.func_or_class._serve(replica, body, "completions", SimpleNamespace(headers={})))
    (line,) = [r.getMessage() for r in caplog.records if "fields ignored" in r.getMessage()]
    assert "\n" not in line and "'k0yy" in line and "'a\\nERROR forged'" in line
    assert len(line) < 2000 and line.endswith("(51 in all)")


@pytest.mark.parametrize("sent,ok", [(b"Bearer sk-t\xc3\xabst", True), (b"bearer  sk-t\xc3\xabst", True),
                                     (b"Bearer sk-t\xebst", False), (b"Bearer sk-t\xc3\x83\xc2\xabst", False)])
def test_a_non_ascii_api_key_matches_the_bytes_clients_send_its_utf8(sent, ok):
    """curl sends a key's UTF-8 bytes, which the header's Latin-1 decoding and a UTF-8 encode doubled: a key
    with a non-ASCII character could never be given."""
    from starlette.requests import Request

    from serve.protocol import APIError

    request = Request({"type": "http", "headers": [(b"authorization", sent)]})
    authorize = partial(FdllmServer.func_or_class._authorize, SimpleNamespace(api_key="sk-t\u00ebst"))
    if ok:
        authorize(request)
    else:
        with pytest.raises(APIError):
            authorize(request)


def test_a_streamed_request_is_counted_as_a_200():
    from serve.protocol import CompletionRequest, parse_request

    replica = _replica(make_tokenizer(), _EchoEngine())
    body = parse_request(CompletionRequest, b'{"model": "m", "prompt": "the fox", "max_tokens": 2, "stream": true}')

    async def main():
        response = await FdllmServer.func_or_class._serve(replica, body, "completions", SimpleNamespace(headers={}))
        return [chunk async for chunk in response.body_iterator]

    chunks = asyncio.run(main())
    assert chunks[-1] == "data: [DONE]\n\n"
    assert replica.counters.by_status == {("completions", 200): 1}
    assert replica.counters.completion_tokens == 2  # the finished choice is recorded once


def test_a_client_hanging_up_on_a_stream_under_ray_serve_closes_it_quietly():
    """Under Ray Serve a client's hang-up is `receive()` raising TaskCancelledError, not `http.disconnect`:
    starlette's listener let it escape (an ERROR "Request failed." traceback per such client). The stream
    ends as a disconnect ends it: its generator closed, which aborts its requests."""
    from ray.exceptions import TaskCancelledError

    from serve.app import EventStream

    closed, sent = asyncio.Event(), []

    async def events():
        try:
            while True:
                yield "data: {}\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def receive():
        await asyncio.sleep(0.05)
        raise TaskCancelledError()

    async def send(message):
        sent.append(message["type"])

    async def main():
        await asyncio.wait_for(EventStream(events())({"type": "http", "asgi": {"spec_version": "2.0"}}, receive, send), 5)

    asyncio.run(main())
    assert closed.is_set() and sent[0] == "http.response.start" and "http.response.body" in sent


@pytest.mark.parametrize("hang_up", ["CancelledError", "TaskCancelledError"])
def test_a_request_whose_client_hung_up_is_counted_as_499(hang_up):
    """A non-streaming request abandoned by its client (a timeout, a closed connection) is cancelled by
    Serve; it was counted under no status at all, so the request and error rates missed exactly those."""
    from ray import exceptions

    error = getattr(asyncio, hang_up, None) or getattr(exceptions, hang_up)

    async def respond(body, endpoint, request):
        raise error()

    async def read_body(request):
        return json.dumps({"model": "m", "prompt": "hi"}).encode()

    replica = SimpleNamespace(_authorize=lambda request: None, _read_body=read_body, counters=RequestCounters())
    with pytest.raises(error):
        asyncio.run(FdllmServer.func_or_class._handle(replica, None, CompletionRequest, "completions", respond))
    assert replica.counters.by_status == {("completions", 499): 1}


def test_a_replicas_engine_and_app_log_where_serve_logs(monkeypatch):
    """Serve gives only the "ray.serve" logger handlers in a replica (its log file, the driver's console):
    the engine's and the app's INFO lines (KV pages, the model's sampling defaults, disconnects) went nowhere."""
    import logging

    from serve.app import log_through_serve

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.name, record.getMessage()))
    serve_logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(serve_logger, "handlers", [handler])
    monkeypatch.setattr(serve_logger, "level", logging.INFO)
    log_through_serve()
    logging.getLogger("fdllm.engine.engine").info("engine: 8 KV pages")
    logging.getLogger("serve.async_engine").info("a request aborted")
    logging.getLogger("fdllm.engine.engine").debug("not at Serve's level")
    assert seen == [("fdllm.engine.engine", "engine: 8 KV pages"), ("serve.async_engine", "a request aborted")]
