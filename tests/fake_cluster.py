"""A local autoscaling Ray cluster whose worker nodes are processes on this machine: Ray's fake
multi-node provider driven by its real autoscaler, with node types taken from a shipped cluster
config. For tests that show a config's GPU node type is launched for a request and removed when idle.

Ray ships `ray.cluster_utils.AutoscalingCluster` for this, but in Ray 2.60 it cannot be used on a
shared machine: its `start()` and `shutdown()` run `ray stop --force` (which kills every Ray
process of every user on the machine), it binds the default GCS port 6379, and the pip wheel lacks
the `fake_multi_node/example.yaml` it reads its base config from. This module builds the same
config itself and starts the head in-process on a free port with its own temp dir, so shutting it
down ends exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAKE_HEAD_TYPE = "ray.head.default"  # the node type name the fake provider gives the head
NODE_TYPE_LABEL = "fdllm-node-type"  # a node label naming the node type each fake worker was launched as
NODE_OBJECT_STORE_BYTES = 80 * 1024**2  # per fake node: just above Ray's minimum, RAM is shared


@dataclass(frozen=True, kw_only=True)
class WorkerType:
    """One autoscaled worker node type: what Ray sees of a launcher node type or a KubeRay group."""

    name: str
    cpus: float
    gpus: float
    min_workers: int
    max_workers: int

    def node_type_config(self) -> dict[str, Any]:
        resources = {"CPU": self.cpus, "object_store_memory": NODE_OBJECT_STORE_BYTES}
        if self.gpus:
            resources["GPU"] = self.gpus  # fake nodes declare GPUs as a resource; no device needed
        return {"resources": resources, "node_config": {}, "min_workers": self.min_workers,
                "max_workers": self.max_workers, "labels": {NODE_TYPE_LABEL: self.name}}


def launcher_worker_types(cluster_yaml: dict[str, Any]) -> dict[str, WorkerType]:
    """The worker node types of a Ray cluster launcher YAML (`available_node_types` minus the head)."""
    head = cluster_yaml["head_node_type"]
    return {
        name: WorkerType(name=name, cpus=nt["resources"].get("CPU", 0), gpus=nt["resources"].get("GPU", 0),
                         min_workers=nt.get("min_workers", 0), max_workers=nt["max_workers"])
        for name, nt in cluster_yaml["available_node_types"].items() if name != head
    }


def _k8s_cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_worker_types(ray_cluster_spec: dict[str, Any]) -> dict[str, WorkerType]:
    """The worker groups of a KubeRay RayCluster spec, with the resources Ray reads from the Ray
    container's limits (CPU, nvidia.com/gpu)."""
    types = {}
    for group in ray_cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        types[group["groupName"]] = WorkerType(
            name=group["groupName"], cpus=_k8s_cpus(limits["cpu"]), gpus=float(limits.get("nvidia.com/gpu", 0)),
            min_workers=group["minReplicas"], max_workers=group["maxReplicas"])
    return types


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalAutoscalingCluster:
    """A CPU-0 head plus the autoscaler, launching the configured worker types as local fake nodes.

    Use as a context manager; `address` is what `ray.init(address=...)` takes. Each worker node
    carries its type as a node label, which `worker_counts` reads back.
    """

    def __init__(self) -> None:
        import ray.util

        # The node's own IP, not loopback: Ray clients resolve 127.0.0.1 to it before connecting.
        self.ip = ray.util.get_node_ip_address()
        self.port = _free_port(self.ip)
        self.address = f"{self.ip}:{self.port}"
        # Short: Ray's Unix socket paths under the session dir must stay below 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="fdllm-ray-"))
        self.config_path = self.workdir / "autoscaling.json"
        self.configure({}, max_workers=0, idle_timeout_s=60, upscaling_speed=1.0)
        self._head = None
        self._saved_env: dict[str, str | None] = {}

    def configure(self, worker_types: dict[str, WorkerType], *, max_workers: int, idle_timeout_s: float,
                  upscaling_speed: float) -> None:
        """(Re)write the autoscaling config: the autoscaler reads the file on every update (1 s), so
        one running head can stand in for several cluster configs, one after another."""
        config = {
            "cluster_name": "fdllm-fake",
            "max_workers": max_workers,
            "upscaling_speed": upscaling_speed,
            "idle_timeout_minutes": idle_timeout_s / 60,
            "provider": {"type": "fake_multinode", "gcs_address": self.address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {
                FAKE_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                **{name: wt.node_type_config() for name, wt in worker_types.items()},
            },
            "head_node_type": FAKE_HEAD_TYPE,
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        tmp.replace(self.config_path)  # atomic: the autoscaler never reads half a file

    def __enter__(self) -> "LocalAutoscalingCluster":
        import ray._private.node
        import ray._private.parameter

        # Read by the autoscaler (monitor) process the head starts: fake provider on, 1 s updates.
        self._set_env({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        params = ray._private.parameter.RayParams(
            node_ip_address=self.ip, gcs_server_port=self.port, temp_dir=str(self.workdir / "ray"),
            num_cpus=0, num_gpus=0, object_store_memory=NODE_OBJECT_STORE_BYTES,
            include_dashboard=False, min_worker_port=0, max_worker_port=0,
            autoscaling_config=str(self.config_path),
        )
        try:
            self._head = ray._private.node.Node(params, head=True, shutdown_at_exit=False, spawn_reaper=False)
        except BaseException:
            self._restore_env()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """End the head's processes (the autoscaler with them), then any fake worker node still
        attached to this cluster's GCS address (the autoscaler started them; none should be left
        when the caller waited for scale-down)."""
        if self._head is not None:
            self._head.kill_all_processes(check_alive=False, allow_graceful=True)
            self._head = None
        leftovers = self.leftover_processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.leftover_processes(), 30, f"exit of processes {leftovers}")
        self._restore_env()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def leftover_processes(self) -> list[int]:
        """Pids of live processes whose command line names this cluster's GCS address (Linux /proc)."""
        names_us = re.compile(re.escape(self.address) + r"(?!\d)")  # not a longer port that starts alike
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # exited while we looked
                continue
            if names_us.search(cmdline) and state != "Z":
                found.append(int(entry.name))
        return found

    def _set_env(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}


def worker_types() -> dict[str, str]:
    """Node type of every alive worker node of the connected cluster, by node id (the head left out)."""
    import ray

    return {node["NodeID"]: node.get("Labels", {}).get(NODE_TYPE_LABEL, "?") for node in ray.nodes()
            if node["Alive"] and "node:__internal_head__" not in node["Resources"]}


def worker_counts() -> Counter:
    """Alive worker nodes of the connected cluster by node type (the head is not counted)."""
    return Counter(worker_types().values())


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll `predicate()` until it returns a truthy value; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(poll_s)
