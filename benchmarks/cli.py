"""What the benchmarks share on the command line: the engine subcommands' device options, and the
argparse types that refuse a bad count, list or output path at parsing (exit 2, the option named),
not after the run has spent its minutes."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, value: Any, indent: int | None = None) -> None:
    """`value` as JSON at `path`, written whole (`fdllm.storage.write_bytes`): a process killed while
    writing (a benchmark stopped at its time limit) leaves the previous file, never half of one."""
    from fdllm.storage import write_bytes

    write_bytes(path, json.dumps(value, indent=indent).encode())


def engine_subcommand(subparsers: Any, name: str, help: str, doc: str | None) -> argparse.ArgumentParser:
    """A `python -m benchmarks.benchmark NAME` subcommand whose --help shows the module's docstring
    `doc`, with the --device and --dtype an engine benchmark runs on."""
    import torch  # here: the HTTP and training benchmarks share this module and import torch late or never

    p = subparsers.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    return p


def positive_int(text: str) -> int:
    """A count or size (repeats, requests, steps, tokens, dims): an int >= 1."""
    value = int(text)  # ValueError: argparse's "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A count that may be zero (untimed warmup steps): an int >= 0."""
    value = int(text)  # ValueError: argparse's "invalid non_negative_int value"
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite amount > 0 (CPUs, gigabytes, GB/s): 0 CPUs for a Ray instance scheduled nothing, forever."""
    value = float(text)  # ValueError: argparse's "invalid positive_float value"
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def existing_dir(text: str) -> str:
    """A local directory that exists (a tokenizer's): a wrong path is one line, not an HF hub lookup's traceback."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return text


@contextlib.contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    """A run's ValueError as argparse's usage error: one line and exit 2. For the values only the engine or
    the model checks when built (a threshold out of range, a dtype, heads that kv heads do not divide)."""
    try:
        yield
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def positive_int_list(text: str) -> list[int]:
    """A comma list of counts (batch sizes, concurrency levels): at least one, each >= 1."""
    try:
        values = [positive_int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer >= 1 (a comma list, e.g. 1,16)")
    return values


def choice_list(names: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of `names` (`what` they are, named in the error), at least one."""
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        expected = f"expected a comma list of {', '.join(names)}"
        if unknown := [v for v in values if v not in names]:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; {expected}")
        if not values:
            raise argparse.ArgumentTypeError(f"{expected}; got {text!r}")
        return values
    return parse


def device(text: str) -> str:
    """A device this machine has (`fdllm.loader.parse_device`): `--device cuda` on a CPU machine is one
    line at parsing, not a traceback from the first tensor moved."""
    from fdllm.loader import parse_device

    try:
        parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def checkpoint(text: str) -> str:
    """A checkpoint the benchmark loads (a directory or a URI), checked as its loader would check it
    (`fdllm.loader.check_checkpoint`, headers only): a bad one is one line and exit 2, not a traceback."""
    from fdllm.loader import check_checkpoint

    try:
        check_checkpoint(text)
    except (OSError, ValueError, ImportError) as e:  # missing files, an unreachable store, no pyarrow for a URI
        raise argparse.ArgumentTypeError(" ".join(str(e).splitlines())) from None
    return text


def output_file(text: str) -> str:
    """A file the results are written to at the end: not a directory, in a directory that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.absolute().parent} is not an existing directory")
    return text


def output_dir(text: str) -> str:
    """A directory the results go into (made if absent): neither a file nor under one."""
    # Imported here: bench_kernels imports this module and must set TRITON_INTERPRET before fdllm (and
    # transformers, which may import triton) load.
    from fdllm.storage import check_directory_path

    try:
        check_directory_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
