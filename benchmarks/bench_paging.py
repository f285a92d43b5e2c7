r"""KV pages on demand vs each request's worst case reserved at admission.

    python -m benchmarks.benchmark paging                  # the embedded tiny world base, AR mode, CPU, ~1 min
    python -m benchmarks.benchmark paging --model DIR --mode diffusion --device cuda --dtype bfloat16

Chat requests for the world's held-out problems, all sent at once with a generous max_new_tokens
(what OpenAI clients often send; the answers end at EOS after tens of tokens), into a KV cache that
holds `--fit` requests at their worst case (prompt + max_new_tokens). Reserving the worst case (the
scheduler's `reserve_worst_case`, which EngineConfig.deterministic sets) runs that many at a time;
pages on demand (the default) run as many as the pages they really use allow (max_num_seqs at
most), preempting the newest request when the cache runs short. Printed per policy: mean requests
running per step, steps, preemptions, wall time, tokens/s; then the ratios, and whether both
decoded the same tokens (greedy: they should, a preempted request recomputes what it had).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

import fdllm
from benchmarks.cli import checkpoint, engine_subcommand, positive_int
from fdllm.loader import parse_dtype
from pipelines.evaluate import load_records, prompt_ids
from pipelines.world import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, TEST_FILE


@dataclass
class PagingRow:
    policy: str
    mean_running: float  # requests decoded per step, mean over steps
    steps: int
    preemptions: int
    seconds: float
    tokens: int
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `paging` benchmark on an argparse subparsers object."""
    p = engine_subcommand(subparsers, "paging", "KV pages on demand vs worst-case reservation at admission", __doc__)
    p.add_argument("--model", type=checkpoint, default=str(DEFAULT_MODEL_DIR), help="checkpoint dir with a tokenizer (default: the world base)")
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR / TEST_FILE), help="JSONL records with 'prompt' fields")
    p.add_argument("--mode", default="ar", choices=["diffusion", "ar", "speculative"],
                   help="the world base is an AR model: diffusion needs a fine-tuned --model")
    p.add_argument("--requests", type=positive_int, default=64)
    p.add_argument("--max-new-tokens", type=positive_int, default=384, help="the world base reads 512 tokens at most")
    p.add_argument("--fit", type=positive_int, default=8, help="the KV cache holds this many requests at their worst case")
    p.add_argument("--max-num-seqs", type=positive_int, default=64)
    p.set_defaults(func=run)
    return p


def run_policy(engine: fdllm.Engine, prompts: list[list[int]], params: fdllm.SamplingParams,
               worst_case: bool) -> PagingRow:
    engine.scheduler.reserve_worst_case = worst_case
    preempted = engine.num_preemptions
    rids = [engine.add_request(p, params) for p in prompts]
    start, steps, running, results = time.perf_counter(), 0, 0, {}
    while engine.has_unfinished():
        results |= {r.request_id: r for r in engine.step()}
        steps += 1
        running += engine.num_running
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize(engine.model.device)
    seconds = time.perf_counter() - start
    done = [results[rid] for rid in rids]
    return PagingRow("worst case" if worst_case else "on demand", running / steps, steps,
                     engine.num_preemptions - preempted, seconds, sum(len(r.token_ids) for r in done),
                     [r.token_ids for r in done])


def run(args: argparse.Namespace) -> list[PagingRow]:
    probe = fdllm.Engine.from_pretrained(args.model, device=args.device, dtype=parse_dtype(args.dtype),
                                         engine_config=fdllm.EngineConfig(num_pages=1, freeze_gc=False))
    records = load_records(args.data, limit=args.requests)
    prompts = [prompt_ids(probe, r) for r in records]
    L = probe.config.block_size
    pages = args.fit * math.ceil((max(map(len, prompts)) + args.max_new_tokens) / L)
    engine = fdllm.Engine(probe.model, probe.tokenizer, probe.config, fdllm.EngineConfig(
        num_pages=pages, max_num_seqs=args.max_num_seqs, enable_prefix_caching=False, freeze_gc=False))
    params = fdllm.SamplingParams(max_new_tokens=args.max_new_tokens, mode=args.mode)
    print(f"{len(prompts)} requests, max_new_tokens {args.max_new_tokens}, {pages} KV pages of {L} tokens "
          f"({args.fit} requests at their worst case), mode {args.mode}")
    run_policy(engine, prompts[:4], params, worst_case=False)  # warm-up
    rows = [run_policy(engine, prompts, params, worst_case) for worst_case in (True, False)]
    print(f"{'KV pages':<12}{'running':>9}{'steps':>7}{'preempted':>11}{'seconds':>9}{'tokens/s':>10}")
    for r in rows:
        print(f"{r.policy:<12}{r.mean_running:>9.1f}{r.steps:>7}{r.preemptions:>11}{r.seconds:>9.2f}{r.tokens_per_s:>10.1f}")
    worst, demand = rows
    print(f"\npages on demand: {demand.mean_running / worst.mean_running:.2f}x requests running per step, "
          f"{worst.steps / demand.steps:.2f}x fewer steps, {demand.tokens_per_s / worst.tokens_per_s:.2f}x tokens/s; "
          f"same tokens: {'yes' if demand.outputs == worst.outputs else 'NO'}")
    return rows
