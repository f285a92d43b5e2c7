"""fdllm.storage against a local S3-compatible server (moto, loopback): the node cache (one download
per node, atomic, never poisoned), the publish protocol readers rely on, and URIs where the engine
takes checkpoint paths. A few seconds plus the server's start."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fdllm
from fdllm import storage
from pipelines.checkpoints import files_for_rank
from tests.s3_server import make_bucket, upload_dir

REPO = Path(__file__).resolve().parents[2]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _src(root: Path, files: dict[str, str]) -> Path:
    """A new directory under `root` holding `files` (name -> text): an export's source."""
    src = root / f"src{len(list(root.iterdir()))}"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


def _exported(path: Path) -> dict[str, bytes]:
    """`_tree` of an export without its manifest (which holds a fresh export id)."""
    return {name: data for name, data in _tree(path).items() if name != storage.MANIFEST}


@pytest.fixture(scope="module")
def bucket(s3_env) -> str:
    return make_bucket("fdllm-storage-test")


@pytest.fixture(scope="module")
def remote_dllm(bucket, dllm_dir) -> str:
    return upload_dir(dllm_dir, f"{bucket}/models/tiny-dllm")


@pytest.mark.parametrize("base,parts,joined", [
    ("s3://b/", ("runs", "/x/"), "s3://b/runs/x"),
    ("s3://b/runs?endpoint_override=h:9000&scheme=http", ("r1", "x"), "s3://b/runs/r1/x?endpoint_override=h:9000&scheme=http"),
    ("s3://b/runs/?endpoint_override=h", ("/r1/",), "s3://b/runs/r1?endpoint_override=h"),
    ("hdfs://nn:8020/data?user=me", ("x/a.jsonl",), "hdfs://nn:8020/data/x/a.jsonl?user=me"),
    ("/tmp/runs", ("r", "servable"), "/tmp/runs/r/servable"),
    ("/tmp/why?/runs/", ("r",), "/tmp/why?/runs/r"),  # a local name may hold a `?`
])
def test_join_puts_parts_in_the_path_and_keeps_the_query_last(base, parts, joined):
    assert storage.join(base, *parts) == joined


@pytest.mark.parametrize("path,directory,inside", [
    ("s3://b/runs/r?endpoint_override=h:9000", "s3://b/runs", True),
    ("s3://b/runs/r", "s3://b/runs/?endpoint_override=h:9000", True),
    ("s3://b/runs?endpoint_override=h", "s3://b/runs?endpoint_override=other", True),  # the same place
    ("S3://b/runs/r", "s3://b/runs", True),
    ("s3://b/my run/r", "s3://b/my%20run", True),  # as pyarrow reads the key
    ("file:///data/runs/r", "/data/runs", True),
    ("file:///data/x/../runs/r", "/data/runs", True), ("file://localhost/data/runs/r", "/data/runs", True),
    ("gcs://b/runs/r", "gs://b/runs", True), ("s3a://b/runs/r", "s3://b/runs", True),  # one store, two spellings
    ("/data/runs/r/", "/data/runs", True), ("/data/runs", "/data/runs/", True),
    ("s3://b/runs2?endpoint_override=h", "s3://b/runs", False),  # a name that starts alike is another one
    ("s3://b/runs", "s3://b/runs/r", False),  # the directory is inside the path, not the other way
    ("s3://b2/runs/r", "s3://b/runs", False), ("s3://b/runs/r", "gs://b/runs", False),
    ("hdfs://nn1:8020/runs/r?user=me", "hdfs://nn2:8020/runs?user=me", False),
    ("/data/runs2", "/data/runs", False),
    ("/data/why?/runs", "/data/why", False),  # a local name may hold a `?`
])
def test_same_or_under_compares_locations_not_strings(path, directory, inside):
    assert storage.same_or_under(path, directory) is inside


def test_same_or_under_reads_a_relative_path_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.same_or_under("runs/r", str(tmp_path)) and storage.same_or_under(str(tmp_path / "runs"), "runs/")
    assert not storage.same_or_under("runs", str(tmp_path / "run"))


