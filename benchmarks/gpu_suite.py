r"""Every GPU figure of the project in one command (random weights, no network), on one H100/H200.

    python -m benchmarks.gpu_suite --out runs/gpu-suite            # the real suite (target: <= 8 minutes)
    python -m benchmarks.gpu_suite --out runs/gpu-suite --sections decode,kernels   # some sections only
    python -m benchmarks.gpu_suite --out runs/gpu-suite --deadline-s 540   # stop starting sections after 9 min
    python -m benchmarks.gpu_suite --out runs/gpu-suite --decode-shapes qwen2.5-1.5b --decode-batches 1,64   # a shorter table
    python -m benchmarks.gpu_suite --out /tmp/suite --smoke        # CPU: tiny shapes, Triton interpreter

Without a CUDA device only `--smoke` runs (the real shapes would take hours on a CPU). It uses the
`dev` extra (pytest, for `pytest -m gpu`) and the `quant` one (torchao): install with
`pip install -e ".[train,serve,gpu,quant,dev]"`; a section whose package is missing is recorded as skipped.

Each section runs in a process of its own, under a time limit (`SECTION_TIMEOUT_S`), and appends to
report.json and report.md as soon as it ends: a stopped run keeps what it measured, and a failing,
crashing or hanging section (a CUDA error leaves its process's context unusable) is recorded while the
next one runs in a fresh process. `--sections` runs some of them (a rerun of the ones that failed);
`--deadline-s` ends the run cleanly by then (a section gets what is left; one that cannot start is
recorded as skipped), for a device lent for a fixed time; on a GPU it defaults to 480 s, the 8-minute
target (`--deadline-s inf`: every section runs to its own limit). A process a section starts (pytest,
bench_kernels) has a limit inside the section's, so the section reports rather than being killed. The order puts the targets first:
1. engine exactness on the device: Triton backend with CUDA graphs == torch backend eager ==
   the no-cache block-causal reference (tests/reference.py), greedy; and with a causal-prefix
   model (causal rows in captured graphs: commits with and without the block lookahead, speculative
   verifies), graphs == eager and speculative == AR; `Engine.score` on the device's backend within
   1e-3 of torch eager; prefix caching (shared, then cached prompts) == caching off; requests
   preempted for want of KV pages (recomputed from the prefix cache) == never preempted;
2. syncs per decode step, counted with `torch.cuda.set_sync_debug_mode("warn")`;
3. decode at Qwen2.5-1.5B and 7B shapes (bf16), batch 1/8/32/64: AR vs diffusion (sub-block cache
   on/off), graphs on/off: ms per step, per-step cost vs AR, tokens/s, and the projected end-to-end
   speed-up at 2.4 and 4 tokens per forward (= tokens per forward x AR step / diffusion step);
   diffusion with the block lookahead (a block's first step in the forward that opens it: fewer
   forwards, a longer commit step); speculative decoding with and without its lookahead (random
   weights reject most drafts, so these rows time the steps, and "lookahead step cost" says what
   the lookahead's extra query rows cost per step at each batch: the figure
   `EngineConfig.speculative_lookahead_max_batch` is chosen by);
   at batch 1 also AR and diffusion on the Triton decode GEMM (`EngineConfig(linear_backend="triton")`:
   its "step/AR step" against the cuBLAS AR row decides whether it becomes the default);
   plus the same workload through a plain HF-transformers `generate` loop (the yardstick), AR
   batch-1 step time against the weight-read roofline (weight bytes / peak bandwidth), and each
   run's peak allocated memory (weights, KV pages, the largest step's activations and head chunk);
4. `pytest -m gpu` (compiled Triton kernels vs their references);
5. where a decode step's time goes at the 1.5B shape (torch.profiler: wall vs GPU kernel time, kernels
   per step, the costliest kernels and host ops): AR and diffusion with graphs and AR eager at batch 1,
   AR on the Triton decode GEMM (`linear_backend="triton"`) at batch 1, diffusion at batch 64; and AR at
   batch 1 at the 7B shape on cuBLAS and on the Triton GEMM;
6. quantized decode (fdllm.quantization: int8, int4, fp8 where the device runs it) at the 1.5B
   shape, batch 1 and 32, AR and diffusion: weight bytes, ms per step, tokens/s, token agreement
   with the unquantized model;
7. kernel latency (CUDA-graph replays) and achieved HBM bandwidth vs peak (benchmarks/bench_kernels.py),
   with rows at other values of the kernels' tuning constants (--tune) to set them from;
8. training step cost of the two-stream objective vs AR at the 1.5B shape, and with vs without the
   compaction of the noisy blocks that carry no target (benchmarks/bench_train.py).
Targets checked: a diffusion step at batch 1 <= 1.3x an AR step; AR batch-1 decode within 1.5x of
the weight-read roofline; one sync per step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from benchmarks.cli import choice_list, output_dir, positive_float, positive_int_list, write_json_atomic
from benchmarks.shapes import SHAPES
# HBM bandwidth (GB/s, NVIDIA's data sheets) by device name, most specific first: the first name that
# torch.cuda.get_device_name contains is the device's ("NVIDIA H100 PCIe" is not an SXM H100).
PEAK_GBPS = (("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0),
             ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0))
TARGET_STEP_RATIO, TARGET_ROOFLINE, TARGET_SYNCS = 1.3, 1.5, 1
DECODE_SHAPES, DECODE_BATCHES = ["qwen2.5-1.5b", "qwen2.5-7b"], [1, 8, 32, 64]  # --decode-shapes, --decode-batches
REPO = Path(__file__).resolve().parents[1]
# The sections in report order, each with the most seconds its process may take (a hang must not
# spend a device session: what is left of the suite still runs).
# In the report's order, the targets first: under a deadline (a device lent for minutes) the sections
# that check them run while there is time; decode keeps its rows if the deadline cuts it.
SECTION_TIMEOUT_S = {"engine exactness": 180, "syncs per step": 180, "decode": 480, "pytest -m gpu": 180,
                     "step profile": 180, "quantized decode": 240, "kernels": 300, "training step": 300}
MIN_SECTION_S = 30  # under --deadline-s, a section with less time left than this is not started
deadline_clock = time.monotonic  # what --deadline-s is counted on (a test runs the suite on a clock of its own)
DEFAULT_DEADLINE_S = 480  # on a GPU, without --deadline-s: the suite's 8-minute target
# What a section needs beyond the `train,serve,gpu` extras (in `dev` and `quant`): without it the section
# is recorded as skipped, with the install line, instead of failing where it imports it
SECTION_NEEDS = {"pytest -m gpu": ("pytest",), "quantized decode": ("torchao",)}
INSTALL_ALL = 'pip install -e ".[train,serve,gpu,quant,dev]"'
WARMUP_TOKENS = 40  # a warm-up run's tokens: past the first 32-token block's commit, so every step shape has run
Partial = Callable[[dict[str, Any]], None]  # a long section's rows so far, for the report if it is stopped


class Report:
    """Sections in order; rewritten to OUT/report.json and OUT/report.md after each one. With `keep`,
    the sections of the report already in OUT stay, those run again replaced (a rerun of some)."""

    def __init__(self, out: Path, meta: dict[str, Any], keep: bool = False) -> None:
        self.out, self.meta, self.sections = out, meta, []
        out.mkdir(parents=True, exist_ok=True)
        if keep and (out / "report.json").is_file():
            self.sections = [s for s in json.loads((out / "report.json").read_text())["sections"]
                             if s["name"] in SECTION_TIMEOUT_S]

    def run(self, name: str, child_argv: list[str], timeout_s: float) -> None:
        """Section `name` in a process of its own (`python -m benchmarks.gpu_suite ... --section name`),
        its output echoed as it goes, killed after `timeout_s`. A section stopped before its result
        (killed, crashed) keeps the rows it measured if it wrote them as it went (`SectionResult.partial`)."""
        print(f"[gpu_suite] {name} ...", flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:  # removed however the section ends
            section = self._run_child(name, child_argv, timeout_s, Path(tmp) / "section.json")
        self.add(name, section, time.perf_counter() - start)

    @staticmethod
    def _run_child(name: str, child_argv: list[str], timeout_s: float, result_file: Path) -> dict[str, Any]:
        """The section's result as its process wrote it to `result_file`, or what stopped it."""
        # its own process group: a timeout kills what it started too. utf-8 with replacement: one
        # undecodable byte in its output must not end the echo thread (the pipe would fill and block it)
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_suite", *child_argv, "--section", name,
                                 "--section-result", str(result_file), "--section-budget-s", str(timeout_s)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                errors="replace", start_new_session=True)
        tail: collections.deque[str] = collections.deque(maxlen=30)
        echo = threading.Thread(target=_echo, args=(proc.stdout, tail), daemon=True)
        echo.start()
        try:
            code, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            code, timed_out = _kill_group(proc), True
        except BaseException:  # Ctrl-C, or SIGTERM (main): the section's processes end with the suite
            _kill_group(proc)
            raise
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        if result is not None and result["status"] != "partial":
            section = result
        elif timed_out:
            section = _stopped(f"timed out after {timeout_s:.3g} s", "timeout", result, tail)
        else:  # died without its result (a crash of the process itself: segfault, CUDA abort)
            section = _stopped(f"its process exited {code} without a result", "error", result, tail)
        echo.join(timeout=5)
        return section

    def skip(self, name: str, why: str) -> None:
        self.add(name, {"status": "skipped", "note": f"not started: {why}"}, 0.0)

    def add(self, name: str, section: dict[str, Any], seconds: float) -> None:
        section = {"name": name, "status": section.pop("status"), "seconds": round(seconds, 1), **section}
        order = list(SECTION_TIMEOUT_S)
        self.sections = sorted([s for s in self.sections if s["name"] != name] + [section],
                               key=lambda s: order.index(s["name"]))
        print(f"[gpu_suite] {name}: {section['status']} in {seconds:.1f} s", flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "report.json").write_text(json.dumps({"meta": self.meta, "sections": self.sections}, indent=2))
        lines = ["# fdllm GPU suite\n", *(f"- {k}: {v}" for k, v in self.meta.items()), ""]
        for s in self.sections:
            lines.append(f"## {s['name']} ({s['status']}, {s['seconds']} s)\n")
            if "error" in s:
                lines.append(f"```\n{s['error']}\n{s.get('output tail', '')}```\n")
            if s.get("note"):
                lines.append(f"{s['note']}\n")
            for check in s.get("checks", []):
                lines.append(f"- {'PASS' if check['pass'] else 'FAIL'}: {check['what']} ({check['value']})")
            for key, value in s.items():  # what else the section measured (ratios, failing tests, sync lines)
                if key in _RENDERED or value in (None, [], {}):
                    continue
                lines.append(f"- {key}: {_fmt(value)}" if not isinstance(value, (dict, list)) else
                             f"\n{key}:\n```\n{json.dumps(value, indent=1)}\n```")
            if s.get("table"):
                cols = list(dict.fromkeys(k for row in s["table"] for k in row))  # every row's columns, in order
                lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in s["table"]]
            lines.append("")
        (self.out / "report.md").write_text("\n".join(lines))


