"""Triton kernels for a decoder layer's elementwise work: RMSNorm (with the residual add before it), RoPE
(with the K/V cache write after it), the K/V cache write, the MLP's SiLU gate.

Why: in eager torch a layer's RMSNorm is ~7 kernels (upcast, square, mean, add, rsqrt, two
multiplies) and RoPE ~5 per tensor (negate, concat, two multiplies, add). Inside a CUDA graph each
small kernel still costs a few microseconds, and at batch 1 a Qwen2.5-1.5B decode step ran ~1100 of
them (~39 per layer): 4.0 ms per step on an H200 against 0.64 ms to read the weights. These
kernels take a layer's norms and rope from ~24 launches to 3, its two residual adds into the norms
after them (`add_rms_norm`), its K/V cache writes from two launches to one (`store_kv`), and in the
engine's forward into the RoPE launch (`rope_store_kv`: q and k rotated, k and v stored), and the
MLP's `silu(gate) * up` from two launches to one that reads the stacked gate/up GEMM's output once
(`silu_mul`: at batch 64 x 32 tokens the unfused pair was 2.9 of a 1.5B step's 14 ms of kernels on
the H200, its strided halves running torch's slow non-vectorised elementwise path).

Inference only (no backward): `fdllm.model` uses them when a forward asks (`fused=True`, what the
engine's runner does with the Triton attention backend) and `fdllm.cache` when built with
`fused_writes` (the same engines), never in training.

Numerics. RMSNorm follows HF's order: normalise in fp32, round to the input's dtype, then multiply
by the weight in the promoted dtype; only the mean's summation order differs from torch's. RoPE
rounds each product and the sum to the input dtype as eager torch does (`x * cos + rotated * sin`
in bf16 is three roundings), so it gives torch's bits in every dtype. That needs its launch to turn
off Triton's FP fusion: with it on, LLVM reads "fp32 product rounded to bf16, then added" as a bf16
multiply and a bf16 add and contracts them into one `fma.rn.bf16` (one rounding where torch has two;
an H200 run's RoPE test caught it, and the compile test now reads the PTX for it).
`silu_mul` computes torch's CUDA SiLU (`x / (1 + exp(-x))` in fp32 with libdevice's `expf` and an IEEE
division, as nvcc compiles torch's kernel without fast math), rounds it to the dtype, then multiplies
as torch's `*` does: torch's bits on a GPU (the interpreter's numpy `exp` may differ by an fp32 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from fdllm.kernels import interpreter_enabled


@triton.jit
def _rms_norm_row(x, w_ptr, o_row, offs, ok, D, eps, X_DTYPE: tl.constexpr):
    """Store the norm of one row `x` (fp32 values of X_DTYPE) at `o_row`."""
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)  # torch's rsqrt on CUDA: the same instruction
    normed = (x * inv).to(X_DTYPE).to(tl.float32)  # HF: x32 * rsqrt(...) back in x's dtype
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_row + offs, (w * normed).to(o_row.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, stride_x, stride_o, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    _rms_norm_row(x, w_ptr, o_ptr + row * stride_o, offs, ok, D, eps, x_ptr.dtype.element_ty)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, s_ptr, o_ptr, stride_x, stride_d, stride_s, stride_o, D, eps,
                         BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    dt = s_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0).to(tl.float32)
    s = (x + d).to(dt)  # torch's x + delta: the exact sum, rounded once to the dtype
    tl.store(s_ptr + row * stride_s + offs, s, mask=ok)
    _rms_norm_row(s.to(tl.float32), w_ptr, o_ptr + row * stride_o, offs, ok, D, eps, dt)


def _rows(x: Tensor, weight: Tensor | None = None) -> Tensor:
    """x as [R, D] rows with a unit column stride (a view where it can be)."""
    D = x.shape[-1]
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"weight must be [{D}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, D)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_alike(**two: Tensor) -> None:
    """Two operands of one elementwise kernel share a shape and a dtype."""
    (na, a), (nb, b) = two.items()
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{na} and {nb} must share a shape and dtype, got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(b.shape)} {b.dtype}")


def _launch(D: int) -> dict[str, int]:
    block = triton.next_power_of_2(D)
    return {"BLOCK_D": block, "num_warps": min(16, max(1, block // 256))}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)` over the last dim, one program per row."""
    x2 = _rows(x, weight)
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), x2.shape[1], eps,
                                         **_launch(x2.shape[1]))
    return out.view(x.shape)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + delta, `rms_norm` of it) in one launch: a decoder layer's residual add and the norm after it
    (vLLM's fused_add_rms_norm). The sum is torch's bit for bit, so the residual stream is unchanged."""
    _check_alike(x=x, delta=delta)
    x2, d2 = _rows(x, weight), _rows(delta, weight)
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, d2, weight, total, out, x2.stride(0), d2.stride(0), total.stride(0),
                                             out.stride(0), x2.shape[1], eps, **_launch(x2.shape[1]))
    return total.view(x.shape), out.view(x.shape)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, stride_g, stride_u, stride_o, N, BLOCK: tl.constexpr,
                     LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0)
    tl.store(o_ptr + row * stride_o + offs, silu_mul_values(g, u, LIBDEVICE), mask=ok)


@triton.jit
def silu_mul_values(g, u, LIBDEVICE: tl.constexpr):
    """`F.silu(g) * u` of loaded tiles, in their dtype with torch's CUDA bits (module doc); also the
    prologue of `fdllm.kernels.linear`'s gated down projection. The launch needs enable_fp_fusion=False."""
    dt = g.dtype
    g, u = g.to(tl.float32), u.to(tl.float32)
    e = libdevice.exp(-g) if LIBDEVICE else tl.exp(-g)  # the interpreter has no libdevice
    silu = tl.math.div_rn(g, 1.0 + e).to(dt).to(tl.float32)  # torch's F.silu, rounded to the dtype
    return (silu * u).to(dt)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """`F.silu(gate) * up` in one launch (vLLM's silu_and_mul): gate and up [..., I] in one dtype, each
    with a unit last stride (the halves of the stacked gate/up GEMM's output qualify, read in place)."""
    _check_alike(gate=gate, up=up)
    g2, u2 = _rows(gate), _rows(up)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    R, N = g2.shape
    block = min(1024, triton.next_power_of_2(max(N, 1)))
    if R and N:
        _silu_mul_kernel[(R, triton.cdiv(N, block))](g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), N,
                                                     BLOCK=block, LIBDEVICE=not interpreter_enabled(), num_warps=4,
                                                     enable_fp_fusion=False)
    return out.view(gate.shape)


