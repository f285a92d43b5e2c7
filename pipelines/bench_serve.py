"""Load benchmark of the Serve app over loopback HTTP: latency, time to first token and tokens/s
at several concurrency levels, in one run against one replica.

    python pipelines/benchmark.py serve --model assets/tiny-ar-base --concurrency 1,4,16 --requests 48
    python pipelines/benchmark.py serve --url http://127.0.0.1:8000 --model-name tiny-dllm   # a running server
    python pipelines/benchmark.py serve --model assets/tiny-ar-base --concurrency 1,8 --max-replicas 2  # autoscaled

Without --url it starts a local Ray instance and the app on 127.0.0.1 and shuts both down at the
end. Each level sends `--requests` streaming chat requests from `concurrency` concurrent clients
(bounded in count and time, loopback only); continuous batching inside the replica is what turns
concurrency into throughput. With `--max-replicas N` the started app autoscales between 1 and N
replicas (delays of seconds, not the GPU config's minutes), and each level reports the replica
count over time (sampled from `serve.status()`) next to its latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mode", default="diffusion", choices=["diffusion", "ar"])
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--max-replicas", type=int, default=1,
                   help="autoscale the started app between 1 and this many replicas (ignored with --url)")
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
                    "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "mode": args.mode}
            try:
                results.append(await _one(client, url, body))
            except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
                failed += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    lat = sorted(r[0] for r in results) or [float("nan")]
    return LevelResult(concurrency, requests, failed, statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                       statistics.median(r[1] for r in results) if results else float("nan"),
                       sum(r[2] for r in results), seconds)


def run(args: argparse.Namespace) -> list[LevelResult]:
    levels = [int(c) for c in args.concurrency.split(",") if c]
    name = args.model_name or Path(args.model).name
    if args.url:
        url = args.url
    else:
        import ray

        from serve.app import run_local

        if args.max_replicas > 1:  # Serve's processes inherit it: set before Ray starts
            from serve.replicas import FAST_AUTOSCALING_METRICS_ENV

            os.environ.update(FAST_AUTOSCALING_METRICS_ENV)
        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        url = run_local({"model": args.model, "model_name": name, "max_waiting": 1024, "max_ongoing_requests": 256,
                         "max_queued_requests": 1024, **_autoscaling(args.max_replicas)})
    try:
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