def test_joined_uris_name_the_key_and_store_pyarrow_reads():
    """pyarrow's own parser as the oracle: the parts are in the key, the endpoint still in the query
    (no connection is made: with an endpoint given, pyarrow resolves no bucket region). The fine-tune's
    default export, STORAGE_PATH/RUN_NAME/servable, is such a join."""
    import pyarrow.fs as pafs

    from pipelines.finetune import resolve_run
    from pipelines.finetune_config import FinetuneConfig

    def key(uri: str) -> tuple[str, str]:
        fs, inner = pafs.FileSystem.from_uri(uri)
        return fs.type_name, inner

    for base in ("s3://b/runs?endpoint_override=127.0.0.1:1&scheme=http", "s3://b/runs/?endpoint_override=127.0.0.1:1"):
        assert key(storage.join(base, "r1", "summary.json")) == ("s3", "b/runs/r1/summary.json"), base
        run = resolve_run(FinetuneConfig(model=str(REPO / "assets" / "tiny-ar-base"), data=["d.jsonl"], max_steps=1,
                                         storage_path=base, run_name="r1"))
        assert key(run.output) == ("s3", "b/runs/r1/servable"), base


def test_small_files_locally_need_no_pyarrow(tmp_path, monkeypatch):
    """Records, summaries, results: local paths through plain Python (`~` as `filesystem` reads it),
    the directory made, text as UTF-8."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # a `~` taken literally lands here, not in the repository
    storage.write_bytes("~/new/dir/s.json", "modèle ✓\n".encode())
    assert (tmp_path / "new" / "dir" / "s.json").read_bytes() == "modèle ✓\n".encode()
    assert storage.read_text(tmp_path / "new" / "dir" / "s.json") == storage.read_text("~/new/dir/s.json") == "modèle ✓\n"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        storage.read_text(tmp_path / "missing.json")


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_small_file_is_replaced_whole(tmp_path, monkeypatch, scheme):
    """A reader of the old file (a rerun reading summary.json, a dashboard reading results) reads all of
    it while the new one is written, and a write that fails leaves the old file and no temporary one."""
    path = tmp_path / "out" / "rows.json"
    path.parent.mkdir()
    path.write_bytes(b"old " * 1000)
    with open(path, "rb") as reader:
        storage.write_bytes(f"{scheme}{path}", b"new")
        assert reader.read() == b"old " * 1000
    assert path.read_bytes() == b"new"

    monkeypatch.setattr(storage.os, "replace", lambda *a: 1 / 0)  # dies after writing, before the rename
    with pytest.raises(ZeroDivisionError):
        storage.write_bytes(f"{scheme}{path}", b"newer")
    assert [p.name for p in path.parent.iterdir()] == ["rows.json"] and path.read_bytes() == b"new"
    monkeypatch.undo()
    longest = path.parent / ("n" * 250)  # a name the filesystem takes, but not with a suffix added
    storage.write_bytes(f"{scheme}{longest}", b"long")
    assert longest.read_bytes() == b"long"


def test_small_files_on_object_stores(bucket, s3_env, monkeypatch):
    """Through the object store's filesystem, at the key a URI with a query names (boto3 and fsspec as
    the oracles): the endpoint is in the URI alone."""
    import boto3
    import fsspec

    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store = f"{bucket}?endpoint_override={s3_env['AWS_ENDPOINT_URL'].removeprefix('http://')}&scheme=http"
    uri = storage.join(store, "small", "s.json")
    storage.write_bytes(uri, "modèle".encode())
    assert s3.get_object(Bucket=bucket.removeprefix("s3://"), Key="small/s.json")["Body"].read() == "modèle".encode()
    assert storage.read_text(uri) == "modèle"
    with pytest.raises(FileNotFoundError, match="small/missing.json"):
        storage.read_text(storage.join(store, "small", "missing.json"))

    storage.write_bytes("memory://fdllm-test/small/x.txt", b"x")
    assert fsspec.filesystem("memory").cat("/fdllm-test/small/x.txt") == b"x"
    assert storage.read_text("memory://fdllm-test/small/x.txt") == "x"


def test_local_paths_are_not_copied(dllm_dir, tmp_path):
    assert storage.local_checkpoint(dllm_dir, tmp_path) == Path(dllm_dir)
    assert not any(tmp_path.iterdir())


def test_a_local_export_is_read_through_the_cache_while_it_is_rewritten(dllm_dir, tmp_path, monkeypatch):
    """A local (or NFS) `--output` is rewritten in place by the next export: a reader waits for the
    writer like a URI reader, and gets a private copy that the next export cannot cut short."""
    out, cache = tmp_path / "servable", tmp_path / "cache"
    storage.publish_dir(dllm_dir, str(out))
    first = storage.local_checkpoint(out, cache)
    assert first.is_relative_to(cache) and _exported(first) == _tree(Path(dllm_dir))

    real_copy = storage.shutil.copyfileobj
    midway, resume = threading.Event(), threading.Event()

    def stall_in_the_weights(src, dst, length=0):  # the writer, half-way through model.safetensors
        if getattr(src, "name", "").endswith("model.safetensors"):  # the writer's source (a reader's has no name)
            dst.write(src.read(1000))
            dst.flush()
            midway.set()
            assert resume.wait(30)
        return real_copy(src, dst, length)

    monkeypatch.setattr(storage.shutil, "copyfileobj", stall_in_the_weights)
    monkeypatch.setattr(storage, "_WAIT_POLL_S", 0.05)
    writer = threading.Thread(target=storage.publish_dir, args=(dllm_dir, str(out)))
    writer.start()
    try:
        assert midway.wait(30)
        with pytest.raises(TimeoutError, match="being written"):
            storage.local_checkpoint(out, cache, wait_s=0.2)
        threading.Timer(0.3, resume.set).start()
        second = storage.local_checkpoint(out, cache, wait_s=60)  # waits for the writer, then copies
    finally:
        resume.set()
        writer.join()
    assert second != first and _exported(second) == _tree(Path(dllm_dir))
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():  # the older copy is untouched by the rewrite: a reader of it loads it still
        assert torch.equal(fdllm.load_model(first)(ids), fdllm.load_model(dllm_dir)(ids))


def test_a_reader_that_meets_a_manifest_being_written_waits_for_it(dllm_dir, tmp_path, monkeypatch):
    """The moment a local export's writer has created its manifest but not yet filled it (a local file is
    written in place): the reader waits for the export, as for the writer's marker. It read the empty
    or half file as JSON and failed (seen once in the test above, on a busy 2-core machine)."""
    out, cache = tmp_path / "servable", tmp_path / "cache"
    storage.publish_dir(dllm_dir, str(out))
    whole = (out / storage.MANIFEST).read_bytes()
    files = sorted(json.loads(whole)["files"])
    (out / storage.WRITING_MARKER).write_text(json.dumps({"export_id": "next", "files": files}))

    def finish() -> None:
        (out / storage.MANIFEST).write_bytes(whole)
        (out / storage.WRITING_MARKER).unlink()

    monkeypatch.setattr(storage, "_WAIT_POLL_S", 0.05)
    for part in (b"", whole[: len(whole) // 2]):  # created; half written
        (out / storage.MANIFEST).write_bytes(part)
        with pytest.raises(TimeoutError, match="being written"):
            storage.local_checkpoint(out, cache, wait_s=0.2)
    threading.Timer(0.3, finish).start()
    assert _exported(storage.local_checkpoint(out, cache, wait_s=30)) == _tree(Path(dllm_dir))


def test_old_versions_of_a_rolling_export_leave_the_node_cache(tmp_path):
    """A replica following an export that a fine-tune republishes keeps one copy per version: the
    versions nothing has used for STALE_VERSION_S go when a newer one is fetched or reused, but the
    most recently used of the older ones (a reader may have just been handed it), and any used lately, stay."""
    import os

    src, out, cache = tmp_path / "src", tmp_path / "servable", tmp_path / "cache"
    src.mkdir()
    versions = []

    def publish_and_read(n: int) -> Path:
        (src / "config.json").write_text(str(n))
        storage.publish_dir(src, str(out))
        versions.append(storage.local_checkpoint(out, cache))
        return versions[-1]

    def last_used(version: Path, seconds_ago: float) -> None:
        os.utime(version, (time.time() - seconds_ago,) * 2)

    for n in range(4):
        last_used(publish_and_read(n), storage.STALE_VERSION_S + 60 - n)  # each used long ago, in order
    assert [v.is_dir() for v in versions] == [False, False, True, True]
    assert (versions[3] / "config.json").read_text() == "3"
    last_used(versions[2], 10)  # readers were handed these lately: they may still be loading them
    last_used(versions[3], 5)
    publish_and_read(4)
    assert [v.is_dir() for v in versions] == [False, False, True, True, True]
    last_used(versions[2], 2 * storage.STALE_VERSION_S)
    assert storage.local_checkpoint(out, cache) == versions[4]  # a cache hit retires the stale one too
    assert [v.is_dir() for v in versions] == [False, False, False, True, True]


def test_cache_slots_of_different_uris_never_nest_nor_meet():
    """A slot's sub-directories are taken for its URI's versions (and retired): the slot of `m/sub`
    inside the slot of `m`, or `my model` and `my_model` in one, would lose one model's copy to the
    other's clean-up."""
    slot = lambda uri: "/".join(storage._cache_parts(uri))  # noqa: E731
    for a, b in (("s3://b/m", "s3://b/m/sub"), ("/data/m", "/data/m/sub"), ("s3://b/my model", "s3://b/my_model")):
        assert not slot(b).startswith(slot(a) + "/") and slot(a) != slot(b), (a, b)


