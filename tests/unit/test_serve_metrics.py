"""serve/metrics.py: one list of samples behind both the replica's /metrics page and the
ray.serve.metrics export (counters pushed as increases, so Ray's sum over pushes is the count)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")
serve_metrics = pytest.importorskip("ray.serve.metrics")

from serve import metrics  # noqa: E402

# The names dashboards and alerts already use (counters are exposed with `_total`).
PAGE_NAMES = {
    "fdllm_requests_total", "fdllm_stream_errors_total", "fdllm_prompt_tokens_total", "fdllm_generation_tokens_total", "fdllm_forwards_total",
    "fdllm_tokens_per_forward", "fdllm_running_requests", "fdllm_waiting_requests", "fdllm_free_kv_pages",
    "fdllm_cached_prompt_tokens_total", "fdllm_prefix_cached_kv_pages", "fdllm_preemptions_total",
    "fdllm_engine_steps_total", "fdllm_engine_step_seconds_total", "fdllm_engine_last_step_seconds",
    "fdllm_time_to_first_token_seconds", "fdllm_time_per_output_token_seconds", "fdllm_e2e_request_latency_seconds",
}


class FakeEngine:
    def __init__(self) -> None:
        self.metrics = SimpleNamespace(steps=0, step_seconds_total=0.0, last_step_seconds=0.0)
        self.waiting = self.preemptions = 0

    def stats(self):
        return {"running": 1, "waiting": self.waiting, "free_pages": 7, "cached_pages": 2, "preemptions": self.preemptions}


class FakeMetric:
    log: list = []

    def __init__(self, name, description="", tag_keys=None, boundaries=None):
        self.name, self.tag_keys = name, tuple(tag_keys or ())

    def observe(self, value, tags=None):
        FakeMetric.log.append(("observe", self.name, value, tags))

    def inc(self, value=1.0, tags=None):
        assert value > 0 and set(tags or {}) == set(self.tag_keys)
        FakeMetric.log.append(("inc", self.name, value, tags))

    def set(self, value, tags=None):
        FakeMetric.log.append(("set", self.name, value, tags))


def _result(prompt: int, generated: int, forwards: int, cached: int = 0, first: float | None = 0.5, latency: float = 2.5):
    return SimpleNamespace(prompt_token_ids=[0] * prompt, token_ids=[0] * generated, num_forwards=forwards,
                           num_cached_tokens=cached, time_to_first_token_s=first, latency_s=latency)


def test_latency_histograms_are_each_requests_times_in_prometheus_buckets_and_pushed_to_ray_once(monkeypatch):
    """vLLM's three per-request latencies; the page's buckets counted by hand, Ray's copy given each
    observation once (and none held when no exporter drains them)."""
    counters, engine = metrics.RequestCounters(), FakeEngine()
    counters.record([_result(3, 5, 2, first=0.03, latency=0.11)], 0, 1)  # 4 tokens after the first in 0.08 s
    counters.record([_result(3, 1, 1, first=0.2, latency=0.2)], 0, 1)  # one token: no time per output token
    counters.record([_result(3, 0, 1, first=None, latency=7.0)], 0, 1)  # nothing generated: no first token
    assert all(h.pending is None for h in counters.latency.values())
    text = metrics.render(metrics.make_registry(counters, engine)).decode()
    assert 'fdllm_time_to_first_token_seconds_bucket{le="0.02"} 0.0' in text
    assert 'fdllm_time_to_first_token_seconds_bucket{le="0.04"} 1.0' in text
    assert 'fdllm_time_to_first_token_seconds_bucket{le="0.25"} 2.0' in text
    assert 'fdllm_time_to_first_token_seconds_count 2.0' in text and "fdllm_time_to_first_token_seconds_sum 0.23" in text
    assert 'fdllm_time_per_output_token_seconds_bucket{le="0.01"} 0.0' in text  # 0.02 s
    assert 'fdllm_time_per_output_token_seconds_bucket{le="0.025"} 1.0' in text
    assert 'fdllm_time_per_output_token_seconds_count 1.0' in text
    assert 'fdllm_e2e_request_latency_seconds_bucket{le="0.1"} 0.0' in text
    assert 'fdllm_e2e_request_latency_seconds_bucket{le="0.3"} 2.0' in text
    assert 'fdllm_e2e_request_latency_seconds_bucket{le="5.0"} 2.0' in text
    assert 'fdllm_e2e_request_latency_seconds_bucket{le="+Inf"} 3.0' in text
    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(serve_metrics, kind, FakeMetric)
    FakeMetric.log = []
    exporter = metrics.RayMetricsExporter(counters, engine, interval_s=3600)  # pushes only when told
    try:
        counters.record([_result(3, 3, 1, first=0.1, latency=0.3)], 0, 1)
        exporter.push()
        exporter.push()
    finally:
        exporter.stop()
    observed = sorted((name, value) for kind, name, value, _ in FakeMetric.log if kind == "observe")
    assert observed == [("fdllm_e2e_request_latency_seconds", 0.3), ("fdllm_time_per_output_token_seconds", pytest.approx(0.1)),
                        ("fdllm_time_to_first_token_seconds", 0.1)]


def test_page_keeps_the_prometheus_names():
    counters, engine = metrics.RequestCounters(), FakeEngine()
    counters.by_status[("chat", 200)] += 2
    text = metrics.render(metrics.make_registry(counters, engine)).decode()
    assert {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")} == PAGE_NAMES
    assert 'fdllm_requests_total{endpoint="chat",status="200"} 2.0' in text


def test_token_counters_are_the_usage_of_the_responses():
    """A request of 2 prompts x 3 choices: the prompts count once each, as the response's usage counts them
    (once per choice, they overstated a dashboard reconciled against usage), and only once all of a prompt's
    choices finished; cached tokens, per prompt the most any choice took."""
    from serve.protocol import usage

    results = [_result(p, 4, 1, cached=c) for p, c in ((10, 0), (10, 8), (10, 8), (7, 0), (7, 0), (7, 4))]
    counters, done = metrics.RequestCounters(), [None] * 6
    for k in (1, 3, 0, 4):  # finished in any order: prompt 0's choices 0 and 1 are done, 2 is not
        done[k] = results[k]
        counters.record(done, k, 3)
    assert (counters.prompt_tokens, counters.completion_tokens) == (0, 16)
    for k in (2, 5):
        done[k] = results[k]
        counters.record(done, k, 3)
    expected = usage(results, 3)
    assert (counters.prompt_tokens, counters.cached_prompt_tokens, counters.completion_tokens) == (
        expected["prompt_tokens"], expected["prompt_tokens_details"]["cached_tokens"], expected["completion_tokens"]) == (17, 12, 24)


def test_ray_export_pushes_increases_and_gauges(monkeypatch):
    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(serve_metrics, kind, FakeMetric)
    FakeMetric.log = []
    counters, engine = metrics.RequestCounters(), FakeEngine()
    exporter = metrics.RayMetricsExporter(counters, engine, interval_s=3600)  # pushes only when told
    try:
        counters.by_status[("completions", 200)] += 3
        counters.record([_result(5, 8, 4)], 0, 1)
        engine.metrics.steps = 4
        exporter.push()
        counters.by_status[("completions", 200)] += 1
        counters.by_status[("chat", 401)] += 1
        counters.record([_result(9, 2, 2, cached=8)], 0, 1)
        engine.waiting = engine.preemptions = 3
        exporter.push()
        exporter.push()  # nothing changed: no counter increase is pushed again
    finally:
        exporter.stop()
    incs = {}
    for kind, name, value, tags in FakeMetric.log:
        if kind == "inc":
            key = (name, tuple(sorted((tags or {}).items())))
            incs[key] = incs.get(key, 0) + value
    assert incs[("fdllm_requests", (("endpoint", "completions"), ("status", "200")))] == 4
    assert incs[("fdllm_requests", (("endpoint", "chat"), ("status", "401")))] == 1
    assert incs[("fdllm_generation_tokens", ())] == 10 and incs[("fdllm_forwards", ())] == 6
    assert incs[("fdllm_engine_steps", ())] == 4 and incs[("fdllm_preemptions", ())] == 3
    assert incs[("fdllm_prompt_tokens", ())] == 14 and incs[("fdllm_cached_prompt_tokens", ())] == 8
    gauges = [(name, value) for kind, name, value, _ in FakeMetric.log if kind == "set"]
    assert ("fdllm_waiting_requests", 3) == [g for g in gauges if g[0] == "fdllm_waiting_requests"][-1]
    assert [g for g in gauges if g[0] == "fdllm_tokens_per_forward"][-1] == ("fdllm_tokens_per_forward", 10 / 6)
