"""The OpenAI-compatible Serve app on a real local Ray cluster, over HTTP (httpx and the openai client)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
import torch

import fdllm

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tests.helpers import start_local_ray  # noqa: E402

API_KEY = "test-key"
MODEL = "tiny-dllm"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


MAX_BODY_BYTES, MAX_PROMPT_CHARS = 65536, 5000
# The test tokenizer's ChatML template, plus a rule as real templates have (raise_exception)
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('conversations must not start with the assistant') }}"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def served_dir(dllm_dir, tmp_path_factory):
    """The tiny checkpoint with a chat template that rejects some conversations."""
    import shutil

    from fdllm.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("served") / "ckpt"
    shutil.copytree(dllm_dir, path)
    tok = load_tokenizer(path)
    tok.chat_template = STRICT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(served_dir):
    from serve.app import run_local

    start_local_ray(num_cpus=4)
    yield run_local({"model": str(served_dir), "model_name": MODEL, "api_key": API_KEY,
                     "default_max_tokens": 16, "max_waiting": 4, "fault_injection": True,
                     "max_body_bytes": MAX_BODY_BYTES, "max_prompt_chars": MAX_PROMPT_CHARS}, timeout_s=60)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(dllm_dir):
    return fdllm.Engine.from_pretrained(dllm_dir)


def post(url: str, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kw)


def test_models_health_metrics(server):
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["free_pages"] == health["total_pages"]
    metrics = httpx.get(f"{server}/metrics").text
    assert "fdllm_tokens_per_forward" in metrics and "fdllm_waiting_requests" in metrics


def test_greedy_completion_equals_engine_generate(server, engine):
    prompt = "hello world, the quick"
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    expect = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    assert body["choices"][0]["text"] == expect.text
    assert body["choices"][0]["finish_reason"] == expect.finish_reason
    assert _counts(body["usage"]) == {"prompt_tokens": len(expect.prompt_token_ids), "completion_tokens": len(expect.token_ids),
                                      "total_tokens": len(expect.prompt_token_ids) + len(expect.token_ids)}
    assert body["fdllm"]["num_forwards"] == expect.num_forwards


def test_selection_policies_over_http_equal_engine_generate(server, engine):
    prompt = "hello world, the quick"
    fields = {"selection": "entropy_budget", "entropy_budget": 2.0, "delimiter_threshold": 0.1, "delimiters": [" ", ","]}
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    sp = fdllm.SamplingParams(max_new_tokens=12, **{**fields, "delimiters": tuple(fields["delimiters"])})
    expect = engine.generate([prompt], sp)[0]
    assert r.json()["choices"][0]["text"] == expect.text
    assert r.json()["fdllm"]["num_forwards"] == expect.num_forwards


def test_block_lookahead_over_http_equals_engine_generate(server, engine):
    prompt = "hello world, the quick"
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                                         "threshold": 0.3, "block_lookahead": True})
    assert r.status_code == 200, r.text
    expect = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=24, threshold=0.3, block_lookahead=True))[0]
    assert r.json()["choices"][0]["text"] == expect.text
    assert r.json()["fdllm"]["num_forwards"] == expect.num_forwards
    bad = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "mode": "ar", "block_lookahead": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "block_lookahead"


def test_quantized_deployments_serve_what_a_quantized_engine_decodes(server, served_dir):
    """`engine: {quantization: ...}` reaches the replicas: each format's app answers as an in-process
    engine with the same quantization does (two apps beside the main one, on their own routes)."""
    pytest.importorskip("torchao")
    from serve.app import build_app

    prompt = "hello world, the quick"
    for fmt in ("int8", "int4"):
        serve.run(build_app({"model": str(served_dir), "model_name": MODEL, "api_key": API_KEY,
                             "num_cpus_per_replica": 0.5, "engine": {"quantization": fmt}}),
                  name=f"fdllm-{fmt}", route_prefix=f"/{fmt}")
    try:
        for fmt in ("int8", "int4"):
            engine = fdllm.Engine.from_pretrained(served_dir, engine_config=fdllm.EngineConfig(quantization=fmt))
            expect = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=12, temperature=0.0))[0]
            deadline = time.monotonic() + 120
            while (r := post(server, f"/{fmt}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                                "temperature": 0})).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(1)
            assert r.json()["choices"][0]["text"] == expect.text, fmt
    finally:
        for fmt in ("int8", "int4"):
            serve.delete(f"fdllm-{fmt}")


def test_batched_prompts_and_n_choices_equal_engine_generate(server, engine, good_answers):
    """Choice i * n + j answers prompt i; greedy choices are the engine's decode of their prompt, seeded
    ones reproducible, choice 0 the request's own seed; usage counts each prompt once."""
    prompts = ["hello world", "the quick"]
    body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 8, "temperature": 0}
    r = post(server, "/v1/completions", body).json()
    expect = engine.generate(prompts, fdllm.SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == [e.text for e in expect for _ in range(2)]
    assert r["usage"]["prompt_tokens"] == sum(len(e.prompt_token_ids) for e in expect)
    assert r["usage"]["completion_tokens"] == 2 * sum(len(e.token_ids) for e in expect)
    sampled = {"model": MODEL, "prompt": "hello", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    first, again = (post(server, "/v1/completions", sampled).json()["choices"] for _ in range(2))
    texts = [c["text"] for c in first]
    assert texts == [c["text"] for c in again] and len(set(texts)) == 3
    alone = post(server, "/v1/completions", {**sampled, "n": 1}).json()["choices"]
    assert [c["text"] for c in alone] == texts[:1]
    assert_unharmed(server, good_answers)


def _counts(usage: dict) -> dict:
    """A usage's token counts, without how many prompt tokens the prefix cache served (the second of two
    requests for the same prompt finds its blocks cached)."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def test_n_choices_stream_as_they_come(server):
    body = {"model": MODEL, "messages": _user("hello"), "n": 3, "max_tokens": 10, "temperature": 1.0, "seed": 4}
    whole = post(server, "/v1/chat/completions", body).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=streamed, headers=AUTH, timeout=60) as r:
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and line != "data: [DONE]"]
    *chunks, last = chunks
    texts, finishes = ["", "", ""], [None] * 3
    for c in chunks:
        choice = c["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content", "")
        finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert finishes == [c["finish_reason"] for c in whole["choices"]]
    assert last["choices"] == [] and _counts(last["usage"]) == _counts(whole["usage"])  # OpenAI's include_usage chunk
    assert all("usage" in c and c["usage"] is None for c in chunks)  # OpenAI: "also include a usage field, ... null"


def test_chat_and_streaming_agree(server):
    msg = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0}
    whole = post(server, "/v1/chat/completions", msg).json()
    text = whole["choices"][0]["message"]["content"]
    pieces, finish = [], None
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**msg, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        pieces.append(chunk["choices"][0]["delta"].get("content", ""))
        finish = chunk["choices"][0]["finish_reason"] or finish
        assert "usage" not in chunk  # only with stream_options.include_usage, as OpenAI
    assert "".join(pieces) == text
    assert finish == whole["choices"][0]["finish_reason"]


def test_openai_client(server, served_dir, engine):
    from fdllm.tokenizer import load_tokenizer, render_chat

    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    done = client.completions.create(model=MODEL, prompt="the quick", max_tokens=8, temperature=0)
    assert isinstance(done.choices[0].text, str) and 1 <= done.usage.completion_tokens <= 8
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    nulls = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           temperature=0, top_p=None, n=None, logprobs=None, stream_options=None)
    assert nulls.choices[0].message.content == chat.choices[0].message.content  # the client's None: the default
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].choices == [] and _counts(chunks[-1].usage.model_dump()) == _counts(chat.usage.model_dump())
    assert len({(c.id, c.created) for c in chunks}) == 1  # one id and one creation time for the whole stream
    assert client.models.retrieve(MODEL).id == MODEL and [m.id for m in client.models.list()] == [MODEL]
    for unknown in (lambda: client.completions.create(model="gpt-4", prompt="x", max_tokens=2),
                    lambda: client.models.retrieve("gpt-4"), lambda: client.models.retrieve("org/gpt-4")):
        with pytest.raises(openai.NotFoundError):
            unknown()
    # invalid values as OpenAI answers them (serve.request_errors), which the client reads into its
    # BadRequestError: code, param (the value's path) and message
    user = [{"role": "user", "content": "x"}]
    for wrong, code, param, message in (
        (lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=True), "invalid_type", "max_tokens",
         "Invalid type for 'max_tokens': expected an integer, but got a boolean instead."),
        (lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 7}]), "invalid_type",
         "messages[0].content",
         "Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an integer instead."),
        (lambda: client.completions.create(model=MODEL, prompt="x", logit_bias={"5": None}), "invalid_type", "logit_bias.5",
         "Invalid type for 'logit_bias.5': expected a decimal, but got null instead."),
        (lambda: client.completions.create(model=MODEL, prompt="x", logit_bias={"AI": 5}), None, "logit_bias",
         "Invalid key in 'logit_bias': AI. You should only be submitting non-negative integers."),
        (lambda: client.completions.create(model=MODEL, prompt="x", logit_bias={str(engine.model.config.vocab_size): -100}),
         None, "logit_bias", f"Invalid key in 'logit_bias': {engine.model.config.vocab_size}. Maximum value is "
         f"{engine.model.config.vocab_size - 1}."),
        (lambda: client.post("/chat/completions", cast_to=object, body={"model": MODEL}), "missing_required_parameter",
         "messages", "Missing required parameter: 'messages'."),
        (lambda: client.chat.completions.create(model=MODEL, messages=user, temperature=3), "decimal_above_max_value",
         "temperature", "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."),
        (lambda: client.completions.create(model=MODEL, prompt="x", top_p=1.5), "decimal_above_max_value", "top_p",
         "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 1.5 instead."),
        (lambda: client.completions.create(model=MODEL, prompt="x", n=0), "integer_below_min_value", "n",
         "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
        (lambda: client.completions.create(model=MODEL, prompt="x", stop=list("abcde")), "array_above_max_length", "stop",
         "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length 5 instead."),
        (lambda: client.chat.completions.create(model=MODEL, messages=[]), "empty_array", "messages",
         "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."),
        (lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}]),
         "invalid_value", "messages[0].role",
         "Invalid value: 'wizard'. Supported values are: 'system', 'user', 'assistant', 'developer', and 'tool'."),
        (lambda: client.completions.create(model=MODEL, prompt="x", extra_body={"mode": "beam"}), "invalid_value", "mode",
         "Invalid value: 'beam'. Supported values are: 'diffusion', 'ar', and 'speculative'."),
        (lambda: client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=10**30), "context_length_exceeded",
         "prompt", f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
         f"{10**30 + 2} tokens (2 in the prompt, {10**30} in the completion). Please reduce the length of the prompt "
         "or completion."),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            wrong()
        assert (err.value.code, err.value.param, err.value.type) == (code, param, "invalid_request_error")
        assert err.value.body["message"] == message and message in err.value.message
    tok = load_tokenizer(served_dir)
    for mode in ("diffusion", "ar", "speculative"):  # +100 forces the token, greedy or sampled
        forced = client.completions.create(model=MODEL, prompt="the quick", max_tokens=5, temperature=0.8, seed=3,
                                           logit_bias={"42": 100}, extra_body={"mode": mode})
        assert forced.choices[0].text == tok.decode([42] * 5) and forced.usage.completion_tokens == 5
    batch = client.completions.create(model=MODEL, prompt=["the quick", "hello"], n=2, max_tokens=4, temperature=0.7, seed=1)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    chats = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2)
    assert [c.index for c in chats.choices] == [0, 1] and chats.usage.completion_tokens >= 2
    # a system prompt the second conversation shares: its blocks (8 tokens) come from the prefix cache
    system = {"role": "system", "content": "You are a terse assistant. Answer in one word, lower case, no punctuation."}
    first, second = (client.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": q}],
                                                    max_tokens=2, temperature=0) for q in ("hi", "ho"))
    ids = [tok.encode(render_chat(tok, [system, {"role": "user", "content": q}])) for q in ("hi", "ho")]  # as the app does
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)  # tokens before the two questions part
    assert [first.usage.prompt_tokens, second.usage.prompt_tokens] == [len(i) for i in ids] and shared >= 16
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == shared // 8 * 8


GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 6, "temperature": 0}
GOOD_SAMPLED = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "temperature": 0.9, "top_p": 0.9, "seed": 5}


@pytest.fixture(scope="module")
def good_answers(server):
    """What the good requests answer on an untouched server: every bad request must leave them so."""
    return [post(server, p, b).json()["choices"][0] for p, b in (("/v1/completions", GOOD), ("/v1/chat/completions", GOOD_SAMPLED))]


def assert_unharmed(server, good_answers) -> None:
    again = [post(server, p, b).json()["choices"][0] for p, b in (("/v1/completions", GOOD), ("/v1/chat/completions", GOOD_SAMPLED))]
    assert again == good_answers
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["free_pages"] == health["total_pages"]


def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


# The bad-input catalogue: (path, body, status, param). Each one is followed by the good requests.
BAD_INPUTS = [
    # malformed bodies
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", b'{"model": "tiny-dllm", "prompt": "\xff\xfe"}', 400, None),  # not UTF-8
    ("/v1/completions", '{"model": "tiny-dllm", "prompt": "\\ud800"}', 400, None),  # lone surrogate escape
    ("/v1/chat/completions", '{"model": "tiny-dllm", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    # missing or wrong fields
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**12]}, 400, None),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", [5]]}, 400, "prompt"),  # a batch of two kinds
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 5}, 400, "n"),  # more choices than a replica queues
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 5}, 400, "prompt"),  # the prompts are too many, not n
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, 400, "prompt[0]"),
    # JSON values of the wrong type, as OpenAI refuses them (not read as the field's type)
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "false"}, 400, "stream"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "n": 1.0}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "seed": "7"}, 400, "seed"),
    # log-probabilities: a block-causal checkpoint has none to give (refused, not ignored), and none
    # stream; OpenAI's own limits
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "echo": True, "logprobs": 1}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 1, "stream": True}, 400, "logprobs"),
    # OpenAI fields this server does not implement, asking for something
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"five": 100}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),  # past the vocabulary
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    # the tokenizer routes
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"prompt": "x", "messages": _user("y")}, 400, None),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),  # the template refuses
    ("/tokenize", {"prompt": "x", "pad": "z" * MAX_BODY_BYTES}, 413, None),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**12]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    # chat structures
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user([{"type": "image_url", "image_url": "x"}])}, 400,
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("x"), "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs"),
    # lengths and limits
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**7}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 600, "max_tokens": 4}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _user("y" * (MAX_PROMPT_CHARS + 1))}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "pad": "z" * MAX_BODY_BYTES}, 413, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": "s" * 300}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop[0]"),
    # pathological sampling values
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", '{"model": "tiny-dllm", "prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ("/v1/completions", '{"model": "tiny-dllm", "prompt": "x", "top_p": NaN}', 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -3}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "threshold": 1.5}, 400, "threshold"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "mode": "beam"}, 400, "mode"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "selection": "beam"}, 400, "selection"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "selection": "entropy_budget", "entropy_budget": -1}, 400,
     "entropy_budget"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "entropy_budget": 0.5}, 400, "entropy_budget"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "delimiter_threshold": 2}, 400, "delimiter_threshold"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "delimiters": ["\n"]}, 400, "delimiters"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "delimiter_threshold": 0.5, "delimiters": ["@"]}, 400, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS)
def test_bad_input_is_an_openai_error(server, good_answers, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    assert_unharmed(server, good_answers)


def test_framework_errors_are_openai_shaped(server, good_answers):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405), ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, f"{server}{path}", headers=AUTH)
        assert r.status_code == status, (method, path, r.text)
        assert r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    assert_unharmed(server, good_answers)


def test_step_failure_fails_that_request_alone(server, good_answers):
    from serve.app import FAULT_HEADER

    fault = {**AUTH, FAULT_HEADER: "step"}
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 16, "temperature": 0}
    r = post(server, "/v1/completions", body, headers=fault)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error", r.text
    # greedy: a sampled request may end on a sampled EOS in its first output step, before the fault fires
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=chat, headers=fault, timeout=60) as r:
        assert r.status_code == 200  # the fault fires once the first tokens are out: the stream fails midway
        lines = [line for line in r.iter_lines() if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["error"]["code"] == "engine_error" and events[-1]["error"]["type"] == "server_error"
    assert all("choices" in e for e in events[:-1])
    assert_unharmed(server, good_answers)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])
def test_api_key_is_required(server, headers):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for r in (post(server, "/v1/completions", body, headers=headers), httpx.get(f"{server}/v1/models", headers=headers),
              post(server, "/tokenize", body, headers=headers), post(server, "/detokenize", {"tokens": [1]}, headers=headers),
              httpx.get(f"{server}/tokenizer_info", headers=headers)):
        assert r.status_code == 401, r.text  # each route's own method: the key check is what answers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models", headers=AUTH).status_code == 200
    assert post(server, "/v1/completions", body).status_code == 200
    # the scheme is case-insensitive (RFC 9110): "bearer KEY" was a 401
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200


def test_client_disconnect_mid_stream_frees_pages(server):
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 400, "temperature": 0, "stream": True,
            "threshold": 1.0, "mode": "ar"}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got the first tokens: hang up
    deadline = time.time() + 20
    while time.time() < deadline:
        health = httpx.get(f"{server}/health").json()
        if health["running"] == 0 and health["free_pages"] == health["total_pages"]:
            break
        time.sleep(0.2)
    assert health["running"] == 0 and health["free_pages"] == health["total_pages"], health


def test_overload_answers_503_and_loses_nothing(server, engine):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 64, "temperature": 0, "mode": "ar"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{server}/v1/completions", json=body, headers=AUTH) for _ in range(40)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503, 429}, codes
    assert codes.count(200) >= 4 and (503 in codes or 429 in codes), codes
    # Every answered request got the whole, correct completion (batching under load changes nothing);
    # every refused one an OpenAI error body.
    expect = engine.generate(["hello"], fdllm.SamplingParams(max_new_tokens=64, mode="ar"))[0]
    for r in responses:
        if r.status_code == 200:
            choice = r.json()["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (expect.text, expect.finish_reason)
            assert r.json()["usage"]["completion_tokens"] == len(expect.token_ids)
        else:
            err = r.json()["error"]
            assert err["message"] and err["type"] and err["code"]
    health = httpx.get(f"{server}/health").json()
    assert health["running"] == 0 and health["waiting"] == 0


def test_chaos_leaves_the_server_serving_and_answers_unchanged(server):
    """Concurrent streaming clients while others hang up, send malformed and pathological requests and
    make their own step raise: afterwards no page is leaked, the engine serves, and every well-formed
    answer equals its solo answer (the benchmark's --chaos run, small)."""
    from benchmarks.bench_serve import CHAOS_KINDS, run_chaos

    report = asyncio.run(run_chaos(server, MODEL, clients=6, requests=36, max_tokens=8, seed=1, api_key=API_KEY))
    assert set(report.sent) == set(CHAOS_KINDS), report.summary()
    assert not report.failures, report.summary()
    assert report.pages_leaked == 0 and report.serving_after, report.summary()


def test_replica_restarts_after_being_killed(server):
    from ray.serve._private.constants import SERVE_NAMESPACE

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == SERVE_NAMESPACE and "FdllmServer" in a["name"]]
    assert actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace=SERVE_NAMESPACE), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            r = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0})
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail("Serve did not bring the replica back within 90 s")


