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
optimizer state and data position (refused if an option that position depends on changed:
`pipelines.checkpoints.check_resume`). Workers that die are restarted from the latest checkpoint up to
`--max-failures` times. At every checkpoint and at the end, the servable part (config.json,
generation_config.json when the base has one, safetensors, tokenizer, fdllm_config.json; no optimizer
state) is published at `--output` (default
STORAGE_PATH/RUN_NAME/servable): one stable path for Serve, `fdllm.load_model` and evaluate.

`--model`, `--data`, `--output` and `--storage-path` take local paths or object-store URIs
(`s3://`, `gs://`, any pyarrow/fsspec filesystem). S3 endpoint and credentials come from the
standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so any S3-compatible store works.
Each node downloads an object-store model once into its cache ($FDLLM_CACHE_DIR, ~/.cache/fdllm).

Parallelism (`--strategy`): `ddp` is DDP (gloo on CPU, NCCL with --use-gpu, bf16 autocast under
`--precision bf16`); `deepspeed` is DeepSpeed ZeRO stage `--zero-stage` 2 or 3, on GPUs or, with the
same code, on CPUs over gloo (DS_ACCELERATOR=cpu; `pip install 'fdllm[deepspeed]'`); `auto` (the
default) is DeepSpeed with --use-gpu when it is installed, else DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fdllm.paths import check_no_shadowing, is_uri  # noqa: E402
from fdllm.storage import (  # noqa: E402
    check_directory_path,
    check_publishable,
    encode_uri,
    filesystem,
    join,
    read_text,
    remove_file,
    same_or_under,
)
from pipelines.checkpoints import DIVERGED, NO_BATCH_COUNTS, SNAPSHOT, check_resume  # noqa: E402
from pipelines.data import BAD_REASONS, DataError, build_dataset, check_data_files, summarize_bad_rows  # noqa: E402
from pipelines.finetune_config import FinetuneConfig  # noqa: E402

if TYPE_CHECKING:
    import ray.train

log = logging.getLogger("fdllm.finetune")

class TrainingDiverged(RuntimeError):
    """The loss or the weights of a run became non-finite (its workers stopped before saving them)."""


# What a bad option, path or data source raises before (or instead of) training, or a run that diverged:
# the CLIs built on the fine-tune (this one, distill, quickstart) report it as one line and exit 2.
USER_ERRORS = (ValueError, OSError, DataError, TrainingDiverged)