_RENDERED = {"name", "status", "seconds", "error", "output tail", "note", "checks", "table"}  # Report.write's own lines


class SectionResult:
    """In a section's own process, its result file (a temporary file: OUT holds the report alone).
    A long section writes its rows so far after each one (`partial`, status "partial"), so that the
    report keeps them if the process is killed at its timeout, crashes, or the section raises."""

    def __init__(self, path: Path) -> None:
        self.path, self.last = path, {}

    def partial(self, result: dict[str, Any]) -> None:
        self.last = result
        self.write({"status": "partial", **result})

    def write(self, section: dict[str, Any]) -> None:
        """Written whole, then renamed: a process killed while writing leaves the previous file."""
        write_json_atomic(self.path, section)


def run_section(fn: Callable[[Partial], dict[str, Any]], path: Path) -> NoReturn:
    """In a section's own process: run it, write its result (or the error it raised, with the rows it
    wrote before) for the report, and exit at once: a process that hangs at interpreter exit (inductor's
    compile workers, a CUDA teardown) must not be recorded as a section that timed out."""
    result = SectionResult(path)
    try:
        section = {"status": "ok", **fn(result.partial)}
    except Exception as exc:  # noqa: BLE001 - recorded in the report; the next section still runs
        traceback.print_exc()  # as it happens, in the suite's output; and in the report
        section = {**result.last, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
    result.write(section)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _kill_group(proc: subprocess.Popen) -> int:
    """Kill a section's process and what it started (its own session), and reap it."""
    with contextlib.suppress(ProcessLookupError):  # it may have exited since
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def _echo(stream, tail: collections.deque[str]) -> None:
    """A section's output, printed as it comes (progress) and its last lines kept (the report of a crash)."""
    for line in stream:
        print(line, end="", flush=True)
        tail.append(line)


def _stopped(error: str, status: str, partial: dict[str, Any] | None, tail: collections.deque[str]) -> dict[str, Any]:
    """A section whose process ended without its result: the rows it wrote before (status
    "<status> (partial)"), if any, and why it stopped."""
    if partial is None:
        return {"status": "error", "error": error, "output tail": "".join(tail)}
    return {**partial, "status": f"{status} (partial)", "error": error, "output tail": "".join(tail)}


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else "" if v is None else str(v)


def _check(what: str, value: Any, ok: bool) -> dict[str, Any]:
    return {"what": what, "value": value, "pass": bool(ok)}


# -- sections -----------------------------------------------------------------------------------------
def inner_timeout(budget_s: float) -> float:
    """The limit of a process a section starts: inside the section's own (`--section-budget-s`), so that
    the section ends by itself and reports, rather than being killed with it."""
    return max(budget_s - 15, 1)


def pytest_gpu(smoke: bool, budget_s: float, out: Path | None = None) -> dict[str, Any]:
    """`pytest -m gpu`; its whole output goes to OUT/pytest_gpu.log (a failure's message, which the short
    summary cuts at the terminal's width, is what the next GPU session needs)."""
    # every gpu-marked test is a kernel test (collecting the whole tree would need every extra installed)
    target = ["tests/kernels/test_paged_attention.py"] if smoke else ["tests/kernels"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *target],
                          capture_output=True, text=True, timeout=inner_timeout(budget_s), env=os.environ | {"COLUMNS": "400"})
    if out is not None:
        (out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines()
    tail = lines[-1:] or [""]
    # smoke: no CUDA, all skip; on a GPU, a run whose tests all skipped (no triton, say) checked nothing
    ok = proc.returncode in (0, 5) if smoke else proc.returncode == 0 and " passed" in tail[0]
    # the failing tests and their errors (pytest's short summary, -ra), the one thing a rerun needs
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"checks": [_check("pytest -m gpu", tail[0], ok)], "returncode": proc.returncode, "failed": failed}


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    import fdllm
    from fdllm.config import ModelConfig

    D, F, layers, N, K, V, tied = SHAPES[shape]
    cfg = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=layers,
                      num_attention_heads=N, num_key_value_heads=K, tie_word_embeddings=tied,
                      max_position_embeddings=4096, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device(device):
        model = fdllm.Transformer(cfg).to(dtype).eval()
    return model


