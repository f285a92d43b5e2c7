"""What a fine-tune checkpoint holds, what of it is servable, and what each worker reads back.

A training checkpoint (reported to Ray Train, stored under `storage_path`) is an HF directory
(config.json, safetensors, tokenizer, fdllm_config.json) plus `train_state.pt` (step, data position,
optimizer state under DDP) and, under DeepSpeed, `deepspeed/` with one optimizer shard per rank.

- `export_servable`: the HF part alone, published at a stable path (`--output`) at every
  checkpoint, so Serve replicas download weights and tokenizer, never optimizer state.
- `restore_for_rank`: on resume a worker downloads the HF part, `train_state.pt`, DeepSpeed's
  shared files and its own rank's shards, not every rank's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from fdllm.storage import publish_dir

if TYPE_CHECKING:
    import ray.train

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
# A run whose data gave no training batch: the rows its first pass counted, which rank 0 writes in
# the run directory for the driver's error (Ray Train keeps the metrics of checkpoints only)
NO_BATCH_COUNTS = "no_batch_counts.json"
DIVERGED = "diverged.json"  # the step and loss of a run whose workers stopped at a non-finite loss or weights
DEEPSPEED_DIR = "deepspeed"
NOT_SERVABLE = (TRAIN_STATE, f"{DEEPSPEED_DIR}/*")  # glob patterns on paths relative to the checkpoint
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
