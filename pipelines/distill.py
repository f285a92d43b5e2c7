"""Certainty-forcing self-distillation of a block-diffusion checkpoint (docs/method.md §5, dParallel) with Ray.

Locally (starts a Ray instance in the process; the tiny world's fine-tuned model, a few minutes):
    python pipelines/distill.py --config pipelines/configs/tiny-distill.yaml --output /tmp/fdllm/tiny-distilled

On a Ray cluster, as the fine-tune (`ray job submit ... -- python pipelines/distill.py ...`), with
`--engine-gpus 1 --engine-actors N` for GPU decoding actors and `--use-gpu --num-workers M` for training.

Two stages, one run:
1. Trajectories: Ray Data reads the SFT records (`--data`, the fine-tune's formats and bad-row rules);
   `--engine-actors` actors each load `--model` into an `fdllm.Engine` and decode every prompt greedily
   in block-diffusion mode (`pipelines/trajectories.py`). A trajectory whose final answer differs from
   the record's reference answer is dropped, or replaced by the reference (`--wrong-trajectories`);
   correct, dropped, replaced and bad rows are counted and logged. The records go to
   `--trajectories` (default STORAGE_PATH/RUN_NAME/trajectories): trajectories.jsonl and summary.json.
   A run that finds summary.json there (e.g. `--resume`) reuses them instead of decoding again, if they
   were made with the same --model (and, for an export, the same export of it), --data,
   --wrong-trajectories, --trajectory-threshold and --trajectory-max-new-tokens (otherwise it stops and
   says which differ: give a new --trajectories).
2. Training: Ray Train continues training `--model` on those records with the fine-tune's machinery
   (`pipelines/finetune.py`: same flags, checkpoints, `--resume`, failure retries, servable export at
   `--output`), the objective being the §2 loss on both complementary views plus
   `--certainty-weight` (lambda, 2.0) x the mean entropy of softmax(logits / `--certainty-temperature`
   (0.5)) over the masked positions the model already predicts correctly (`fdllm.objective`). A
   checkpoint fine-tuned with `--objective joint` is distilled with the joint objective whose
   block-diffusion part carries that term ("joint-certainty"): it keeps its AR mode and so its
   lossless `mode="speculative"`.

`--block-size` and `--sub-block-size` must be the checkpoint's (its fdllm_config.json).
`python pipelines/distill.py --help` lists every option; a YAML config holds them as in the fine-tune.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fdllm.storage import export_id, filesystem, join, read_text, same_or_under, write_bytes  # noqa: E402
from pipelines.data import check_data_files, read_raw_records  # noqa: E402
from pipelines.finetune import build_parser, build_trainer, check_fits, check_output, cli_main, fit, resolve_run  # noqa: E402
from pipelines.finetune_config import DistillConfig  # noqa: E402
from pipelines.trajectories import CORRECT, DROPPED, REPLACED, TrajectoryGenerator, split_windows  # noqa: E402

if TYPE_CHECKING:
    import ray.train

log = logging.getLogger("fdllm.distill")

TRAJECTORIES_FILE, SUMMARY_FILE = "trajectories.jsonl", "summary.json"
PROGRESS_EVERY_S = 10.0  # the trajectory stage logs its progress at most this often


def check_checkpoint(cfg: DistillConfig) -> DistillConfig:
    """The model must be a block-diffusion checkpoint of this run's block layout (before any work starts).
    Returns the run's config: the checkpoint's block layout where the run gives none, and for a
    causal-prefix (joint) checkpoint the joint objective carrying the certainty term ("joint-certainty"),
    so it keeps its AR and speculative modes."""
    from fdllm.config import BlockDiffusionConfig
    from fdllm.loader import check_checkpoint as check_loadable

    saved = BlockDiffusionConfig.load(check_loadable(cfg.model))  # a broken file fails here, not in every actor
    if saved is None or saved.mask_token_id is None:
        raise ValueError(f"{cfg.model} is no block-diffusion checkpoint (no fdllm_config.json with a mask token): "
                         "distil a fine-tuned model (pipelines/finetune.py)")
    layout = (cfg.block_size or saved.block_size, cfg.sub_block_size or saved.sub_block_size)
    if layout != (saved.block_size, saved.sub_block_size):
        raise ValueError(f"--block-size/--sub-block-size ({layout[0]}/{layout[1]}) must be the checkpoint's "
                         f"({saved.block_size}/{saved.sub_block_size}): leave them out to use its own")
    cfg = dataclasses.replace(cfg, block_size=saved.block_size, sub_block_size=saved.sub_block_size)
    if saved.causal_prefix and cfg.objective == "certainty":
        log.info("%s was fine-tuned with the joint objective (causal clean stream): distilling with "
                 "joint-certainty, which keeps its AR loss and causal prefix", cfg.model)
        return dataclasses.replace(cfg, objective="joint-certainty")
    return cfg


def generate_trajectories(cfg: DistillConfig, directory: str) -> dict[str, int]:
    """Decode the SFT prompts with Ray Data engine actors and write the distillation records to
    `directory` (local or URI); returns the count per status. Reuses a finished earlier write."""
    import ray.data

    summary = read_summary(directory)
    if summary is not None:
        check_reusable(summary, cfg, directory)
        log.info("reusing the trajectories in %s: %s", directory, summary["counts"])
        return summary["counts"]
    ray.data.DataContext.get_current().enable_progress_bars = False
    sources = check_data_files(cfg.data)
    generator = {
        "fn_constructor_kwargs": {"model": cfg.model, "max_new_tokens": cfg.trajectory_max_new_tokens,
                                  "threshold": cfg.trajectory_threshold, "wrong": cfg.wrong_trajectories,
                                  "device": "cuda" if cfg.engine_gpus > 0 else "cpu",
                                  "max_num_seqs": cfg.trajectory_batch_size},
        "batch_size": cfg.trajectory_batch_size, "batch_format": "pyarrow",
        "compute": ray.data.ActorPoolStrategy(size=cfg.engine_actors),  # `concurrency=` is deprecated in Ray 2.51+
        "num_cpus": cfg.engine_cpus, "num_gpus": cfg.engine_gpus,
    }
    counts: Counter[str] = Counter()
    logged = time.monotonic()
    fs, root = filesystem(directory)
    root = root.rstrip("/")
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{TRAJECTORIES_FILE}") as out:
        # a row of the read is a pack window of many records: one row per record instead, in blocks of a
        # batch: a read split (8 MB, thousands of records) is one block, which only one engine actor would
        # decode, its records coming back (and logged) only once all are done
        raw = read_raw_records(sources, cfg.data_config(), cfg.data_cpus).map_batches(
            split_windows, batch_size=None, batch_format="pyarrow", num_cpus=cfg.data_cpus,
        ).repartition(target_num_rows_per_block=cfg.trajectory_batch_size)
        for batch in raw.map_batches(TrajectoryGenerator, **generator).iter_batches(batch_size=None, batch_format="numpy"):
            for record, status in zip(batch["record"], batch["status"]):
                counts[status] += 1
                if record:
                    out.write(record.encode() + b"\n")
            if time.monotonic() - logged >= PROGRESS_EVERY_S:  # a line per batch would be hundreds of lines
                logged = time.monotonic()
                log.info("trajectories: %d records so far, %d correct", sum(counts.values()), counts[CORRECT])
    # written last, whole: its presence says the trajectories are complete (a rerun reuses them)
    write_bytes(join(directory, SUMMARY_FILE), json.dumps({"counts": dict(counts), **made_with(cfg)}, indent=2).encode())
    return dict(counts)


def read_summary(directory: str) -> dict[str, Any] | None:
    """summary.json of the trajectories in `directory`, or None when none were completed there; ValueError
    for one that is no summary (cut short, edited): it would fail later with a bare JSON error or a traceback."""
    path = join(directory, SUMMARY_FILE)

    def no_summary(why: str) -> ValueError:
        return ValueError(f"{path} is no summary of trajectories: {why}; remove it to decode them again, or give "
                          "another --trajectories path")

    try:
        summary = json.loads(read_text(path))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise no_summary(f"not JSON ({e})") from None
    counts = summary.get("counts") if isinstance(summary, dict) else None
    if not isinstance(counts, dict) or not all(isinstance(n, int) for n in counts.values()):
        raise no_summary('no "counts" of records per status')
    return summary


def made_with(cfg: DistillConfig) -> dict[str, Any]:
    """What decides the trajectories, recorded in summary.json: reused only when these are the same. The
    model's export id tells a model fine-tuned again into the same path from the one they were made with."""
    return {"model": cfg.model, "model_export_id": export_id(cfg.model), "data": list(cfg.data),
            "wrong_trajectories": cfg.wrong_trajectories,
            "trajectory_threshold": cfg.trajectory_threshold, "trajectory_max_new_tokens": cfg.trajectory_max_new_tokens}