def _engine(model, mask_id: int, *, backend: str, eager: bool, cache: bool, batch: int, threshold: float,
            block: int = 32, sub: int = 8, quantization: str | None = None, lookahead: bool = True,
            prefix: str = "block_causal", prefix_caching: bool = False, pages: int | None = None, fused: bool = True,
            linears: str = "torch"):
    """An engine for one kind of run. Prefix caching is off unless asked: decode runs configured alike
    share an engine and repeat the same prompts, which must prefill each time to be timed alike.
    `pages`: KV pages (default: 16 per request and 8 more, so nothing is preempted)."""
    import fdllm

    cfg = fdllm.BlockDiffusionConfig(block_size=block, sub_block_size=sub, threshold=threshold,
                                     use_sub_block_cache=cache, mask_token_id=mask_id, prefix_attention=prefix)
    ecfg = fdllm.EngineConfig(max_num_seqs=max(batch, 1), max_model_len=1024, num_pages=pages or batch * 16 + 8,
                              attention_backend=backend, enforce_eager=eager, max_prefill_tokens=4096,
                              quantization=quantization, speculative_lookahead=lookahead,
                              enable_prefix_caching=prefix_caching, fuse_kernels=fused, linear_backend=linears)
    return fdllm.Engine(model, None, cfg, ecfg)


def exactness(device: torch.device, smoke: bool) -> dict[str, Any]:
    import fdllm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.reference import reference_generate

    model = random_model("smoke", device, torch.float32)
    mask = model.config.vocab_size - 1
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, mask, (n,), generator=gen).tolist() for n in (3, 8, 13)]
    p = fdllm.SamplingParams(max_new_tokens=12, ignore_eos=True)
    backend = "triton" if device.type == "cuda" else "torch"
    fast = _engine(model, mask, backend=backend, eager=False, cache=False, batch=4, threshold=0.05, block=8, sub=4)
    slow = _engine(model, mask, backend="torch", eager=True, cache=False, batch=4, threshold=0.05, block=8, sub=4)
    got = _tokens(fast.generate(prompts, p))
    eager = _tokens(slow.generate(prompts, p))
    ref = [reference_generate(model, pr, 12, 8, 4, 0.05) for pr in prompts]
    # Causal rows in static steps (per-entry flags, captured graphs): a causal-prefix model's commits,
    # with and without the block lookahead, and speculative verifies, whose output is the AR output.
    mixed = [fdllm.SamplingParams(max_new_tokens=12, ignore_eos=True, **kw)
             for kw in ({"mode": "speculative"}, {"block_lookahead": True}, {})]
    fast_c, slow_c = (_engine(model, mask, backend=b, eager=e, cache=True, batch=4, threshold=0.05, block=8, sub=4,
                              prefix="causal") for b, e in ((backend, False), ("torch", True)))
    got_c = _tokens(fast_c.generate(prompts, mixed))
    eager_c = _tokens(slow_c.generate(prompts, mixed))
    ar = _tokens(slow_c.generate(prompts[:1], fdllm.SamplingParams(max_new_tokens=12, ignore_eos=True, mode="ar")))[0]
    # Engine.score (logprobs, lm-eval's loglikelihoods): packed causal prefill rows, the whole-vocabulary head
    scored = [fast_c.score(prompts, top_logprobs=2), slow_c.score(prompts, top_logprobs=2)]
    score_gap = max(abs(a - b) for fast_s, slow_s in zip(*scored) for a, b in zip(fast_s.logprobs[1:], slow_s.logprobs[1:]))
    # Prefix caching: prompts that start with the third one, sent together (the others wait for its
    # blocks and share them), then again (every shareable block cached), against `fast` (caching off)
    shared = [prompts[2] + pr for pr in prompts]
    caching = _engine(model, mask, backend=backend, eager=False, cache=False, batch=4, threshold=0.05, block=8, sub=4,
                      prefix_caching=True)
    cached_runs = [caching.generate(shared, p) for _ in range(2)]
    hits = [sum(r.num_cached_tokens for r in run) for run in cached_runs]
    same = [_tokens(run) for run in cached_runs] == [_tokens(fast.generate(shared, p))] * 2
    # Preemption: the causal-prefix runs, twice over and longer, in a cache too small for them (pages
    # on demand: the newest gives its pages back and is prefilled again, from the prefix cache)
    longer = [dataclasses.replace(sp, max_new_tokens=40) for sp in mixed] * 2
    short = _engine(model, mask, backend=backend, eager=False, cache=True, batch=8, threshold=0.05, block=8, sub=4,
                    prefix="causal", prefix_caching=True, pages=10)
    preempted = _tokens(short.generate(prompts * 2, longer)) == _tokens(fast_c.generate(prompts * 2, longer))
    return {"checks": [
        _check(f"{backend} backend, graphs {'on' if fast.runner.graphs else 'off'} == torch eager", got == eager,
               got == eager),
        _check("== no-cache block-causal reference", got == ref, got == ref),
        _check("causal prefix (speculative, block lookahead, plain): graphs == torch eager", got_c == eager_c,
               got_c == eager_c),
        _check("speculative == AR", got_c[0] == ar, got_c[0] == ar),
        _check(f"scoring on {backend} vs torch eager: max |logprob gap| <= 1e-3", round(score_gap, 7), score_gap <= 1e-3),
        _check("prefix caching (shared, then cached) == off: cached prompt tokens per run", hits, same and hits[0] > 0),
        _check("preempted (10 KV pages) == never preempted: preemptions", short.num_preemptions,
               preempted and short.num_preemptions > 0),
    ]}


