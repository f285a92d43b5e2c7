"""Shared fixtures: tiny random HF models and a local byte-level tokenizer, built in the test, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import RAY_TRAIN_TEST_ENV, make_sharp_checkpoint, make_tokenizer, tiny_hf_model  # noqa: E402

for _key, _value in RAY_TRAIN_TEST_ENV.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _loggers():
    """The project's loggers as each test found them: a replica built in the test process
    (serve.app.log_through_serve) hands them Serve's handlers and stops their propagation, after which
    every later test's caplog, which reads through the root logger, saw nothing."""
    import logging

    loggers = [logging.getLogger(name) for name in ("fdllm", "serve", "pipelines", "benchmarks")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)  # through setLevel: it clears the loggers' cached isEnabledFor answers


@pytest.fixture(scope="session", autouse=True)
def _node_cache(tmp_path_factory):
    """The node cache of downloads and local exports (fdllm.storage) in the session's temporary
    directory, not the user's ~/.cache/fdllm; processes the tests start (Ray workers, CLIs) inherit it."""
    from fdllm.storage import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("fdllm-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint saved by transformers (with a tokenizer)."""
    path = tmp_path_factory.mktemp("qwen2")
    tiny_hf_model("qwen2").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def dllm_dir(tmp_path_factory) -> Path:
    """A tiny random block-diffusion checkpoint (block 8 / sub-block 4) with tokenizer and mask token."""
    from tests.helpers import make_dllm_checkpoint

    return make_dllm_checkpoint(tmp_path_factory.mktemp("dllm"))


@pytest.fixture(scope="session")
def causal_dllm_dir(tmp_path_factory) -> Path:
    """`dllm_dir` with a causal clean stream (prefix_attention "causal", the joint objective's): it scores."""
    from tests.helpers import make_dllm_checkpoint

    return make_dllm_checkpoint(tmp_path_factory.mktemp("causal_dllm"), prefix_attention="causal")


@pytest.fixture(scope="session")
def sharp_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint with confident predictions (several tokens unmasked per step), no EOS."""
    return make_sharp_checkpoint(tmp_path_factory.mktemp("sharp"))


@pytest.fixture(scope="session")
def s3_env():
    """A local S3-compatible server (moto, loopback) with the AWS variables pointing at it, set for
    this process and the processes it starts (Ray workers) for the rest of the session."""
    pytest.importorskip("moto.server")
    from tests.s3_server import local_s3

    with local_s3() as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
