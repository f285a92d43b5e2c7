"""The small pieces the autoscaling tests and the serve benchmark rest on: node types read from the
shipped cluster files, and the replica sampler's timeline. No Ray cluster; well under a second."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.fake_cluster import kuberay_worker_types, launcher_worker_types

REPO = Path(__file__).resolve().parents[2]


def test_launcher_worker_types_are_the_yaml_gpu_types_without_the_head():
    cfg = yaml.safe_load((REPO / "cluster/aws-a100.yaml").read_text())
    types = launcher_worker_types(cfg)
    assert set(types) == {"gpu_a100"}
    a100 = types["gpu_a100"]
    assert (a100.cpus, a100.gpus, a100.min_workers, a100.max_workers) == (96, 8, 0, 2)
    assert a100.node_type_config()["resources"]["GPU"] == 8


def test_kuberay_worker_types_read_the_ray_container_limits():
    spec = {"workerGroupSpecs": [{
        "groupName": "g", "minReplicas": 1, "maxReplicas": 3,
        "template": {"spec": {"containers": [{"resources": {
            "limits": {"cpu": "1500m", "memory": "8Gi", "nvidia.com/gpu": "2"}}}]}},
    }]}
    (group,) = kuberay_worker_types(spec).values()
    assert (group.name, group.cpus, group.gpus, group.min_workers, group.max_workers) == ("g", 1.5, 2.0, 1, 3)
    service = yaml.safe_load((REPO / "cluster/kuberay/rayservice-serve.yaml").read_text())
    pods = kuberay_worker_types(service["spec"]["rayClusterConfig"])
    assert {n: (t.cpus, t.gpus) for n, t in pods.items()} == {"gpu-1x": (8.0, 1.0)}


def test_replica_sampler_records_changes(monkeypatch):
    pytest.importorskip("ray.serve")
    import serve.replicas as replicas

    counts = iter([1, 1, 2, 2, 1])
    monkeypatch.setattr(replicas, "running_replicas", lambda *a: next(counts, 1))
    with replicas.ReplicaSampler(interval_s=0.01) as sampler:
        while len(sampler.samples) < 6:
            time.sleep(0.01)
    assert [n for _, n in sampler.samples[:5]] == [1, 1, 2, 2, 1]
    assert sampler.peak == 2
    assert [part.split(":")[1] for part in sampler.timeline().split()] == ["1", "2", "1"]
    with pytest.raises(ValueError):
        replicas.ReplicaSampler(interval_s=0)
