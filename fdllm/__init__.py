"""fdllm: block-diffusion decoding (Fast-dLLM v2) for pretrained autoregressive LLMs."""

from __future__ import annotations

from pathlib import Path

import torch

from fdllm.config import BlockDiffusionConfig, ModelConfig
from fdllm.engine import Engine, EngineConfig, GenerationResult, SamplingParams, SequenceLogprobs
from fdllm.model import Transformer


def load_model(path: str | Path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Load an HF-format Qwen2/Llama checkpoint dir as an fdllm `Transformer`."""
    return Transformer.from_pretrained(path, dtype=dtype, device=device)


__all__ = [
    "BlockDiffusionConfig", "Engine", "EngineConfig", "GenerationResult", "ModelConfig", "SamplingParams",
    "SequenceLogprobs", "Transformer", "load_model",
]
