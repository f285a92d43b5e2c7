"""Held-out exact match of the world's AR base: greedy AR decoding on fdllm.Engine, scored per task
by pipelines/evaluate.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fdllm
from fdllm.model import Transformer
from pipelines.evaluate import evaluate

EVAL_PARAMS = fdllm.SamplingParams(max_new_tokens=48, temperature=0.0, mode="ar")  # answers: <= 36 tokens + end
EVAL_BATCH = 100  # sequences decoded together


def eval_engine(model: Transformer, tokenizer) -> fdllm.Engine:
    """A small engine over `model` itself, so one engine scores the current weights on every call.

    Finished requests give their KV pages back and keep nothing, so nothing carries over between
    calls while the weights change. 4 pages (128 tokens) per sequence fit this world's chats
    (<= 40 prompt tokens + EVAL_PARAMS.max_new_tokens) with room to spare.
    """
    engine_config = fdllm.EngineConfig(num_pages=4 * EVAL_BATCH, max_num_seqs=EVAL_BATCH)
    return fdllm.Engine(model, tokenizer, fdllm.BlockDiffusionConfig(), engine_config)


def exact_match(engine: fdllm.Engine, rows: Sequence[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """Share of test rows (`messages`, `answer`, `category`) whose greedy answer equals `answer`
    (surrounding whitespace ignored), overall and per category; each row is decoded once."""
    categories = sorted({r["category"] for r in rows})
    scores = {c: evaluate(engine, [r for r in rows if r["category"] == c], EVAL_PARAMS, c, progress=False)
              for c in categories}
    overall = sum(s.correct for s in scores.values()) / max(1, len(rows))
    return overall, {c: s.accuracy for c, s in scores.items()}


