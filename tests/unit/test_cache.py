"""Paged KV cache: page allocation, packed varlen attention over pages, exact K/V at block commit."""

from __future__ import annotations

import pytest
import torch

import fdllm
from fdllm.kernels.reference import paged_attention_torch
from fdllm.cache import AttentionRow, KVCache, PageAllocator, PagedAttention, kv_budget_pages
from fdllm.masks import block_causal_mask
from fdllm.model import masked_attention
from tests.helpers import VOCAB

L, K, N, H = 4, 2, 4, 8  # page size, kv heads, query heads, head dim


def test_allocator_reservations():
    alloc = PageAllocator(5)
    assert alloc.reserve(3) and not alloc.reserve(3)
    pages = [alloc.allocate(), alloc.allocate()]
    assert alloc.num_free == 3 and alloc.num_unreserved == 2
    alloc.release(pages, unused_reservation=1)
    assert alloc.num_free == 5 and alloc.num_unreserved == 5
    with pytest.raises(RuntimeError, match="^page allocation without a reservation$"):
        alloc.allocate()
    with pytest.raises(RuntimeError, match="^releasing more reservation than was made$"):
        alloc.release([], unused_reservation=1)
    with pytest.raises(ValueError, match="^the KV cache needs at least one page, got 0$"):
        PageAllocator(0)
    assert PageAllocator(1).num_free == 1


def _dense_reference(q_TNH, k_TKH, v_TKH, allowed_TT):
    """Attention of packed tokens with an explicit [T, T] allowed matrix (over the same tokens)."""
    return masked_attention(q_TNH[None], k_TKH[None], v_TKH[None], allowed_TT[None, None])[0]


GiB, MiB = 2**30, 2**20


GPU1 = torch.device("cuda", 1)


def _fake_cuda_memory(monkeypatch, free: int, total: int, reserved: int) -> None:
    """torch.cuda's memory queries as GPU 1 with `total` bytes, `free` of them free, `reserved` held by torch;
    a query about another device (the current one, say) finds nothing."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total) if device == GPU1 else (0, 0))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved if device == GPU1 else 0)


def test_kv_budget_is_the_memory_fraction_minus_peak_and_other_processes(monkeypatch):
    """vLLM's gpu_memory_utilization, by hand: 0.9 x 80 GiB - 10 GiB peak - 5 GiB held by others = 57 GiB."""
    _fake_cuda_memory(monkeypatch, free=60 * GiB, total=80 * GiB, reserved=15 * GiB)  # 20 used, 15 of them ours
    assert kv_budget_pages(MiB, 0.9, GPU1, 10 * GiB) == 57 * 1024
    assert kv_budget_pages(3 * MiB, 0.9, GPU1, 10 * GiB) == 57 * 1024 // 3  # whole pages only
    # torch reserving more than the device shows used (nothing held elsewhere) never adds memory
    _fake_cuda_memory(monkeypatch, free=60 * GiB, total=80 * GiB, reserved=30 * GiB)
    assert kv_budget_pages(MiB, 0.5, GPU1, 10 * GiB) == 30 * 1024


