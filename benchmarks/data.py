"""Data-ingest benchmark: a synthetic LLaMA-Nemotron corpus of a given size through the fine-tune's
ingest (read splits, parse, chat template, tokenize, pack), as the trainer consumes it.

For each corpus size it writes (or reuses) a jsonl corpus in the real schema, then in a fresh
process with its own local Ray instance builds `pipelines.data.build_dataset` with the fine-tune's
ingest options and reads it through `pipelines.train_loop.ShardReader`, the trainer's batch reader.
It reports the time to the first training batch, rows/s and packed tokens/s over the whole ingest
(or until --max-seconds), and the peak RSS of the driver and of each Ray process (psutil, sampled
every 0.2 s).

    python -m benchmarks.data --sizes-gb 0.25 2 --workdir /tmp/fdllm-data-bench
    python -m benchmarks.data --sizes-gb 0.05 --max-seconds 60 --output data.json   # a quick look
    python -m benchmarks.data --sizes-gb 1 --tokenizer /path/to/Qwen2.5-1.5B-Instruct --keep-corpus

Without --tokenizer it trains a byte-level BPE (8k tokens, ChatML template) on a sample of the
corpus, so bytes per token are realistic without a download. Corpora are deleted at the end
unless --keep-corpus.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import existing_dir, output_file, positive_float, positive_int  # noqa: E402

log = logging.getLogger("fdllm.bench_data")

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
CATEGORIES = ("math", "code", "science", "chat", "safety")


# ---------------------------------------------------------------------------------------------
# The synthetic corpus


class CorpusWriter:
    """Records in the LLaMA-Nemotron post-training schema with a Nemotron-like mix: reasoning on
    for half the rows (a long `<think>` trace, log-normal, median ~6k characters, tail past 60k),
    reasoning off for the rest (answers of median ~1.2k characters); `input` a list of messages
    for 70% of the rows and a first-release Llama-3 prompt string for 30%."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        syllables = ["ka", "ro", "mi", "ten", "sol", "u", "ve", "xi", "an", "dor", "pre", "li", "qu", "es", "th"]
        words = ["".join(self.rng.choices(syllables, k=self.rng.randint(1, 4))) for _ in range(3000)]
        words += ["=", "+", "x", "(", ")", "2", "17", "0.5", "def", "return", "the", "is", "of", "so", "we"]
        zipf = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))  # cumulative weights
        self.sentences = []
        for _ in range(4000):
            text = " ".join(self.rng.choices(words, cum_weights=zipf, k=self.rng.randint(6, 24)))
            self.sentences.append(text[0].upper() + text[1:] + self.rng.choice([".", ".", "?", ":"]))

    def _text(self, median_chars: float, sigma: float, cap: int) -> str:
        n = min(cap, max(20, int(self.rng.lognormvariate(math.log(median_chars), sigma))))
        parts, size = [], 0
        while size < n:
            s = self.rng.choice(self.sentences)
            parts.append(s)
            size += len(s) + 1
            if self.rng.random() < 0.15:
                parts.append("\n\n")
        return " ".join(parts)

    def record(self) -> dict[str, Any]:
        reasoning = self.rng.random() < 0.5
        system = f"detailed thinking {'on' if reasoning else 'off'}"
        question = self._text(400, 0.8, 8_000)
        answer = self._text(1_200, 0.9, 16_000)
        output = f"<think>\n{self._text(6_000, 0.9, 100_000)}\n</think>\n\n{answer}" if reasoning else answer
        record: dict[str, Any] = {"category": self.rng.choice(CATEGORIES), "reasoning": "on" if reasoning else "off"}
        if self.rng.random() < 0.7:
            record.update(input=[{"role": "user", "content": question}], output=output, system_prompt=system)
        else:  # the first release: a pre-rendered Llama-3 prompt, answers ending in <|eot_id|>
            record.update(input=LLAMA3_PROMPT.format(system=system, user=question), output=output + "<|eot_id|>")
        return record

    def write(self, path: Path, target_bytes: int) -> dict[str, Any]:
        """Write records until the file holds `target_bytes`; returns row count and byte sizes."""
        path.parent.mkdir(parents=True, exist_ok=True)
        rows, size, start = 0, 0, time.perf_counter()
        with open(path, "wb", buffering=16 << 20) as f:
            while size < target_bytes:
                line = json.dumps(self.record(), ensure_ascii=False).encode() + b"\n"
                f.write(line)
                rows, size = rows + 1, size + len(line)
        log.info("wrote %s: %d rows, %.2f GB in %.0f s", path, rows, size / 1e9, time.perf_counter() - start)
        return {"rows": rows, "bytes": size, "mean_row_bytes": size / rows}


