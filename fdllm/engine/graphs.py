"""CUDA graphs of static decode steps: one graph per (batch bucket, query tokens per work, table width).

A decode step's body (embedding -> layers -> final norm) launches a few hundred kernels; on a GPU
their launch cost, not the weight read, bounds a small batch. A graph replays them with one launch.
What a graph needs and this module provides:
- static input buffers: each graph owns one int64 device buffer whose slices are the step's token
  ids, positions, cache slots, block tables, kv lengths and query lengths; a replay first copies
  the step's staged inputs (already on the device, one transfer per step) into it, on the stream;
- a static output: the hidden states the capture produced, read (sliced) by the LM head after replay;
- capture safety: the capture runs with every slot pointing at the cache's scratch page and every
  kv length 0, so neither the warm-up nor the capture touches a real sequence's K/V; kernels that
  pick their launch configuration from shapes only (no `.item()`, no data-dependent splits: see
  `fdllm.kernels.paged_attention`) so the captured launch serves every later step of that shape.
Graphs share one memory pool and are captured lazily, the first time a shape is used (a few tens
of ms each); prefill steps never use them.

Only runs on CUDA: `ModelRunner(use_cuda_graphs=True)` (the default on CUDA unless
`EngineConfig(enforce_eager=True)`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fdllm.cache import KVCache

if TYPE_CHECKING:
    from fdllm.engine.runner import StaticInputs, StaticShape
    from fdllm.model import Transformer

log = logging.getLogger(__name__)


class CapturedStep:
    """One captured body: its input buffer (sliced like StaticInputs) and its output hidden states."""

    def __init__(self, model: Transformer, cache: KVCache, attention_fn, shape: StaticShape,
                 pool, stream: torch.cuda.Stream) -> None:
        from fdllm.engine.runner import StaticInputs, forward_static

        Bb, Q, M = shape.batch, shape.q_len, shape.pages
        T = Bb * Q
        device = cache.k_LPSKH.device
        self.buf = torch.zeros(3 * T + Bb * M + 2 * Bb, dtype=torch.int64, device=device)
        self.buf[2 * T : 3 * T] = cache.scratch_slot  # capture writes only to scratch
        self.buf[3 * T : 3 * T + Bb * M] = -1
        o = [0, T, 2 * T, 3 * T, 3 * T + Bb * M, 3 * T + Bb * M + Bb, 3 * T + Bb * M + 2 * Bb]
        self.inputs = StaticInputs(
            ids_1T=self.buf[o[0] : o[1]][None], positions_1T=self.buf[o[1] : o[2]][None], slots_T=self.buf[o[2] : o[3]],
            tables_BM=self.buf[o[3] : o[4]].view(Bb, M), kv_lens_B=self.buf[o[4] : o[5]], q_lens_B=self.buf[o[5] : o[6]],
        )
        run = lambda: forward_static(model, cache, attention_fn, self.inputs)  # noqa: E731
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: triton autotune/compile and allocator state, outside the capture
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.out_TD = run()

    def replay(self, inputs: StaticInputs) -> Tensor:
        for dst, src in ((self.inputs.ids_1T, inputs.ids_1T), (self.inputs.positions_1T, inputs.positions_1T),
                         (self.inputs.slots_T, inputs.slots_T), (self.inputs.tables_BM, inputs.tables_BM),
                         (self.inputs.kv_lens_B, inputs.kv_lens_B), (self.inputs.q_lens_B, inputs.q_lens_B)):
            dst.copy_(src, non_blocking=True)  # device to device, ordered on the stream before the replay
        self.graph.replay()
        return self.out_TD


class GraphPool:
    """Captured steps by shape, sharing one CUDA graph memory pool."""

    def __init__(self, model: Transformer, cache: KVCache, attention_fn) -> None:
        self.model, self.cache, self.attention_fn = model, cache, attention_fn
        self.steps: dict[StaticShape, CapturedStep] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=cache.k_LPSKH.device)

    def run(self, shape: StaticShape, inputs: StaticInputs) -> Tensor:
        """Hidden states [Bb * Q, D] of the step: replays (capturing first if this shape is new)."""
        step = self.steps.get(shape)
        if step is None:
            log.info("capturing a CUDA graph for decode steps of batch %d x %d tokens (table width %d)",
                     shape.batch, shape.q_len, shape.pages)
            step = CapturedStep(self.model, self.cache, self.attention_fn, shape, self.pool, self.stream)
            self.steps[shape] = step
        return step.replay(inputs)