def test_a_versions_copies_are_retired_together_and_a_failed_clean_up_fails_no_read(tmp_path, monkeypatch):
    """A version's copy without weights (what fdllm-serve's and the fine-tune's checks fetch) counts with
    its weights copy: a recent check of v1 keeps v1's weights, the rollback copy, while v2 goes. And
    a clean-up that cannot list or delete (permissions, a full disk) leaves the read it follows alone."""
    import os

    src, out, cache = tmp_path / "src", tmp_path / "servable", tmp_path / "cache"
    src.mkdir()

    def publish(n: int) -> None:
        (src / "config.json").write_text(str(n))
        storage.publish_dir(src, str(out))

    def used(version: Path, seconds_ago: float) -> Path:
        os.utime(version, (time.time() - seconds_ago,) * 2)
        return version

    stale = storage.STALE_VERSION_S + 60
    publish(1)
    v1 = used(storage.local_checkpoint(out, cache), stale)
    v1_checked = storage.local_checkpoint(out, cache, weights=False)
    publish(2)
    v2 = used(storage.local_checkpoint(out, cache), stale + 30)
    publish(3)
    monkeypatch.setattr(Path, "iterdir", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied", str(self))))
    v3 = storage.local_checkpoint(out, cache)
    assert (v3 / "config.json").read_text() == "3" and v2.is_dir()  # read, nothing retired
    monkeypatch.undo()
    assert storage.local_checkpoint(out, cache) == v3
    assert [v1.is_dir(), v1_checked.is_dir(), v2.is_dir()] == [True, True, False]


def test_download_once_and_reuse(remote_dllm, dllm_dir, tmp_path):
    local = storage.local_checkpoint(remote_dllm, tmp_path)
    assert _tree(local) == _tree(Path(dllm_dir))
    assert local.is_relative_to(tmp_path)
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    assert storage.local_checkpoint(remote_dllm, tmp_path) == local
    assert (local / "model.safetensors").stat().st_mtime_ns == stamp  # a cache hit copies nothing
    meta = storage.local_checkpoint(remote_dllm, tmp_path, weights=False)
    assert "config.json" in _tree(meta) and not list(meta.glob("*.safetensors"))


def test_engine_and_model_take_uris(remote_dllm, dllm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path))
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(fdllm.load_model(remote_dllm)(ids), fdllm.load_model(dllm_dir)(ids))
    params = fdllm.SamplingParams(max_new_tokens=8, temperature=0.0)
    remote = fdllm.Engine.from_pretrained(remote_dllm).generate(["hello"], params)[0]
    local = fdllm.Engine.from_pretrained(dllm_dir).generate(["hello"], params)[0]
    assert remote.token_ids == local.token_ids and remote.text == local.text
    assert (tmp_path / "s3").is_dir()  # read through the cache named by $FDLLM_CACHE_DIR