def test_relative_model_path_means_the_builder_directory(tmp_path, monkeypatch, dllm_dir):
    """`serve run`/`serve deploy` build the app where the app's working_dir is; replicas may start in
    another directory, so the builder hands them an absolute path."""
    from serve.app import ServerConfig

    monkeypatch.chdir(dllm_dir.parent)
    cfg = ServerConfig.from_args({"model": dllm_dir.name})
    assert cfg.model == str(dllm_dir)
    assert ServerConfig.from_args({"model": "s3://bucket/ckpt"}).model == "s3://bucket/ckpt"


def test_speculative_mode_over_http_is_the_ar_output(server, engine):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 24, "temperature": 0, "mode": "speculative"}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    expect = engine.generate(["hello"], fdllm.SamplingParams(max_new_tokens=24, mode="ar"))[0]
    assert r.json()["choices"][0]["text"] == expect.text
    stats = r.json()["fdllm"]
    assert stats["num_drafted"] >= stats["num_accepted"] >= 0
    assert (stats["num_drafted"] > 0) == (len(expect.token_ids) > 1)  # the first token comes from prefill


def test_tokenizer_routes_are_the_servers_tokenizer(server, served_dir, engine):
    """/tokenize, /detokenize and /tokenizer_info in vLLM's shapes: what clients count, truncate and
    send token ids with; a one-prompt batch of token ids completes like the text."""
    from fdllm.tokenizer import load_tokenizer, render_chat

    tok = load_tokenizer(served_dir)
    text = "héllo ✓ 世界 🙂, the quick"
    r = post(server, "/tokenize", {"prompt": text})
    assert r.status_code == 200, r.text
    ids = tok(text).input_ids
    assert r.json() == {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    r = post(server, "/tokenize", {"model": MODEL, "messages": messages})
    assert r.json()["tokens"] == tok(render_chat(tok, messages), add_special_tokens=False).input_ids
    r = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert r.json()["tokens"] == tok(render_chat(tok, messages, add_generation_prompt=False), add_special_tokens=False).input_ids
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": tok.decode(ids)}
    ascii_ids = tok("the quick, brown\n").input_ids  # what the test tokenizer covers comes back exactly
    assert post(server, "/detokenize", {"tokens": ascii_ids}).json() == {"prompt": "the quick, brown\n"}
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    info = httpx.get(f"{server}/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == STRICT_TEMPLATE
    assert info["model_max_length"] == engine.max_model_len
    paths = httpx.get(f"{server}/openapi.json", headers=AUTH).json()["paths"]
    assert {"/tokenize", "/detokenize", "/tokenizer_info"} <= set(paths) and "requestBody" in paths["/tokenize"]["post"]
    answers = [post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0})
               for prompt in (text, ids, [ids], [text])]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert len({a.json()["choices"][0]["text"] for a in answers}) == 1