# Ray Train's knobs (read from the driver's environment at fit, which hands them to its controller and
# workers) for a local Ray instance this process started: no preemption watcher, an actor per run for
# cloud nodes that drain (none does here), which also logs an error-level line about its restart
# arguments; and workers polled every 0.25 s, not 2 s, so a run's end and a dead worker are seen at once
# (~9 s a run on 2 cores). A user's own settings win; on a cluster Ray's defaults stand.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def build_parser(
    config_cls: type[FinetuneConfig] = FinetuneConfig, prog: str = "fdllm-finetune",
    description: str = "Fine-tune an AR checkpoint into a block-diffusion LLM with Ray Train.",
    epilog: str = "Example: python pipelines/finetune.py --config pipelines/configs/tiny.yaml --output /tmp/fdllm-tiny",
) -> argparse.ArgumentParser:
    """CLI flags generated from the config class's fields (defaults None: unset flags keep YAML values)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    hints = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(config_cls):
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

    fs, root = filesystem(storage_path)
    snapshot = f"{root.rstrip('/')}/{run_name}/{SNAPSHOT}"
    return fs.get_file_info(snapshot).type == pafs.FileType.File


def resolve_run(cfg: FinetuneConfig) -> FinetuneConfig:
    """The run as every process sees it: a run name chosen, and the servable output defaulting to
    STORAGE_PATH/RUN_NAME/servable (local paths are already absolute: FinetuneConfig)."""
    run_name = cfg.run_name or time.strftime("fdllm-%Y%m%d-%H%M%S")
    return dataclasses.replace(cfg, run_name=run_name, output=cfg.output or join(cfg.storage_path, run_name, "servable"))


def scaling_config(cfg: FinetuneConfig) -> "ray.train.ScalingConfig":
    """What the fine-tune asks the cluster for: one bundle per worker (CPUs, and a GPU with
    --use-gpu), which is what the autoscaler launches nodes for."""
    import ray.train

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                   placement_strategy=cfg.placement_strategy)


def worker_env(cfg: FinetuneConfig) -> dict[str, str]:
    """Environment of the training workers. Without GPUs DeepSpeed must be told its accelerator is
    the CPU (it would otherwise probe for CUDA, warn and may pick a wrong one); it then talks gloo."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def build_trainer(cfg: FinetuneConfig) -> "ray.train.torch.TorchTrainer":
    """Validate inputs (before any worker starts), build the dataset and the TorchTrainer.
    `cfg` is a resolved run (`resolve_run`)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from fdllm.loader import check_checkpoint
    from fdllm.tokenizer import MASK_TOKEN, load_text_tokenizer
    from pipelines.train_loop import has_deepspeed, train_loop_per_worker

    warn_if_warmup_fills_the_run(cfg)
    if cfg.strategy == "deepspeed" and not has_deepspeed():
        raise ValueError("--strategy deepspeed needs the deepspeed package: pip install 'fdllm[deepspeed]'")
    # A clear error now rather than in every worker, restarted --max-failures times: config, weight
    # files (a local one's header too) and fdllm_config.json. The workers fetch the weights themselves.
    base = check_checkpoint(cfg.model)  # its config and tokenizer, in this node's cache
    # the data pipeline tokenizes with it: one that encodes text to nothing would train on empty rows
    tokenizer = load_text_tokenizer(base, cfg.model)
    sources = check_data_files(cfg.data)
    check_output(cfg)
    resumed = check_resume(cfg) if cfg.resume else None
    check_seq_len(cfg, resumed or str(base))

    # The data only needs to recognise the mask token (to reject rows containing it); the workers add
    # it to the model's embedding with fdllm.tokenizer.add_mask_token.
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]}, replace_extra_special_tokens=False)
    # One progress bar on the console: the fine-tune's steps (Ray Data's per-operator bars, redrawn as
    # new lines wherever the output is not a terminal, would bury it).
    ray.data.DataContext.get_current().enable_progress_bars = False
    # rows in a multiple of the workers: Ray Train's equal split drops what does not divide among them
    dataset = build_dataset(sources, tokenizer, cfg.data_config(), num_cpus=cfg.data_cpus, row_multiple=cfg.num_workers)

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(cfg.data_memory_mb)),
    )


def ingest_options(memory_mb: int) -> "ray.data.ExecutionOptions":
    """Ray Train's ingest defaults (resource limits that leave the trainers' CPUs/GPUs alone, ...), plus a
    deterministic stream, so a resumed run skips exactly the sequences it saw, and an object-store budget of
    `memory_mb` (`--data-memory-mb`): Ray Data's own is half the object store, which an ingest faster than
    the trainers fills with packed rows, ~20x their text (docs/finetune.md measures both)."""
    import ray.train

    with warnings.catch_warnings():  # Ray 2.60's own defaults set a field it deprecates: nothing to act on
        warnings.filterwarnings("ignore", message=".*exclude_resources. is deprecated")
        ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    ingest.resource_limits = ingest.resource_limits.copy(object_store_memory=memory_mb * 2**20)
    return ingest


def warn_if_warmup_fills_the_run(cfg: FinetuneConfig) -> None:
    """A warmup as long as the run is allowed (a short trial run may want it) but rarely meant: the
    learning rate climbs for every step and the cosine decay never starts."""
    from pipelines.train_loop import lr_at

    total = cfg.total_steps()
    if cfg.warmup_steps >= total:
        last = lr_at(total - 1, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        log.warning("--warmup-steps %d is not below the run's %d steps: the learning rate climbs for the whole run "
                    "(to %.3g at its last step, --lr %g) and never decays", cfg.warmup_steps, total, last, cfg.lr)


def check_seq_len(cfg: FinetuneConfig, model: str) -> None:
    """`--seq-len` against the positions the model (the base, or the checkpoint a resume continues from)
    was trained for, now: a longer sequence has positions its RoPE never saw, and one far past them
    would fail only in Ray Data's packing tasks, after Ray starts."""
    from fdllm.config import CONFIG_NAME, ModelConfig

    positions = ModelConfig.from_hf_dict(json.loads(read_text(join(model, CONFIG_NAME)))).max_position_embeddings
    if cfg.seq_len > positions:
        raise ValueError(f"--seq-len {cfg.seq_len} is more than the {positions} positions of {model} "
                         "(max_position_embeddings in its config.json): give at most that")


