r"""Prefix caching: requests that share a system prompt, with EngineConfig.enable_prefix_caching off and on.

    python -m benchmarks.benchmark prefix                         # tiny random model on CPU, ~1 min
    python -m benchmarks.benchmark prefix --preset qwen2.5-1.5b --device cuda --dtype bfloat16 \
        --requests 64 --system-len 1024

Requests arrive one per engine step (a stream of users, not one batch: a request admitted in the same
step as the first that prefills the shared blocks finds nothing cached yet), each the same
`--system-len` tokens then its own `--question-len`. Printed per setting: prompt tokens prefilled
(the rest came from the cache), forwards, mean time to first token, generated tokens/s; then the
ratios, and whether both runs decoded the same tokens (greedy: they must).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

import fdllm
from benchmarks.bench_train import add_model_arguments, build_model
from benchmarks.cli import engine_subcommand, positive_int
from fdllm.loader import parse_dtype


@dataclass
class PrefixRow:
    caching: bool
    prefilled: int  # prompt tokens whose K/V were computed
    forwards: int  # engine steps
    ttft_s: float  # mean time to first token
    seconds: float
    tokens: int
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `prefix` benchmark on an argparse subparsers object."""
    p = engine_subcommand(subparsers, "prefix", "prefix caching off vs on: requests sharing a system prompt", __doc__)
    add_model_arguments(p)
    p.add_argument("--requests", type=positive_int, default=16)
    p.add_argument("--system-len", type=positive_int, default=480, help="tokens of the shared system prompt")
    p.add_argument("--question-len", type=positive_int, default=24, help="tokens of each request's own part")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--block-size", type=positive_int, default=32)
    p.add_argument("--mode", default="diffusion", choices=["diffusion", "ar", "speculative"])
    p.set_defaults(func=run)
    return p


def run_stream(model: fdllm.Transformer, prompts: list[list[int]], caching: bool, args: argparse.Namespace) -> PrefixRow:
    L = args.block_size
    cfg = fdllm.BlockDiffusionConfig(block_size=L, sub_block_size=max(1, L // 4), threshold=0.9,
                                     mask_token_id=model.config.vocab_size - 1)
    pages = len(prompts) * math.ceil((len(prompts[0]) + args.max_new_tokens) / L)
    engine = fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=pages, max_num_seqs=len(prompts),
                                                               enable_prefix_caching=caching, freeze_gc=False))
    params = fdllm.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, mode=args.mode)
    start, steps, results = time.perf_counter(), 0, {}
    pending = iter(enumerate(prompts))
    while True:
        added = next(pending, None)
        if added is not None:
            engine.add_request(added[1], params, request_id=str(added[0]))
        elif not engine.has_unfinished():
            break
        results |= {r.request_id: r for r in engine.step()}
        steps += 1
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    done = [results[str(i)] for i in range(len(prompts))]
    return PrefixRow(
        caching, sum(len(r.prompt_token_ids) - r.num_cached_tokens for r in done), steps,
        sum(r.time_to_first_token_s for r in done) / len(done), seconds, sum(len(r.token_ids) for r in done),
        [r.token_ids for r in done],
    )


def run(args: argparse.Namespace) -> list[PrefixRow]:
    model = build_model(args).to(dtype=parse_dtype(args.dtype)).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size - 1  # the last id is the mask token
    system = torch.randint(0, vocab, (args.system_len,), generator=gen).tolist()
    prompts = [system + torch.randint(0, vocab, (args.question_len,), generator=gen).tolist() for _ in range(args.requests)]
    run_stream(model, prompts[:2], True, args)  # warm-up
    rows = [run_stream(model, prompts, caching, args) for caching in (False, True)]
    print(f"{'prefix caching':<16}{'prefilled':>11}{'forwards':>10}{'TTFT ms':>10}{'tokens/s':>11}")
    for r in rows:
        print(f"{'on' if r.caching else 'off':<16}{r.prefilled:>11}{r.forwards:>10}{1000 * r.ttft_s:>10.1f}{r.tokens_per_s:>11.1f}")
    off, on = rows
    print(f"\nprefix caching on: {off.prefilled / max(on.prefilled, 1):.2f}x fewer prompt tokens prefilled, "
          f"{off.ttft_s / on.ttft_s:.2f}x lower mean TTFT, {on.tokens_per_s / off.tokens_per_s:.2f}x tokens/s; "
          f"same tokens: {'yes' if on.outputs == off.outputs else 'NO'}")
    return rows