LM_EVAL_TASK = """task: fdllm_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Q:"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


# lm-eval's own evaluation (`simple_evaluate`, what `lm-eval run` runs), in a process of its own, of a task
# in TASK_DIR: its samples (doc order) and results, as JSON. Only the task index differs from the CLI's:
# these tasks alone, not the ~14k task files lm-eval bundles, whose indexing took 14 s of each ~17 s run.
LM_EVAL_DRIVER = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
client, model_args, task_dir, task, options = sys.argv[1:]
results = simple_evaluate(model=client, model_args=model_args, tasks=[task], log_samples=True,
                          task_manager=TaskManager(include_path=task_dir, include_defaults=False), **json.loads(options))
print(json.dumps({"samples": results["samples"][task], "results": results["results"][task]}, default=str))
"""


def run_lm_eval(client: str, url: str, task_dir, task: str, **options) -> tuple[list[dict], dict]:
    """lm-eval's `client` (local-completions, local-chat-completions) against the server at `url`."""
    model_args = f"model={MODEL},base_url={url},auth_token={API_KEY},max_retries=1"
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LM_EVAL_DRIVER, client, model_args, str(task_dir), task, json.dumps(options)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=task_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return sorted(out["samples"], key=lambda sample: sample["doc_id"]), out["results"]


