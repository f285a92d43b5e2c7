"""fdllm: block-diffusion decoding (Fast-dLLM v2) for pretrained autoregressive LLMs.

The public names below are imported on first use (PEP 562), so that importing a torch-free module of
the package (`fdllm.paths`, `fdllm.storage`, `fdllm.tokenizer`, `fdllm.config`) does not import torch
and the engine: the Ray Data processes that read and tokenize the corpus import only those, and each
of them starts ~2 s sooner.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fdllm.config import BlockDiffusionConfig, ModelConfig
    from fdllm.engine import Engine, EngineConfig, GenerationResult, SamplingParams, SequenceLogprobs
    from fdllm.model import Transformer, load_model

try:
    __version__ = version("fdllm")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BlockDiffusionConfig", "Engine", "EngineConfig", "GenerationResult", "ModelConfig", "SamplingParams",
    "SequenceLogprobs", "Transformer", "load_model",
]


def __getattr__(name: str) -> Any:
    if name in ("BlockDiffusionConfig", "ModelConfig"):
        from fdllm import config as home
    elif name in ("Engine", "EngineConfig", "GenerationResult", "SamplingParams", "SequenceLogprobs"):
        from fdllm import engine as home
    elif name in ("Transformer", "load_model"):
        from fdllm import model as home
    elif importlib.util.find_spec(f"fdllm.{name}") is not None:  # a module no one imported yet
        raise AttributeError(f"module 'fdllm' has no attribute {name!r}: `import fdllm.{name}` first (the package "
                             "imports its modules when used, not all at once)")
    else:
        raise AttributeError(f"module 'fdllm' has no attribute {name!r}")
    value = globals()[name] = getattr(home, name)  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
