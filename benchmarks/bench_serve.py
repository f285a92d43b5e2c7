"""Load benchmark of the Serve app over loopback HTTP: latency, time to first token and tokens/s
at several concurrency levels, in one run against one replica.

    python -m benchmarks.benchmark serve --model assets/tiny-ar-base --concurrency 1,4,16 --requests 48
    python -m benchmarks.benchmark serve --url http://127.0.0.1:8000 --model-name tiny-dllm   # a running server
    python -m benchmarks.benchmark serve --chaos --concurrency 8 --requests 96   # robustness under abuse
    python -m benchmarks.benchmark serve --concurrency 1,8 --max-replicas 2        # autoscaled

Without --url it starts a local Ray instance and the app on 127.0.0.1 and shuts both down at the
end. Each level sends `--requests` streaming chat requests from `concurrency` concurrent clients
(bounded in count and time, loopback only); continuous batching inside the replica is what turns
concurrency into throughput. With `--max-replicas N` the started app autoscales between 1 and N
replicas (delays of seconds, not the GPU config's minutes), and each level reports the replica
count over time (sampled from `serve.status()`) next to its latencies.

`--chaos` (first concurrency level = clients) mixes well-formed streaming requests with clients that
hang up mid-stream, malformed requests, pathological sampling values and requests that make their
own engine step raise (the server must run with `fault_injection=True`, as the local one does). It
prints requests sent, outcomes by kind, failures (a kind answered otherwise than it must be),
pages leaked once the server is idle, and the p99 latency of the well-formed requests, every one of
which must equal its solo answer (sent alone before the chaos).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cli import positive_float, positive_int, positive_int_list

PROMPTS = ("Reverse: 03 17 42 08 99", "Reverse: 12 07 55 31 64 20", "Reverse: 88 02 14 73 45", "hello")


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    failed: int
    p50_s: float
    p99_s: float
    ttft_p50_s: float
    tokens: int
    seconds: float
    replicas: str = ""  # replica count over time during the level ("SECONDSs:COUNT ..."), when known

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="HTTP load test of the Serve app: p50/p99 latency, TTFT, tokens/s",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/tiny-ar-base", help="checkpoint dir to serve (ignored with --url)")
    p.add_argument("--url", help="benchmark an already running server instead of starting one")
    p.add_argument("--model-name", help="the served model name (default: the checkpoint dir name)")
    p.add_argument("--concurrency", type=positive_int_list, default=[1, 4, 16], help="comma-separated client counts")
    p.add_argument("--requests", type=positive_int, default=48, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=positive_int, default=32)
    p.add_argument("--mode", default="diffusion", choices=["diffusion", "ar"])
    p.add_argument("--timeout", type=positive_float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--api-key", help="bearer token of the server (default: none)")
    p.add_argument("--max-replicas", type=positive_int, default=1,
                   help="autoscale the started app between 1 and this many replicas (ignored with --url)")
    p.add_argument("--chaos", action="store_true", help="robustness run: disconnects, malformed and "
                   "pathological requests, injected step failures (see the module docstring)")
    p.add_argument("--seed", type=int, default=0, help="--chaos: the random mix of request kinds")
    p.set_defaults(func=run)
    return p


async def _one(client, url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """(latency, time to first token, completion tokens) of one streaming request."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return latency, ttft if ttft is not None else latency, tokens


async def run_level(url: str, model: str, concurrency: int, requests: int, args: argparse.Namespace) -> LevelResult:
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results, failed = [], 0

    async def client_loop(client) -> None:
        nonlocal failed
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "mode": args.mode,
                    "stream_options": {"include_usage": True}}
            try:
                results.append(await _one(client, url, body))
            except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
                failed += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    lat = [r[0] for r in results] or [float("nan")]
    return LevelResult(concurrency, requests, failed, statistics.median(lat), p99(lat),
                       statistics.median(r[1] for r in results) if results else float("nan"),
                       sum(r[2] for r in results), seconds)


# ---- chaos ------------------------------------------------------------------------------------------
FAULT_HEADER = "x-fdllm-inject-fault"  # serve.app.FAULT_HEADER (kept apart: the client needs no serve import)
CHAOS_KINDS = ("good", "disconnect", "malformed", "pathological", "step_fault")