def test_kv_budget_of_exactly_one_page_fits_and_less_is_a_clear_error(monkeypatch):
    _fake_cuda_memory(monkeypatch, free=7 * GiB, total=8 * GiB, reserved=GiB // 2)  # others hold 0.5 GiB
    assert kv_budget_pages(GiB, 0.5, GPU1, 2 * GiB + GiB // 2) == 1  # 4 - 2.5 - 0.5 GiB = one 1-GiB page
    with pytest.raises(ValueError) as error:
        kv_budget_pages(GiB, 0.5, GPU1, 3 * GiB)
    assert str(error.value) == (
        "no room for the KV cache: 50% of 8.0 GiB minus 3.00 GiB for the weights and the steps (activations, graphs, "
        "workspace) and 0.50 GiB held elsewhere leaves 0.50 GiB; raise gpu_memory_utilization or set num_pages / "
        "kv_cache_gib")


def test_step_memory_holds_the_graph_pool_beside_eager_steps_and_the_attention_workspace(monkeypatch):
    """What KV sizing subtracts on CUDA: the eager peak of the largest step (weights included), plus with
    CUDA graphs the largest captured step's activations again (the graphs' pool is private: eager
    steps cannot reuse it) and the kernel's split-KV workspace, which a no-cache profiling forward
    never allocates, once per place it can live."""
    from fdllm.engine import runner

    weights = 5 * GiB
    # profiled (tokens, with the head) -> activation peak; a captured step is the body alone
    activations = {(4096, True): 2 * GiB, (8192, True): 3 * GiB, (8192, False): 2 * GiB}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: weights)
    monkeypatch.setattr(runner, "profile_peak_memory",
                        lambda model, tokens, head=True: weights + activations[tokens, head])
    model = type("Model", (), {"device": GPU1})()
    graphed = runner.StepMemory.profile(model, prefill_tokens=4096, static_tokens=8192, use_graphs=True,
                                        workspace_per_call=GiB // 4)
    assert (graphed.peak, graphed.graph_pool, graphed.workspace) == (8 * GiB, 2 * GiB, GiB // 2)
    assert graphed.total == 10 * GiB + GiB // 2
    eager = runner.StepMemory.profile(model, prefill_tokens=8192, static_tokens=4096, use_graphs=False,
                                      workspace_per_call=GiB // 4)
    assert (eager.peak, eager.graph_pool, eager.workspace) == (8 * GiB, 0, GiB // 4)
    assert str(graphed) == ("10.50 GiB besides the cache: weights and activations 8.00 GiB, CUDA-graph pool 2.00 GiB, "
                            "attention workspace 0.50 GiB")


def test_page_bytes_are_the_bytes_a_page_of_the_pools_takes():
    cache = KVCache(num_layers=3, num_pages=5, page_size=4, n_kv_heads=2, head_dim=8, dtype=torch.float16, device="cpu")
    assert cache.num_pages == 5 and cache.scratch_slot == 5 * 4  # the one scratch page comes after them
    per_page = (cache.k_LPSKH.nbytes + cache.v_LPSKH.nbytes) // (cache.num_pages + 1)  # + the scratch page
    assert KVCache.page_bytes(3, 4, 2, 8, torch.float16) == per_page == 2 * 3 * 4 * 2 * 8 * 2
    assert KVCache.page_bytes(28, 32, 4, 128, torch.float32) == 2 * 28 * 32 * 4 * 128 * 4


def test_paged_attention_builds_its_index_tensors_on_the_cache_device():
    """`meta` stands in for a GPU: an index tensor left on the CPU would be a host-device copy per layer."""
    cache = KVCache(num_layers=2, num_pages=4, page_size=L, n_kv_heads=K, head_dim=H, dtype=torch.float32, device="meta")
    rows = [AttentionRow(3, 7, [0, 1]), AttentionRow(2, 2, [2], causal=True)]
    assert cache.k_LPSKH.device.type == cache.v_LPSKH.device.type == "meta"
    attention = PagedAttention.build(cache, list(range(5)), rows, paged_attention_torch)
    tensors = [attention.slots_T] + [t for g in attention.groups for t in (
        g.gather_RQ, g.tokens_G, g.real_G, g.block_tables_RM, g.kv_lens_R, g.q_lens_R)]
    assert len(tensors) == 13 and all(t.device.type == "meta" for t in tensors)
    # the Triton kernels read block tables and lengths as int32
    assert {t.dtype for g in attention.groups for t in (g.block_tables_RM, g.kv_lens_R, g.q_lens_R)} == {torch.int32}
    with pytest.raises(ValueError, match="^attention rows cover 5 tokens, the step packs 4$"):
        PagedAttention.build(cache, list(range(4)), rows, paged_attention_torch)


def test_packed_rows_match_dense_attention():
    """Two sequences in one packed forward: a 3-block block-causal prefill (one row per block), an
    AR-style causal chunk and a partial block, against dense attention with the equivalent mask."""
    cache = KVCache(1, 8, L, K, H, torch.float32, "cpu")
    # seq A: 12 tokens on pages [5, 1, 6], block-causal rows; seq B: 6 tokens on pages [2, 7]: a
    # causal row over its first 4 then a bidirectional row for 2 tokens seeing all 6.
    pages_a, pages_b = [5, 1, 6], [2, 7]
    slots = [pages_a[p // L] * L + p % L for p in range(12)] + [pages_b[p // L] * L + p % L for p in range(6)]
    rows = [AttentionRow(4, 4, pages_a), AttentionRow(4, 8, pages_a), AttentionRow(4, 12, pages_a),
            AttentionRow(4, 4, pages_b, causal=True), AttentionRow(2, 6, pages_b)]
    attn = PagedAttention.build(cache, slots, rows, paged_attention_torch)
    T = len(slots)
    q, k, v = torch.randn(1, T, N, H), torch.randn(1, T, K, H), torch.randn(1, T, K, H)
    out = attn(0, q, k, v)[0]
    allowed = torch.zeros(T, T, dtype=torch.bool)
    allowed[:12, :12] = block_causal_mask(12, L)[0, 0]
    allowed[12:16, 12:16] = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed[16:18, 12:18] = True
    torch.testing.assert_close(out, _dense_reference(q[0], k[0], v[0], allowed))
    # K/V landed in their slots
    torch.testing.assert_close(cache.k_LPSKH[0, 1], k[0, 4:8])
    torch.testing.assert_close(cache.v_LPSKH[0, 7, :2], v[0, 16:18])


def flash_like_attention(q_BTNH, *args, causal=False, **kw):
    """The torch reference under flash-attn's constraint: causal rows unpadded (it aligns them to T's end)."""
    T = q_BTNH.shape[1]
    assert not causal or bool((args[4] == T).all()), "a causal row padded in a flash_attn call"
    return paged_attention_torch(q_BTNH, *args, causal=causal, **kw)


@pytest.mark.parametrize("backend,exact_causal", [(paged_attention_torch, False), (flash_like_attention, True)])
def test_rows_of_very_different_lengths_are_not_padded_to_the_longest(backend, exact_causal):
    """A step with long prefill chunks beside many short rows (decode, verifies): each row attends as it
    does alone, and the padded calls hold at most twice the real queries plus SHORT_ROW per row (not
    every row padded to the longest: the split-KV partials of 128 rows x 4096 queries are gigabytes)."""
    from fdllm.cache import SHORT_ROW

    gen = torch.Generator().manual_seed(0)
    shapes = [(200, True), (100, True), (70, False), (130, False)] + [(1, True)] * 12 + [(8, False)] * 6 + [(3, True)] * 3
    cache = KVCache(1, 400, L, K, H, torch.float32, "cpu")
    cache.k_LPSKH.normal_(generator=gen)
    cache.v_LPSKH.normal_(generator=gen)
    free, rows, slots = iter(torch.randperm(400, generator=gen).tolist()), [], []
    for q_len, causal in shapes:
        context = int(torch.randint(0, 20, (1,), generator=gen))
        pages = [next(free) for _ in range(-(-(context + q_len) // L))]
        rows.append(AttentionRow(q_len, context + q_len, pages, causal))
        slots.append([pages[p // L] * L + p % L for p in range(context, context + q_len)])
    T = sum(q for q, _ in shapes)
    q, k, v = torch.randn(1, T, N, H, generator=gen), torch.randn(1, T, K, H, generator=gen), torch.randn(1, T, K, H, generator=gen)
    together = PagedAttention.build(cache, sum(slots, []), rows, backend, exact_causal=exact_causal)
    out = together(0, q, k, v)[0]
    assert sum(g.gather_RQ.numel() for g in together.groups) <= 2 * T + SHORT_ROW * len(rows)
    start = 0
    for row, row_slots in zip(rows, slots):
        end = start + row.q_len
        alone = PagedAttention.build(cache, row_slots, [row], backend)(0, q[:, start:end], k[:, start:end], v[:, start:end])
        torch.testing.assert_close(out[start:end], alone[0], msg=f"row {row.q_len} causal={row.causal}")
        start = end


class _Recorder:
    """CachedAttention that attends under a dense mask and keeps each layer's K/V."""

    def __init__(self, mask):
        self.mask, self.k, self.v = mask, {}, {}

    def __call__(self, layer, q, k, v):
        self.k[layer], self.v[layer] = k, v
        return masked_attention(q, k, v, self.mask)


def test_commit_rewrites_exact_kv_after_sub_block_cached_steps(qwen2_dir):
    """The current page is the DualCache scratch (partly stale K/V); every committed page must hold
    exactly the K/V a block-causal prefill of the same tokens gives."""
    model = fdllm.load_model(qwen2_dir)
    B = 8  # block size
    cfg = fdllm.BlockDiffusionConfig(block_size=B, sub_block_size=4, threshold=1.0, use_sub_block_cache=True,
                                     mask_token_id=VOCAB - 1)
    engine = fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=16, max_prefill_tokens=16))
    engine.add_request([3, 1, 4, 1, 5], fdllm.SamplingParams(max_new_tokens=30, ignore_eos=True))
    rows = []  # the attention rows' query counts of every step
    forward = engine.runner.forward
    engine.runner.forward = lambda inputs: rows.extend(inputs.q_lens.tolist()) or forward(inputs)
    for _ in range(15):
        assert not engine.step()
    seq = engine.scheduler.running[0]
    tokens = seq.tokens
    assert len(tokens) >= 2 * B
    assert 4 in rows, "no sub-block cached step happened"  # a sub-block's 4 queries (blocks are 8)
    rec = _Recorder(block_causal_mask(len(tokens), B))
    with torch.no_grad():
        model.hidden(torch.tensor([tokens]), cache=rec)
    kv = engine.runner.cache
    for layer in range(model.config.num_hidden_layers):
        for j, page in enumerate(seq.pages[: len(tokens) // B]):
            torch.testing.assert_close(kv.k_LPSKH[layer, page], rec.k[layer][0, j * B : (j + 1) * B])
            torch.testing.assert_close(kv.v_LPSKH[layer, page], rec.v[layer][0, j * B : (j + 1) * B])
