"""Paged KV cache: one page holds one diffusion block (`block_size` tokens) for every layer.

A sequence owns a block table (its pages, in order); its token at position `pos` lives in slot
`pos % S` of page `pages[pos // S]`. Committed blocks (prompt blocks and decoded blocks) hold exact
K/V. The current, uncommitted block lives in the sequence's last page, which doubles as the
sub-block (DualCache) scratch of docs/method.md §3.3: a refresh step writes the whole block's K/V there,
a cached step overwrites only its sub-block's slots, and the commit forward rewrites the whole page
with exact K/V. So "committed prefix + current block" is always one paged range and every backend
only needs `fdllm.kernels.reference.paged_attention_torch`'s contract. Pages of committed blocks are
final, so sequences that start with the same blocks can share them (`PageAllocator`'s prefix cache).

A step's forward packs every scheduled sequence's tokens into one varlen row [1, T]. The tokens are
grouped into attention rows (a run of queries that see the first `kv_len` tokens of one block
table); `PagedAttention` is the `CachedAttention` the model calls per layer: it writes the new K/V
into their slots, then attends each row over its pages.

Shape legend: L layers, P pages, S page size (= block size), K kv heads, N query heads, H head dim,
T packed tokens of a step, R attention rows, Q longest row, M pages in the longest block table.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

AttentionFn = Callable[..., Tensor]  # fdllm.kernels.reference.paged_attention_torch's signature (fdllm.kernels picks one)


class OutOfPages(RuntimeError):
    """Running requests hold too much of the cache for this work now; it fits once some finish."""


class PageAllocator:
    """Pages of the KV cache: reservations for admission control, reference counts, and the prefix cache.

    Pages are taken out of reservations: the scheduler reserves what a sequence needs to start at
    its admission, and a page at a time as it reaches later blocks (`fdllm.engine.scheduler`), so a
    page promised to a sequence is never taken by another.

    Prefix caching (vLLM's automatic prefix caching, at block granularity): a page whose block holds
    final, exact K/V can be `register`ed under the block's `block_hash`. A sequence whose prompt starts
    with registered blocks shares their pages (`reserve(..., shared=...)`) instead of recomputing
    them; a page is held while any sequence holds it. Once none does, a registered page stays
    cached, counted as free: the next sequence that hits it takes it back, and a fresh allocation
    evicts the least recently released one when no page is free otherwise.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))  # held by no sequence, nothing cached
        self._idle: OrderedDict[int, bytes] = OrderedDict()  # cached pages held by no sequence, least recent first
        self._refs = [0] * num_pages  # sequences holding each page
        self._page_of: dict[bytes, int] = {}  # block hash -> its page (held or idle)
        self._hash_of: dict[int, bytes] = {}
        self._reserved = 0  # promised to admitted sequences, not yet allocated

    @property
    def num_free(self) -> int:
        """Pages no sequence holds (cached ones included: they are evicted when needed)."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache (held or not)."""
        return len(self._page_of)

    @property
    def num_unreserved(self) -> int:
        return self.num_free - self._reserved

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages of the longest run of leading blocks (by `block_hash`) that the prefix cache holds."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def reserve(self, n: int, shared: Sequence[int] = (), spare: int = 0) -> bool:
        """Promise `n` future pages and take hold of the cached pages `shared` (from `lookup`), all or
        nothing: False (nothing reserved or held) if they are not available with `spare` pages left
        unreserved after."""
        idle = len({page for page in shared if not self._refs[page]})  # taking these leaves fewer free
        if n + spare > self.num_unreserved - idle:
            return False
        for page in shared:
            if not self._refs[page]:
                del self._idle[page]
            self._refs[page] += 1
        self._reserved += n
        return True

    def allocate(self) -> int:
        """One page out of an earlier reservation (evicting the least recently used cached page if no
        page is free otherwise)."""
        if self._reserved < 1:
            raise RuntimeError("page allocation without a reservation")
        self._reserved -= 1
        page = self._take_free()
        self._refs[page] = 1
        return page

    def register(self, page: int, block_hash: bytes) -> None:
        """Cache a held page whose block's K/V are now final under `block_hash` (a no-op if the cache
        already has that block: two sequences prefilled the same prompt at once, the first one kept)."""
        if block_hash not in self._page_of and page not in self._hash_of:
            self._page_of[block_hash], self._hash_of[page] = page, block_hash

    def release(self, pages: Sequence[int], unused_reservation: int) -> None:
        """Give back a finished sequence's pages and the part of its reservation it never used.

        Its pages are released last block first, so of a cached prompt the tail is evicted before the
        head that more prompts share."""
        if unused_reservation > self._reserved:
            raise RuntimeError("releasing more reservation than was made")
        self._reserved -= unused_reservation
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            if page in self._hash_of:
                self._idle[page] = self._hash_of[page]
            else:
                self._free.append(page)

    @contextmanager
    def borrow(self, n: int) -> Iterator[list[int]]:
        """`n` free pages for work done between two steps (`Engine.score`), back in the free list after
        (cached pages among them are evicted).

        Reservations are left alone: a reserved page stays free until its sequence takes it in a step,
        so pages returned before the next step are taken from no one. OutOfPages when fewer are free."""
        if n > self.num_free:
            raise OutOfPages(f"{n} KV pages needed, {self.num_free} free")
        pages = [self._take_free() for _ in range(n)]
        try:
            yield pages
        finally:
            self._free.extendleft(reversed(pages))

    def _take_free(self) -> int:
        if self._free:
            return self._free.popleft()
        page, block_hash = self._idle.popitem(last=False)
        del self._page_of[block_hash], self._hash_of[page]
        return page