@triton.jit
def _rotated_halves(x_row, cos_ptr, sin_ptr, t, stride_ct, offs, ok, HALF: tl.constexpr):
    """The two halves of token t's RoPE'd heads at `x_row` ([heads, 1] pointers; [heads, half] tiles, in x's
    dtype): x * cos + cat(-x2, x1) * sin with each product and the sum rounded to x's dtype as eager torch
    rounds them: fp32 arithmetic, an explicit rounding after each step, and the launch's enable_fp_fusion=False
    (`_rope_launch`) so the compiler cannot contract a product into the sum (module doc)."""
    f32 = tl.float32
    x1 = tl.load(x_row + offs, mask=ok, other=0.0)
    dt = x1.dtype
    x1 = x1.to(f32)
    x2 = tl.load(x_row + HALF + offs, mask=ok, other=0.0).to(f32)
    c_row, s_row = cos_ptr + t * stride_ct, sin_ptr + t * stride_ct
    in_half = offs < HALF
    c1, c2 = tl.load(c_row + offs, mask=in_half, other=0.0).to(f32), tl.load(c_row + HALF + offs, mask=in_half, other=0.0).to(f32)
    s1, s2 = tl.load(s_row + offs, mask=in_half, other=0.0).to(f32), tl.load(s_row + HALF + offs, mask=in_half, other=0.0).to(f32)
    out1 = ((x1 * c1).to(dt).to(f32) + (-x2 * s1).to(dt).to(f32)).to(dt)
    out2 = ((x2 * c2).to(dt).to(f32) + (x1 * s2).to(dt).to(f32)).to(dt)
    return out1, out2


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, o_ptr, stride_xt, stride_xn, stride_ct, stride_ot, stride_on, n_heads,
                 HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # one token, all its heads: cos/sin read once, and few programs
    heads = tl.arange(0, BLOCK_N)[:, None]
    offs = tl.arange(0, BLOCK)[None, :]
    ok = (heads < n_heads) & (offs < HALF)
    out1, out2 = _rotated_halves(x_ptr + t * stride_xt + heads * stride_xn, cos_ptr, sin_ptr, t, stride_ct, offs, ok, HALF)
    o_row = o_ptr + t * stride_ot + heads * stride_on
    tl.store(o_row + offs, out1, mask=ok)
    tl.store(o_row + HALF + offs, out2, mask=ok)