def corpus(workdir: Path, size_gb: float, seed: int) -> tuple[Path, dict[str, Any]]:
    """The corpus of `size_gb` under `workdir`, written once and reused (its stats beside it)."""
    path = workdir / f"nemotron-synthetic-{size_gb:g}gb-seed{seed}.jsonl"
    stats_path = path.with_suffix(".stats.json")
    if path.exists() and stats_path.exists():
        return path, json.loads(stats_path.read_text())
    partial = path.with_suffix(".partial")  # renamed into place when complete: never reuse a cut corpus
    stats = CorpusWriter(seed).write(partial, int(size_gb * 1e9))
    stats_path.write_text(json.dumps(stats))
    partial.rename(path)
    return path, stats


def train_tokenizer(sample: Path, out_dir: Path, vocab_size: int = 8192) -> Path:
    """A byte-level BPE with a ChatML template trained on the head of a corpus (a stand-in for a
    real model's tokenizer: similar bytes per token, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out_dir / "tokenizer.json").exists():
        return out_dir
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

    def texts():
        with open(sample, "rb") as f:
            for _, line in zip(range(3000), f):
                record = json.loads(line)
                yield record["output"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Memory sampling


class PeakRss:
    """Peak RSS per process of this driver and of every process it started (the local Ray
    instance: its workers `ray::...`, the raylet, the GCS), sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self.me, self.interval_s = psutil.Process(), interval_s
        self.peak: dict[int, tuple[str, int]] = {}  # pid -> (name, peak rss bytes)
        self.peak_total = 0  # the largest sum over all processes at one sample
        self.cpu_s: dict[int, float] = {}  # pid -> user + system CPU seconds, as last sampled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        total = 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                times = proc.cpu_times()
                self.cpu_s[proc.pid] = times.user + times.system
                name = "driver" if proc.pid == self.me.pid else proc.name()
                if name.startswith("ray::") or name in ("python", "python3"):  # a worker names its task
                    cmd = proc.cmdline()
                    name = cmd[0].split(" ")[0] if cmd and cmd[0].startswith("ray::") else name
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            old = self.peak.get(proc.pid, ("", 0))
            self.peak[proc.pid] = (name, max(old[1], rss))
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def cpu_seconds_since(self, mark: dict[int, float]) -> float:
        """CPU seconds all sampled processes spent since `mark` (a copy of `cpu_s` taken then)."""
        self._sample()
        return sum(cpu - mark.get(pid, 0.0) for pid, cpu in self.cpu_s.items())

    def summary(self) -> dict[str, Any]:
        workers = {pid: v for pid, v in self.peak.items() if v[0] != "driver" and v[0].startswith("ray::")}
        system = {pid: v for pid, v in self.peak.items() if v[0] != "driver" and pid not in workers}
        top = max(workers.values(), key=lambda v: v[1], default=("none", 0))
        return {
            "driver_peak_rss_mb": self.peak.get(self.me.pid, ("driver", 0))[1] / 2**20,
            "worker_peak_rss_mb": top[1] / 2**20,
            "worker_peak_name": top[0],
            "ray_system_peak_rss_mb": max((v[1] for v in system.values()), default=0) / 2**20,
            "num_workers_seen": len(workers),
            "all_processes_peak_rss_sum_mb": self.peak_total / 2**20,  # shared pages counted once per process
        }


# ---------------------------------------------------------------------------------------------
# One ingest run


