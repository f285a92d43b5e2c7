"""A local S3-compatible server for tests: moto's server mode in a subprocess on a loopback port.

Clients reach it through the standard AWS variables (`AWS_ENDPOINT_URL`, credentials, region), as a
user reaches any S3-compatible store; processes started later (Ray workers) inherit them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_s3(timeout_s: float = 60.0) -> Iterator[dict[str, str]]:
    """Start the server; yields the AWS environment that points clients at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_bucket(name: str) -> str:
    """Create a bucket on the server the environment points at; returns `s3://name`."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_dir(local: str | os.PathLike, uri: str) -> str:
    """Copy a local directory to a URI with pyarrow (as a user's `aws s3 cp --recursive` would)."""
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), inner, destination_filesystem=fs)
    return uri
