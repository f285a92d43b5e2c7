"""Session affinity across replicas: the turns of one conversation go to one replica.

Each replica has its own prefix cache, so a chat's next turn (the earlier turns plus a new message)
skips prefilling what it shares with the last one only if it lands on the replica that served the
last one. Serve's default router (power of two choices) spreads a conversation's turns at random;
with N replicas only about 1/N of them find their prefix. Ray Serve reads a session id from each
HTTP request's `x-session-id` header (the header is Ray's setting: RAY_SERVE_SESSION_ID_HEADER_KEY
in the environment Ray starts with) into the request's metadata, as Python callers set it with
`handle.options(session_id=...)`; Serve's own router ignores it. With `ServerConfig.session_affinity`
this router routes by it (vLLM's production-stack router does the same with its session key):

- the home replica of a session is the one with the highest hash of (session, replica id)
  (rendezvous hashing): every proxy picks the same one without sharing state, and when replicas
  are added or removed only the sessions of those replicas move;
- the home replica is tried first, then what Serve's default router picks (two random replicas,
  the same node's first; the less loaded of them), so a full home replica (at max_ongoing_requests)
  never makes a request wait;
- a home replica more than `max_imbalance` requests busier than those two (as the router last saw
  their queues) is passed over for this request: a hot session cannot pile a replica's queue up;
- requests without a session are routed exactly as Serve's default router routes them.

Serve's request-router API is alpha in Ray 2.60 (`ray.serve.request_router`); the queue lengths are
those its router caches, as Ray's own prefix-aware router reads them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter  # Serve's default (RequestRouterConfig)
from ray.serve.request_router import PendingRequest, RunningReplica

DEFAULT_MAX_IMBALANCE = 8


def session_key(pending_request: PendingRequest | None) -> str | None:
    """The request's session id (None: it has none)."""
    if pending_request is None:
        return None
    return getattr(pending_request.metadata, "session_id", "") or None


def home_replica(session: str, replicas: Sequence[RunningReplica]) -> RunningReplica:
    """The replica with the highest hash of (session, replica id): rendezvous hashing."""

    def weight(replica: RunningReplica) -> bytes:
        # surrogatepass: a Python caller's session id may be any str (a lone surrogate too); an encoding
        # error here would be raised inside Serve's routing task, where it leaves the request waiting forever
        key = f"{session}\0{replica.replica_id.unique_id}".encode("utf-8", "surrogatepass")
        return hashlib.blake2b(key, digest_size=8).digest()

    return max(replicas, key=weight)


def rank_replicas(home: RunningReplica, others: list[RunningReplica], queue_len: Callable[[RunningReplica], int | None],
                  max_imbalance: int) -> list[list[RunningReplica]]:
    """Serve's ranks for a session's request: the home replica first, then `others` (two random
    replicas); `others` alone when home's queue is more than `max_imbalance` longer than theirs
    (None: not known, which never passes the home replica over)."""
    others = [r for r in others if r is not home]
    home_len = queue_len(home)
    known = [n for n in map(queue_len, others) if n is not None]
    if home_len is not None and known and home_len - min(known) > max_imbalance:
        return [others]
    return [[home], others] if others else [[home]]


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default router with session affinity: `RequestRouterConfig(request_router_class=
    SessionAffinityRouter, request_router_kwargs={"max_imbalance": ...})` (`build_app` sets it from
    ServerConfig.session_affinity)."""

    def initialize_state(self, max_imbalance: int = DEFAULT_MAX_IMBALANCE, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self.max_imbalance = max_imbalance

    def _queue_len(self, replica: RunningReplica) -> int | None:
        cache = getattr(self, "_replica_queue_len_cache", None)
        return cache.get(replica.replica_id) if cache is not None else None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        default = await super().choose_replicas(candidate_replicas, pending_request)
        session = session_key(pending_request)
        if session is None or len(candidate_replicas) < 2 or not default:
            return default
        return rank_replicas(home_replica(session, candidate_replicas), default[0], self._queue_len, self.max_imbalance)
