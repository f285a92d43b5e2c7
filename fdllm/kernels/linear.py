"""Triton GEMM for a decode step's few rows: `y = x @ W^T + b` for at most MAX_ROWS rows of x.

Why: at batch 1 a decode step multiplies one row (AR) or a sub-block of rows by every weight of
the model, so each projection is a weight read. On the H200 (docs/gpu.md) cuBLAS ran a Qwen2.5-1.5B
layer's four projections at 0.8-3.2 TB/s of the 4.8 peak: about 40 us a layer where reading the
weights takes 19.5 (the small q/k/v and o projections latency-bound, the down projection split over K
with a reduce kernel after it). This kernel is built for that shape: few rows, so the tile over rows is
one MMA's height; the weight streamed once in [BLOCK_K, BLOCK_N] tiles; and enough programs to keep
every SM reading, by splitting K where the output alone has too few tiles. Whether it beats cuBLAS
is a GPU measurement (`benchmarks.bench_kernels`, the GPU suite's "triton linears" decode rows):
the engine runs it only when asked (`EngineConfig(linear_backend="triton")`).

Tiling. A program owns a tile of BLOCK_M rows by BLOCK_N output columns and one chunk of K
(`split`), and walks the chunk BLOCK_K at a time. Row tiles vary fastest in the grid, so the
programs that read one weight tile run side by side and the second one's read comes from L2.
With one split the program writes the output (plus the bias) itself; with several, each writes an
fp32 partial and a second kernel adds a row's partials in split order, then the bias (cuBLAS's
split-K reduce, but with a fixed order).

Row invariance. The tiles and the split of K come from the weight's shape alone (N, K), never
from the number of rows, and a row's result depends on its own x and the weight only: a request's
projections are bitwise the same alone or beside any other rows, up to MAX_ROWS (what the
paged-attention and confidence kernels already guarantee; cuBLAS does not).

The gated form (`silu_gate=True`) is the MLP's down projection over the stacked gate/up GEMM's
output [M, 2I]: each program computes `silu(gate) * up` of its K chunk as it loads it
(`fused_ops.silu_mul_values`, torch's bits), so the intermediate is never written: one launch
and one pass fewer than `silu_mul` then a GEMM.

Precision: fp16/bf16/fp32 inputs, fp32 accumulation; fp32 inputs use IEEE fp32 dots (not TF32).
Under the Triton interpreter bf16 dots are wrong, so interpreted tiles are upcast to fp32 first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fdllm.kernels import interpreter_enabled
from fdllm.kernels.fused_ops import silu_mul_values

MAX_ROWS = 32  # rows one call takes: past this a GEMM reads the weight once for many rows, cuBLAS's case
BLOCK_M = 16  # rows per tile: one MMA's height (tl.dot's least)
BLOCK_N = 64  # output columns per tile
BLOCK_K = 128  # reduction elements per step of a program's loop
TARGET_PROGRAMS = 256  # split K until the (column tiles x splits) grid is this large: about two per SM on an H100/H200
MIN_K_PER_SPLIT = 256  # a split is worth a program (and its fp32 partial) only above this much K
REDUCE_BLOCK = 256  # output columns per program of the split reduce
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
    HAS_BIAS: tl.constexpr,
    SILU_GATE: tl.constexpr,  # x is [M, 2K]: gate | up, and the product's input is silu(gate) * up
    SPLIT: tl.constexpr,  # write fp32 partials [splits, M, N] for the reduce kernel
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: fp32 tiles before tl.dot
    LIBDEVICE: tl.constexpr,  # the interpreter has no libdevice (the gate's exp)
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if SILU_GATE:
            up = tl.load(x_rows + K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x = silu_mul_values(x, up, LIBDEVICE)
        w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        part = part_ptr + (split * M + rows.to(tl.int64))[:, None] * N + cols[None, :]
        tl.store(part, acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _split_reduce_kernel(part_ptr, b_ptr, y_ptr, M, N, stride_ym, num_splits, HAS_BIAS: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):  # in split order: the same sum for a row whatever the call's rows
        acc += tl.load(part_ptr + (s * M + row) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)


class SplitPlan(NamedTuple):
    """How a weight's K is cut: from the weight's shape alone (row invariance)."""

    num_splits: int
    k_per_split: int


def split_plan(N: int, K: int, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
               target_programs: int = TARGET_PROGRAMS) -> SplitPlan:
    """Split K while the output's column tiles alone are fewer than `target_programs` programs (a Qwen2.5-1.5B
    o projection has 24), in chunks of whole `block_k` steps and at least MIN_K_PER_SPLIT."""
    tiles = triton.cdiv(N, block_n)
    splits = max(1, min(triton.cdiv(target_programs, tiles), K // MIN_K_PER_SPLIT))
    k_per_split = max(block_k, triton.cdiv(triton.cdiv(K, splits), block_k) * block_k)
    return SplitPlan(max(1, triton.cdiv(K, k_per_split)), k_per_split)


def fits(x: Tensor, weight: Tensor) -> bool:
    """Whether `skinny_linear` takes this call: at most MAX_ROWS rows, a plain (not quantized) weight of
    x's dtype, on CUDA or under the interpreter. The model's fused forward asks before each call."""
    return (x.numel() <= MAX_ROWS * x.shape[-1] and type(weight) in (Tensor, torch.nn.Parameter)
            and weight.dtype == x.dtype and x.dtype in _DTYPES
            and (x.device.type == "cuda" or interpreter_enabled()))


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, silu_gate: bool = False,
                  block_n: int = BLOCK_N, block_k: int = BLOCK_K, target_programs: int = TARGET_PROGRAMS) -> Tensor:
    """`F.linear(x, weight, bias)` for x [..., K] of at most MAX_ROWS rows, weight [N, K], bias [N];
    with `silu_gate`, x is [..., 2K] (gate | up, the stacked gate/up GEMM's output) and the result is
    `F.linear(F.silu(gate) * up, weight, bias)`. One launch (two where K is split). Not torch's bits
    (another summation order); a row's result never depends on the other rows. `block_n`, `block_k`,
    `target_programs`: the tuning constants (powers of two, `block_k` >= 16), for benchmarks; any fixed values
    keep rows invariant."""
    K = weight.shape[-1]
    width = 2 * K if silu_gate else K
    if weight.dim() != 2 or x.shape[-1] != width:
        raise ValueError(f"x [..., {width}] and weight [N, {K}] expected{' (silu_gate: x is gate | up)' * silu_gate}, "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and (bias.shape != (N,) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [{N}] in the weight's dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if not fits(x, weight):
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows of {_DTYPES} with a plain weight of x's dtype, "
                         f"on CUDA (or under TRITON_INTERPRET=1); got {x.numel() // max(x.shape[-1], 1)} rows of "
                         f"{x.dtype}, a {type(weight).__name__} weight of {weight.dtype}, on {x.device}")
    x2 = x.reshape(math.prod(x.shape[:-1]), width)  # not -1: K may be 0
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        plan = split_plan(N, K, block_n, block_k, target_programs)
        split = plan.num_splits > 1
        part = torch.empty((plan.num_splits, M, N), dtype=torch.float32, device=x.device) if split else y
        b = bias if bias is not None else y  # unread without a bias
        _skinny_linear_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, block_n), plan.num_splits)](
            x2, w, b, y, part, M, N, K, x2.stride(0), w.stride(0), y.stride(0), plan.k_per_split,
            HAS_BIAS=bias is not None, SILU_GATE=silu_gate, SPLIT=split,
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
            UPCAST=interpreter_enabled(), LIBDEVICE=not interpreter_enabled(),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=4, enable_fp_fusion=False,  # the gate's bits (fused_ops' module doc)
        )
        if split:
            _split_reduce_kernel[(M, triton.cdiv(N, REDUCE_BLOCK))](
                part, b, y, M, N, y.stride(0), plan.num_splits, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK,
                num_warps=2,
            )
    return y.view(*x.shape[:-1], N)
