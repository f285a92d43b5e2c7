r"""Host overhead of an engine step: step wall time minus the time spent in the model.

The model is the body's forward (`Transformer.hidden`) and the LM head's GEMM on the step's
candidate rows (`ModelRunner.logits`): what a stub model of the same output shapes would replace,
device work on a GPU. Everything else counts as host overhead: scheduling, building and copying
the step's inputs, confidence/sampling on the logits, the one device-to-host transfer and the
per-sequence bookkeeping. On CPU the model's forward is itself slow (eager per-op overhead), which
is why this benchmark subtracts it instead of timing whole steps. (With the Triton backend the LM
head of greedy rows runs inside the fused confidence kernel, whose time then counts as host.)

`--stub-model` replaces the body by a stub of the same output shapes (a fixed random hidden state per
token count, so the step's decisions follow random logits): what is left is host work alone, also
free of the cache pollution a real CPU forward leaves behind (which a GPU's forward does not).

Clock: on CPU, this thread's CPU time (`time.thread_time`, torch at one thread), so time the
process spends descheduled on a shared machine does not count; on CUDA, wall time with syncs.

    python -m benchmarks.bench_host                                   # tiny world model, batch 1 and 64
    python -m benchmarks.bench_host --batch-sizes 1,8,64 --mode ar --threads 1
    python -m benchmarks.bench_host --model DIR --device cuda         # on a GPU: model timed with syncs
    python -m benchmarks.bench_host --stub-model                      # host work only
    python -m benchmarks.bench_host --stub-model --prompt-len 400 --repetition-penalty 1.2 --frequency-penalty 0.5
    python -m benchmarks.bench_host --stub-model --prefill-len 400    # also: steps that prefill a long prompt

`critical ms` is the part of the host's time a GPU waits for: before the step's forward starts (scheduling,
the step's inputs, their copy) and after its results are back (applying them, stop checks, streaming);
the rest (launching the LM head, confidence and sampling) overlaps the forward on a GPU.

`--prefill-len N` adds a "prefill" row per batch size: the steps in which a request of N prompt
tokens is prefilled beside the running batch (host work that grows with the step's tokens: the
packed attention rows, their cache slots and block tables).

Targets (issue 12): at most 0.2 ms per step at batch 1 and 1 ms at batch 64 for the tiny world model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

import fdllm
from benchmarks.cli import checkpoint, device, output_file, positive_int, positive_int_list, usage_errors

DEFAULT_MODEL = "assets/tiny-ar-base"
PREFILLS = 6  # long prompts per repeat of --prefill-len: one measured step each


@dataclass(frozen=True)
class HostRow:
    mode: str
    model: str  # "real", or "stub" (--stub-model)
    batch: int
    steps: int
    step_ms: float  # median wall time of a decode step
    body_ms: float  # median time inside Transformer.hidden
    head_ms: float  # median time inside the LM head's GEMM (ModelRunner.logits)
    host_ms: float  # median of (step - body - head), per step
    host_mean_ms: float  # its mean: what throughput pays, garbage-collector pauses included
    # median host time before the step's forward starts and after its results are back: what a GPU waits
    # for (the rest of the host's work, launching the head and the sampling, overlaps the forward there)
    critical_ms: float


def clock(device: torch.device):
    """(now, sync): wall time with CUDA syncs on a GPU, this thread's CPU time elsewhere."""
    if device.type == "cuda":
        return time.perf_counter, torch.cuda.synchronize
    return time.thread_time, (lambda: None)


