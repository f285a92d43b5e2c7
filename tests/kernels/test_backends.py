"""The attention backend chooser, and importing fdllm without triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fdllm.kernels.reference import paged_attention_torch
from fdllm.kernels import flash_attn_available, select_attention_backend, triton_importable


def test_torch_and_auto_on_cpu():
    assert select_attention_backend("torch", "cpu") is paged_attention_torch
    assert select_attention_backend("auto", torch.device("cpu")) is paged_attention_torch


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa'"):
        select_attention_backend("sdpa", "cpu")


@pytest.mark.skipif(not triton_importable(), reason="needs triton")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_attention_backend("triton", "cpu").__name__ == "paged_attention"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA devices"):
        select_attention_backend("triton", "cpu")


@pytest.mark.skipif(flash_attn_available(), reason="flash_attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs the flash-attn package"):
        select_attention_backend("flash_attn", "cuda")


def test_fdllm_imports_without_triton():
    code = textwrap.dedent("""
        import sys
        from importlib.abc import MetaPathFinder

        class NoTriton(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, NoTriton())
        import fdllm, fdllm.kernels
        from fdllm.kernels.reference import paged_attention_torch
        from fdllm.kernels import select_attention_backend, triton_available
        assert not triton_available()
        assert select_attention_backend("auto", "cpu") is paged_attention_torch
        try:
            select_attention_backend("triton", "cpu")
        except RuntimeError as e:
            assert "needs triton" in str(e), e
        else:
            raise AssertionError("expected a RuntimeError")
        assert "triton" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs flash_attn")
def test_flash_attn_matches_reference(cuda_device):
    from tests.kernels.test_paged_attention import assert_close, make_case, reference

    fn = select_attention_backend("flash_attn", cuda_device)
    case = make_case(q_lens=[32, 8, 0], kv_lens=[700, 300, 40], T=32, K=2, G=6, H=128, S=256,
                     dtype=torch.bfloat16, device=cuda_device)
    assert_close(fn(*case.args()), reference(case, False), torch.bfloat16)
    case.q_lens_B.fill_(32)
    assert_close(fn(*case.args(), causal=True), reference(case, True), torch.bfloat16)