def _tokens(results) -> list[list[int]]:
    """Each result's tokens; raises if the engine failed a request (it fails a step's requests rather
    than raise: a CUDA-only error would otherwise pass for a very fast, empty run)."""
    failed = [r for r in results if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} request(s) failed in the engine: {failed[0].error}")
    return [r.token_ids for r in results]


@dataclass(frozen=True)
class TimedRun:
    """One batch run to completion. `ms_per_step` times only the steps after every prompt was prefilled
    (the steps CUDA graphs run): the eager prefill step, with its prompt tokens, weighed ~6x more in a
    diffusion run's 20 steps than in an AR run's 128 and biased the step ratio the 1.3x target reads.
    `tokens_per_s` is end to end, prefill included. Both leave out CUDA graph captures (lazy: the first
    step of each new static shape captures)."""

    seconds: float
    tokens: int
    steps: int
    decode_seconds: float
    decode_steps: int
    outputs: list[list[int]]

    @property
    def ms_per_step(self) -> float:
        if not self.decode_steps:  # every request ended while others still prefilled: the whole run
            return 1000 * self.seconds / self.steps
        return 1000 * self.decode_seconds / self.decode_steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


KERNELS_PEAK_GBPS = 3350.0  # the kernels table's peak on a device PEAK_GBPS does not list (an H100 SXM's)


def peak_gbps(device_name: str) -> float:
    """The device's HBM bandwidth (PEAK_GBPS), 0 for one not listed (then no roofline row)."""
    return next((gbps for name, gbps in PEAK_GBPS if name in device_name), 0.0)


def _prefilling(scheduler) -> bool:
    """Whether some request still waits or has prompt tokens to prefill (decode steps start after)."""
    return bool(scheduler.waiting) or any(s.num_prefill_left for s in scheduler.running)


def _decode_run(engine, prompts, params) -> TimedRun:
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    graphs = engine.runner.graphs
    captured = lambda: graphs.capture_seconds if graphs is not None else 0.0  # noqa: E731
    ids = [engine.add_request(pr, params) for pr in prompts]
    scheduler = engine.scheduler
    sync()
    start, capture_start, steps, results = time.perf_counter(), captured(), 0, {}
    decode_from = None  # (time, captures, steps) once no request has prompt tokens left to prefill
    while engine.has_unfinished():
        if decode_from is None and not _prefilling(scheduler):
            sync()
            decode_from = (time.perf_counter(), captured(), steps)
        results |= {r.request_id: r for r in engine.step()}
        steps += 1
    sync()
    end, capture_end = time.perf_counter(), captured()
    decode_start, decode_capture, decode_step = decode_from or (end, capture_end, steps)
    outputs = _tokens([results[i] for i in ids])
    return TimedRun(seconds=end - start - (capture_end - capture_start), tokens=sum(map(len, outputs)), steps=steps,
                     decode_seconds=end - decode_start - (capture_end - decode_capture), decode_steps=steps - decode_step,
                     outputs=outputs)


@dataclass(frozen=True)
class DecodeRun:
    """One row kind of the decode section: a mode and how the engine runs it."""

    name: str
    mode: str
    cache: bool = True  # the sub-block cache
    eager: bool = False  # True: CUDA graphs off (CUDA only: elsewhere every run is eager already)
    spec_lookahead: bool = True  # EngineConfig.speculative_lookahead
    block_lookahead: bool = False  # SamplingParams.block_lookahead
    fused: bool = True  # EngineConfig.fuse_kernels (CUDA only: off CUDA the torch backend never fuses)
    linears: str = "torch"  # EngineConfig.linear_backend (CUDA only, as fused)
    batch_1_only: bool = False  # a row of the batch-1 (roofline) comparison alone: an engine less per batch
    # SamplingParams.threshold (None: the engines' ~0, a sub-block committed in one step, so every
    # diffusion step is its block's refresh, whole-block rows); 1.0 (never exceeded): one token a step,
    # so 7 steps in 8 are cached sub-block rows
    threshold: float | None = None

    @property
    def length_share(self) -> int:
        """Divisor of the tokens it decodes: random weights reject most speculative drafts (two forwards
        a token), so half the tokens time its steps alike and keep the suite inside its minutes."""
        return 2 if self.mode == "speculative" else 1


DECODE_RUNS = (
    DecodeRun("ar", "ar"), DecodeRun("ar", "ar", eager=True),
    # its "step/AR step" is what the fused norm/RoPE kernels and stacked projections save
    DecodeRun("ar, unfused kernels", "ar", fused=False, batch_1_only=True),
    # the decode GEMMs on fdllm.kernels.linear instead of cuBLAS: whether that should be the default
    DecodeRun("ar, triton linears", "ar", linears="triton", batch_1_only=True),
    DecodeRun("diffusion cache on, triton linears", "diffusion", linears="triton", batch_1_only=True),
    DecodeRun("diffusion cache off", "diffusion", cache=False),
    DecodeRun("diffusion cache on", "diffusion"), DecodeRun("diffusion cache on", "diffusion", eager=True),
    # the steps the sub-block cache makes cheaper (at threshold ~0 there are none): one token a step
    DecodeRun("diffusion cache on, one token a step", "diffusion", threshold=1.0),
    DecodeRun("diffusion cache off, one token a step", "diffusion", cache=False, threshold=1.0),
    # threshold ~0 commits the lookahead's whole first sub-block: one forward fewer per block, at the
    # price of the commit step's extra block of query rows (what "step/AR step" shows)
    DecodeRun("diffusion cache on, block lookahead", "diffusion", block_lookahead=True),
    DecodeRun("speculative, no lookahead", "speculative", spec_lookahead=False),
    DecodeRun("speculative", "speculative"),
)


def engine_key(run: DecodeRun) -> tuple[bool, bool, bool, bool, str]:
    """What a run's engine is configured by: runs alike share one engine (and its captured graphs)."""
    return run.eager, run.cache, run.spec_lookahead, run.fused, run.linears


