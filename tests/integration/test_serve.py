"""The OpenAI-compatible Serve app on a real local Ray cluster, over HTTP (httpx and the openai client)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

import fdllm

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

API_KEY = "test-key"
MODEL = "tiny-dllm"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(dllm_dir):
    from serve.app import run_local

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield run_local({"model": str(dllm_dir), "model_name": MODEL, "api_key": API_KEY,
                     "default_max_tokens": 16, "max_waiting": 4}, timeout_s=60)
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
    assert body["usage"] == {"prompt_tokens": len(expect.prompt_token_ids), "completion_tokens": len(expect.token_ids),
                             "total_tokens": len(expect.prompt_token_ids) + len(expect.token_ids)}
    assert body["fdllm"]["num_forwards"] == expect.num_forwards


def test_chat_and_streaming_agree(server):
    msg = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0}
    whole = post(server, "/v1/chat/completions", msg).json()
    text = whole["choices"][0]["message"]["content"]
    pieces, finish, usage = [], None, None
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**msg, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        pieces.append(chunk["choices"][0]["delta"].get("content", ""))
        finish = chunk["choices"][0]["finish_reason"] or finish
        usage = chunk.get("usage") or usage
    assert "".join(pieces) == text
    assert finish == whole["choices"][0]["finish_reason"]
    assert usage == whole["usage"]


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    done = client.completions.create(model=MODEL, prompt="the quick", max_tokens=8, temperature=0)
    assert isinstance(done.choices[0].text, str) and 1 <= done.usage.completion_tokens <= 8
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", "{not json", 400, None),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": 7}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**7}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x " * 600, "max_tokens": 4}, 400, None),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "threshold": 1.5}, 400, "threshold"),
    ],
)
def test_bad_input_is_an_openai_error(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    # the server is unharmed
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])
def test_api_key_is_required(server, headers):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for r in (post(server, "/v1/completions", body, headers=headers), httpx.get(f"{server}/v1/models", headers=headers)):
        assert r.status_code == 401, r.text  # each route's own method: the key check is what answers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models", headers=AUTH).status_code == 200
    assert post(server, "/v1/completions", body).status_code == 200


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
