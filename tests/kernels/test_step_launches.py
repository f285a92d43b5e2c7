"""The kernels a static decode step's body launches: what a CUDA graph captures and replays, counted here.

At batch 1 a step is a few hundred small kernels, and a GPU pays for each one's launch gap besides its
work (the H200's profile of a Qwen2.5-1.5B AR step, docs/gpu.md: ~0.5 ms of 2.4 outside kernel time, 389
kernels). A change that adds one kernel a layer (a stray `.contiguous()`, a dtype cast, an op left
unfused) costs 28 launches a step at that shape, and nothing on a CPU would show it: the graph has the
same outputs. So the engine's static steps are run here (under the interpreter on CPU, as the other
kernel tests) with every kernel counted: each Triton launch, and each torch op that writes memory (not
a view, not an allocation; a view-like op that had to copy, such as a dtype conversion, counts).
Models of one and of three layers tell a layer's kernels from the step's."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdllm
from tests.helpers import tiny_hf_model
from tests.unit.test_engine import make_engine, params, random_prompts

triton = pytest.importorskip("triton")

aten = torch.ops.aten
# ops that launch no kernel: allocations, metadata, and the interpreter's storage swaps
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten.result_type.Tensor, aten.result_type.Scalar}
GEMMS = {"linear", "addmm", "mm", "matmul", "bmm"}  # torch's GEMM, whichever overload the dispatcher shows
# The fused forward's kernels a layer, at these shapes (one key split: a context past MIN_KEYS_PER_SPLIT
# adds the merge, and K past linear.MIN_K_PER_SPLIT the GEMM's split reduce, one each).
LAYER = {
    "torch": {"gemm": 4, "_add_rms_norm_kernel": 2, "_rope_store_kv_kernel": 1, "_paged_attention_kernel": 1,
              "_silu_mul_kernel": 1},
    "triton": {"_skinny_linear_kernel": 4, "_add_rms_norm_kernel": 2, "_rope_store_kv_kernel": 1,
               "_paged_attention_kernel": 1},  # the SiLU gate in the down projection's prologue
}
# a step's own: the embedding, RoPE's cos/sin from the positions (as float, times the cached frequencies,
# the halves joined, cos, sin), the first layer's input norm
STEP = {"embedding": 1, "to": 1, "mul": 1, "cat": 1, "cos": 1, "sin": 1, "_rms_norm_kernel": 1}


class CountKernels(TorchDispatchMode):
    """Counts the kernels launched while active, by name: torch ops as their op's name, Triton kernels
    (`fdllm.kernels`' modules, wrapped by `CountedKernel`) as the kernel's."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.in_triton = False  # the interpreter's own tensor ops while a kernel runs are not the model's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_triton or func in NO_KERNEL or func.name().startswith("aten::set_"):
            return out
        if func.is_view:  # counts only where it had to copy: no input shares the output's storage
            ins = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if not isinstance(out, torch.Tensor) or out.untyped_storage().data_ptr() in ins:
                return out
        name = func.overloadpacket.__name__
        self.counts["gemm" if name in GEMMS else name] += 1
        return out


class CountedKernel:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](...)` counted, then launched."""

    def __init__(self, kernel, name: str, mode: CountKernels) -> None:
        self.kernel, self.name, self.mode = kernel, name, mode

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.mode.counts[self.name] += 1
            self.mode.in_triton = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.mode.in_triton = False
        return launch


def step_kernels(monkeypatch, model, mode: str, linear_backend: str) -> collections.Counter[str]:
    """Kernels per static decode step (the mean over the steps of a short generation; every step's are
    the same), with the engine's static path (`fdllm.engine.runner.forward_static`) counted."""
    import fdllm.engine.runner as runner
    from fdllm.kernels import confidence, fused_ops, linear, paged_attention

    counter = CountKernels()
    for module in (fused_ops, paged_attention, linear, confidence):
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.KernelInterface) and name.endswith("_kernel"):  # not helpers
                monkeypatch.setattr(module, name, CountedKernel(obj, name, counter))
    steps = []

    def counted(*args, **kwargs):
        before = collections.Counter(counter.counts)
        with counter:
            out = forward_static(*args, **kwargs)
        steps.append(counter.counts - before)
        return out

    forward_static = runner.forward_static
    monkeypatch.setattr(runner, "forward_static", counted)
    engine = make_engine(model, attention_backend="triton", linear_backend=linear_backend)
    engine.generate(random_prompts(1, [5], seed=3), params(max_new_tokens=10, mode=mode))
    monkeypatch.undo()
    assert len(steps) >= 3, "the decode steps should run the static path"
    assert all(step == steps[0] for step in steps), steps  # AR, refresh, sub-block and commit steps alike
    return steps[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory, device):
    paths = {}
    for layers in (1, 3):
        paths[layers] = tmp_path_factory.mktemp(f"layers{layers}")
        tiny_hf_model("qwen2", num_hidden_layers=layers).save_pretrained(paths[layers])
    return {layers: fdllm.load_model(path, device=device) for layers, path in paths.items()}


@pytest.mark.parametrize("linear_backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_a_static_step_launches_the_fused_kernels_and_nothing_else(monkeypatch, models, mode, linear_backend):
    """Per layer: the four GEMMs (q/k/v and gate/up stacked), RoPE with the K/V store, attention, the two
    residual adds with their norms, and the SiLU gate unless the Triton GEMM takes it; per step: the
    embedding, RoPE's cos/sin and the first norm. No other kernel, and no sync (`.item()`)."""
    one, three = (step_kernels(monkeypatch, models[n], mode, linear_backend) for n in (1, 3))
    layer = collections.Counter(LAYER[linear_backend])
    two_layers = {name: three[name] - one[name] for name in three | one}
    assert {name: n for name, n in two_layers.items() if n} == {name: 2 * n for name, n in layer.items()}
    assert layer <= one and dict(one - layer) == STEP, "kernels outside the layers"
    assert "_local_scalar_dense" not in three
