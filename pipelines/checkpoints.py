"""What a fine-tune checkpoint holds, what of it is servable, and what each worker reads back.

A training checkpoint (reported to Ray Train, stored under `storage_path`) is an HF directory
(config.json, safetensors, tokenizer, fdllm_config.json) plus `train_state.pt` (step, data position,
optimizer state under DDP), `run_settings.json` (the options of the run that wrote it) and, under
DeepSpeed, `deepspeed/` with one optimizer shard per rank.

- `export_servable`: the HF part alone, published at a stable path (`--output`) at every
  checkpoint, so Serve replicas download weights and tokenizer, never optimizer state.
- `check_resume`: on `--resume`, the driver holds the options given against those the run's latest
  checkpoint recorded, before anything runs: its data position means nothing in another data layout.
- `restore_for_rank`: on resume a worker downloads the HF part, `train_state.pt`, DeepSpeed's
  shared files and its own rank's shards, not every rank's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from fdllm.storage import join, publish_dir, read_text

if TYPE_CHECKING:
    import ray.train

    from pipelines.finetune_config import FinetuneConfig

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
# A run whose data gave no training batch: the rows its first pass counted, which rank 0 writes in
# the run directory for the driver's error (Ray Train keeps the metrics of checkpoints only)
NO_BATCH_COUNTS = "no_batch_counts.json"
DIVERGED = "diverged.json"  # the step and loss of a run whose workers stopped at a non-finite loss or weights
RUN_SETTINGS = "run_settings.json"  # the run's options when it saved the checkpoint: what a resume is held to
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, in its directory
DEEPSPEED_DIR = "deepspeed"
NOT_SERVABLE = (TRAIN_STATE, RUN_SETTINGS, f"{DEEPSPEED_DIR}/*")  # glob patterns on paths relative to the checkpoint
_RANK_SHARD = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files: ZeRO optimizer/params


def export_servable(checkpoint_dir: str | Path, output: str) -> None:
    """Publish the servable part of a local checkpoint directory at `output` (local path or URI)."""
    publish_dir(checkpoint_dir, output, skip=NOT_SERVABLE)


def files_for_rank(names: list[str], rank: int) -> list[str]:
    """The checkpoint files (relative paths) worker `rank` needs to resume: all but other ranks'
    DeepSpeed shards."""
    needed = []
    for name in names:
        shard = _RANK_SHARD.search(name.rsplit("/", 1)[-1])
        if name.startswith(f"{DEEPSPEED_DIR}/") and shard and int(shard.group(1)) != rank:
            continue
        needed.append(name)
    return needed


def restore_for_rank(checkpoint: "ray.train.Checkpoint", dest: Path, rank: int) -> Path:
    """Copy what `rank` needs of a (possibly remote) Ray Train checkpoint into `dest`."""
    import shutil

    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    names = sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)
    wanted = files_for_rank(names, rank)
    for name in wanted:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{name}") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    log.info("rank %d restored %d of %d checkpoint files from %s", rank, len(wanted), len(names), checkpoint.path)
    return dest


# What the saved data position (the sequences each worker's shard consumed in the epoch) is counted in: the
# rows each worker's shard holds and their order follow from the data, its rendering and packing, and the
# worker layout. Resumed with another value of one, every worker would skip the wrong sequences. --model too:
# the data is tokenized with its tokenizer, and a resume takes its weights from the checkpoint, not from it.
DATA_POSITION = ("model", "data", "num_workers", "batch_size", "seq_len", "block_size", "strip_reasoning",
                 "overlong", "docs_per_batch")
NOT_COMPARED = ("resume",)  # off in the run that started it, on in the one that continues it


def run_settings(cfg: FinetuneConfig) -> bytes:
    """The run's options as `RUN_SETTINGS` holds them (JSON: every option is a string, number, bool or list)."""
    return json.dumps(dataclasses.asdict(cfg), indent=1).encode()


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """Where the checkpoint a resumed run continues from is (the latest in Ray Train's snapshot of the
    run), or None when the run has none. ValueError when the snapshot is not as Ray 2.60 writes it."""
    run_dir = join(storage_path, run_name)
    try:
        snapshot = json.loads(read_text(join(run_dir, SNAPSHOT)))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result") if isinstance(snapshot, dict) else None
    if latest is None:
        return None
    if not isinstance(latest, dict) or not isinstance(latest.get("checkpoint_dir_name"), str):
        raise ValueError(f"{join(run_dir, SNAPSHOT)} names no latest checkpoint where Ray 2.60 writes it")
    return join(run_dir, latest["checkpoint_dir_name"])


def check_resume(cfg: FinetuneConfig) -> str | None:
    """Hold a resumed run's options to those its latest checkpoint recorded, before anything runs; returns
    that checkpoint (None: there is none, the run starts from the base model).

    A change of a `DATA_POSITION` option is a ValueError naming each (saved and given values): the saved
    data position would skip the wrong rows. Any other change (lr, max_steps, save cadence, ...) applies
    from the checkpoint on, with a warning. A checkpoint written before runs recorded their options
    resumes with a warning that nothing could be checked."""
    try:
        checkpoint = latest_checkpoint(cfg.storage_path, cfg.run_name)
    except ValueError as e:  # Ray Train resumes from it all the same
        log.warning("%s: resuming without checking the options of its latest checkpoint", e)
        return None
    if checkpoint is None:
        log.warning("no checkpoint of run %r in %s: starting it from the base model", cfg.run_name, cfg.storage_path)
        return None
    try:
        saved = json.loads(read_text(join(checkpoint, RUN_SETTINGS)))
    except FileNotFoundError:
        log.warning("checkpoint %s records no run options (written before fdllm recorded them): resuming without "
                    "checking that its data layout (%s) is the one given", checkpoint, ", ".join(map(_flag, DATA_POSITION)))
        return checkpoint
    given = json.loads(run_settings(cfg))  # as saved: lists, not tuples
    changed = {name: (saved.get(name), value) for name, value in given.items()
               if name not in NOT_COMPARED and saved.get(name) != value}
    refused = [f"{_flag(name)} {old!r}, now {new!r}" for name, (old, new) in changed.items() if name in DATA_POSITION]
    if refused:
        raise ValueError(
            f"run {cfg.run_name!r} was checkpointed ({checkpoint}) with other options that its saved data position "
            f"depends on ({'; '.join(refused)}): resume it with those, or start a fresh run from its weights with "
            f"another --run-name, no --resume and --model {checkpoint}")
    if changed:
        log.warning("resuming run %r with options changed since checkpoint %s, which apply from here on: %s",
                    cfg.run_name, checkpoint, "; ".join(f"{_flag(n)} {old!r} -> {new!r}" for n, (old, new) in changed.items()))
    return checkpoint


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
