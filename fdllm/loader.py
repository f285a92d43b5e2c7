"""HF checkpoint I/O: config.json + safetensors (single file or sharded with an index).

Kept apart from the model so the model reads as architecture only. Parameter names are HF's, so
there is no name map; tied LM heads are not written (as HF does) and are re-tied on load.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fdllm.config import CONFIG_NAME, GENERATION_CONFIG_NAME, BlockDiffusionConfig, ModelConfig, no_config, read_json_object
from fdllm.storage import checkpoint_files, is_uri, local_checkpoint

if TYPE_CHECKING:
    from fdllm.model import Transformer

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses a longer header
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a checkpoint's weights may be stored as (cast to the model's dtype when loaded)
LOADABLE_DTYPES = frozenset(_DTYPES.values()) | {torch.float64}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A model's dtype, by name or as a torch.dtype: one of _DTYPES (an int8 model was a load_state_dict
    error from deep in torch; quantization is EngineConfig.quantization's)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")


def torch_device(device: str | torch.device) -> torch.device:
    """`device` read as torch reads it, whether or not this machine has it (a config checked where the
    replicas that use it do not run); a name torch does not know is a ValueError."""
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {str(device)!r} is not a torch device ({e})") from None


def parse_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this machine has: a name torch does not know, or a CUDA device (index)
    it lacks, is a ValueError saying so, before a model is read (it was a traceback from deep in torch,
    such as pin_memory's "requires a CUDA or other accelerator backend")."""
    parsed = torch_device(device)
    if parsed.type == "cpu":  # one CPU device: an index means nothing there, and safetensors refuses "cpu:0"
        return torch.device("cpu")
    if parsed.type == "meta":
        raise ValueError(f"device {str(device)!r} holds no data: a model is loaded onto cpu or cuda")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA device (torch.cuda.is_available() is "
                             "False); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return parsed


def _weight_names(path: Path) -> list[str]:
    """The weight files of the local checkpoint (or weightless view of one) at `path`: its index's
    shards, else the single file."""
    if not (path / INDEX_FILE).is_file():
        return [SINGLE_FILE]
    weight_map = read_json_object(path / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path / INDEX_FILE}: no weight_map of tensor names to file names")
    names = sorted(set(weight_map.values()))
    if outside := [name for name in names if Path(name).is_absolute() or ".." in Path(name).parts]:
        # a checkpoint is not trusted to name files of this node: `path / "/other/model.safetensors"` is that file
        raise ValueError(f"{path / INDEX_FILE}: weight files outside the checkpoint directory: {', '.join(outside[:4])}")
    return names


def _weight_files(path: Path) -> list[Path]:
    names = _weight_names(path)
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise _no_weights(path) if names == [SINGLE_FILE] else _missing_shards(path, missing)
    return [path / name for name in names]


def _no_weights(path: str | Path) -> FileNotFoundError:
    return FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: no weights this package loads (safetensors, "
                             "as save_pretrained writes them; a pytorch_model.bin checkpoint converts with transformers: "
                             "AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path))")


def _missing_shards(path: str | Path, missing: list[str]) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: {INDEX_FILE} names weight files that are not there: {', '.join(missing)}")


def _open_weights(file: Path, device: str | torch.device = "cpu"):
    """safe_open, whose error on a file cut short or not safetensors at all (SafetensorError, neither an
    OSError nor a ValueError) is made a ValueError that names the file."""
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def safetensors_problem(size: int, read_at: Callable[[int, int], bytes]) -> str | None:
    """Why a file of `size` bytes is not a whole safetensors file, judged from its header alone
    (`read_at(nbytes, offset)`: two small reads, the tensors never); None when it is one. The rules are
    safetensors' own: an 8-byte little-endian header length, a JSON object of tensors with their
    `data_offsets`, and the data ending exactly at the end of the file, so a file cut short is found."""
    if size < 8:
        return f"{size} bytes, too short for a header"
    length = int.from_bytes(read_at(8, 0), "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        return f"its header length {length} does not fit a file of {size} bytes"
    try:
        header = json.loads(read_at(length, 8))
        ends = [int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"its header is not a safetensors header ({type(e).__name__}: {e})"
    described = 8 + length + max(ends, default=0)
    if described != size:
        return f"its header describes {described} bytes, the file holds {size}" + (": cut short" if described > size else "")
    return None


def _check_remote_weights(uri: str, names: list[str]) -> None:
    """The safetensors header of each weight file at the URI `uri`, read with ranged reads."""
    from fdllm.storage import filesystem

    fs, inner = filesystem(uri)
    for name in names:
        with fs.open_input_file(f"{inner.rstrip('/')}/{name}") as f:
            problem = safetensors_problem(f.size(), f.read_at)
        if problem:
            raise ValueError(f"{uri.rstrip('/')}/{name}: not a readable safetensors file ({problem})")


def check_checkpoint(
    path: str | os.PathLike, *, need_tokenizer: bool = False, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Raise what loading the checkpoint at `path` (local directory or URI) would raise, one line naming
    what is missing or broken: no such directory or an unreachable store (OSError), no config.json or
    weights, or shards its index names (FileNotFoundError), an architecture this package does not load,
    a config file that is not a valid JSON object, a weight file whose safetensors header does not parse
    or describes more or fewer bytes than the file holds (ValueError) and, with `need_tokenizer`, no
    tokenizer that reads and writes text (`fdllm.tokenizer.load_text_tokenizer`).
    For a process about to start others that load it (fdllm-serve's replicas, the fine-tune's workers),
    which would find out only once started. Tensors are never read: a URI is listed, only its config
    and tokenizer files are fetched (into this node's cache, as `local_checkpoint(weights=False)` does),
    and each weight file's header is read in place with two ranged reads.
    Returns that local, weightless view, for a caller that reads the config or tokenizer next."""
    from fdllm.tokenizer import load_text_tokenizer

    files = checkpoint_files(path)
    if CONFIG_NAME not in files:
        raise no_config(path)
    if not {SINGLE_FILE, INDEX_FILE} & files:
        raise _no_weights(path)
    local = local_checkpoint(path, cache_dir, weights=False)
    ModelConfig.load(local)
    BlockDiffusionConfig.load(local)
    names = _weight_names(local)  # the index, if any, is in the weightless view
    missing = [name for name in names if name not in files]
    if missing:
        raise _missing_shards(path, missing)
    if is_uri(str(path)):
        _check_remote_weights(str(path), names)
    else:  # from the directory itself: `local` is a weightless cache copy when the directory is an export
        for name in names:
            with _open_weights(Path(path).expanduser() / name):  # the loader's own reader: its words
                pass
    if need_tokenizer:
        load_text_tokenizer(local, path)
    return local


def load_checkpoint(
    cls: type["Transformer"], path: str | Path, dtype: torch.dtype | str | None, device: str | torch.device
) -> "Transformer":
    """Build `cls` on the meta device (no wasted init) and fill it from the checkpoint's tensors.
    `path` may be an object-store URI: it is read through this node's cache (fdllm.storage)."""
    device = parse_device(device)
    path = local_checkpoint(path)
    cfg = ModelConfig.load(path)
    target = parse_dtype(dtype if dtype is not None else cfg.torch_dtype)
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for file in _weight_files(path):
        with _open_weights(file, device) as f:
            for name in f.keys():
                if name not in expected:
                    if not name.endswith(".rotary_emb.inv_freq"):  # old exports' RoPE buffers: ours are computed
                        unused.append(name)
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype not in LOADABLE_DTYPES:  # pre-quantized (fp8 + scales, int packs): not weights as stored
                    raise ValueError(f"{name} is stored as {tensor.dtype}: fdllm loads float32/bfloat16/float16 "
                                     "checkpoints and quantizes at load (EngineConfig(quantization=...))")
                tensors[name] = tensor.to(target)
    if unused:
        log.warning("%s holds %d tensors the %s model does not use, ignored: %s", path, len(unused), cfg.model_type,
                    ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
    if cfg.tie_word_embeddings:
        head = tensors.pop("lm_head.weight", None)  # some exporters write the tied copy; ours is the embedding
        embedding = tensors.get("model.embed_tokens.weight")
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            raise ValueError(f"{path}: config.json ties the LM head to the embedding (tie_word_embeddings: true) but "
                             "the checkpoint's lm_head.weight differs from it: set tie_word_embeddings false to use "
                             "that head, or drop the tensor to use the embedding")
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise KeyError(f"checkpoint {path} lacks tensors the {cfg.model_type} model needs: {shown}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    cfg.torch_dtype = str(target).removeprefix("torch.")
    log.info("loaded %s (%s, %.1fM params) from %s", cfg.model_type, cfg.torch_dtype, num_params(model) / 1e6, path)
    return model.eval()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: "Transformer", path: str | Path, max_shard_size: int = 4 << 30) -> None:
    """Write config.json, the generation_config.json the model was loaded with (its end tokens: the
    fine-tune's export is its base's model) and safetensors shards of at most `max_shard_size` bytes
    (one file if it fits).
    A model an engine quantized in place (`fdllm.quantization`) is refused: its torchao weights have
    no storage safetensors can write, and the format is not HF's."""
    done = getattr(model, "quantization", None)
    if done is not None:
        raise ValueError(f"this model's decoder weights were quantized to {done} in place (EngineConfig(quantization=...)); "
                         "save it before building the engine, or load the checkpoint again: quantization happens at load "
                         "and leaves the checkpoint unchanged")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    cfg.torch_dtype = str(model.dtype).removeprefix("torch.")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a re-save with other sharding must not leave old shards behind
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = cfg.to_hf_dict()
    hf["dtype"] = hf["torch_dtype"]
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = path / GENERATION_CONFIG_NAME
    if cfg.generation_config is None:
        generation.unlink(missing_ok=True)  # as stale shards: not another model's
    else:
        generation.write_text(json.dumps(cfg.generation_config, indent=2) + "\n")
    log.info("saved %s checkpoint (%d shard(s)) to %s", cfg.model_type, len(shards), path)
