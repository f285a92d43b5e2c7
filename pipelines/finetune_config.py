"""The fine-tune's configuration: one dataclass whose fields are the CLI flags and YAML keys.

Its own module so the driver (`pipelines/finetune.py`) and the Ray Train workers
(`pipelines/train_loop.py`) both import it without importing each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fdllm.paths import resolve_local
from pipelines.data import DataConfig

OBJECTIVES = ("diffusion", "joint", "certainty", "joint-certainty")
WRONG_TRAJECTORIES = ("drop", "reference")
DATA_MEMORY_MB = 512  # the ingest's object-store budget: docs/finetune.md measures it

def _opt(help: str, choices: tuple[str, ...] | None = None, **kwargs: Any) -> Any:
    return field(metadata={"help": help, "choices": choices}, **kwargs)


@dataclass(kw_only=True)
class FinetuneConfig:
    """One fine-tuning run. Every field is a CLI flag (`--field-name`) and a YAML key (`field_name`)."""

    # what to train on, where results go
    model: str = _opt("AR base checkpoint (HF format, with tokenizer): a dir or an s3:// / gs:// URI")
    data: list[str] = _opt("jsonl/parquet files or dirs (names starting with . or _ in a dir are skipped), "
                            "local or pyarrow/fsspec URIs")
    output: str | None = _opt(
        "servable checkpoint (dir or URI), rewritten at every checkpoint and at the end "
        "(default: STORAGE_PATH/RUN_NAME/servable)", default=None)
    storage_path: str = _opt("Ray Train storage for checkpoints (local dir, s3://, gs://)", default="~/ray_results")
    run_name: str | None = _opt("run name under storage_path (default: fdllm-<timestamp>)", default=None)
    resume: bool = _opt("continue the run --run-name from its latest checkpoint", default=False)
    # cluster
    num_workers: int = _opt("training workers (one GPU each with --use-gpu)", default=1)
    use_gpu: bool = _opt("train on GPUs", default=False)
    placement_strategy: str = _opt("how workers go on nodes: PACK fills a node first, SPREAD uses all",
                                   ("PACK", "SPREAD"), default="PACK")
    cpus_per_worker: float = _opt("CPUs reserved per training worker", default=1.0)
    data_cpus: float = _opt("CPUs per Ray Data read/tokenize task", default=1.0)
    data_memory_mb: int = _opt("object-store memory the ingest may fill ahead of the trainers, in MiB (packed rows "
                               "are ~20x their text's size); more lets more tasks run at once", default=DATA_MEMORY_MB)
    strategy: str = _opt("auto: DeepSpeed on GPU when installed, else DDP; deepspeed also runs on CPU (gloo)",
                         ("auto", "ddp", "deepspeed"), default="auto")
    zero_stage: int = _opt("DeepSpeed ZeRO stage (2 or 3)", default=2)
    precision: str = _opt("bf16: mixed precision on GPU (fp32 master weights); CPU trains in fp32",
                          ("fp32", "bf16"), default="fp32")
    max_failures: int = _opt("worker-group restarts from the latest checkpoint (-1: unlimited)", default=0)
    # method (docs/method.md §2)
    block_size: int = _opt("diffusion block size", default=32)
    sub_block_size: int = _opt("decoding sub-block size, stored in fdllm_config.json", default=8)
    seq_len: int = _opt("packed sequence length (a multiple of block_size)", default=2048)
    eps: float = _opt("minimum per-block masking probability", default=1e-3)
    objective: str = _opt(
        "diffusion: the block-diffusion loss (§2); joint: + the AR next-token loss of a causal clean stream "
        "(§5), for mode='speculative' (the checkpoint records prefix_attention='causal'); certainty: + the "
        "certainty-forcing entropy term of self-distillation (§5, pipelines/distill.py); joint-certainty: "
        "joint whose block-diffusion part carries that term (distilling a joint checkpoint)",
        OBJECTIVES, default="diffusion")
    ar_loss_weight: float = _opt("joint objective: weight of the AR next-token loss", default=0.5)
    diffusion_loss_weight: float = _opt("joint objective: weight of the block-diffusion loss", default=0.5)
    certainty_weight: float = _opt("certainty objective: lambda, the weight of the entropy term", default=2.0)
    certainty_temperature: float = _opt("certainty objective: softmax temperature T of the entropy term", default=0.5)
    # optimisation
    batch_size: int = _opt("sequences per worker per step", default=1)
    lr: float = _opt("peak learning rate", default=1e-5)
    warmup_steps: int = _opt("linear warmup steps", default=0)
    min_lr_ratio: float = _opt("cosine decay floor, as a fraction of lr", default=0.1)
    weight_decay: float = _opt("AdamW weight decay, on the matrices (linear layers, embeddings), not on norms or "
                               "biases", default=0.0)
    grad_clip: float = _opt("gradient-norm clip (0: off)", default=1.0)
    max_steps: int | None = _opt("stop after this many steps", default=None)
    max_tokens: int | None = _opt("stop after this many sequence tokens (steps x workers x batch x seq_len)", default=None)
    seed: int = _opt("seed for noise and initialisation", default=0)
    # checkpoints and logs
    save_every: int = _opt("checkpoint every N steps (and at the end)", default=500)
    keep_checkpoints: int | None = _opt("checkpoints kept in storage (None: all)", default=2)
    log_every: int = _opt("report metrics every N steps", default=10)
    # data
    strip_reasoning: bool = _opt("drop <think>...</think> from answers (--keep-reasoning keeps it)", default=False)
    overlong: str = _opt("a document longer than seq_len: skip it or truncate it", ("skip", "truncate"), default="skip")
    docs_per_batch: int = _opt("records tokenized and packed per Ray Data batch", default=256)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required (an HF checkpoint dir)")
        if not self.data or not isinstance(self.data, list) or not all(isinstance(d, str) and d for d in self.data):
            raise ValueError("data must be a non-empty list of paths")
        for name, kind in _field_kinds(type(self)).items():
            value = getattr(self, name)
            if value is None and kind.optional:
                continue
            if kind.base is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                           and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if kind.base in (int, bool, str) and not (isinstance(value, kind.base) and
                                                     (kind.base is bool or not isinstance(value, bool))):
                raise ValueError(f"{name} must be {kind.base.__name__}, got {value!r}")
        # Workers run elsewhere (fdllm.paths): relative paths mean the driver's working directory.
        self.model = resolve_local(self.model)
        self.data = [resolve_local(d) for d in self.data]
        self.storage_path = resolve_local(self.storage_path)
        if self.output:
            self.output = resolve_local(self.output)
        for name in ("num_workers", "block_size", "sub_block_size", "seq_len", "batch_size", "save_every", "log_every",
                     "data_memory_mb"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: a distillation's checkpoint's
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size is not None and self.seq_len % self.block_size:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of block_size ({self.block_size})")
        if None not in (self.block_size, self.sub_block_size) and self.block_size % self.sub_block_size:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of sub_block_size ({self.sub_block_size})")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set max_steps or max_tokens (the cosine schedule needs a length)")
        for name in ("max_steps", "max_tokens", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"need weight_decay >= 0 and grad_clip >= 0 (0: off), got {self.weight_decay}, {self.grad_clip}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if min(self.ar_loss_weight, self.diffusion_loss_weight) < 0 or self.ar_loss_weight + self.diffusion_loss_weight <= 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got ar {self.ar_loss_weight}, "
                f"diffusion {self.diffusion_loss_weight}"
            )
        if self.certainty_weight < 0 or self.certainty_temperature <= 0:
            raise ValueError(f"need certainty_weight >= 0 and certainty_temperature > 0, got {self.certainty_weight}, "
                             f"{self.certainty_temperature}")
        if self.cpus_per_worker <= 0 or self.data_cpus <= 0:
            raise ValueError("cpus_per_worker and data_cpus must be > 0")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.resume and not self.run_name:
            raise ValueError("resume needs run_name: the run to continue")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.max_failures < -1:  # Ray Train would take it as 0
            raise ValueError(f"max_failures must be >= 0, or -1 for unlimited, got {self.max_failures}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.manual_seed takes: the workers would fail, after Ray starts
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if self.block_size is not None:  # a distillation's layout is read from its checkpoint first (before Ray)
            self.data_config()  # its own rules (docs_per_batch >= 1, ...) now: distillation reads the data after Ray starts

    @property
    def global_batch(self) -> int:
        return self.num_workers * self.batch_size

    @property
    def causal_prefix(self) -> bool:
        """Whether the objective trains a causal clean stream with the AR loss (the joint ones): the
        checkpoint then records prefix_attention='causal' and serves mode='speculative'."""
        return self.objective.startswith("joint")

    def total_steps(self) -> int:
        """Steps of the run (and of the cosine schedule): the tighter of max_steps and max_tokens."""
        limits = [self.max_steps] if self.max_steps is not None else []
        if self.max_tokens is not None:
            limits.append(math.ceil(self.max_tokens / (self.global_batch * self.seq_len)))
        return min(limits)

    def no_batch_error(self) -> str:
        """Why a run whose data gave no training batch stopped, and what to change."""
        return (f"the data gave no training batch: its good rows pack fewer than {self.num_workers} worker(s) x "
                f"{self.batch_size} sequences of {self.seq_len} tokens; give more data, or a smaller --batch-size, "
                "--seq-len or --num-workers")

    def data_config(self) -> DataConfig:
        return DataConfig(
            block_size=self.block_size, seq_len=self.seq_len, strip_reasoning=self.strip_reasoning,
            overlong=self.overlong, docs_per_batch=self.docs_per_batch,
        )

    @classmethod
    def from_sources(cls, config_file: str | None = None, **overrides: Any) -> "FinetuneConfig":
        """Dataclass defaults < YAML file < overrides (None overrides are ignored)."""
        values: dict[str, Any] = {}
        if config_file:
            try:
                loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{config_file}: not valid YAML: {e}") from None
            except OSError as e:  # missing, a directory, unreadable
                raise ValueError(f"--config {config_file}: {e.strerror or e}") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"{config_file}: expected a mapping of options")
            # keys as YAML reads them: also numbers, booleans and null, which do not sort among strings
            unknown = sorted(map(str, set(loaded) - {f.name for f in dataclasses.fields(cls)}))
            if unknown:
                raise ValueError(f"{config_file}: unknown keys {unknown}; see --help for the options")
            kinds = _field_kinds(cls)
            values.update({k: kinds[k].read(k, v, config_file) for k, v in loaded.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("data"), str):
            values["data"] = [values["data"]]
        missing = [n for n in ("model", "data") if n not in values]
        if missing:
            raise ValueError(f"missing required option(s): {', '.join('--' + n for n in missing)}")
        return cls(**values)


@dataclass(frozen=True)
class _FieldKind:
    """A config field's type as YAML values are read into it: `base` (int, float, bool, str or list
    of str), or None when `optional`."""

    base: type
    optional: bool

    def read(self, name: str, value: Any, source: str) -> Any:
        """A YAML value as this type: YAML 1.1 reads `1e-5` (no dot) and quoted numbers as strings."""
        if value is None or self.base in (bool, list) or isinstance(value, bool):
            return [value] if self.base is list and isinstance(value, str) else value  # __post_init__ checks
        try:
            if self.base is float and isinstance(value, (int, float, str)):
                return float(value)
            if self.base is int and isinstance(value, (int, float, str)):
                number = float(value) if not isinstance(value, int) else value
                if number != int(number):
                    raise ValueError
                return int(number)
        except (ValueError, OverflowError):
            raise ValueError(f"{source}: {name} must be {self.base.__name__}, got {value!r}") from None
        return str(value) if self.base is str and isinstance(value, (int, float)) else value


@functools.cache
def _field_kinds(cls: type) -> dict[str, _FieldKind]:
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        optional = typing.get_origin(hint) is types.UnionType and type(None) in typing.get_args(hint)
        if optional:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kinds[name] = _FieldKind(typing.get_origin(hint) or hint, optional)  # list[str] -> list
    return kinds


@dataclass(kw_only=True)
class DistillConfig(FinetuneConfig):
    """A self-distillation run (pipelines/distill.py, docs/method.md §5): the fine-tune's options, where
    `model` is the block-diffusion checkpoint to distil and `data` the SFT records whose prompts it
    decodes, plus how its trajectories are made. Trains with `objective` "certainty" by default."""

    model: str = _opt("the block-diffusion checkpoint to distil (a fine-tune's servable output, with tokenizer): "
                      "a dir or an s3:// / gs:// URI")
    objective: str = _opt("training loss (see the fine-tune): certainty = §2 loss + lambda x certainty-forcing "
                          "entropy", OBJECTIVES, default="certainty")
    lr: float = _opt("peak learning rate", default=2e-4)
    block_size: int | None = _opt("diffusion block size (default: the checkpoint's; another is refused)", default=None)
    sub_block_size: int | None = _opt("decoding sub-block size (default: the checkpoint's; another is refused)",
                                      default=None)
    trajectories: str | None = _opt(
        "where the trajectories (trajectories.jsonl + summary.json) are written, local or URI; an existing "
        "summary.json is reused if made with the same model, data and trajectory options, so --resume does not "
        "decode again (default: STORAGE_PATH/RUN_NAME/trajectories)",
        default=None)
    wrong_trajectories: str = _opt(
        "a trajectory whose answer differs from the record's reference answer: drop the record, or train "
        "on the reference answer instead", WRONG_TRAJECTORIES, default="drop")
    trajectory_max_new_tokens: int = _opt("tokens a trajectory may decode", default=256)
    trajectory_threshold: float | None = _opt("decoding threshold of the trajectories (default: the checkpoint's)",
                                              default=None)
    trajectory_batch_size: int = _opt("records one engine actor decodes together", default=64)
    engine_actors: int = _opt("Ray Data actors running fdllm.Engine over the prompts", default=1)
    engine_cpus: float = _opt("CPUs per engine actor", default=1.0)
    engine_gpus: float = _opt("GPUs per engine actor (0: decode on CPU)", default=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trajectories:
            self.trajectories = resolve_local(self.trajectories)
        for name in ("trajectory_max_new_tokens", "trajectory_batch_size", "engine_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.engine_cpus <= 0 or self.engine_gpus < 0:
            raise ValueError("engine_cpus must be > 0 and engine_gpus >= 0")
        if self.trajectory_threshold is not None and not 0.0 < self.trajectory_threshold <= 1.0:
            raise ValueError(f"trajectory_threshold must be in (0, 1], got {self.trajectory_threshold}")
