r"""Scoring (`Engine.score`, lm-eval's loglikelihoods) of continuations that share a context, with the
context shared within the call and without.

    python -m benchmarks.benchmark score                   # the embedded tiny world base on CPU, ~10 s
    python -m benchmarks.benchmark score --model DIR --device cuda --dtype bfloat16 --context-len 800

lm-eval's multiple-choice tasks score each choice as context + continuation, every position (echo):
`--contexts` random contexts of `--context-len` tokens, `--choices` continuations of
`--continuation-len` tokens each, in one call. Printed: tokens fed and the best of three wall times,
without sharing (every sequence computes its context; the within-call planner replaced) and with
it (later continuations read the first one's pages), then the ratios and the largest log-probability
difference.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch

import fdllm
from benchmarks.cli import checkpoint, engine_subcommand, positive_int
from fdllm.engine import scoring
from fdllm.loader import parse_dtype
from pipelines.world import DEFAULT_MODEL_DIR


@dataclass
class ScoreRow:
    sharing: bool
    fed: int  # tokens fed to the model
    seconds: float  # best of three
    logprobs: list[list[float | None]]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `score` benchmark on an argparse subparsers object."""
    p = engine_subcommand(subparsers, "score", "scoring continuations of shared contexts, the context shared or not", __doc__)
    p.add_argument("--model", type=checkpoint, default=str(DEFAULT_MODEL_DIR), help="a causal checkpoint (default: the world base)")
    p.add_argument("--contexts", type=positive_int, default=8)
    p.add_argument("--choices", type=positive_int, default=4)
    p.add_argument("--context-len", type=positive_int, default=200)
    p.add_argument("--continuation-len", type=positive_int, default=10)
    p.set_defaults(func=run)
    return p


def score_batch(engine: fdllm.Engine, batch: list[list[int]], sharing: bool) -> ScoreRow:
    fed: list[int] = []
    runner_score, planner = engine.runner.score, scoring._siblings
    engine.runner.score = lambda rows, k: fed.extend(len(r.ids) for r in rows) or runner_score(rows, k)
    if not sharing:
        scoring._siblings = lambda sequences, *_: [None] * len(sequences)
    try:
        engine.score(batch[:2], top_logprobs=1)  # warm-up
        best = float("inf")
        for _ in range(3):
            fed.clear()
            start = time.perf_counter()
            out = engine.score(batch, top_logprobs=1)
            if engine.model.device.type == "cuda":
                torch.cuda.synchronize(engine.model.device)
            best = min(best, time.perf_counter() - start)
    finally:
        engine.runner.score, scoring._siblings = runner_score, planner
    return ScoreRow(sharing, sum(fed), best, [s.logprobs for s in out])


def run(args: argparse.Namespace) -> list[ScoreRow]:
    # An AR checkpoint with the world's mask token: its clean stream is causal (it scores)
    engine = fdllm.Engine.from_pretrained(args.model, config=fdllm.BlockDiffusionConfig(prefix_attention="causal"),
                                          device=args.device, dtype=parse_dtype(args.dtype),
                                          engine_config=fdllm.EngineConfig(freeze_gc=False))
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size - 2  # never the mask token
    batch = []
    for _ in range(args.contexts):
        context = torch.randint(0, vocab, (args.context_len,), generator=gen).tolist()
        batch += [context + torch.randint(0, vocab, (args.continuation_len,), generator=gen).tolist()
                  for _ in range(args.choices)]
    rows = [score_batch(engine, batch, sharing) for sharing in (False, True)]
    print(f"{len(batch)} sequences: {args.contexts} contexts of {args.context_len} tokens x {args.choices} continuations "
          f"of {args.continuation_len}, block {engine.config.block_size}")
    print(f"{'context shared':<16}{'tokens fed':>11}{'ms':>9}")
    for r in rows:
        print(f"{'yes' if r.sharing else 'no':<16}{r.fed:>11}{1000 * r.seconds:>9.1f}")
    off, on = rows
    gap = max((abs(a - b) for x, y in zip(off.logprobs, on.logprobs) for a, b in zip(x[1:], y[1:])), default=0.0)
    print(f"\ncontext shared within the call: {off.fed / on.fed:.2f}x fewer tokens fed, {off.seconds / on.seconds:.2f}x "
          f"faster; largest log-probability difference {gap:.1e}")
    return rows
