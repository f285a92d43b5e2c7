"""A Qwen2/Llama-family decoder with pluggable attention, weight-compatible with HF transformers.

One forward serves training (dense boolean mask or flex_attention BlockMask over the two-stream
input) and inference (a `CachedAttention` backend that reads and writes the paged KV cache).
Module and parameter names mirror HF's (`model.layers.N.self_attn.q_proj.weight`, ...), so
checkpoints load and save without a name map (see `fdllm.loader`).

Shape legend: B batch, T tokens, D model dim, N query heads, K kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdllm.config import ModelConfig
from fdllm.kernels import LINEAR_BACKENDS
from fdllm.masks import StreamMasks

try:  # flex_attention is the sparse GPU training path; the dense mask works everywhere
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch builds without flex_attention
    BlockMask, flex_attention = None, None


class CachedAttention(Protocol):
    """Attention over a KV cache, supplied by the inference engine.

    Called once per layer with the current tokens' projected (and rotated) q/k/v; it stores k/v
    where the cache keeps them and returns the attention output for the queries. The engine's also
    offer `rotate_and_attend(layer, qkv_BTnH, cos, sin, n_q) -> o_BTNH`: the same from the stacked q/k/v
    projection before RoPE, rotation and K/V write in one kernel; the fused forward calls it where offered.
    """

    def __call__(self, layer: int, q_BTNH: Tensor, k_BTKH: Tensor, v_BTKH: Tensor) -> Tensor:  # o_BTNH
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        if fused:  # one Triton kernel instead of ~7 (fdllm.kernels.fused_ops; inference only)
            from fdllm.kernels.fused_ops import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 as HF does, so bf16 checkpoints match to the last bit.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_norm(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The residual stream `x + delta` and its norm, as one Triton kernel (`fdllm.kernels.fused_ops`,
        inference only: the fused forward's `DecoderLayer.forward_normed`)."""
        from fdllm.kernels.fused_ops import add_rms_norm

        return add_rms_norm(x, delta, self.weight, self.eps)


