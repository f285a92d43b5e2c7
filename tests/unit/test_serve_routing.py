"""Session affinity (serve.routing): which replica a session's requests go to, and when they do not."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from serve.routing import home_replica, rank_replicas, session_key


def replica(name: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), name=name)


def test_session_key_is_the_requests_session_id():
    """Serve's proxy puts the x-session-id header there (handle.options(session_id=) for Python callers)."""
    request = lambda session_id: SimpleNamespace(args=[b"..."], kwargs={}, metadata=SimpleNamespace(session_id=session_id))  # noqa: E731
    assert session_key(request("chat-42 é")) == "chat-42 é"
    assert session_key(request("")) is None
    assert session_key(None) is None


@pytest.mark.parametrize("session", ["\ud800", "x" * 100_000, "\0", "\U0001f600"])
def test_any_str_session_has_a_home_replica(session):
    """`handle.options(session_id=...)` takes any str: an exception in routing would leave the request
    waiting in Serve's router for ever (a lone surrogate did)."""
    replicas = [replica(f"r{i}") for i in range(3)]
    assert home_replica(session, replicas) is home_replica(session, list(reversed(replicas)))


def test_home_replica_spreads_sessions_and_moves_few_when_replicas_change():
    replicas = [replica(f"r{i}") for i in range(4)]
    sessions = [f"session-{i}" for i in range(2000)]
    home = {s: home_replica(s, replicas).name for s in sessions}
    assert home == {s: home_replica(s, list(reversed(replicas))).name for s in sessions}  # order-free: every proxy agrees
    assert all(400 <= n <= 600 for n in Counter(home.values()).values()), Counter(home.values())
    fewer = {s: home_replica(s, replicas[:3]).name for s in sessions}  # r3 went away: only its sessions move
    assert all(fewer[s] == home[s] for s in sessions if home[s] != "r3")
    more = {s: home_replica(s, [*replicas, replica("r4")]).name for s in sessions}  # r4 came: it takes ~1/5, from all
    moved = [s for s in sessions if more[s] != home[s]]
    assert all(more[s] == "r4" for s in moved) and 300 <= len(moved) <= 500


@pytest.mark.parametrize("lengths, want", [
    ({"home": 3, "a": 0, "b": 1}, [["home"], ["a", "b"]]),
    ({"home": 8, "a": 0, "b": 9}, [["home"], ["a", "b"]]),  # exactly max_imbalance more: still home
    ({"home": 9, "a": 0, "b": 9}, [["a", "b"]]),  # more than that: Serve's own pick alone
    ({"home": 50, "a": None, "b": None}, [["home"], ["a", "b"]]),  # the others' queues unknown: home
    ({"home": None, "a": 0, "b": 0}, [["home"], ["a", "b"]]),
])
def test_rank_replicas_puts_home_first_unless_it_is_much_busier(lengths, want):
    by_name = {name: replica(name) for name in lengths}
    ranks = rank_replicas(by_name["home"], [by_name["a"], by_name["b"]], lambda r: lengths[r.name], max_imbalance=8)
    assert [[r.name for r in rank] for rank in ranks] == want


def test_rank_replicas_never_lists_home_twice():
    home, other = replica("home"), replica("other")
    assert rank_replicas(home, [home, other], lambda r: 0, 8) == [[home], [other]]
    assert rank_replicas(home, [home], lambda r: 0, 8) == [[home]]
