"""benchmarks/bench_serve.py's local run: the load test's Ray and Serve are its own."""

from __future__ import annotations

import pytest

from benchmarks.benchmark import parse_args


class Started(Exception):
    pass


def test_the_local_load_test_starts_a_ray_of_its_own_not_a_running_clusters(monkeypatch):
    """`ray.init()` joins a `ray start` cluster on the machine: the load test then deployed its "fdllm" app
    over the cluster's and shut the cluster's Serve down at its end."""
    import ray

    from benchmarks import bench_serve

    def init(**kwargs):
        raise Started(kwargs)

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Started) as started:
        bench_serve.run(parse_args(["serve", "--concurrency", "1", "--requests", "1"]))
    assert started.value.args[0]["address"] == "local"


@pytest.mark.parametrize("n,want", [(1, 1), (10, 10), (100, 99), (101, 100), (1000, 990)])
def test_p99_is_the_nearest_rank(n, want):
    """Of 100 latencies the 99th (`int(0.99 * n)` read the slowest)."""
    import random

    from benchmarks.bench_serve import p99

    values = [float(v) for v in range(1, n + 1)]
    random.Random(0).shuffle(values)
    assert p99(values) == want
