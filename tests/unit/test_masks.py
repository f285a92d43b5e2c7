"""Block-diffusion masks against an independent per-element statement of docs/method.md §2.4 / §3.1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdllm.masks import (
    block_causal_block_mask,
    block_causal_mask,
    two_stream_block_mask,
    two_stream_mask,
)


def allowed_by_method(q: int, k: int, L: int, bs: int, causal_prefix: bool = False) -> bool:
    """docs/method.md §2.4 spelt out case by case, with no shared code with fdllm.masks (`causal_prefix`:
    §5's joint objective, where the clean stream attends causally)."""
    q_noisy, k_noisy = q < L, k < L
    qb, kb = (q - (0 if q_noisy else L)) // bs, (k - (0 if k_noisy else L)) // bs
    if q_noisy and k_noisy:
        return qb == kb
    if q_noisy and not k_noisy:
        return kb < qb
    if not q_noisy and not k_noisy:
        return k <= q if causal_prefix else kb <= qb
    return False  # clean query, noisy key


@pytest.mark.parametrize("L,bs,causal_prefix", [(8, 4, False), (12, 3, False), (16, 16, False), (6, 1, False),
                                                 (8, 4, True), (16, 16, True)])
def test_two_stream_mask_matches_the_rule_elementwise(L, bs, causal_prefix):
    mask = two_stream_mask(L, bs, causal_prefix=causal_prefix)[0, 0]
    assert mask.shape == (2 * L, 2 * L) and mask.dtype == torch.bool
    cases = {"nn": 0, "nc": 0, "cc": 0, "cn": 0}
    for q in range(2 * L):
        for k in range(2 * L):
            assert bool(mask[q, k]) == allowed_by_method(q, k, L, bs, causal_prefix), (q, k)
            cases[("n" if q < L else "c") + ("n" if k < L else "c")] += int(mask[q, k])
    assert cases["cn"] == 0  # the clean stream never sees the noisy one
    assert cases["nn"] > 0 and cases["cc"] > 0 and (cases["nc"] > 0 or L == bs)


def allowed_with_shared_clean(q: int, k: int, L: int, bs: int, causal_prefix: bool = False) -> bool:
    """`[x_t ; x_t' ; x_0]` (3L): each noisy copy sees what it sees in METHOD's `[x_t ; x_0]` and
    nothing of the other copy; the clean stream is METHOD's clean half."""
    q_stream, k_stream = q // L, k // L
    if k_stream < 2 and k_stream != q_stream:  # a noisy key of another stream (or any, for a clean query)
        return False
    as_method = {0: 0, 1: 0, 2: L}  # the stream's offset in METHOD's layout of that copy
    return allowed_by_method(q % L + as_method[q_stream], k % L + as_method[k_stream], L, bs, causal_prefix)


@pytest.mark.parametrize("L,bs,causal_prefix", [(8, 4, False), (12, 3, False), (8, 8, False), (8, 4, True)])
def test_shared_clean_mask_is_each_copy_s_method_mask(L, bs, causal_prefix):
    doc_ids = torch.tensor([[0] * (L // 2) + [1] * (L - L // 2)])
    mask = two_stream_mask(L, bs, doc_ids, causal_prefix=causal_prefix, noisy_streams=2)[0, 0]
    assert mask.shape == (3 * L, 3 * L)
    for q in range(3 * L):
        for k in range(3 * L):
            same_doc = doc_ids[0, q % L] == doc_ids[0, k % L]
            assert bool(mask[q, k]) == (allowed_with_shared_clean(q, k, L, bs, causal_prefix) and bool(same_doc)), (q, k)
    rule = two_stream_block_mask(L, bs, doc_ids, causal_prefix=causal_prefix, noisy_streams=2).mask_mod
    q, k = torch.arange(3 * L)[:, None], torch.arange(3 * L)[None, :]
    assert torch.equal(rule(torch.tensor(0), torch.tensor(0), q, k), mask)


def _uncut_index(i: int, slots: list[int], L: int, bs: int, streams: int) -> int | None:
    """Where index i of a compacted layout (`streams` noisy streams of len(slots)/streams kept blocks,
    then the clean stream) sits in the uncut layout; None for a padding slot."""
    n_noisy = len(slots) * bs
    if i >= n_noisy:
        return streams * L + i - n_noisy
    slot, per_stream = i // bs, len(slots) // streams
    return None if slots[slot] < 0 else (slot // per_stream) * L + slots[slot] * bs + i % bs


@pytest.mark.parametrize("streams,causal_prefix", [(1, False), (2, False), (2, True)])
def test_compacted_streams_keep_each_kept_block_s_uncut_mask(streams, causal_prefix):
    """A compacted layout (`slots`: the noisy blocks kept, -1 = padding) allows exactly what the uncut
    layout allows between the same tokens (per row, with documents), and a padding block sees only itself."""
    L, bs = 12, 3
    per_stream = [[0, 3, -1], [1, 2, 3]] if streams == 1 else [[3, -1, 2, 0, 1, -1], [1, 2, 3, -1, -1, -1]]
    slots = torch.tensor(per_stream)
    n = slots.shape[1] * bs + L
    oracle = allowed_by_method if streams == 1 else allowed_with_shared_clean
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    # documents start inside block 0 and inside the last block; or no documents at all
    for doc_ids in (torch.tensor([[0] * 2 + [1] * 9 + [2], [0] * 12]), None):
        kw = dict(causal_prefix=causal_prefix, noisy_streams=streams, slots=slots)
        mask = two_stream_mask(L, bs, doc_ids, **kw)[:, 0]
        assert mask.shape == (2, n, n)
        for b in range(2):
            for qi in range(n):
                for ki in range(n):
                    uq, uk = (_uncut_index(i, per_stream[b], L, bs, streams) for i in (qi, ki))
                    if uq is None or uk is None:
                        expected = uq is None and uk is None and qi // bs == ki // bs
                    else:
                        same_doc = doc_ids is None or doc_ids[b, uq % L] == doc_ids[b, uk % L]
                        expected = oracle(uq, uk, L, bs, causal_prefix) and bool(same_doc)
                    assert bool(mask[b, qi, ki]) == expected, (b, qi, ki)
        block_mask = two_stream_block_mask(L, bs, doc_ids, **kw)
        for b in range(2):
            assert torch.equal(block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q, k), mask[b])


@pytest.mark.parametrize("build", [two_stream_mask, two_stream_block_mask])
def test_malformed_slots_are_rejected(build):
    docs = torch.zeros(2, 8, dtype=torch.long)
    for slots, docs_ in ((torch.zeros(2, 3, dtype=torch.long), None), (torch.zeros(6, dtype=torch.long), None),
                         (torch.zeros(3, 4, dtype=torch.long), docs)):
        with pytest.raises(ValueError, match=r"^slots must be \[R, 2 x K\] with doc_ids' R rows, got \("):
            build(8, 4, docs_, noisy_streams=2, slots=slots)


def test_block_causal_mask_is_bidirectional_inside_blocks():
    mask = block_causal_mask(8, 4)[0, 0]
    for q in range(8):
        for k in range(8):
            assert bool(mask[q, k]) == (k // 4 <= q // 4)
    assert torch.equal(block_causal_mask(5, 1)[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_documents_never_attend_across_boundaries():
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    mask = two_stream_mask(8, 2, doc_ids)
    assert mask.shape == (2, 1, 16, 16)
    for q in range(16):
        for k in range(16):
            same_doc = doc_ids[0, q % 8] == doc_ids[0, k % 8]
            assert bool(mask[0, 0, q, k]) == (allowed_by_method(q, k, 8, 2) and bool(same_doc))
            assert bool(mask[1, 0, q, k]) == allowed_by_method(q, k, 8, 2)


@pytest.mark.parametrize("build", [two_stream_mask, two_stream_block_mask, block_causal_mask, block_causal_block_mask])
def test_wrong_lengths_are_rejected(build):
    with pytest.raises(ValueError, match="multiple of block_size"):
        build(10, 4)
    with pytest.raises(ValueError, match="doc_ids"):
        build(8, 4, torch.zeros(1, 6, dtype=torch.long))


def test_masks_by_stream_default_to_method_s_layout():
    from fdllm.masks import two_stream_masks_by_stream

    dense, cut = two_stream_mask(8, 4), two_stream_masks_by_stream(8, 4)
    assert cut.noisy_streams == 1 and torch.equal(cut.clean, dense[..., 8:, 8:])
    assert torch.equal(cut.noisy[0], torch.cat([dense[..., :8, :8], dense[..., :8, 8:]], -1))


def test_block_masks_carry_each_row_s_documents_and_the_causal_prefix():
    """Per batch row, a BlockMask's tiles are those its own documents leave non-empty (rows with
    different documents get different sparsity); the cached document-free mask keeps `causal_prefix`."""
    L, bs = 256, 32  # two 128-token tiles per stream
    doc_ids = torch.tensor([[0] * 256, [0] * 128 + [1] * 128])
    for block_mask, dense in ((two_stream_block_mask(L, bs, doc_ids), two_stream_mask(L, bs, doc_ids)),
                              (block_causal_block_mask(L, bs, doc_ids), block_causal_mask(L, bs, doc_ids))):
        n = dense.shape[-1] // 128
        tiles = dense[:, 0].reshape(2, n, 128, n, 128).any(4).any(2)
        assert torch.equal(block_mask.to_dense()[:, 0].bool(), tiles)
        assert not torch.equal(tiles[0], tiles[1])  # the second row's documents empty some tiles
    causal = two_stream_block_mask(64, 16, causal_prefix=True)
    q, k = torch.arange(128)[:, None], torch.arange(128)[None, :]
    assert torch.equal(causal.mask_mod(torch.tensor(0), torch.tensor(0), q, k),
                       two_stream_mask(64, 16, causal_prefix=True)[0, 0])


@pytest.mark.parametrize("with_docs", [False, True])
def test_block_masks_carry_the_method_rule(with_docs):
    """The BlockMasks' own mask_mod, evaluated elementwise (no flex kernel), is docs/method.md §2.4 / §3.1,
    and their sparsity skips exactly the tiles the dense mask leaves empty."""
    L, bs = 128, 32  # flex tiles are 128 x 128: two-stream 2 x 2 tiles, block-causal 1
    doc_ids = torch.tensor([[0] * 48 + [1] * 80]) if with_docs else None
    two = two_stream_block_mask(L, bs, doc_ids)
    causal = block_causal_block_mask(L, bs, doc_ids)
    assert two.shape[-2:] == (2 * L, 2 * L) and causal.shape[-2:] == (L, L)
    b, h = torch.tensor(0), torch.tensor(0)
    q, k = torch.arange(2 * L)[:, None], torch.arange(2 * L)[None, :]
    same_doc = (lambda i, j: doc_ids[0, i % L] == doc_ids[0, j % L]) if with_docs else (lambda i, j: True)
    expect_two = torch.tensor([[allowed_by_method(i, j, L, bs) and bool(same_doc(i, j)) for j in range(2 * L)]
                               for i in range(2 * L)])
    assert torch.equal(two.mask_mod(b, h, q, k), expect_two)
    expect_causal = torch.tensor([[j // bs <= i // bs and bool(same_doc(i, j)) for j in range(L)] for i in range(L)])
    assert torch.equal(causal.mask_mod(b, h, q[:L, :], k[:, :L]), expect_causal)
    for block_mask, dense in ((two, expect_two), (causal, expect_causal)):
        tile = block_mask.BLOCK_SIZE[0]
        n = dense.shape[0] // tile
        any_tile = dense.reshape(n, tile, n, tile).any(3).any(1)
        assert torch.equal(block_mask.to_dense()[0, 0].bool(), any_tile)


def _flex_or_skip():
    """flex_attention, skipping only on a torch build without it. Once importable it must run on CPU
    (eager forward: flex_attention has no CPU backward): a failure there is a failure of the mask path, not a skip."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # pragma: no cover - the pinned torch has it
        pytest.skip("this torch build has no flex_attention")
    return flex_attention


@pytest.mark.parametrize("with_docs,causal_prefix,streams", [(False, False, 1), (True, False, 1), (True, True, 1),
                                                             (False, False, 2), (True, True, 2)])
def test_flex_block_mask_gives_the_dense_mask_attention(with_docs, causal_prefix, streams):
    flex_attention = _flex_or_skip()
    L, bs, heads, dim = 64, 16, 2, 16
    doc_ids = torch.tensor([[0] * 32 + [1] * 32]) if with_docs else None
    q, k, v = (torch.randn(1, heads, (streams + 1) * L, dim) for _ in range(3))
    kw = dict(causal_prefix=causal_prefix, noisy_streams=streams)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=two_stream_mask(L, bs, doc_ids, **kw))
    flex = flex_attention(q, k, v, block_mask=two_stream_block_mask(L, bs, doc_ids, **kw))
    assert (dense - flex).abs().max().item() < 1e-5


@pytest.mark.parametrize("streams,causal_prefix", [(1, False), (2, False), (2, True)])
def test_attention_by_stream_is_the_dense_mask_s_attention(qwen2_dir, streams, causal_prefix):
    """`StreamMasks` (each noisy stream scored against itself and the clean stream only) gives the
    forward of the whole dense mask: no key a query may see is dropped."""
    import fdllm
    from fdllm.masks import two_stream_masks_by_stream

    model = fdllm.load_model(qwen2_dir)
    L, bs = 32, 8
    doc_ids = torch.tensor([[0] * 12 + [1] * 20, [0] * 32])
    ids = torch.randint(0, 80, (2, (streams + 1) * L))
    pos = torch.cat([torch.arange(12), torch.arange(20)]).repeat(streams + 1)[None]
    kw = dict(causal_prefix=causal_prefix, noisy_streams=streams)
    with torch.no_grad():
        dense = model(ids, pos, two_stream_mask(L, bs, doc_ids, **kw))
        by_stream = model(ids, pos, two_stream_masks_by_stream(L, bs, doc_ids, **kw))
    assert (dense - by_stream).abs().max().item() < 1e-5


def test_model_forward_is_the_same_under_dense_and_flex_masks(qwen2_dir):
    import fdllm

    _flex_or_skip()
    model = fdllm.load_model(qwen2_dir)
    L, bs = 64, 16
    ids = torch.randint(0, 80, (2, 2 * L))
    pos = torch.arange(L).repeat(2)[None]
    with torch.no_grad():
        dense = model(ids, pos, two_stream_mask(L, bs))
        flex = model(ids, pos, two_stream_block_mask(L, bs))
    assert (dense - flex).abs().max().item() < 1e-5


def test_flex_block_causal_mask_matches_dense():
    flex_attention = _flex_or_skip()
    L, bs = 128, 32
    q, k, v = (torch.randn(2, 2, L, 16) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(L, bs))
    flex = flex_attention(q, k, v, block_mask=block_causal_block_mask(L, bs))
    assert (dense - flex).abs().max().item() < 1e-5


def test_masks_are_built_on_the_device_asked_for():
    """On the documents' device, else on `device` (the meta device stands in for a GPU: a mask left
    on the CPU would be a host-to-device copy, or an error, on every training step)."""
    from fdllm.masks import two_stream_masks_by_stream

    docs = torch.zeros(2, 8, dtype=torch.long, device="meta")
    for build in (two_stream_mask, block_causal_mask):
        assert build(8, 4, docs).device.type == "meta" and build(8, 4, device="meta").device.type == "meta"
    by_stream = two_stream_masks_by_stream(8, 4, device="meta", noisy_streams=2)
    assert by_stream.noisy[1].device.type == by_stream.clean.device.type == "meta"
    for build in (two_stream_block_mask, block_causal_block_mask):
        assert build(8, 4, docs).kv_num_blocks.device.type == "meta"
        assert build(8, 4, device="meta").kv_num_blocks.device.type == "meta"


def test_the_rule_s_defaults_are_method_s_layout():
    from fdllm.masks import two_stream_rule

    idx = torch.arange(16)
    assert torch.equal(two_stream_rule(idx[:, None], idx[None, :], 8, 4), two_stream_mask(8, 4)[0, 0])
