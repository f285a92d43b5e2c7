"""Training-step benchmark: the two-stream block-diffusion objective vs the plain AR loss.

Same model, same packed batch (B sequences of L tokens), same optimizer; each objective runs in a
fresh process so peak memory is its own. Reports data tokens per second (B*L per step: the
diffusion step forwards B rows of at most 3L tokens for them, `[x_t ; x_t' ; x_0]` less the noisy
blocks that carry no target; "diffusion-uncut" keeps them) and peak memory (CUDA: max allocated;
CPU: peak RSS above the loaded model). A quarter of each document is prompt (no loss).
Every step draws the same noise: the compacted length (how many noisy blocks carry a target) then
stays that of the warm-up steps, so a compiled attention (flex on a GPU) is timed compiled, not
recompiling for a length the warm-up did not see (the first H200 run timed 1.45 s per compacted
step against 0.21 s uncut). A real run meets each of its few length buckets once.

    python -m benchmarks.bench_train --preset tiny --seq-len 256 --batch-size 8 --steps 10
    python -m benchmarks.bench_train --model /path/to/Qwen2.5-1.5B-Instruct --device cuda --dtype bf16 \\
        --seq-len 2048 --batch-size 2 --output bench_train.json

`add_parser(subparsers)` / `run(args)` let a `benchmark.py` expose it as its `train` subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import (  # noqa: E402
    checkpoint,
    choice_list,
    device,
    non_negative_int,
    output_file,
    positive_int,
    usage_errors,
)

log = logging.getLogger("fdllm.bench_train")

# Random-weight models of known shapes, for runs without a checkpoint (Qwen2 architecture).
PRESETS: dict[str, dict[str, Any]] = {
    # the tiny-world calibration model (3.4M parameters)
    "tiny": dict(vocab_size=512, hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen2.5-0.5B, 1.5B and 7B shapes
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6),
}
OBJECTIVES = ("diffusion", "diffusion-uncut", "ar")  # uncut: every noisy block in the forward


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `train` benchmark on an argparse subparsers object."""
    parser = subparsers.add_parser("train", help="training tokens/s and peak memory: block diffusion vs AR",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model DIR` or `--preset NAME`: what `build_model` builds."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=checkpoint, help="HF checkpoint dir (default: a random --preset model)")
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="random model shape")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per packed sequence")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    parser.add_argument("--block-size", type=positive_int, default=32, help="diffusion block size")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per objective")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast on CUDA")
    parser.add_argument("--objectives", type=choice_list(OBJECTIVES, "objectives"), default=list(OBJECTIVES), help="comma-separated subset of diffusion,diffusion-uncut,ar (uncut: without "
                        "compact_noisy_blocks, to measure what it saves)")
    parser.add_argument("--output", type=output_file, help="write the results as JSON here")


def build_model(args: argparse.Namespace):
    import torch

    import fdllm
    from fdllm.config import ModelConfig
    from fdllm.model import Transformer

    if args.model:
        return fdllm.load_model(args.model, dtype=torch.float32, device=args.device)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it runs: a 1.5B fp32 init on one CPU thread takes ~13 s
        return Transformer(ModelConfig(**PRESETS[args.preset]))


def _batch(vocab: int, args: argparse.Namespace):
    """Random packed batch: two documents per row, the first quarter of each a prompt (no loss)."""
    import torch

    B, L = args.batch_size, args.seq_len
    g = torch.Generator().manual_seed(0)
    ids_BL = torch.randint(0, vocab - 1, (B, L), generator=g)
    half = L // 2 // args.block_size * args.block_size
    doc_ids_BL = (torch.arange(L) >= half).long().expand(B, L).contiguous()
    pos_BL = torch.where(doc_ids_BL == 0, torch.arange(L), torch.arange(L) - half)
    labels_BL = torch.where(pos_BL < max(1, half // 4), torch.full_like(ids_BL, -100), ids_BL)
    return [t.to(args.device) for t in (ids_BL, labels_BL, pos_BL, doc_ids_BL)]


def _measure(objective: str, args: argparse.Namespace) -> dict[str, Any]:
    """One objective's timed steps, in its own process (see `run`)."""
    import torch

    from fdllm.objective import ar_loss, block_diffusion_loss

    device = torch.device(args.device)
    model = build_model(args).train()
    vocab = model.config.vocab_size
    mask_id = vocab - 1  # any id works for timing
    ids, labels, pos, docs = _batch(vocab, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16" and device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        generator.manual_seed(0)  # the same noise every step (see the module docstring)
        with autocast:
            if objective.startswith("diffusion"):
                loss, _ = block_diffusion_loss(model, ids, labels, mask_id, args.block_size, position_ids_BL=pos,
                                               doc_ids_BL=docs, generator=generator, compact=objective == "diffusion")
            else:
                loss, _ = ar_loss(model, ids, labels, position_ids_BL=pos, doc_ids_BL=docs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: torch, the model, the batch
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # the steps' peak RSS above the loaded model (the warm-up steps reached the steady-state peak); the
        # process's whole peak, ~450 MiB of it torch itself, left the objectives' ratio near 1 whatever they used
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - loaded_kib) / 1024
    tokens = args.steps * args.batch_size * args.seq_len
    return {
        "objective": objective,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / args.steps,
        "peak_mem_mib": peak_mib,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Benchmark each objective in a fresh process; print a table, optionally write JSON."""
    objectives = args.objectives
    if args.seq_len % args.block_size:  # a ValueError: the CLIs' one-line usage error, exit 2
        raise ValueError(f"--seq-len ({args.seq_len}) must be a multiple of --block-size ({args.block_size})")
    ctx = mp.get_context("spawn")  # a fresh process per objective: peak memory is not shared
    results = []
    for objective in objectives:
        log.info("benchmarking %s: %d x %d tokens, %d steps on %s", objective, args.batch_size, args.seq_len,
                 args.steps, args.device)
        with ctx.Pool(1) as pool:
            results.append(pool.apply(_measure, (objective, args)))
    model = args.model or f"random {args.preset}"
    print(f"\n{model}: {results[0]['params_m']:.1f}M params, batch {args.batch_size} x {args.seq_len} tokens, "
          f"block {args.block_size}, {args.device} {args.dtype}")
    print(f"{'objective':<16} {'tokens/s':>10} {'step s':>8} {'peak MiB':>9}")
    for r in results:
        print(f"{r['objective']:<16} {r['tokens_per_s']:>10.0f} {r['step_s']:>8.3f} {r['peak_mem_mib']:>9.0f}")
    by_name = {r["objective"]: r for r in results}
    for name in ("diffusion", "diffusion-uncut"):
        if name in by_name and "ar" in by_name:
            d, a = by_name[name], by_name["ar"]
            print(f"{name} / AR: {d['tokens_per_s'] / a['tokens_per_s']:.2f}x throughput, "
                  f"{d['peak_mem_mib'] / a['peak_mem_mib']:.2f}x peak memory")
    if {"diffusion", "diffusion-uncut"} <= by_name.keys():
        d, u = by_name["diffusion"], by_name["diffusion-uncut"]
        print(f"compacted / uncut noisy blocks: {d['tokens_per_s'] / u['tokens_per_s']:.2f}x throughput, "
              f"{d['peak_mem_mib'] / u['peak_mem_mib']:.2f}x peak memory")
    if args.output:
        Path(args.output).write_text(json.dumps({"config": vars(args), "results": results}, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    with usage_errors("bench_train"):
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
