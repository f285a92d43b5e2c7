"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` runs (the kernel modules are imported lazily,
from the tests). It is process-wide, which is harmless: nothing else in fdllm uses triton on the
CPU (torch inductor's CPU backend generates C++), and with CUDA present the variable is left alone
so the kernels are compiled for the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU under the interpreter; skips when triton can't run."""
    from fdllm.kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed, or there is neither CUDA nor TRITON_INTERPRET=1")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def cuda_device() -> torch.device:
    """For `gpu`-marked tests: realistic shapes that only a compiled kernel runs fast enough."""
    from fdllm.kernels import triton_importable

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not triton_importable():
        pytest.skip("needs triton")
    return torch.device("cuda")
