"""What the engine benchmarks' subcommands share on the command line."""

from __future__ import annotations

import argparse
from typing import Any

import torch


def engine_subcommand(subparsers: Any, name: str, help: str, doc: str | None) -> argparse.ArgumentParser:
    """A `python -m benchmarks.benchmark NAME` subcommand whose --help shows the module's docstring
    `doc`, with the --device and --dtype an engine benchmark runs on."""
    p = subparsers.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    return p