def check_output(cfg: FinetuneConfig) -> None:
    """Where the run writes, checked before anything runs (the writers would fail only at the first
    checkpoint, after training): `--storage-path` must be able to hold directories; a run that already
    has checkpoints there continues only with `--resume`; the servable export replaces what its
    directory holds, so refuse one that holds the run's checkpoints or the base model (where they are,
    a URI's query aside: `same_or_under`), or other files, or cannot be made (`check_publishable`)."""
    if is_uri(cfg.storage_path) and encode_uri(cfg.storage_path) != cfg.storage_path:  # Ray Train parses it as given
        raise ValueError(f"--storage-path {cfg.storage_path}: Ray Train takes it as a URI, which holds no spaces or "
                         f"non-ASCII characters; write it percent-encoded: {encode_uri(cfg.storage_path)}")
    for name, path in (("the run's checkpoints", join(cfg.storage_path, cfg.run_name)), ("the base model", cfg.model)):
        if same_or_under(path, cfg.output):
            raise ValueError(f"--output {cfg.output} would hold {name} ({path}); the export replaces what is there, "
                             "so give a directory of its own (default: STORAGE_PATH/RUN_NAME/servable)")
    for option, path, check in (("--storage-path", cfg.storage_path, check_directory_path),
                                ("--output", cfg.output, check_publishable)):
        try:
            check(path)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None
    if not cfg.resume and _run_exists(cfg.storage_path, cfg.run_name):
        raise FileExistsError(
            f"run {cfg.run_name!r} already has checkpoints in {cfg.storage_path}: pass --resume to continue it, "
            "or choose another --run-name"
        )


def _warn_if_in_job_copy(cfg: FinetuneConfig) -> None:
    """Under `ray job submit --working-dir`, the driver runs in a copy of that directory which Ray
    deletes with the session: results written below it would be lost."""
    import ray

    if not ray.get_runtime_context().runtime_env.get("working_dir"):
        return
    for name in ("output", "storage_path"):
        value = getattr(cfg, name)
        if value and not is_uri(value) and same_or_under(value, os.getcwd()):
            log.warning("--%s %s is inside this job's temporary copy of --working-dir, which Ray deletes; "
                        "give an absolute path or a storage URI (s3://, gs://) to keep it", name.replace("_", "-"), value)


def run(cfg: FinetuneConfig) -> "ray.train.Result":
    """Fine-tune (connecting to the cluster, or starting a local Ray); the workers publish the
    servable checkpoint at `cfg.output` (resolved: see `resolve_run`)."""
    cfg = resolve_run(cfg)
    return fit(build_trainer(cfg), cfg, "fine-tuning")


def fit(trainer: "ray.train.torch.TorchTrainer", cfg: FinetuneConfig, what: str) -> "ray.train.Result":
    """Run a built trainer of the resolved run `cfg` (starting a local Ray when none is connected) and
    log its outcome: last metrics, skipped rows, where the servable checkpoint is."""
    import ray

    if not ray.is_initialized():
        ray.init()
    check_cluster_fits(cfg)
    _warn_if_in_job_copy(cfg)
    log.info("%s %s: %d steps, %d worker(s) x %d sequences x %d tokens", what, cfg.model, cfg.total_steps(),
             cfg.num_workers, cfg.batch_size, cfg.seq_len)
    # said first: an interrupted run's name (chosen here when none was given) is what resuming needs
    log.info("run %s: checkpoints in %s, servable export at %s; if it stops, the same command with --run-name %s "
             "--resume continues it", cfg.run_name, join(cfg.storage_path, cfg.run_name), cfg.output, cfg.run_name)
    with _environment_defaults(LOCAL_RAY_TRAIN_ENV if _started_ray_here() else {}):
        result = trainer.fit()
    _drop_worker_progress_bars()
    metrics = result.metrics or {}
    if metrics.get("step", 0) < cfg.total_steps():  # the workers returned early: the run diverged, or no batch
        _raise_if_diverged(cfg)
        raise DataError(f"{cfg.no_batch_error()}; {_no_batch_counts(cfg)}")
    log.info("finished: step %s loss %.4f tokens %s (%.0f tok/s in the last window)", metrics.get("step"),
             metrics.get("loss", float("nan")), metrics.get("tokens"), metrics.get("tokens_per_s", 0.0))
    line, warnings = summarize_bad_rows({r: metrics.get(f"bad_{r}", 0) for r in BAD_REASONS}, metrics.get("good_docs", 0))
    log.info("%s", line)
    for warning in warnings:
        log.warning("%s", warning)
    if result.checkpoint is not None:
        log.info("servable checkpoint: %s (training checkpoint: %s)", cfg.output, result.checkpoint.path)
    return result


def _raise_if_diverged(cfg: FinetuneConfig) -> None:
    """TrainingDiverged when the run's workers stopped at a non-finite loss or weights (rank 0 left `DIVERGED`,
    removed here, so that a resumed run is not taken for it)."""
    marker = join(cfg.storage_path, cfg.run_name, DIVERGED)
    try:
        diverged = json.loads(read_text(marker))
    except (OSError, ValueError):
        return
    remove_file(marker)
    raise TrainingDiverged(
        f"training diverged at step {diverged.get('step')} (loss {diverged.get('loss')}, or weights no longer finite): "
        f"nothing from that step on was saved or published; lower --lr (it is {cfg.lr:g}) or raise --warmup-steps, "
        "then start again, or --resume from the last checkpoint")


