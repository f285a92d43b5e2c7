"""Prometheus metrics of the Serve app: request counters the routes bump, gauges read from the engine.

One list of samples (`samples`), exported two ways:

- through `ray.serve.metrics` (`RayMetricsExporter`): Ray's metrics agent on every node serves
  them with Ray's `ray_` prefix and the deployment/replica/application tags Serve adds, so one
  Prometheus scrape of the cluster (Ray's service discovery file) sees every replica, the way a
  deployment behind Serve's load balancer must be watched. Counters become `ray_fdllm_..._total`.
- on each replica's `/metrics` page (`make_registry` / `render`), under the same names without the
  prefix: that replica's own view, for a single-replica run or debugging.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from serve.protocol import prompt_usage

if TYPE_CHECKING:
    from fdllm.engine import GenerationResult
    from serve.async_engine import AsyncEngine

log = logging.getLogger(__name__)

# Latency observations the Ray export holds between two pushes at most (a push every few seconds drains them;
# past this, the oldest are dropped from Ray's copy, never from the replica's /metrics)
MAX_PENDING_OBSERVATIONS = 65536


@dataclass
class Histogram:
    """Observations in cumulative buckets (`/metrics`), and those the Ray export has yet to push
    (`pending`: a bounded queue, made by `RayMetricsExporter`; None without one, so nothing piles up)."""

    help: str
    boundaries: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, the last one +Inf
    total: float = 0.0
    pending: deque[float] | None = None

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.boundaries) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.boundaries, value)] += 1  # Prometheus' buckets: value <= bound
        self.total += value
        if self.pending is not None:
            self.pending.append(value)

    def buckets(self) -> list[tuple[str, int]]:
        """Prometheus' cumulative (le, count) pairs."""
        bounds = [str(b) for b in self.boundaries] + ["+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts)))


def latency_histograms() -> dict[str, Histogram]:
    """Per request, as vLLM's (`vllm:time_to_first_token_seconds`, ...): with their buckets."""
    return {
        "fdllm_time_to_first_token_seconds": Histogram(
            "Seconds from a request's arrival to its first generated token",
            (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)),
        "fdllm_time_per_output_token_seconds": Histogram(
            "Seconds per generated token after the first, per request (a block-diffusion step settles several)",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)),
        "fdllm_e2e_request_latency_seconds": Histogram(
            "Seconds from a request's arrival to its end",
            (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)),
    }


@dataclass
class RequestCounters:
    by_status: Counter = field(default_factory=Counter)  # (endpoint, status code) -> requests
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens: served from the prefix cache
    completion_tokens: int = 0
    forwards: int = 0
    stream_errors: int = 0  # streams that started (200) and ended with an error event
    latency: dict[str, Histogram] = field(default_factory=latency_histograms)  # each engine request's (choice's)

    def record(self, results: list["GenerationResult | None"], k: int, n: int) -> None:
        """Choice k of a request's `results` (n choices per prompt; None: not finished) has finished: its
        tokens and forwards; its prompt's tokens once all of that prompt's choices have, counted as the
        response's `usage` counts them (the prompt once, not once per choice)."""
        result = results[k]
        self.completion_tokens += len(result.token_ids)
        self.forwards += result.num_forwards
        self._observe_latency(result)
        first = k - k % n
        if all(r is not None for r in results[first : first + n]):
            prompt, cached = prompt_usage(results[first : first + n])
            self.prompt_tokens += prompt
            self.cached_prompt_tokens += cached


    def _observe_latency(self, result: "GenerationResult") -> None:
        first = result.time_to_first_token_s
        self.latency["fdllm_e2e_request_latency_seconds"].observe(result.latency_s)
        if first is None:  # nothing generated
            return
        self.latency["fdllm_time_to_first_token_seconds"].observe(first)
        if len(result.token_ids) > 1:
            self.latency["fdllm_time_per_output_token_seconds"].observe((result.latency_s - first) / (len(result.token_ids) - 1))


@dataclass(frozen=True)
class Sample:
    name: str
    kind: Literal["counter", "gauge"]
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


# name -> label names, for metrics with labels (Ray needs the tag keys when the metric is made)
LABELS = {"fdllm_requests": ("endpoint", "status")}


