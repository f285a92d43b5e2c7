"""Triton kernels for block-diffusion decoding, and the attention backend chooser.

Importing this package never imports triton: the kernel modules are loaded on first use, so
`import fdllm` works on machines without triton. Attention is reached through
`select_attention_backend` (or `from fdllm.kernels.paged_attention import paged_attention`; the
package does not re-export it, since the name is also the module's); the confidence functions are
lazy exports of the package.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1`,
which must be set before a kernel module is imported: triton picks compiled or interpreted mode
when `@triton.jit` runs).

Attention backends all share `fdllm.kernels.reference.paged_attention_torch`'s signature:
    fn(q_BTNH, k_pool_PSKH, v_pool_PSKH, block_tables_BM, kv_lens_B, q_lens_B, causal=False, scale=None) -> o_BTNH
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from fdllm.kernels.confidence import fused_confidence, fused_confidence_ref

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
FLASH_ATTN_PAGE_MULTIPLE = 256  # flash-attn's paged KV takes pages of a multiple of this many tokens
# the decode forward's GEMMs: torch's (cuBLAS), or "triton" (`fdllm.kernels.linear`) for a step's few rows
LINEAR_BACKENDS = ("torch", "triton")

# public name -> module that defines it; loaded on first attribute access (PEP 562)
_LAZY = {
    "fused_confidence": "fdllm.kernels.confidence",
    "fused_confidence_ref": "fdllm.kernels.confidence",
}


def interpreter_enabled() -> bool:
    """True when `TRITON_INTERPRET` asks triton to interpret kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _importable(module: str) -> bool:
    """Whether `module` can be imported, without importing it (triton's import takes a second)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-initialised module
        return False


def triton_importable() -> bool:
    return _importable("triton")


def triton_available() -> bool:
    """Triton kernels can run here: triton is importable and there is a CUDA device or the interpreter is on."""
    return triton_importable() and (torch.cuda.is_available() or interpreter_enabled())


def flash_attn_available() -> bool:
    return _importable("flash_attn")


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend `name` stands for on `device`: "auto" is the fastest that runs there,
    triton on CUDA when triton is importable, else torch (never the interpreter: it is for tests).
    Raises ValueError for an unknown name."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_importable() else "torch"
    return name


def select_attention_backend(name: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The paged-attention function for backend `name` on `device`.

    "torch": the reference (gather pages + SDPA), runs anywhere.
    "triton": the Triton kernel; needs CUDA, or CPU tensors with TRITON_INTERPRET=1 (slow, for tests).
    "flash_attn": flash-attn's paged KV kernel; needs CUDA, flash_attn installed, and pages of a
        multiple of 256 tokens (so not fdllm's usual block sizes 8..32).
    "auto": see `resolve_attention_backend`.
    Raises ValueError for an unknown name and RuntimeError when the backend cannot run on `device`.
    """
    device = torch.device(device)
    name = resolve_attention_backend(name, device)
    if name == "torch":
        from fdllm.kernels.reference import paged_attention_torch

        return paged_attention_torch
    if name == "triton":
        if not triton_importable():
            raise RuntimeError("attention backend 'triton' needs triton: pip install 'fdllm[kernels]'")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"attention backend 'triton' runs on CUDA devices, got {device}; on CPU use 'torch' "
                "(or set TRITON_INTERPRET=1 before importing fdllm.kernels, for tests only: it is very slow)"
            )
        from fdllm.kernels.paged_attention import paged_attention

        return paged_attention
    # flash_attn
    if not flash_attn_available():
        raise RuntimeError(
            "attention backend 'flash_attn' needs the flash-attn package (CUDA only): pip install 'fdllm[gpu]'; "
            "or use 'triton' / 'torch'"
        )
    if device.type != "cuda":
        raise RuntimeError(f"attention backend 'flash_attn' runs on CUDA devices only, got {device}")
    from fdllm.kernels.flash_attn_paged import paged_attention_flash_attn

    return paged_attention_flash_attn


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ATTENTION_BACKENDS",
    "FLASH_ATTN_PAGE_MULTIPLE",
    "LINEAR_BACKENDS",
    "flash_attn_available",
    "fused_confidence",
    "fused_confidence_ref",
    "interpreter_enabled",
    "resolve_attention_backend",
    "select_attention_backend",
    "triton_available",
    "triton_importable",
]