def _no_batch_counts(cfg: FinetuneConfig) -> str:
    """The rows skipped by a run whose data gave no batch, as its rank 0 wrote them (`NO_BATCH_COUNTS`)."""
    try:
        counts = json.loads(read_text(join(cfg.storage_path, cfg.run_name, NO_BATCH_COUNTS)))
        return summarize_bad_rows(counts["bad_rows"], counts["good_docs"])[0]
    except (OSError, ValueError, KeyError, TypeError):
        return "the workers' log above counts the rows skipped"


def check_cluster_fits(cfg: FinetuneConfig) -> None:
    """The run's resources against the Ray instance's: the workers' bundles (`scaling_config`) and one
    data task (`--data-cpus`, which Ray Data runs beside them); see `check_fits`."""
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker + cfg.data_cpus, **({"GPU": cfg.num_workers} if cfg.use_gpu else {})}
    what = (f"{cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU{' and 1 GPU' * cfg.use_gpu} + "
            f"{cfg.data_cpus:g} CPU for the data")
    check_fits(need, what, f"lower --num-workers, --cpus-per-worker or --data-cpus{', drop --use-gpu' * cfg.use_gpu}")


def check_fits(need: dict[str, float], what: str, remedy: str) -> None:
    """`need` (Ray resources, described as `what`) against the Ray instance's. A local instance this process
    started never grows, and work it cannot hold would wait forever (Ray Train retries starting its workers
    without end; Ray Data waits for a free CPU), so that is an error, now, saying `remedy`. A cluster may
    grow (an autoscaler adds nodes), so there it is a warning that says what is missing."""
    import ray

    have = ray.cluster_resources()
    if all(n <= have.get(name, 0) + 1e-9 for name, n in need.items()):
        return
    has = " and ".join(f"{have.get(name, 0):g} {name}" for name in need)
    if _started_ray_here():
        raise ValueError(f"this run needs {what}, and the local Ray instance it started has {has}: {remedy}, or "
                         "submit it to a cluster")
    log.warning("this run needs %s, and the Ray cluster has %s now: it waits for nodes to join (an autoscaler adds "
                "them; until then Ray retries starting its work)", what, has)


def _started_ray_here() -> bool:
    """Whether this process's `ray.init` started the Ray instance (a local one, no autoscaler) rather
    than joined a cluster. Only Ray's node object knows; should that change, the answer is False,
    and a run that does not fit waits, as on a cluster."""
    import ray._private.worker

    return getattr(getattr(ray._private.worker, "_global_node", None), "head", False) is True


@contextlib.contextmanager
def _environment_defaults(values: dict[str, str]):
    """`values` in this process's environment where unset, while the block runs."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _drop_worker_progress_bars() -> None:
    """Forget the workers' progress bars once training has returned.

    Ray (2.60) renders a worker's `tqdm_ray` bar on the driver; its closing state can reach the driver
    a second time after the bar was removed, which re-creates it, never to be closed again: a stale
    "fine-tune steps: 100%" line then redraws under every later print of the driver (the quickstart's
    whole report). Nothing of the run is shown by them any more, so they are all dropped here.
    """
    try:
        from ray.experimental import tqdm_ray

        manager = tqdm_ray._manager  # None: no bar was ever shown here
        if manager is None:
            return
        with manager.lock:
            for group in manager.bar_groups.values():
                for bar in group.bars_by_uuid.values():
                    bar.close()
            manager.bar_groups.clear()
    except (ImportError, AttributeError) as e:  # another Ray layout: a cosmetic loss, not a failure
        log.debug("could not drop the workers' progress bars: %s", e)


def cli_main(argv: list[str] | None, parser: argparse.ArgumentParser, config_cls: type[FinetuneConfig],
             run_fn) -> int:
    """Parse flags (over the YAML config) into `config_cls` and `run_fn` it; exit code 2 on a clear error."""
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_file = args.pop("config")
    try:
        check_no_shadowing("pipelines.train_loop", "fdllm.model")  # what the Ray Train workers import
        cfg = config_cls.from_sources(config_file, **args)
        run_fn(cfg)
    except USER_ERRORS as e:  # under the program's own logger name: fdllm.finetune, fdllm.distill
        logging.getLogger(parser.prog.replace("fdllm-", "fdllm.", 1)).error("%s", e)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, build_parser(), FinetuneConfig, run)


if __name__ == "__main__":
    sys.exit(main())
