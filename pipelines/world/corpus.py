"""The world's corpus: seeded chat records over the task families, in the LLaMA-Nemotron schema.

`train.jsonl` holds Nemotron records (`input` messages, `output`, `category`, `reasoning`, and the
system prompt either as a system turn in `input` or as the `system_prompt` field, which applies
when `input` has none). `test.jsonl` holds held-out rows inside the trained size range and
`test_beyond.jsonl` rows one size beyond it, both as evaluate.py reads them (`prompt`, `answer`,
`messages`: the chat to render, `category`, `size`). Held-out prompts never occur in training
(at the smallest sizes a same-answer twin may: docs/world.md).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data import record_to_messages
from pipelines.world.tasks import TASKS, Task

log = logging.getLogger("world")

TRAIN_FILE, TEST_FILE, BEYOND_FILE = "train.jsonl", "test.jsonl", "test_beyond.jsonl"
REASONING_ON, REASONING_OFF = "detailed thinking on", "detailed thinking off"  # Nemotron's switch


@dataclass(kw_only=True)
class WorldConfig:
    """What the generator draws; the same config and seed always give the same corpus."""

    seed: int = 0
    num_train: int = 20_000  # records written to train.jsonl (pretraining may draw more)
    num_test: int = 100  # held-out records per task inside the trained sizes (test.jsonl)
    num_beyond: int = 50  # held-out records per task one size beyond them (test_beyond.jsonl)
    # Sorting learns slower than reversal (1.5x its share), addition slowest (2.5x): with these
    # weights and the aligned-column trace the 10000-step base reaches 100% on all three tasks.
    task_weights: dict[str, float] = field(default_factory=lambda: {"reverse": 1.0, "sort": 1.5, "add": 2.5})
    system_in_input_rate: float = 0.5  # the system prompt as a turn in `input`, else as `system_prompt`

    def __post_init__(self) -> None:
        unknown = set(self.task_weights) - set(TASKS)
        if unknown or not self.task_weights or min(self.task_weights.values()) <= 0:
            raise ValueError(f"task_weights must give positive weights to tasks among {sorted(TASKS)}, got {self.task_weights}")
        if not 0.0 <= self.system_in_input_rate <= 1.0:
            raise ValueError(f"system_in_input_rate must be in [0, 1], got {self.system_in_input_rate}")
        if min(self.num_train, self.num_test, self.num_beyond) < 0:
            raise ValueError("num_train, num_test and num_beyond must be >= 0")


@dataclass(frozen=True)
class World:
    train: list[dict[str, Any]]  # Nemotron-schema records
    test: list[dict[str, Any]]  # Nemotron-schema records, sizes in range, prompts disjoint from train
    beyond: list[dict[str, Any]]  # the same, one size beyond each task's range


def make_record(rng: random.Random, task: Task, size: int, cfg: WorldConfig) -> dict[str, Any]:
    """One Nemotron-schema record of `task` at `size`, with the reasoning switch its task needs."""
    problem = task.draw(rng, size)
    system = REASONING_ON if task.reasoning else REASONING_OFF
    record: dict[str, Any] = {"input": [{"role": "user", "content": problem.prompt}]}
    if rng.random() < cfg.system_in_input_rate:
        record["input"].insert(0, {"role": "system", "content": system})
    else:
        record["system_prompt"] = system
    record.update(output=problem.answer, category=task.name, reasoning="on" if task.reasoning else "off", size=size)
    return record


def draw_record(rng: random.Random, cfg: WorldConfig) -> dict[str, Any]:
    """A training record: a task by weight, a size uniform over its range."""
    names = sorted(cfg.task_weights)
    task = TASKS[rng.choices(names, weights=[cfg.task_weights[n] for n in names])[0]]
    return make_record(rng, task, rng.randint(*task.sizes), cfg)


def user_prompt(record: dict[str, Any]) -> str:
    return next(m["content"] for m in record["input"] if m["role"] == "user")


def chat_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation before the answer, read exactly as the fine-tuning data pipeline reads it."""
    return record_to_messages(record)[:-1]


def generate_world(cfg: WorldConfig) -> World:
    """Held-out records first (interleaved by task, sizes cycling over the range), then training
    records from the same stream, skipping held-out prompts; so `train` for a larger `num_train`
    extends the smaller one (a prefix), which lets pretraining draw more than train.jsonl holds."""
    rng = random.Random(cfg.seed)
    names = sorted(cfg.task_weights)
    test, beyond = [], []
    for i in range(cfg.num_test):
        for name in names:
            lo, hi = TASKS[name].sizes
            test.append(make_record(rng, TASKS[name], lo + i % (hi - lo + 1), cfg))
    for _ in range(cfg.num_beyond):
        for name in names:
            beyond.append(make_record(rng, TASKS[name], TASKS[name].sizes[1] + 1, cfg))
    held_out = {user_prompt(r) for r in test + beyond}
    train: list[dict[str, Any]] = []
    while len(train) < cfg.num_train:
        record = draw_record(rng, cfg)
        if user_prompt(record) not in held_out:
            train.append(record)
    return World(train=train, test=test, beyond=beyond)


def test_row(record: dict[str, Any]) -> dict[str, Any]:
    """A held-out record as evaluate.py reads it: prompt, exact answer, the full chat, task and size."""
    return {
        "prompt": user_prompt(record),
        "answer": record["output"],
        "messages": chat_messages(record),
        "category": record["category"],
        "size": record["size"],
    }


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_world(world: World, out: Path) -> None:
    write_jsonl(out / TRAIN_FILE, world.train)
    write_jsonl(out / TEST_FILE, (test_row(r) for r in world.test))
    write_jsonl(out / BEYOND_FILE, (test_row(r) for r in world.beyond))
    log.info("wrote %d train, %d test and %d beyond-range records to %s", len(world.train), len(world.test), len(world.beyond), out)
