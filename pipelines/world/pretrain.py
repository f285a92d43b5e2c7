"""Pretraining the world's AR base: a tiny Qwen2 trained on the chat-rendered corpus, loss on the
assistant answer and its end token, deterministic on one CPU thread (seeded init, seeded batch
order, no dropout), so the same config rebuilds the same weights byte for byte on the same box.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

import fdllm
from fdllm.config import ModelConfig
from fdllm.model import Transformer
from fdllm.objective import IGNORE_INDEX, ar_loss
from pipelines.train_loop import weight_decay_groups
from pipelines.world.scoring import eval_engine, exact_match
from pipelines.world.tokenizer import render_example

log = logging.getLogger("world")


@dataclass(kw_only=True)
class ModelSpec:
    """The tiny Qwen2 architecture: about 1M parameters with the ~300-token vocabulary.

    Smaller than the 3.4M model first calibrated for the first world (hidden 192, 6 layers,
    intermediate 768): on a busy 2-core CPU it runs ~2.6x more steps per second (5 vs 1.9 steps/s
    at batch 32), which is what a CPU pretraining budget buys most of; the block-diffusion
    fine-tune, the slow part of the quickstart, gains the same speed-up."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        sizes = (self.hidden_size, self.num_hidden_layers, self.intermediate_size, self.max_position_embeddings)
        if min(sizes) < 1:
            raise ValueError(f"hidden size, layers, intermediate size and positions must be >= 1, got {sizes}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden_size} must be a multiple of the {self.num_attention_heads} attention heads")

    def model_config(self, tokenizer) -> ModelConfig:
        return ModelConfig(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass(kw_only=True)
class PretrainConfig:
    """AdamW with linear warmup and cosine decay over `steps`.

    The defaults: 10000 steps of 32 (320k examples) at peak lr 2e-3, 51 min on one busy CPU thread:
    the held-out accuracy reached 95% on every task by step 6000-7000 and 100% by step 8000."""

    steps: int = 10_000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    num_examples: int = 320_000  # examples drawn from the world's stream (train.jsonl is their prefix)
    eval_every: int = 1000  # steps between held-out checks (0: only at the end)
    eval_samples: int = 200  # held-out records per intermediate check
    minutes: float | None = None  # wall-clock cap; stops early (and says so) when reached
    seed: int = 0
    threads: int = 1  # two OpenMP threads ran 3-7x *slower* than one on a 2-core box shared with other jobs

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 < self.lr < math.inf or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0 and 0 <= min_lr_ratio <= 1")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.num_examples < 1 or self.eval_every < 0 or self.threads < 1:
            raise ValueError(f"need num_examples >= 1, eval_every >= 0 and threads >= 1, got {self.num_examples}, "
                             f"{self.eval_every} and {self.threads}")
        if self.num_examples < self.batch_size:  # found only after the corpus is drawn and tokenized otherwise
            raise ValueError(f"num_examples ({self.num_examples}) cannot fill a batch of {self.batch_size}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt; the answer tokens and the end token carry loss


def encode_examples(tokenizer, records: Sequence[dict[str, Any]], chunk: int = 4096) -> list[Example]:
    """Records -> examples, tokenized a chunk at a time (the fast tokenizer batches in Rust: ~10x
    faster than one call per record, which matters for the ~10^5 records of a rebuild)."""
    examples: list[Example] = []
    for start in tqdm(range(0, len(records), chunk), desc="tokenize", unit="chunk", mininterval=5):
        prompts, answers = zip(*(render_example(tokenizer, r) for r in records[start : start + chunk]), strict=True)
        prompt_ids = tokenizer(list(prompts), add_special_tokens=False).input_ids
        answer_ids = tokenizer(list(answers), add_special_tokens=False).input_ids
        examples += [Example(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompt_ids, answer_ids, strict=True)]
    return examples


def encode_example(tokenizer, record: dict[str, Any]) -> Example:
    return encode_examples(tokenizer, [record])[0]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded input_ids and labels [B, T]; padding carries no loss (and causal attention
    means real tokens never see it)."""
    T = max(len(e.input_ids) for e in examples)
    ids_BT = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids_BT[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels_BT[row, : len(e.labels)] = torch.tensor(e.labels)
    return ids_BT, labels_BT


def length_bucketed_batches(examples: Sequence[Example], batch_size: int, rng: random.Random, pool: int = 16) -> Iterator[list[Example]]:
    """Endless random batches; each draw of `pool` batches is sorted by length first, so a batch
    holds similar lengths and padding wastes little compute (~25% saved on this corpus)."""
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} examples cannot fill a batch of {batch_size}")
    pool = min(pool, len(examples) // batch_size)
    while True:
        drawn = sorted(rng.sample(examples, batch_size * pool), key=lambda e: len(e.input_ids))
        chunks = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def build_optimizer(model: Transformer, cfg: PretrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor], lr: float, clip: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, _ = ar_loss(model, *batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()  # host sync, once per step, for the progress bar


def init_mask_row(model: Transformer, mask_id: int, num_special: int) -> None:
    """Start `|<MASK>|` at the mean of the ordinary token rows (the row never trains in AR
    pretraining); the block-diffusion fine-tune learns faster from there than from a random row."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[mask_id] = emb[num_special:].mean(0)


def check_progress(engine: fdllm.Engine, test: Sequence[dict[str, Any]], step: int, loss: float) -> dict[str, float]:
    """Held-out exact match in the middle of training (the model has no dropout: train mode decodes as eval)."""
    acc, by_task = exact_match(engine, test)
    per_task = ", ".join(f"{name} {100 * a:.0f}%" for name, a in by_task.items())
    log.info("step %d: loss %.4f, held-out exact match %.1f%% (%s; %d records)", step, loss, 100 * acc, per_task, len(test))
    return {"step": step, "loss": loss, "accuracy": acc, "by_task": by_task}


def pretrain(
    model: Transformer,
    tokenizer,
    train: Sequence[dict[str, Any]],
    test: Sequence[dict[str, Any]],
    cfg: PretrainConfig,
) -> dict[str, Any]:
    """Train in place; returns a summary (steps done, minutes, final loss, evaluation history)."""
    examples = encode_examples(tokenizer, train)
    optimizer = build_optimizer(model, cfg)
    engine = eval_engine(model, tokenizer)
    rng = random.Random(cfg.seed)
    history: list[dict[str, float]] = []
    start, loss_ema, step = time.monotonic(), None, 0
    model.train()
    batches = length_bucketed_batches(examples, cfg.batch_size, rng)
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", mininterval=10)
    for step in bar:
        batch = collate(next(batches), tokenizer.pad_token_id)
        loss = train_step(model, optimizer, batch, cfg.lr_at(step), cfg.grad_clip)
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{cfg.lr_at(step):.2e}", refresh=False)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            history.append(check_progress(engine, test[: cfg.eval_samples], step + 1, loss_ema))
        if cfg.minutes is not None and time.monotonic() - start > 60 * cfg.minutes:
            log.warning("stopping at step %d of %d: the %.1f-minute cap was reached", step + 1, cfg.steps, cfg.minutes)
            break
    model.eval()
    return {"steps": step + 1, "minutes": (time.monotonic() - start) / 60, "final_loss": loss_ema, "history": history}


