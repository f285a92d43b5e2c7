r"""Every GPU figure of the project in one command (random weights, no network), on one H100/H200.

    python -m benchmarks.gpu_suite --out runs/gpu-suite            # the real suite (target: <= 8 minutes)
    python -m benchmarks.gpu_suite --out /tmp/suite --smoke        # CPU: tiny shapes, Triton interpreter

Sections (each appends to report.json and report.md as soon as it ends, so a stopped run keeps
what it measured; a failing section is recorded and the next one runs):
1. `pytest -m gpu` (compiled Triton kernels vs their references);
2. engine exactness on the device: Triton backend with CUDA graphs == torch backend eager ==
   the no-cache block-causal reference (tests/unit/test_engine.py), greedy; and with a causal-prefix
   model (causal rows in captured graphs: commits with and without the block lookahead, speculative
   verifies), graphs == eager and speculative == AR;
3. decode at Qwen2.5-1.5B and 7B shapes (bf16), batch 1/8/32/64: AR vs diffusion (sub-block cache
   on/off), graphs on/off: ms per step, per-step cost vs AR, tokens/s, and the projected end-to-end
   speed-up at 2.4 and 4 tokens per forward (= tokens per forward x AR step / diffusion step);
   diffusion with the block lookahead (a block's first step in the forward that opens it: fewer
   forwards, a longer commit step); speculative decoding with and without its lookahead (random
   weights reject most drafts, so these rows time the steps, and "lookahead step cost" says what
   the lookahead's extra query rows cost per step at each batch: the figure
   `EngineConfig.speculative_lookahead_max_batch` is chosen by);
   plus the same workload through a plain HF-transformers `generate` loop (the yardstick), AR
   batch-1 step time against the weight-read roofline (weight bytes / peak bandwidth), and each
   run's peak allocated memory (weights, KV pages, the largest step's activations and head chunk);
4. quantized decode (fdllm.quantization: int8, int4, fp8 where the device runs it) at the 1.5B
   shape, batch 1 and 32, AR and diffusion: weight bytes, ms per step, tokens/s, token agreement
   with the unquantized model;
5. syncs per decode step, counted with `torch.cuda.set_sync_debug_mode("warn")`;
6. kernel latency and achieved HBM bandwidth vs peak (benchmarks/bench_kernels.py);
7. training step cost of the two-stream objective vs AR at the 1.5B shape, and with vs without the
   compaction of the noisy blocks that carry no target (benchmarks/bench_train.py).
Targets checked: a diffusion step at batch 1 <= 1.3x an AR step; AR batch-1 decode within 1.5x of
the weight-read roofline; one sync per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "smoke": (32, 64, 1, 4, 2, 96, True),
}
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}
TARGET_STEP_RATIO, TARGET_ROOFLINE, TARGET_SYNCS = 1.3, 1.5, 1


class Report:
    """Sections in order; rewritten to OUT/report.json and OUT/report.md after each one."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.meta, self.sections = out, meta, []
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"[gpu_suite] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result, status = fn(), "ok"
        except Exception as exc:  # one broken section must not hide the others
            result, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, "error"
        seconds = time.perf_counter() - start
        self.sections.append({"name": name, "status": status, "seconds": round(seconds, 1), **result})
        print(f"[gpu_suite] {name}: {status} in {seconds:.1f} s", flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "report.json").write_text(json.dumps({"meta": self.meta, "sections": self.sections}, indent=2))
        lines = ["# fdllm GPU suite\n", *(f"- {k}: {v}" for k, v in self.meta.items()), ""]
        for s in self.sections:
            lines.append(f"## {s['name']} ({s['status']}, {s['seconds']} s)\n")
            if "error" in s:
                lines.append(f"```\n{s['error']}\n```\n")
            for check in s.get("checks", []):
                lines.append(f"- {'PASS' if check['pass'] else 'FAIL'}: {check['what']} ({check['value']})")
            if s.get("table"):
                cols = list(dict.fromkeys(k for row in s["table"] for k in row))  # every row's columns, in order
                lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in s["table"]]
            lines.append("")
        (self.out / "report.md").write_text("\n".join(lines))


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else "" if v is None else str(v)


def _check(what: str, value: Any, ok: bool) -> dict[str, Any]:
    return {"what": what, "value": value, "pass": bool(ok)}


