"""The model shapes the GPU benchmarks run at (random weights): the GPU suite's decode table and the
decode GEMM's kernel rows (`bench_kernels --linear`)."""

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "smoke": (32, 64, 1, 4, 2, 96, True),
    "sizing": (2048, 5632, 8, 16, 4, 32000, False),  # tests/kernels/test_cuda_graphs.py's KV sizing check
}
