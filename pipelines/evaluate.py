r"""Exact-match accuracy and decoding speed of AR vs block-diffusion decoding on held-out records.

    python pipelines/evaluate.py --model runs/quickstart/tiny-dllm --base assets/tiny-ar-base \
        --data assets/world/test.jsonl --thresholds 1.0,0.9,0.7,0.5 --output results.json

Records are jsonl `{"prompt": ..., "answer": ...}` (optionally `"messages"`, the full chat to send,
and `"category"`, the task: each task is decoded and reported on its own, then all together);
the prompt is sent as a user message through the checkpoint's chat template (raw when it has none) and the answer must match the generated text
exactly (surrounding whitespace ignored). Rows: the AR base decoded AR (when --base is given), then
the model under test in each mode of --modes (diffusion and speculative once per threshold; a
speculative row must score exactly the model's own AR row: its output is the AR output, so the
rows differ in forwards only; `accept` is the fraction of draft tokens the causal verify kept). tokens/s counts
generated tokens over wall time of the whole batched run on one engine, so rows compare like for like.
`--policies` sweeps selection policies (docs/method.md §5) beside or instead of the thresholds, e.g.
    --policies thr=0.9,thr=0.7,eb=0.5,eb=2,thr=0.9+delim=0.3,eb=1+delim=0.3,thr=0.9+look
(`thr=T`: the threshold rule at T; `eb=G`: the entropy budget gamma G; `+delim=D`: adaptive sub-block
boundaries at newline/end-token delimiters predicted with confidence above D; `+look`: the block
lookahead, a block's first step run by the forward that opens it). With --policies the
--thresholds are not run unless listed as thr=... entries.
`--output` writes the rows as JSON and `--plot` a PNG of accuracy against tokens per forward (one
curve per task, model and policy family over its parameter, the AR base as a point).
Works on any HF checkpoint, e.g. a GSM8K-style set on a real model on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import fdllm
from fdllm.engine.params import MODES
from fdllm.loader import check_checkpoint, parse_dtype, torch_device
from fdllm.quantization import QUANTIZATIONS, check_quantization, weight_bytes
from fdllm.paths import is_uri
from fdllm.storage import check_directory_path, filesystem, local_checkpoint, read_text, write_bytes
from fdllm.tokenizer import render_chat

log = logging.getLogger("fdllm.evaluate")

ALL_TASKS = "all"
_POLICY_KEYS = {"thr": "threshold", "eb": "entropy_budget"}


@dataclass(frozen=True)
class Policy:
    """One point of a policy sweep: a selection rule with its parameter, optionally adaptive sub-blocks
    and the block lookahead."""

    selection: str = "threshold"  # fdllm.decoding.SELECTIONS
    value: float | None = None  # the threshold, or the entropy budget gamma (None: the engine's default)
    delimiter_threshold: float | None = None
    block_lookahead: bool = False  # diffusion rows only (SamplingParams.block_lookahead)

    def sampling_params(self, max_new_tokens: int, mode: str) -> fdllm.SamplingParams:
        if mode == "ar":
            return fdllm.SamplingParams(max_new_tokens=max_new_tokens, mode="ar")
        budget = self.selection == "entropy_budget"
        return fdllm.SamplingParams(
            max_new_tokens=max_new_tokens, mode=mode, selection=self.selection,
            threshold=None if budget else self.value, entropy_budget=self.value if budget else None,
            delimiter_threshold=self.delimiter_threshold, block_lookahead=self.block_lookahead,
        )

    @classmethod
    def parse(cls, text: str) -> "Policy":
        """`thr=0.9`, `eb=0.5`, either with `+delim=0.3` and/or `+look`."""
        head, *suffixes = text.split("+")
        key, _, value = head.partition("=")
        if key not in _POLICY_KEYS or not value:
            raise ValueError(f"policy {text!r}: expected thr=T or eb=G, optionally +delim=D and +look")
        delimiter, lookahead = None, False
        for suffix in suffixes:
            name, _, d = suffix.partition("=")
            if suffix == "look" and not lookahead:
                lookahead = True
            elif name == "delim" and d and delimiter is None:
                delimiter = float(d)
            else:
                raise ValueError(f"policy {text!r}: the suffixes are +delim=D and +look, each at most once")
        policy = cls(_POLICY_KEYS[key], float(value), delimiter, lookahead)
        policy.sampling_params(1, "diffusion")  # SamplingParams' own range checks, now
        return policy


@dataclass(frozen=True)
class EvalRow:
    model: str
    task: str  # the records' `category`, or ALL_TASKS for the whole set
    mode: str
    threshold: float | None
    batch_size: int  # requests decoded together (the whole set when 0 was asked)
    accuracy: float
    correct: int
    total: int
    tokens_per_forward: float
    tokens_per_s: float
    generated_tokens: int
    seconds: float
    quantization: str | None = None  # the weights' format (None: the checkpoint's dtype)
    weight_bytes: int = 0  # the model's weights as held in memory
    agreement: float | None = None  # quantized rows: share of records decoded to the unquantized row's text
    outputs: tuple[str, ...] = field(default=(), repr=False, compare=False)  # generated texts (not in the JSON)

    drafted: int = 0  # speculative: draft tokens proposed to a verify forward
    accepted: int = 0  # speculative: draft tokens the verify confirmed
    selection: str = "threshold"  # the selection policy (docs/method.md §5) of diffusion/speculative rows
    entropy_budget: float | None = None  # selection "entropy_budget": gamma
    delimiter_threshold: float | None = None  # adaptive sub-block boundaries (None: fixed sub-blocks)
    sub_block_size: int | None = None  # diffusion/speculative rows: the sub-block size they decoded with
    block_lookahead: bool = False  # diffusion rows: a block's first step ran in the forward that opened it

    @property
    def label(self) -> str:
        """The model as figures name it: with its weight format when quantized."""
        return f"{self.model} {self.quantization}" if self.quantization else self.model

    @property
    def family(self) -> str:
        """The policy family a frontier curve runs through (its points differ in threshold or gamma)."""
        name = "entropy budget" if self.selection == "entropy_budget" else "threshold"
        name += f" + delimiter {self.delimiter_threshold:g}" if self.delimiter_threshold is not None else ""
        return name + (" + lookahead" if self.block_lookahead else "")

    @property
    def policy(self) -> str:
        """Short policy label of a row: `thr 0.9`, `eb 0.5`, `eb 0.5 +d0.3`; `-` for AR rows."""
        if self.mode == "ar":
            return "-"
        if self.selection == "entropy_budget":
            text = f"eb {self.entropy_budget:g}" if self.entropy_budget is not None else "eb"
        else:
            text = f"thr {self.threshold:g}" if self.threshold is not None else "thr"
        text += f" +d{self.delimiter_threshold:g}" if self.delimiter_threshold is not None else ""
        return text + (" +look" if self.block_lookahead else "")

    @property
    def parameter_order(self) -> float:
        """Along a curve, from the most to the least conservative: thresholds descending, budgets ascending."""
        value = self.parameter if self.parameter is not None else 0.0
        return value if self.selection == "entropy_budget" else -value

    @property
    def parameter(self) -> float | None:
        """The swept value of its curve: the threshold or gamma."""
        return self.entropy_budget if self.selection == "entropy_budget" else self.threshold

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "outputs"}


def load_records(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """`{"prompt", "answer"}` records of a jsonl file, local or a URI. A bad line is a ValueError that
    names the file and line (the CLI's one-line error), never a traceback."""
    try:
        text = read_text(path)
    except UnicodeDecodeError as e:
        kind = "a parquet file" if str(path).endswith(".parquet") else "not UTF-8 text"
        raise ValueError(f"{path}: {kind} (byte {e.start}); --data takes a JSONL file of records") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; --data takes a JSONL file of records") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such records file") from None
    records = []
    text = text.removeprefix("\ufeff")  # a BOM (some editors save one), as the fine-tune's reader skips it
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
            raise ValueError(f"{path}:{n}: each record needs string 'prompt' and 'answer' fields")
        if problem := _optional_fields_problem(rec):
            raise ValueError(f"{path}:{n}: {problem}")
        try:  # an escape such as "\ud800" loads as a lone surrogate, which the tokenizer fails on (a TypeError)
            json.dumps(rec, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError(f"{path}:{n}: a lone surrogate (an escape such as \\ud800) is no text") from None
        records.append(rec)
        if limit and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _optional_fields_problem(record: dict) -> str | None:
    """What is wrong with a record's optional `messages` (the chat sent) or `category` (its task), if anything."""
    messages = record.get("messages")
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        return "'messages', when given, must be a non-empty list of {\"role\": str, \"content\": str}"
    if record.get("category") is not None and not isinstance(record["category"], str):
        return "'category', when given, must be a string"
    return None


def prompt_ids(engine: fdllm.Engine, record: dict) -> list[int]:
    """The record's chat (its `messages` if given, else `prompt` as one user turn) under the chat template."""
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        return tok(record["prompt"]).input_ids
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    return tok(render_chat(tok, messages), add_special_tokens=False).input_ids


def evaluate(engine: fdllm.Engine, records: list[dict[str, str]], params: fdllm.SamplingParams, name: str,
             progress: bool = True, batch_size: int = 0, task: str = ALL_TASKS) -> EvalRow:
    """Decode the records `batch_size` at a time (0: all in one continuous batch) and score exact matches.

    Batch 1 is the latency regime of the paper's headline numbers; a large batch measures throughput,
    where each diffusion step computes more tokens than an AR step and the speed-up shrinks."""
    prompts = [prompt_ids(engine, r) for r in records]
    # named here, before any decoding: the engine's refusal in the middle of a batch names no record
    if too_long := [i for i, ids in enumerate(prompts) if len(ids) + params.max_new_tokens > engine.max_model_len]:
        first = too_long[0]
        raise ValueError(f"{len(too_long)} record(s) too long, such as the one whose prompt starts "
                         f"{records[first]['prompt'][:40]!r}: its {len(prompts[first])} tokens and --max-new-tokens "
                         f"{params.max_new_tokens} pass the model's context of {engine.max_model_len} tokens; lower "
                         "--max-new-tokens or leave such records out")
    step = batch_size or len(prompts)
    start = time.perf_counter()
    results = []
    for i in tqdm(range(0, len(prompts), step), desc=f"{name} {params.mode}", disable=not progress or step == len(prompts)):
        results += engine.generate(prompts[i : i + step], params, progress=progress and step == len(prompts))
    seconds = time.perf_counter() - start
    correct = sum(res.text.strip() == rec["answer"].strip() for res, rec in zip(results, records))
    tokens = sum(len(res.token_ids) for res in results)
    forwards = sum(res.num_forwards for res in results)
    policy = {} if params.mode == "ar" else {"selection": params.selection, "entropy_budget": params.entropy_budget,
                                              "delimiter_threshold": params.delimiter_threshold,
                                              "sub_block_size": engine.config.sub_block_size,
                                              "block_lookahead": params.block_lookahead}
    return EvalRow(model=name, task=task, mode=params.mode, threshold=params.threshold if params.mode != "ar" else None,
                   batch_size=step, accuracy=correct / len(records), correct=correct, total=len(records),
                   tokens_per_forward=tokens / max(forwards, 1), tokens_per_s=tokens / seconds,
                   generated_tokens=tokens, seconds=seconds, quantization=engine.engine_config.quantization,
                   weight_bytes=weight_bytes(engine.model), outputs=tuple(res.text for res in results),
                   drafted=sum(res.num_drafted for res in results), accepted=sum(res.num_accepted for res in results),
                   **policy)


def warm_up(engine: fdllm.Engine, records: list[dict[str, str]], params: fdllm.SamplingParams, batch_size: int = 0) -> None:
    """On a GPU, an untimed decode of a batch of the prompts, two blocks long, before a row is timed: a
    step shape's first run compiles its Triton kernels and captures its CUDA graph (seconds), which the
    first row of each engine (the AR base's, whose tokens/s every "vs AR" divides by) paid alone. On a
    CPU there is nothing to compile: no warm-up, no time spent."""
    if engine.model.device.type != "cuda":
        return
    prompts = [prompt_ids(engine, r) for r in records[: batch_size or len(records)]]
    tokens = min(params.max_new_tokens, 2 * engine.config.block_size)
    engine.generate(prompts, replace(params, max_new_tokens=tokens), progress=False)


def evaluate_by_task(engine: fdllm.Engine, records: list[dict[str, str]], params: fdllm.SamplingParams, name: str,
                     batch_size: int = 0) -> list[EvalRow]:
    """One row per task (records grouped by `category`, each group decoded on its own, so its
    tokens/s is its own), then the whole set's row summed from them; one row when there is one task.
    Warmed up first (`warm_up`): compiles and graph captures are no row's time."""
    warm_up(engine, records, params, batch_size)
    tasks: dict[str, list[dict[str, str]]] = {}
    for rec in records:
        tasks.setdefault(rec.get("category") or ALL_TASKS, []).append(rec)
    rows = [evaluate(engine, recs, params, name, batch_size=batch_size, task=task) for task, recs in tasks.items()]
    if len(rows) == 1:
        return [replace(rows[0], task=ALL_TASKS)]
    correct, total = sum(r.correct for r in rows), sum(r.total for r in rows)
    tokens, seconds = sum(r.generated_tokens for r in rows), sum(r.seconds for r in rows)
    forwards = sum(r.generated_tokens / r.tokens_per_forward for r in rows if r.tokens_per_forward)
    whole = replace(rows[0], task=ALL_TASKS, accuracy=correct / total, correct=correct, total=total,
                                tokens_per_forward=tokens / max(forwards, 1), tokens_per_s=tokens / seconds,
                                generated_tokens=tokens, seconds=seconds, outputs=sum((r.outputs for r in rows), ()),
                                drafted=sum(r.drafted for r in rows), accepted=sum(r.accepted for r in rows))
    return rows + [whole]


def format_table(rows: list[EvalRow]) -> str:
    ar_speed: dict[tuple[str, int], float] = {}  # the AR reference per task and batch size: like with like
    ar_models: list[str] = []
    for r in rows:
        if r.mode == "ar" and (r.task, r.batch_size) not in ar_speed:
            ar_speed[r.task, r.batch_size] = r.tokens_per_s
            if r.model not in ar_models:
                ar_models.append(r.model)
    head = (f"{'task':<8} {'model':<16} {'quant':<5} {'weights':>8} {'mode':<11} {'policy':<13} {'batch':>5} {'accuracy':>9} "
            f"{'agree':>6} {'tok/fwd':>8} {'tok/s':>8} {'vs AR':>6} {'accept':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ar = ar_speed.get((r.task, r.batch_size))
        ratio = f"{r.tokens_per_s / ar:.2f}x" if ar else "-"
        agree = f"{100 * r.agreement:.0f}%" if r.agreement is not None else "-"
        accept = f"{r.accepted / r.drafted:.2f}" if r.drafted else "-"
        lines.append(f"{r.task:<8} {r.model:<16} {r.quantization or '-':<5} {r.weight_bytes / 1e6:>6.1f}MB {r.mode:<11} "
                     f"{r.policy:<13} {r.batch_size:>5} {100 * r.accuracy:>8.1f}% {agree:>6} {r.tokens_per_forward:>8.2f} "
                     f"{r.tokens_per_s:>8.1f} {ratio:>6} {accept:>6}")
    if ar_models:  # with --base, the base's AR rows come first: the ratios are against the AR base
        lines.append(f"vs AR: tok/s over {', '.join(ar_models)}'s AR row of the same task and batch")
    return "\n".join(lines)


def accuracy_figure(rows: list[EvalRow], batch_size: int | None = None):
    """Accuracy (%) against tokens per forward of the rows at `batch_size` (None: all), one panel per task
    (the whole set when there is one task) on a shared y axis. In each panel the AR rows are points at one
    token per forward and every model x mode (diffusion, speculative) x policy family (`EvalRow.family`)
    is a line through its rows, each point labelled with its threshold or entropy budget: the frontier of
    each policy is its own curve. A colour per model and mode, a line style per family, one legend below
    the panels. A matplotlib Figure (Agg: no display needed)."""
    from matplotlib.figure import Figure

    picked = [r for r in rows if batch_size is None or r.batch_size == batch_size]
    tasks = sorted({r.task for r in picked} - {ALL_TASKS}) or [ALL_TASKS]
    series = list(dict.fromkeys((r.label, r.mode, r.family) for r in picked if r.mode != "ar"))
    colors = {key: f"C{i % 10}" for i, key in enumerate(dict.fromkeys((label, mode) for label, mode, _ in series))}
    families = list(dict.fromkeys(family for _, _, family in series))
    styles = ["o-", "^--", "s:", "v-.", "D-", "P--"]
    one_mode, one_family = len({mode for _, mode, _ in series}) <= 1, len(families) <= 1

    def name(label: str, mode: str, family: str) -> str:
        detail = mode if one_family else family if one_mode else f"{mode}, {family}"
        return f"{label} ({detail})"

    ar_labels = list(dict.fromkeys(r.label for r in picked if r.mode == "ar"))
    legend_rows = math.ceil((len(series) + len(ar_labels)) / 2)
    fig = Figure(figsize=(max(7.0, 3.4 * len(tasks)), 3.8 + 0.2 * legend_rows))
    axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        ours = [r for r in picked if r.task == task]
        for r in (r for r in ours if r.mode == "ar"):
            ax.scatter([r.tokens_per_forward], [100 * r.accuracy], color="black", marker="s", zorder=3,
                       label=f"{r.label} (AR)")
        for label, mode, family in series:
            curve = sorted((r for r in ours if (r.label, r.mode, r.family) == (label, mode, family)),
                           key=lambda r: r.parameter_order)
            if not curve:
                continue
            ax.plot([r.tokens_per_forward for r in curve], [100 * r.accuracy for r in curve],
                    styles[families.index(family) % len(styles)], color=colors[(label, mode)],
                    label=name(label, mode, family))
            for r in curve:
                if r.parameter is not None:
                    ax.annotate(f"{r.parameter:g}", (r.tokens_per_forward, 100 * r.accuracy), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("tokens per forward")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy (%)")
    handles = {}
    for ax in axes:  # a curve missing from one panel still gets its legend entry
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    regime = f"batch {batch_size}" if batch_size is not None else "batch " + ", ".join(sorted({str(r.batch_size) for r in picked}))
    fig.suptitle(f"accuracy vs tokens per forward ({regime}; labels: threshold or entropy budget)", fontsize=10)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.15) / fig.get_figheight(), 1, 1))
    return fig


