"""Weight quantization at load time through torchao: int8 / int4 weight-only and fp8.

Why weight-only first: a decode step reads every weight once for a few rows per sequence (AR: one,
a diffusion block: 8-32), so its cost is the weight read and halving the bytes is what pays; the
dLLM PTQ study (arXiv 2508.14896) finds 4-bit weight-only (group 128) within about a point on
LLaDA/Dream. fp8 quantizes activations too (dynamic, per row) and needs a GPU with fp8 tensor cores.

Only the decoder layers' linears are quantized: the embedding and the LM head stay in the model's
dtype (the head is tied to the embedding in small Qwen2 models, and the confidence that the
threshold reads comes from it). The checkpoint on disk is unchanged; quantization happens when an
engine loads it.

What each format is, per device:
- int8: per-channel symmetric int8 weights (CPU and CUDA).
- int4: per-group (128 where the shapes allow) int4 weights; on CUDA packed for tinygemm (bf16
  models), on CPU kept unpacked in int8 storage (torchao has no packed CPU int4 layout here), so
  on CPU it shows int4's accuracy but not its memory.
- fp8: e4m3 weights and dynamically quantized activations, per row, on CUDA compute capability 8.9+
  (Ada, Hopper); refused elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (128, 64, 32)  # the largest that divides every quantized layer's input size is used
FP8_MIN_CAPABILITY = (8, 9)
TORCHAO_INSTALL = "pip install 'fdllm[quant]' (or torchao>=0.18)"


def check_quantization(name: str | None, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """Refuse, with the reason, a format unknown, not installed here, or that this device (or model
    dtype) cannot run: at configuration, not when a model is quantized (a replica that starts, fails
    and restarts; an evaluation that threw away the rows it had). `device` None: what depends on it
    waits for the model's device (an app builder on a head node without the replicas' GPUs); a CUDA
    device's compute capability is read only where one is present."""
    if name is None:
        return
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {name!r}")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"quantization {name!r} needs torchao: {TORCHAO_INSTALL}")
    if device is None:
        return
    if name == "fp8":
        if device.type != "cuda":
            raise ValueError(f"quantization 'fp8' needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); "
                             f"the model is on {device.type}: use 'int8' or 'int4' there")
        if torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(device)
            if capability < FP8_MIN_CAPABILITY:
                raise ValueError(f"quantization 'fp8' needs compute capability 8.9+ (Ada, Hopper); "
                                 f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: "
                                 "use 'int8' or 'int4'")
    if name == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
        raise ValueError(f"quantization 'int4' on CUDA runs bf16 models (tinygemm); the model is {dtype}: "
                         "load it with dtype bfloat16")


def _is_decoder_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("model.layers.")


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for fqn, m in model.named_modules() if _is_decoder_linear(m, fqn)]


def _int4_group_size(model: nn.Module) -> int:
    sizes = {m.in_features for m in _decoder_linears(model)}
    for group in INT4_GROUP_SIZES:
        if all(size % group == 0 for size in sizes):
            return group
    raise ValueError(f"int4 needs layer input sizes divisible by one of {INT4_GROUP_SIZES}, got {sorted(sizes)}")


def _torchao():
    """Import torchao lazily; on a machine without CUDA its CUDA-only extensions fail to load, which
    it logs as warnings that say nothing about this machine's formats."""
    quiet = not torch.cuda.is_available()
    ao_log = logging.getLogger("torchao")
    level = ao_log.level
    if quiet:
        ao_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as ao
    except ImportError as exc:
        raise ImportError(f"quantization needs torchao: {TORCHAO_INSTALL}") from exc
    finally:
        ao_log.setLevel(level)
    return ao


def _config(name: str, model: nn.Module, device: torch.device):
    ao = _torchao()
    # set_inductor_config=False: torchao's default turns on coordinate-descent tuning for every
    # torch.compile of the process (a serving replica's or a benchmark's other compiles too)
    if name == "int8":
        return ao.Int8WeightOnlyConfig(set_inductor_config=False)
    if name == "int4":
        group = _int4_group_size(model)
        if device.type == "cuda":
            return ao.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                           set_inductor_config=False)
        from torchao.quantization.granularity import PerGroup

        return ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
    from torchao.quantization.granularity import PerRow

    return ao.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def quantize(model: nn.Module, name: str) -> nn.Module:
    """Quantize the decoder layers' linears of `model` in place (and return it). The format is
    recorded on the model (`model.quantization`), so a second engine on the same model reuses it."""
    done = getattr(model, "quantization", None)
    if done == name:
        return model
    if done is not None:
        raise ValueError(f"the model is already quantized to {done!r}; load it again to quantize it to {name!r}")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    check_quantization(name, device, dtype)
    before = weight_bytes(model)
    _torchao().quantize_(model, _config(name, model, device), filter_fn=_is_decoder_linear)
    if hasattr(model, "unfuse_projections"):  # an engine had stacked q/k/v and gate/up: those weights are stale now
        model.unfuse_projections()
    model.quantization = name
    log.info("quantized %d decoder linears to %s: weights %.1f MB -> %.1f MB", len(_decoder_linears(model)), name,
             before / 1e6, weight_bytes(model) / 1e6)
    return model


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking through tensor subclasses (torchao keeps data and scales inside)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, n)) for n in names)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (tied weights counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total
