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


def shadowing_package(module: str, directory: str | Path | None = None) -> Path | None:
    """The package in `directory` (default: the working directory) that would hide `module`'s own in
    Ray's workers, or None. Ray puts the driver's working directory on its workers' import path ahead
    of site-packages, so a project's own `serve/` or `pipelines/` (common names) is imported there in
    place of fdllm's, and every worker fails ("No module named 'serve.app'"). A package of the same
    top-level name that holds `module` (a checkout of fdllm) hides nothing that matters."""
    top, *rest = module.split(".")
    package = Path(directory or os.getcwd()) / top
    if not (package / "__init__.py").is_file():
        return None
    target = package.joinpath(*rest)
    return None if target.with_suffix(".py").is_file() or (target / "__init__.py").is_file() else package


def check_no_shadowing(*modules: str) -> None:
    """ValueError (one line) when the working directory holds a package that would hide one of `modules`
    in Ray's workers (`shadowing_package`)."""
    for module in modules:
        if (package := shadowing_package(module)) is not None:
            raise ValueError(f"{package} is a package named like fdllm's {module.split('.')[0]!r}: Ray's workers, which "
                             f"import from the working directory first, would import it instead of {module}; run "
                             "from another directory")