def check_reusable(summary: dict[str, Any], cfg: DistillConfig, directory: str) -> None:
    """ValueError naming each option the trajectories in `directory` were not made with (an option an
    older summary.json lacks counts as different): training on another model's or data's trajectories
    would go unnoticed."""
    def label(key: str) -> str:
        return "the --model export's id" if key == "model_export_id" else f"--{key.replace('_', '-')}"

    differ = [f"{label(key)} {repr(summary[key]) if key in summary else 'not recorded'}, now {value!r}"
              for key, value in made_with(cfg).items() if summary.get(key, ()) != value]
    if differ:
        raise ValueError(f"the trajectories in {directory} were made with other options ({'; '.join(differ)}): "
                         "give a new --trajectories path to decode them again"
                         + (" (in a new run: a resumed run trains on the data it began with)" if cfg.resume else ""))


def log_counts(counts: dict[str, int], wrong: str) -> None:
    decoded = counts.get(CORRECT, 0) + counts.get(DROPPED, 0) + counts.get(REPLACED, 0)
    bad = {k: v for k, v in counts.items() if k.startswith("bad_") and v}
    log.info("trajectories: %d decoded, %d correct (%.1f%%), %d wrong -> %s%s", decoded, counts.get(CORRECT, 0),
             100 * counts.get(CORRECT, 0) / max(decoded, 1), counts.get(DROPPED, 0) + counts.get(REPLACED, 0),
             "replaced by the reference" if wrong == "reference" else "dropped",
             f"; bad rows skipped {bad}" if bad else "")