def block_hashes(token_ids: Sequence[int], page_size: int, causal: bool, num_blocks: int,
                 known: Sequence[bytes] = (), salt: str | None = None) -> list[bytes]:
    """`block_hash` of the first `num_blocks` whole blocks of a token sequence, in order; `known`: those
    of its first blocks already computed. `salt` (a request's `cache_salt`) is mixed into the first
    block's key, hence every later one's: blocks are shared only between sequences of the same salt."""
    hashes = list(known)
    for j in range(len(hashes), num_blocks):
        parent = hashes[-1] if hashes else None if salt is None else _salted_root(causal, salt)
        hashes.append(block_hash(parent, token_ids[j * page_size : (j + 1) * page_size], causal))
    return hashes


def block_hash(parent: bytes | None, token_ids: Sequence[int], causal: bool) -> bytes:
    """The prefix cache's key of a block: its tokens, every token before it (through `parent`, the
    previous block's hash; None for the first block) and how its K/V were computed (`causal`: a
    causal row, as AR prefill and a causal-prefix checkpoint's clean stream attend; else the block
    attends itself bidirectionally). A 128-bit BLAKE2b digest: one user's prompt cannot be made to
    collide with another's cached blocks, as a 64-bit Python hash could be."""
    h = hashlib.blake2b(parent if parent is not None else _ROOTS[causal], digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


_ROOTS = {causal: hashlib.blake2b(name, digest_size=16).digest() for causal, name in ((True, b"causal"), (False, b"block"))}


def _salted_root(causal: bool, salt: str) -> bytes:
    """The parent of a salted sequence's first block: no unsalted block, nor one of another salt, has it."""
    return hashlib.blake2b(_ROOTS[causal] + salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class KVCache:
    """Preallocated K/V pools [L, P + 1, S, K, H], one page per block of every layer.

    The extra last page is scratch that no sequence owns: padded tokens of a static (bucketed or
    graph-captured) step write their K/V there, and nothing ever reads it.
    """

    def __init__(
        self, num_layers: int, num_pages: int, page_size: int, n_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str, fused_writes: bool = False,
    ) -> None:
        """`fused_writes`: a layer's K and V written by one Triton kernel (`fdllm.kernels.fused_ops.store_kv`:
        CUDA, or the Triton interpreter), not two `index_copy_`s; the engine's fused (Triton) path."""
        shape = (num_layers, num_pages + 1, page_size, n_kv_heads, head_dim)
        self.k_LPSKH = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LPSKH = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size, self.fused_writes = page_size, fused_writes

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
        k_cache, v_cache = self.k_LPSKH[layer].view(P * S, K, H), self.v_LPSKH[layer].view(P * S, K, H)
        if self.fused_writes:
            from fdllm.kernels.fused_ops import store_kv

            store_kv(k_cache, v_cache, slots_T, k_TKH, v_TKH)
        else:
            k_cache.index_copy_(0, slots_T, k_TKH)
            v_cache.index_copy_(0, slots_T, v_TKH)

    def write_rotated(self, layer: int, slots_T: Tensor, qkv_TnH: Tensor, cos_TH: Tensor, sin_TH: Tensor,
                      n_q: int) -> Tensor:
        """From a stacked q/k/v projection not yet rotated: k rotated and v stored at `slots_T`, q rotated
        returned [T, n_q, H], in one Triton launch (`fdllm.kernels.fused_ops.rope_store_kv`; the fused forward)."""
        from fdllm.kernels.fused_ops import rope_store_kv

        _, P, S, K, H = self.k_LPSKH.shape
        return rope_store_kv(qkv_TnH, cos_TH, sin_TH, n_q, self.k_LPSKH[layer].view(P * S, K, H),
                             self.v_LPSKH[layer].view(P * S, K, H), slots_T)


class AttentionRow(NamedTuple):
    """A run of `q_len` consecutive packed queries that all see the first `kv_len` tokens of `pages`
    (`causal`: query t sees only up to position kv_len - q_len + t, as in AR prefill). A named tuple:
    every sequence makes one or two per step, on the host's critical path."""

    q_len: int
    kv_len: int
    pages: Sequence[int]
    causal: bool = False


SHORT_ROW = 64  # queries: rows up to this long share one padded call whatever their lengths


def _group_key(row: AttentionRow, exact_causal: bool) -> tuple[bool, int]:
    """Which backend call a row joins: rows of one causal flag and of lengths within a factor of two
    (all rows up to SHORT_ROW together), so padding at most doubles a call's queries. Padding to the
    step's longest row instead would pad every decode row beside a long prefill chunk to that chunk's
    length (128 rows x 4096 queries for 4k real tokens: gigabytes of split-KV partials per layer).
    `exact_causal`: causal rows only with rows of their own length (flash-attn aligns a causal row's
    queries to the end of the padded length, so it cannot pad them)."""
    if row.causal and exact_causal:
        return True, row.q_len
    return row.causal, 0 if row.q_len <= SHORT_ROW else (row.q_len - 1).bit_length()


def page_table(pages: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """[R, width] int64: row r holds `pages[r]`, then -1 (width: the longest row's, by default)."""
    columns = list(itertools.zip_longest(*pages, fillvalue=-1))  # [pages of the longest row][R]
    if width is None or len(columns) == width:
        return np.array(columns, dtype=np.int64).reshape(len(columns), len(pages)).T
    table = np.full((len(pages), width), -1, dtype=np.int64)
    if columns:
        table[:, : len(columns)] = np.array(columns, dtype=np.int64).T
    return table


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(array).to(device, non_blocking=True)


@dataclass(frozen=True)
class _RowGroup:
    """Rows of one backend call (`_group_key`), in the padded layout it takes."""

    causal: bool
    gather_RQ: Tensor  # packed token index of each padded query (padding -> any valid token)
    tokens_G: Tensor  # packed token indices of the group's real queries, row-major
    real_G: Tensor  # flat padded index (r * Q + t) of each real query, row-major
    block_tables_RM: Tensor  # int32, -1 past a row's last page
    kv_lens_R: Tensor  # int32
    q_lens_R: Tensor  # int32


class _CacheWriteThenAttend:
    """A step's `CachedAttention`: each layer writes the step's K/V to `slots_T` in the cache, then
    attends (`attend`, the layout's own) over the pages. `rotate_and_attend` is the fused forward's way
    in: RoPE and the K/V write of a stacked q/k/v projection as one kernel (the model uses it where a
    cache offers it)."""

    cache: KVCache
    slots_T: Tensor

    def __call__(self, layer: int, q_BTNH: Tensor, k_BTKH: Tensor, v_BTKH: Tensor) -> Tensor:
        """Packed q/k/v [1, T, n, H] -> o [1, T, N, H]."""
        self.cache.write(layer, self.slots_T, k_BTKH[0], v_BTKH[0])
        return self.attend(layer, q_BTNH)

    def rotate_and_attend(self, layer: int, qkv_BTnH: Tensor, cos_BTH: Tensor, sin_BTH: Tensor, n_q: int) -> Tensor:
        """`__call__` of the packed stacked projection [1, T, n_q + 2K, H] before RoPE (cos/sin [1, T, H])."""
        q_TNH = self.cache.write_rotated(layer, self.slots_T, qkv_BTnH[0], cos_BTH[0], sin_BTH[0], n_q)
        return self.attend(layer, q_TNH[None])

    def attend(self, layer: int, q_BTNH: Tensor) -> Tensor:
        raise NotImplementedError


class PagedAttention(_CacheWriteThenAttend):
    """`CachedAttention` of one packed forward: writes K/V to `slots_T`, attends every row over its pages.

    Built once per step on the host (`build`), copied to the device once.
    """

    def __init__(self, cache: KVCache, slots_T: Tensor, groups: list[_RowGroup], backend: AttentionFn) -> None:
        self.cache, self.slots_T, self.groups, self.backend = cache, slots_T, groups, backend

    @classmethod
    def build(
        cls, cache: KVCache, slots: Sequence[int] | np.ndarray, rows: Sequence[AttentionRow], backend: AttentionFn,
        exact_causal: bool = False,
    ) -> PagedAttention:
        """`slots[t]`: flat cache slot of packed token t; `rows` cover the packed tokens in order.
        `exact_causal`: the backend cannot pad causal rows (`_group_key`). Array code throughout: a
        prefill step packs thousands of tokens, and per-token Python here cost milliseconds a step."""
        q_lens_R = np.fromiter((r.q_len for r in rows), dtype=np.int64, count=len(rows))
        if q_lens_R.sum() != len(slots):
            raise ValueError(f"attention rows cover {q_lens_R.sum()} tokens, the step packs {len(slots)}")
        starts_R = np.cumsum(q_lens_R) - q_lens_R
        members: dict[tuple[bool, int], list[int]] = {}
        for i, r in enumerate(rows):
            members.setdefault(_group_key(r, exact_causal), []).append(i)
        device = cache.k_LPSKH.device
        groups = [cls._group(key[0], [rows[i] for i in idx], q_lens_R[idx], starts_R[idx], device)
                  for key, idx in sorted(members.items())]
        return cls(cache, _to_device(np.asarray(slots, dtype=np.int64), device), groups, backend)

    @staticmethod
    def _group(causal: bool, rows: list[AttentionRow], q_lens_R: np.ndarray, starts_R: np.ndarray,
               device: torch.device) -> _RowGroup:
        t_Q = np.arange(q_lens_R.max())
        gather_RQ = starts_R[:, None] + np.minimum(t_Q, q_lens_R[:, None] - 1)  # padding repeats the row's last query
        real_G = np.flatnonzero(t_Q < q_lens_R[:, None])
        return _RowGroup(
            causal=causal,
            gather_RQ=_to_device(gather_RQ, device),
            tokens_G=_to_device(gather_RQ.ravel()[real_G], device),
            real_G=_to_device(real_G, device),
            block_tables_RM=_to_device(page_table([r.pages for r in rows]).astype(np.int32), device),
            kv_lens_R=_to_device(np.fromiter((r.kv_len for r in rows), dtype=np.int32, count=len(rows)), device),
            q_lens_R=_to_device(q_lens_R.astype(np.int32), device),
        )

    def attend(self, layer: int, q_BTNH: Tensor) -> Tensor:
        """Packed q [1, T, N, H] (this step's K/V already in the cache) -> o [1, T, N, H]."""
        q_TNH = q_BTNH[0]
        o_TNH = torch.empty_like(q_TNH)
        k_pool, v_pool = self.cache.k_LPSKH[layer], self.cache.v_LPSKH[layer]
        for g in self.groups:
            o_RQNH = self.backend(
                q_TNH[g.gather_RQ], k_pool, v_pool, g.block_tables_RM, g.kv_lens_R, g.q_lens_R, causal=g.causal
            )
            o_TNH[g.tokens_G] = o_RQNH.flatten(0, 1)[g.real_G]  # index, not a bool mask: no host sync
        return o_TNH[None]


class StaticPagedAttention(_CacheWriteThenAttend):
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

    def attend(self, layer: int, q_BTNH: Tensor) -> Tensor:
        """Packed q [1, Bb * Q, N, H] (this step's K/V already in the cache) -> o [1, Bb * Q, N, H]."""
        _, T, N, H = q_BTNH.shape
        Bb = self.kv_lens_B.shape[0]
        o_BQNH = self.backend(
            q_BTNH.view(Bb, T // Bb, N, H), self.cache.k_LPSKH[layer], self.cache.v_LPSKH[layer],
            self.block_tables_BM, self.kv_lens_B, self.q_lens_B, causal=self.causal,
        )
        # reshape, not view: a backend may return any layout (SDPA's CUDA kernels give a transposed [B, N, Q, H])
        return o_BQNH.reshape(1, T, N, H)


def kv_budget_pages(page_bytes: int, memory_fraction: float, device: torch.device, peak_bytes: int) -> int:
    """KV pages that fit in `memory_fraction` of the CUDA device's memory (vLLM's gpu_memory_utilization).

    `peak_bytes`: the weights and what steps need beside the cache (`fdllm.engine.runner.StepMemory`:
    activations, the CUDA graphs' pool, attention workspace). Memory other processes hold on the
    device is subtracted too.
    """
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # other processes, CUDA context
    budget = memory_fraction * total - peak_bytes - max(others, 0)
    if budget < page_bytes:
        raise ValueError(
            f"no room for the KV cache: {memory_fraction:.0%} of {total / 2**30:.1f} GiB minus {peak_bytes / 2**30:.2f} "
            f"GiB for the weights and the steps (activations, graphs, workspace) and {max(others, 0) / 2**30:.2f} GiB held "
            f"elsewhere leaves {budget / 2**30:.2f} GiB; raise gpu_memory_utilization or set num_pages / kv_cache_gib"
        )
    return int(budget // page_bytes)
