"""The cloud path on one machine: a two-node Ray cluster (`ray.cluster_utils.Cluster`, each node
with its own model cache) and a local S3-compatible server (moto, loopback) as the object store.

The commands are the ones a user runs on a real cluster, with s3:// URIs for base model, data,
Ray Train storage and the servable export:
  fine-tune (2 workers, one per node, the joint AR + diffusion objective) -> checkpoints + servable
  export in S3 -> resume from S3 -> Serve (2 replicas, one per node) loads the export from S3 and
  answers diffusion and speculative requests -> metrics of both replicas through Ray's metrics export.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

import fdllm
from fdllm import storage

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.finetune import FinetuneConfig, _started_ray_here, build_parser, run  # noqa: E402
from tests.s3_server import make_bucket, upload_dir  # noqa: E402
from tests.sft_data import good_records, write_jsonl  # noqa: E402

RUN = "cloud"
NODES = ("head", "worker")


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {name: root / name for name in (*NODES, "driver")}


@pytest.fixture(scope="module")
def cluster(s3_env, caches):
    """Two nodes of 2 CPUs; each node's processes see their own FDLLM_CACHE_DIR (as two machines
    would have two disks). The driver (this process) has a third."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(storage.CACHE_ENV, str(caches["driver"]))
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "env_vars": {storage.CACHE_ENV: str(caches["head"])}, "include_dashboard": False,
            "_system_config": {"metrics_report_interval_ms": 1000},
        })
        c.add_node(num_cpus=2, env_vars={storage.CACHE_ENV: str(caches["worker"])})
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def bucket(s3_env, qwen2_dir, tmp_path_factory) -> str:
    uri = make_bucket("fdllm-cloud-test")
    upload_dir(qwen2_dir, f"{uri}/models/base")
    data = write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", good_records(24), [])
    upload_dir(data.parent, f"{uri}/data")
    return uri


def _finetune(bucket: str, *extra: str) -> "ray.train.Result":
    argv = ["--model", f"{bucket}/models/base", "--data", f"{bucket}/data/", "--storage-path", f"{bucket}/runs",
            "--run-name", RUN, "--num-workers", "2", "--placement-strategy", "SPREAD",
            "--cpus-per-worker", "1", "--data-cpus", "0.25", "--block-size", "8", "--sub-block-size", "4",
            "--seq-len", "128", "--batch-size", "2", "--lr", "1e-3", "--save-every", "2", "--log-every", "2",
            "--objective", "joint", *extra]
    args = vars(build_parser().parse_args(argv))
    return run(FinetuneConfig.from_sources(args.pop("config"), **args))


def _listing(uri: str) -> dict[str, int]:
    return {name: size for name, (size, _) in storage._list(*storage.filesystem(uri)).files.items()}


def _manifest(uri: str) -> dict:
    fs, inner = storage.filesystem(uri)
    with fs.open_input_stream(f"{inner}/{storage.MANIFEST}") as f:
        return json.loads(f.read())


def _cached_versions(cache: Path, uri: str) -> list[Path]:
    slot = cache.joinpath(*storage._cache_parts(uri))
    return sorted(p for p in slot.iterdir() if p.is_dir()) if slot.is_dir() else []


def test_finetune_from_s3_on_two_nodes_and_resume(cluster, bucket, caches):
    assert not _started_ray_here()  # a cluster joined: a run it cannot hold yet would wait for nodes, not fail
    servable = f"{bucket}/runs/{RUN}/servable"
    result = _finetune(bucket, "--max-steps", "2")
    assert result.metrics["step"] == 2
    assert result.checkpoint.path.startswith(f"fdllm-cloud-test/runs/{RUN}/")  # stored in the bucket
    exported = _listing(servable)
    assert {"config.json", "model.safetensors", "tokenizer.json", "fdllm_config.json", storage.MANIFEST} <= set(exported)
    assert not any(n.startswith(("train_state", "deepspeed")) for n in exported)  # no optimizer state
    first_export = _manifest(servable)["export_id"]
    fs, inner = storage.filesystem(servable)
    with fs.open_input_stream(f"{inner}/fdllm_config.json") as f:  # the engine follows the objective's prefix
        assert json.loads(f.read())["prefix_attention"] == "causal"
    # One train worker per node, each read the base through its node's own cache; the driver
    # fetched only config and tokenizer.
    base = f"{bucket}/models/base"
    for node in NODES:
        (version,) = _cached_versions(caches[node], base)
        assert (version / "model.safetensors").is_file(), node
    (driver_copy,) = _cached_versions(caches["driver"], base)
    assert driver_copy.name.endswith("-noweights") and not list(driver_copy.glob("*.safetensors"))

    resumed = _finetune(bucket, "--max-steps", "4", "--resume")
    assert resumed.metrics["restored_step"] == 2 and resumed.metrics["step"] == 4
    assert _manifest(servable)["export_id"] != first_export  # the stable path holds the newest export
    # Resume read the checkpoint from S3, not from the base: it continued, it did not restart.
    assert resumed.checkpoint.path.endswith("step_00000004")


def test_serve_two_replicas_from_s3_with_cluster_metrics(cluster, bucket, caches):
    from serve.app import run_local

    servable = f"{bucket}/runs/{RUN}/servable"
    if not _listing(servable):
        pytest.skip("needs the export of test_finetune_from_s3_on_two_nodes_and_resume")
    url = run_local({"model": servable, "num_replicas": 2, "max_replicas_per_node": 1, "num_cpus_per_replica": 0.5,
                     "default_max_tokens": 8, "metrics_interval_s": 0.5}, proxy_location="HeadOnly", timeout_s=180)
    for node in NODES:  # each replica downloaded the export into its node's cache
        (version,) = _cached_versions(caches[node], servable)
        assert version.name.startswith(_manifest(servable)["export_id"] + "-"), node  # + its files' fingerprint

    prompt = "hello world, the quick"
    sent = 8
    for _ in range(sent):
        r = httpx.post(f"{url}/v1/completions", json={"model": RUN, "prompt": prompt, "max_tokens": 8,
                                                        "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
    local = fdllm.Engine.from_pretrained(_cached_versions(caches["head"], servable)[0])
    assert local.config.causal_prefix
    expect = local.generate([prompt], fdllm.SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    assert r.json()["choices"][0]["text"] == expect.text
    ar = local.generate([prompt], fdllm.SamplingParams(max_new_tokens=8, temperature=0.0, mode="ar"))[0]
    spec = httpx.post(f"{url}/v1/completions", json={"model": RUN, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                      "mode": "speculative"}, timeout=120)
    assert spec.status_code == 200 and spec.json()["choices"][0]["text"] == ar.text, spec.text  # lossless over HTTP
    sent += 1

    # Ray's metrics export: every node's agent serves its replicas' samples; scraping all of them
    # (what Prometheus does through Ray's service discovery) sees every request exactly once.
    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    deadline = time.monotonic() + 90
    while True:
        counts: dict[str, float] = {}
        for port in ports:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            for line in text.splitlines():
                m = re.match(r'ray_fdllm_requests_total\{(.*)\} ([\d.e+]+)$', line)
                if m and 'endpoint="completions"' in m.group(1) and 'status="200"' in m.group(1):
                    replica = re.search(r'replica="([^"]+)"', m.group(1)).group(1)
                    counts[replica] = counts.get(replica, 0.0) + float(m.group(2))
        if sum(counts.values()) == sent or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sum(counts.values()) == sent, counts