def decode(device: torch.device, smoke: bool, peak_gbps: float, partial: Partial,
           shapes: list[str] = DECODE_SHAPES, batches: list[int] = DECODE_BATCHES) -> dict[str, Any]:
    """The decode table; every row measured so far (and the checks they allow) is passed to `partial`
    as it comes, in the order measured: a timeout keeps what it cost. An engine that fails (a kernel
    that does not compile, a failed capture) is its runs' error rows; the other engines still run."""
    from fdllm.quantization import weight_bytes

    shapes, batches = (["smoke"], [2]) if smoke else (shapes, batches)
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt_len, new = (6, 58) if smoke else (128, 128)  # smoke: past two block commits
    backend = "triton" if device.type == "cuda" else "torch"
    # off CUDA every run is eager and unfused already
    runs = [run for run in DECODE_RUNS if device.type == "cuda" or (run.fused and not run.eager and run.linears == "torch")]
    table, so_far = [], []
    for shape in shapes:
        model = random_model(shape, device, dtype)
        mask = model.config.vocab_size - 1
        # what an AR step reads: every weight but the input embedding's (a gather of the step's rows)
        read_bytes = weight_bytes(model) - (0 if model.config.tie_word_embeddings else
                                            weight_bytes(model.model.embed_tokens))
        gen = torch.Generator().manual_seed(0)
        measured = []  # per batch: its prompts and rows
        for batch in batches:
            prompts = torch.randint(0, mask, (batch, prompt_len), generator=gen).tolist()
            rows = {}
            here = [run for run in runs if batch == 1 or not run.batch_1_only]
            # one engine at a time (the peak memory column is one engine's), shared by the runs it serves
            for _, alike in itertools.groupby(sorted(here, key=engine_key), engine_key):
                alike = list(alike)

                def add(run: DecodeRun, row: dict[str, Any]) -> None:
                    rows[run] = {"shape": shape, "batch": batch, "mode": run.name} | row
                    print(f"  {rows[run]}", flush=True)
                    so_far.append(rows[run])
                    partial({"table": so_far, "checks": decode_checks(so_far)})

                try:
                    _decode_runs(model, mask, backend, batch, prompts, new, alike, device, add)
                except Exception as exc:  # noqa: BLE001 - its runs' error rows: the rest of the table still runs
                    traceback.print_exc()
                    for run in alike:
                        if run not in rows:
                            add(run, {"graphs": device.type == "cuda" and not run.eager, "error": f"{type(exc).__name__}: {exc}"})
            ordered = [rows[run] for run in here]
            add_step_ratios(ordered)
            for row in ordered:
                if row["mode"] == "ar" and row["batch"] == 1 and row["graphs"] and "ms/step" in row and peak_gbps:
                    row["roofline ms"] = 1000 * read_bytes / (peak_gbps * 1e9)
            measured.append((prompts, ordered))
        config = model.config
        del model  # the yardstick's model alone from here: the peak column above is one engine's
        _empty_cache(device)
        hf = hf_model(config, device, dtype)  # built once per shape
        for batch, (prompts, ordered) in zip(batches, measured):
            table += [*ordered, hf_yardstick(hf, prompts, new, shape, batch, device)]
            so_far.append(table[-1])
            partial({"table": so_far, "checks": decode_checks(so_far)})
        del hf
        _empty_cache(device)
    return {"table": table, "checks": decode_checks(table)}


def _decode_runs(model, mask: int, backend: str, batch: int, prompts: list[list[int]], new: int, runs: list[DecodeRun],
                 device: torch.device, add: Callable[[DecodeRun, dict[str, Any]], None]) -> None:
    """Runs configured alike (`engine_key`) on one engine: each warmed up, then timed, its row passed to `add`."""
    import fdllm

    engine = _engine(model, mask, backend=backend, eager=runs[0].eager, cache=runs[0].cache, batch=batch,
                     threshold=1e-9, lookahead=runs[0].spec_lookahead, fused=runs[0].fused, linears=runs[0].linears)
    for run in runs:
        params = fdllm.SamplingParams(max_new_tokens=new // run.length_share, ignore_eos=True, mode=run.mode,
                                      block_lookahead=run.block_lookahead,
                                      **({} if run.threshold is None else {"threshold": run.threshold}))
        _warm_up(engine, prompts, params)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = _decode_run(engine, prompts, params)
        row = {"graphs": engine.runner.graphs is not None, "ms/step": timed.ms_per_step, "tokens/s": timed.tokens_per_s,
               "tokens/forward": timed.tokens / timed.steps / batch}
        if device.type == "cuda":  # weights + KV pages + the steps' activations and head chunks
            row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        add(run, row)


def _warm_up(engine, prompts: list[list[int]], params) -> None:
    """A run of the whole batch before the timed one: graph captures and the kernels compiled or
    autotuned for the batch's shapes happen here, not in the timed window (one prompt would leave the
    batch's shapes to the timed run). Short with graphs (later captures are left out of the timing);
    an eager engine's is the whole run: each new step shape or context length can need a Triton kernel
    of its own specialisation (an integer argument turning a multiple of 16, a split count past 1),
    compiled in its first step, and the H200's eager batch-64 diffusion row once ran 1.4x slower than
    the run before with no kernel of it slower (likely such compiles in its timed window)."""
    tokens = params.max_new_tokens if engine.runner.graphs is None else min(params.max_new_tokens, WARMUP_TOKENS)
    _decode_run(engine, prompts, dataclasses.replace(params, max_new_tokens=tokens))


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_step_ratios(rows: list[dict[str, Any]]) -> None:
    """Per row of one (shape, batch): its step cost against the AR step run the same way (graphs on or
    off) and the projected speed-ups at 2.4 and 4 tokens per forward; the speculative row also its
    step cost against the speculative row without the lookahead ("lookahead step cost": random
    weights reject most drafts, so this is what the lookahead's extra query rows cost per step)."""
    rows = [row for row in rows if "ms/step" in row]  # not the error rows
    ar = {row["graphs"]: row["ms/step"] for row in rows if row["mode"] == "ar"}
    plain = next((row["ms/step"] for row in rows if row["mode"] == "speculative, no lookahead"), None)
    for row in rows:
        if row["mode"] != "ar" and row["graphs"] in ar:
            ratio = row["ms/step"] / ar[row["graphs"]]
            row |= {"step/AR step": ratio, "speed-up @2.4": 2.4 / ratio, "speed-up @4": 4 / ratio}
        if row["mode"] == "speculative" and plain:
            row["lookahead step cost"] = row["ms/step"] / plain


