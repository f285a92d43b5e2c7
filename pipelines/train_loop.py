"""The Ray Train worker loop of `pipelines/finetune.py`: block-diffusion fine-tuning, one process per worker.

Per step every worker takes `batch_size` packed sequences from its streamed dataset shard, builds the
two-stream noisy/clean input (docs/method.md §2; both complementary copies beside one shared clean stream,
`[x_t ; x_t' ; x_0]`, the same loss and gradients as two `[x_t ; x_0]` rows for 3/4 of the tokens), and
adds up the masked-token cross-entropy. The loss is
normalised by the *global* number of masked tokens, so DDP's gradient averaging yields exactly the
gradient of one big batch: N workers train like 1 worker with N times the batch.

Noise is drawn from a generator seeded by (seed, step, sequence content), so it depends neither on
the worker count nor on which worker gets a sequence, and a resumed run draws what the original
would have drawn.

Checkpoints are HF directories (weights, tokenizer, fdllm_config.json) plus `train_state.pt`
(optimizer, step, data position, bad-row counts), reported through `ray.train.report`; before each
report, rank 0 publishes the servable part at `cfg.output` (pipelines/checkpoints.py; `_report` says
why before). On restart
(FailureConfig retries, or `--resume`) each worker downloads what it needs, restores it and skips the
sequences its shard already consumed in the current epoch.

Shape legend: B sequences per worker, L sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import fdllm
from fdllm.config import BlockDiffusionConfig
from fdllm.objective import (
    TwoStreamBatch,
    certainty_forcing_loss,
    compact_noisy_blocks,
    joint_loss,
    two_stream_batch,
    two_stream_loss,
)
from fdllm.storage import join, local_checkpoint, remove_dir, write_bytes
from fdllm.tokenizer import add_mask_token, load_tokenizer
from pipelines.checkpoints import (
    DEEPSPEED_DIR,
    DIVERGED,
    NO_BATCH_COUNTS,
    RUN_SETTINGS,
    TRAIN_STATE,
    export_servable,
    restore_for_rank,
    run_settings,
)
from pipelines.data import BAD_REASONS, summarize_bad_rows
from pipelines.finetune_config import FinetuneConfig

log = logging.getLogger(__name__)

BATCH_COLUMNS = ("input_ids", "labels", "position_ids", "doc_ids")
GOOD_DOCS = "good_docs"  # counted next to BAD_REASONS: the rows that became training documents
PREFETCH_BATCHES = 2  # batches a worker's shard iterator fetches ahead of the one that trains
CONSOLIDATED_WEIGHTS = "consolidated.pt"  # DeepSpeed's full state dict, in a temporary dir of rank 0
# train_state.pt's mark of an optimizer in `weight_decay_groups`' layout; a checkpoint without it decayed every
# parameter in one group, and its optimizer state (DDP's, or DeepSpeed's flat partitions) loads only into that
DECAY_MATRICES = "decay_matrices"


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights and optimizer."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the data started
    consumed: int = 0  # sequences this worker's shard consumed in the current epoch
    tokens: int = 0  # non-padding tokens trained on, all workers
    bad_rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))  # all workers, epoch 0
    good_docs: int = 0  # rows that became documents, all workers, epoch 0 (the base of the skipped share)


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _row_seed(seed: int, step: int, ids_L: np.ndarray) -> int:
    digest = hashlib.blake2b(ids_L.tobytes(), digest_size=8, key=f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def diffusion_loss_sum(
    model: torch.nn.Module,
    batch: dict[str, np.ndarray],
    mask_token_id: int,
    block_size: int,
    eps: float,
    seed: int,
    step: int,
    device: torch.device,
    joint_weights: tuple[float, float] | None = None,
    certainty: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed block-diffusion cross-entropy of a packed batch and the number of masked tokens.

    As `fdllm.objective.block_diffusion_loss`, but each row is noised by its own generator seeded
    from (seed, step, row content): the noise of a sequence is the same on any worker layout.
    `joint_weights` (ar, diffusion): the joint objective (`fdllm.objective.joint_loss`) instead.
    `certainty` (lambda, T): the self-distillation loss (`fdllm.objective.certainty_forcing_loss`)
    instead, or with `joint_weights` the joint loss's diffusion part; its entropy term is a mean over
    this worker's correct positions, weighted across workers like the cross-entropy (by masked-token share).
    The noisy blocks that carry no target leave the batch (`fdllm.objective.compact_noisy_blocks`: the
    same loss and gradients from fewer tokens; `benchmarks.bench_train`'s "diffusion-uncut" measures it).
    """
    ids_BL, labels_BL, pos_BL, docs_BL = (torch.from_numpy(batch[c]).long() for c in BATCH_COLUMNS)
    rows = []
    for i in range(ids_BL.shape[0]):  # noise on the host: a per-row CPU generator, no device sync
        gen = torch.Generator().manual_seed(_row_seed(seed, step, batch["input_ids"][i]))
        row = slice(i, i + 1)
        rows.append(two_stream_batch(
            ids_BL[row], labels_BL[row], mask_token_id, block_size, eps, pos_BL[row], docs_BL[row], gen,
            share_clean=True,
        ))
    def stacked(name: str) -> Tensor:
        return torch.cat([getattr(r, name) for r in rows])

    noised = TwoStreamBatch(  # ids/positions [B, 3L] ([x_t ; x_t' ; x_0]), targets [2B, L], doc ids [B, L]
        input_ids=stacked("input_ids"), position_ids=stacked("position_ids"),
        targets=stacked("targets"), doc_ids=stacked("doc_ids"), ar_targets=stacked("ar_targets"),
        noisy_streams=rows[0].noisy_streams,
    )
    # compacted on the host, like the noise: the kept lengths are known without a device sync
    noised = compact_noisy_blocks(noised, block_size).to(device)
    if joint_weights is not None:
        loss, count = joint_loss(model, noised, block_size, *joint_weights, certainty=certainty)
    elif certainty is not None:
        loss, count = certainty_forcing_loss(model, noised, block_size, *certainty)
    else:
        loss, count = two_stream_loss(model, noised, block_size)
    return loss * count, count