@dataclass(kw_only=True)
class IngestResult:
    size_gb: float
    corpus_rows: int
    complete: bool  # the whole corpus was read (else stopped at max_seconds)
    ray_init_s: float
    first_batch_s: float  # from the dataset's build to the first training batch in hand
    elapsed_s: float  # from the dataset's build to the last batch read
    rows: int  # corpus rows read: documents packed + rows skipped
    rows_skipped: int
    sequences: int
    tokens: int  # tokens in packed sequences (documents with their block fill)
    rows_per_s: float
    tokens_per_s: float
    mb_per_s: float  # corpus bytes per second (rows/s x mean row size)
    cpus: float  # CPUs of the Ray instance
    cpu_s: float  # CPU seconds the driver and every Ray process spent in the ingest
    tokens_per_cpu_s: float  # tokens / cpu_s: per-CPU speed, whatever else shares the machine
    memory: dict[str, Any]


def ingest(args: dict[str, Any], path: str, stats: dict[str, Any], tokenizer_dir: str) -> dict[str, Any]:
    """Run in a fresh process (`_in_fresh_process`, which shuts Ray down after the result is sent):
    a local Ray instance, the fine-tune's dataset and ingest options, the trainer's batch reader;
    returns IngestResult as a dict."""
    import ray
    import ray.data

    from fdllm.tokenizer import MASK_TOKEN, load_tokenizer
    from pipelines.data import BAD_REASONS, DataConfig, build_dataset, check_data_files
    from pipelines.finetune import ingest_options
    from pipelines.finetune_config import DATA_MEMORY_MB
    from pipelines.train_loop import GOOD_DOCS, ShardReader

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with PeakRss() as memory:
        start = time.perf_counter()
        for attempt in range(3):  # a busy machine can miss Ray's fixed 30 s startup deadline
            try:
                # its own instance of --cpus (joining a running cluster would ignore them, and fail)
                ray.init(address="local", num_cpus=args["cpus"], include_dashboard=False, log_to_driver=False)
                break
            except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for it
                log.warning("ray.init failed (%s); attempt %d of 3", e, attempt + 1)
                ray.shutdown()
        else:
            raise RuntimeError("could not start a local Ray instance")
        ray_init_s = time.perf_counter() - start
        ray.data.DataContext.get_current().enable_progress_bars = False
        tokenizer = load_tokenizer(tokenizer_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]}, replace_extra_special_tokens=False)
        cfg = DataConfig(block_size=args["block_size"], seq_len=args["seq_len"], overlong=args["overlong"])
        memory._sample()
        cpu_mark, start = dict(memory.cpu_s), time.perf_counter()
        dataset = build_dataset(check_data_files([path]), tokenizer, cfg, num_cpus=args["data_cpus"])
        # what finetune.build_trainer asks of Ray Train: its ingest options, one shard per worker
        dataset.context.execution_options = ingest_options(DATA_MEMORY_MB)
        shard = dataset.streaming_split(1, equal=False)[0]
        reader = ShardReader(shard, args["batch_size"])
        first_batch_s, sequences, tokens, complete = None, 0, 0, False
        while True:
            batch = reader.next_batch()
            now = time.perf_counter() - start
            if batch is None:
                complete = True
                break
            first_batch_s = first_batch_s if first_batch_s is not None else now
            sequences += len(batch["num_tokens"])
            tokens += int(batch["num_tokens"].sum())
            if args["max_seconds"] and now > args["max_seconds"]:
                break
        elapsed = time.perf_counter() - start
        cpu_s = memory.cpu_seconds_since(cpu_mark)
        counts = reader.take_counts()
        # close the open batch iterator while Ray is up: collected after ray.shutdown, it makes
        # Ray Data start a new local instance to report its stats
        del reader, shard, dataset
        gc.collect()
    skipped = sum(counts[r] for r in BAD_REASONS)
    rows = counts[GOOD_DOCS] + skipped
    return asdict(IngestResult(
        size_gb=args["size_gb"], corpus_rows=stats["rows"], complete=complete, ray_init_s=ray_init_s,
        first_batch_s=first_batch_s or float("nan"), elapsed_s=elapsed, rows=rows, rows_skipped=skipped,
        sequences=sequences, tokens=tokens, rows_per_s=rows / elapsed, tokens_per_s=tokens / elapsed,
        mb_per_s=rows * stats["mean_row_bytes"] / elapsed / 1e6, cpus=args["cpus"], cpu_s=cpu_s,
        tokens_per_cpu_s=tokens / cpu_s, memory=memory.summary(),
    ))


