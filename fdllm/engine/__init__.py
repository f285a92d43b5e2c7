"""The inference engine: continuous batching over a paged block KV cache (nano-vllm style split).

engine.py (Engine: add_request/abort/step/generate), scheduler.py (queues, admission, chunked
prefill), sequence.py (per-request decoding state), runner.py (tensors and the forward),
graphs.py (CUDA graphs of static decode steps), params.py (SamplingParams, EngineConfig, GenerationResult).
"""

from fdllm.engine.engine import Engine
from fdllm.engine.params import EngineConfig, GenerationResult, SamplingParams, SequenceLogprobs

__all__ = ["Engine", "EngineConfig", "GenerationResult", "SamplingParams", "SequenceLogprobs"]
