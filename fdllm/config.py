"""Configurations: the decoder's architecture (`ModelConfig`, read from / written to HF `config.json`)
and the block-diffusion settings (`BlockDiffusionConfig`, saved beside it as `fdllm_config.json`).

Both are keyword-only dataclasses that validate in `__post_init__` and never rewrite a field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The label of a position that carries no loss (torch's cross-entropy default): the data pipeline writes
# it, the objective skips it; kept in this torch-free module for the pipeline's processes.
IGNORE_INDEX = -100
CONFIG_NAME = "config.json"  # the HF architecture
BLOCK_CONFIG_NAME = "fdllm_config.json"
# The vendor's decoding defaults and end tokens, beside config.json (transformers' generate and vLLM read it)
GENERATION_CONFIG_NAME = "generation_config.json"
# How the clean stream (prompt and committed blocks) attends: "block_causal" (docs/method.md §2.4,
# bidirectional inside a block) or "causal" (the joint AR + diffusion objective, §5: prefix K/V are
# then the same in diffusion and AR mode).
PREFIX_ATTENTIONS = ("block_causal", "causal")

# HF `model_type` -> the architecture name written back into config.json.
SUPPORTED_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# RoPE scalings (HF's `rope_type`) and the parameters each needs: Llama 3.1+ checkpoints carry "llama3",
# older long-context fine-tunes "linear". Others (dynamic NTK, YaRN, LongRoPE) are refused, not ignored.
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a Qwen2/Llama-family decoder, field names as in HF `config.json`."""

    model_type: str = "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; else {"rope_type": a ROPE_SCALINGS key, its parameters}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # Llama: biases on q/k/v/o (None: none); Qwen2 has q/k/v biases whatever it says
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # generation_config.json as the checkpoint had it (None: none), never part of config.json: written back
    # beside it, so that an export keeps its base's end tokens and sampling defaults
    generation_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: fdllm implements "
                f"{sorted(SUPPORTED_ARCHITECTURES)} (Qwen2 and Llama families)"
            )
        kv = self.n_kv_heads
        if self.num_attention_heads % kv:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({kv})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is unset")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.generation_config is not None:
            eos = self.generation_config.get("eos_token_id")
            if not (eos is None or is_int(eos) or isinstance(eos, list) and all(map(is_int, eos))):
                raise ValueError(f"{GENERATION_CONFIG_NAME}'s eos_token_id must be a token id or a list of them, got {eos!r}")

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """HF's Qwen2 always puts biases on q/k/v (its `attention_bias` field is not read); Llama's follow it."""
        return self.model_type == "qwen2" or bool(self.attention_bias)

    @property
    def end_token_ids(self) -> frozenset[int]:
        """The ids that end generation: config.json's eos_token_id and generation_config.json's (an id or a
        list each). transformers' generate and vLLM stop on every id of the latter: Qwen2.5's and Llama 3
        Instruct's config.json name one end token, their generation_config.json all of them."""
        generation_eos = (self.generation_config or {}).get("eos_token_id")
        return frozenset(i for eos in (self.eos_token_id, generation_eos) for i in ([eos] if is_int(eos) else eos or ()))

    @property
    def rope_scaling_items(self) -> tuple[tuple[str, Any], ...]:
        """`rope_scaling`'s type and the parameters it reads, as a hashable key (the frequencies are computed
        once per key; a config's other entries, of any type, are not part of it)."""
        if self.rope_scaling is None:
            return ()
        rope_type = self.rope_scaling["rope_type"]
        return tuple(sorted((k, self.rope_scaling[k]) for k in ("rope_type", *ROPE_SCALINGS[rope_type])))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed HF config.json; unknown keys are ignored, unsupported features refused."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = raw.get("architectures")
            raise ValueError(
                f"unsupported architecture (model_type={model_type!r}, architectures={archs}): "
                f"fdllm loads {sorted(SUPPORTED_ARCHITECTURES)} checkpoints"
            )
        refuse_unsupported_features(raw)
        # transformers 4 writes `rope_scaling` (its type as "type" or "rope_type") and a top-level
        # `rope_theta`; transformers 5 one `rope_parameters` holding both
        rope = raw.get("rope_scaling") or (raw.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        rope_theta = raw.get("rope_theta") or rope.get("rope_theta") or 10000.0
        names = {f.name for f in dataclasses.fields(cls)} - {"generation_config"}  # its own file's
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs["rope_theta"] = float(rope_theta)
        kwargs["rope_scaling"] = None if rope_type == "default" else {
            "rope_type": rope_type, **{k: v for k, v in rope.items() if k not in ("type", "rope_type", "rope_theta")}}
        dtype = raw.get("torch_dtype", raw.get("dtype"))  # transformers 5 writes "dtype"
        kwargs["torch_dtype"] = dtype if isinstance(dtype, str) else "float32"
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"the {model_type} config lacks {', '.join(missing)}: not a complete HF config.json")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["generation_config"]  # its own file (GENERATION_CONFIG_NAME)
        out["num_key_value_heads"] = self.n_kv_heads
        out["head_dim"] = self.dim_per_head
        out["attention_bias"] = self.qkv_bias
        out["architectures"] = [SUPPORTED_ARCHITECTURES[self.model_type]]
        out["hidden_act"] = "silu"
        # transformers >= 5 reads rope_parameters; 4 reads rope_scaling (and 5 prefers it, the same values)
        out["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if self.model_type == "llama":
            out["pretraining_tp"] = 1
        else:
            out["use_sliding_window"] = False
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """config.json, and generation_config.json when the checkpoint has one."""
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise no_config(path)
        config = cls.from_hf_dict(read_json_object(file))
        generation = Path(path) / GENERATION_CONFIG_NAME
        if not generation.is_file():
            return config
        return dataclasses.replace(config, generation_config=read_json_object(generation))


def check_rope_scaling(scaling: dict[str, Any]) -> None:
    """ValueError unless `scaling` is a RoPE scaling this model computes, with the parameters it needs."""
    rope_type = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling {rope_type!r} is not supported (fdllm computes plain RoPE and the scalings "
                         f"{sorted(ROPE_SCALINGS)}; rope_scaling={scaling!r})")
    for key in ROPE_SCALINGS[rope_type]:
        value = scaling.get(key)
        if not is_finite_number(value) or value <= 0:
            raise ValueError(f"rope scaling {rope_type!r} needs {key} > 0, got {value!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"rope scaling 'llama3' needs high_freq_factor > low_freq_factor, got {scaling!r}")


def refuse_unsupported_features(raw: dict[str, Any]) -> None:
    """ValueError for a config.json feature the model would otherwise run without, silently wrong: an
    activation other than SiLU, Qwen2's sliding-window layers, weights stored pre-quantized."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported: fdllm's MLP is SwiGLU with SiLU (Qwen2, Llama)")
    layer_types = raw.get("layer_types")  # transformers 5 writes each layer's attention out
    if layer_types is not None:
        sliding = "sliding_attention" in layer_types
    else:  # transformers 4: layers from max_window_layers on slide when use_sliding_window is set
        sliding = bool(raw.get("use_sliding_window")) and raw.get("sliding_window") is not None and \
            raw.get("num_hidden_layers", 0) > (raw.get("max_window_layers") or 0)
    if sliding:
        raise ValueError(f"sliding-window attention (window {raw.get('sliding_window')}) is not supported: fdllm's "
                         "layers attend to the whole context, and would differ from the checkpoint's past the window")
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(f"pre-quantized checkpoint (quantization_config: quant_method={method!r}): fdllm loads "
                         "float32/bfloat16/float16 weights and quantizes them at load, EngineConfig(quantization=...)")


def read_json_object(file: Path) -> dict[str, Any]:
    """A checkpoint's JSON config file; a ValueError naming the file when it is not a JSON object (a
    file cut short by a failed copy would otherwise say only "Expecting value: line 1 column 2")."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: holds {type(data).__name__}, not a JSON object")
    return data


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON's true would otherwise pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def no_config(path: str | Path) -> FileNotFoundError:
    """The error of a checkpoint directory (local or URI) without config.json."""
    return FileNotFoundError(f"no {CONFIG_NAME} in {path}: not an HF checkpoint directory (a model's "
                             "save_pretrained(DIR) writes one)")