def decode_checks(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The decode targets, read off the table: per shape, the plain diffusion step (sub-block cache on,
    graphs) at batch 1 against the AR step, and the AR batch-1 step against the weight-read roofline."""
    checks = []
    for row in table:
        if row.get("batch") != 1 or not row.get("graphs"):
            continue
        if row["mode"] == "diffusion cache on" and "step/AR step" in row:
            ratio = row["step/AR step"]
            checks.append(_check(f"{row['shape']}: diffusion step <= {TARGET_STEP_RATIO}x AR step at batch 1",
                                 round(ratio, 2), ratio <= TARGET_STEP_RATIO))
        if row["mode"] == "ar" and "roofline ms" in row:
            ratio = row["ms/step"] / row["roofline ms"]
            checks.append(_check(f"{row['shape']}: AR batch-1 step within {TARGET_ROOFLINE}x of the weight-read "
                                 f"roofline ({row['roofline ms']:.2f} ms)", round(ratio, 2), ratio <= TARGET_ROOFLINE))
    return checks


def quantized(device: torch.device, smoke: bool, partial: Partial) -> dict[str, Any]:
    """Decode with each weight format the device runs: weight bytes, step time, tokens/s, and greedy
    agreement with the unquantized model's tokens on the same prompts (random weights: a sanity
    check of the kernels, not an accuracy figure; accuracy is pipelines/evaluate.py --quantization).
    A format that fails (int4 packing, fp8 `_scaled_mm`, a torchao built for another torch) is an
    error row; the other formats still run, and the rows so far go to `partial` as they come."""
    from fdllm.quantization import QUANTIZATIONS, check_quantization

    shape, batches = ("smoke", [2]) if smoke else ("qwen2.5-1.5b", [1, 32])
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt_len, new = (6, 8) if smoke else (128, 128)
    gen = torch.Generator().manual_seed(0)
    mask = SHAPES[shape][5] - 1  # the vocabulary's last token (random_model's mask)
    prompts = {batch: torch.randint(0, mask, (batch, prompt_len), generator=gen).tolist() for batch in batches}
    table, baseline = [], {}
    for fmt in (None, *QUANTIZATIONS):
        try:
            check_quantization(fmt, device, dtype)
        except ValueError as exc:
            table.append({"format": fmt, "skipped": str(exc)})
            continue
        try:
            for row in _quantized_rows(fmt, shape, dtype, device, prompts, new, baseline):
                table.append(row)
                print(f"  {row}", flush=True)
                partial({"table": table})
        except Exception as exc:  # noqa: BLE001 - recorded as the format's row; the next format still runs
            traceback.print_exc()
            table.append({"format": fmt or str(dtype).removeprefix("torch."), "error": repr(exc)})
            partial({"table": table})
        _empty_cache(device)
    return {"table": table}


def _quantized_rows(fmt: str | None, shape: str, dtype: torch.dtype, device: torch.device,
                    prompts: dict[int, list[list[int]]], new: int,
                    baseline: dict[tuple[int, str], list[list[int]]]) -> Iterator[dict[str, Any]]:
    """One weight format's rows, per batch and mode. The unquantized run (`fmt` None) fills `baseline`,
    which the others' token agreement is against (None where it failed)."""
    import fdllm
    from fdllm.quantization import weight_bytes

    backend = "triton" if device.type == "cuda" else "torch"
    model = random_model(shape, device, dtype)
    mask = model.config.vocab_size - 1
    for batch, batch_prompts in prompts.items():
        for mode in ("ar", "diffusion"):
            engine = _engine(model, mask, backend=backend, eager=False, cache=True, batch=batch, threshold=0.9,
                             quantization=fmt)
            params = fdllm.SamplingParams(max_new_tokens=new, ignore_eos=True, mode=mode)
            _warm_up(engine, batch_prompts, params)
            timed = _decode_run(engine, batch_prompts, params)
            out = timed.outputs
            if fmt is None:
                baseline[batch, mode] = out
            base = baseline.get((batch, mode))
            agree = (None if base is None else
                     sum(a == b for x, y in zip(out, base) for a, b in zip(x, y)) / sum(len(x) for x in base))
            yield {"format": fmt or str(dtype).removeprefix("torch."), "batch": batch, "mode": mode,
                   "weight MB": weight_bytes(model) / 1e6, "ms/step": timed.ms_per_step,
                   "tokens/s": timed.tokens_per_s, "token agreement": agree}
            del engine


def hf_model(config, device: torch.device, dtype):
    """A transformers model of the same config (random weights), initialised on the device (a 7B init
    on one CPU thread takes about a minute)."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.to_hf_dict().items()
                                                  if k not in ("architectures", "torch_dtype", "dtype")})
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()


def hf_yardstick(hf, prompts, new: int, shape: str, batch: int, device: torch.device) -> dict[str, Any]:
    """The same prompts through transformers' `generate` (`hf_model`)."""
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"shape": shape, "batch": batch, "mode": "hf generate", "graphs": False, "ms/step": 1000 * seconds / new,
            "tokens/s": tokens / seconds, "tokens/forward": 1.0}


# torch's warning for each synchronizing operation in sync debug mode "warn" (c10's warn_or_error_on_sync).
# Only it is counted: the mode's first use in a process also warns, once, that it "does not yet detect
# all synchronizing operations", which the first H200 runs counted as a second sync in one step
# (attributed to set_sync_debug_mode's own line), failing the AR row and test_one_sync_per_decode_step.
SYNC_WARNING = "called a synchronizing CUDA operation"


def syncs_of_full_decode_steps(engine, running: int, where: collections.Counter | None = None) -> list[int]:
    """Device syncs of each decode step while `running` requests are in flight, counted by torch's
    sync debug mode (its SYNC_WARNING, nothing else it warns); the first 3 steps (prefill) and any step
    that captured a CUDA graph (a new static shape: capturing synchronizes) are left out of the count.
    `where` counts the Python lines that synced (torch warns from the frame that called into it), so a
    failing count says what to fix."""
    results = [r for _ in range(3) for r in engine.step()]
    graphs = engine.runner.graphs
    counts = []
    while engine.num_running == running:
        captured = len(graphs.steps) if graphs is not None else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                results += engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if graphs is None or len(graphs.steps) == captured:
            syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
            counts.append(len(syncs))
            if where is not None:
                where.update(f"{Path(w.filename).relative_to(REPO) if Path(w.filename).is_relative_to(REPO) else w.filename}"
                             f":{w.lineno}: {str(w.message)[:100]}" for w in syncs)
    _tokens(results)  # raises with the engine's error: failed requests end the loop, not a count of 0 steps
    return counts


def syncs_per_step(device: torch.device, smoke: bool) -> dict[str, Any]:
    import fdllm

    if device.type != "cuda":
        return {"checks": [], "note": "needs CUDA (torch.cuda.set_sync_debug_mode); not counted on CPU"}
    model = random_model("smoke" if smoke else "qwen2.5-1.5b", device, torch.bfloat16)
    mask = model.config.vocab_size - 1
    checks, where = [], {}
    penalties = {"repetition_penalty": 1.1, "frequency_penalty": 0.3}  # requests that adjust their logits
    for mode, cache, adjust in (("ar", True, {}), ("diffusion", True, {}), ("diffusion", False, {}),
                                ("diffusion", True, penalties)):
        engine = _engine(model, mask, backend="triton", eager=False, cache=cache, batch=8, threshold=0.5)
        params = fdllm.SamplingParams(max_new_tokens=64, ignore_eos=True, mode=mode, temperature=0.7, seed=1, **adjust)
        for i in range(8):
            engine.add_request([i + 1] * 40, params)
        lines = collections.Counter()
        counts = syncs_of_full_decode_steps(engine, 8, lines)
        worst = max(counts) if counts else None
        what = f"{mode} (sub-block cache {'on' if cache else 'off'}{', penalties' if adjust else ''})"
        checks.append(_check(f"{what}: syncs per decode step, worst of {len(counts)}", worst,
                             worst is not None and worst <= TARGET_SYNCS))
        where[what] = {"syncs in all counted steps": sum(counts), "by line": dict(lines.most_common())}
    return {"checks": checks, "where": where}


