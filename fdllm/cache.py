"""Paged KV cache: one page holds one diffusion block (`block_size` tokens) for every layer.

A sequence owns a block table (its pages, in order); its token at position `pos` lives in slot
`pos % S` of page `pages[pos // S]`. Committed blocks (prompt blocks and decoded blocks) hold exact
K/V. The current, uncommitted block lives in the sequence's last page, which doubles as the
sub-block (DualCache) scratch of METHOD.md §3.3: a refresh step writes the whole block's K/V there,
a cached step overwrites only its sub-block's slots, and the commit forward rewrites the whole page
with exact K/V. So "committed prefix + current block" is always one paged range and every backend
only needs `fdllm.kernels.reference.paged_attention_torch`'s contract.

A step's forward packs every scheduled sequence's tokens into one varlen row [1, T]. The tokens are
grouped into attention rows (a run of queries that see the first `kv_len` tokens of one block
table); `PagedAttention` is the `CachedAttention` the model calls per layer: it writes the new K/V
into their slots, then attends each row over its pages.

Shape legend: L layers, P pages, S page size (= block size), K kv heads, N query heads, H head dim,
T packed tokens of a step, R attention rows, Q longest row, M pages in the longest block table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

AttentionFn = Callable[..., Tensor]  # fdllm.kernels.reference.paged_attention_torch's signature (fdllm.kernels picks one)


class OutOfPages(RuntimeError):
    """Running requests hold too much of the cache for this work now; it fits once some finish."""


class PageAllocator:
    """Free list of page ids, with reservations for admission control.

    A sequence is admitted only if its worst-case page count can be reserved; pages are then taken
    from that reservation as the sequence reaches them (prefill, block commit), so a running
    sequence never waits for a page and nothing ever needs preempting.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._reserved = 0  # promised to admitted sequences, not yet allocated

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_unreserved(self) -> int:
        return len(self._free) - self._reserved

    def reserve(self, n: int) -> bool:
        """Promise `n` future pages; False (nothing reserved) if they are not available."""
        if n > self.num_unreserved:
            return False
        self._reserved += n
        return True

    def allocate(self) -> int:
        """One page out of an earlier reservation."""
        if self._reserved < 1:
            raise RuntimeError("page allocation without a reservation")
        self._reserved -= 1
        return self._free.popleft()

    def release(self, pages: Sequence[int], unused_reservation: int) -> None:
        """Give back a finished sequence's pages and the part of its reservation it never used."""
        if unused_reservation > self._reserved:
            raise RuntimeError("releasing more reservation than was made")
        self._reserved -= unused_reservation
        self._free.extend(pages)

    @contextmanager
    def borrow(self, n: int) -> Iterator[list[int]]:
        """`n` free pages for work done between two steps (`Engine.score`), back in the free list after.

        Reservations are left alone: a reserved page stays free until its sequence takes it in a step,
        so pages returned before the next step are taken from no one. OutOfPages when fewer are free."""
        if n > len(self._free):
            raise OutOfPages(f"{n} KV pages needed, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        try:
            yield pages
        finally:
            self._free.extendleft(reversed(pages))


class KVCache:
    """Preallocated K/V pools [L, P + 1, S, K, H], one page per block of every layer.

    The extra last page is scratch that no sequence owns: padded tokens of a static (bucketed or
    graph-captured) step write their K/V there, and nothing ever reads it.
    """

    def __init__(
        self, num_layers: int, num_pages: int, page_size: int, n_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_pages + 1, page_size, n_kv_heads, head_dim)
        self.k_LPSKH = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LPSKH = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one page (K and V, all layers)."""
        return 2 * num_layers * page_size * n_kv_heads * head_dim * dtype.itemsize

    @property
    def num_pages(self) -> int:
        """Pages sequences may own (the scratch page not included)."""
        return self.k_LPSKH.shape[1] - 1

    @property
    def scratch_slot(self) -> int:
        """A flat slot of the scratch page: where padded tokens write their K/V."""
        return self.num_pages * self.page_size

    def write(self, layer: int, slots_T: Tensor, k_TKH: Tensor, v_TKH: Tensor) -> None:
        """Store K/V of T tokens at flat slots (page * S + offset)."""
        _, P, S, K, H = self.k_LPSKH.shape
        self.k_LPSKH[layer].view(P * S, K, H).index_copy_(0, slots_T, k_TKH)
        self.v_LPSKH[layer].view(P * S, K, H).index_copy_(0, slots_T, v_TKH)


class AttentionRow(NamedTuple):
    """A run of `q_len` consecutive packed queries that all see the first `kv_len` tokens of `pages`
    (`causal`: query t sees only up to position kv_len - q_len + t, as in AR prefill). A named tuple:
    every sequence makes one or two per step, on the host's critical path."""

    q_len: int
    kv_len: int
    pages: Sequence[int]
    causal: bool = False


@dataclass(frozen=True)
class _RowGroup:
    """Rows sharing the causal flag, in the padded layout one backend call takes."""

    causal: bool
    gather_RQ: Tensor  # packed token index of each padded query (padding -> any valid token)
    tokens_G: Tensor  # packed token indices of the group's real queries, row-major
    real_G: Tensor  # flat padded index (r * Q + t) of each real query, row-major
    block_tables_RM: Tensor  # int32, -1 past a row's last page
    kv_lens_R: Tensor  # int32
    q_lens_R: Tensor  # int32


class PagedAttention:
    """`CachedAttention` of one packed forward: writes K/V to `slots_T`, attends every row over its pages.

    Built once per step on the host (`build`), copied to the device once.
    """

    def __init__(self, cache: KVCache, slots_T: Tensor, groups: list[_RowGroup], backend: AttentionFn) -> None:
        self.cache, self.slots_T, self.groups, self.backend = cache, slots_T, groups, backend

    @classmethod
    def build(
        cls, cache: KVCache, slots: Sequence[int], rows: Sequence[AttentionRow], backend: AttentionFn
    ) -> PagedAttention:
        """`slots[t]`: flat cache slot of packed token t; `rows` cover the packed tokens in order."""
        if sum(r.q_len for r in rows) != len(slots):
            raise ValueError(f"attention rows cover {sum(r.q_len for r in rows)} tokens, the step packs {len(slots)}")
        device = cache.k_LPSKH.device
        starts, offset = [], 0
        for r in rows:
            starts.append(offset)
            offset += r.q_len
        groups = []
        for causal in (False, True):
            idx = [i for i, r in enumerate(rows) if r.causal == causal]
            if idx:
                groups.append(cls._group(causal, [rows[i] for i in idx], [starts[i] for i in idx], device))
        slots_T = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        return cls(cache, slots_T, groups, backend)

    @staticmethod
    def _group(causal: bool, rows: list[AttentionRow], starts: list[int], device: torch.device) -> _RowGroup:
        Q = max(r.q_len for r in rows)
        M = max(len(r.pages) for r in rows)
        gather = [[s + min(t, r.q_len - 1) for t in range(Q)] for r, s in zip(rows, starts)]
        real = [i * Q + t for i, r in enumerate(rows) for t in range(r.q_len)]
        tokens = [s + t for r, s in zip(rows, starts) for t in range(r.q_len)]
        tables = [list(r.pages) + [-1] * (M - len(r.pages)) for r in rows]
        to = {"device": device, "non_blocking": True}
        return _RowGroup(
            causal=causal,
            gather_RQ=torch.tensor(gather, dtype=torch.long).to(**to),
            tokens_G=torch.tensor(tokens, dtype=torch.long).to(**to),
            real_G=torch.tensor(real, dtype=torch.long).to(**to),
            block_tables_RM=torch.tensor(tables, dtype=torch.int32).to(**to),
            kv_lens_R=torch.tensor([r.kv_len for r in rows], dtype=torch.int32).to(**to),
            q_lens_R=torch.tensor([r.q_len for r in rows], dtype=torch.int32).to(**to),
        )

    def __call__(self, layer: int, q_BTNH: Tensor, k_BTKH: Tensor, v_BTKH: Tensor) -> Tensor:
        """Packed q/k/v [1, T, n, H] -> o [1, T, N, H]."""
        self.cache.write(layer, self.slots_T, k_BTKH[0], v_BTKH[0])
        q_TNH = q_BTNH[0]
        o_TNH = torch.empty_like(q_TNH)
        k_pool, v_pool = self.cache.k_LPSKH[layer], self.cache.v_LPSKH[layer]
        for g in self.groups:
            o_RQNH = self.backend(
                q_TNH[g.gather_RQ], k_pool, v_pool, g.block_tables_RM, g.kv_lens_R, g.q_lens_R, causal=g.causal
            )
            o_TNH[g.tokens_G] = o_RQNH.flatten(0, 1)[g.real_G]  # index, not a bool mask: no host sync
        return o_TNH[None]


class StaticPagedAttention:
    """`CachedAttention` of a static step: Bb entries (attention rows) of Q padded query tokens each.

    Every tensor is a fixed-shape device view, so a CUDA graph can capture this call and later
    steps refill the same buffers. q/k/v arrive packed as [1, Bb * Q, n, H]; padded tokens write to
    the scratch slot and come back as zeros (q_lens), padded entries have kv_len = q_len = 0.
    `causal_B`: per-entry causal flags (None: every entry bidirectional).
    """

    def __init__(self, cache: KVCache, slots_T: Tensor, block_tables_BM: Tensor, kv_lens_B: Tensor,
                 q_lens_B: Tensor, backend: AttentionFn, causal_B: Tensor | None = None) -> None:
        self.cache, self.slots_T, self.backend = cache, slots_T, backend
        self.block_tables_BM, self.kv_lens_B, self.q_lens_B = block_tables_BM, kv_lens_B, q_lens_B
        self.causal = False if causal_B is None else causal_B

    def __call__(self, layer: int, q_BTNH: Tensor, k_BTKH: Tensor, v_BTKH: Tensor) -> Tensor:
        """Packed q/k/v [1, Bb * Q, n, H] -> o [1, Bb * Q, N, H]."""
        self.cache.write(layer, self.slots_T, k_BTKH[0], v_BTKH[0])
        _, T, N, H = q_BTNH.shape
        Bb = self.kv_lens_B.shape[0]
        o_BQNH = self.backend(
            q_BTNH.view(Bb, T // Bb, N, H), self.cache.k_LPSKH[layer], self.cache.v_LPSKH[layer],
            self.block_tables_BM, self.kv_lens_B, self.q_lens_B, causal=self.causal,
        )
        return o_BQNH.view(1, T, N, H)


def kv_budget_pages(page_bytes: int, memory_fraction: float, device: torch.device, peak_bytes: int) -> int:
    """KV pages that fit in `memory_fraction` of the CUDA device's memory (vLLM's gpu_memory_utilization).

    `peak_bytes`: torch's peak allocation after the weights are loaded and one profiling forward of
    the largest step ran (activations). Memory other processes hold on the device is subtracted too.
    """
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # other processes, CUDA context
    budget = memory_fraction * total - peak_bytes - max(others, 0)
    if budget < page_bytes:
        raise ValueError(
            f"no room for the KV cache: {memory_fraction:.0%} of {total / 2**30:.1f} GiB minus {peak_bytes / 2**30:.2f} "
            f"GiB for weights and activations and {max(others, 0) / 2**30:.2f} GiB held elsewhere leaves "
            f"{budget / 2**30:.2f} GiB; raise gpu_memory_utilization or set num_pages / kv_cache_gib"
        )
    return int(budget // page_bytes)