@pytest.mark.parametrize("client", ["local-completions", "local-chat-completions"])
def test_lm_evaluation_harness_against_the_server(server, served_dir, engine, tmp_path, client):
    """lm-evaluation-harness's OpenAI-compatible clients, as run against vLLM: local-completions finds
    the server's tokenizer routes and sends token ids, local-chat-completions sends chat messages.
    Every answer it records is what the engine decodes for that prompt (a local task: no downloads)."""
    pytest.importorskip("lm_eval")
    from fdllm.tokenizer import load_tokenizer, render_chat

    docs = [{"question": f"Q: what comes after {w}?\nA:", "answer": w} for w in ("one", "red", "héllo ✓", "x = 1")]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "docs.jsonl"))
    chat = client == "local-chat-completions"
    samples, results = run_lm_eval(client, f"{server}/v1/{'chat/completions' if chat else 'completions'}", tmp_path,
                                   "fdllm_local", apply_chat_template=chat)
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
    tok = load_tokenizer(served_dir)
    for sample in samples:
        question = sample["doc"]["question"]
        if client == "local-chat-completions":
            ids = tok(render_chat(tok, [{"role": "user", "content": question}]), add_special_tokens=False).input_ids
            stop = ("\n\n", "Q:")
        else:  # lm-eval adds the tokenizer's EOS (from /tokenizer_info) to the stop strings
            ids, stop = tok(question, add_special_tokens=False).input_ids, ("\n\n", "Q:", tok.eos_token)
        expect = engine.generate([ids], fdllm.SamplingParams(max_new_tokens=8, temperature=0.0, stop=stop))[0]
        assert sample["resps"] == [[expect.text]], (question, sample["arguments"])
    assert "exact_match,none" in results