def objective_kwargs(cfg: FinetuneConfig) -> dict[str, tuple[float, float] | None]:
    """`diffusion_loss_sum`'s objective arguments for the run's `objective`."""
    return {
        "joint_weights": (cfg.ar_loss_weight, cfg.diffusion_loss_weight) if cfg.causal_prefix else None,
        "certainty": (cfg.certainty_weight, cfg.certainty_temperature) if "certainty" in cfg.objective else None,
    }


class ShardReader:
    """Batches of `batch_size` packed sequences from a worker's dataset shard, epoch after epoch.

    Bad-row counts are taken when the rows carrying them are consumed, so a checkpoint's counts and
    data position agree; `skip` drops sequences an interrupted run already trained on.
    """

    def __init__(self, shard: Any, batch_size: int, skip: int = 0) -> None:
        self.shard, self.batch_size, self.skip = shard, batch_size, skip
        self.bad_rows: Counter[str] = Counter()  # consumed by this worker since the last `take_counts`
        self.consumed = skip
        self._rows: Iterator[dict[str, Any]] | None = None

    def take_counts(self) -> Counter[str]:
        counts, self.bad_rows = self.bad_rows, Counter()
        return counts

    def new_epoch(self) -> None:
        self._rows, self.consumed = None, 0

    def drain(self) -> None:
        """Count the rows left in this epoch of the shard, training on none. When another worker's shard
        runs dry first, the epoch ends for every worker (DDP needs equal steps), and the rows still
        here (a full batch fetched, a carrier of counts) would go uncounted."""
        for _ in self._sequence_iterator():
            pass

    def _iter_rows(self) -> Iterator[dict[str, Any]]:
        """The shard's rows, fetched as numpy batches with prefetch (the next batches are already on
        their way while this one trains); rows are kept in order so counts and skips stay exact."""
        for chunk in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                             prefetch_batches=PREFETCH_BATCHES):
            for i in range(len(chunk["num_docs"])):
                yield {column: values[i] for column, values in chunk.items()}

    def _sequences(self) -> Iterator[dict[str, Any]]:
        """The shard's rows that hold documents, past `skip`; each row read adds its counts to `bad_rows`
        (a row of no documents only carries counts, or pads a block: `build_dataset`'s row_multiple).
        A batch's counts are then those of the rows up to its last: the generator waits there."""
        for row in self._iter_rows():
            if self.skip:
                self.skip -= int(row["num_docs"] > 0)
                continue
            self.bad_rows.update({r: int(row[f"bad_{r}"]) for r in BAD_REASONS})
            self.bad_rows[GOOD_DOCS] += int(row["num_docs"])
            if row["num_docs"] > 0:
                yield row

    def _sequence_iterator(self) -> Iterator[dict[str, Any]]:
        if self._rows is None:
            self._rows = self._sequences()
        return self._rows

    def next_batch(self) -> dict[str, np.ndarray] | None:
        """The next batch, or None when this shard's epoch has no full batch left."""
        picked = list(itertools.islice(self._sequence_iterator(), self.batch_size))
        if len(picked) < self.batch_size:  # a partial batch at the end of an epoch is dropped, its counts kept
            return None
        self.consumed += len(picked)
        return {c: np.stack([r[c] for r in picked]) for c in (*BATCH_COLUMNS, "num_tokens")}