def test_concurrent_processes_download_once(remote_dllm, tmp_path):
    """Three processes of one node ask at once: one downloads, all get the same complete copy."""
    # The module is loaded from its file (it imports nothing of fdllm): no torch import per process.
    script = (
        "import importlib.util, logging, sys\n"
        f"spec = importlib.util.spec_from_file_location('storage', {str(REPO / 'fdllm' / 'storage.py')!r})\n"
        "storage = sys.modules['storage'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(storage)\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        f"print(storage.local_checkpoint({remote_dllm!r}, sys.argv[1]))\n"
    )
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert sum(err.count("downloaded s3://") for _, err in outs) == 1
    assert json.loads((Path(paths.pop()) / "config.json").read_text())["model_type"] == "qwen2"


def test_failed_download_leaves_nothing(remote_dllm, dllm_dir, tmp_path, monkeypatch):
    real_copy = storage.shutil.copyfileobj
    calls = []

    def failing_copy(src, dst, length=0):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("network dropped mid-copy")
        return real_copy(src, dst, length)

    monkeypatch.setattr(storage.shutil, "copyfileobj", failing_copy)
    with pytest.raises(ConnectionError):
        storage.local_checkpoint(remote_dllm, tmp_path)
    slot = tmp_path.joinpath(*storage._cache_parts(remote_dllm))
    assert [p.name for p in slot.iterdir() if not p.name.endswith(".lock")] == []  # no partial copy kept
    monkeypatch.setattr(storage.shutil, "copyfileobj", real_copy)
    assert _tree(storage.local_checkpoint(remote_dllm, tmp_path)) == _tree(Path(dllm_dir))


