"""Local paths and storage URIs given on a command line or in a config.

A relative path on a Ray job's command line must name the same file on every process of the job,
but Ray Train workers run in a directory of their own (`<session>/artifacts/<run>`), not in the
driver's. So entry points make local paths absolute once, on the driver, against its working
directory: the user's shell directory for a plain `python pipelines/finetune.py`, the node's copy of
`--working-dir` under `ray job submit` (Ray unpacks that copy at the same session path on every node
that runs one of the job's workers). URIs (`s3://`, `gs://`, any `scheme://`) pass through untouched.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_uri(path: str) -> bool:
    """True for `scheme://...` addresses (object stores, HDFS, ...), False for local paths."""
    return "://" in path


def resolve_local(path: str, base: str | Path | None = None) -> str:
    """`path` made absolute (with `~` expanded) against `base` (default: the current directory);
    a URI is returned as it is. Pure string work: the path need not exist."""
    if is_uri(path):
        return path
    return os.path.normpath(os.path.join(base or os.getcwd(), os.path.expanduser(path)))