def malformed_requests(model: str) -> list[tuple[str, bytes | str | dict[str, Any]]]:
    """(path, body) pairs every OpenAI server must answer with a 4xx error body."""
    return [
        ("/v1/completions", "{not json"),
        ("/v1/completions", b'{"model": "%s", "prompt": "\xff\xfe"}' % model.encode()),  # not UTF-8
        ("/v1/completions", '{"model": "%s", "prompt": "\\ud800"}' % model),  # a lone surrogate (JSON escape)
        ("/v1/chat/completions", {"model": model, "messages": []}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/v1/completions", {"model": model, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
        ("/v1/completions", {"model": model, "prompt": "x", "stop": "s" * 1000}),
        ("/v1/completions", {"model": model, "prompt": [10**12]}),
        ("/v1/nothing-here", {"model": model}),
    ]


def pathological_requests(model: str) -> list[dict[str, Any]]:
    """Well-formed JSON whose sampling values are out of range, at the extremes: each must be a 400. (A
    temperature of 1e-300 is not among them: OpenAI's range takes it, and it samples at 0.01, as vLLM's.)"""
    base = {"model": model, "prompt": "hello", "max_tokens": 4}
    return [base | {"temperature": -1e-300}, base | {"seed": 2**70}, base | {"top_k": -2, "top_p": 1e-300},
            base | {"max_tokens": 10**12}, base | {"temperature": float("inf")}, base | {"top_p": float("nan")}]


@dataclass
class ChaosReport:
    sent: Counter = field(default_factory=Counter)  # requests by kind
    failures: Counter = field(default_factory=Counter)  # requests by kind answered otherwise than they must be
    failure_examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # well-formed requests (s)
    pages_leaked: int = -1
    serving_after: bool = False

    @property
    def p99_s(self) -> float:
        return p99(self.latencies or [float("nan")])

    def fail(self, kind: str, why: str) -> None:
        self.failures[kind] += 1
        if len(self.failure_examples) < 10:
            self.failure_examples.append(f"{kind}: {why}")

    def summary(self) -> str:
        lines = [f"requests sent: {sum(self.sent.values())} ({', '.join(f'{k} {self.sent[k]}' for k in CHAOS_KINDS)})",
                 f"failures by kind: {dict(self.failures) or 'none'}",
                 f"pages leaked: {self.pages_leaked}; serving afterwards: {self.serving_after}",
                 f"well-formed p99 latency: {self.p99_s:.3f} s over {len(self.latencies)} requests"]
        return "\n".join(lines + [f"  e.g. {e}" for e in self.failure_examples])


def _good_body(model: str, i: int, max_tokens: int) -> dict[str, Any]:
    """Well-formed streaming requests, greedy and seeded sampling, chat and completions."""
    prompt = PROMPTS[i % len(PROMPTS)]
    sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.9, "seed": 1000 + i}
    if i % 3 == 0:
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, **sampling}
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, **sampling}


async def _stream_text(client, url: str, body: dict[str, Any], headers: dict[str, str], hang_up: bool = False):
    """(status, text, finish_reason, error) of a streaming request; hang_up: leave after the first chunk."""
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    pieces, finish, error = [], None, None
    async with client.stream("POST", f"{url}{path}", json=body, headers=headers) as r:
        if r.status_code != 200:
            return r.status_code, None, None, json.loads(await r.aread()).get("error")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if hang_up:
                return 200, None, None, None
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            choice = event["choices"][0]
            pieces.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
            finish = choice["finish_reason"] or finish
    return 200, "".join(pieces), finish, error


async def _good_with_retry(client, url: str, body: dict[str, Any], headers: dict[str, str]):
    while True:  # an overloaded replica answers 503 at once: a client retries
        out = await _stream_text(client, url, body, headers)
        if out[0] != 503:
            return out
        await asyncio.sleep(0.05)


async def _wait_idle(client, url: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        health = (await client.get(f"{url}/health")).json()
        if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.1)


