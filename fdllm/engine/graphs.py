"""CUDA graphs of static decode steps: one graph per `StaticShape` (batch bucket, query tokens per
entry, table width, and whether its entries carry causal flags).

A decode step's body (embedding -> layers -> final norm) launches a few hundred kernels; on a GPU
their launch cost, not the weight read, bounds a small batch. A graph replays them with one launch.
What a graph needs and this module provides:
- static input buffers: each graph owns one int64 device buffer whose slices are the step's token
  ids, positions, cache slots, block tables, kv lengths, query lengths (and causal flags), in the layout the
  runner stages them in; a replay first copies the staged region (already on the device: the
  step's one host-to-device transfer) into it with one device-to-device copy, on the stream;
- a static output: the hidden states the capture produced, read (sliced) by the LM head after replay;
- capture safety: the capture runs with every slot pointing at the cache's scratch page and every
  kv length 0, so neither the warm-up nor the capture touches a real sequence's K/V; kernels that
  pick their launch configuration from shapes only (no `.item()`, no data-dependent splits: see
  `fdllm.kernels.paged_attention`) so the captured launch serves every later step of that shape.
Graphs share one memory pool and are captured lazily, the first time a shape is used (a few tens
of ms each); prefill steps never use them. Memory: the engine captures its largest shape first
(`GraphPool.capture`, at start-up), so later, smaller captures reuse the pool's blocks instead of
growing it, and every graph writes its hidden states into one shared output buffer (a step reads
them before the next replays), so hundreds of captured shapes do not each keep an output alive.

Only runs on CUDA: `ModelRunner(use_cuda_graphs=True)` (the default on CUDA unless
`EngineConfig(enforce_eager=True)`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fdllm.cache import KVCache

if TYPE_CHECKING:
    from fdllm.engine.runner import StaticShape
    from fdllm.model import Transformer

log = logging.getLogger(__name__)


class CapturedStep:
    """One captured body: its input buffer (sliced like StaticInputs) and its output hidden states."""

    def __init__(self, model: Transformer, cache: KVCache, attention_fn, shape: StaticShape,
                 pool, stream: torch.cuda.Stream, out_ND: Tensor, fused: bool = False) -> None:
        """`out_ND`: the shared output buffer, at least Bb * Q rows; `fused`: as `GraphPool`'s."""
        from fdllm.engine.runner import StaticInputs, forward_static

        device = cache.k_LPSKH.device
        self.buf = torch.zeros(StaticInputs.numel(shape), dtype=torch.int64, device=device)
        self.inputs = StaticInputs.view(self.buf, shape)
        self.inputs.slots_T.fill_(cache.scratch_slot)  # capture writes only to scratch; kv_lens 0: reads nothing
        self.inputs.tables_BM.fill_(-1)
        run = lambda: forward_static(model, cache, attention_fn, self.inputs, fused)  # noqa: E731
        # warm-up outside the capture (Triton's compiles, cuBLAS's first calls at these shapes), as vLLM
        # does it: on the current stream, as an eager step of this shape, whose blocks eager steps reuse
        # and the KV sizing counts. On the capture stream the caching allocator would keep them for that
        # stream alone, beside the eager steps' and the graph pool's: 0.56 GiB past the budget in the sizing
        # test on the H200.
        for _ in range(2):
            run()
        stream.wait_stream(torch.cuda.current_stream(device))
        self.graph = torch.cuda.CUDAGraph()
        self.out_TD = out_ND[: shape.batch * shape.q_len]
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.out_TD.copy_(run())  # the body's own output is freed back to the pool

    def replay(self, staged: Tensor) -> Tensor:
        """`staged`: the step's body inputs, already on the device in this buffer's layout."""
        self.buf.copy_(staged, non_blocking=True)  # device to device, ordered on the stream before the replay
        self.graph.replay()
        return self.out_TD


class GraphPool:
    """Captured steps by shape, sharing one CUDA graph memory pool and one output buffer."""

    def __init__(self, model: Transformer, cache: KVCache, attention_fn, fused: bool = False) -> None:
        """`fused`: the bodies use fdllm.kernels.fused_ops (`Transformer.hidden`'s flag)."""
        self.model, self.cache, self.attention_fn, self.fused = model, cache, attention_fn, fused
        self.steps: dict[StaticShape, CapturedStep] = {}
        self.capture_seconds = 0.0  # spent capturing so far (benchmarks leave it out of step times)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=cache.k_LPSKH.device)
        self.out_ND = torch.empty(0, model.config.hidden_size, dtype=model.dtype, device=cache.k_LPSKH.device)

    @torch.inference_mode()
    def capture(self, shape: StaticShape) -> CapturedStep:
        """The captured step of `shape` (captured now if it is new). Under inference mode whoever calls:
        the engine's start-up capture (`ModelRunner.capture_largest`) ran with autograd on, and its warm-up
        and captured forwards kept every layer's activations alive through the KV cache's history (about
        12 GiB at the 1.5B shape with 64 sequences), memory the KV sizing had given to pages."""
        step = self.steps.get(shape)
        if step is not None:
            return step
        log.info("capturing a CUDA graph for decode steps of batch %d x %d tokens (table width %d%s)",
                 shape.batch, shape.q_len, shape.pages, ", causal flags" if shape.causal else "")
        device = self.cache.k_LPSKH.device
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        if len(self.out_ND) < shape.batch * shape.q_len:  # larger than the start-up capture: a bigger buffer
            self.out_ND = self.out_ND.new_empty(shape.batch * shape.q_len, self.out_ND.shape[1])
        step = CapturedStep(self.model, self.cache, self.attention_fn, shape, self.pool, self.stream, self.out_ND,
                            self.fused)
        torch.cuda.synchronize(device)
        self.capture_seconds += time.perf_counter() - start
        self.steps[shape] = step
        return step

    def run(self, shape: StaticShape, staged: Tensor) -> Tensor:
        """Hidden states [Bb * Q, D] of the step: replays (capturing first if this shape is new)."""
        return self.capture(shape).replay(staged)
