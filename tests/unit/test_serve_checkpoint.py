"""fdllm-serve refuses, before Ray starts, a model its replicas could not serve (exit 2, one line naming
what is missing and how to fix it), local or on object storage, and a replica refuses it with the same
words (fdllm.loader.check_checkpoint, fdllm.tokenizer.check_text_tokenizer): without the check, Serve
restarts a failing replica again and again, or a replica serves a tokenizer that reads no text."""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
import ray  # noqa: E402

from fdllm import storage  # noqa: E402
from serve import app  # noqa: E402
from tests.s3_server import make_bucket, upload_dir  # noqa: E402

TOKENIZER_FIX = "tokenizer.save_pretrained(DIR)"


class _RayStarted(Exception):
    """fdllm-serve got past its checks."""


def _without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*names))
    return dst


def _serve_error(model: str, monkeypatch, capsys) -> str:
    """fdllm-serve's one-line error for `model`, checked to come before Ray starts, with exit status 2."""
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the model was checked"))
    with pytest.raises(SystemExit) as e:
        app.main(["--model", model])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip().removeprefix("fdllm-serve: error: model: ")


def _serves(model: str, monkeypatch) -> None:
    """fdllm-serve accepts `model`: it gets as far as starting Ray."""
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(_RayStarted()))
    with pytest.raises(_RayStarted):
        app.main(["--model", model])


@pytest.mark.parametrize("removed,problem", [
    # transformers 5 loads tokenizer_config.json alone as a tokenizer without a vocabulary: it encodes text to []
    (("tokenizer.json",), "has a tokenizer without a vocabulary, which encodes text to no tokens"),
    (("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"), "has no tokenizer (tokenizer.json)"),
    (("model.safetensors",), "no model.safetensors or model.safetensors.index.json in"),
    (("config.json",), "no config.json in"),
])
def test_fdllm_serve_refuses_a_local_checkpoint_its_replicas_could_not_serve(removed, problem, dllm_dir, tmp_path,
                                                                             monkeypatch, capsys):
    model = _without(dllm_dir, tmp_path / "ckpt", *removed)
    err = _serve_error(str(model), monkeypatch, capsys)
    assert str(model) in err and problem in err, err
    assert TOKENIZER_FIX in err if "tokenizer" in problem else "save_pretrained" in err


def test_a_local_export_is_checked_and_served(dllm_dir, tmp_path, monkeypatch):
    """A directory the fine-tune published (fdllm_export.json) is read through a weightless cache copy
    by the check: its weight headers are still read from the directory itself."""
    storage.publish_dir(dllm_dir, str(tmp_path / "export"))
    _serves(str(tmp_path / "export"), monkeypatch)


def _cut_short(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])  # a copy that failed midway


def _cut_short_by_one(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-1])  # the header is whole; the last tensor is not


@pytest.mark.parametrize("name,spoil,problem", [
    ("config.json", lambda f: f.write_text("{bad"), "config.json: not JSON (Expecting property name"),
    ("config.json", lambda f: f.write_text("[]"), "config.json: holds list, not a JSON object"),
    ("fdllm_config.json", lambda f: f.write_text('{"block_size": 0}'),
     "fdllm_config.json: block_size (0) and sub_block_size (8) must be >= 1"),
    ("fdllm_config.json", lambda f: f.write_text('{"block_size": "32"}'), "fdllm_config.json: "),
    ("fdllm_config.json", lambda f: f.write_bytes(b'{"threshold": "\xff"}'), "fdllm_config.json: not JSON ("),
    ("model.safetensors", _cut_short, "model.safetensors: not a readable safetensors file ("),
    ("model.safetensors", _cut_short_by_one, "model.safetensors: not a readable safetensors file ("),
    ("model.safetensors", lambda f: f.write_text("not weights"), "model.safetensors: not a readable safetensors file ("),
])
def test_a_checkpoint_file_that_is_there_but_broken_is_named_before_ray_and_at_load(name, spoil, problem, dllm_dir,
                                                                                   tmp_path, monkeypatch, capsys):
    """A file cut short or edited wrong: fdllm-serve names it before Ray starts (the replicas failed
    after, with a RuntimeError traceback), and loading it (a replica, evaluate) names it the same way."""
    import fdllm

    model = _without(dllm_dir, tmp_path / "ckpt")
    spoil(model / name)
    err = _serve_error(str(model), monkeypatch, capsys)
    assert err.startswith(str(model / name)) and problem in err, err
    with pytest.raises(ValueError) as loading:
        fdllm.Engine.from_pretrained(str(model))
    assert str(loading.value) == err


