"""Fused confidence (argmax + its softmax probability, mask token excluded) vs the plain torch reference."""

from __future__ import annotations

import pytest
import torch

from fdllm.kernels import fused_confidence_ref


def make_inputs(T: int, V: int, D: int, dtype: torch.dtype, device, seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden_TD = torch.randn(T, D, generator=gen)
    weight_VD = torch.randn(V, D, generator=gen) * (scale / D**0.5)
    return hidden_TD.to(device=device, dtype=dtype), weight_VD.to(device=device, dtype=dtype)


def check(hidden_TD, weight_VD, mask_token_id, prob_tol: float, **tiles) -> tuple[torch.Tensor, torch.Tensor]:
    from fdllm.kernels import fused_confidence

    token_T, prob_T = fused_confidence(hidden_TD, weight_VD, mask_token_id, **tiles)
    ref_token_T, ref_prob_T = fused_confidence_ref(hidden_TD, weight_VD, mask_token_id)
    assert token_T.dtype == torch.int64 and prob_T.dtype == torch.float32
    # A different token is only acceptable at a near-tie (summation order differs from the matmul's).
    logits_TV = hidden_TD.float() @ weight_VD.float().T
    if mask_token_id is not None:
        logits_TV[:, mask_token_id] = float("-inf")
    chosen_T = logits_TV.gather(1, token_T[:, None]).squeeze(1)
    torch.testing.assert_close(chosen_T, logits_TV.max(1).values, atol=1e-4, rtol=1e-5)
    assert (token_T == ref_token_T).float().mean() > 0.95
    torch.testing.assert_close(prob_T, ref_prob_T, atol=prob_tol, rtol=prob_tol)
    return token_T, prob_T


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("T,V,D", [(5, 300, 48), (40, 130, 16)])
def test_matches_reference(device, T, V, D, dtype, tol):
    """Ragged sizes: T, V and D are not multiples of the tiles (V spans several vocab splits)."""
    hidden_TD, weight_VD = make_inputs(T, V, D, dtype, device, scale=4.0)
    check(hidden_TD, weight_VD, mask_token_id=V - 7, prob_tol=tol)


@pytest.mark.parametrize("tiles", [{"block_t": 16}, {"block_t": 32}, {"v_per_split": 64}, {"v_per_split": 128}],
                         ids=str)
def test_other_tiles_match_the_reference(device, tiles):
    """The tiles the GPU suite tunes: rows across row tiles and a ragged last tile; down to 64 vocab
    entries a chunk (5 chunks of 300, the last one short), whose partials the merge reduces at once."""
    from fdllm.kernels.confidence import BLOCK_T

    hidden_TD, weight_VD = make_inputs(tiles.get("block_t", BLOCK_T) + 9, 300, 48, torch.float32, device, scale=4.0)
    weight_VD[200] = weight_VD[70] = 10 * hidden_TD[0]  # row 0: a tie across two chunks (64 a chunk) goes to 70
    token_T, _ = check(hidden_TD, weight_VD, mask_token_id=293, prob_tol=1e-5, **tiles)
    assert token_T[0] == 70


def test_mask_token_is_never_predicted(device):
    hidden_TD, weight_VD = make_inputs(4, 200, 32, torch.float32, device)
    mask_token_id = 150
    weight_VD[mask_token_id] = 10 * hidden_TD.sum(0)  # the mask token would win every row
    assert (fused_confidence_ref(hidden_TD, weight_VD, None)[0] == mask_token_id).all()
    token_T, _ = check(hidden_TD, weight_VD, mask_token_id, prob_tol=1e-5)
    assert (token_T != mask_token_id).all()


def test_ties_go_to_lowest_token_id(device):
    """Exact ties inside one vocab tile and across vocab splits resolve like torch.argmax."""
    hidden_TD, weight_VD = make_inputs(3, 300, 32, torch.float32, device)
    winner = 10 * hidden_TD[0]
    for v in (290, 70, 5, 3):  # 3 and 5 share a vocab tile, 70 is in the next tile, 290 in the last split
        weight_VD[v] = winner
    token_T, prob_T = check(hidden_TD, weight_VD, mask_token_id=None, prob_tol=1e-5)
    assert token_T[0] == 3
    assert prob_T[0] < 0.26  # four equal maxima share the mass


def test_large_logits_stay_finite(device):
    hidden_TD, weight_VD = make_inputs(6, 256, 32, torch.float32, device, scale=300.0)
    _, prob_T = check(hidden_TD, weight_VD, mask_token_id=0, prob_tol=1e-5)
    assert torch.isfinite(prob_T).all() and (prob_T > 0.5).all()


def test_empty_and_bad_inputs(device):
    from fdllm.kernels import fused_confidence

    hidden_TD, weight_VD = make_inputs(0, 64, 16, torch.float32, device)
    token_T, prob_T = fused_confidence(hidden_TD, weight_VD, 1)
    assert token_T.shape == prob_T.shape == (0,)
    hidden_TD, weight_VD = make_inputs(2, 64, 16, torch.float32, device)
    with pytest.raises(ValueError, match="expected hidden"):
        fused_confidence(hidden_TD[:, :8], weight_VD, 1)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_confidence(hidden_TD.half(), weight_VD, 1)
    with pytest.raises(ValueError, match="contiguous along D"):
        fused_confidence(hidden_TD, weight_VD.T.contiguous().T, 1)
    for block_t in (8, 48):
        with pytest.raises(ValueError, match="power of two >= 16"):
            fused_confidence(hidden_TD, weight_VD, 1, block_t=block_t)
    for v_per_split in (0, 96):
        with pytest.raises(ValueError, match="multiple of 64"):
            fused_confidence(hidden_TD, weight_VD, 1, v_per_split=v_per_split)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_llm_shape_on_gpu(cuda_device, dtype):
    """A 32k vocab, D = 1536 (Qwen2-1.5B width), 8 sequences x a 32-token block."""
    hidden_TD, weight_VD = make_inputs(256, 32000, 1536, dtype, cuda_device, scale=8.0)
    check(hidden_TD, weight_VD, mask_token_id=31999, prob_tol=1e-3)