def test_stale_partial_copy_of_a_dead_process_is_ignored(remote_dllm, dllm_dir, tmp_path):
    version = storage.local_checkpoint(remote_dllm, tmp_path / "probe").name
    slot = (tmp_path / "cache").joinpath(*storage._cache_parts(remote_dllm))
    stale = slot / f"{version}.tmp-deadbeef"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{half")
    local = storage.local_checkpoint(remote_dllm, tmp_path / "cache")
    assert _tree(local) == _tree(Path(dllm_dir)) and not stale.exists()


def test_publish_replaces_an_export_as_a_whole(bucket, dllm_dir, tmp_path):
    dest = f"{bucket}/exports/a"
    first = tmp_path / "first"
    first.mkdir()
    (first / "config.json").write_text('{"v": 1}')
    (first / "old-only.txt").write_text("gone after the next export")
    (first / "train_state.pt").write_text("optimizer")
    storage.publish_dir(first, dest, skip=("train_state.pt",))
    cache = tmp_path / "cache"
    one = storage.local_checkpoint(dest, cache)
    assert _tree(one) == {"config.json": b'{"v": 1}', "old-only.txt": b"gone after the next export"}

    second = tmp_path / "second"
    (second / "sub").mkdir(parents=True)
    (second / "config.json").write_text('{"v": 2}')
    (second / "sub" / "w.bin").write_bytes(b"\0" * 10)
    storage.publish_dir(second, dest)
    two = storage.local_checkpoint(dest, cache)
    assert two != one and _tree(two) == {"config.json": b'{"v": 2}', "sub/w.bin": b"\0" * 10}
    fs, inner = storage.filesystem(dest)
    manifest = json.loads(fs.open_input_stream(f"{inner}/{storage.MANIFEST}").read())
    assert manifest["files"] == {"config.json": 8, "sub/w.bin": 10}


def test_a_directory_path_at_or_under_a_file_is_refused(tmp_path, monkeypatch):
    """What a writer would find out at its first file: checked up front, local paths without pyarrow."""
    (tmp_path / "f").write_text("x")
    storage.check_directory_path(str(tmp_path))
    storage.check_directory_path(str(tmp_path / "new" / "dir"))  # absent: it can be made
    with pytest.raises(ValueError, match="is a file, not a directory"):
        storage.check_directory_path(f"file://{tmp_path}/f")  # a URI: the path itself
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # local paths need no pyarrow (the benchmarks check theirs)
    with pytest.raises(ValueError, match=f"^{tmp_path}/f is a file, not a directory$"):
        storage.check_directory_path(str(tmp_path / "f"))
    for below in ("f/sub", "f/sub/deeper"):
        with pytest.raises(ValueError, match=f"is under {tmp_path}/f, which is a file"):
            storage.check_directory_path(str(tmp_path / below))


def test_a_local_directory_nothing_can_be_written_in_is_refused(tmp_path):
    """/proc takes no new files, even from root (for whom permission bits would not say so): the fine-tune,
    the quickstart and the world's pretraining wrote their first file after all their work."""
    with pytest.raises(ValueError, match="^cannot write to /proc/fdllm/out: nothing can be made in /proc "):
        storage.check_directory_path("/proc/fdllm/out")
    storage.check_directory_path(str(tmp_path / "new"))
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_a_missing_bucket_is_refused_up_front(bucket, tmp_path):
    """A typo in the bucket of --output or --storage-path: the writers would find out at the first
    checkpoint, after `save_every` steps, on every retry."""
    from pipelines.finetune import check_output, resolve_run
    from pipelines.finetune_config import FinetuneConfig

    for check in (storage.check_directory_path, storage.check_publishable):
        with pytest.raises(ValueError, match="cannot write to s3://no-such-bucket/runs/x: .*bucket"):
            check("s3://no-such-bucket/runs/x")
    model = str(REPO / "assets" / "tiny-ar-base")
    run = resolve_run(FinetuneConfig(model=model, data=["d.jsonl"], max_steps=1, storage_path=f"{bucket}/runs",
                                     run_name="r", output="s3://no-such-bucket/servable"))
    with pytest.raises(ValueError, match="^--output: cannot write to s3://no-such-bucket/servable"):
        check_output(run)
    with pytest.raises(ValueError, match="^--storage-path: cannot write to s3://no-such-bucket/runs"):
        check_output(resolve_run(dataclasses.replace(run, storage_path="s3://no-such-bucket/runs", output=None)))

    import pyarrow.fs as pafs

    dest = f"{bucket}/probed/servable"  # the probe leaves nothing a later check or export minds
    storage.check_publishable(dest)
    storage.check_publishable(dest)
    fs, inner = storage.filesystem(dest)
    assert fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)) == []
    (tmp_path / "config.json").write_text("{}")
    storage.publish_dir(tmp_path, dest)
    assert _tree(storage.local_checkpoint(dest, tmp_path / "cache")) == {"config.json": b"{}"}