def ingest_local(args: dict[str, Any], path: str, stats: dict[str, Any], tokenizer_dir: str) -> dict[str, Any]:
    """Run in a fresh process, without Ray: the functions each Ray Data task runs
    (`read_jsonl_split`, `pack_jsonl_windows`), split after split in this one process, on one CPU.
    It measures the per-CPU cost and the memory of one task's streaming where Ray cannot start (a
    machine too busy for its startup deadlines); returns IngestResult as a dict."""
    from fdllm.tokenizer import MASK_TOKEN, load_tokenizer
    from pipelines.data import (
        BAD_REASONS,
        DataConfig,
        TokenSpec,
        check_data_files,
        pack_jsonl_windows,
        plan_jsonl_splits,
        read_jsonl_split,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with PeakRss() as memory:
        tokenizer = load_tokenizer(tokenizer_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]}, replace_extra_special_tokens=False)
        cfg = DataConfig(block_size=args["block_size"], seq_len=args["seq_len"], overlong=args["overlong"])
        memory._sample()
        cpu_mark, start = dict(memory.cpu_s), time.perf_counter()
        sources = check_data_files([path])
        kwargs = {"tokenizer": tokenizer, "cfg": cfg, "spec": TokenSpec.from_tokenizer(tokenizer)}
        first_batch_s, sequences, tokens, good, skipped, complete = None, 0, 0, 0, 0, True
        for split in plan_jsonl_splits([(uri, sources.sizes[uri]) for uri in sources.jsonl], cfg):
            for window in read_jsonl_split(split, cfg):
                out = pack_jsonl_windows([window["lines"]], **kwargs)
                real = out["num_docs"] > 0
                sequences, tokens = sequences + int(real.sum()), tokens + int(out["num_tokens"][real].sum())
                good += int(out["num_docs"].sum())
                skipped += sum(int(out[f"bad_{r}"].sum()) for r in BAD_REASONS)
                now = time.perf_counter() - start
                if first_batch_s is None and sequences >= args["batch_size"]:
                    first_batch_s = now
                if args["max_seconds"] and now > args["max_seconds"]:
                    complete = False
                    break
            if not complete:
                break
        elapsed = time.perf_counter() - start
        cpu_s = memory.cpu_seconds_since(cpu_mark)
    rows = good + skipped
    return asdict(IngestResult(
        size_gb=args["size_gb"], corpus_rows=stats["rows"], complete=complete, ray_init_s=0.0,
        first_batch_s=first_batch_s or float("nan"), elapsed_s=elapsed, rows=rows, rows_skipped=skipped,
        sequences=sequences, tokens=tokens, rows_per_s=rows / elapsed, tokens_per_s=tokens / elapsed,
        mb_per_s=rows * stats["mean_row_bytes"] / elapsed / 1e6, cpus=1.0, cpu_s=cpu_s,
        tokens_per_cpu_s=tokens / cpu_s, memory=memory.summary(),
    ))


