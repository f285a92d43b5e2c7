"""Prometheus metrics of one replica, rendered at scrape time from plain counters and engine stats.

A custom collector over a per-replica registry (no global state): counters are plain ints the
serving code bumps, gauges are read from the engine when scraped, so nothing is kept twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from fdllm.engine import GenerationResult
    from serve.async_engine import AsyncEngine


@dataclass
class RequestCounters:
    by_status: Counter = field(default_factory=Counter)  # (endpoint, status code) -> requests
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0
    stream_errors: int = 0  # streams that started (200) and ended with an error event

    def record(self, result: "GenerationResult") -> None:
        self.prompt_tokens += len(result.prompt_token_ids)
        self.completion_tokens += len(result.token_ids)
        self.forwards += result.num_forwards


class _Collector:
    def __init__(self, counters: RequestCounters, engine: "AsyncEngine") -> None:
        self._counters, self._engine = counters, engine

    def collect(self):
        c = self._counters
        requests = CounterMetricFamily("fdllm_requests", "HTTP requests by endpoint and status", labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(c.by_status.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        yield CounterMetricFamily("fdllm_stream_errors", "Streams that failed after they started", value=c.stream_errors)
        yield CounterMetricFamily("fdllm_prompt_tokens", "Prompt tokens of finished requests", value=c.prompt_tokens)
        yield CounterMetricFamily("fdllm_generation_tokens", "Generated tokens of finished requests", value=c.completion_tokens)
        yield CounterMetricFamily("fdllm_forwards", "Model forwards spent on finished requests", value=c.forwards)
        yield GaugeMetricFamily("fdllm_tokens_per_forward", "Generated tokens per forward so far (parallelism of decoding)",
                                value=c.completion_tokens / c.forwards if c.forwards else 0.0)
        stats = self._engine.stats()
        yield GaugeMetricFamily("fdllm_running_requests", "Requests being decoded", value=stats["running"])
        yield GaugeMetricFamily("fdllm_waiting_requests", "Requests queued for admission (queue depth)", value=stats["waiting"])
        yield GaugeMetricFamily("fdllm_free_kv_pages", "Free KV-cache pages", value=stats["free_pages"])
        m = self._engine.metrics
        yield CounterMetricFamily("fdllm_engine_steps", "Engine steps", value=m.steps)
        yield CounterMetricFamily("fdllm_engine_step_seconds", "Total seconds spent in engine steps", value=m.step_seconds_total)
        yield GaugeMetricFamily("fdllm_engine_last_step_seconds", "Latency of the latest engine step", value=m.last_step_seconds)


def make_registry(counters: RequestCounters, engine: "AsyncEngine") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(counters, engine))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
