"""The embedded default world: a synthetic SFT corpus, its tokenizer and a tiny AR base model.

Everything `pipelines/finetune.py` needs to run end to end with no download, built on one CPU:

  tasks.py      the task families (reverse, sort, addition with carries, two-step arithmetic with
                a `<think>` trace), each with an exact solver that doubles as the answer checker;
  corpus.py     seeded chat records in the LLaMA-Nemotron schema, held-out and beyond-range splits;
  tokenizer.py  a byte-level BPE with single-digit tokens, ChatML and `|<MASK>|` built in;
  pretrain.py   the tiny Qwen2 AR base and its deterministic single-thread training loop;
  scoring.py    held-out greedy exact match per task;
  cli.py        `python -m pipelines.world {data,tokenizer,pretrain,evaluate} | --rebuild`.
"""

from pipelines.world.cli import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, REPO_ROOT, main
from pipelines.world.corpus import BEYOND_FILE, TEST_FILE, TRAIN_FILE

__all__ = ["BEYOND_FILE", "DEFAULT_DATA_DIR", "DEFAULT_MODEL_DIR", "REPO_ROOT", "TEST_FILE", "TRAIN_FILE", "main"]