def plot_rows(rows: list[EvalRow], path: str | Path, batch_size: int | None = None) -> str | Path:
    """Save `accuracy_figure(rows, batch_size)` as a PNG at `path` (local or a URI); returns `path`."""
    import io

    png = io.BytesIO()
    accuracy_figure(rows, batch_size).savefig(png, format="png", dpi=110)
    write_bytes(path, png.getvalue())
    return path


def run_evaluation(model: str, data: str, base: str | None = None, modes: tuple[str, ...] = ("diffusion",),
                   thresholds: tuple[float, ...] = (1.0, 0.9, 0.7, 0.5), max_new_tokens: int = 64,
                   limit: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   batch_size: int = 0, quantizations: tuple[str | None, ...] = (None,),
                   policies: tuple[Policy, ...] | None = None, sub_block_size: int | None = None,
                   speculative_lookahead: bool = True) -> list[EvalRow]:
    """The AR base (when given), then the model in each mode, once per weight format in `quantizations`
    (None: unquantized), once per selection policy (None: the threshold rule at each of `thresholds`).
    Quantized rows report their greedy agreement with the unquantized model's row of the same mode
    and policy, when that row was run first. `sub_block_size` replaces the checkpoint's at decode time
    (a step can commit at most a sub-block; the model is then named `<dir> sb<N>` in tables and figures).
    `speculative_lookahead` False: speculative verifies draft nothing ahead (EngineConfig's; same tokens)."""
    if policies is None:
        policies = tuple(Policy("threshold", thr) for thr in thresholds)
    records = load_records(data, limit)
    rows = []
    # No prefix cache: a later row on an engine would find every prompt an earlier row prefilled (measured: 63% of
    # the prompt tokens, vs 14% for the first row), an edge over the AR base, which runs first on its own engine.
    def uncached(**options) -> fdllm.EngineConfig:
        return fdllm.EngineConfig(enable_prefix_caching=False, **options)

    if base:
        base_engine = fdllm.Engine.from_pretrained(base, device=device, dtype=dtype, engine_config=uncached())
        rows += evaluate_by_task(base_engine, records, fdllm.SamplingParams(max_new_tokens=max_new_tokens, mode="ar"),
                                 Path(base).name, batch_size=batch_size)
        del base_engine
    name = Path(model).name
    config = None
    if sub_block_size is not None:
        config = fdllm.BlockDiffusionConfig.from_checkpoint(local_checkpoint(model), sub_block_size=sub_block_size)
        name += f" sb{sub_block_size}"
    unquantized: dict[tuple[str, str, Policy | None], EvalRow] = {}
    for quantization in quantizations:
        engine = fdllm.Engine.from_pretrained(model, config=config, device=device, dtype=dtype,
                                              engine_config=uncached(quantization=quantization,
                                                                     speculative_lookahead=speculative_lookahead))
        for mode in modes:
            # the block lookahead is a diffusion-mode schedule: its policies have no other mode's row
            mode_policies = [p for p in policies if mode == "diffusion" or not p.block_lookahead]
            for policy in mode_policies if mode != "ar" else (None,):
                params = (policy or Policy()).sampling_params(max_new_tokens, mode)
                for row in evaluate_by_task(engine, records, params, name, batch_size=batch_size):
                    key = (row.task, mode, policy)
                    if quantization is None:
                        unquantized[key] = row
                    elif key in unquantized:
                        same = sum(a == b for a, b in zip(row.outputs, unquantized[key].outputs))
                        row = replace(row, agreement=same / row.total)
                    rows.append(row)
                log.info("%s %s %s %s: %.1f%%", name, quantization or "", mode, rows[-1].policy, 100 * rows[-1].accuracy)
        del engine
    return rows