def test_publish_deletes_only_what_an_earlier_export_wrote(tmp_path, monkeypatch):
    """An export replaces an earlier one's files, never the user's: a directory of other files (a
    storage path with runs in it, a model) is refused before anything is written, a file added beside
    an export stays, and an interrupted export (its marker, no manifest) is finished by the next."""
    runs = tmp_path / "runs"
    (runs / "run1" / "step_00000500").mkdir(parents=True)
    (runs / "run1" / "step_00000500" / "model.safetensors").write_text("weights")
    (runs / "notes.txt").write_text("mine")
    before = _tree(runs)
    with pytest.raises(ValueError, match="not an fdllm export"):
        storage.publish_dir(_src(tmp_path, {"config.json": "1"}), str(runs))
    assert _tree(runs) == before

    out = tmp_path / "out"
    storage.publish_dir(_src(tmp_path, {"config.json": "1", "old.bin": "x"}), str(out))
    (out / "README.md").write_text("the user's")
    storage.publish_dir(_src(tmp_path, {"config.json": "2"}), str(out))
    assert set(_tree(out)) == {"config.json", "README.md", storage.MANIFEST}

    real_copy = storage.shutil.copyfileobj
    monkeypatch.setattr(storage.shutil, "copyfileobj", lambda *a, **k: 1 / 0)  # dies mid-export
    with pytest.raises(ZeroDivisionError):
        storage.publish_dir(_src(tmp_path, {"config.json": "3", "new.bin": "y"}), str(out))
    assert storage.WRITING_MARKER in _tree(out) and storage.MANIFEST not in _tree(out)
    monkeypatch.setattr(storage.shutil, "copyfileobj", real_copy)
    (out / "new.bin").write_text("partly written")
    storage.publish_dir(_src(tmp_path, {"config.json": "4"}), str(out))
    assert _tree(out) == {"config.json": b"4", "README.md": b"the user's", storage.MANIFEST: _tree(out)[storage.MANIFEST]}


def test_reader_waits_for_a_writer_and_retries_a_changed_export(bucket, tmp_path, monkeypatch):
    dest = f"{bucket}/exports/b"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"v": 1}')
    storage.publish_dir(src, dest)
    fs, inner = storage.filesystem(dest)
    with fs.open_output_stream(f"{inner}/{storage.WRITING_MARKER}") as f:  # a writer that is mid-export
        f.write(b"x")
    monkeypatch.setattr(storage, "_WAIT_POLL_S", 0.1)
    with pytest.raises(TimeoutError, match="being written"):
        storage.local_checkpoint(dest, tmp_path / "cache", wait_s=0.5)
    fs.delete_file(f"{inner}/{storage.WRITING_MARKER}")

    # A new export lands while a reader downloads the old one: the reader must not cache the old
    # files under the old version, and returns the new export.
    real_copy = storage.shutil.copyfileobj
    republished = threading.Event()

    def copy_then_republish(source, target, length=0):
        real_copy(source, target, length)
        if not republished.is_set() and getattr(target, "name", "").find(".tmp-") >= 0:
            republished.set()
            (src / "config.json").write_text('{"v": 2}')
            monkeypatch.setattr(storage.shutil, "copyfileobj", real_copy)
            storage.publish_dir(src, dest)

    monkeypatch.setattr(storage.shutil, "copyfileobj", copy_then_republish)
    local = storage.local_checkpoint(dest, tmp_path / "cache")
    assert republished.is_set()
    assert _tree(local) == {"config.json": b'{"v": 2}'}
    assert len([p for p in local.parent.iterdir() if p.is_dir()]) == 1  # the stale version was never kept


def test_a_file_a_new_export_deletes_mid_download_is_no_error(bucket, tmp_path, monkeypatch):
    """A new export deletes the files the old one had and the new one has not: a reader that was
    downloading the old one fetches the new one instead of failing on the missing file."""
    dest = f"{bucket}/exports/c"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text("1")
    (src / "b.json").write_text("1")
    storage.publish_dir(src, dest)
    real_copy = storage.shutil.copyfileobj

    def republish_without_b(source, target, length=0):
        real_copy(source, target, length)
        if getattr(target, "name", "").endswith("a.json") and (src / "b.json").exists():
            (src / "b.json").unlink()
            storage.publish_dir(src, dest)  # deletes b.json, which the reader wants next

    monkeypatch.setattr(storage.shutil, "copyfileobj", republish_without_b)
    assert _tree(storage.local_checkpoint(dest, tmp_path / "cache")) == {"a.json": b"1"}