# -- sections -----------------------------------------------------------------------------------------
def pytest_gpu(smoke: bool) -> dict[str, Any]:
    target = ["tests/kernels/test_paged_attention.py"] if smoke else ["tests"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *target],
                          capture_output=True, text=True, timeout=300)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    ok = proc.returncode in (0, 5) if smoke else proc.returncode == 0  # smoke: no CUDA, all skip
    return {"checks": [_check("pytest -m gpu", tail[0], ok)], "returncode": proc.returncode}


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
            prefix: str = "block_causal"):
    import fdllm

    cfg = fdllm.BlockDiffusionConfig(block_size=block, sub_block_size=sub, threshold=threshold,
                                     use_sub_block_cache=cache, mask_token_id=mask_id, prefix_attention=prefix)
    ecfg = fdllm.EngineConfig(max_num_seqs=max(batch, 1), max_model_len=1024, num_pages=batch * 16 + 8,
                              attention_backend=backend, enforce_eager=eager, max_prefill_tokens=4096,
                              quantization=quantization, speculative_lookahead=lookahead)
    return fdllm.Engine(model, None, cfg, ecfg)


def exactness(device: torch.device, smoke: bool) -> dict[str, Any]:
    import fdllm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.unit.test_engine import reference_generate

    model = random_model("smoke", device, torch.float32)
    mask = model.config.vocab_size - 1
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, mask, (n,), generator=gen).tolist() for n in (3, 8, 13)]
    p = fdllm.SamplingParams(max_new_tokens=12, ignore_eos=True)
    backend = "triton" if device.type == "cuda" else "torch"
    fast = _engine(model, mask, backend=backend, eager=False, cache=False, batch=4, threshold=0.05, block=8, sub=4)
    slow = _engine(model, mask, backend="torch", eager=True, cache=False, batch=4, threshold=0.05, block=8, sub=4)
    got = [r.token_ids for r in fast.generate(prompts, p)]
    eager = [r.token_ids for r in slow.generate(prompts, p)]
    ref = [reference_generate(model, pr, 12, 8, 4, 0.05) for pr in prompts]
    # Causal rows in static steps (per-entry flags, captured graphs): a causal-prefix model's commits,
    # with and without the block lookahead, and speculative verifies, whose output is the AR output.
    mixed = [fdllm.SamplingParams(max_new_tokens=12, ignore_eos=True, **kw)
             for kw in ({"mode": "speculative"}, {"block_lookahead": True}, {})]
    fast_c, slow_c = (_engine(model, mask, backend=b, eager=e, cache=True, batch=4, threshold=0.05, block=8, sub=4,
                              prefix="causal") for b, e in ((backend, False), ("torch", True)))
    got_c = [r.token_ids for r in fast_c.generate(prompts, mixed)]
    eager_c = [r.token_ids for r in slow_c.generate(prompts, mixed)]
    ar = slow_c.generate(prompts[:1], fdllm.SamplingParams(max_new_tokens=12, ignore_eos=True, mode="ar"))[0].token_ids
    return {"checks": [
        _check(f"{backend} backend, graphs {'on' if fast.runner.graphs else 'off'} == torch eager", got == eager,
               got == eager),
        _check("== no-cache block-causal reference", got == ref, got == ref),
        _check("causal prefix (speculative, block lookahead, plain): graphs == torch eager", got_c == eager_c,
               got_c == eager_c),
        _check("speculative == AR", got_c[0] == ar, got_c[0] == ar),
    ]}


def _decode_run(engine, prompts, params) -> tuple[float, int, int, list[list[int]]]:
    """(seconds, generated tokens, decode steps, each prompt's tokens) of one batch run to completion.
    Seconds leave out CUDA graph captures (lazy: the first step of each new static shape captures)."""
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    graphs = engine.runner.graphs
    captured = graphs.capture_seconds if graphs is not None else 0.0
    ids = [engine.add_request(pr, params) for pr in prompts]
    sync()
    start, steps, outputs = time.perf_counter(), 0, {}
    while engine.has_unfinished():
        outputs |= {r.request_id: r.token_ids for r in engine.step()}
        steps += 1
    sync()
    seconds = time.perf_counter() - start - ((graphs.capture_seconds - captured) if graphs is not None else 0.0)
    return seconds, sum(map(len, outputs.values())), steps, [outputs[i] for i in ids]


@dataclass(frozen=True)
class DecodeRun:
    """One row kind of the decode section: a mode and how the engine runs it."""

    name: str
    mode: str
    cache: bool = True  # the sub-block cache
    eager: bool = False  # True: CUDA graphs off (CUDA only: elsewhere every run is eager already)
    spec_lookahead: bool = True  # EngineConfig.speculative_lookahead
    block_lookahead: bool = False  # SamplingParams.block_lookahead

    @property
    def length_share(self) -> int:
        """Divisor of the tokens it decodes: random weights reject most speculative drafts (two forwards
        a token), so half the tokens time its steps alike and keep the suite inside its minutes."""
        return 2 if self.mode == "speculative" else 1