def _report_then_stop_ray(conn: Any, fn: Any, fn_args: tuple[Any, ...]) -> None:
    """The child's body: send `fn`'s result (or its error) first, then shut Ray down. Ray's
    shutdown can end the process abruptly (a Ray Data prefetch thread touching the core worker
    after it stopped), which must not cost the measurement."""
    try:
        conn.send(("ok", fn(*fn_args)))
    except BaseException as e:  # noqa: BLE001 - anything the run raises goes back to the parent
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _in_fresh_process(fn: Any, *fn_args: Any) -> Any:
    """`fn(*fn_args)` in a spawned process, so each size has its own Ray instance and memory peaks."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_report_then_stop_ray, args=(send, fn, fn_args))
    child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the benchmark process died before reporting (exit code {child.exitcode})") from None
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    if child.exitcode:
        log.warning("the benchmark process exited with code %s while shutting Ray down, after reporting", child.exitcode)
    if status == "error":
        raise RuntimeError(f"the benchmark process failed: {value}")
    return value


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=positive_float, nargs="+", default=[0.25, 2.0], help="corpus sizes (GB = 1e9 bytes)")
    parser.add_argument("--workdir", default="/tmp/fdllm-data-bench", help="where corpora and the tokenizer go")
    parser.add_argument("--tokenizer", type=existing_dir, help="HF tokenizer dir (default: a BPE trained on the corpus)")
    parser.add_argument("--cpus", type=positive_float, default=float(os.cpu_count() or 1), help="CPUs of the local Ray instance")
    parser.add_argument("--data-cpus", type=positive_float, default=1.0, help="CPUs per read / tokenize task (--data-cpus)")
    parser.add_argument("--seq-len", type=positive_int, default=2048)
    parser.add_argument("--block-size", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=2, help="packed sequences per training batch")
    parser.add_argument("--overlong", choices=("skip", "truncate"), default="truncate",
                        help="rows longer than seq_len (truncate: long traces still yield tokens)")
    parser.add_argument("--engine", choices=("ray", "local"), default="ray",
                        help="ray: the fine-tune's Ray Data ingest; local: the same per-task functions in one process")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop reading after this long (0: whole corpus)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-corpus", action="store_true", help="keep the generated corpora for a rerun")
    parser.add_argument("--output", type=output_file, help="write the results as JSON here")
    return parser


def _table(results: list[dict[str, Any]]) -> str:
    head = ("| corpus | rows read | first batch | rows/s | tokens/s | tokens per CPU-s | MB/s | driver RSS | "
            "largest worker RSS | all processes |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        m = r["memory"]
        lines.append(
            f"| {r['size_gb']:g} GB | {r['rows']:,} of {r['corpus_rows']:,}{'' if r['complete'] else ' (timed)'} | "
            f"{r['first_batch_s']:.1f} s | {r['rows_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_cpu_s']:,.0f} | {r['mb_per_s']:.2f} | {m['driver_peak_rss_mb']:,.0f} MB | "
            f"{m['worker_peak_rss_mb']:,.0f} MB | {m['all_processes_peak_rss_sum_mb']:,.0f} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(args.workdir)
    paths, results = [], []
    try:
        for size_gb in args.sizes_gb:
            path, stats = corpus(workdir, size_gb, args.seed)
            paths.append(path)
            tokenizer_dir = args.tokenizer or str(train_tokenizer(path, workdir / "bpe-8k"))
            run_args = {**vars(args), "size_gb": size_gb}
            run = ingest if args.engine == "ray" else ingest_local
            result = _in_fresh_process(run, run_args, str(path), stats, tokenizer_dir)
            log.info("%g GB: %s", size_gb, json.dumps(result))
            results.append(result)
    finally:
        if not args.keep_corpus:
            for path in paths:
                path.unlink(missing_ok=True)
                path.with_suffix(".stats.json").unlink(missing_ok=True)
    print(_table(results))
    if len(results) > 1:
        base, big = results[0], results[-1]

        def ratio(a: float, b: float) -> str:
            return f"x{a / b:.2f}" if b else "n/a"

        bm, gm = base["memory"], big["memory"]
        print(f"\n{big['size_gb']:g} GB vs {base['size_gb']:g} GB: time to first batch "
              f"{ratio(big['first_batch_s'], base['first_batch_s'])}, driver RSS "
              f"{ratio(gm['driver_peak_rss_mb'], bm['driver_peak_rss_mb'])}, largest worker RSS "
              f"{ratio(gm['worker_peak_rss_mb'], bm['worker_peak_rss_mb'])}, all processes "
              f"{ratio(gm['all_processes_peak_rss_sum_mb'], bm['all_processes_peak_rss_sum_mb'])}")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
