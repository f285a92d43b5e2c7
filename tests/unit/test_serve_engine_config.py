"""The Serve config passes fdllm.EngineConfig fields through to each replica's engine."""

from __future__ import annotations

import pytest

import fdllm

pytest.importorskip("ray.serve")
from serve.app import ServerConfig  # noqa: E402


def test_engine_fields_pass_through_and_bad_ones_fail_early():
    cfg = ServerConfig.from_args({"model": "m", "engine": {"max_num_seqs": 8, "enforce_eager": True,
                                                           "gpu_memory_utilization": 0.5, "max_model_len": 512}})
    assert cfg.engine_config() == fdllm.EngineConfig(max_num_seqs=8, enforce_eager=True, gpu_memory_utilization=0.5,
                                                      max_model_len=512)
    assert ServerConfig.from_args({"model": "m"}).engine_config() == fdllm.EngineConfig()
    with pytest.raises(ValueError, match="engine: .*kv_fraction"):
        ServerConfig.from_args({"model": "m", "engine": {"kv_fraction": 0.5}})
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ServerConfig.from_args({"model": "m", "engine": {"gpu_memory_utilization": 1.5}})


def test_fdllm_serve_flags_set_engine_fields():
    from serve.app import engine_overrides, parse_args

    def engine(*flags):
        return ServerConfig.from_args({"model": "m", "engine": engine_overrides(parse_args(["--model", "m", *flags]))})

    assert engine().engine_config() == fdllm.EngineConfig()
    assert engine("--quantization", "int8", "--no-enable-prefix-caching").engine_config() == fdllm.EngineConfig(
        quantization="int8", enable_prefix_caching=False)
    assert engine("--max-num-seqs", "8", "--gpu-memory-utilization", "0.5", "--max-model-len", "512", "--num-pages", "40",
                  "--kv-cache-gib", "1.5", "--enforce-eager", "--no-freeze-gc", "--attention-backend", "torch",
                  "--speculative-lookahead-max-batch", "4", "--deterministic").engine_config() == fdllm.EngineConfig(
        max_num_seqs=8, gpu_memory_utilization=0.5, max_model_len=512, num_pages=40, kv_cache_gib=1.5, enforce_eager=True,
        freeze_gc=False, attention_backend="torch", speculative_lookahead_max_batch=4, deterministic=True)


def test_every_engine_field_is_a_flag():
    """A field added to EngineConfig is a flag at once (with its type), not a copy kept in step by hand."""
    from dataclasses import fields

    from serve.app import parse_args

    flags = parse_args(["--model", "m"])
    assert all(getattr(flags, f.name, "missing") is None for f in fields(fdllm.EngineConfig))
    for bad in (["--max-num-seqs", "eight"], ["--attention-backend", "sdpa"], ["--quantization", "int3"]):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", *bad])