CAUSAL_MAX_MODEL_LEN = 48


@pytest.fixture(scope="module")
def causal_server(server, causal_dllm_dir):
    """A checkpoint with a causal clean stream (the joint objective's: it has log-probabilities to give)
    beside the main app, on /causal."""
    from serve.app import build_app

    serve.run(build_app({"model": str(causal_dllm_dir), "model_name": MODEL, "api_key": API_KEY, "num_cpus_per_replica": 0.5,
                         "engine": {"max_model_len": CAUSAL_MAX_MODEL_LEN}}),  # default_max_tokens: the rest of the context
              name="fdllm-causal", route_prefix="/causal")
    url, deadline = f"{server}/causal", time.monotonic() + 120
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the causal app did not become healthy"
        time.sleep(0.5)
    yield url
    serve.delete("fdllm-causal")


def test_echo_and_logprobs_over_the_openai_client_equal_transformers(causal_server, causal_dllm_dir):
    """`logprobs` (completions: with and without echo; chat: with top_logprobs) through the official
    client are transformers' causal log-probabilities of the prompt and the completion the server decoded."""
    openai = pytest.importorskip("openai")
    from fdllm.config import BlockDiffusionConfig
    from fdllm.tokenizer import load_tokenizer, render_chat
    from tests.helpers import hf_causal_logprobs

    tok, mask = load_tokenizer(causal_dllm_dir), BlockDiffusionConfig.load(causal_dllm_dir).mask_token_id
    client = openai.OpenAI(base_url=f"{causal_server}/v1", api_key=API_KEY)
    prompt = "héllo ✓ the quick"
    prompt_ids = tok(prompt).input_ids
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    completion = plain.choices[0].text
    assert echoed.choices[0].text == prompt + completion
    lp = echoed.choices[0].logprobs
    engine = fdllm.Engine.from_pretrained(causal_dllm_dir)  # what the server decoded (greedy: deterministic)
    output_ids = engine.generate([prompt_ids], fdllm.SamplingParams(max_new_tokens=6))[0].token_ids
    ids = prompt_ids + output_ids
    assert len(lp.tokens) == len(ids) == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert "".join(lp.tokens) == tok.decode(ids) and lp.text_offset[0] == 0
    ref = hf_causal_logprobs(causal_dllm_dir, ids, mask)
    want = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:]):  # the two most likely, and the chosen token
        best = ref[i].topk(2)
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert {tok.decode([t]) for t in best.indices.tolist()} | {lp.tokens[i + 1]} == set(top)
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[len(prompt_ids):]

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    chat_prompt = tok(render_chat(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False).input_ids
    assert len(content) == chat.usage.completion_tokens and chat.usage.prompt_tokens == len(chat_prompt)
    output_ids = engine.generate([chat_prompt], fdllm.SamplingParams(max_new_tokens=6))[0].token_ids
    ref = hf_causal_logprobs(causal_dllm_dir, chat_prompt + output_ids, mask)[len(chat_prompt) - 1:]
    for c, row, t in zip(content, ref, output_ids):
        assert c.logprob == pytest.approx(row[t].item(), abs=1e-4) and bytes(c.bytes).decode() == c.token
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_and_decodes_nothing(causal_server, causal_dllm_dir):
    """The legacy completions API's scoring request (HELM's, older lm-evaluation-harness'): echo,
    max_tokens 0, logprobs: the prompt's transformers log-probabilities, no completion token, batched
    prompts and n included; streamed, the prompt then the finish; without echo, OpenAI's range error;
    a prompt filling the whole context fits (there is nothing to generate), one past it does not."""
    openai = pytest.importorskip("openai")
    from fdllm.config import BlockDiffusionConfig
    from fdllm.tokenizer import load_tokenizer
    from tests.helpers import hf_causal_logprobs

    tok, mask = load_tokenizer(causal_dllm_dir), BlockDiffusionConfig.load(causal_dllm_dir).mask_token_id
    client = openai.OpenAI(base_url=f"{causal_server}/v1", api_key=API_KEY)
    prompts = ["héllo ✓ the quick", "a b"]
    scored = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=1, n=2)
    assert [c.text for c in scored.choices] == [p for p in prompts for _ in range(2)]
    assert {c.finish_reason for c in scored.choices} == {"length"} and scored.usage.completion_tokens == 0
    for k, choice in enumerate(scored.choices):
        ids = tok(prompts[k // 2]).input_ids
        want = hf_causal_logprobs(causal_dllm_dir, ids, mask).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == len(ids)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert scored.usage.prompt_tokens == sum(len(tok(p).input_ids) for p in prompts)

    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 0, "echo": True, "stream": True}
    with httpx.stream("POST", f"{causal_server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [("hello world", None),
                                                                                              ("", "length")]
    refused = post(causal_server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "integer_below_min_value", refused.text
    assert refused.json()["error"]["param"] == "max_tokens"
    full = {"model": MODEL, "max_tokens": 0, "echo": True, "logprobs": 0}
    fits = post(causal_server, "/v1/completions", full | {"prompt": list(range(3, 3 + CAUSAL_MAX_MODEL_LEN))})
    assert fits.status_code == 200 and len(fits.json()["choices"][0]["logprobs"]["tokens"]) == CAUSAL_MAX_MODEL_LEN
    past = post(causal_server, "/v1/completions", full | {"prompt": list(range(3, 4 + CAUSAL_MAX_MODEL_LEN))})
    assert past.status_code == 400 and past.json()["error"]["code"] == "context_length_exceeded", past.text


def test_a_request_without_max_tokens_generates_to_the_end_of_the_context(causal_server, causal_dllm_dir):
    """No max_tokens and no server default (vLLM's and OpenAI's convention): up to max_model_len, in
    every mode and on both endpoints; a prompt that fills the context is a 400 naming the field."""
    engine = fdllm.Engine.from_pretrained(causal_dllm_dir, engine_config=fdllm.EngineConfig(max_model_len=CAUSAL_MAX_MODEL_LEN))
    for prompt in ([5, 6, 7], list(range(3, 3 + CAUSAL_MAX_MODEL_LEN - 1))):  # room for 45 tokens, then for 1
        for mode in ("diffusion", "ar"):
            body = {"model": MODEL, "prompt": prompt, "temperature": 0, "mode": mode}
            answer = post(causal_server, "/v1/completions", body).json()
            room = CAUSAL_MAX_MODEL_LEN - len(prompt)
            want = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=room, mode=mode))[0]
            assert answer["usage"]["completion_tokens"] == len(want.token_ids), (mode, answer)
            assert answer["choices"][0]["finish_reason"] == want.finish_reason
            assert answer["choices"][0]["text"] == want.text
            if want.finish_reason == "length":
                assert len(want.token_ids) == room
    full = post(causal_server, "/v1/completions", {"model": MODEL, "prompt": list(range(3, 3 + CAUSAL_MAX_MODEL_LEN))})
    assert full.status_code == 400
    assert full.json()["error"]["code"] == "context_length_exceeded" and full.json()["error"]["param"] == "prompt"
    chat = post(causal_server, "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 200}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    bounded = post(causal_server, "/v1/chat/completions",
                   {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
    assert bounded.json()["usage"]["completion_tokens"] <= 3


def test_the_server_default_max_tokens_stops_at_the_end_of_the_context(server, engine):
    """ServerConfig.default_max_tokens (16 here) bounds a request without max_tokens, and so does the
    context (vLLM's min of the two): a prompt 5 tokens short of max_model_len gets at most 5, not a 400."""
    for prompt, most in (([5, 6, 7], 16), ([5, 6] * ((engine.max_model_len - 5) // 2) + [7], 5)):
        answer = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "temperature": 0, "mode": "ar"})
        assert answer.status_code == 200, answer.text
        want = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=most, mode="ar"))[0]
        assert answer.json()["usage"]["completion_tokens"] == len(want.token_ids) <= most
        assert answer.json()["choices"][0]["text"] == want.text


def test_echo_streams_the_prompt_first(server):
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 8, "temperature": 0, "echo": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert whole.startswith("hello world")
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and line != "data: [DONE]"]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts[0] == "hello world" and "".join(texts) == whole