class Parallel:
    """The model as trained: DDP or a DeepSpeed ZeRO engine, behind one small interface.

    DeepSpeed runs the same code on GPUs and on CPUs (its accelerator is the worker's: CUDA, or the
    CPU with DS_ACCELERATOR=cpu, which `pipelines.finetune.worker_env` sets for CPU runs, over gloo).
    """

    def __init__(self, model: torch.nn.Module, cfg: FinetuneConfig, device: torch.device, decay_all: bool = False) -> None:
        """`decay_all`: weight decay on every parameter, as runs before `DECAY_MATRICES` did: their optimizer
        state (one parameter group) resumes only into that layout."""
        self.cfg, self.device, self.decay_all = cfg, device, decay_all
        self.deepspeed = cfg.strategy == "deepspeed" or (cfg.strategy == "auto" and cfg.use_gpu and has_deepspeed())
        params = model.parameters() if decay_all else weight_decay_groups(model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
            fused=device.type == "cuda" and not self.deepspeed,
        )
        self.bf16 = cfg.precision == "bf16" and device.type == "cuda"
        if self.deepspeed:
            import deepspeed

            if device.type == "cpu":
                skip_deepspeed_shm_build()
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self._deepspeed_config()
            )
            self.module, self.forward = self.engine.module, self.engine
        else:
            import ray.train.torch

            self.module = model.to(device)
            self.forward = ray.train.torch.prepare_model(self.module, move_to_device=False)  # DDP if world > 1
            self.optimizer = optimizer
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 and not self.deepspeed else nullcontext()

    def _deepspeed_config(self) -> dict[str, Any]:
        cfg = self.cfg
        zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
        if cfg.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # what `save_16bit_model` exports
        return {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "bf16": {"enabled": self.bf16},
            "zero_optimization": zero,
            "steps_per_print": 1 << 30,  # we log ourselves
        }

    def step(self, loss: Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.deepspeed:
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def weights_finite(self) -> bool:
        """Whether this rank's weights (its partition of them under ZeRO-3) are all finite."""
        return bool(torch.stack([torch.isfinite(p).all() for p in self.module.parameters()]).all())

    def hf_module(self) -> torch.nn.Module | None:
        """The full model to export in HF format, on rank 0; None elsewhere (every rank must call it).

        Under DeepSpeed the weights come from its public consolidation, `save_16bit_model` (under
        ZeRO-3 a layer-by-layer gather to rank 0, a collective; the weights keep the training dtype:
        fp32 here, bf16 with --precision bf16), and load strictly into a fresh module: a missing or
        unexpected tensor is an error, not a silently random weight.
        """
        if not self.deepspeed:
            return self.module if _rank() == 0 else None
        with tempfile.TemporaryDirectory(prefix="fdllm-consolidated-") as tmp:
            if not self.engine.save_16bit_model(tmp, CONSOLIDATED_WEIGHTS):
                raise RuntimeError("DeepSpeed did not consolidate the weights (stage3_gather_16bit_weights_on_model_save off?)")
            if _rank() != 0:
                return None
            weights = torch.load(Path(tmp) / CONSOLIDATED_WEIGHTS, map_location="cpu", weights_only=True)
        with torch.device("meta"):
            module = type(self.module)(dataclasses.replace(self.module.config))
        module.load_state_dict(weights, strict=True, assign=True)
        if module.config.tie_word_embeddings:  # `assign` gave the two names separate parameters
            module.lm_head.weight = module.model.embed_tokens.weight
        return module

    def save_optimizer(self, path: Path) -> dict[str, Any]:
        """Save optimizer state (all ranks under DeepSpeed); returns what goes into train_state.pt."""
        if self.deepspeed:
            self.engine.save_checkpoint(str(path / DEEPSPEED_DIR), tag="latest", save_latest=False)
            return {}
        return {"optimizer": self.optimizer.state_dict()}

    def load_optimizer(self, path: Path, saved: dict[str, Any]) -> None:
        """Restore optimizer state (and, under DeepSpeed, its weights: ZeRO-3's fp32 partitions);
        each rank reads the shared files and its own shards only (`restore_for_rank`)."""
        if self.deepspeed:
            loaded, _ = self.engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag="latest", load_module_strict=True)
            if loaded is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {path / DEEPSPEED_DIR}")
        else:
            self.optimizer.load_state_dict(saved["optimizer"])


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups that decay the matrices (2-D and up: linear layers, embeddings, the LM head)
    and not the vectors (RMSNorm gains, biases), as nanoGPT and HF's Trainer do: decay pulls a weight
    towards 0, a regulariser for a matrix but, for a norm's gain (a scale near 1) or a bias, a drift
    from the function the base model learned, with nothing to regularise. Embeddings are decayed, as in
    nanoGPT (HF's Trainer does too: it spares only norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def skip_deepspeed_shm_build() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce op.

    `deepspeed.initialize` on the CPU accelerator JIT-compiles that op (C++ with ninja: 44 s on a
    2-core machine, once per node's torch_extensions cache, so on every fresh CI machine and cloud
    node) though only its tensor-parallel inference (`inference_all_reduce`) calls it; training's
    collectives go through torch.distributed (gloo) either way. Marked incompatible, DeepSpeed skips
    it as it does on platforms without it. A DeepSpeed without this table keeps its own behaviour.
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # probed once per process, then cached
    if isinstance(compatible, dict) and "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def has_deepspeed() -> bool:
    """Whether deepspeed is importable (without importing it: its import takes seconds)."""
    return importlib.util.find_spec("deepspeed") is not None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """One small collective for several host scalars (float64 keeps token counts exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op)
    return t.tolist()  # host sync: the values are logged and branched on


def _collect_bad_rows(reader: ShardReader, state: TrainState) -> None:
    """Add the rows all workers skipped (and the good ones) since the last call (a collective). Only
    the first pass over the data counts: later epochs re-read the same rows."""
    local = reader.take_counts()
    keys = (*BAD_REASONS, GOOD_DOCS)
    counts = _all_reduce([float(local[k]) for k in keys])
    if state.epoch == 0:
        for reason, n in zip(BAD_REASONS, counts, strict=False):
            state.bad_rows[reason] += int(n)
        state.good_docs += int(counts[-1])


def _write_no_batch_counts(cfg: FinetuneConfig, state: TrainState) -> None:
    """The rows counted by a run whose data gave no batch, for the driver's error (`NO_BATCH_COUNTS`),
    and in this worker's log."""
    log.error("no training batch in an epoch of the data; %s", summarize_bad_rows(state.bad_rows, state.good_docs)[0])
    _leave_for_driver(cfg, NO_BATCH_COUNTS, {"bad_rows": dict(state.bad_rows), "good_docs": state.good_docs})


def _write_diverged(cfg: FinetuneConfig, step: int, loss: float) -> None:
    """The step and loss of a diverged run, for the driver's error (`DIVERGED`), and in this worker's log."""
    log.error("step %d: loss %s, or weights no longer finite: the run diverged; nothing of it is saved", step, loss)
    _leave_for_driver(cfg, DIVERGED, {"step": step, "loss": loss})


def _leave_for_driver(cfg: FinetuneConfig, name: str, value: dict[str, Any]) -> None:
    """`value` as the run's file `name`, for the driver's error after the workers returned early (Ray Train
    keeps only the metrics reported with a checkpoint); if it cannot be written, the log line this
    worker wrote first is all the driver can point to."""
    try:
        write_bytes(join(cfg.storage_path, cfg.run_name, name), json.dumps(value).encode())
    except OSError as e:
        log.warning("could not write %s for the driver: %s", name, e)


def _save_checkpoint(
    directory: Path, parallel: Parallel, tokenizer: Any, block_cfg: BlockDiffusionConfig, state: TrainState,
    cfg: FinetuneConfig,
) -> None:
    """An HF checkpoint directory plus the training state and the run's options (what a resume is held
    to: `pipelines.checkpoints.check_resume`); rank 0 writes all but DeepSpeed shards."""
    optimizer_state = parallel.save_optimizer(directory)
    module = parallel.hf_module()
    if module is None:
        return
    module.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    block_cfg.save(directory)
    torch.save({"state": dataclasses.asdict(state), DECAY_MATRICES: not parallel.decay_all, **optimizer_state},
               directory / TRAIN_STATE)
    (directory / RUN_SETTINGS).write_bytes(run_settings(cfg))


def load_train_state(path: Path) -> dict[str, Any]:
    """A checkpoint's train_state.pt: counters, the optimizer's state dict, the decay layout; tensors and
    plain containers only (`weights_only`): a checkpoint in a shared bucket is no way to run code in the
    workers (a full unpickle runs what the file says)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: `config["cfg"]` is the run's FinetuneConfig."""
    import ray.train
    import ray.train.torch

    cfg: FinetuneConfig = config["cfg"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_ray_train_reports()
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="fdllm-restore-") as restore_dir:
        state, saved, source = TrainState(), None, None
        if checkpoint is not None:  # a restart (FailureConfig) or --resume: continue from the latest
            source = restore_for_rank(checkpoint, Path(restore_dir), rank)  # the storage may be remote
            saved = load_train_state(Path(source) / TRAIN_STATE)
            state = TrainState(**saved["state"])
        else:
            source = local_checkpoint(cfg.model)  # an object-store base: downloaded once per node
        model = fdllm.load_model(source, dtype=torch.float32, device="cpu")
        tokenizer = load_tokenizer(source)
        mask_id = add_mask_token(tokenizer, model)  # a no-op on our own checkpoints
        decay_all = saved is not None and not saved.get(DECAY_MATRICES, False)
        if decay_all and rank == 0 and cfg.weight_decay:
            log.warning("this checkpoint's optimizer decays every parameter (written before norms and biases were "
                        "left undecayed): the run goes on decaying them all")
        parallel = Parallel(model.train(), cfg, device, decay_all=decay_all)
        if saved is not None:
            parallel.load_optimizer(Path(source), saved)
            if rank == 0:
                log.info("resumed from step %d (epoch %d, %d sequences into it)", state.step, state.epoch, state.consumed)
    block_cfg = BlockDiffusionConfig(
        block_size=cfg.block_size, sub_block_size=cfg.sub_block_size, mask_token_id=mask_id, eps=cfg.eps,
        prefix_attention="causal" if cfg.causal_prefix else "block_causal",
    )

    total_steps = cfg.total_steps()
    reader = ShardReader(ray.train.get_dataset_shard("train"), cfg.batch_size, skip=state.consumed)
    progress = _progress_bar(rank, total_steps, state.step)
    meter = _Meter(restored_step=state.step)
    epoch_trained = state.consumed > 0  # a restored run may resume at the very end of an epoch
    while state.step < total_steps:
        batch = reader.next_batch()
        if not _all_reduce([float(batch is not None)], op=dist.ReduceOp.MIN)[0]:
            # Some shard ran dry: the epoch ends for every worker together (DDP needs equal steps).
            if state.epoch == 0:  # the first pass counts every row of the data
                reader.drain()
            _collect_bad_rows(reader, state)
            if not epoch_trained:
                # Returned, not raised: a worker error restarts the worker group (FailureConfig.max_failures,
                # forever at -1), and the same data gives no batch again. The driver raises it (`fit`).
                progress.close()
                if rank == 0:
                    _write_no_batch_counts(cfg, state)
                return
            reader.new_epoch()
            state.epoch, state.consumed, epoch_trained = state.epoch + 1, 0, False
            continue

        lr = lr_at(state.step, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        loss, tokens = _train_step(parallel, batch, mask_id, cfg, state.step, lr, device)
        state.step, state.consumed, epoch_trained = state.step + 1, reader.consumed, True
        state.tokens += tokens
        meter.add(loss, tokens)
        progress.update(1)

        save = state.step % cfg.save_every == 0 or state.step == total_steps
        # A non-finite loss (the global one: every rank sees it), or weights an update made non-finite
        # before a save: the run diverged. Nothing of it may be saved or published (it would replace the
        # last good export); returned, not raised, as above: a restart would diverge again. The driver raises.
        if not math.isfinite(loss) or (save and not _all_reduce([float(parallel.weights_finite())], dist.ReduceOp.MIN)[0]):
            progress.close()
            if rank == 0:
                _write_diverged(cfg, state.step, loss)
            return
        if save or state.step % cfg.log_every == 0:
            _collect_bad_rows(reader, state)
            metrics = meter.metrics(state, lr)
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s, rows skipped %d", state.step, total_steps,
                         metrics["loss"], lr, metrics["tokens_per_s"], sum(state.bad_rows.values()))
            _report(metrics, (parallel, tokenizer, block_cfg, state, cfg) if save else None, cfg.output)
    progress.close()


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every `report` of every rank at INFO, with the whole metrics dict, and every
    checkpoint it persists; rank 0's one line per report (and the progress bar) say what matters."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # another Ray layout: its lines stay, nothing breaks
        return
    for name in (context.__file__, storage.__name__):  # Ray names the first logger by its file
        logging.getLogger(name).setLevel(logging.WARNING)


def _train_step(
    parallel: Parallel, batch: dict[str, np.ndarray], mask_id: int, cfg: FinetuneConfig, step: int, lr: float,
    device: torch.device,
) -> tuple[float, int]:
    """One optimizer step on this worker's batch; returns the global mean loss and token count."""
    with parallel.autocast:
        loss_sum, count = diffusion_loss_sum(parallel.forward, batch, mask_id, cfg.block_size, cfg.eps, cfg.seed, step,
                                             device, **objective_kwargs(cfg))
    # Host sync, once per step: the global masked-token count normalises the loss on every worker.
    totals = _all_reduce([loss_sum.item(), count.item(), float(batch["num_tokens"].sum())])
    global_loss_sum, global_count, global_tokens = totals
    world = dist.get_world_size() if dist.is_initialized() else 1
    # DDP averages gradients over workers; scaling by `world` makes that the gradient of the global mean.
    parallel.step(loss_sum * world / max(global_count, 1.0), lr)
    return global_loss_sum / max(global_count, 1.0), int(global_tokens)


class _Meter:
    """Loss and throughput over the steps since the last report."""

    def __init__(self, restored_step: int) -> None:
        self.restored_step = restored_step
        self._reset()

    def _reset(self) -> None:
        self.start, self.tokens, self.loss, self.steps = time.perf_counter(), 0, 0.0, 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.tokens, self.steps = self.loss + loss, self.tokens + tokens, self.steps + 1

    def metrics(self, state: TrainState, lr: float) -> dict[str, Any]:
        out = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": self.loss / self.steps,  # mean over the window's steps
            "lr": lr,
            "tokens": state.tokens,
            "tokens_per_s": self.tokens / (time.perf_counter() - self.start),
            "restored_step": self.restored_step,
            **{f"bad_{r}": n for r, n in state.bad_rows.items()},
            GOOD_DOCS: state.good_docs,
        }
        self._reset()
        return out