def kernels(smoke: bool, peak_gbps: float, out: Path, budget_s: float) -> dict[str, Any]:
    """benchmarks/bench_kernels.py in its own process: whether triton interprets is fixed when it is first
    imported, and anything before (transformers imports triton) may have imported it without the interpreter.
    Its rows are kept whatever its exit code (a failing backend is an error row of its own), and those it
    wrote if it runs out of time (it writes them as it goes)."""
    # AR steps (1 query a sequence) and sub-block steps (8), at batch 1, 8 and 64 (the decode table's ends);
    # the decode GEMMs first (Triton vs cuBLAS at 1 and 8 rows: whether linear_backend="triton" should be the default)
    argv = ["--smoke"] if smoke else ["--linear", "--confidence", "--tune", "--q-len", "1,8", "--batches", "1,8,64",
                                      "--contexts", "256,1024,4096", "--peak-gbps", str(peak_gbps)]
    env = os.environ | ({"TRITON_INTERPRET": "1"} if smoke else {})
    path = out / "kernels.json"
    path.unlink(missing_ok=True)  # a rerun's rows, not an earlier run's
    try:
        code = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", *argv, "--json", str(path)],
                              env=env, cwd=REPO, timeout=inner_timeout(budget_s)).returncode
    except subprocess.TimeoutExpired:
        code = "timed out"
    written = json.loads(path.read_text()) if path.is_file() else {"rows": [], "skipped": {}}
    table = [{k: r[k] for k in ("kernel", "backend", "batch", "context", "q_len", "ms", "gbps", "peak_fraction")}
             | ({"error": r["error"]} if r.get("error") else {}) for r in written["rows"]]
    note = "; ".join(f"{backend} skipped: {why}" for backend, why in written["skipped"].items())
    return {"table": table, "note": note, "checks": [_check("bench_kernels exit code", code, code == 0)]}


def training(device: torch.device, smoke: bool) -> dict[str, Any]:
    from benchmarks import bench_train

    parser = argparse.ArgumentParser()
    bench_train._add_arguments(parser)
    argv = (["--preset", "tiny", "--seq-len", "16", "--batch-size", "1", "--block-size", "8", "--steps", "1",
             "--warmup", "0"] if smoke else
            ["--preset", "qwen2.5-1.5b", "--seq-len", "2048", "--batch-size", "1", "--steps", "5", "--dtype", "bf16"])
    args = parser.parse_args([*argv, "--device", device.type])
    results = {objective: bench_train._measure(objective, args) for objective in bench_train.OBJECTIVES}
    step = {objective: r["step_s"] for objective, r in results.items()}
    table = [{k: r[k] for k in ("objective", "tokens_per_s", "step_s", "peak_mem_mib")} for r in results.values()]
    return {"table": table, "step cost diffusion/AR": step["diffusion"] / step["ar"],
            "step cost diffusion/uncut": step["diffusion"] / step["diffusion-uncut"]}


PROFILE_STEPS = 20  # decode steps under the profiler, per run


def _profiled_steps(engine, prompts: list[list[int]], mode: str, sync: Callable[[], None],
                    activities: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """PROFILE_STEPS decode steps of `prompts` after their prefill, under torch.profiler: the table's row
    (wall and kernel time per step, kernels per step) and the costliest kernels and host ops."""
    import fdllm
    from torch.autograd import DeviceType
    from torch.profiler import profile

    params = fdllm.SamplingParams(max_new_tokens=256, ignore_eos=True, mode=mode)
    _warm_up(engine, prompts, params)
    for prompt in prompts:
        engine.add_request(prompt, params)
    while _prefilling(engine.scheduler):
        engine.step()  # the prompt's prefill, outside the profile
    sync()
    steps = 0
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        while steps < PROFILE_STEPS and engine.has_unfinished():
            engine.step()
            steps += 1
        sync()
        wall = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    kernels = collections.Counter()
    calls = collections.Counter()
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name[:90]] += e.time_range.elapsed_us()
            calls[e.name[:90]] += 1
    host = sorted((a for a in prof.key_averages() if a.self_cpu_time_total > 0),
                  key=lambda a: a.self_cpu_time_total, reverse=True)[:8]
    row = {"steps": steps, "wall ms/step": 1e3 * wall / steps, "kernel ms/step": sum(kernels.values()) / 1e3 / steps,
           "kernels/step": sum(calls.values()) / steps}
    top = {"kernels (us/step, calls/step)": {k: (round(us / steps, 1), calls[k] / steps) for k, us in kernels.most_common(12)},
           "host ops (self us/step)": {a.key[:90]: round(a.self_cpu_time_total / steps, 1) for a in host}}
    return row, top