def _spoilt_weights(data: bytes) -> dict[str, bytes]:
    """A safetensors file's bytes spoilt the ways copies and edits spoil files, and left whole."""
    length = int.from_bytes(data[:8], "little")
    header, body = data[8:8 + length], data[8 + length:]
    return {
        "whole": data, "empty": b"", "4 bytes": data[:4], "the length alone": data[:8],
        "cut in the header": data[:8 + length // 2], "the header alone": data[:8 + length],
        "one tensor byte": data[:9 + length], "one byte short": data[:-1], "one byte more": data + b"\0",
        "a page more": data + bytes(4096), "length + 1": (length + 1).to_bytes(8, "little") + data[8:],
        "length - 1": (length - 1).to_bytes(8, "little") + data[8:], "length huge": (1 << 62).to_bytes(8, "little") + data[8:],
        "header a list": len(b"[]").to_bytes(8, "little") + b"[]" + body,
        "header not JSON": data[:8] + b"{" * length + body,
        "no data_offsets": data[:8] + header.replace(b"data_offsets", b"data_offzets") + body,
        "text": b"not weights at all, just some words",
    }


def test_the_header_check_judges_a_file_as_safetensors_does(dllm_dir, tmp_path):
    """`safetensors_problem` (two small reads: what the check of a URI checkpoint can afford) against
    the safetensors library itself, on a real file spoilt each way: it refuses exactly what safe_open refuses."""
    from safetensors import safe_open

    from fdllm.loader import safetensors_problem

    for what, data in _spoilt_weights((dllm_dir / "model.safetensors").read_bytes()).items():
        (tmp_path / "w.safetensors").write_bytes(data)
        try:
            with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
                [f.get_tensor(name) for name in f.keys()]
            library = None
        except Exception as e:  # noqa: BLE001 - any refusal
            library = e
        ours = safetensors_problem(len(data), lambda n, offset: data[offset:offset + n])
        assert (ours is None) == (library is None), (what, ours, library)
    assert "cut short" in safetensors_problem(len(data := (dllm_dir / "model.safetensors").read_bytes()[:-1]),
                                              lambda n, offset: data[offset:offset + n])


def _sharded(dllm_dir: Path, dst: Path) -> Path:
    """`dllm_dir` with its weights in several shards and an index, as large checkpoints come."""
    import fdllm
    from fdllm.loader import INDEX_FILE, save_checkpoint

    model = _without(dllm_dir, dst, "model.safetensors")
    save_checkpoint(fdllm.load_model(dllm_dir), model, max_shard_size=20_000)
    assert (model / INDEX_FILE).is_file() and len(list(model.glob("model-*.safetensors"))) > 2
    return model


def test_a_sharded_checkpoint_missing_a_shard_is_named(dllm_dir, tmp_path, monkeypatch, capsys):
    import fdllm

    model = _sharded(dllm_dir, tmp_path / "sharded")
    _serves(str(model), monkeypatch)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    err = _serve_error(str(model), monkeypatch, capsys)
    assert err == f"{model}: model.safetensors.index.json names weight files that are not there: {shard.name}", err
    with pytest.raises(FileNotFoundError) as loading:
        fdllm.Engine.from_pretrained(str(model))
    assert str(loading.value) == err


def test_a_tokenizer_that_does_not_load_is_one_line_not_a_traceback(dllm_dir, tmp_path, monkeypatch, capsys):
    model = _without(dllm_dir, tmp_path / "ckpt", "tokenizer.json")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')  # transformers: KeyError
    err = _serve_error(str(model), monkeypatch, capsys)
    assert err.startswith(f"{model}'s tokenizer does not load (") and TOKENIZER_FIX in err, err


def test_a_replica_refuses_a_tokenizer_without_vocabulary_as_fdllm_serve_does(dllm_dir, tmp_path, monkeypatch, capsys):
    """One check, one message: the replica (which loads its engine's tokenizer) and fdllm-serve (before
    Ray) agree. Before, the replica checked only `is_fast`, which transformers 5's empty tokenizer is."""
    model = _without(dllm_dir, tmp_path / "ckpt", "tokenizer.json")
    upfront = _serve_error(str(model), monkeypatch, capsys)
    replica = app.FdllmServer.func_or_class.__mro__[1]  # the class Serve's ingress wraps
    assert replica.__name__ == "FdllmServer"
    with pytest.raises(ValueError) as err:
        replica(asdict(app.ServerConfig(model=str(model))))
    assert str(err.value) == upfront


def test_a_tokenizer_from_vocab_and_merges_files_is_served(dllm_dir, tmp_path, monkeypatch):
    """The check loads the tokenizer as the replica does rather than look for tokenizer.json: a byte-level
    BPE saved as vocab.json + merges.txt (older exports) reads text, so it is not refused."""
    from fdllm.tokenizer import load_tokenizer

    model = _without(dllm_dir, tmp_path / "ckpt", "tokenizer.json")
    bpe = json.loads(load_tokenizer(dllm_dir).backend_tokenizer.to_str())["model"]
    (model / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (model / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(pair) + "\n" for pair in bpe["merges"]))
    assert load_tokenizer(model).encode("hello world") == load_tokenizer(dllm_dir).encode("hello world")
    _serves(str(model), monkeypatch)


@pytest.fixture(scope="module")
def bucket(s3_env) -> str:
    return make_bucket("fdllm-serve-check")


def test_fdllm_serve_checks_a_uri_model_without_downloading_its_weights(bucket, dllm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    whole = upload_dir(dllm_dir, f"{bucket}/whole")
    _serves(whole, monkeypatch)
    storage.publish_dir(dllm_dir, f"{bucket}/export")  # an export: its manifest lists the files
    _serves(f"{bucket}/export", monkeypatch)
    fetched = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert "tokenizer.json" in fetched and not any(name.endswith(".safetensors") for name in fetched), fetched

    refused = {
        upload_dir(_without(dllm_dir, tmp_path / "a", "tokenizer.json"), f"{bucket}/no-tokenizer-json"):
            "has a tokenizer without a vocabulary",
        upload_dir(_without(dllm_dir, tmp_path / "b", "model.safetensors"), f"{bucket}/no-weights"):
            "no model.safetensors or model.safetensors.index.json in",
        upload_dir(_without(dllm_dir, tmp_path / "c", "config.json"), f"{bucket}/no-config"): "no config.json in",
        f"{bucket}/nothing-here": "no such checkpoint directory",
        "s3://no-such-bucket-fdllm/model": "no such checkpoint directory",
    }
    for uri, problem in refused.items():
        err = _serve_error(uri, monkeypatch, capsys)
        assert uri in err and problem in err, err


def test_a_uri_weight_file_cut_short_is_found_by_its_header_without_a_download(bucket, dllm_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """An upload that stopped midway left model.safetensors short: fdllm-serve says so before Ray starts
    (the replicas found it only after downloading it), reading each file's header with ranged reads."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    model = _without(dllm_dir, tmp_path / "short")
    _cut_short_by_one(model / "model.safetensors")
    uri = upload_dir(model, f"{bucket}/cut-short")
    err = _serve_error(uri, monkeypatch, capsys)
    assert err.startswith(f"{uri}/model.safetensors: not a readable safetensors file (its header describes ") and \
        err.endswith(": cut short)"), err
    sharded = _sharded(dllm_dir, tmp_path / "sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes() + b"\0")
    uri = upload_dir(sharded, f"{bucket}/sharded")
    err = _serve_error(uri, monkeypatch, capsys)
    assert err.startswith(f"{uri}/{shard.name}: not a readable safetensors file (its header describes "), err
    fetched = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert fetched and not any(name.endswith(".safetensors") for name in fetched), fetched


def test_an_unreachable_store_is_one_line_not_a_traceback_or_a_long_wait(monkeypatch, capsys):
    """No server at the endpoint (S3), no credentials (GCS, whose client would otherwise retry for minutes)."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(storage, "CHECK_RETRY_LIMIT_S", 1)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
    for uri in (f"s3://bucket/model?endpoint_override=127.0.0.1:{port}&scheme=http", "gs://no-such-bucket-fdllm/model",
                "nosuchscheme://bucket/model"):
        err = _serve_error(uri, monkeypatch, capsys)
        assert err.startswith(f"cannot list {uri} (") and "check the URI and this machine's credentials" in err, err


def test_any_filesystem_storage_takes_is_checked(dllm_dir, monkeypatch, capsys):
    """An fsspec-only scheme (memory://), as storage.filesystem takes it."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for path in Path(dllm_dir).iterdir():
        if path.name != "tokenizer.json":
            memory.pipe(f"/fdllm-serve-check/ckpt/{path.name}", path.read_bytes())
    err = _serve_error("memory://fdllm-serve-check/ckpt", monkeypatch, capsys)
    assert "memory://fdllm-serve-check/ckpt has a tokenizer without a vocabulary" in err
    memory.pipe("/fdllm-serve-check/ckpt/tokenizer.json", (Path(dllm_dir) / "tokenizer.json").read_bytes())
    _serves("memory://fdllm-serve-check/ckpt", monkeypatch)