def _report(metrics: dict[str, Any], to_save: tuple | None, output: str | None) -> None:
    """`ray.train.report` from every worker, with a checkpoint when `to_save` is given, which rank 0
    first publishes (its servable part) at `output`.

    Publishing first: a failed publish (a transient store error) fails the step before Ray stores its
    checkpoint, so the retry resumes from the previous one and publishes again. Reported first, the
    retry of a failed last publish resumed at the final step with nothing left to do: the run ended
    without its export. The export may run ahead of the stored checkpoints (when the report fails
    after it), which the retry's same steps catch up with; it is complete either way (`publish_dir`)."""
    import ray.train

    if to_save is None:
        ray.train.report(metrics)
        return
    parallel, tokenizer, block_cfg, state, cfg = to_save
    name = f"step_{state.step:08d}"
    _clear_checkpoint_dir(join(cfg.storage_path, cfg.run_name, name))
    with tempfile.TemporaryDirectory(prefix="fdllm-ckpt-") as tmp:
        _save_checkpoint(Path(tmp), parallel, tokenizer, block_cfg, state, cfg)
        if output and _rank() == 0:
            export_servable(tmp, output)
            log.info("servable checkpoint of step %d -> %s", state.step, output)
        has_files = any(Path(tmp).iterdir())  # only rank 0 writes, except DeepSpeed's optimizer shards
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
            checkpoint_dir_name=name,
        )


def _clear_checkpoint_dir(path: str) -> None:
    """Empty the storage directory a checkpoint is about to be reported to (rank 0, then every rank waits).
    One is there only if a write to it was cut short (a crash before Ray Train registered it, then a resume
    or retry from an earlier step): Ray copies the new files over the old ones, and its stale files (a shard
    of another write, a half-written file the new one lacks) would be restored with them."""
    if _rank() == 0:
        remove_dir(path)
    if dist.is_initialized():
        dist.barrier()  # no rank's upload may start before it is cleared


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(rank: int, total: int, initial: int) -> Any:
    """A progress bar the driver renders (Ray's tqdm), shown by rank 0 only."""
    if rank != 0:
        return _NoProgress()
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="fine-tune steps")
    bar.update(initial)
    return bar
