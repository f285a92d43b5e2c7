"""Every Triton kernel compiles for the GPUs the project targets (A100: sm_80, H100/H200: sm_90),
checked on a CPU machine: the interpreter that runs the other kernel tests executes kernels as
Python, so what only the compiler refuses (a global that is not a `tl.constexpr` value, a type it
cannot lower, too much shared memory) would otherwise surface on the first GPU run. Each wrapper is
called as the engine calls it, its launches recorded instead of run, and each recorded launch
compiled ahead of time for each target (Triton's own `ASTSource` path and bundled ptxas, no driver)
in a child process: the interpreter's patches of `triton.language` would break the compiler here."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from tests.kernels.test_paged_attention import make_case  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90": 90}  # CUDA compute capability
_POINTEE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
            torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
GEMMS = {"_skinny_linear_kernel", "_confidence_partials_kernel"}
STREAMING = GEMMS | {"_paged_attention_kernel", "_rms_norm_kernel", "_add_rms_norm_kernel", "_rope_store_kv_kernel"}
ROUNDED_LIKE_TORCH = {"_rope_kernel", "_rope_store_kv_kernel"}  # kernels that promise eager torch's bits: no FMA may fuse their roundings


class Launches:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` is recorded, not run."""

    def __init__(self, kernel) -> None:
        self.fn = getattr(kernel, "fn", kernel)  # the Python function (under the interpreter, wrapped)
        while hasattr(self.fn, "fn"):
            self.fn = self.fn.fn
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def spec(module: str, fn, args: tuple, kwargs: dict) -> dict:
    """A recorded launch as what the child compiles: the kernel, its signature, constexprs, attributes and
    options, specialized as Triton's launcher specializes a call (`native_specialize_impl`): an int equal
    to 1 becomes a constant, and an int divisible by 16 or a pointer aligned to 16 bytes is marked so
    (`tt.divisibility`), which is what lets the compiler vectorize loads. Without that the compiled code
    is not the code a GPU runs (every load scalar)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip((p.name for p in params), args)) | {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    signature, constexprs, attrs = {}, [], []
    for i, p in enumerate(params):
        value = bound[p.name] if p.name in bound else p.default
        if "constexpr" in str(p.annotation) or value is None:
            signature[p.name] = "constexpr"
        else:
            kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
            signature[p.name] = kind if kind == "constexpr" else _type(value)
            if attr == "D":
                attrs.append([i, [["tt.divisibility", 16]]])
        if signature[p.name] == "constexpr":
            constexprs.append([i, value])
    return {"module": module, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs, "attrs": attrs,
            "options": {k: v for k, v in kwargs.items() if k in _OPTIONS}}


def compile_specs(specs: list[dict]) -> None:
    """The child: compile every launch for every target (raises what the compiler raises); one JSON line
    per compile: its shared memory, whether its PTX has a floating-point FMA, the widths (bytes) of its
    global loads (`ld.global`, and `cp.async` where loads feed `tl.dot` through shared memory), and its
    registers and local (spill) memory a thread, as the bundled `cuobjdump` reads them from the cubin."""
    import importlib
    import re
    import tempfile

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for s in specs:
        kernel = getattr(importlib.import_module(s["module"]), s["kernel"])
        source = ASTSource(fn=kernel, signature=s["signature"], constexprs={(i,): v for i, v in s["constexprs"]},
                           attrs={(i,): a for i, a in s["attrs"]})
        for name, capability in TARGETS.items():
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=s["options"])
            ptx = compiled.asm["ptx"]
            fma = bool(re.search(r"\bfma\.rn\.(?:bf16|f16|f32)\b", ptx))
            loads = {int(v or 1) * int(bits) // 8 for v, bits in re.findall(r"\bld\.global[.a-z0-9]*?(?:\.v([24]))?\.[bfsu](\d+)\b", ptx)}
            loads |= {int(size, 16) for size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^;]*?(0x[0-9a-f]+)", ptx)}
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                                       capture_output=True, text=True, check=True).stdout
            regs, local = (int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "LOCAL"))
            print(json.dumps({"kernel": s["kernel"], "target": name, "shared": compiled.metadata.shared, "fma": fma,
                              "load_bytes": sorted(loads), "registers": regs, "spilled": local}), flush=True)


def record(monkeypatch, module, names: list[str], call) -> list[tuple]:
    """(fn, args, kwargs) of every launch of `module`'s kernels `names` while `call()` runs."""
    fakes = {name: Launches(getattr(module, name)) for name in names}
    with monkeypatch.context() as patch:
        for name, fake in fakes.items():
            patch.setattr(module, name, fake)
        call()
    launches = [(fake.fn, args, kwargs) for fake in fakes.values() for args, kwargs in fake.calls]
    assert {fake.fn.__name__ for fake in fakes.values() if fake.calls} == set(names), "a kernel was never launched"
    return launches


