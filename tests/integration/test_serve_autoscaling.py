"""Serve autoscaling of the app, shown on a local Ray instance: a bounded loopback load makes Serve
add a replica (min 1, max 2), every request of the load succeeds while the replica starts, and the
app goes back to one replica once the load stops. Delays are shortened in the test config (the GPU
config waits 30 s to scale up and 300 s to scale down; the decision logic is the same).

    python -m pytest tests/integration/test_serve_autoscaling.py -q -s   # -s prints the replica timeline
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from serve.replicas import FAST_AUTOSCALING_METRICS_ENV, ReplicaSampler, running_replicas  # noqa: E402
from tests.helpers import start_local_ray  # noqa: E402

MODEL = "tiny-dllm"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,  # 4 clients keep ~4 requests in flight: Serve wants 2 replicas
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    # Serve warns (and will refuse) below its 10 s metrics_interval_s default; metrics themselves
    # are pushed every 0.5 s (FAST_AUTOSCALING_METRICS_ENV), so scale-up still reacts in ~1 s.
    "look_back_period_s": 12,
}
CLIENTS = 4
SCALE_UP_TIMEOUT_S = 150.0  # a second replica loads torch and the model: slow on a busy 2-core machine
LOAD_AFTER_SCALE_UP_S = 3.0  # keep the load on while the new replica joins the routing table
SCALE_DOWN_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def server(dllm_dir):
    from serve.app import run_local

    env = pytest.MonkeyPatch()
    for key, value in FAST_AUTOSCALING_METRICS_ENV.items():  # before Ray starts
        env.setenv(key, value)
    # 2 logical CPUs, half a CPU per replica: both replicas fit, as on the 2-core CI machine.
    start_local_ray(num_cpus=2)
    try:
        yield run_local({"model": str(dllm_dir), "model_name": MODEL, "autoscaling_config": AUTOSCALING,
                         "num_cpus_per_replica": 0.5, "default_max_tokens": 16, "max_waiting": 64},
                        timeout_s=120)
    finally:
        serve.shutdown()
        ray.shutdown()
        env.undo()


def _load(url: str, stop: threading.Event, statuses: Counter, errors: list[str]) -> None:
    """One loopback client: completions back to back until `stop` (each bounded by a timeout)."""
    body = {"model": MODEL, "prompt": "hello world, the quick", "max_tokens": 16, "temperature": 0}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                response = client.post(f"{url}/v1/completions", json=body)
                statuses[response.status_code] += 1
                if response.status_code != 200:
                    errors.append(response.text[:200])
            except httpx.HTTPError as exc:
                statuses["transport error"] += 1
                errors.append(repr(exc))


def test_replicas_scale_up_under_load_and_back_down(server):
    assert running_replicas() == 1
    stop, statuses, errors = threading.Event(), Counter(), []
    clients = [threading.Thread(target=_load, args=(server, stop, statuses, errors)) for _ in range(CLIENTS)]
    with ReplicaSampler(interval_s=0.5) as sampler:
        for client in clients:
            client.start()
        try:
            deadline = time.monotonic() + SCALE_UP_TIMEOUT_S
            while running_replicas() < AUTOSCALING["max_replicas"] and time.monotonic() < deadline:
                time.sleep(0.5)
            scaled_up = running_replicas()
            time.sleep(LOAD_AFTER_SCALE_UP_S)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=120)
        load_stopped = time.monotonic()
        deadline = load_stopped + SCALE_DOWN_TIMEOUT_S
        while running_replicas() > AUTOSCALING["min_replicas"] and time.monotonic() < deadline:
            time.sleep(0.5)
        scale_down_s = time.monotonic() - load_stopped
        time.sleep(2 * sampler.interval_s)  # so the timeline holds the count seen last
    print(f"\nreplicas over time: {sampler.timeline()}; requests by status: {dict(statuses)}; "
          f"back to {running_replicas()} replica(s) {scale_down_s:.1f} s after the load stopped")

    assert scaled_up == AUTOSCALING["max_replicas"], f"no scale-up under load: {sampler.timeline()}"
    assert statuses[200] > 0 and set(statuses) == {200}, f"requests failed while scaling: {errors[:3]}"
    assert running_replicas() == AUTOSCALING["min_replicas"], f"no scale-down after load: {sampler.timeline()}"
    counts = [n for _, n in sampler.samples]
    assert counts[0] == 1 and max(counts) == 2 and counts[-1] == 1, sampler.timeline()