@dataclass(kw_only=True)
class BlockDiffusionConfig:
    """Block-diffusion settings (docs/method.md §2-3); saved beside the HF config as fdllm_config.json."""

    block_size: int = 32  # tokens per diffusion block (attention is bidirectional inside one)
    sub_block_size: int = 8  # tokens decoded together inside a block, left to right
    threshold: float = 0.9  # unmask every position whose confidence exceeds this
    use_sub_block_cache: bool = True  # DualCache approximation of docs/method.md §3.3
    mask_token_id: int | None = None  # None: taken from the checkpoint's fdllm_config/tokenizer
    eps: float = 1e-3  # minimum masking probability per block in training
    # How the checkpoint was trained to attend over its clean prefix (PREFIX_ATTENTIONS); the engine's
    # prefill and block commit follow it. Checkpoints saved before this field existed are block-causal.
    prefix_attention: str = "block_causal"

    def __post_init__(self) -> None:
        # types first: fdllm_config.json's values arrive as JSON wrote them (a true mask_token_id was token 1,
        # a 32.0 block_size failed deep in torch)
        if not is_int(self.block_size) or not is_int(self.sub_block_size):
            raise ValueError(f"block_size and sub_block_size must be ints, got {self.block_size!r} and {self.sub_block_size!r}")
        if not is_finite_number(self.threshold) or not is_finite_number(self.eps):
            raise ValueError(f"threshold and eps must be numbers, got {self.threshold!r} and {self.eps!r}")
        if not isinstance(self.use_sub_block_cache, bool):
            raise ValueError(f"use_sub_block_cache must be a bool, got {self.use_sub_block_cache!r}")
        if self.mask_token_id is not None and (not is_int(self.mask_token_id) or self.mask_token_id < 0):
            raise ValueError(f"mask_token_id must be None or a token id (an int >= 0), got {self.mask_token_id!r}")
        if self.block_size < 1 or self.sub_block_size < 1:
            raise ValueError(f"block_size ({self.block_size}) and sub_block_size ({self.sub_block_size}) must be >= 1")
        if self.block_size % self.sub_block_size:
            raise ValueError(
                f"block_size ({self.block_size}) must be divisible by sub_block_size ({self.sub_block_size})"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if self.prefix_attention not in PREFIX_ATTENTIONS:
            raise ValueError(f"prefix_attention must be one of {PREFIX_ATTENTIONS}, got {self.prefix_attention!r}")

    @property
    def causal_prefix(self) -> bool:
        return self.prefix_attention == "causal"

    def replace(self, **changes: Any) -> "BlockDiffusionConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        (Path(path) / BLOCK_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BlockDiffusionConfig | None":
        """The config saved in a checkpoint dir, or None when the checkpoint is a plain AR one."""
        file = Path(path) / BLOCK_CONFIG_NAME
        if not file.is_file():
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in read_json_object(file).items() if k in names}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:  # a bad value, or one of the wrong type (a string block_size)
            raise ValueError(f"{file}: {e}") from None

    @classmethod
    def from_checkpoint(cls, path: str | Path, **changes: Any) -> "BlockDiffusionConfig":
        """The checkpoint's config (the defaults for a plain AR one) with `changes` applied: what a
        deployment or an evaluation decodes with when it overrides a field or two."""
        return (cls.load(path) or cls()).replace(**changes)
