"""Session affinity over HTTP (serve.routing), on a local Ray instance with two replicas: requests
carrying Ray Serve's session header (x-session-id) reach one replica per session, so a
conversation's next turn reads its earlier turn's KV pages from that replica's prefix cache;
sessions spread over both replicas. Under Serve's default router half of the second turns would land
on the other replica and prefill everything again (the check that this test can fail: drop
`session_affinity` and it does)."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tests.helpers import start_local_ray  # noqa: E402

MODEL = "tiny-dllm"
HEADER = "x-session-id"  # Ray Serve's session header (RAY_SERVE_SESSION_ID_HEADER_KEY)
SESSIONS = 8
BLOCK = 8  # dllm_dir's block: the prefix cache's unit


@pytest.fixture(scope="module")
def two_replicas(dllm_dir):
    from serve.app import run_local

    start_local_ray(num_cpus=4)
    yield run_local({"model": str(dllm_dir), "model_name": MODEL, "num_replicas": 2, "num_cpus_per_replica": 0.5,
                     "session_affinity": True, "default_max_tokens": 1}, timeout_s=180)
    serve.shutdown()
    ray.shutdown()


def complete(url: str, prompt: list[int], session: str) -> dict:
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0},
                          headers={HEADER: session}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_sessions_requests_reach_one_replica_and_sessions_spread(two_replicas):
    replicas = {}
    for s in range(2 * SESSIONS):
        seen = {httpx.get(f"{two_replicas}/health", headers={HEADER: f"chat-{s}"}, timeout=30).json()["replica"]
                for _ in range(4)}
        assert len(seen) == 1, (s, seen)
        replicas[s] = seen.pop()
    assert len(Counter(replicas.values())) == 2, replicas  # 16 sessions all on one replica: 2 ** -15
    anyone = {httpx.get(f"{two_replicas}/health", timeout=30).json()["replica"] for _ in range(12)}
    assert anyone == set(replicas.values())  # without the header: Serve's router, over both


def test_a_conversations_next_turn_reads_the_last_turns_prefix_cache(two_replicas):
    for s in range(SESSIONS):
        first_turn = [10 + s] + list(range(20, 20 + 3 * BLOCK))  # 3 whole blocks + 1, unlike other sessions' from token 0
        first = complete(two_replicas, first_turn, f"conversation-{s}")
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        second = complete(two_replicas, first_turn + [60 + s] * BLOCK, f"conversation-{s}")
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * BLOCK, (s, second["usage"])
