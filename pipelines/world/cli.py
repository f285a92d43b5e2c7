"""The command line of the embedded world: corpus, tokenizer, AR pretraining, evaluation, rebuild.

    python -m pipelines.world data --out assets/world [--num-train N --num-test N --seed S]
    python -m pipelines.world tokenizer --data assets/world --out assets/tiny-ar-base
    python -m pipelines.world pretrain --data assets/world --out assets/tiny-ar-base [--steps N ...]
    python -m pipelines.world evaluate --model assets/tiny-ar-base --data assets/world [--limit N]
    python -m pipelines.world --rebuild    # all three with defaults: reproduces the committed assets
                                           # (no subcommand: run the three above to write elsewhere)

Pretraining draws more examples from the corpus's seeded stream than `train.jsonl` holds (the file
is a prefix of that stream) and runs on one CPU thread, so a rebuild's corpus, tokenizer and weights are
the committed ones byte for byte (on the same CPU; the summary's and model card's timings differ).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import fdllm
from fdllm.loader import check_checkpoint, num_params
from fdllm.model import Transformer
from fdllm.storage import check_directory_path
from fdllm.tokenizer import MASK_TOKEN, has_tokenizer, load_tokenizer
from pipelines.world.corpus import BEYOND_FILE, TEST_FILE, TRAIN_FILE, WorldConfig, generate_world, read_jsonl, write_world
from pipelines.world.model_card import model_card
from pipelines.world.pretrain import ModelSpec, PretrainConfig, init_mask_row, pretrain
from pipelines.world.scoring import eval_engine, exact_match
from pipelines.world.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILES, tokenizer_texts, train_tokenizer

log = logging.getLogger("world")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / "assets" / "world"
DEFAULT_MODEL_DIR = REPO_ROOT / "assets" / "tiny-ar-base"
WORLD_CONFIG_FILE = "world_config.json"  # written beside the corpus, so pretraining draws the same stream
SUMMARY_FILE = "pretrain_summary.json"
VOCAB_SIZE = 384  # the BPE target: the corpus runs out of merges first


def load_world_config(data_dir: Path) -> WorldConfig:
    file = data_dir / WORLD_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {WORLD_CONFIG_FILE} in {data_dir}: run `python -m pipelines.world data --out {data_dir}` first")
    return WorldConfig(**json.loads(file.read_text()))


def cmd_data(cfg: WorldConfig, out: Path) -> None:
    write_world(generate_world(cfg), out)
    (out / WORLD_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def cmd_tokenizer(data_dir: Path, out: Path, vocab_size: int) -> None:
    train = read_jsonl(data_dir / TRAIN_FILE)
    tokenizer = train_tokenizer(tokenizer_texts(train), vocab_size)
    tokenizer.save_pretrained(out)
    log.info("trained a %d-token byte-level BPE on %d records; saved to %s", len(tokenizer), len(train), out)


def copy_tokenizer(src: Path, out: Path) -> None:
    """The tokenizer's files as the tokenizer step wrote them, byte for byte: saving the loaded one would
    write what transformers rebuilt from them, which beside a qwen2 config.json is its Qwen2 tokenizer
    (another pre-tokenizer, an NFC normalizer), not the trained one."""
    if src.resolve() == out.resolve():
        return
    for file in src.iterdir():
        if file.name in TOKENIZER_FILES:
            shutil.copyfile(file, out / file.name)


def held_out(data_dir: Path, name: str) -> list[dict[str, Any]]:
    return read_jsonl(data_dir / name) if (data_dir / name).is_file() else []


def cmd_pretrain(data_dir: Path, out: Path, tokenizer_dir: Path, spec: ModelSpec, cfg: PretrainConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    world_cfg = dataclasses.replace(load_world_config(data_dir), num_train=cfg.num_examples)
    world = generate_world(world_cfg)
    test, beyond = held_out(data_dir, TEST_FILE), held_out(data_dir, BEYOND_FILE)
    model = Transformer(spec.model_config(tokenizer))
    log.info("pretraining a %.2fM-parameter model on %d examples", num_params(model) / 1e6, len(world.train))
    summary = pretrain(model, tokenizer, world.train, test, cfg)
    init_mask_row(model, tokenizer.convert_tokens_to_ids(MASK_TOKEN), len(SPECIAL_TOKENS))
    engine = eval_engine(model, tokenizer)
    summary["test_accuracy"], summary["test_accuracy_by_task"] = exact_match(engine, test)
    summary["beyond_accuracy"], summary["beyond_accuracy_by_task"] = exact_match(engine, beyond)
    summary.update(num_test=len(test), num_beyond=len(beyond), num_params=num_params(model), vocab_size=len(tokenizer))
    log.info("held-out exact match %.2f%% on %d records (%s); one size beyond the range: %.2f%%",
             100 * summary["test_accuracy"], len(test), summary["test_accuracy_by_task"], 100 * summary["beyond_accuracy"])
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    record = {"model": dataclasses.asdict(spec), "pretrain": dataclasses.asdict(cfg), "world": dataclasses.asdict(world_cfg), **summary}
    (out / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(record))
    return summary


def cmd_evaluate(model_dir: Path, data_dir: Path, limit: int | None, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    engine = eval_engine(fdllm.load_model(model_dir), load_tokenizer(model_dir))
    scores = {}
    for name in (TEST_FILE, BEYOND_FILE):
        rows = held_out(data_dir, name)[:limit]
        if rows:
            acc, by_task = exact_match(engine, rows)
            log.info("%s: greedy AR exact match %.2f%% on %d records (%s)", name, 100 * acc, len(rows),
                     ", ".join(f"{t} {100 * a:.1f}%" for t, a in by_task.items()))
            scores[name] = acc
    return scores


def rebuild() -> dict[str, Any]:
    """The committed assets from the defaults: corpus, tokenizer, then the AR base."""
    cmd_data(WorldConfig(), DEFAULT_DATA_DIR)
    cmd_tokenizer(DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, VOCAB_SIZE)
    return cmd_pretrain(DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR, ModelSpec(), PretrainConfig())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true",
                        help="run data, tokenizer and pretrain with defaults into assets/ (takes no subcommand)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    wd = WorldConfig()
    data = sub.add_parser("data", help="write the corpus (train, test, test_beyond jsonl)", formatter_class=defaults)
    data.add_argument("--out", type=Path, required=True, help="corpus dir (the committed one, assets/world, is --rebuild's)")
    data.add_argument("--num-train", type=int, default=wd.num_train, help="records in train.jsonl")
    data.add_argument("--num-test", type=int, default=wd.num_test, help="held-out records per task in test.jsonl")
    data.add_argument("--num-beyond", type=int, default=wd.num_beyond, help="per task, one size beyond the range")
    data.add_argument("--seed", type=int, default=wd.seed, help="generator seed")

    tok = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on train.jsonl", formatter_class=defaults)
    tok.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="corpus dir (reads train.jsonl)")
    tok.add_argument("--out", type=Path, required=True, help="where to save the tokenizer")
    tok.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="BPE target (the corpus may run out of merges first)")

    pd, ms = PretrainConfig(), ModelSpec()
    pre = sub.add_parser("pretrain", help="pretrain the tiny AR model; saves model, tokenizer and model card", formatter_class=defaults)
    pre.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="corpus dir (world_config.json, test files)")
    pre.add_argument("--out", type=Path, required=True, help="checkpoint dir (the committed one, assets/tiny-ar-base, is --rebuild's)")
    pre.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: --out)")
    pre.add_argument("--steps", type=int, default=pd.steps, help="optimizer steps (the cosine spans them)")
    pre.add_argument("--batch-size", type=int, default=pd.batch_size, help="sequences per step")
    pre.add_argument("--lr", type=float, default=pd.lr, help="peak learning rate")
    pre.add_argument("--num-examples", type=int, default=pd.num_examples, help="examples drawn from the stream")
    pre.add_argument("--eval-every", type=int, default=pd.eval_every, help="steps between held-out checks (0: end only)")
    pre.add_argument("--minutes", type=float, default=None, help="wall-clock cap (stops early)")
    pre.add_argument("--seed", type=int, default=pd.seed, help="init and batch-order seed")
    pre.add_argument("--threads", type=int, default=pd.threads, help="torch CPU threads (1: byte-for-byte rebuilds)")
    pre.add_argument("--hidden-size", type=int, default=ms.hidden_size, help="model width")
    pre.add_argument("--layers", type=int, default=ms.num_hidden_layers, help="decoder layers")
    pre.add_argument("--intermediate-size", type=int, default=ms.intermediate_size, help="MLP width")

    ev = sub.add_parser("evaluate", help="greedy AR exact match of a checkpoint on the held-out files", formatter_class=defaults)
    ev.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoint dir with tokenizer")
    ev.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="corpus dir (reads test.jsonl, test_beyond.jsonl)")
    ev.add_argument("--limit", type=int, default=None, help="first N records of each file only")
    ev.add_argument("--threads", type=int, default=pd.threads, help="torch CPU threads")
    return parser


def plan(args: argparse.Namespace) -> Callable[[], object]:
    """The command `args` ask for, with its configs built and its inputs and outputs checked first, so a
    bad option or a missing input is one line (ValueError or OSError) before any work, not a traceback
    minutes into it."""
    if args.rebuild:
        return rebuild
    if args.command == "data":
        check_directory_path(str(args.out))
        cfg = WorldConfig(seed=args.seed, num_train=args.num_train, num_test=args.num_test, num_beyond=args.num_beyond)
        return functools.partial(cmd_data, cfg, args.out)
    if args.command == "tokenizer":
        if not (args.data / TRAIN_FILE).is_file():
            raise FileNotFoundError(f"no {TRAIN_FILE} in --data {args.data}: run `python -m pipelines.world data --out "
                                    f"{args.data}` first")
        if args.vocab_size < 1:
            raise ValueError(f"--vocab-size must be >= 1, got {args.vocab_size}")
        check_directory_path(str(args.out))
        return functools.partial(cmd_tokenizer, args.data, args.out, args.vocab_size)
    if args.command == "pretrain":
        load_world_config(args.data)
        tokenizer_dir = args.tokenizer or args.out
        if not has_tokenizer(tokenizer_dir):
            raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}: run `python -m pipelines.world tokenizer --out "
                                    f"{tokenizer_dir}` first, or give --tokenizer DIR")
        specials = load_tokenizer(tokenizer_dir).convert_tokens_to_ids(list(SPECIAL_TOKENS))
        if specials != list(range(len(SPECIAL_TOKENS))):  # the mask row starts at the mean of the rows after them
            raise ValueError(f"the tokenizer in {tokenizer_dir} is not a world tokenizer: {', '.join(SPECIAL_TOKENS)} must "
                             f"take ids 0..{len(SPECIAL_TOKENS) - 1}, got {specials} (`python -m pipelines.world "
                             "tokenizer` trains one)")
        check_directory_path(str(args.out))
        spec = ModelSpec(hidden_size=args.hidden_size, num_hidden_layers=args.layers, intermediate_size=args.intermediate_size)
        cfg = PretrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, num_examples=args.num_examples,
            eval_every=args.eval_every, minutes=args.minutes, seed=args.seed, threads=args.threads,
        )
        return functools.partial(cmd_pretrain, args.data, args.out, tokenizer_dir, spec, cfg)
    if args.command == "evaluate":
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if not any((args.data / name).is_file() for name in (TEST_FILE, BEYOND_FILE)):  # nothing to evaluate
            raise FileNotFoundError(f"--data {args.data} holds neither {TEST_FILE} nor {BEYOND_FILE}: give a corpus dir "
                                    "(`python -m pipelines.world data --out DIR` writes one)")
        check_checkpoint(args.model, need_tokenizer=True)
        return functools.partial(cmd_evaluate, args.model, args.data, args.limit, args.threads)
    raise AssertionError(f"no plan for command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rebuild and args.command:  # the subcommand's options (--out, ...) would be ignored
        parser.error(f"--rebuild takes no subcommand (got {args.command!r}): it rewrites assets/ with the defaults; "
                     "run data, tokenizer and pretrain with --out to build elsewhere")
    if not (args.rebuild or args.command):
        parser.print_help()
        return
    try:
        command = plan(args)
    except (ValueError, OSError) as e:
        parser.error(" ".join(str(e).splitlines()))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command()