def test_uris_with_spaces_and_non_ascii_characters(bucket, s3_env, tmp_path):
    """pyarrow's URI parser rejects them (the fsspec fallback then asked for s3fs); they name the
    keys as written, the query is kept, and a storage path Ray Train would reject is refused."""
    from pipelines.finetune import check_output, resolve_run
    from pipelines.finetune_config import FinetuneConfig

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    endpoint = s3_env["AWS_ENDPOINT_URL"].removeprefix("http://")
    for dest in (f"{bucket}/my run/modèle", f"{bucket}/q run?endpoint_override={endpoint}&scheme=http"):
        storage.check_publishable(dest)
        storage.publish_dir(src, dest)
        assert _tree(storage.local_checkpoint(dest, tmp_path / "cache")) == {"config.json": b"{}"}
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"))["Contents"]}
    assert {"my run/modèle/config.json", "q run/config.json"} <= keys
    assert storage.encode_uri("s3://b/my run/modèle#1?endpoint_override=h:1") == "s3://b/my%20run/mod%C3%A8le%231?endpoint_override=h:1"
    assert storage.encode_uri("s3://b/a%20b") == "s3://b/a%20b"  # escapes already there are kept

    model = str(REPO / "assets" / "tiny-ar-base")
    run = resolve_run(FinetuneConfig(model=model, data=["d.jsonl"], max_steps=1, storage_path=f"{bucket}/runs", run_name="tiny run 1"))
    check_output(run)  # the run name is joined after Ray Train parses the storage path
    with pytest.raises(ValueError, match=f"--storage-path .*percent-encoded: {bucket}/my%20runs$"):
        check_output(dataclasses.replace(run, storage_path=f"{bucket}/my runs"))


def test_fsspec_only_filesystems(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    mem.pipe("/fdllm-test/ckpt/config.json", b'{"m": 1}')
    local = storage.local_checkpoint("memory://fdllm-test/ckpt", tmp_path)
    assert _tree(local) == {"config.json": b'{"m": 1}'}


def test_files_for_rank_keeps_only_own_deepspeed_shards():
    names = [
        "config.json", "model.safetensors", "tokenizer.json", "train_state.pt",
        "deepspeed/latest/mp_rank_00_model_states.pt",
        "deepspeed/latest/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "deepspeed/latest/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "deepspeed/latest/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "deepspeed/latest/zero_pp_rank_10_mp_rank_00_model_states.pt",
    ]
    one = files_for_rank(names, 1)
    assert one == names[:5] + [names[6], names[7]]
    assert files_for_rank(names, 10) == names[:5] + [names[8]]


def test_cache_slot_stays_under_the_cache_root_and_missing_uris_are_named(bucket, tmp_path):
    *parts, last = storage._cache_parts("s3://b/x/../../etc/./p?q=1")
    assert parts == ["s3", "b", "x", "etc"] and last.startswith("p_q=1@")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/nothing-here"):
        storage.local_checkpoint(f"{bucket}/nothing-here", tmp_path)


def test_an_empty_directory_is_named_as_not_a_checkpoint(tmp_path):
    """Nothing to fetch: the error names the URI, not the cache's temporary directory."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.safetensors").write_bytes(b"w")
    with pytest.raises(FileNotFoundError, match=f"^file://{tmp_path}/empty holds no files: not a checkpoint"):
        storage.local_checkpoint(f"file://{tmp_path}/empty", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="weights-only holds no files besides weights"):
        storage.local_checkpoint(f"file://{tmp_path}/weights-only", tmp_path / "cache", weights=False)
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))


def test_checkpoint_files_are_what_readers_will_get_and_read_no_weights(dllm_dir, tmp_path, monkeypatch):
    """A check before starting readers: a plain directory's top-level files, an export's per its manifest,
    and while an export is rewritten its marker's (readers wait for it: its files are on the way).
    Nothing is copied; plain local directories need no pyarrow."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    names = {p.name for p in Path(dllm_dir).iterdir()}
    (tmp_path / "plain").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "plain" / name).write_text("x")
    (tmp_path / "plain" / "sub").mkdir()
    (tmp_path / "plain" / "sub" / "tokenizer.json").write_text("x")
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "pyarrow", None)  # importing it fails
        assert storage.checkpoint_files(tmp_path / "plain") == {"config.json", "model.safetensors"}
    out = tmp_path / "export"
    storage.publish_dir(dllm_dir, str(out))
    (out / "model.safetensors").unlink()  # the manifest, not the directory, says what a reader gets
    assert storage.checkpoint_files(out) == names
    (out / storage.MANIFEST).unlink()
    (out / storage.WRITING_MARKER).write_text(json.dumps({"export_id": "x", "files": sorted(names | {"sub/a.bin"})}))
    assert storage.checkpoint_files(f"file://{out}") == names
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="nothing: no such checkpoint directory"):
        storage.checkpoint_files(tmp_path / "nothing")
    with pytest.raises(NotADirectoryError, match="config.json is a file"):
        storage.checkpoint_files(tmp_path / "plain" / "config.json")


