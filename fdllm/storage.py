"""Checkpoints on object storage: `s3://`, `gs://` or any pyarrow / fsspec filesystem URI.

Two jobs, both needed wherever a checkpoint path is taken (the engine, the fine-tune, Serve):

- `local_checkpoint(uri)`: a local directory holding the checkpoint. A URI is downloaded once per
  node into a cache (`$FDLLM_CACHE_DIR`, default `~/.cache/fdllm`). Processes of one node share the
  copy: a file lock serialises the download, the files land in a temporary directory and are
  renamed into place only when complete, so a partial copy is never used and a failed one leaves
  nothing behind. A local directory is used in place, unless it is an export (below): those are
  read through the cache like a URI.
- `publish_dir(local, uri)`: write a checkpoint to a stable path that readers may be reading at the
  same time. A marker says "being written"; the manifest `fdllm_export.json` (file list, sizes,
  a fresh export id) is written last. Readers wait while the marker is there and check after
  downloading that the manifest did not change under them, so they never cache a mix of two
  exports. The export id keys the cache (with its files' sizes and times: an export edited after it
  was written is read again): a new export at the same URI is a new download. Older
  versions stay in the cache (a process may still be reading one) until the cache is cleared.

Why a local export is copied rather than used in place: the next export rewrites its files in place
(truncating them), so a process loading it then would read half a file, and one that had it
memory-mapped could crash. Swapping a fresh sibling directory in instead is not atomic (a directory
cannot be renamed over a non-empty one) and on NFS another client's open files of a replaced
directory go stale. Waiting on the marker alone would not do either: a load that started before
the marker appeared still reads the rewrite. A private copy, checked against the manifest after the
copy as for a URI, is correct on local disk and NFS alike, at the cost of a copy per export
version in the node's cache; versions unused for STALE_VERSION_S leave it once a newer one is
fetched (`_retire_old_versions`), so a replica following a rolling export keeps about two.

Beside them, the one way the pipelines name and move small files at a local path or URI: `join`
(a path under a directory, a URI's query kept last), `same_or_under` (whether one location holds
another, queries aside), `read_text` and `write_bytes` (whole files).

S3 endpoint and credentials come from the standard AWS environment variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), which pyarrow reads, so any
S3-compatible store works; GCS uses Google's application-default credentials.

pyarrow, filelock and (for schemes pyarrow lacks) fsspec are imported lazily: the engine on local
checkpoints needs none of them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from fdllm.paths import is_uri, resolve_local

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

CACHE_ENV = "FDLLM_CACHE_DIR"
MANIFEST = "fdllm_export.json"  # written last by `publish_dir`: the export is complete
WRITING_MARKER = ".fdllm-writing"  # present while `publish_dir` rewrites a directory
PROBE_PREFIX = ".fdllm-write-probe-"  # `check_directory_path`'s test file, deleted at once
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
CHECK_RETRY_LIMIT_S = 30  # `checkpoint_files` gives up on an unreachable GCS bucket after this long
_WAIT_POLL_S = 2.0
_NO_WEIGHTS = "-noweights"  # the name suffix of a version's copy without weight files
STALE_VERSION_S = 600.0  # a cached version of a URI unused this long is deleted once a newer one is fetched
_URI_SAFE = "/%:@!$&'()*+,;=-._~"  # RFC 3986's reserved and unreserved characters, and `%` of escapes


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike. A URI keeps its `scheme://host` and its query
    stays at the end, where pyarrow reads it: `s3://b/runs?endpoint_override=h` + `r1` is
    `s3://b/runs/r1?endpoint_override=h` (parts appended after the query would name the store wrongly).
    A local path's `?` is a character of a name."""
    path, sep, query = base.partition("?") if is_uri(base) else (base, "", "")
    return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def same_or_under(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or inside it, local paths and URIs alike. Their locations are
    compared, not their strings: a URI's query (`?endpoint_override=h`) says how to reach the store,
    not where in it, so `s3://b/runs/r?endpoint_override=h` is inside `s3://b/runs`; escapes are read
    as pyarrow reads them (`my%20run` is `my run`); a local path is made absolute. Name by name, so
    `s3://b/runs2` is not inside `s3://b/runs`, and another scheme or host (bucket) is elsewhere."""
    inner, outer = _location(path), _location(directory)
    return inner[: len(outer)] == outer


_SCHEME_ALIASES = {"gcs": "gs", "s3a": "s3"}  # one store, two spellings (pyarrow and fsspec take both)


def _store_scheme(scheme: str) -> str:
    """A URI scheme as one spelling per store: schemes are case-insensitive (RFC 3986), and aliased."""
    scheme = scheme.lower()
    return _SCHEME_ALIASES.get(scheme, scheme)


def _location(path: str) -> tuple[str, ...]:
    """(scheme, host, *names) of a local path ("file", "", ...) or URI (`file:///a` and
    `file://localhost/a` are the local `/a`, `..` resolved)."""
    if not is_uri(path):
        scheme, host, inner = "file", "", resolve_local(path)
    else:
        scheme, rest = path.split("://", 1)
        host, _, inner = rest.partition("?")[0].partition("/")
        scheme, inner = _store_scheme(scheme), unquote(inner)
        if scheme == "file" and host in ("", "localhost"):
            host, inner = "", resolve_local("/" + inner)
    return (scheme, host, *(name for name in inner.split("/") if name))


def encode_uri(uri: str) -> str:
    """`uri` with what a URI may not hold (spaces, non-ASCII, `#`, ...) percent-encoded before its
    query, as pyarrow's parser (and so Ray Train's `storage_path`) wants it: pyarrow decodes the
    escapes back, so `s3://b/my run` and `s3://b/my%20run` name the same key. Escapes already there
    and the query (`?endpoint_override=...`) are kept as they are."""
    scheme, rest = uri.split("://", 1)
    path, sep, query = rest.partition("?")
    return f"{scheme}://{quote(path, safe=_URI_SAFE)}{sep}{query}"


def filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """(filesystem, path inside it) for a local path or URI: pyarrow's own filesystems first
    (local, s3, gs, hdfs), else any fsspec filesystem wrapped for pyarrow."""
    try:
        import pyarrow.fs as pafs
    except ImportError as e:
        raise ImportError("object-store paths need pyarrow: pip install 'fdllm[cloud]'") from e
    if not is_uri(uri):
        return pafs.LocalFileSystem(), resolve_local(uri)
    try:
        return pafs.FileSystem.from_uri(encode_uri(uri))
    except ValueError as arrow_error:  # pyarrow.ArrowInvalid: a scheme pyarrow has no filesystem for
        try:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(uri)
        except ImportError as e:  # fsspec, or the package of its filesystem for this scheme, is missing
            raise ValueError(f"pyarrow cannot open {uri} ({arrow_error}), nor can fsspec here ({e})") from e
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a small file (records, a summary), local or a URI: local files through plain
    Python, so callers on local paths need no pyarrow. FileNotFoundError when there is none (pyarrow
    raises it for every filesystem)."""
    path = str(path)
    if not is_uri(path):
        return Path(path).expanduser().read_text(encoding="utf-8")
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a small file whole, local or a URI, making its directory. A reader (or the next run after
    a crash) sees the old file or the new one, never part of one: a local file is written beside its
    name and renamed over it; an object store (S3, GCS) makes an object only when its upload completes,
    and the bytes go in one write. Local paths need no pyarrow."""
    path = str(path)
    if is_uri(path):
        fs, inner = filesystem(path)
        if fs.type_name != "local":
            _write_object(fs, inner, data)
            return
        path = inner  # file://: a local file, written as one
    _write_local(Path(path).expanduser(), data)


def remove_file(path: str | os.PathLike) -> None:
    """Delete one small file, local or a URI; none there is no error (a marker a run may not have left)."""
    path = str(path)
    if not is_uri(path):
        Path(path).expanduser().unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(inner)


def remove_dir(path: str) -> None:
    """Delete a directory and all it holds, local or a URI; none there is no error."""
    if not is_uri(path):
        shutil.rmtree(Path(path).expanduser(), ignore_errors=True)
        return
    from pyarrow import fs as pafs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:  # object stores differ on deleting nothing
        fs.delete_dir(inner)


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".fdllm-{uuid.uuid4().hex[:8]}.tmp")  # not the name plus a suffix: that may pass NAME_MAX
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic on one filesystem
    finally:
        tmp.unlink(missing_ok=True)


def _write_object(fs: "pyarrow.fs.FileSystem", inner: str, data: bytes) -> None:
    parent = inner.rstrip("/").rpartition("/")[0]
    if parent:  # object stores need no directories (pyarrow's S3 leaves a marker); HDFS and the like do
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)


@dataclass(frozen=True)
class _Listing:
    """Files under a directory URI: relative path -> (size, mtime in ns or None)."""

    files: dict[str, tuple[int, int | None]]

    def fingerprint(self) -> str:
        items = sorted((name, size, mtime) for name, (size, mtime) in self.files.items())
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _list(fs: "pyarrow.fs.FileSystem", inner: str, label: str | None = None, recursive: bool = True) -> _Listing:
    import pyarrow.fs as pafs

    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.Directory:
        raise _not_a_directory(label or inner, exists=info.type != pafs.FileType.NotFound)
    root = inner.rstrip("/") + "/"
    files = {}
    for entry in fs.get_file_info(pafs.FileSelector(inner, recursive=recursive)):
        if entry.type == pafs.FileType.File:
            files[entry.path[len(root):]] = (entry.size, entry.mtime_ns)
    return _Listing(files)


def _not_a_directory(label: str, exists: bool) -> OSError:
    if exists:
        return NotADirectoryError(f"{label} is a file; a checkpoint is a directory")
    return FileNotFoundError(f"{label}: no such checkpoint directory")


def _read_manifest(fs: "pyarrow.fs.FileSystem", inner: str) -> dict | None:
    """The export's manifest; None when there is none, or only part of one: a local (or NFS) file is
    written in place, so a reader that lists it as the writer creates it reads it part-written (an
    object store's put is whole). Callers wait and list again."""
    try:
        with fs.open_input_stream(f"{inner.rstrip('/')}/{MANIFEST}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def export_id(path: str) -> str | None:
    """The id `publish_dir` gave the export at `path` (local or URI), new each time one is published; None
    for a directory no export wrote (a checkpoint saved by hand, an HF download)."""
    fs, inner = filesystem(path)
    manifest = _read_manifest(fs, inner)
    return manifest.get("export_id") if isinstance(manifest, dict) else None


def _cache_parts(uri: str) -> list[str]:
    """`s3://bucket/a/b` -> ["s3", "bucket", "a", "b@<hash>"] (a local `/a/b` -> ["file", "a", "b@<hash>"]):
    readable, and never outside the cache root (no `..`, no query strings or odd characters in names).
    The last name carries a hash of the whole URI, so the slots of two URIs never nest (`a/b` and
    `a/b/c`) nor meet (`my model` and `my_model`): each slot's sub-directories are its versions alone."""
    scheme, rest = uri.split("://", 1) if is_uri(uri) else ("file", uri)
    parts = [re.sub(r"[^\w.=-]", "_", p) for p in (scheme, *(p for p in rest.split("/") if p not in ("", ".", "..")))]
    parts[-1] += "@" + hashlib.sha256(uri.encode()).hexdigest()[:12]
    return parts


def _normalise(path: str | os.PathLike) -> str:
    return str(path).rstrip("/") if is_uri(str(path)) else resolve_local(str(path))


def _plain_local(uri: str) -> bool:
    """A local directory that is not an export (nothing rewrites it in place)."""
    return not is_uri(uri) and not any(os.path.isfile(os.path.join(uri, n)) for n in (MANIFEST, WRITING_MARKER))


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/fdllm").expanduser()


def local_checkpoint(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, weights: bool = True,
    wait_s: float = 600.0,
) -> Path:
    """A local directory with the checkpoint at `path` (see the module docstring).

    `weights=False` fetches everything but weight files (config, tokenizer): what a driver needs to
    validate a model it will not run. `wait_s` bounds the wait for an export being rewritten.
    """
    uri = _normalise(path)
    if _plain_local(uri):
        return Path(uri)  # not an export, so nothing rewrites it: used in place; its readers name what is missing
    fs, inner = filesystem(uri)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    slot = root.joinpath(*_cache_parts(uri))  # one directory per URI; one sub-directory per version of it
    deadline = time.monotonic() + wait_s
    while True:
        listing = _list(fs, inner, uri)
        manifest = _read_manifest(fs, inner) if MANIFEST in listing.files else None
        if WRITING_MARKER in listing.files or (MANIFEST in listing.files and manifest is None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{uri} is still being written after {wait_s:.0f} s (if its writer died, "
                                   f"delete {WRITING_MARKER} there or export again)")
            log.info("%s is being written; waiting", uri)
            time.sleep(_WAIT_POLL_S)
            continue
        if manifest is not None:
            _check_manifest(manifest, uri)
        version = manifest["export_id"] if manifest else listing.fingerprint()
        if manifest:
            wanted = {name: size for name, size in manifest["files"].items()}
            _check_not_edited(uri, wanted, listing)
            # its files as they are now (sizes, times) key the copy too: an export edited in place after it was
            # written (a fdllm_config.json threshold, a chat template) is not served from the copy made before
            version += "-" + _Listing({n: listing.files[n] for n in wanted if n in listing.files}).fingerprint()[:8]
        else:
            wanted = {name: size for name, (size, _) in listing.files.items()}
        if unsafe := [name for name in wanted if not _safe_relative(name)]:
            raise ValueError(f"{uri}: file names that would leave the node cache: {', '.join(map(repr, unsafe[:4]))}")
        if not weights:
            wanted = {n: s for n, s in wanted.items() if not any(fnmatch.fnmatch(n, p) for p in WEIGHT_PATTERNS)}
            version += _NO_WEIGHTS
        if not wanted:  # callers read config.json first: say the directory is the problem, not a cache path
            raise FileNotFoundError(f"{uri} holds no files{'' if weights else ' besides weights'}: not a checkpoint "
                                    "(config.json, safetensors, tokenizer)")
        target = slot / version
        if _fetch_once(fs, inner, uri, wanted, target, version=manifest and manifest["export_id"]):
            _retire_old_versions(slot, target)
            return target
        if time.monotonic() > deadline:
            raise TimeoutError(f"{uri} kept changing while being downloaded for {wait_s:.0f} s")


_EXPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what publish_dir writes (uuid4 hex): one plain directory name


def _safe_relative(name: str) -> bool:
    """Whether `name`, a file name an export's manifest or a store's listing gives, stays inside the
    directory it is copied to: relative, with no empty, `.` or `..` component (a bucket is not trusted
    to name files of this node)."""
    return (isinstance(name, str) and bool(name) and not name.startswith(("/", "\\")) and "\0" not in name
            and all(part not in ("", ".", "..") for part in name.replace("\\", "/").split("/")))


def _check_manifest(manifest: object, uri: str) -> None:
    """ValueError unless `manifest` is what `publish_dir` writes: an `export_id` that is one plain name (it
    names the version's directory in the cache) and `files`, relative name -> size in bytes."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    export = manifest.get("export_id") if isinstance(manifest, dict) else None
    if not (isinstance(export, str) and _EXPORT_ID.fullmatch(export) and isinstance(files, dict)
            and all(type(size) is int and size >= 0 for size in files.values())):
        raise ValueError(f"{uri}/{MANIFEST} is not an fdllm export manifest (an export_id of letters, digits, '-' "
                         "and '_', and files: name -> size)")


def _fetch_once(
    fs: "pyarrow.fs.FileSystem", inner: str, uri: str, wanted: dict[str, int], target: Path, version: str | None
) -> bool:
    """Download `wanted` files into `target` under the node's lock; False when the source changed
    meanwhile (nothing is kept then: the caller lists again)."""
    try:
        from filelock import FileLock
    except ImportError as e:
        raise ImportError("object-store paths need filelock: pip install 'fdllm[cloud]'") from e

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            log.debug("cache hit: %s -> %s", uri, target)
            os.utime(target)  # used now: kept by `_retire_old_versions` a while
            return True
        for stale in target.parent.glob(target.name + ".tmp-*"):  # left by a process that died mid-copy
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f"{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            start = time.perf_counter()
            try:
                _copy_files(fs, inner, uri, wanted, tmp)
                changed = not _unchanged(fs, inner, wanted, version)
            except OSError:  # a file deleted or cut short by a new export (then retried), or a real failure
                if _unchanged(fs, inner, wanted, version):
                    raise
                changed = True
            if changed:
                log.warning("%s changed while it was downloaded; fetching it again", uri)
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            os.rename(tmp, target)  # atomic on one filesystem: the copy appears whole or not at all
            log.info("downloaded %s (%d files, %.1f MB, %.1f s) -> %s", uri, len(wanted), sum(wanted.values()) / 1e6,
                     time.perf_counter() - start, target)
            return True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _retire_old_versions(slot: Path, current: Path) -> None:
    """Delete the cached versions of one URI that nothing has used for STALE_VERSION_S, but the most
    recently used one before `current`: a serve replica following a rolling export (a fine-tune
    publishing every few hundred steps) would otherwise keep a copy of the weights per version on the
    node's disk. A version's copies with and without weights go together; each is touched when
    handed out (`_fetch_once`) and deleted under its own lock, so one being fetched, or handed out
    lately to a process still loading it, stays. Never fails the read that called it: a version it
    cannot delete is left for the next."""
    from filelock import FileLock

    def last_used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:  # retired meanwhile by another process
            return 0.0

    try:
        versions: dict[str, list[Path]] = {}
        for path in slot.iterdir():
            if path.is_dir() and ".tmp-" not in path.name:
                versions.setdefault(path.name.removesuffix(_NO_WEIGHTS), []).append(path)
        versions.pop(current.name.removesuffix(_NO_WEIGHTS), None)
        older = sorted(versions.values(), key=lambda copies: max(map(last_used, copies)), reverse=True)
        for old in (path for copies in older[1:] for path in copies):
            with FileLock(str(old) + ".lock"):
                if old.is_dir() and time.time() - last_used(old) > STALE_VERSION_S:
                    log.info("deleting %s from the node cache: a newer version is in use", old)
                    shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        log.warning("could not clean old versions out of the node cache at %s: %s", slot, e)


def _copy_files(fs: "pyarrow.fs.FileSystem", inner: str, uri: str, wanted: dict[str, int], tmp: Path) -> None:
    """Copy the `wanted` files (relative path -> size) of directory `inner` into `tmp`."""
    for name, size in sorted(wanted.items()):
        dest = tmp / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{inner.rstrip('/')}/{name}") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
        if dest.stat().st_size != size:
            raise OSError(f"{uri}/{name}: got {dest.stat().st_size} bytes, expected {size}")


def _check_not_edited(uri: str, wanted: dict[str, int], listing: _Listing) -> None:
    """OSError naming the file when an export's file (no writer at work) is not the size its manifest
    says: changed by hand after the export (a copy could not be checked against the manifest)."""
    for name, size in wanted.items():
        now = listing.files.get(name, (None,))[0]
        if now is not None and now != size:
            raise OSError(f"{uri}/{name} is {now} bytes, but the export's {MANIFEST} says {size}: it was changed after "
                          f"the export was written; to use the directory as it is now, delete {MANIFEST} there "
                          "(or export again)")


def _unchanged(fs: "pyarrow.fs.FileSystem", inner: str, wanted: dict[str, int], version: str | None) -> bool:
    """True when directory `inner` still holds the export `version` (no writer at work), or, for a
    directory without manifest (`version` None), the `wanted` files with the same sizes."""
    after = _list(fs, inner)
    manifest = _read_manifest(fs, inner) if MANIFEST in after.files else None
    if WRITING_MARKER in after.files or (manifest or {}).get("export_id") != version:
        return False
    return version is not None or all(after.files.get(n, (None,))[0] == s for n, s in wanted.items())


def checkpoint_files(path: str | os.PathLike) -> set[str]:
    """The names of the files at the top of the checkpoint directory at `path` (local or URI) as its
    readers will get them: an export's (its manifest's; while one is being written, its marker's, as
    readers wait for it), else the directory's. Lists it and reads at most that one small file: the
    check of a process about to start others that download it. FileNotFoundError / NotADirectoryError
    when there is no such directory; OSError naming `path` when its store cannot be opened or reached
    (an unknown scheme, no credentials, no network: GCS gives up after CHECK_RETRY_LIMIT_S, not its
    client's many minutes).
    Plain local directories need no pyarrow."""
    uri = _normalise(path)
    if _plain_local(uri):
        if not os.path.isdir(uri):
            raise _not_a_directory(uri, exists=os.path.exists(uri))
        return {entry.name for entry in os.scandir(uri) if entry.is_file()}
    try:
        fs, inner = filesystem(_bounded_retries(uri))
        inner = inner.rstrip("/")
        listed = _list(fs, inner, uri, recursive=False).files
        if MANIFEST in listed or WRITING_MARKER in listed:
            listed = _exported_files(fs, inner, listed, uri)
    except (FileNotFoundError, NotADirectoryError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - the store's own words, on one line (no credentials, network, scheme, ...):
        # pyarrow raises OSError, ValueError, or for some GCS failures an ArrowException that is neither
        raise OSError(f"cannot list {uri} ({' '.join(str(e).split())}); check the URI and this machine's credentials "
                      "for it (the AWS_* variables for s3://, application-default credentials for gs://)") from None
    return {name for name in listed if "/" not in name}


def _bounded_retries(uri: str) -> str:
    """`uri` with GCS's retries bounded to CHECK_RETRY_LIMIT_S (pyarrow's `retry_limit_seconds`) unless it
    sets them: without credentials its client retries for minutes before it answers (measured here:
    no answer in 100 s), which a check before starting a server must not do silently."""
    if _store_scheme(uri.split("://", 1)[0]) != "gs" or "retry_limit_seconds=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}retry_limit_seconds={CHECK_RETRY_LIMIT_S}"


def check_directory_path(path: str) -> None:
    """ValueError when no directory can be made at `path` (local or URI): it is a file, or (local
    paths) a file stands where one of its parents should be, or (S3, GCS) a file cannot be written
    and deleted under it: no such bucket, or no permission. Writers only find out at their first
    file, which for a fine-tune is after training. Local paths need no pyarrow."""
    if is_uri(path):  # object stores: only the path itself (a key and a "directory" of one name may coexist)
        import pyarrow.fs as pafs

        fs, inner = filesystem(path)
        if fs.get_file_info(inner).type == pafs.FileType.File:
            raise ValueError(f"{path} is a file, not a directory")
        if fs.type_name in ("s3", "gcs"):
            _probe_write(fs, inner.rstrip("/"), path)
        return
    local = Path(resolve_local(path))
    existing = next(p for p in (local, *local.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        raise ValueError(f"{path} is a file, not a directory" if existing == local else
                         f"{path} is under {existing}, which is a file, not a directory")
    try:  # a file no one sees (O_TMPFILE on Linux), in the directory the writer's first mkdir or file goes to
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {path}: nothing can be made in {existing} ({e.strerror})") from None


def _probe_write(fs: "pyarrow.fs.FileSystem", inner: str, path: str) -> None:
    """Write and delete an empty file under `inner`, what every writer there does (`publish_dir`
    deletes its marker and stale files). An object store makes no directory for it; pyarrow's S3
    leaves an empty directory marker at `inner`, as the first real file there would."""
    probe = f"{inner}/{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)
    except OSError as e:
        raise ValueError(f"cannot write to {path}: {e}") from None


def check_publishable(dest: str) -> None:
    """ValueError unless `dest` is absent (and can be made: `check_directory_path`), empty or an
    export `publish_dir` wrote (or was writing): a later export replaces its files, and nothing
    else may be deleted."""
    check_directory_path(dest)
    fs, inner = filesystem(dest)
    try:
        _exported_files(fs, inner.rstrip("/"), _list(fs, inner.rstrip("/")).files, dest)
    except FileNotFoundError:
        pass


def _exported_files(fs: "pyarrow.fs.FileSystem", inner: str, listed: dict, dest: str) -> set[str]:
    """The files of `listed` (a directory's) that earlier exports wrote: the manifest's, or while an
    export is written (or after one died) its marker's; ValueError for a directory of other files."""
    if WRITING_MARKER in listed:
        try:
            with fs.open_input_stream(f"{inner}/{WRITING_MARKER}") as f:
                return set(json.loads(f.read())["files"])
        except (ValueError, KeyError, TypeError):  # an older version's marker: its export id alone
            return set(listed)
    if MANIFEST in listed:
        return set((_read_manifest(fs, inner) or {}).get("files", ()))
    if listed:
        raise ValueError(f"{dest} holds files that are not an fdllm export (no {MANIFEST}); an export replaces "
                         "what is there, so give an empty or new directory")
    return set()


def publish_dir(local_dir: str | os.PathLike, dest: str, skip: tuple[str, ...] = ()) -> None:
    """Copy `local_dir` to `dest` (local path or URI) so that readers of `dest` see either the old
    or the new content, never a mix (see the module docstring). Files matching `skip` (glob
    patterns on relative paths) are left out, and files of an older export not in the new one are
    deleted. `dest` must be absent, empty or an earlier export (`check_publishable`): files this
    module did not write are never deleted."""
    local_dir = Path(local_dir)
    files = {
        str(p.relative_to(local_dir)): p.stat().st_size
        for p in sorted(local_dir.rglob("*"))
        if p.is_file() and not any(fnmatch.fnmatch(str(p.relative_to(local_dir)), pat) for pat in skip)
    }
    if not files:
        raise ValueError(f"nothing to publish in {local_dir}")
    fs, inner = filesystem(dest)
    inner = inner.rstrip("/")
    fs.create_dir(inner, recursive=True)
    old = _list(fs, inner).files
    ours = _exported_files(fs, inner, old, dest)
    export_id = uuid.uuid4().hex
    # The marker lists every file this export or an earlier one wrote: if this one dies midway, the
    # next knows what to replace. On failure it stays: readers then wait and time out instead of
    # loading a partial export.
    with fs.open_output_stream(f"{inner}/{WRITING_MARKER}") as f:
        f.write(json.dumps({"export_id": export_id, "files": sorted(ours | set(files))}).encode())
    stale = sorted(n for n in old if n in ours and n not in files and n not in (MANIFEST, WRITING_MARKER))
    for name in ([MANIFEST] if MANIFEST in old else []) + stale:  # the manifest first: the old export is gone
        fs.delete_file(f"{inner}/{name}")
    for name in files:
        parent = f"{inner}/{name}".rsplit("/", 1)[0]
        if parent != inner:
            fs.create_dir(parent, recursive=True)
        with open(local_dir / name, "rb") as src, fs.open_output_stream(f"{inner}/{name}") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    manifest = {"export_id": export_id, "files": files, "created": time.time()}
    with fs.open_output_stream(f"{inner}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=1).encode())
    fs.delete_file(f"{inner}/{WRITING_MARKER}")
    log.info("published %d files (%.1f MB) to %s", len(files), sum(files.values()) / 1e6, dest)
