r"""Benchmarks of the fdllm engine (run from the repository root after `pip install -e .`).

    python -m benchmarks.benchmark decode                    # random Qwen2 config on CPU, ~1-2 min
    python -m benchmarks.benchmark decode --model DIR --device cuda --dtype bfloat16 --batch-sizes 1,16,64
    python -m benchmarks.benchmark decode --hidden-size 1536 --layers 28 --heads 12 --kv-heads 2 \
        --intermediate-size 8960 --vocab-size 151936 --device cuda --dtype bfloat16   # Qwen2.5-1.5B shape
    python -m benchmarks.benchmark decode --help
    python -m benchmarks.benchmark train                     # two-stream objective vs AR loss (benchmarks/bench_train.py)
    python -m benchmarks.benchmark serve                     # HTTP load test (benchmarks/bench_serve.py)
    python -m benchmarks.benchmark kernels                   # Triton vs torch on a GPU (benchmarks/bench_kernels.py)
    python -m benchmarks.benchmark prefix                    # prefix caching off vs on (benchmarks/bench_prefix.py)
    python -m benchmarks.benchmark paging                    # KV pages on demand vs worst case (benchmarks/bench_paging.py)
    python -m benchmarks.benchmark score                     # scoring with a context shared in the call (bench_score.py)

`decode` runs, on the same weights and prompts, per batch size: a plain HF `generate` loop
(yardstick), the engine's AR mode, block diffusion with the sub-block cache off and on, and
block diffusion with the block lookahead (a block's first step in the forward that opens it), and
self-speculative decoding (diffusion drafts, causal verify: the AR output) with and without the
lookahead (a verify that also drafts the next round). It
prints forwards (model forward passes of the run), tokens per forward (per request, mean; a
speculative request counts its draft and verify forwards), the fraction of draft tokens accepted, tokens/s
(generated tokens / wall time), ms per forward and peak memory (CUDA: peak allocated; CPU: peak RSS
growth during the run, sampled), then the per-step cost of diffusion vs AR at the smallest batch and
the tokens/s scaling of each mode from the smallest to the largest batch.

Random weights are never confident, so the default threshold is 1e-9 (every masked position of a
sub-block is decoded in one step): it measures the pure per-step cost at maximal parallelism. Pass
`--threshold` (or a `--model` checkpoint, whose own threshold applies) for realistic parallelism.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import torch

import fdllm
from benchmarks import bench_kernels, bench_paging, bench_prefix, bench_score, bench_serve, bench_train
from benchmarks.cli import checkpoint, device, positive_int, positive_int_list, usage_errors
from fdllm.config import ModelConfig
from fdllm.loader import parse_dtype

log = logging.getLogger("benchmark")


@dataclass
class Row:
    mode: str
    batch: int
    tokens: int
    forwards: int
    tokens_per_forward: float
    seconds: float
    peak_mib: float
    acceptance: float | None = None  # speculative: accepted / drafted tokens over the run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms_per_forward(self) -> float:
        return 1000 * self.seconds / self.forwards


class PeakMemory:
    """Peak memory of a code region in MiB: CUDA peak allocated, or CPU peak RSS growth (sampled)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base, self._peak, self._done = self._rss(), 0, threading.Event()

        def poll() -> None:
            while not self._done.wait(0.002):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._done.set()
        self._thread.join()
        self.peak_mib = max(self._peak, self._rss()) - self._base
        self.peak_mib /= 2**20


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The fdllm model and a transformers model with the same weights (random unless --model)."""
    import transformers

    if args.model:
        model = fdllm.load_model(args.model, dtype=dtype, device=device)
        return model, transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    cfg = ModelConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.max_new_tokens + args.block_size,
    )
    torch.manual_seed(args.seed)
    model = fdllm.Transformer(cfg).to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory(prefix="fdllm-bench-") as path:
        model.save_pretrained(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, hf


def run_engine(make_engine: Callable[[], fdllm.Engine], prompts, params: fdllm.SamplingParams, mode: str,
               device: torch.device) -> Row:
    with PeakMemory(device) as mem:
        engine = make_engine()
        start = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params)
        forwards, results = 0, []
        while engine.has_unfinished():
            results += engine.step()
            forwards += 1
        seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    tpf = sum(r.tokens_per_forward for r in results) / len(results)
    drafted = sum(r.num_drafted for r in results)
    acceptance = sum(r.num_accepted for r in results) / drafted if drafted else None
    return Row(mode, len(prompts), tokens, forwards, tpf, seconds, mem.peak_mib, acceptance)


def run_hf(hf_model, prompts, max_new_tokens: int, mask_token_id: int, device: torch.device) -> Row:
    ids = torch.tensor(prompts, device=device)
    with PeakMemory(device) as mem, torch.inference_mode():
        start = time.perf_counter()
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, suppress_tokens=[mask_token_id], pad_token_id=0,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return Row("hf generate", len(prompts), tokens, max_new_tokens, 1.0, seconds, mem.peak_mib)


BLOCK_LOOKAHEAD_ROW = "diffusion, block lookahead"  # sub-block cache on, SamplingParams(block_lookahead=True)


def decode(args: argparse.Namespace) -> list[Row]:
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    model, hf = load_models(args, device, dtype)
    saved = fdllm.BlockDiffusionConfig.load(args.model) if args.model else None
    mask_id = (saved.mask_token_id if saved and saved.mask_token_id is not None else model.config.vocab_size - 1)
    threshold = args.threshold if args.threshold is not None else (saved.threshold if saved else 1e-9)
    base = fdllm.BlockDiffusionConfig(block_size=args.block_size, sub_block_size=args.sub_block_size,
                                      threshold=threshold, mask_token_id=mask_id,
                                      prefix_attention=saved.prefix_attention if saved else "block_causal")
    gen = torch.Generator().manual_seed(args.seed)
    # (row name, sub-block cache, mode, speculative lookahead, block lookahead)
    modes = [("ar", False, "ar", True, False), ("diffusion, sub-block cache off", False, "diffusion", True, False),
             ("diffusion, sub-block cache on", True, "diffusion", True, False),
             (BLOCK_LOOKAHEAD_ROW, True, "diffusion", True, True),
             ("speculative", False, "speculative", True, False),
             ("speculative, no lookahead", False, "speculative", False, False)]

    def engine_for(batch: int, cache_on: bool, lookahead: bool) -> Callable[[], fdllm.Engine]:
        pages = kv_pages(batch, args.prompt_len, args.max_new_tokens, args.block_size)
        ecfg = fdllm.EngineConfig(num_pages=pages, max_num_seqs=batch, speculative_lookahead=lookahead,
                                  max_prefill_tokens=max(batch * args.prompt_len, args.block_size))
        return lambda: fdllm.Engine(model, None, base.replace(use_sub_block_cache=cache_on), ecfg)

    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, mask_id, (batch, args.prompt_len), generator=gen).tolist()
        for name, cache_on, mode, lookahead, block_lookahead in modes:
            params = fdllm.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, mode=mode,
                                          block_lookahead=block_lookahead)
            run_engine(engine_for(batch, cache_on, lookahead), prompts[:1], params, name, device)  # warm-up
            make = engine_for(batch, cache_on, lookahead)
            rows.append(best_of(args.repeats, run_engine, make, prompts, params, name, device))
            log.info("%s batch %d: %.1f tokens/s", name, batch, rows[-1].tokens_per_s)
        run_hf(hf, prompts[:1], 2, mask_id, device)  # warm-up
        rows.append(best_of(args.repeats, run_hf, hf, prompts, args.max_new_tokens, mask_id, device))
    return rows


def kv_pages(batch: int, prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """KV pages for `batch` requests to run together to the end: each request's prompt and output, and
    one page more for the block a lookahead (the block lookahead, a speculative verify's draft) opens
    past them; without it the last request of a batch waited for pages and the lookahead rows of a
    "batch N" ran N-1 requests at a time."""
    return batch * (math.ceil((prompt_len + max_new_tokens) / block_size) + 1)


def best_of(repeats: int, run: Callable[..., Row], *run_args) -> Row:
    """The fastest of `repeats` runs: shared machines add noise, never speed."""
    return min((run(*run_args) for _ in range(repeats)), key=lambda r: r.seconds)


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    mem = "peak MiB (CUDA alloc)" if args.device.startswith("cuda") else "peak MiB (RSS growth)"
    header = f"{'mode':<32}{'batch':>6}{'forwards':>10}{'tok/fwd':>9}{'accept':>8}{'tokens/s':>11}{'ms/fwd':>9}{mem:>24}"
    print(header)
    print("-" * len(header))
    for r in rows:
        accept = "-" if r.acceptance is None else f"{r.acceptance:.2f}"
        print(f"{r.mode:<32}{r.batch:>6}{r.forwards:>10}{r.tokens_per_forward:>9.2f}{accept:>8}{r.tokens_per_s:>11.1f}"
              f"{r.ms_per_forward:>9.2f}{r.peak_mib:>24.1f}")
    small, large = min(args.batch_sizes), max(args.batch_sizes)
    by = {(r.mode, r.batch): r for r in rows}
    ar = by[("ar", small)]
    print()
    for mode in ("diffusion, sub-block cache off", "diffusion, sub-block cache on", BLOCK_LOOKAHEAD_ROW, "speculative",
                 "speculative, no lookahead"):
        step = by[(mode, small)]
        print(f"{mode}: one step costs {step.ms_per_forward / ar.ms_per_forward:.2f}x an AR step at batch {small} "
              f"(target <= 1.3x); {step.tokens_per_s / ar.tokens_per_s:.2f}x AR tokens/s")
    if large != small:
        for mode in dict.fromkeys(r.mode for r in rows):
            ratio = by[(mode, large)].tokens_per_s / by[(mode, small)].tokens_per_s
            print(f"{mode}: batch {large} gives {ratio:.2f}x the tokens/s of batch {small}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dec = sub.add_parser("decode", help="AR vs block diffusion (sub-block cache on/off, block lookahead) vs speculative "
                         "vs HF generate")
    dec.add_argument("--model", type=checkpoint, help="HF checkpoint dir; default: random weights of the config below")
    dec.add_argument("--hidden-size", type=positive_int, default=256)
    dec.add_argument("--layers", type=positive_int, default=4)
    dec.add_argument("--heads", type=positive_int, default=4)
    dec.add_argument("--kv-heads", type=positive_int, default=2)
    dec.add_argument("--intermediate-size", type=positive_int, default=768)
    dec.add_argument("--vocab-size", type=positive_int, default=4096)
    dec.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    dec.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    dec.add_argument("--batch-sizes", type=positive_int_list, default=[1, 16],
                     help="comma-separated, e.g. 1,16,64")
    dec.add_argument("--prompt-len", type=positive_int, default=64)
    dec.add_argument("--max-new-tokens", type=positive_int, default=64)
    dec.add_argument("--block-size", type=positive_int, default=32)
    dec.add_argument("--sub-block-size", type=positive_int, default=8)
    dec.add_argument("--threshold", type=float, default=None,
                     help="default: the checkpoint's, or 1e-9 with random weights (maximal parallelism)")
    dec.add_argument("--repeats", type=positive_int, default=2, help="runs per measurement; the fastest is reported")
    dec.add_argument("--seed", type=int, default=0)
    dec.set_defaults(func=lambda args: print_table(decode(args), args))
    bench_train.add_parser(sub).set_defaults(func=bench_train.run)
    bench_kernels.add_parser(sub)
    bench_serve.add_parser(sub)
    bench_prefix.add_parser(sub)
    bench_paging.add_parser(sub)
    bench_score.add_parser(sub)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> object:
    """Run one benchmark; returns what it measured (its rows), for callers other than the shell."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fdllm").setLevel(logging.WARNING)  # one engine per run: skip their banners
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the serve load test: no line per request
    args = parse_args(argv)
    with usage_errors(f"benchmark {args.command}"):
        return args.func(args)


if __name__ == "__main__":
    status = main()
    sys.exit(status if isinstance(status, int) else 0)
