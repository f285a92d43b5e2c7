"""Batch invariance: a row's result is bitwise the same alone or in any batch (kernels and engine).

The kernels choose tiles and split counts from one sequence's own shape, never from the batch;
these tests put the same sequence (or hidden row) alone and inside wider, longer, padded batches
and compare bits. Under the Triton interpreter on CPU, compiled on CUDA.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fdllm
from tests.kernels.test_paged_attention import make_case
from tests.unit.test_engine import make_engine, params, random_prompts


def test_attention_row_is_bitwise_the_same_alone_and_in_batches(device):
    from fdllm.kernels.paged_attention import paged_attention

    # sequence 0 spans several splits (min 64 keys per split), the others differ in length and q_len
    case = make_case(q_lens=[3, 8, 1, 5], kv_lens=[300, 40, 129, 8], T=8, K=2, G=3, H=32, S=8, device=device)
    batched = paged_attention(*case.args(), min_keys_per_split=64)
    for b in range(4):
        n, pages = int(case.q_lens_B[b]), -(-int(case.kv_lens_B[b]) // 8)
        alone = paged_attention(
            case.q_BTNH[b : b + 1, :n].contiguous(), case.k_pool_PSKH, case.v_pool_PSKH,
            case.block_tables_BM[b : b + 1, :pages].contiguous(), case.kv_lens_B[b : b + 1], case.q_lens_B[b : b + 1],
            min_keys_per_split=64,
        )
        assert torch.equal(alone[0], batched[b, :n]), f"sequence {b}"


def test_confidence_row_is_bitwise_the_same_alone_and_in_batches(device):
    from fdllm.kernels import fused_confidence
    from fdllm.kernels.confidence import BLOCK_T

    gen = torch.Generator().manual_seed(0)
    hidden_TD = torch.randn(2 * BLOCK_T + 5, 32, generator=gen).to(device)
    weight_VD = (torch.randn(2500, 32, generator=gen) / 4).to(device)  # 10 vocab chunks
    token_T, prob_T = fused_confidence(hidden_TD, weight_VD, 7)
    # Rows at the same offset inside a BLOCK_T tile, for any T. (The interpreter's tl.dot is numpy's
    # matmul, whose BLAS edge handling rounds a row by its position in the tile; on CUDA the MMA
    # does not, and any rows are compared.)
    slices = [slice(0, BLOCK_T), slice(BLOCK_T, 2 * BLOCK_T), slice(2 * BLOCK_T, 2 * BLOCK_T + 1)]
    if device.type == "cuda":
        slices += [slice(5, 6), slice(10, BLOCK_T + 11)]
    for rows in slices:
        token, prob = fused_confidence(hidden_TD[rows].contiguous(), weight_VD, 7)
        assert torch.equal(token, token_T[rows]) and torch.equal(prob, prob_T[rows])


@pytest.fixture(scope="module")
def model(sharp_dir, device):
    return fdllm.load_model(sharp_dir, device=device)


def test_request_tokens_are_the_same_alone_and_in_any_batch_on_triton(model):
    target = random_prompts(1, [6], seed=5)[0]
    target_params = [params(max_new_tokens=10), params(max_new_tokens=10, temperature=0.8, seed=3)]
    others = random_prompts(4, [2, 9, 12], seed=8)
    other_params = [params(max_new_tokens=n, mode=m) for n, m in zip([4, 10, 7, 12], ["ar", "diffusion"] * 2)]
    batches = ([*zip(others, other_params), target], [target, *zip(others[:1], other_params[:1])])
    for tp, batch in zip(target_params, batches):  # greedy in a batch of 5, sampled in a batch of 2
        batch = [(target, tp) if item is target else item for item in batch]
        alone = make_engine(model, attention_backend="triton").generate([target], tp)[0].token_ids
        got = make_engine(model, attention_backend="triton").generate([p for p, _ in batch], [sp for _, sp in batch])
        assert got[[p for p, _ in batch].index(target)].token_ids == alone


def test_kernels_package_is_a_leaf():
    """fdllm/kernels imports nothing of fdllm outside itself (the engine's layering)."""
    root = Path(fdllm.__file__).parent / "kernels"
    for file in root.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("fdllm"):
                    assert name.startswith("fdllm.kernels"), f"{file.name} imports {name}"