class CallTimer:
    """Wraps `obj.name` (on the instance) and records each call's (start, end) (see `clock`)."""

    def __init__(self, obj, name: str, device: torch.device) -> None:
        self.obj, self.name, self.device, self.spans = obj, name, device, []

    @property
    def times(self) -> list[float]:
        return [end - start for start, end in self.spans]

    def __enter__(self) -> CallTimer:
        now, sync = clock(self.device)
        inner = getattr(self.obj, self.name)

        def timed(*args, **kwargs):
            sync()
            start = now()
            out = inner(*args, **kwargs)
            sync()
            self.spans.append((start, now()))
            return out

        setattr(self.obj, self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        delattr(self.obj, self.name)  # back to the class method


class StubBody:
    """`Transformer.hidden` stand-in: a fixed random hidden state [1, T, D] per token count T."""

    def __init__(self, model: fdllm.Transformer) -> None:
        self.model, self.outputs = model, {}

    def __call__(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        T = input_ids.shape[1]
        if T not in self.outputs:
            self.outputs[T] = torch.randn(1, T, self.model.config.hidden_size, dtype=self.model.dtype,
                                          device=self.model.device)
        return self.outputs[T]


@dataclass(frozen=True)
class StepTime:
    """One engine step's figures (seconds)."""

    wall: float
    forwards: int  # how many forwards it ran
    body: float  # in Transformer.hidden
    head: float  # in the LM head's GEMM
    critical: float  # host time before the first forward starts and after the last one's results are back


@contextlib.contextmanager
def timed_steps(engine: fdllm.Engine, prompts: list[list[int]], params: fdllm.SamplingParams,
                stub: bool) -> Iterator[Callable[[], StepTime]]:
    """Admit `prompts` and run their prefill step (not a decode step), then give a function that runs
    one engine step and returns its `StepTime`."""
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # prefill (+ the first block step)
    if stub:
        engine.model.hidden = StubBody(engine.model)  # on the instance; CallTimer wraps it, then removes both
    device = engine.model.device
    now, sync = clock(device)
    with (CallTimer(engine.model, "hidden", device) as forward, CallTimer(engine.runner, "logits", device) as lm_head,
          CallTimer(engine.runner, "forward", device) as results):
        def step() -> StepTime:
            n, m, r = len(forward.spans), len(lm_head.spans), len(results.spans)
            sync()
            start = now()
            engine.step()
            sync()
            end = now()
            bodies, heads, done = forward.spans[n:], lm_head.spans[m:], results.spans[r:]
            critical = (bodies[0][0] - start) + (end - done[-1][1]) if bodies and done else end - start
            return StepTime(end - start, len(bodies), sum(e - s for s, e in bodies), sum(e - s for s, e in heads), critical)

        yield step


def measure(engine: fdllm.Engine, prompts: list[list[int]], params: fdllm.SamplingParams, mode: str,
            stub: bool = False) -> HostRow:
    """Run the prompts to completion; per-step figures over decode steps (every request running, no prefill)."""
    steps = []
    with timed_steps(engine, prompts, params, stub) as step:
        while engine.has_unfinished():
            running = engine.num_running
            timed = step()
            if running == len(prompts) and timed.forwards == 1:  # a full-batch step with one forward
                steps.append(timed)
    if not steps:
        raise ValueError(f"no full-batch decode step was measured: every request ended within --max-new-tokens "
                         f"{params.max_new_tokens} before one; raise --max-new-tokens")
    return _row(mode, stub, len(prompts), steps)


def measure_prefill(engine: fdllm.Engine, prompts: list[list[int]], long_prompts: list[list[int]],
                    params: fdllm.SamplingParams, stub: bool = False) -> HostRow:
    """Per long prompt, the step that prefills it whole beside the running `prompts` (as `measure`)."""
    steps = []
    with timed_steps(engine, prompts, params, stub) as step:
        for p in long_prompts:
            engine.add_request(p, params)
            steps.append(step())
    return _row("prefill", stub, len(prompts), steps)


def _row(mode: str, stub: bool, batch: int, steps: list[StepTime]) -> HostRow:
    """Medians of the per-step figures (host: step - body - head), in ms."""
    host = [t.wall - t.body - t.head for t in steps]
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    return HostRow(mode, "stub" if stub else "real", batch, len(steps), ms([t.wall for t in steps]),
                   ms([t.body for t in steps]), ms([t.head for t in steps]), ms(host), 1000 * statistics.fmean(host),
                   ms([t.critical for t in steps]))


def run(args: argparse.Namespace) -> list[HostRow]:
    torch.set_num_threads(args.threads)
    engine_kwargs = {}
    if args.eager:
        engine_kwargs["enforce_eager"] = True
    if args.no_freeze_gc:
        engine_kwargs["freeze_gc"] = False
    rows = []
    model = fdllm.load_model(args.model, device=args.device)
    tokenizer_engine = fdllm.Engine.from_pretrained(args.model, device=args.device,  # mask token + config
                                                    engine_config=fdllm.EngineConfig(**engine_kwargs))
    cfg = tokenizer_engine.config
    gen = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        low = (cfg.mask_token_id or 0) + 1  # ordinary tokens only (the tiny world's specials come first)
        prompts = torch.randint(low, model.config.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
        ecfg = fdllm.EngineConfig(max_num_seqs=batch, max_prefill_tokens=max(batch * args.prompt_len, 64),
                                  **engine_kwargs)
        # every long prompt prefilled whole, in the step after it arrives, while the earlier ones decode on
        prefill_ecfg = dataclasses.replace(ecfg, max_num_seqs=batch + PREFILLS,
                                           max_prefill_tokens=max(ecfg.max_prefill_tokens, args.prefill_len or 0))
        params = fdllm.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, mode=args.mode,
                                      threshold=args.threshold, temperature=args.temperature, seed=0,
                                      repetition_penalty=args.repetition_penalty,
                                      frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
        long_prompts = (torch.randint(low, model.config.vocab_size, (PREFILLS, args.prefill_len), generator=gen).tolist()
                        if args.prefill_len else [])
        for _ in range(args.repeats):
            rows.append(measure(fdllm.Engine(model, None, cfg, ecfg), prompts, params, args.mode, args.stub_model))
            if long_prompts:
                engine = fdllm.Engine(model, None, cfg, prefill_ecfg)
                rows.append(measure_prefill(engine, prompts, long_prompts, params, args.stub_model))
    return rows


def best(rows: list[HostRow]) -> list[HostRow]:
    """Per (mode, batch): the repeat with the least host time (a shared machine adds noise, never
    speed), with the mean host time over every repeat's steps (a collector pause every few dozen
    steps may fall in one repeat only)."""
    groups: dict[tuple[str, int], list[HostRow]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.batch), []).append(r)
    return [
        dataclasses.replace(min(group, key=lambda r: r.host_ms),
                            host_mean_ms=sum(r.host_mean_ms * r.steps for r in group) / sum(r.steps for r in group))
        for group in groups.values()
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=checkpoint, default=DEFAULT_MODEL)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 64], help="comma-separated, e.g. 1,8,64")
    p.add_argument("--mode", default="diffusion", choices=["diffusion", "ar"])
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompt-len", type=positive_int, default=20)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--prefill-len", type=positive_int,
                   help="also measure steps that prefill a prompt of this many tokens beside the batch")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="with the penalties below: requests that adjust their logits (the runner's biased rows)")
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1: steadier timings)")
    p.add_argument("--eager", action="store_true", help="EngineConfig(enforce_eager=True)")
    p.add_argument("--no-freeze-gc", action="store_true",
                   help="EngineConfig(freeze_gc=False): the collector keeps scanning the start-up heap (see host mean)")
    p.add_argument("--stub-model", action="store_true", help="a stub body of the same output shapes: host work only")
    p.add_argument("--json", type=output_file, help="also write the rows here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with usage_errors("bench_host"):
        rows = best(run(args))
    print(f"{'mode':<10}{'model':>6}{'batch':>6}{'steps':>7}{'step ms':>10}{'body ms':>10}{'lm head ms':>12}"
          f"{'host ms':>10}{'host mean':>11}{'critical ms':>13}")
    for r in rows:
        print(f"{r.mode:<10}{r.model:>6}{r.batch:>6}{r.steps:>7}{r.step_ms:>10.3f}{r.body_ms:>10.3f}{r.head_ms:>12.3f}"
              f"{r.host_ms:>10.3f}{r.host_mean_ms:>11.3f}{r.critical_ms:>13.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