async def run_chaos(url: str, model: str, clients: int, requests: int, max_tokens: int = 16, seed: int = 0,
                    api_key: str | None = None, timeout_s: float = 120.0) -> ChaosReport:
    """Concurrent clients sending a random mix of CHAOS_KINDS; see the module docstring."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = ChaosReport()
    rng = random.Random(seed)
    kinds = [rng.choice(CHAOS_KINDS) for _ in range(requests)]
    malformed, pathological = malformed_requests(model), pathological_requests(model)
    num_good = 2 * len(PROMPTS)
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        solo = [await _good_with_retry(client, url, _good_body(model, i, max_tokens), headers) for i in range(num_good)]
        if any(s[0] != 200 or s[3] for s in solo):
            raise RuntimeError(f"the server fails well-formed requests sent alone: {solo}")
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(kinds):
            queue.put_nowait(item)

        async def one(i: int, kind: str) -> None:
            report.sent[kind] += 1
            if kind == "good":
                body = _good_body(model, i % num_good, max_tokens)
                start = time.perf_counter()
                out = await _good_with_retry(client, url, body, headers)
                report.latencies.append(time.perf_counter() - start)
                if out[1:] != solo[i % num_good][1:]:
                    report.fail(kind, f"answer {out} differs from its solo answer {solo[i % num_good]}")
            elif kind == "disconnect":
                body = _good_body(model, i % num_good, 4 * max_tokens) | {"mode": "ar"}
                status, *_ = await _stream_text(client, url, body, headers, hang_up=True)
                if status not in (200, 503):
                    report.fail(kind, f"HTTP {status}")
            elif kind in ("malformed", "pathological"):
                if kind == "malformed":
                    path, body = malformed[i % len(malformed)]
                else:
                    path, body = "/v1/completions", pathological[i % len(pathological)]
                content = body if isinstance(body, (bytes, str)) else json.dumps(body)
                r = await client.post(f"{url}{path}", content=content,
                                      headers={**headers, "Content-Type": "application/json"})
                error = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
                if not 400 <= r.status_code < 500 or not error or not error.get("message"):
                    report.fail(kind, f"{path} {content[:60]!r} -> HTTP {r.status_code} {r.text[:100]!r}")
            else:  # step_fault: the request fails (500 or an error event), nobody else does
                body = _good_body(model, i % num_good, max_tokens)
                status, _, finish, error = await _stream_text(client, url, body, {**headers, FAULT_HEADER: "step"})
                if status == 503 or (status == 200 and finish == "stop" and not error):
                    return  # shed, or a stop token ended it before the fault (armed after the first tokens)
                if not error or error.get("code") != "engine_error":
                    report.fail(kind, f"HTTP {status} with error {error}")

        async def client_loop() -> None:
            while not queue.empty():
                i, kind = queue.get_nowait()
                try:
                    await one(i, kind)
                except Exception as exc:  # noqa: BLE001 - transport errors are failures of their kind
                    report.fail(kind, f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(client_loop() for _ in range(clients)))
        health = await _wait_idle(client, url)
        report.pages_leaked = health["total_pages"] - health["free_pages"]
        again = await _good_with_retry(client, url, _good_body(model, 0, max_tokens), headers)
        report.serving_after = health["status"] == "ok" and again[1:] == solo[0][1:]
    return report


def p99(values: list[float]) -> float:
    """The 99th percentile by nearest rank (the smallest value at least 99% of them do not exceed): of
    100 latencies the 99th, not the slowest, which `int(0.99 * n)` read."""
    return sorted(values)[math.ceil(0.99 * len(values)) - 1]


def run(args: argparse.Namespace) -> list[LevelResult] | ChaosReport:
    levels = args.concurrency
    name = args.model_name or Path(args.model).name
    if args.url:
        url = args.url
    else:
        import ray

        from serve.app import run_local

        if args.max_replicas > 1:  # Serve's processes inherit it: set before Ray starts
            from serve.replicas import FAST_AUTOSCALING_METRICS_ENV

            os.environ.update(FAST_AUTOSCALING_METRICS_ENV)
        # a Ray instance of its own: attached to a `ray start` cluster, it would replace that cluster's "fdllm"
        # app with its own and shut the cluster's Serve down when done
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        url = run_local({"model": args.model, "model_name": name, "max_waiting": 1024, "max_ongoing_requests": 2048,
                         "max_queued_requests": 1024, "fault_injection": args.chaos, "api_key": args.api_key,
                         **_autoscaling(args.max_replicas)})
    try:
        if args.chaos:
            import httpx

            try:
                report = asyncio.run(run_chaos(url, name, levels[0], args.requests, args.max_tokens, args.seed,
                                               args.api_key, args.timeout))
            except httpx.TransportError as e:  # no server there: the run's one-line error, not a traceback
                raise ValueError(f"no answer from {url} ({type(e).__name__}: {e}): is the server up?") from None
            print(report.summary())
            return report
        asyncio.run(run_level(url, name, 1, 2, args))  # warm-up: first-request costs out of the table
        rows = [_sampled_level(url, name, c, args) for c in levels]
    finally:
        if not args.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'p50 s':>7} {'p99 s':>7} {'TTFT p50':>9} {'tokens/s':>9}  replicas")
    for r in rows:
        print(f"{r.concurrency:>7} {r.requests:>8} {r.failed:>6} {r.p50_s:>7.3f} {r.p99_s:>7.3f} {r.ttft_p50_s:>9.3f} "
              f"{r.tokens_per_s:>9.1f}  {r.replicas or 'n/a (--url)'}")
    if len(rows) > 1:
        print(f"concurrency {rows[-1].concurrency} gives {rows[-1].tokens_per_s / rows[0].tokens_per_s:.2f}x the tokens/s "
              f"of concurrency {rows[0].concurrency}; failed requests: {sum(r.failed for r in rows)}")
    if all(r.failed == r.requests for r in rows):  # nothing measured (no server there, a wrong --url): not a result
        raise ValueError(f"every request failed ({sum(r.requests for r in rows)}): is the server at {url} up, and "
                         "--model-name its model?")
    return rows


def _autoscaling(max_replicas: int) -> dict[str, Any]:
    """Deployment args: a fixed single replica, or autoscaling with delays short enough to see
    within one benchmark level."""
    if max_replicas < 1:
        raise ValueError(f"--max-replicas must be >= 1, got {max_replicas}")
    if max_replicas == 1:
        return {}
    return {"autoscaling_config": {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 4,
                                   "upscale_delay_s": 2, "downscale_delay_s": 10, "look_back_period_s": 12}}


def _sampled_level(url: str, model: str, concurrency: int, args: argparse.Namespace) -> LevelResult:
    """One level; with the app started here, the replica count sampled while it ran."""
    if args.url:
        return asyncio.run(run_level(url, model, concurrency, args.requests, args))
    from serve.replicas import ReplicaSampler

    with ReplicaSampler() as sampler:
        row = asyncio.run(run_level(url, model, concurrency, args.requests, args))
    return dataclasses.replace(row, replicas=sampler.timeline())