def test_every_triton_kernel_compiles_for_a100_and_h100(monkeypatch, device):
    import fdllm.kernels.confidence as confidence
    import fdllm.kernels.paged_attention as attention

    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        h, w = torch.randn(5, 64, dtype=dtype), torch.randn(3000, 64, dtype=dtype)  # 12 vocab chunks to merge
        specs += [spec(confidence.__name__, *launch) for launch in record(
            monkeypatch, confidence, ["_confidence_partials_kernel", "_confidence_merge_kernel"],
            lambda: confidence.fused_confidence(h, w, 7))]
    for dtype, causal, num_splits, index_dtype in ((torch.bfloat16, False, 1, torch.int32), (torch.bfloat16, True, 4, torch.int64),
                                                   (torch.float32, "flags", 4, torch.int32), (torch.float16, False, 2, torch.int32)):
        case = make_case(q_lens=[8, 3], kv_lens=[40, 19], T=8, K=2, G=6, H=128, S=32, dtype=dtype)
        case.block_tables_BM = case.block_tables_BM.to(index_dtype)
        flags = torch.tensor([1, 0], dtype=torch.int32) if causal == "flags" else causal
        names = ["_paged_attention_kernel"] + (["_merge_splits_kernel"] if num_splits > 1 else [])
        specs += [spec(attention.__name__, *launch) for launch in record(
            monkeypatch, attention, names, lambda: attention.paged_attention(*case.args(), causal=flags, num_splits=num_splits))]
    import fdllm.kernels.fused_ops as fused_ops
    from fdllm.model import rope_cos_sin

    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.randn(3, 1536, dtype=dtype), torch.ones(1536, dtype=dtype)
        specs += [spec(fused_ops.__name__, *launch) for launch in record(
            monkeypatch, fused_ops, ["_rms_norm_kernel"], lambda: fused_ops.rms_norm(x, w, 1e-6))]
        specs += [spec(fused_ops.__name__, *launch) for launch in record(
            monkeypatch, fused_ops, ["_add_rms_norm_kernel"], lambda: fused_ops.add_rms_norm(x, x, w, 1e-6))]
        kv, cache = torch.randn(3, 2, 128, dtype=dtype), torch.zeros(64, 2, 128, dtype=dtype)
        specs += [spec(fused_ops.__name__, *launch) for launch in record(
            monkeypatch, fused_ops, ["_store_kv_kernel"], lambda: fused_ops.store_kv(cache, cache, torch.arange(3), kv, kv))]
        gate, up = torch.randn(3, 2 * 1500, dtype=dtype).split(1500, -1)  # halves of a stacked GEMM's output
        specs += [spec(fused_ops.__name__, *launch) for launch in record(
            monkeypatch, fused_ops, ["_silu_mul_kernel"], lambda: fused_ops.silu_mul(gate, up))]
        cos, sin = rope_cos_sin(torch.arange(3)[None], 128, 1e6, dtype)
        specs += [spec(fused_ops.__name__, *launch) for launch in record(
            monkeypatch, fused_ops, ["_rope_kernel"],
            lambda: fused_ops.apply_rope_fused(torch.randn(1, 3, 12, 128, dtype=dtype), cos, sin))]
        specs += [spec(fused_ops.__name__, *launch) for launch in record(
            monkeypatch, fused_ops, ["_rope_store_kv_kernel"],
            lambda: fused_ops.rope_store_kv(torch.randn(3, 16, 128, dtype=dtype), cos[0], sin[0], 12, cache, cache,
                                            torch.arange(3)))]
    import fdllm.kernels.linear as linear

    for dtype in (torch.bfloat16, torch.float32):  # the o projection (K split) and down with the gate; gate/up (not)
        x, w, b = torch.randn(3, 1536, dtype=dtype), torch.randn(1536, 1536, dtype=dtype), torch.zeros(1536, dtype=dtype)
        specs += [spec(linear.__name__, *launch) for launch in record(
            monkeypatch, linear, ["_skinny_linear_kernel", "_split_reduce_kernel"], lambda: linear.skinny_linear(x, w, b))]
        gated = torch.randn(3, 2 * 1536, dtype=dtype)
        specs += [spec(linear.__name__, *launch) for launch in record(
            monkeypatch, linear, ["_skinny_linear_kernel", "_split_reduce_kernel"],
            lambda: linear.skinny_linear(gated, w, silu_gate=True))]
        specs += [spec(linear.__name__, *launch) for launch in record(
            monkeypatch, linear, ["_skinny_linear_kernel"], lambda: linear.skinny_linear(x, torch.randn(17920, 1536, dtype=dtype)))]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": root}
    child = subprocess.run([sys.executable, __file__], input=json.dumps(specs), capture_output=True, text=True,
                           env=env, timeout=600, cwd=root)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    compiled = [json.loads(line) for line in child.stdout.splitlines()]
    assert len(compiled) == len(specs) * len(TARGETS)
    # read on sm_90, whose 16-bit mul and add are native: sm_80 emulates them with FMAs (by 1.0 or plus -0.0)
    fused = [c for c in compiled if c["kernel"] in ROUNDED_LIKE_TORCH and c["target"] == "sm_90" and c["fma"]]
    assert not fused, f"an FMA fuses a rounding eager torch makes (launch with enable_fp_fusion=False): {fused}"
    # The kernels that stream a weight or the KV cache read it 16 bytes a load at these aligned shapes, and the
    # GEMMs nothing narrower than 8 (a tile of hidden rows): a mask or stride the compiler cannot prove
    # aligned makes every load scalar, several times below HBM bandwidth, which only a GPU run would show.
    sm90 = [c for c in compiled if c["target"] == "sm_90"]
    narrow = [c for c in sm90 if c["kernel"] in STREAMING and 16 not in c["load_bytes"]]
    narrow += [c for c in sm90 if c["kernel"] in GEMMS and min(c["load_bytes"]) < 8]
    assert not narrow, f"a streaming kernel's loads are not vectorized: {narrow}"
    # No kernel spills registers to local memory (a spill in a loop is a silent slowdown on the GPU).
    spilled = [c for c in compiled if c["spilled"]]
    assert not spilled, f"a kernel spills registers: {spilled}"


if __name__ == "__main__":
    compile_specs(json.loads(sys.stdin.read()))