def apply_rope_fused(x_BTnH: Tensor, cos_BTH: Tensor, sin_BTH: Tensor) -> Tensor:
    """`fdllm.model.apply_rope` in one launch: x [B, T, n, H], cos/sin [B, T, H] in x's dtype."""
    B, T, n, H = x_BTnH.shape
    if cos_BTH.dtype != x_BTnH.dtype or sin_BTH.dtype != x_BTnH.dtype:
        raise TypeError(f"cos/sin must be in x's dtype {x_BTnH.dtype}, got {cos_BTH.dtype}, {sin_BTH.dtype}")
    if H % 2:
        raise ValueError(f"head dim must be even, got {H}")
    x = x_BTnH.reshape(B * T, n, H)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (c.expand(B, T, H).reshape(B * T, H).contiguous() for c in (cos_BTH, sin_BTH))
    out = torch.empty((B * T, n, H), dtype=x.dtype, device=x.device)
    if B * T and n:
        _rope_kernel[(B * T,)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1), n,
                               **_rope_launch(n, H))
    return out.view(B, T, n, H)


def _rope_launch(n_heads: int, H: int) -> dict[str, int | bool]:
    """Tiles and options of a RoPE launch (one program a token over its `n_heads` rotated heads): FP fusion
    off, so the roundings stay torch's (module doc)."""
    block_n, block = triton.next_power_of_2(n_heads), triton.next_power_of_2(H // 2)
    return {"HALF": H // 2, "BLOCK": block, "BLOCK_N": block_n, "num_warps": min(8, max(1, block_n * block // 256)),
            "enable_fp_fusion": False}


@triton.jit
def _rope_store_kv_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, slots_ptr, kc_ptr, vc_ptr, stride_xt, stride_xn, stride_ct,
                          stride_qt, stride_qn, stride_cs, stride_cn, n_q, n_kv, H,
                          HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KV: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    x_tok = x_ptr + t * stride_xt
    slot = tl.load(slots_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_N)[:, None]  # q heads, then k heads: rotated together as `_rope_kernel` does
    offs = tl.arange(0, BLOCK)[None, :]
    ok = (heads < n_q + n_kv) & (offs < HALF)
    out1, out2 = _rotated_halves(x_tok + heads * stride_xn, cos_ptr, sin_ptr, t, stride_ct, offs, ok, HALF)
    is_q = heads < n_q
    q_row = q_ptr + t * stride_qt + heads * stride_qn
    tl.store(q_row + offs, out1, mask=ok & is_q)
    tl.store(q_row + HALF + offs, out2, mask=ok & is_q)
    k_row = kc_ptr + slot * stride_cs + (heads - n_q) * stride_cn  # masked where the head is a query head
    tl.store(k_row + offs, out1, mask=ok & ~is_q)
    tl.store(k_row + HALF + offs, out2, mask=ok & ~is_q)
    v_heads = tl.arange(0, BLOCK_KV)[:, None]
    offs_h = tl.arange(0, BLOCK_H)[None, :]
    v_ok = (v_heads < n_kv) & (offs_h < H)
    v = tl.load(x_tok + (n_q + n_kv + v_heads) * stride_xn + offs_h, mask=v_ok)
    tl.store(vc_ptr + slot * stride_cs + v_heads * stride_cn + offs_h, v, mask=v_ok)


def rope_store_kv(qkv_TnH: Tensor, cos_TH: Tensor, sin_TH: Tensor, n_q: int, k_cache_SKH: Tensor, v_cache_SKH: Tensor,
                  slots_T: Tensor) -> Tensor:
    """`apply_rope_fused` of the q and k heads of a stacked q/k/v projection, then `store_kv` of k and v, in one
    launch: the rotated q [T, n_q, H] comes back, k never leaves the kernel but into the cache. The same bits
    as the two kernels (one rotation helper). qkv [T, n_q + 2K, H] with a unit head-dim stride (the stacked
    GEMM's output), cos/sin [T, H] in its dtype, caches [slots, K, H] in its dtype, slots [T] int64."""
    T, n, H = qkv_TnH.shape
    n_kv = (n - n_q) // 2
    if n_q < 1 or n != n_q + 2 * n_kv or n_kv < 1 or H % 2:
        raise ValueError(f"qkv [T, n_q + 2K, H] with an even H expected for n_q={n_q}, got {tuple(qkv_TnH.shape)}")
    if cos_TH.shape != (T, H) or sin_TH.shape != (T, H) or len({cos_TH.dtype, sin_TH.dtype, qkv_TnH.dtype}) != 1:
        raise ValueError(f"cos/sin must be [{T}, {H}] in qkv's dtype {qkv_TnH.dtype}, got {tuple(cos_TH.shape)} "
                         f"{cos_TH.dtype}, {tuple(sin_TH.shape)} {sin_TH.dtype}")
    _check_cache_write(k_cache_SKH, v_cache_SKH, slots_T, T, n_kv, H, qkv_TnH)
    cos, sin = cos_TH.contiguous(), sin_TH.contiguous()
    q = torch.empty((T, n_q, H), dtype=qkv_TnH.dtype, device=qkv_TnH.device)
    if T:
        _rope_store_kv_kernel[(T,)](
            qkv_TnH, cos, sin, q, slots_T, k_cache_SKH, v_cache_SKH, qkv_TnH.stride(0), qkv_TnH.stride(1), cos.stride(0),
            q.stride(0), q.stride(1), k_cache_SKH.stride(0), k_cache_SKH.stride(1), n_q, n_kv, H,
            BLOCK_KV=triton.next_power_of_2(n_kv), BLOCK_H=triton.next_power_of_2(H), **_rope_launch(n_q + n_kv, H),
        )
    return q


def _check_cache_write(k_cache_SKH: Tensor, v_cache_SKH: Tensor, slots_T: Tensor, T: int, K: int, H: int,
                       *sources: Tensor) -> None:
    """What a K/V cache write needs: caches [slots, K, H] of one layout, slots int64 [T], one dtype throughout,
    unit head-dim strides."""
    if k_cache_SKH.shape[1:] != (K, H) or v_cache_SKH.shape != k_cache_SKH.shape:
        raise ValueError(f"k/v of {K} heads x {H} do not fit caches {tuple(k_cache_SKH.shape)}, {tuple(v_cache_SKH.shape)}")
    if slots_T.shape != (T,) or slots_T.dtype != torch.int64:
        raise ValueError(f"slots must be int64 [{T}], got {slots_T.dtype} {tuple(slots_T.shape)}")
    if len({x.dtype for x in (*sources, k_cache_SKH, v_cache_SKH)}) != 1:
        raise TypeError(f"k, v and the caches must share a dtype, got {[x.dtype for x in (*sources, k_cache_SKH)]}")
    if any(x.stride(-1) != 1 for x in (*sources, k_cache_SKH, v_cache_SKH)) or k_cache_SKH.stride() != v_cache_SKH.stride():
        raise ValueError("k, v and the caches need a unit head-dim stride, and the caches one layout")


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, slots_ptr, kc_ptr, vc_ptr, stride_kt, stride_kn, stride_vt, stride_vn,
                     stride_cs, stride_cn, H, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    dst = tl.load(slots_ptr + t).to(tl.int64) * stride_cs + n * stride_cn + offs
    tl.store(kc_ptr + dst, tl.load(k_ptr + t * stride_kt + n * stride_kn + offs, mask=ok), mask=ok)
    tl.store(vc_ptr + dst, tl.load(v_ptr + t * stride_vt + n * stride_vn + offs, mask=ok), mask=ok)


def store_kv(k_cache_SKH: Tensor, v_cache_SKH: Tensor, slots_T: Tensor, k_TKH: Tensor, v_TKH: Tensor) -> None:
    """`k_cache[slots] = k` and `v_cache[slots] = v` in one launch (a layer's two `index_copy_`): caches
    [slots, K, H], k/v [T, K, H] in the caches' dtype with a unit head-dim stride (the views of the stacked
    q/k/v GEMM's output qualify), slots [T] int64 (a repeated slot, padding's scratch, gets one of its values)."""
    T, K, H = k_TKH.shape
    if v_TKH.shape != (T, K, H):
        raise ValueError(f"k {tuple(k_TKH.shape)} and v {tuple(v_TKH.shape)} differ")
    _check_cache_write(k_cache_SKH, v_cache_SKH, slots_T, T, K, H, k_TKH, v_TKH)
    if T and K:
        _store_kv_kernel[(T, K)](k_TKH, v_TKH, slots_T, k_cache_SKH, v_cache_SKH, k_TKH.stride(0), k_TKH.stride(1),
                                 v_TKH.stride(0), v_TKH.stride(1), k_cache_SKH.stride(0), k_cache_SKH.stride(1), H,
                                 BLOCK_H=triton.next_power_of_2(H), num_warps=1)