DECODE_RUNS = (
    DecodeRun("ar", "ar"), DecodeRun("ar", "ar", eager=True),
    DecodeRun("diffusion cache off", "diffusion", cache=False),
    DecodeRun("diffusion cache on", "diffusion"), DecodeRun("diffusion cache on", "diffusion", eager=True),
    # threshold ~0 commits the lookahead's whole first sub-block: one forward fewer per block, at the
    # price of the commit step's extra block of query rows (what "step/AR step" shows)
    DecodeRun("diffusion cache on, block lookahead", "diffusion", block_lookahead=True),
    # without its lookahead first: the run after it reads that step time ("lookahead step cost")
    DecodeRun("speculative, no lookahead", "speculative", spec_lookahead=False),
    DecodeRun("speculative", "speculative"),
)


def decode(device: torch.device, smoke: bool, peak_gbps: float) -> dict[str, Any]:
    import fdllm
    from fdllm.quantization import weight_bytes

    shapes = ["smoke"] if smoke else ["qwen2.5-1.5b", "qwen2.5-7b"]
    batches = [2] if smoke else [1, 8, 32, 64]
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt_len, new = (6, 58) if smoke else (128, 128)  # smoke: past two block commits
    backend = "triton" if device.type == "cuda" else "torch"
    table = []
    for shape in shapes:
        model = random_model(shape, device, dtype)
        mask = model.config.vocab_size - 1
        weights = weight_bytes(model)
        gen = torch.Generator().manual_seed(0)
        for batch in batches:
            prompts = torch.randint(0, mask, (batch, prompt_len), generator=gen).tolist()
            ar_step = spec_step = None
            for run in DECODE_RUNS:
                if run.eager and device.type != "cuda":
                    continue
                engine = _engine(model, mask, backend=backend, eager=run.eager, cache=run.cache, batch=batch,
                                 threshold=1e-9, lookahead=run.spec_lookahead)
                params = fdllm.SamplingParams(max_new_tokens=new // run.length_share, ignore_eos=True, mode=run.mode,
                                              block_lookahead=run.block_lookahead)
                _decode_run(engine, prompts[:1], params)  # warm-up: graph capture, autotune
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, tokens, steps, _ = _decode_run(engine, prompts, params)
                step_ms = 1000 * seconds / steps
                graphs = engine.runner.graphs is not None
                row = {"shape": shape, "batch": batch, "mode": run.name, "graphs": graphs, "ms/step": step_ms,
                       "tokens/s": tokens / seconds, "tokens/forward": tokens / steps / batch}
                if device.type == "cuda":  # weights + KV pages + the steps' activations and head chunks
                    row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
                if run.mode == "ar" and (graphs or device.type != "cuda"):
                    ar_step = step_ms
                if run.mode != "ar" and ar_step:
                    ratio = step_ms / ar_step
                    row |= {"step/AR step": ratio, "speed-up @2.4": 2.4 / ratio, "speed-up @4": 4 / ratio}
                if run.mode == "speculative":  # random weights reject most drafts: per step, what the lookahead costs
                    if run.spec_lookahead and spec_step:
                        row["lookahead step cost"] = step_ms / spec_step
                    spec_step = step_ms
                if run.mode == "ar" and batch == 1 and graphs and peak_gbps:
                    row |= {"roofline ms": 1000 * weights / (peak_gbps * 1e9)}
                table.append(row)
                print(f"  {row}", flush=True)
            table.append(hf_yardstick(model, prompts, new, shape, batch, device, dtype))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"table": table, "checks": decode_checks(table)}


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


def quantized(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Decode with each weight format the device runs: weight bytes, step time, tokens/s, and greedy
    agreement with the unquantized model's tokens on the same prompts (random weights: a sanity
    check of the kernels, not an accuracy figure; accuracy is pipelines/evaluate.py --quantization)."""
    import fdllm
    from fdllm.quantization import QUANTIZATIONS, check_quantization, weight_bytes

    shape, batches = ("smoke", [2]) if smoke else ("qwen2.5-1.5b", [1, 32])
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt_len, new = (6, 8) if smoke else (128, 128)
    backend = "triton" if device.type == "cuda" else "torch"
    table, baseline = [], {}
    for fmt in (None, *QUANTIZATIONS):
        try:
            check_quantization(fmt, device, dtype)
        except ValueError as exc:
            table.append({"format": fmt, "skipped": str(exc)})
            continue
        model = random_model(shape, device, dtype)
        mask = model.config.vocab_size - 1
        gen = torch.Generator().manual_seed(0)
        for batch in batches:
            prompts = torch.randint(0, mask, (batch, prompt_len), generator=gen).tolist()
            for mode in ("ar", "diffusion"):
                engine = _engine(model, mask, backend=backend, eager=False, cache=True, batch=batch, threshold=0.9,
                                 quantization=fmt)
                params = fdllm.SamplingParams(max_new_tokens=new, ignore_eos=True, mode=mode)
                _decode_run(engine, prompts[:1], params)  # warm-up: graph capture, autotune
                seconds, tokens, steps, out = _decode_run(engine, prompts, params)
                base = baseline.setdefault((batch, mode), out)
                agree = sum(a == b for x, y in zip(out, base) for a, b in zip(x, y)) / sum(len(x) for x in base)
                row = {"format": fmt or str(dtype).removeprefix("torch."), "batch": batch, "mode": mode,
                       "weight MB": weight_bytes(model) / 1e6, "ms/step": 1000 * seconds / steps,
                       "tokens/s": tokens / seconds, "token agreement": agree}
                table.append(row)
                print(f"  {row}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"table": table}


def hf_yardstick(model, prompts, new: int, shape: str, batch: int, device: torch.device, dtype) -> dict[str, Any]:
    """The same prompts through transformers' `generate` on a model of the same config (random weights)."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in model.config.to_hf_dict().items()
                                                  if k not in ("architectures", "torch_dtype", "dtype")})
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        hf.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del hf
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"shape": shape, "batch": batch, "mode": "hf generate", "graphs": False, "ms/step": 1000 * seconds / new,
            "tokens/s": tokens / seconds, "tokens/forward": 1.0}


