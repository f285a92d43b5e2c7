"""Fine-tune a pretrained AR checkpoint into a block-diffusion LLM (Fast-dLLM v2) with Ray Train.

Locally (starts a Ray instance in the process; the embedded tiny model and corpus, a few minutes):
    python pipelines/finetune.py --config pipelines/configs/tiny.yaml --output /tmp/fdllm-tiny

On a Ray cluster (here a local one; `ray job submit` needs RAY_AUTH_MODE=token on the client
because Ray 2.60 clusters require token authentication by default):
    ray start --head --node-ip-address 127.0.0.1 --num-cpus 2
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/finetune.py --config pipelines/configs/tiny.yaml --output /tmp/fdllm-tiny
    ray stop

Flags override the YAML config, whose keys are the flags' names with underscores
(`python pipelines/finetune.py --help` lists them). Relative local paths (model, data, output,
storage) mean the driver's working directory: where you run the script, or the job's copy of
`--working-dir` under `ray job submit` (so keep `--output` and `--storage-path` absolute or URIs there:
Ray deletes that copy). A run is named `--run-name` under
`--storage-path` (local, s3://, gs://, or any pyarrow filesystem URI; shared storage on a multi-node
cluster); rerunning an existing run needs `--resume`, which continues from its latest checkpoint with
optimizer state and data position. Workers that die are restarted from the latest checkpoint up to
`--max-failures` times. The final checkpoint is copied to `--output` as an HF directory (config.json,
safetensors, tokenizer, fdllm_config.json), servable as is.

Parallelism: DDP over gloo on CPU; with --use-gpu, DeepSpeed ZeRO-2/3 when deepspeed is installed
(`--strategy auto|deepspeed`), else DDP over NCCL (with bf16 autocast under `--precision bf16`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from fdllm.paths import is_uri, resolve_local  # noqa: E402
from pipelines.data import BAD_REASONS, DataConfig, DataError, build_dataset, check_data_files  # noqa: E402

if TYPE_CHECKING:
    import ray.train

log = logging.getLogger("fdllm.finetune")


def _opt(help: str, choices: tuple[str, ...] | None = None, **kwargs: Any) -> Any:
    return field(metadata={"help": help, "choices": choices}, **kwargs)


@dataclass(kw_only=True)
class FinetuneConfig:
    """One fine-tuning run. Every field is a CLI flag (`--field-name`) and a YAML key (`field_name`)."""

    # what to train on, where results go
    model: str = _opt("AR base checkpoint dir (HF format, with tokenizer)")
    data: list[str] = _opt("jsonl/parquet files or dirs, local or filesystem URIs")
    output: str | None = _opt("local dir for the final HF checkpoint", default=None)
    storage_path: str = _opt("Ray Train storage for checkpoints (local dir, s3://, gs://)", default="~/ray_results")
    run_name: str | None = _opt("run name under storage_path (default: fdllm-<timestamp>)", default=None)
    resume: bool = _opt("continue the run --run-name from its latest checkpoint", default=False)
    # cluster
    num_workers: int = _opt("training workers (one GPU each with --use-gpu)", default=1)
    use_gpu: bool = _opt("train on GPUs", default=False)
    cpus_per_worker: float = _opt("CPUs reserved per training worker", default=1.0)
    data_cpus: float = _opt("CPUs per Ray Data read/tokenize task", default=1.0)
    strategy: str = _opt("auto: DeepSpeed on GPU when installed, else DDP", ("auto", "ddp", "deepspeed"), default="auto")
    zero_stage: int = _opt("DeepSpeed ZeRO stage (2 or 3)", default=2)
    precision: str = _opt("bf16: mixed precision on GPU (fp32 master weights)", ("fp32", "bf16"), default="fp32")
    max_failures: int = _opt("worker-group restarts from the latest checkpoint (-1: unlimited)", default=0)
    # method (METHOD.md §2)
    block_size: int = _opt("diffusion block size", default=32)
    sub_block_size: int = _opt("decoding sub-block size, stored in fdllm_config.json", default=8)
    seq_len: int = _opt("packed sequence length (a multiple of block_size)", default=2048)
    eps: float = _opt("minimum per-block masking probability", default=1e-3)
    # optimisation
    batch_size: int = _opt("sequences per worker per step", default=1)
    lr: float = _opt("peak learning rate", default=1e-5)
    warmup_steps: int = _opt("linear warmup steps", default=0)
    min_lr_ratio: float = _opt("cosine decay floor, as a fraction of lr", default=0.1)
    weight_decay: float = _opt("AdamW weight decay", default=0.0)
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
        if not self.data or not all(isinstance(d, str) and d for d in self.data):
            raise ValueError("data must be a non-empty list of paths")
        # Workers run elsewhere (fdllm.paths): relative paths mean the driver's working directory.
        self.model = resolve_local(self.model)
        self.data = [resolve_local(d) for d in self.data]
        self.storage_path = resolve_local(self.storage_path)
        if self.output:
            self.output = resolve_local(self.output)
        for name in ("num_workers", "block_size", "sub_block_size", "seq_len", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len % self.block_size:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of block_size ({self.block_size})")
        if self.block_size % self.sub_block_size:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of sub_block_size ({self.sub_block_size})")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set max_steps or max_tokens (the cosine schedule needs a length)")
        for name in ("max_steps", "max_tokens", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
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
        if self.strategy == "deepspeed" and not self.use_gpu:
            raise ValueError("strategy 'deepspeed' needs use_gpu (the CPU path is DDP over gloo)")

    @property
    def global_batch(self) -> int:
        return self.num_workers * self.batch_size

    def total_steps(self) -> int:
        """Steps of the run (and of the cosine schedule): the tighter of max_steps and max_tokens."""
        limits = [self.max_steps] if self.max_steps is not None else []
        if self.max_tokens is not None:
            limits.append(math.ceil(self.max_tokens / (self.global_batch * self.seq_len)))
        return min(limits)

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
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{config_file}: expected a mapping of options")
            unknown = sorted(set(loaded) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"{config_file}: unknown keys {unknown}; see --help for the options")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("data"), str):
            values["data"] = [values["data"]]
        missing = [n for n in ("model", "data") if n not in values]
        if missing:
            raise ValueError(f"missing required option(s): {', '.join('--' + n for n in missing)}")
        return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    """CLI flags generated from FinetuneConfig's fields (defaults None: unset flags keep YAML values)."""
    parser = argparse.ArgumentParser(
        prog="fdllm-finetune",
        description="Fine-tune an AR checkpoint into a block-diffusion LLM with Ray Train.",
        epilog="Example: python pipelines/finetune.py --config pipelines/configs/tiny.yaml --output /tmp/fdllm-tiny",
    )
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    hints = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(FinetuneConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.default not in (dataclasses.MISSING, None) and f.name != "strip_reasoning":
            help_text += f" (default: {f.default})"
        kind = str(f.type)
        if f.name == "strip_reasoning":
            group = parser.add_mutually_exclusive_group()
            group.add_argument("--strip-reasoning", dest="strip_reasoning", action="store_const", const=True, help=help_text)
            group.add_argument("--keep-reasoning", dest="strip_reasoning", action="store_const", const=False,
                               help="keep <think>...</think> reasoning in answers (default)")
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "data":
            parser.add_argument(flag, nargs="+", default=None, metavar="PATH", help=help_text)
        elif f.metadata["choices"]:
            parser.add_argument(flag, choices=f.metadata["choices"], default=None, help=help_text)
        else:  # "int", "float", "str", optionally "| None"
            parser.add_argument(flag, type=hints[kind.split(" | ")[0]], default=None, help=help_text)
    return parser


def _run_exists(storage_path: str, run_name: str) -> bool:
    from pyarrow import fs as pafs

    from pipelines.data import _resolve

    filesystem, root, _ = _resolve(storage_path)
    snapshot = f"{root.rstrip('/')}/{run_name}/checkpoint_manager_snapshot.json"
    return filesystem.get_file_info(snapshot).type == pafs.FileType.File


def scaling_config(cfg: FinetuneConfig) -> "ray.train.ScalingConfig":
    """What the fine-tune asks the cluster for: one bundle per worker (CPUs, and a GPU with
    --use-gpu), which is what the autoscaler launches nodes for."""
    import ray.train

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def build_trainer(cfg: FinetuneConfig) -> "ray.train.torch.TorchTrainer":
    """Validate inputs (before any worker starts), build the dataset and the TorchTrainer."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from fdllm.config import ModelConfig
    from fdllm.tokenizer import MASK_TOKEN, has_tokenizer, load_tokenizer
    from pipelines.train_loop import train_loop_per_worker

    ModelConfig.load(cfg.model)  # a clear error now rather than in every worker
    if not has_tokenizer(cfg.model):
        raise FileNotFoundError(f"{cfg.model} has no tokenizer files; the data pipeline needs the model's tokenizer")
    sources = check_data_files(cfg.data)
    run_name = cfg.run_name or time.strftime("fdllm-%Y%m%d-%H%M%S")
    exists = _run_exists(cfg.storage_path, run_name)
    if exists and not cfg.resume:
        raise FileExistsError(
            f"run {run_name!r} already has checkpoints in {cfg.storage_path}: pass --resume to continue it, "
            "or choose another --run-name"
        )
    if cfg.resume and not exists:
        log.warning("no checkpoint of run %r in %s: starting it from the base model", run_name, cfg.storage_path)

    tokenizer = load_tokenizer(cfg.model)
    # The data only needs to recognise the mask token (to reject rows containing it); the workers add
    # it to the model's embedding with fdllm.tokenizer.add_mask_token.
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]}, replace_extra_special_tokens=False)
    dataset = build_dataset(sources, tokenizer, cfg.data_config(), num_cpus=cfg.data_cpus)
    # A deterministic stream, so a resumed single-worker run skips exactly the sequences it saw.
    ingest = ray.data.ExecutionOptions(preserve_order=True)

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )


def export_checkpoint(checkpoint: "ray.train.Checkpoint", output: str | Path) -> Path:
    """Copy a training checkpoint to `output` as a plain HF directory (no optimizer state)."""
    from pipelines.train_loop import DEEPSPEED_DIR, TRAIN_STATE

    output = Path(output)
    with checkpoint.as_directory() as src:
        shutil.copytree(src, output, ignore=shutil.ignore_patterns(TRAIN_STATE, DEEPSPEED_DIR), dirs_exist_ok=True)
    return output


def _warn_if_in_job_copy(cfg: FinetuneConfig) -> None:
    """Under `ray job submit --working-dir`, the driver runs in a copy of that directory which Ray
    deletes with the session: results written below it would be lost."""
    import ray

    if not ray.get_runtime_context().runtime_env.get("working_dir"):
        return
    for name in ("output", "storage_path"):
        value = getattr(cfg, name)
        if value and not is_uri(value) and Path(value).is_relative_to(os.getcwd()):
            log.warning("--%s %s is inside this job's temporary copy of --working-dir, which Ray deletes; "
                        "give an absolute path or a storage URI (s3://, gs://) to keep it", name.replace("_", "-"), value)


def run(cfg: FinetuneConfig) -> "ray.train.Result":
    """Fine-tune (connecting to the cluster, or starting a local Ray) and export the final checkpoint."""
    import ray

    trainer = build_trainer(cfg)
    if not ray.is_initialized():
        ray.init()
    _warn_if_in_job_copy(cfg)
    log.info("fine-tuning %s: %d steps, %d worker(s) x %d sequences x %d tokens", cfg.model, cfg.total_steps(),
             cfg.num_workers, cfg.batch_size, cfg.seq_len)
    result = trainer.fit()
    metrics = result.metrics or {}
    log.info("finished: step %s loss %.4f tokens %s (%.0f tok/s in the last window)", metrics.get("step"),
             metrics.get("loss", float("nan")), metrics.get("tokens"), metrics.get("tokens_per_s", 0.0))
    bad = {r: metrics.get(f"bad_{r}", 0) for r in BAD_REASONS}
    log.info("rows skipped: %d (%s)", sum(bad.values()), ", ".join(f"{r}={n}" for r, n in bad.items() if n) or "none")
    if cfg.output and result.checkpoint is not None:
        log.info("final checkpoint -> %s", export_checkpoint(result.checkpoint, cfg.output))
    return result


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_file = args.pop("config")
    try:
        cfg = FinetuneConfig.from_sources(config_file, **args)
        run(cfg)
    except (ValueError, DataError, FileNotFoundError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
