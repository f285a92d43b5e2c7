"""Replica count of the Serve app over time, sampled from `serve.status()` in a background thread,
so a load run can show what the autoscaler did next to the latencies it measured.

    with ReplicaSampler() as sampler:
        ...  # send load
    print(sampler.timeline())   # "0.0s:1 12.5s:2 40.1s:1"

Needs the calling process connected to the Ray cluster that runs the app (the driver that ran
`serve.run`, or `ray.init(address=...)`).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("fdllm.serve.replicas")

APP_NAME = "fdllm"  # the application name serve.app.run_local and serve/config*.yaml deploy
DEPLOYMENT_NAME = "FdllmServer"  # serve.app's deployment
# Serve's routers and replicas report ongoing requests to the autoscaler every 10 s by default: too
# slow to watch scaling within a test or one benchmark level. Read by Serve's processes, so it must
# be in the environment before Ray starts (they inherit it).
FAST_AUTOSCALING_METRICS_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


def running_replicas(app_name: str = APP_NAME, deployment: str = DEPLOYMENT_NAME) -> int:
    """Replicas of `deployment` in state RUNNING now (0 when the app is not deployed)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 0
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


class ReplicaSampler:
    """Samples `running_replicas()` every `interval_s` while in a `with` block; `samples` holds
    (seconds since start, replicas) pairs."""

    def __init__(self, interval_s: float = 0.5, app_name: str = APP_NAME, deployment: str = DEPLOYMENT_NAME) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.app_name, self.deployment = app_name, deployment
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> "ReplicaSampler":
        self._start = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="replica-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            try:
                count = running_replicas(self.app_name, self.deployment)
            except Exception as exc:  # noqa: BLE001 - a failed poll is logged and skipped, not fatal
                log.warning("serve.status() failed: %s", exc)
            else:
                self.samples.append((time.monotonic() - self._start, count))
            if self._stop.wait(self.interval_s):
                return

    @property
    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)

    def timeline(self) -> str:
        """The samples where the count changed, as "SECONDSs:COUNT" (the first one always)."""
        changes = [(t, n) for i, (t, n) in enumerate(self.samples) if i == 0 or n != self.samples[i - 1][1]]
        return " ".join(f"{t:.1f}s:{n}" for t, n in changes)