def test_an_export_that_dies_while_removing_an_older_exports_files_leaves_them_to_the_next(tmp_path, monkeypatch):
    """The marker of an export being written lists the earlier exports' files too: if it dies after
    removing the old manifest but before the old export's stale files, the next export still knows
    they are its own to remove (else they stay beside the new export forever)."""
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    storage.publish_dir(_src(work, {"config.json": "1", "model-2-of-2.bin": "old shard"}), str(out))

    real_filesystem = storage.filesystem

    class DiesOnStale:
        def __init__(self, fs):
            self._fs = fs

        def __getattr__(self, name):
            return getattr(self._fs, name)

        def delete_file(self, path):
            if path.endswith("model-2-of-2.bin"):
                raise OSError("the writer died")
            return self._fs.delete_file(path)

    def dying(dest):
        fs, inner = real_filesystem(dest)
        return DiesOnStale(fs), inner

    monkeypatch.setattr(storage, "filesystem", dying)
    with pytest.raises(OSError, match="died"):
        storage.publish_dir(_src(work, {"config.json": "2"}), str(out))
    monkeypatch.setattr(storage, "filesystem", real_filesystem)
    assert storage.MANIFEST not in {p.name for p in out.iterdir()}  # the old export is gone, its shard is not
    storage.publish_dir(_src(work, {"config.json": "3"}), str(out))
    assert {p.name for p in out.iterdir()} == {"config.json", storage.MANIFEST}


@pytest.mark.parametrize("manifest", [
    {"export_id": "v1", "files": {"config.json": 2, "{victim}/pwned.sh": 4}},  # an absolute name: written there
    {"export_id": "v1", "files": {"config.json": 2, "../../../../pwned.sh": 4}},
    {"export_id": "{victim}", "files": {"config.json": 2}},  # the version's directory, made (or read) anywhere
    {"export_id": "..", "files": {"config.json": 2}},
])
def test_an_export_manifest_names_no_file_outside_the_node_cache(tmp_path, manifest):
    """A bucket someone else writes is not trusted to name this node's files: a manifest's file names and
    export id became paths in the cache unchecked, so a checkpoint could write (or hand the loader) any
    path the replica may write."""
    victim, export = tmp_path / "victim", tmp_path / "bucket" / "ckpt"
    for name in ("config.json", f"{victim}/pwned.sh".lstrip("/"), "pwned.sh"):
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_text("{}" if name == "config.json" else "evil")
    text = json.dumps(manifest).replace("{victim}", str(victim))
    (export / storage.MANIFEST).write_text(text)
    with pytest.raises(ValueError, match="node cache|not an fdllm export manifest"):
        storage.local_checkpoint(f"file://{export}", tmp_path / "cache")
    assert not victim.exists() and not (tmp_path / "pwned.sh").exists()
    assert [p for p in tmp_path.rglob("*") if "cache" not in p.parts and "bucket" not in p.parts] == []


def test_a_local_export_edited_after_it_was_written_is_read_as_it_is_now(dllm_dir, tmp_path):
    """The copy of an export was keyed by its export id alone: an edit of its fdllm_config.json (a threshold,
    the same size) was never seen, the first copy served for ever; an edit of another size failed as a
    copy cut short. Now the edit is read, or refused naming the file and what to do."""
    out, cache = tmp_path / "servable", tmp_path / "cache"
    storage.publish_dir(dllm_dir, str(out))
    original = (storage.local_checkpoint(out, cache) / "fdllm_config.json").read_text()
    edited = original.replace('"threshold": 0.9', '"threshold": 0.1')
    assert edited != original and len(edited) == len(original)  # the premise: an edit of the same size
    (out / "fdllm_config.json").write_text(edited)
    assert (storage.local_checkpoint(out, cache) / "fdllm_config.json").read_text() == edited
    (out / "chat_template.jinja").write_text("{{ messages }} and more")
    with pytest.raises(OSError, match="chat_template.jinja is .* changed after the export was written"):
        storage.local_checkpoint(out, cache)