def syncs_of_full_decode_steps(engine, running: int) -> list[int]:
    """Device syncs of each decode step while `running` requests are in flight, counted by torch's
    sync debug mode; the first 3 steps (prefill) and any step that captured a CUDA graph (a new
    static shape: capturing synchronizes) are left out of the count."""
    for _ in range(3):
        engine.step()
    graphs = engine.runner.graphs
    counts = []
    while engine.num_running == running:
        captured = len(graphs.steps) if graphs is not None else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if graphs is None or len(graphs.steps) == captured:
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts


def syncs_per_step(device: torch.device, smoke: bool) -> dict[str, Any]:
    import fdllm

    if device.type != "cuda":
        return {"checks": [], "note": "needs CUDA (torch.cuda.set_sync_debug_mode); not counted on CPU"}
    model = random_model("smoke" if smoke else "qwen2.5-1.5b", device, torch.bfloat16)
    mask = model.config.vocab_size - 1
    checks = []
    for mode, cache in (("ar", True), ("diffusion", True), ("diffusion", False)):
        engine = _engine(model, mask, backend="triton", eager=False, cache=cache, batch=8, threshold=0.5)
        params = fdllm.SamplingParams(max_new_tokens=64, ignore_eos=True, mode=mode, temperature=0.7, seed=1)
        for i in range(8):
            engine.add_request([i + 1] * 40, params)
        counts = syncs_of_full_decode_steps(engine, 8)
        worst = max(counts) if counts else None
        checks.append(_check(f"{mode} (sub-block cache {'on' if cache else 'off'}): syncs per decode step, worst of "
                             f"{len(counts)}", worst, worst is not None and worst <= TARGET_SYNCS))
    return {"checks": checks}


def kernels(smoke: bool, peak_gbps: float, out: Path) -> dict[str, Any]:
    """benchmarks/bench_kernels.py in its own process: whether triton interprets is fixed when it is first
    imported, and anything before (transformers imports triton) may have imported it without the interpreter."""
    argv = ["--smoke"] if smoke else ["--confidence", "--q-len", "8", "--peak-gbps", str(peak_gbps)]
    env = os.environ | ({"TRITON_INTERPRET": "1"} if smoke else {})
    code = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", *argv, "--json", str(out / "kernels.json")],
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=300).returncode
    rows = json.loads((out / "kernels.json").read_text())["rows"] if code == 0 else []
    table = [{k: r[k] for k in ("kernel", "backend", "batch", "context", "q_len", "ms", "gbps", "peak_fraction")}
             for r in rows]
    return {"table": table, "checks": [_check("bench_kernels exit code", code, code == 0)]}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for report.md, report.json (and kernels.json)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Triton interpreter (checks the suite runs)")
    p.add_argument("--peak-gbps", type=float, default=None, help="HBM peak (default: from the device name)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), 0.0)
    report = Report(Path(args.out), {"device": name, "peak GB/s": peak, "smoke": args.smoke, "torch": torch.__version__})
    report.run("pytest -m gpu", lambda: pytest_gpu(args.smoke))
    report.run("engine exactness", lambda: exactness(device, args.smoke))
    report.run("decode", lambda: decode(device, args.smoke, peak))
    report.run("quantized decode", lambda: quantized(device, args.smoke))
    report.run("syncs per step", lambda: syncs_per_step(device, args.smoke))
    report.run("kernels", lambda: kernels(args.smoke, peak or 3350.0, Path(args.out)))
    report.run("training step", lambda: training(device, args.smoke))
    failed = [s["name"] for s in report.sections if s["status"] == "error"]
    print(f"[gpu_suite] wrote {args.out}/report.md" + (f"; sections with errors: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
