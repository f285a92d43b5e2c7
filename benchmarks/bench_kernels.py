"""Benchmark fdllm's Triton kernels against the torch reference (and flash-attn when installed).

On a GPU (defaults: Qwen2-1.5B attention, N=12 query heads, K=2 kv heads, H=128, bf16, one
32-token diffusion block of queries per sequence over 32-token pages):

    python -m benchmarks.bench_kernels
    python -m benchmarks.bench_kernels --batches 1,8,32 --contexts 1024,2048,4096 --peak-gbps 3350 --json kernels.json
    python -m benchmarks.bench_kernels --q-len 8 --confidence      # sub-block steps; also the fused confidence
    python -m benchmarks.bench_kernels --q-len 8 --confidence --tune   # and the kernels' tuning constants
    python -m benchmarks.bench_kernels --q-len 1,8 --batches 1,64      # AR and sub-block steps side by side
    python -m benchmarks.bench_kernels --linear --tune --q-len 1,8,32 --batches 1   # the decode GEMMs

On a CPU it refuses, unless --smoke runs a tiny shape under the Triton interpreter (a correctness
smoke test; its timings mean nothing):

    python -m benchmarks.bench_kernels --smoke

Attention rows: per-call latency (on CUDA the median of CUDA-graph replays, triton.testing.do_bench_cudagraph:
the engine's decode steps run captured, and an eager call's time is mostly Triton's Python launch path,
~75 us on an H200's host whatever the shape; inputs smaller than the L2 stay in it between replays) of
"triton" (fdllm.kernels.paged_attention), "torch" (fdllm.kernels.reference.paged_attention_torch: gather
the pages, then SDPA) and "flash_attn" (flash_attn_with_kvcache; it needs 256-token pages, so it
runs on its own pool of 256-token pages holding the same number of tokens), with the achieved
bandwidth = bytes of K and V read / time, as a fraction of --peak-gbps (H100 SXM ~3350 GB/s).
Confidence rows: fused_confidence vs logits matmul + softmax + max in torch; bytes = the LM head.
Linear rows (--linear, first): a decoder layer's four projections (q/k/v with its bias, o, gate/up, and
down with the SiLU gate in its prologue) of each of --linear-shapes (Qwen2.5-1.5B and 7B by default) at
each row count batch x q_len up to fdllm.kernels.linear.MAX_ROWS,
"triton" (skinny_linear) vs "torch" (F.linear: cuBLAS; the down projection after fused_ops.silu_mul, the
engine's path); bytes = the weight. Their `batch` is the row count, `context` the reduction length K.
--tune adds Triton rows at other values of the kernels' tuning constants (attention's key split size,
key step and warps; the confidence row tile and vocab chunk; the linear tiles and K split), side by side
with the defaults' rows, to set them from measurements.
A backend that fails (a flash-attn wheel built for another torch, an out-of-memory) is a row with its
error, and the other rows are still written; a backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from benchmarks.cli import choice_list, output_file, positive_float, positive_int, positive_int_list, write_json_atomic
from benchmarks.shapes import SHAPES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


FLASH_ATTN_PAGE = 256


@dataclass(frozen=True)
class Row:
    kernel: str
    backend: str
    batch: int
    context: int
    q_len: int
    ms: float | None  # None: the call failed (`error`)
    gbps: float | None
    peak_fraction: float | None
    max_abs_err: float | None  # vs the torch reference on the same inputs (None for the reference)
    error: str | None = None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=positive_int_list, default=[1, 8, 32], help="sequences per call (comma list)")
    p.add_argument("--contexts", type=positive_int_list, default=[1024, 2048, 4096], help="kv tokens per sequence (comma list)")
    p.add_argument("--q-len", dest="q_lens", type=positive_int_list, default=[32],
                   help="queries per sequence (comma list): the block (32), a sub-block (8), an AR step (1)")
    p.add_argument("--page-size", type=positive_int, default=32, help="tokens per page = diffusion block size")
    p.add_argument("--heads", type=positive_int, default=12, help="query heads N")
    p.add_argument("--kv-heads", type=positive_int, default=2, help="kv heads K")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dim H")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--causal", action="store_true", help="causal attention (AR prefill) instead of bidirectional")
    p.add_argument("--backends", default="triton,torch,flash_attn",
                   help="comma list of triton, torch, flash_attn (skipped when not installed)")
    p.add_argument("--confidence", action="store_true", help="also benchmark the fused confidence kernel")
    p.add_argument("--linear", action="store_true", help="also benchmark the decode GEMM (fdllm.kernels.linear), first")
    p.add_argument("--linear-shapes", type=choice_list(SHAPES, "shapes"), default=["qwen2.5-1.5b", "qwen2.5-7b"],
                   help=f"linear: the models whose projections to time (comma list of {', '.join(SHAPES)})")
    p.add_argument("--tune", action="store_true",
                   help="also time the Triton kernels at other values of their tuning constants (rows named "
                        "'triton <constant>=N', e.g. 'triton min_keys=64', 'triton block_t=16'; the defaults are the "
                        "plain 'triton' rows)")
    p.add_argument("--vocab", type=positive_int, default=151936, help="confidence: vocab size V (Qwen2)")
    p.add_argument("--hidden", type=positive_int, default=1536, help="confidence: model dim D (Qwen2-1.5B)")
    p.add_argument("--peak-gbps", type=positive_float, default=3350.0, help="peak memory bandwidth of the GPU, GB/s")
    p.add_argument("--json", type=output_file, default=None, help="write the rows to this JSON file")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes under the Triton interpreter")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `kernels` subcommand on an argparse subparsers object (benchmarks/benchmark.py)."""
    p = subparsers.add_parser("kernels", help="Triton kernel latency and bandwidth vs torch / flash-attn",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        try:
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
        except RuntimeError as e:  # a call that cannot be captured: its eager time, launch path included
            print(f"warning: CUDA graph capture failed ({e}); timing eager calls", file=sys.stderr)
            return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # interpreter smoke: one warm call, one timed call
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _paged_case(batch: int, context: int, q_len: int, page: int, N: int, K: int, H: int,
                dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch of `batch` sequences with `context` kv tokens each, pages shuffled over the pool."""
    pages = -(-context // page)
    P = batch * pages
    q_BTNH = torch.randn(batch, q_len, N, H, dtype=dtype, device=device)
    k_pool_PSKH = torch.randn(P, page, K, H, dtype=dtype, device=device)
    v_pool_PSKH = torch.randn(P, page, K, H, dtype=dtype, device=device)
    block_tables_BM = torch.randperm(P, device=device).to(torch.int32).view(batch, pages)
    kv_lens_B = torch.full((batch,), context, dtype=torch.int32, device=device)
    q_lens_B = torch.full((batch,), q_len, dtype=torch.int32, device=device)
    return q_BTNH, k_pool_PSKH, v_pool_PSKH, block_tables_BM, kv_lens_B, q_lens_B


def _measured(kernel: str, backend: str, batch: int, context: int, q_len: int, n_bytes: int, peak_gbps: float,
              measure: Callable[[], tuple[float, float | None]]) -> Row:
    """A row from `measure()` (ms, max abs error), or the error it raised: one backend's failure
    (undefined symbol, out of memory, a kernel that does not compile) must not lose the other rows."""
    try:
        ms, err = measure()
    except Exception as exc:  # noqa: BLE001 - recorded as the row's error
        error = f"{type(exc).__name__}: {exc}"
        print(f"{kernel} {backend} batch {batch} context {context}: {error}", file=sys.stderr, flush=True)
        return Row(kernel, backend, batch, context, q_len, None, None, None, None, error)
    gbps = n_bytes / (ms * 1e-3) / 1e9
    return Row(kernel, backend, batch, context, q_len, ms, gbps, gbps / peak_gbps, err)


def flash_attn_skipped(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash_attn cannot be benchmarked here, or None. Importing it is the test: a wheel built for
    another torch is found by `find_spec` but raises (undefined symbol) at import."""
    if device.type != "cuda" or dtype == torch.float32:
        return "needs CUDA and fp16 or bf16"
    try:
        from flash_attn import flash_attn_with_kvcache  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError, a symbol error: all mean "skip it"
        return f"{type(exc).__name__}: {exc}"
    return None


class Rows:
    """The rows measured so far: each printed as it comes and, with a JSON path, the file rewritten
    after it (whole, then renamed), so a run stopped at a time limit (the GPU suite's) keeps them."""

    def __init__(self, path: str | None, header: dict) -> None:
        self.path, self.header, self.rows = path, header, []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        _print_row(row)
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        write_json_atomic(self.path, self.header | {"rows": [asdict(r) for r in self.rows]}, indent=2)


# --tune: the Triton kernels' tuning constants at values besides their defaults (MIN_KEYS_PER_SPLIT = 128,
# BLOCK_T = 64 and V_PER_SPLIT = 256 were set from these rows on the H200, one constant at a time: the
# old values' rows check the three together)
TUNE_MIN_KEYS_PER_SPLIT = (64, 256)
# keys a step of the attention loop (the default 32 at H = 128: at one query a sequence, batch 1, a program's
# chain of dependent loads is ~1 us a step and the run-3 profile had ~10 us a layer) and warps a program
TUNE_ATTENTION = {"block_n": (16, 64), "num_warps": (2, 8)}
TUNE_CONFIDENCE = {"block_t": (16, 32), "v_per_split": (512, 1024)}
TUNE_LINEAR = {"block_n": (16, 32, 128), "block_k": (64, 256), "target_programs": (1, 128, 512)}  # 1: K never split


def bench_linear(args: argparse.Namespace, device: torch.device, rows: Rows) -> None:
    from fdllm.kernels.linear import MAX_ROWS

    counts = sorted({b * q for b in args.batches for q in args.q_lens if b * q <= MAX_ROWS})
    for shape in args.linear_shapes:
        D, I, _, heads, kv_heads, _, _ = SHAPES[shape]
        H = D // heads
        # (name, N, K, bias, gated): a layer's projections in the fused forward's stacked form (Qwen2's biases)
        projections = [("qkv", (heads + 2 * kv_heads) * H, D, True, False), ("o", D, heads * H, False, False),
                       ("gate_up", 2 * I, D, False, False), ("down", D, I, False, True)]
        for name, N, K, has_bias, gated in projections:
            _bench_projection(args, device, rows, f"linear {name} {shape}", N, K, has_bias, gated, counts)


def _bench_projection(args: argparse.Namespace, device: torch.device, rows: Rows, kernel: str, N: int, K: int,
                      has_bias: bool, gated: bool, counts: list[int]) -> None:
    """One projection's rows: Triton (and its --tune variants) vs torch at each row count."""
    import torch.nn.functional as F

    from fdllm.kernels.fused_ops import silu_mul
    from fdllm.kernels.linear import skinny_linear

    dtype = DTYPES[args.dtype]
    weight = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    bias = torch.randn(N, dtype=dtype, device=device) if has_bias else None
    w_bytes = (N * K + (N if has_bias else 0)) * dtype.itemsize
    for count in counts:
        x = torch.randn(count, 2 * K if gated else K, dtype=dtype, device=device)

        def torch_path(x: torch.Tensor = x) -> torch.Tensor:
            return F.linear(silu_mul(*x.chunk(2, dim=-1)) if gated else x, weight, bias)

        def triton(x: torch.Tensor = x, **tiles: int) -> tuple[float, float | None]:
            got = skinny_linear(x, weight, bias, silu_gate=gated, **tiles)
            err = (got.float() - torch_path(x).float()).abs().max().item()
            return _time_ms(lambda: skinny_linear(x, weight, bias, silu_gate=gated, **tiles), device), err

        measures = [("triton", triton), ("torch", lambda x=x: (_time_ms(partial(torch_path, x), device), None))]
        if args.tune:
            measures += [(f"triton {k}={v}", partial(triton, **{k: v})) for k, values in TUNE_LINEAR.items()
                         for v in values]
        for backend, measure in measures:
            rows.add(_measured(kernel, backend, count, K, 1, w_bytes, args.peak_gbps, measure))


def bench_attention(args: argparse.Namespace, device: torch.device, backends: list[str], rows: Rows) -> None:
    dtype = DTYPES[args.dtype]
    variants = [(b, b, {}) for b in backends]  # (row name, backend, triton's tuning keywords)
    if args.tune and "triton" in backends:
        variants += [(f"triton min_keys={n}", "triton", {"min_keys_per_split": n}) for n in TUNE_MIN_KEYS_PER_SPLIT]
        variants += [(f"triton {k}={v}", "triton", {k: v}) for k, values in TUNE_ATTENTION.items() for v in values]
    for q_len, batch, context in itertools.product(args.q_lens, args.batches, args.contexts):
        kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * dtype.itemsize
        for name, backend, tiles in variants:
            measure = partial(_attention_ms, args, device, backend, batch, context, q_len, tiles)
            rows.add(_measured("paged_attention", name, batch, context, q_len, kv_bytes, args.peak_gbps, measure))


def _attention_ms(args: argparse.Namespace, device: torch.device, backend: str, batch: int,
                  context: int, q_len: int, tiles: dict[str, int]) -> tuple[float, float | None]:
    """(ms, max abs error vs the torch reference: triton's only) of one backend on a case of its own
    (flash_attn's in 256-token pages); `tiles`: triton's tuning keywords."""
    from fdllm.kernels.paged_attention import paged_attention
    from fdllm.kernels.reference import paged_attention_torch

    page = FLASH_ATTN_PAGE if backend == "flash_attn" else args.page_size
    case = _paged_case(batch, context, q_len, page, args.heads, args.kv_heads, args.head_dim,
                       DTYPES[args.dtype], device)
    if backend == "flash_attn":
        from fdllm.kernels.flash_attn_paged import paged_attention_flash_attn

        return _time_ms(lambda: paged_attention_flash_attn(*case, causal=args.causal), device), None
    if backend == "torch":
        return _time_ms(lambda: paged_attention_torch(*case, causal=args.causal), device), None
    ref = paged_attention_torch(*case, causal=args.causal).float()
    err = (paged_attention(*case, causal=args.causal, **tiles).float() - ref).abs().max().item()
    return _time_ms(lambda: paged_attention(*case, causal=args.causal, **tiles), device), err


def bench_confidence(args: argparse.Namespace, device: torch.device, rows: Rows) -> None:
    import torch.nn.functional as F

    from fdllm.kernels import fused_confidence, fused_confidence_ref
    from fdllm.kernels.reference import greedy_confidence

    dtype = DTYPES[args.dtype]
    weight_VD = torch.randn(args.vocab, args.hidden, dtype=dtype, device=device) / args.hidden**0.5
    mask_token_id = args.vocab - 1
    w_bytes = weight_VD.numel() * weight_VD.element_size()
    for q_len, batch in itertools.product(args.q_lens, args.batches):
        hidden_TD = torch.randn(batch * q_len, args.hidden, dtype=dtype, device=device)

        def triton(h: torch.Tensor = hidden_TD, **tiles: int) -> tuple[float, float | None]:
            ref_tok, ref_prob = fused_confidence_ref(h, weight_VD, mask_token_id)
            tok, prob = fused_confidence(h, weight_VD, mask_token_id, **tiles)
            agree = (tok == ref_tok).float().mean().item()
            if agree < 0.99:
                print(f"warning: fused_confidence argmax agrees on only {agree:.1%} of rows", file=sys.stderr)
            err = (prob - ref_prob).abs().max().item()
            return _time_ms(lambda: fused_confidence(h, weight_VD, mask_token_id, **tiles), device), err

        # torch: the engine's unfused path (ModelRunner.logits, then greedy_confidence): the logits GEMM in
        # the weights' dtype, fp32 logits (the reference upcasts the whole weight: exact, not a fair timing)
        def torch_path(h: torch.Tensor = hidden_TD) -> tuple[float, float | None]:
            return _time_ms(lambda: greedy_confidence(F.linear(h, weight_VD).float(), mask_token_id), device), None

        measures = [("triton", triton), ("torch", torch_path)]
        if args.tune:
            measures += [(f"triton {name}={n}", partial(triton, **{name: n}))
                         for name, values in TUNE_CONFIDENCE.items() for n in values]
        for backend, measure in measures:
            rows.add(_measured("confidence", backend, batch, 0, q_len, w_bytes, args.peak_gbps, measure))


def _print_row(r: Row) -> None:
    if r.error is not None:
        print(f"{r.kernel:<16} {r.backend:<10} {r.batch:>5} {r.context:>7} {r.q_len:>5} failed: {r.error}", flush=True)
        return
    err = "" if r.max_abs_err is None else f"{r.max_abs_err:.2e}"
    print(f"{r.kernel:<16} {r.backend:<10} {r.batch:>5} {r.context:>7} {r.q_len:>5} {r.ms:>10.4f} "
          f"{r.gbps:>9.1f} {r.peak_fraction:>7.1%} {err:>10}", flush=True)


def _smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    """Interpreter-sized shapes: G = 6 heads per kv head like Qwen2-1.5B, everything else tiny."""
    return argparse.Namespace(**{**vars(args), "batches": [2], "contexts": [72], "q_lens": [8], "page_size": 16,
                                 "heads": 12, "kv_heads": 2, "head_dim": 16, "dtype": "fp32",
                                 "backends": "triton,torch", "vocab": 300, "hidden": 32, "linear_shapes": ["smoke"]})


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns a process exit code (2: no GPU and no --smoke)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        if "fdllm.kernels.paged_attention" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 before the kernels are imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of a kernel module
        device = torch.device("cpu")
        args = _smoke_args(args)
        print("bench_kernels --smoke: interpreter-sized shapes of its own (batch 2, context 72, fp32, triton vs "
              "torch); the shape, dtype and backend options are not read", file=sys.stderr)
    else:
        print("bench_kernels: no CUDA device here. Kernel timings need a GPU; on a CPU run "
              "`--smoke` for a tiny interpreter run (correctness only, timings meaningless).", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels: triton is not installed (pip install 'fdllm[kernels]')", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"# {name}; dtype {args.dtype}; N={args.heads} K={args.kv_heads} H={args.head_dim}; "
          f"page {args.page_size}; causal={args.causal}; peak {args.peak_gbps:g} GB/s")
    print(f"{'kernel':<16} {'backend':<10} {'batch':>5} {'context':>7} {'q_len':>5} {'ms':>10} "
          f"{'GB/s':>9} {'of peak':>7} {'max err':>10}")
    backends = [b for b in args.backends.split(",") if b]
    skipped = {}  # backend: why it cannot run here
    if "flash_attn" in backends and (why := flash_attn_skipped(device, DTYPES[args.dtype])):
        skipped["flash_attn"] = why
        print(f"flash_attn: skipped ({why})", file=sys.stderr)
    written = Rows(args.json, {"device": name, "args": {k: v for k, v in vars(args).items() if k != "func"},
                               "skipped": skipped})
    written.write()  # what is skipped, even if no row is measured before a stop
    if args.linear or args.smoke:
        bench_linear(args, device, written)
    bench_attention(args, device, [b for b in backends if b not in skipped], written)
    if args.confidence or args.smoke:
        try:
            bench_confidence(args, device, written)
        except Exception as exc:  # noqa: BLE001 - its setup (the LM head's weight) failed: one row, the rest is written
            error = f"{type(exc).__name__}: {exc}"
            written.add(Row("confidence", "all", 0, 0, args.q_lens[0], None, None, None, None, error))
    rows = written.rows
    tolerance = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}[args.dtype]
    bad = [r for r in rows if r.max_abs_err is not None and not r.max_abs_err <= tolerance]
    for r in bad:
        print(f"bench_kernels: {r.kernel} differs from the torch reference by {r.max_abs_err:.3g} "
              f"(batch {r.batch}, context {r.context})", file=sys.stderr)
    return 1 if any(r.error is not None for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