def step_profile(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Where a decode step's time goes at the 1.5B shape: torch.profiler over PROFILE_STEPS decode steps
    of AR and diffusion with CUDA graphs at batch 1 (the roofline target's row), AR eager at batch 1, AR on
    the Triton decode GEMM, and diffusion at batch 64 (3.7x AR's step cost there on the first H200 run: its
    block-refresh steps feed 64 x 32 query tokens); and AR at batch 1 at the 7B shape, on cuBLAS and on the
    Triton GEMM (the shape nearest its roofline target). Per run: the step's wall time (under the
    profiler), its GPU kernels' summed time and count, and the kernels and host ops that cost most. Kernel time near the wall time says the GPU
    bounds the step (fewer or fused kernels help); far under it, the host does (or gaps between launches).
    A run that fails is an error row; the others still run."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    main = "smoke" if smoke else "qwen2.5-1.5b"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    table, top, built = [], {}, {}
    # (shape, name, mode, eager, batch, EngineConfig.linear_backend)
    runs = ((main, "ar", "ar", False, 1, "torch"), (main, "diffusion cache on", "diffusion", False, 1, "torch"),
            (main, "ar", "ar", True, 1, "torch"), (main, "diffusion cache on", "diffusion", False, 2 if smoke else 64, "torch"),
            (main, "ar, triton linears", "ar", False, 1, "triton"),
            ("qwen2.5-7b", "ar", "ar", False, 1, "torch"), ("qwen2.5-7b", "ar, triton linears", "ar", False, 1, "triton"))
    for shape, name, mode, eager, batch, linears in runs:
        if (eager or linears != "torch" or shape != main) and not cuda:
            continue  # off CUDA every run is eager and unfused already (and the smoke shape is the only one)
        if shape not in built:  # one model at a time
            built.clear()
            model = None
            _empty_cache(device)
            model = random_model(shape, device, torch.float32 if smoke else torch.bfloat16)
            mask = model.config.vocab_size - 1
            gen = torch.Generator().manual_seed(0)
            built[shape] = model, mask, torch.randint(0, mask, (64, 6 if smoke else 128), generator=gen).tolist()
        model, mask, prompts = built[shape]
        label = f"{name}, graphs {'off' if eager or not cuda else 'on'}, batch {batch}" + (f", {shape}" if shape != main else "")
        try:
            engine = _engine(model, mask, backend="triton" if cuda else "torch", eager=eager, cache=True, batch=batch,
                             threshold=1e-9, linears=linears)
            row, top[label] = _profiled_steps(engine, prompts[:batch], mode, sync, activities)
        except Exception as exc:  # noqa: BLE001 - this run's error row: the other runs still profile
            traceback.print_exc()
            row = {"error": f"{type(exc).__name__}: {exc}"}
        table.append({"run": label} | row)
        engine = None
    return {"table": table, "top": top}


def section_functions(device: torch.device, smoke: bool, peak: float, out: Path, budget_s: float,
                      shapes: list[str] = DECODE_SHAPES, batches: list[int] = DECODE_BATCHES,
                      ) -> dict[str, Callable[[Partial], dict[str, Any]]]:
    """Each section, called with where to pass its rows so far (the long ones use it); `budget_s`: the
    seconds its process has; `shapes` and `batches`: the decode table's."""
    functions = {
        "engine exactness": lambda _: exactness(device, smoke),
        "syncs per step": lambda _: syncs_per_step(device, smoke),
        "decode": lambda partial: decode(device, smoke, peak, partial, shapes, batches),
        "pytest -m gpu": lambda _: pytest_gpu(smoke, budget_s, out),
        "step profile": lambda _: step_profile(device, smoke),
        "quantized decode": lambda partial: quantized(device, smoke, partial),
        "kernels": lambda _: kernels(smoke, peak or KERNELS_PEAK_GBPS, out, budget_s),
        "training step": lambda _: training(device, smoke),
    }
    assert list(functions) == list(SECTION_TIMEOUT_S)
    return functions


def toolchain() -> dict[str, str]:
    """Whether compiled Triton can build its launcher here: at a kernel's first launch it compiles a
    small C module with $CC (else gcc or clang) against Python's headers. Recorded in the report, not
    required: without them every compiled-Triton section fails, and this says why at a glance."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or shutil.which("cc")
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {"C compiler (Triton launcher)": cc or "MISSING",
            "Python.h": str(python_h) if python_h.is_file() else f"MISSING ({python_h})"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=output_dir, help="directory for report.md, report.json (and kernels.json)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Triton interpreter (checks the suite runs)")
    p.add_argument("--peak-gbps", type=positive_float, default=None, help="HBM peak (default: from the device name)")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset, in report order (the report in --out keeps the others): "
                        + ", ".join(SECTION_TIMEOUT_S))
    p.add_argument("--deadline-s", type=float, default=None,
                   help=f"end the run by this many seconds from its start (sections get what is left; default "
                        f"{DEFAULT_DEADLINE_S} on a GPU, the 8-minute target; inf: every section runs to its own limit)")
    p.add_argument("--decode-shapes", type=choice_list(SHAPES, "shapes"), default=DECODE_SHAPES,
                   help=f"comma-separated model shapes of the decode table (default {','.join(DECODE_SHAPES)})")
    p.add_argument("--decode-batches", type=positive_int_list, default=DECODE_BATCHES,
                   help=f"comma-separated batch sizes of the decode table (default {','.join(map(str, DECODE_BATCHES))})")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: the process of one section,
    p.add_argument("--section-result", type=Path, help=argparse.SUPPRESS)  # and where it leaves its result,
    p.add_argument("--section-budget-s", type=float, default=None, help=argparse.SUPPRESS)  # in this many seconds
    args = p.parse_args(argv)
    selected = list(SECTION_TIMEOUT_S) if args.sections is None else [s.strip() for s in args.sections.split(",")]
    unknown = [s for s in [*selected, *([args.section] if args.section else [])] if s not in SECTION_TIMEOUT_S]
    if unknown:
        p.error(f"unknown section(s) {unknown}; the sections are: {', '.join(SECTION_TIMEOUT_S)}")
    if args.deadline_s is not None and not args.deadline_s > 0:  # 0, a negative or NaN started no section
        p.error(f"--deadline-s must be > 0 (inf: no deadline), got {args.deadline_s}")
    if not args.smoke and not torch.cuda.is_available():  # its 1.5B/7B shapes would run on the CPU for hours
        p.error("no CUDA device here: the suite's shapes need a GPU; on a CPU run it with --smoke "
                "(tiny shapes, Triton interpreter: checks that the suite runs, timings meaningless)")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    deadline_s = args.deadline_s if args.deadline_s is not None or args.smoke else DEFAULT_DEADLINE_S
    deadline = None if deadline_s is None else deadline_clock() + deadline_s
    out = Path(args.out)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_gbps or peak_gbps(name)
    if args.section:
        budget = args.section_budget_s or SECTION_TIMEOUT_S[args.section]
        run_section(section_functions(device, args.smoke, peak, out, budget, args.decode_shapes,
                                      args.decode_batches)[args.section], args.section_result)
    meta = {"device": name, "peak GB/s": peak or f"not listed for {name} (the kernels table reads {KERNELS_PEAK_GBPS:g}, "
                                                 "an H100's; --peak-gbps sets it)",
            "smoke": args.smoke, "torch": torch.__version__}
    report = Report(out, meta | ({} if args.smoke else toolchain()), keep=args.sections is not None)
    child_argv = ["--out", str(out.resolve()), *(["--peak-gbps", str(peak)] if peak else []), *(["--smoke"] if args.smoke else []),
                  "--decode-shapes", ",".join(args.decode_shapes), "--decode-batches", ",".join(map(str, args.decode_batches))]
    missing = {section: [m for m in SECTION_NEEDS.get(section, ()) if importlib.util.find_spec(m) is None]
               for section in selected}
    if any(missing.values()):
        print(f"[gpu_suite] missing {sorted({m for ms in missing.values() for m in ms})}: the sections that need "
              f"them are skipped ({INSTALL_ALL} installs everything the suite uses)", flush=True)
    for section in sorted(selected, key=list(SECTION_TIMEOUT_S).index):
        left = float("inf") if deadline is None else deadline - deadline_clock()
        if missing[section]:
            report.skip(section, f"needs {', '.join(missing[section])} ({INSTALL_ALL})")
        elif left < MIN_SECTION_S:
            report.skip(section, f"{left:.0f} s of --deadline-s left")
        else:
            report.run(section, child_argv, min(SECTION_TIMEOUT_S[section], left))
    line, status = outcome(report.sections)
    print(f"[gpu_suite] wrote {out}/report.md{line}")
    return status


def outcome(sections: list[dict[str, Any]]) -> tuple[str, int]:
    """The run's last words and exit status: 1 when a section did not end ok or one of its checks failed
    (engine exactness, pytest -m gpu, bench_kernels' exit code, a target): a section that ran to its end
    with a failing check was "ok", and the run exited 0 without naming it."""
    failed = [s["name"] for s in sections if s["status"] != "ok"]
    checks = [f"{s['name']}: {c['what']}" for s in sections for c in s.get("checks", []) if not c["pass"]]
    line = (f"; sections with errors or skipped: {failed}" if failed else "") + (
        f"; failed checks: {checks}" if checks else "")
    return line, 1 if failed or checks else 0


if __name__ == "__main__":
    # a stop from outside (`timeout`, a job scheduler) unwinds like Ctrl-C: the running section is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    raise SystemExit(main())