def samples(counters: RequestCounters, engine: "AsyncEngine") -> list[Sample]:
    """Every metric of a replica, now."""
    c, stats, m = counters, engine.stats(), engine.metrics
    out = [
        Sample("fdllm_requests", "counter", "HTTP requests by endpoint and status", n,
               (("endpoint", endpoint), ("status", str(status))))
        for (endpoint, status), n in sorted(c.by_status.items())
    ]
    out += [
        Sample("fdllm_stream_errors", "counter", "Streams that failed after they started", c.stream_errors),
        Sample("fdllm_prompt_tokens", "counter", "Prompt tokens of finished requests (as their usage counts them: "
               "a prompt once, whatever its choices)", c.prompt_tokens),
        Sample("fdllm_cached_prompt_tokens", "counter", "Of those, tokens served from the prefix cache, not prefilled",
               c.cached_prompt_tokens),
        Sample("fdllm_generation_tokens", "counter", "Generated tokens of finished requests", c.completion_tokens),
        Sample("fdllm_forwards", "counter", "Model forwards spent on finished requests", c.forwards),
        Sample("fdllm_tokens_per_forward", "gauge", "Generated tokens per forward so far (parallelism of decoding)",
               c.completion_tokens / c.forwards if c.forwards else 0.0),
        Sample("fdllm_running_requests", "gauge", "Requests being decoded", stats["running"]),
        Sample("fdllm_waiting_requests", "gauge", "Requests queued for admission (queue depth)", stats["waiting"]),
        Sample("fdllm_free_kv_pages", "gauge", "Free KV-cache pages not promised to admitted requests (prefix-cached "
               "ones included)", stats["free_pages"]),
        Sample("fdllm_prefix_cached_kv_pages", "gauge", "KV-cache pages in the prefix cache", stats["cached_pages"]),
        Sample("fdllm_preemptions", "counter", "Requests preempted for want of free KV pages (prefilled again later)",
               stats["preemptions"]),
        Sample("fdllm_engine_steps", "counter", "Engine steps", m.steps),
        Sample("fdllm_engine_step_seconds", "counter", "Total seconds spent in engine steps", m.step_seconds_total),
        Sample("fdllm_engine_last_step_seconds", "gauge", "Latency of the latest engine step", m.last_step_seconds),
    ]
    return out


class _Collector:
    def __init__(self, counters: RequestCounters, engine: "AsyncEngine") -> None:
        self._counters, self._engine = counters, engine

    def collect(self):
        families: dict[str, Any] = {}
        for s in samples(self._counters, self._engine):
            if s.name not in families:
                kind = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                families[s.name] = kind(s.name, s.help, labels=list(LABELS.get(s.name, ())))
            families[s.name].add_metric([v for _, v in s.labels], s.value)
        for name, histogram in self._counters.latency.items():
            families[name] = HistogramMetricFamily(name, histogram.help, buckets=histogram.buckets(), sum_value=histogram.total)
        if "fdllm_requests" not in families:  # no request yet: still list the family
            families["fdllm_requests"] = CounterMetricFamily("fdllm_requests", "HTTP requests by endpoint and status",
                                                             labels=list(LABELS["fdllm_requests"]))
        yield from families.values()


def make_registry(counters: RequestCounters, engine: "AsyncEngine") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(counters, engine))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class RayMetricsExporter:
    """Copies `samples` into `ray.serve.metrics` every `interval_s` (and on `push`), from a daemon
    thread of the replica: counters by their increase since the last push, gauges by value."""

    def __init__(self, counters: RequestCounters, engine: "AsyncEngine", interval_s: float = 2.0) -> None:
        from ray.serve import metrics

        self._counters, self._engine, self._interval_s = counters, engine, interval_s
        self._metrics: dict[str, Any] = {}
        for s in samples(counters, engine):
            kind = metrics.Counter if s.kind == "counter" else metrics.Gauge
            self._metrics[s.name] = kind(s.name, description=s.help, tag_keys=LABELS.get(s.name, ()))
        if "fdllm_requests" not in self._metrics:
            self._metrics["fdllm_requests"] = metrics.Counter(
                "fdllm_requests", description="HTTP requests by endpoint and status", tag_keys=LABELS["fdllm_requests"])
        for name, histogram in counters.latency.items():
            self._metrics[name] = metrics.Histogram(name, description=histogram.help, boundaries=list(histogram.boundaries))
            histogram.pending = deque(maxlen=MAX_PENDING_OBSERVATIONS)
        self._pushed: dict[tuple[str, tuple], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fdllm-metrics", daemon=True)
        self._thread.start()

    def push(self) -> None:
        with self._lock:  # the loop thread and a caller may push at once
            for s in samples(self._counters, self._engine):
                tags = dict(s.labels) or None
                metric = self._metrics[s.name]
                if s.kind == "gauge":
                    metric.set(s.value, tags=tags)
                    continue
                key = (s.name, s.labels)
                increase = s.value - self._pushed.get(key, 0.0)
                if increase > 0:
                    metric.inc(increase, tags=tags)
                    self._pushed[key] = s.value
            for name, histogram in self._counters.latency.items():
                while histogram.pending:
                    self._metrics[name].observe(histogram.pending.popleft())

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.push()
            except Exception:  # a metrics hiccup must not take the replica down
                log.exception("pushing Serve metrics failed")

    def stop(self) -> None:
        self._stop.set()