def _quantizations(text: str) -> tuple[str | None, ...]:
    names = tuple(None if q == "none" else q for q in text.split(",") if q)
    if unknown := set(names) - {None, *QUANTIZATIONS}:
        raise argparse.ArgumentTypeError(f"unknown formats {sorted(unknown)}: choose from none,{','.join(QUANTIZATIONS)}")
    return names


def threshold_list(text: str) -> tuple[float, ...]:
    """`--thresholds` (an argparse type): a comma list of confidence thresholds in (0, 1]."""
    values = tuple(float(x) for x in text.split(",") if x)  # ValueError: argparse's "invalid value"
    if not values or not all(0 < v <= 1 for v in values):  # NaN fails too
        raise argparse.ArgumentTypeError(f"thresholds must be numbers in (0, 1], got {text!r}")
    return values


def _policies(text: str) -> tuple[Policy, ...]:
    try:
        return tuple(Policy.parse(p) for p in text.split(",") if p)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> list[EvalRow]:
    parser = argparse.ArgumentParser(prog="fdllm-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="checkpoint dir to evaluate (fdllm/HF format); a comma list evaluates each in turn "
                        "into one table and figure (e.g. a fine-tuned model and its distilled version)")
    parser.add_argument("--data", required=True, help="jsonl of {prompt, answer}")
    parser.add_argument("--base", help="AR base checkpoint, evaluated with AR decoding as the reference row")
    parser.add_argument("--modes", default="ar,diffusion", help="comma list of ar, diffusion, speculative")
    parser.add_argument("--thresholds", default="1.0,0.9,0.7,0.5", type=threshold_list)
    parser.add_argument("--policies", type=_policies,
                        help="comma list of selection policies to sweep instead of --thresholds: thr=T, eb=G "
                        "(entropy budget), either with +delim=D (adaptive sub-blocks) and/or +look (block lookahead), "
                        "e.g. thr=0.9,eb=0.5,eb=1+delim=0.3,thr=0.9+look")
    parser.add_argument("--sub-block-size", type=int,
                        help="decode with sub-blocks of N tokens instead of the checkpoint's (N must divide its block "
                        "size): a step commits at most a sub-block, so a larger one allows more tokens per forward")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="requests decoded together; 1 = latency regime (the paper's batch-1 numbers), 0 = all at once")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", type=_quantizations, default=(None,),
                        help="comma list of weight formats for the model under test: none," + ",".join(QUANTIZATIONS)
                        + " (e.g. none,int8,int4: each quantized row reports its agreement with the none row)")
    parser.add_argument("--speculative-lookahead", action=argparse.BooleanOptionalAction, default=True,
                        help="speculative mode: a verify also drafts the next round (the same tokens in fewer forwards)")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--plot", help="write a PNG of accuracy vs tokens per forward here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modes = tuple(m for m in args.modes.split(",") if m)
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}")
    if not modes:
        parser.error("--modes names no mode")
    models = [m for m in args.model.split(",") if m]
    if not models:  # "," printed an empty table and exited 0
        parser.error("--model names no model")
    if args.batch_size < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size must be >= 0 (0: all at once) and --limit >= 1")
    try:  # before decoding: a format this device cannot run would end the run after the rows before it
        for quantization in filter(None, args.quantization):
            check_quantization(quantization, torch_device(args.device), parse_dtype(args.dtype))
    except ValueError as e:
        parser.error(f"--quantization: {e}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # not after the whole evaluation
        parser.error("--plot needs matplotlib: pip install 'fdllm[train]'")
    for option in ("output", "plot"):  # before decoding: a path that cannot be written fails now
        path = getattr(args, option)
        try:
            if path and is_uri(path):
                filesystem(path)  # an unknown scheme or a missing package
            elif path and Path(path).is_dir():
                raise ValueError(f"{path} is a directory; give a file path")
            elif path:
                check_directory_path(str(Path(path).absolute().parent))  # its directory: absent or one, not a file
        except (ValueError, ImportError) as e:
            parser.error(f"--{option}: {e}")
    for option, path in [*(("model", m) for m in models), *([("base", args.base)] if args.base else [])]:
        try:  # before decoding: a missing second model (or --model after --base) ended the run after the rows before it
            check_checkpoint(path, need_tokenizer=True)  # evaluate renders and reads text with it
        except (OSError, ValueError, ImportError) as e:
            parser.error(f"--{option}: " + " ".join(str(e).splitlines()))
    rows = []
    try:
        for i, model in enumerate(models):
            rows += run_evaluation(model, args.data, args.base if i == 0 else None, modes, args.thresholds,
                                   args.max_new_tokens, args.limit, args.device, parse_dtype(args.dtype),
                                   args.batch_size, args.quantization, args.policies, args.sub_block_size,
                                   args.speculative_lookahead)
    except (ValueError, OSError) as e:  # bad data, a missing checkpoint, a sub-block that does not divide the block
        parser.error(str(e))
    print(format_table(rows))
    if args.output:
        write_bytes(args.output, (json.dumps([r.to_json() for r in rows], indent=2) + "\n").encode())
        log.info("wrote %s", args.output)
    if args.plot:
        log.info("wrote %s", plot_rows(rows, args.plot))
    return rows


def cli() -> int:
    """`fdllm-evaluate`: exit status 0 (a console script exits with what its function returns)."""
    main()
    return 0


if __name__ == "__main__":
    main()