@functools.cache
def rope_inv_freq(head_dim: int, theta: float, device: torch.device, scaling: tuple[tuple[str, Any], ...] = ()) -> Tensor:
    """RoPE's frequencies [H/2] (fp32), computed once on the CPU as HF's rotary embedding computes them at
    init and then moved: the same bits on every device (a GPU's `pow` may round differently), and none of
    the four kernels their computation takes in every step of a decode graph. `scaling`:
    `ModelConfig.rope_scaling_items`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return scale_rope(inv_freq, dict(scaling)).to(device)


def scale_rope(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Frequencies stretched for a context longer than pretraining's. "linear": every one divided by
    `factor` (positions interpolated). "llama3" (Llama 3.1): only the low frequencies, whose wavelength
    exceeds the original context / low_freq_factor, are divided; the high ones (wavelength under
    context / high_freq_factor), which resolve nearby tokens, are kept; between them a linear blend."""
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    context, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"))
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: low frequency, 1: high
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rope_cos_sin(position_ids_BT: Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: tuple[tuple[str, Any], ...] = ()) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, T, H] for explicit positions (the two-stream input repeats positions)."""
    inv_freq = rope_inv_freq(head_dim, float(theta), position_ids_BT.device, scaling)
    freqs_BTh = position_ids_BT.float()[..., None] * inv_freq  # [B, T, H/2]
    emb_BTH = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
    return emb_BTH.cos().to(dtype), emb_BTH.sin().to(dtype)


def apply_rope(x_BTnH: Tensor, cos_BTH: Tensor, sin_BTH: Tensor, fused: bool = False) -> Tensor:
    """Rotated in the tables' precision, returned in x's: under bf16 autocast the tables are fp32 (the
    residual stream is) and q/k bf16, so q/k/v reach attention in one dtype (what autocast's attention
    would cast them to), not q/k promoted to fp32 beside a bf16 v. `fused`: one Triton kernel (inference,
    tables in x's dtype; torch's bits in 16-bit dtypes)."""
    if fused:
        from fdllm.kernels.fused_ops import apply_rope_fused

        return apply_rope_fused(x_BTnH, cos_BTH, sin_BTH)
    half = x_BTnH.shape[-1] // 2
    rotated = torch.cat((-x_BTnH[..., half:], x_BTnH[..., :half]), dim=-1)
    return (x_BTnH * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]).to(x_BTnH.dtype)


@functools.cache
def _compiled_flex_attention():
    # Unfused flex_attention materialises the full score matrix; compiling fuses it. Compiled once
    # per process, lazily, so importing fdllm never triggers a compile.
    return torch.compile(flex_attention, dynamic=False)


def masked_attention(
    q_BTNH: Tensor, k_BTKH: Tensor, v_BTKH: Tensor, mask: Tensor | "BlockMask" | StreamMasks | None
) -> Tensor:
    """Attention of a whole sequence: causal (mask None), dense bool [B|1, 1, T, T], a BlockMask, or a
    two-stream mask cut by stream (`fdllm.masks.StreamMasks`)."""
    q, k, v = (t.transpose(1, 2) for t in (q_BTNH, k_BTKH, v_BTKH))  # [B, n, T, H]
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif BlockMask is not None and isinstance(mask, BlockMask):
        flex = flex_attention if q.device.type == "cpu" else _compiled_flex_attention()
        o = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    elif isinstance(mask, StreamMasks):
        o = _attention_by_stream(q, k, v, mask, gqa)
    else:
        if mask.dtype != torch.bool:
            raise TypeError(f"dense attention masks must be boolean (True = may attend), got {mask.dtype}")
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return o.transpose(1, 2)


def _attention_by_stream(q: Tensor, k: Tensor, v: Tensor, masks: StreamMasks, gqa: bool) -> Tensor:
    """[B, heads, S*M + L, H] attention where each noisy stream (M tokens: L, or fewer once compacted)
    sees only itself and the clean stream."""
    n = masks.noisy[0].shape[-2]
    sizes = [n] * masks.noisy_streams + [q.shape[2] - n * masks.noisy_streams]
    qs, ks, vs = (t.split(sizes, dim=2) for t in (q, k, v))
    outs = [F.scaled_dot_product_attention(qs[s], torch.cat([ks[s], ks[-1]], 2), torch.cat([vs[s], vs[-1]], 2),
                                           attn_mask=mask, enable_gqa=gqa) for s, mask in enumerate(masks.noisy)]
    outs.append(F.scaled_dot_product_attention(qs[-1], ks[-1], vs[-1], attn_mask=masks.clean, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str, silu_gate: bool = False) -> Tensor:
    """A GEMM of the fused forward: `fdllm.kernels.linear.skinny_linear` with the "triton" backend where it
    takes the call (a decode step's few rows, a plain weight), else torch's. `silu_gate`: x is the stacked
    gate/up output and the product is of `silu(gate) * up` (in the Triton GEMM's prologue, or one kernel first)."""
    if backend == "triton":
        from fdllm.kernels import linear

        if linear.fits(x, weight):
            return linear.skinny_linear(x, weight, bias, silu_gate=silu_gate)
    if silu_gate:
        from fdllm.kernels.fused_ops import silu_mul

        x = silu_mul(*x.chunk(2, dim=-1))
    return F.linear(x, weight, bias)


class FusedLinears:
    """Linears that read one input, as one GEMM: their weights (and biases) stacked into one, each linear's
    weight becoming a view of it, so memory stays the same and state_dict keeps HF's names. While the
    linears hold those views it multiplies by the stack; once they have weights of their own again
    (quantized in place, say) the stack is stale and each linear runs as it is."""

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.backend = "torch"  # the GEMM's (`fused_linear`): `Transformer.fuse_projections` sets it
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        self.bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
        self.sizes = [lin.weight.shape[0] for lin in linears]
        row = 0
        for lin, n in zip(linears, self.sizes):
            lin.weight.data = self.weight[row : row + n]  # the separate copy is freed
            if self.bias is not None:
                lin.bias.data = self.bias[row : row + n]
            row += n
        self._views = [(lin.weight, lin.weight.data_ptr()) for lin in linears]

    @property
    def valid(self) -> bool:
        # the same Parameter objects (quantize_ installs new ones), still over the stacked storage
        return all(lin.weight is param and param.data_ptr() == ptr for lin, (param, ptr) in zip(self.linears, self._views))

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        if not self.valid:
            return tuple(lin(x) for lin in self.linears)
        return self.stacked(x).split(self.sizes, dim=-1)

    def stacked(self, x: Tensor) -> Tensor:
        """The linears' outputs side by side in one tensor [..., sum of their sizes] (only while `valid`)."""
        return fused_linear(x, self.weight, self.bias, self.backend)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.dim_per_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        # Qwen2 puts biases on q/k/v only; Llama's attention_bias covers o_proj too.
        o_bias = cfg.qkv_bias and cfg.model_type == "llama"
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=o_bias)
        self.qkv: FusedLinears | None = None  # `Transformer.fuse_projections`: one GEMM for q/k/v

    def _stacked_qkv(self, x_BTD: Tensor) -> Tensor:
        """The one q/k/v GEMM's output [B, T, N + 2K, H], heads unrotated (after `Transformer.fuse_projections`)."""
        B, T, _ = x_BTD.shape
        return self.qkv.stacked(x_BTD).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)

    def _rotated_qkv(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
        """q and k rotated, and v, as [B, T, heads, H]. Fused, after `Transformer.fuse_projections`, q and k
        are adjacent heads of the one GEMM's output, rotated together: one launch."""
        B, T, _ = x_BTD.shape
        N, K, H = self.n_heads, self.n_kv, self.head_dim
        if fused and self.qkv is not None and self.qkv.valid:
            qkv_BTnH = self._stacked_qkv(x_BTD)
            qk_BTnH = apply_rope(qkv_BTnH[:, :, : N + K], cos, sin, fused=True)
            return qk_BTnH[:, :, :N], qk_BTnH[:, :, N:], qkv_BTnH[:, :, N + K :]
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        return (apply_rope(q.view(B, T, N, H), cos, sin, fused), apply_rope(k.view(B, T, K, H), cos, sin, fused),
                v.view(B, T, K, H))

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, mask, cache: CachedAttention | None,
                fused: bool = False) -> Tensor:
        B, T, _ = x_BTD.shape
        if fused and self.qkv is not None and self.qkv.valid and hasattr(cache, "rotate_and_attend"):
            o_BTNH = cache.rotate_and_attend(self.layer, self._stacked_qkv(x_BTD), cos, sin, self.n_heads)
        elif cache is not None:
            o_BTNH = cache(self.layer, *self._rotated_qkv(x_BTD, cos, sin, fused))
        else:
            o_BTNH = masked_attention(*self._rotated_qkv(x_BTD, cos, sin, fused), mask)
        o_BTD = o_BTNH.reshape(B, T, -1)
        if fused and self.qkv is not None:  # `fuse_projections` chose the GEMM backend
            return fused_linear(o_BTD, self.o_proj.weight, self.o_proj.bias, self.qkv.backend)
        return self.o_proj(o_BTD)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up: FusedLinears | None = None  # `Transformer.fuse_projections`: one GEMM for gate/up

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        """`fused`: gate/up as one GEMM (after `Transformer.fuse_projections`) and SiLU x up as one Triton
        kernel reading its halves in place (`fdllm.kernels.fused_ops.silu_mul`), or, with the Triton GEMM,
        in the down projection's prologue (`fdllm.kernels.linear`); inference only."""
        if not fused:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.gate_up is not None and self.gate_up.valid:
            down = self.down_proj
            return fused_linear(self.gate_up.stacked(x), down.weight, down.bias, self.gate_up.backend, silu_gate=True)
        from fdllm.kernels.fused_ops import silu_mul

        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache: CachedAttention | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_normed(self, x: Tensor, h: Tensor, cos: Tensor, sin: Tensor, mask, cache: CachedAttention | None,
                       next_norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """`forward` of `x` on the fused kernels, given its input norm `h` (the previous layer made it) and
        returning `next_norm` of the output beside it: each residual add is one kernel with the norm after it."""
        x, h = self.post_attention_layernorm.add_norm(x, self.self_attn(h, cos, sin, mask, cache, fused=True))
        return next_norm.add_norm(x, self.mlp(h, fused=True))


class DecoderStack(nn.Module):
    """Embedding, layers and final norm: HF's `model.*` submodule."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """The decoder with its LM head. `forward` -> logits; `hidden` -> final normed hidden states."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # HF's initializer_range (0.02), so a model pretrained from scratch here trains like theirs.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        mask: Tensor | "BlockMask" | None = None,
        cache: CachedAttention | None = None,
        fused: bool = False,
    ) -> Tensor:
        """Final hidden states [B, T, D] of tokens [B, T].

        position_ids [B|1, T] default to 0..T-1. Attention: `cache` (inference backend) if given,
        else `mask`: None = causal, dense bool [B|1, 1, T, T] (True = may attend), or a BlockMask.
        `fused`: RMSNorm (each with the residual add before it), RoPE and the MLP's SiLU gate as Triton kernels
        (`fdllm.kernels.fused_ops`: CUDA, or the Triton interpreter; no backward, so inference only),
        and q/k/v and gate/up as one GEMM each once `fuse_projections` ran: the engine's runner asks
        with its Triton backend.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        position_ids = position_ids.expand(B, T)
        x_BTD = self.model.embed_tokens(input_ids)
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, cfg.dim_per_head, cfg.rope_theta, x_BTD.dtype, cfg.rope_scaling_items)
        if not fused:
            for layer in self.model.layers:
                x_BTD = layer(x_BTD, cos, sin, mask, cache)
            return self.model.norm(x_BTD)
        norms = [layer.input_layernorm for layer in self.model.layers] + [self.model.norm]
        h_BTD = norms[0](x_BTD, fused=True)
        for layer, next_norm in zip(self.model.layers, norms[1:]):
            x_BTD, h_BTD = layer.forward_normed(x_BTD, h_BTD, cos, sin, mask, cache, next_norm)
        return h_BTD

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        mask: Tensor | "BlockMask" | None = None,
        cache: CachedAttention | None = None,
        logit_positions: slice | Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T', V] for the positions selected by `logit_positions` (all by default: T' = T);
        other arguments as in `hidden`. Selecting skips the LM head where no logit is needed."""
        h_BTD = self.hidden(input_ids, position_ids, mask, cache)
        if logit_positions is not None:
            h_BTD = h_BTD[:, logit_positions]
        return self.lm_head(h_BTD)

    def fuse_projections(self, linear_backend: str = "torch") -> None:
        """Stack q/k/v and gate/up into one weight each (`FusedLinears`), for `hidden(fused=True)`: a
        batch-1 decode step multiplies by seven small weights a layer, each its own GEMV (about 2 TB/s
        of the H200's 4.8 on the first GPU run), four after this. `linear_backend`: the fused forward's
        GEMMs ("torch", or "triton": `fused_linear`; the last call's holds for every engine on this model).
        Idempotent; memory and checkpoint names unchanged."""
        if linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {LINEAR_BACKENDS}, got {linear_backend!r}")
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv is None or not attn.qkv.valid:
                attn.qkv = FusedLinears(attn.q_proj, attn.k_proj, attn.v_proj)
            if mlp.gate_up is None or not mlp.gate_up.valid:
                mlp.gate_up = FusedLinears(mlp.gate_proj, mlp.up_proj)
            attn.qkv.backend = mlp.gate_up.backend = linear_backend

    def unfuse_projections(self) -> None:
        """Forget the stacked weights (after the linears got new weights of their own: quantized in place),
        so their memory goes."""
        for layer in self.model.layers:
            layer.self_attn.qkv = layer.mlp.gate_up = None

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def resize_token_embeddings(self, vocab_size: int, init_rows: Tensor | None = None) -> None:
        """Grow (never shrink) the vocabulary; new rows start at `init_rows` [n, D] or the mean row."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        if vocab_size == old:
            return
        emb = self.model.embed_tokens.weight.data
        fill = init_rows if init_rows is not None else emb.mean(0, keepdim=True).expand(vocab_size - old, -1)
        new_emb = nn.Embedding(vocab_size, emb.shape[1], device=emb.device, dtype=emb.dtype)
        new_emb.weight.data = torch.cat([emb, fill.to(emb)], 0)
        self.model.embed_tokens = new_emb
        if self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(emb.shape[1], vocab_size, bias=False, device=emb.device, dtype=emb.dtype)
            self.lm_head.weight = new_emb.weight
        else:
            head = self.lm_head.weight.data
            new_head = nn.Linear(head.shape[1], vocab_size, bias=False, device=head.device, dtype=head.dtype)
            new_head.weight.data = torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - old, -1)], 0)
            self.lm_head = new_head
        self.config.vocab_size = vocab_size

    def save_pretrained(self, path: str | Path, max_shard_size: int = 4 << 30) -> None:
        """Write an HF checkpoint dir: config.json, the generation_config.json the model was loaded with,
        and safetensors (sharded above max_shard_size bytes). A model an engine quantized in place is refused."""
        from fdllm.loader import save_checkpoint

        save_checkpoint(self, path, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
    ) -> "Transformer":
        """Load an HF Qwen2/Llama checkpoint dir; dtype None keeps the checkpoint's."""
        from fdllm.loader import load_checkpoint

        return load_checkpoint(cls, path, dtype=dtype, device=device)


def load_model(path: str | Path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Load an HF-format Qwen2/Llama checkpoint dir as an fdllm `Transformer` (`fdllm.load_model`)."""
    return Transformer.from_pretrained(path, dtype=dtype, device=device)