def run(cfg: DistillConfig) -> "ray.train.Result":
    """Trajectories, then training on them; the workers publish the servable checkpoint at `cfg.output`."""
    import ray

    cfg = resolve_run(cfg)
    cfg = check_checkpoint(cfg)
    if not cfg.trajectories:
        cfg = dataclasses.replace(cfg, trajectories=join(cfg.storage_path, cfg.run_name, "trajectories"))
    # said before the decoding (minutes to hours): the run's name, chosen here when none was given, is what
    # a rerun needs to reuse the trajectories and resume the training
    log.info("run %s: trajectories in %s; if it stops, the same command with --run-name %s (and --resume once "
             "training has begun) continues it", cfg.run_name, cfg.trajectories, cfg.run_name)
    check_data_files(cfg.data)  # what would fail after the trajectories fails now, before Ray starts
    check_output(cfg)  # an existing run without --resume, too
    if same_or_under(cfg.trajectories, cfg.output):  # the export, after training, would refuse them (other files)
        raise ValueError(f"--trajectories {cfg.trajectories} is inside --output {cfg.output}, which the export "
                         "replaces: give them directories apart")
    if not ray.is_initialized():
        ray.init()
    if read_summary(cfg.trajectories) is None:  # decoding them: the engine actors beside one data task
        gpus = {"GPU": cfg.engine_actors * cfg.engine_gpus} if cfg.engine_gpus else {}
        check_fits({"CPU": cfg.engine_actors * cfg.engine_cpus + cfg.data_cpus, **gpus},
                   f"{cfg.engine_actors} engine actor(s) x {cfg.engine_cpus:g} CPU"
                   f"{f' and {cfg.engine_gpus:g} GPU' if cfg.engine_gpus else ''} + {cfg.data_cpus:g} CPU for the data "
                   "to decode the trajectories", "lower --engine-actors, --engine-cpus or --data-cpus")
    counts = generate_trajectories(cfg, cfg.trajectories)
    log_counts(counts, cfg.wrong_trajectories)
    if not counts.get(CORRECT, 0) + counts.get(REPLACED, 0):
        if not counts.get(DROPPED, 0):  # nothing was decoded: --reference would not help
            bad = {k: v for k, v in counts.items() if k.startswith("bad_")}
            raise ValueError(f"no trajectory to train on: no record of --data could be decoded (bad rows skipped: "
                             f"{bad or 'none'}: docs/finetune.md lists the reasons)")
        raise ValueError("no trajectory to train on: every one was wrong (try --wrong-trajectories reference)")
    train_cfg = dataclasses.replace(cfg, data=[join(cfg.trajectories, TRAJECTORIES_FILE)])
    return fit(build_trainer(train_cfg), train_cfg, "distilling")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        DistillConfig, prog="fdllm-distill",
        description="Certainty-forcing self-distillation of a block-diffusion checkpoint with Ray Data + Ray Train.",
        epilog="Example: python pipelines/distill.py --config pipelines/configs/tiny-distill.yaml",
    )
    return cli_main(argv, parser, DistillConfig, run)


if __name__ == "__main__":
    sys.exit(main())