LM_EVAL_CHOICE_TASK = """task: fdllm_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def completions_served(url: str) -> int:
    """Completion requests the replica at `url` answered with 200 (its Prometheus counter)."""
    found = re.search(r'^fdllm_requests(?:_total)?\{endpoint="completions",status="200"\} (\S+)$',
                      httpx.get(f"{url}/metrics").text, flags=re.M)
    return int(float(found.group(1))) if found else 0


def test_lm_evaluation_harness_loglikelihood_tasks_against_the_server(causal_server, causal_dllm_dir, tmp_path):
    """A multiple-choice task (lm-eval's loglikelihood requests: echo + logprobs over token ids) against
    a causal checkpoint: every log-likelihood lm-eval records is transformers' for that continuation."""
    pytest.importorskip("lm_eval")
    from fdllm.config import BlockDiffusionConfig
    from fdllm.tokenizer import load_tokenizer
    from tests.helpers import hf_causal_logprobs

    docs = [{"question": "q: what comes after one?\na:", "choices": [" two", " red", " héllo ✓"], "label": 0},
            {"question": "x = 1, y =", "choices": [" 2", " 1, z = 3"], "label": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_CHOICE_TASK.format(data=tmp_path / "docs.jsonl"))
    served = completions_served(causal_server)
    samples, results = run_lm_eval("local-completions", f"{causal_server}/v1/completions", tmp_path, "fdllm_choice",
                                   batch_size=2)  # two prompts per request (their choices come back in order)
    assert completions_served(causal_server) - served == 3  # 5 (context, continuation) pairs, two per request
    assert [s["doc_id"] for s in samples] == [0, 1]
    tok, mask = load_tokenizer(causal_dllm_dir), BlockDiffusionConfig.load(causal_dllm_dir).mask_token_id
    for sample in samples:  # lm-eval's own (context, continuation) pairs: it puts " " between the two
        pairs = [tuple(arguments) for arguments in sample["arguments"]]
        assert len(pairs) == len(sample["doc"]["choices"])
        for (context, continuation), [[loglikelihood, is_greedy]] in zip(pairs, sample["resps"]):
            ctx = tok(context, add_special_tokens=False).input_ids
            ids = tok(context + continuation, add_special_tokens=False).input_ids
            rows, targets = hf_causal_logprobs(causal_dllm_dir, ids, mask)[len(ctx) - 1:], torch.tensor(ids[len(ctx):])
            want = rows.gather(1, targets[:, None]).sum().item()
            assert float(loglikelihood) == pytest.approx(want, abs=1e-4), (context, continuation)
            assert is_greedy == bool((rows.argmax(-1) == targets).all())
    assert "acc,none" in results

