"""The model runner: the only part of the engine that touches tensors.

A step runs in one of two layouts:
- static (every work is a decode work: no prompt tokens): entries of Q query tokens, padded to a
  batch bucket Bb. Each attention row (1 token for AR, the sub-block for cached steps, the block
  for refresh and commit steps, up to the block + 1 for speculative drafts and verifies; a work
  with a lookahead has two rows) fills ceil(len / Q) entries: a row cut into chunks attends exactly
  as it did whole, since every token's K/V is written before any entry attends and a chunk keeps
  the row's kv_len and query positions (`cut_rows`). Q is chosen per step to pad the
  fewest tokens (`chunk_len`): a commit beside sub-block steps no longer pads every entry to the
  block. Q is a row length of the step, a power of two when graphs are captured (so speculative
  drafts of any length share a few graphs); `EngineConfig(deterministic=True)` fixes it instead.
  Causal rows (a speculative verify, a causal-prefix checkpoint's commit) carry a per-entry flag,
  so they run in the same layout and graphs (a step without any keeps the flag-free attention; the
  flash_attn backend, which has no per-entry flag, runs them dynamic). A step holds at most
  ENTRIES_PER_SEQ x max_num_seqs entries and max_num_seqs x (its longest row) tokens, so no static
  step outgrows what a full batch of unsplit rows would pad to; one that fits no Q runs dynamic.
  Padded tokens write their K/V to the cache's scratch slot, padded entries see nothing. On CUDA this body
  (embedding -> layers -> norm) replays a CUDA graph captured per `StaticShape` (`fdllm.engine.graphs`);
  elsewhere, or with `EngineConfig(enforce_eager=True)`, the same layout runs eagerly, which is
  what the CPU tests hold against the dynamic layout token for token.
- dynamic (prefill chunks, AR prompts): one packed varlen forward [1, T] with per-row attention
  over the paged cache (`fdllm.cache.PagedAttention`).

Either way the step's works (and its array batches, `fdllm.engine.array_batch`: the plain sub-block
steps, block commits and AR steps planned as arrays) arrive as flat host arrays
(`fdllm.engine.inputs.StepInputs`), and the host lays them out with a fixed handful of numpy
operations into ONE int64 buffer (pinned on CUDA: body inputs, which hidden rows are still masked
candidates, per-row sampling parameters), copied to the device once,
non-blocking; the LM head and confidence run only on candidate rows (never on decoded, padding or
prompt rows); sampling is vectorised over requests with counter-based per-request draws
(`fdllm.decoding.counter_uniform`); the entropy H_i is computed only for the candidate rows of
requests whose selection policy needs it (entropy budget); the candidates' tokens, probabilities (and
entropies) come back in one device-to-host transfer, and the selection policy runs on the host (a
few comparisons per sequence, cheaper than the kernels it would take on the device).

Shape legend: T packed tokens, N fed tokens, R attention rows, Bb bucketed entries (row chunks) of
which E in use (the static layout; in the head E counts entropy rows, C ⊇ E), Q query tokens per
entry, M pages per block table, C candidate rows, S sampled rows (C ⊇ S), D model dim, V vocab.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fdllm.cache import AttentionRow, KVCache, PagedAttention, StaticPagedAttention
from fdllm.decoding import counter_uniform, sample_confidence, token_entropy
from fdllm.engine.adjustments import ChunkAdjustments, adjust_logits
from fdllm.engine.array_batch import ArrayBatch
from fdllm.engine.inputs import NO_ROWS, NO_SAMPLED, BiasedRows, StepInputs, cache_slots
from fdllm.engine.sequence import Predictions, Work
from fdllm.kernels import select_attention_backend
from fdllm.kernels.reference import greedy_confidence
from fdllm.model import Transformer


def query_bucket(q_len: int) -> int:
    """Padded query tokens per work of a captured step: the next power of two, so speculative
    drafts (any length up to the block + 1) and AR/sub-block/block steps share a handful of graphs
    per batch bucket instead of one per draft length. Lengths already a power of two (AR 1,
    sub-blocks, blocks) pad nothing."""
    return 1 << (q_len - 1).bit_length()


def static_step_tokens(max_num_seqs: int, max_row_len: int) -> int:
    """Tokens a static step holds at most: max_num_seqs rows of the longest a step may run (speculative
    verifies: the block + 1), padded to a query bucket; at least two such rows, so a lone request's
    lookahead step (a verify or commit, and the next block's row) fits at max_num_seqs 1 too. What KV
    sizing leaves the steps' activations room for (`StepMemory`) and the engine's start-up capture holds
    (`ModelRunner.capture_largest`). Steps past it run eagerly (~10x a captured step on a GPU)."""
    return max(max_num_seqs, 2) * query_bucket(max_row_len)


def lookahead_batch_limit(max_num_seqs: int, block_size: int) -> int:
    """Running requests whose speculative verifies (the block + 1) and lookahead rows (the next block) a
    static step holds: two rows each, so half as many as `static_step_tokens` has verifies for."""
    return max(1, static_step_tokens(max_num_seqs, block_size + 1) // (2 * query_bucket(block_size + 1)))


def chunk_len(lengths: list[int], buckets: list[int], bucket_len, max_tokens: int) -> int | None:
    """Entry length Q of a static step whose attention rows have `lengths`: of the candidates, the
    one that pads the fewest tokens, bucket(entries) x Q, with entries = sum(ceil(len / Q)) at most
    the largest bucket and at most `max_tokens` tokens; ties go to the longer Q. None: no Q fits.

    Candidates are the lengths (through `bucket_len`) of the step's multi-token rows, never shorter:
    each entry reads its row's whole cache, so a chunk should not be shorter than the denoising
    steps the step already runs (an AR row of 1 pads to Q rather than cut a block into 1-token entries)."""
    best, best_tokens = None, None
    for q in sorted({bucket_len(n) for n in lengths if n > 1} or {1}):
        entries = num_entries(lengths, q)
        if entries > buckets[-1]:
            continue
        tokens = buckets[bisect.bisect_left(buckets, entries)] * q
        if tokens <= max_tokens and (best_tokens is None or tokens <= best_tokens):
            best, best_tokens = q, tokens
    return best


def num_entries(lengths: list[int], q_len: int) -> int:
    """Entries of `q_len` tokens that rows of `lengths` fill when cut (`cut_rows`)."""
    return sum(-(-n // q_len) for n in lengths)


def cut_rows(q_lens_R: np.ndarray, causal_R: np.ndarray, q_len: int) -> tuple[np.ndarray, ...]:
    """Rows of `q_lens_R` queries cut into entries of at most `q_len`, in order: per entry E, its row,
    its first query in the row, the queries it holds, and its q_len for the attention backends.

    Every chunk keeps its row's pages, causality and kv_len, so it sees the keys the whole row saw,
    split the same way (batch invariance). A causal chunk's backend q_len is the row's queries from
    the chunk on (more than the entry holds but the last): the backends place its query t at
    kv_len - q_len + t, where it sat in the whole row."""
    n_R = (q_lens_R + q_len - 1) // q_len  # entries per row
    E = int(n_R.sum())
    row_E = np.repeat(np.arange(len(q_lens_R)), n_R)
    first_E = (np.arange(E) - (np.cumsum(n_R) - n_R)[row_E]) * q_len
    left_E = q_lens_R[row_E] - first_E
    held_E = np.minimum(left_E, q_len)
    return row_E, first_E, held_E, np.where(causal_R[row_E], left_E, held_E)


# Entries a static step may hold per sequence (max_num_seqs of them): a block of 32 cut into its
# 4 sub-blocks of 8 (the recipe's geometry) for every sequence of a full batch. Each entry reads its
# row's whole cache, so cutting trades GEMM tokens for cache reads; 4 bounds that trade.
ENTRIES_PER_SEQ = 4


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes of static steps: 1, 2, 4, 8, then multiples of 16, and max_num_seqs itself."""
    buckets = {b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16)) | {max_num_seqs}
    return sorted(buckets)


class HostStage:
    """One int64 staging buffer per step: filled on the host in named sections, copied once.

    On CUDA the host side is pinned and the copy non-blocking; an event guards the host buffer
    against being rewritten while the previous step's copy may still be in flight.
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 14) -> None:
        self.device, self.sections, self.size = device, {}, 0
        self._pin = device.type == "cuda"
        self._copied: torch.cuda.Event | None = None
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=self._pin)
        self.host_np = self.host.numpy()
        self.dev = self.host if self.device.type == "cpu" else torch.empty(capacity, dtype=torch.int64,
                                                                            device=self.device)

    def begin(self, sizes: dict[str, int]) -> None:
        """Lay out the named sections (in order) for this step; grows the buffers when needed."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of `host` has finished
        self.sections, offset = {}, 0
        for name, n in sizes.items():
            self.sections[name] = (offset, n)
            offset += n
        self.size = offset
        if offset > self.host.numel():
            self._alloc(max(offset, 2 * self.host.numel()))

    def section(self, name: str, dtype=np.int64) -> np.ndarray:
        """The host side of a section, to write in place (int64, or the same bytes as float64)."""
        start, n = self.sections[name]
        target = self.host_np[start : start + n]
        return target.view(np.float64) if dtype is np.float64 else target

    def put(self, name: str, values, dtype=np.int64) -> None:
        self.section(name, dtype)[:] = values

    def copy(self) -> None:
        """The step's one host-to-device transfer."""
        if self.device.type == "cpu":
            return
        self.dev[: self.size].copy_(self.host[: self.size], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()

    def get(self, name: str, dtype: torch.dtype = torch.int64) -> Tensor:
        start, n = self.sections[name]
        t = self.dev[start : start + n]
        return t.view(torch.float64).to(dtype) if dtype.is_floating_point else t


class ScoreRow(NamedTuple):
    """A chunk of a sequence being scored: its tokens [n] from position `start`, the sequence's pages,
    and the token after each one (its target) [n]."""

    ids: np.ndarray
    start: int
    pages: list[int]
    targets: np.ndarray


@dataclass(frozen=True)
class StaticShape:
    """The padded layout of a static step: Bb entries (attention row chunks) of Q tokens, block
    tables of width M, and whether some entry is causal (then a flag per entry)."""

    batch: int
    q_len: int
    pages: int
    causal: bool = False


class ModelRunner:
    def __init__(
        self, model: Transformer, cache: KVCache, mask_token_id: int | None, attention_backend: str, *,
        max_row_len: int, max_num_seqs: int = 64, max_pages_per_seq: int | None = None, use_cuda_graphs: bool = False,
        fixed_query_len: int | None = None, fuse_kernels: bool = True,
    ) -> None:
        """`attention_backend`: a name `fdllm.kernels.select_attention_backend` takes (the engine resolves "auto").

        `max_pages_per_seq`: block-table width of captured graphs. `fixed_query_len`: every static
        step runs at batch max_num_seqs with entries of this many tokens (EngineConfig.deterministic:
        GEMM shapes never change). `fuse_kernels`: with the Triton backend, the fused forward
        (`Transformer.hidden(fused=True)`). `max_row_len`: the longest attention row a decode step may run
        (the engine's block + 1: a speculative verify), which bounds a static step's tokens.
        """
        self.model, self.cache, self.mask_token_id = model, cache, mask_token_id
        self.device = model.device
        self.attention_fn = select_attention_backend(attention_backend, self.device)
        self.fused_confidence = None
        self.max_head_rows = head_chunk_rows(model.lm_head.weight.shape[0])
        # fp32 holds every token id below 2**24 exactly (Qwen2's 152k vocabulary, Llama-3's 128k): the
        # step's results then come back as one fp32 stack, no cast of the tokens first
        self.ids_fit_fp32 = model.lm_head.weight.shape[0] <= 2**24
        # The mask token is never a prediction: its logit is held at -inf by a bias folded into the LM
        # head's GEMM (Qwen2/Llama heads have none), instead of a copy and a fill of every logit row.
        self.mask_bias_V = None
        if mask_token_id is not None:
            weight = model.lm_head.weight
            self.mask_bias_V = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            self.mask_bias_V[mask_token_id] = float("-inf")
        # with Triton's attention, its norm and RoPE kernels too (fdllm.kernels.fused_ops: ~24 fewer launches
        # per layer, what a batch-1 step on a GPU is mostly made of), and q/k/v and gate/up as one GEMM each
        # where the engine stacked them (`Transformer.fuse_projections`)
        self.fused_ops = fuse_kernels and attention_backend == "triton"
        if attention_backend == "triton":
            from fdllm.kernels.confidence import fused_confidence

            self.fused_confidence = fused_confidence
        self.max_num_seqs, self.fixed_query_len = max_num_seqs, fixed_query_len
        self.max_row_len = fixed_query_len or max_row_len
        self.static_tokens = static_step_tokens(max_num_seqs, self.max_row_len)
        self.buckets = [max_num_seqs] if fixed_query_len else batch_buckets(ENTRIES_PER_SEQ * max_num_seqs)
        self.causal_entries = attention_backend != "flash_attn"  # per-entry causal flags (see the module doc)
        self.max_pages_per_seq = max_pages_per_seq
        self.stage = HostStage(self.device)
        self._static_views: dict[StaticShape, tuple[Tensor, StaticInputs]] = {}
        self.graphs = None
        self.bucket_query_len = use_cuda_graphs  # eager steps pad only to their longest work
        if use_cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
            if max_pages_per_seq is None:
                raise ValueError("CUDA graphs need max_pages_per_seq (the captured block-table width)")
            from fdllm.engine.graphs import GraphPool

            self.graphs = GraphPool(model, cache, self.attention_fn, self.fused_ops)

    # -- the step -----------------------------------------------------------------------------------
    def run(self, works: list[Work], batches: Seq[ArrayBatch] = ()) -> list[Predictions]:
        """Per work: the predictions of its logit rows (none for pure prefill chunks). The `batches`'
        steps run in the same forward; each one's candidates' tokens and probabilities are left in its
        `tokens` / `probs` (for `ArrayBatch.apply`)."""
        inputs, candidate_rows = StepInputs.from_works(works)
        C = len(inputs.candidates)
        host_KC = self.forward(StepInputs.concat([inputs, *(b.inputs for b in batches)]))
        end = C
        for b in batches:  # left as arrays: a batch's selection is array code
            start, end = end, end + len(b.inputs.candidates)
            b.tokens, b.probs = host_KC[0, start:end], host_KC[1, start:end]
        tokens, probs, *entropies = host_KC[:, :C].tolist()
        return self._scatter_back(works, candidate_rows, tokens, probs, entropies[0] if entropies else None)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> np.ndarray:
        """The step's forward: [K, C] on the host (fp32, or fp64 for a vocabulary past 2**24), per
        candidate row its token and probability (K = 2), and its entropy (K = 3) when some row asks
        for it (`inputs.entropy`)."""
        shape = self.static_shape(inputs)
        N, C = len(inputs.ids), len(inputs.candidates)
        body = StaticInputs.sizes(shape) if shape else {"ids": N, "positions": N}
        self.stage.begin(body | self._head_sizes(inputs))
        flat_N = self._put_static_body(inputs, shape) if shape else self._put_dynamic_body(inputs)
        self._put_head(inputs, flat_N)
        self.stage.copy()
        h_TD = self._body(inputs, shape)
        if C == 0:
            return np.zeros((2, 0))
        token_C, prob_C, entropy_C = self._head(h_TD, inputs)
        # the step's one device-to-host sync (the stack promotes the token ids to the probabilities' fp32)
        rows = [token_C if self.ids_fit_fp32 else token_C.double(), prob_C] + ([] if entropy_C is None else [entropy_C])
        return torch.stack(rows).cpu().numpy()

    @torch.inference_mode()
    def score(self, rows: list[ScoreRow], top_k: int) -> np.ndarray:
        """One forward of sequences being scored (`fdllm.engine.scoring`): each row's tokens fed as one
        causal row whose K/V go into its pages after its earlier chunks' (prefill's path), each fed
        token's logits scoring its target, the token after it. Returns [N, 1 + 2k] fp64 for the N fed
        tokens in order: the target's log-probability, then the top-k token ids and their
        log-probabilities (most likely first), from one log-softmax per row (mask token excluded), so
        a greedy target's value equals the top-1's bit for bit."""
        q_lens = np.array([len(r.ids) for r in rows], dtype=np.int64)
        starts = np.array([r.start for r in rows], dtype=np.int64)
        inputs = StepInputs(ids=np.concatenate([r.ids for r in rows]), starts=starts, q_lens=q_lens, kv_lens=starts + q_lens,
                            causal=np.ones(len(rows), dtype=bool), pages=[r.pages for r in rows], prefill=True,
                            max_q_len=int(q_lens.max()), max_pages=max(len(r.pages) for r in rows), any_causal=True,
                            candidates=NO_ROWS, entropy=NO_ROWS, sampled=NO_SAMPLED)
        N = len(inputs.ids)
        self.stage.begin({"ids": N, "positions": N, "targets": N})
        self._put_dynamic_body(inputs)
        self.stage.put("targets", np.concatenate([r.targets for r in rows]))
        self.stage.copy()
        h_TD, targets_N = self._body(inputs, None), self.stage.get("targets")
        parts = []
        for a in range(0, N, self.max_head_rows):  # logits a chunk at a time, as `_head`
            b = min(a + self.max_head_rows, N)
            logp_RV = torch.log_softmax(self.logits(h_TD[a:b]), dim=-1)
            top = logp_RV.topk(top_k, dim=-1)
            columns = (logp_RV.gather(1, targets_N[a:b, None]), top.indices, top.values)
            parts.append(torch.cat([c.double() for c in columns], 1))
        return torch.cat(parts).cpu().numpy()

    def static_shape(self, inputs: StepInputs) -> StaticShape | None:
        """The padded layout when no row writes prompt K/V and the rows fit a bucket, else None."""
        causal = inputs.any_causal
        if inputs.prefill or (causal and not self.causal_entries):
            return None
        lengths = inputs.q_lens.tolist()
        bucket_len = query_bucket if self.bucket_query_len else (lambda n: n)
        if self.fixed_query_len:
            q_len = bucket_len(self.fixed_query_len)
        else:
            # never more tokens than the steps' activations were sized for: a block lookahead's second rows
            # fit (max_num_seqs rows of the step's longest did not: every lookahead step ran eagerly)
            q_len = chunk_len(lengths, self.buckets, bucket_len, self.static_tokens)
        entries = 0 if q_len is None else num_entries(lengths, q_len)
        if q_len is None or entries > self.buckets[-1]:
            return None
        pages = inputs.max_pages
        if self.graphs is not None:
            if pages > self.max_pages_per_seq:
                return None
            pages = self.max_pages_per_seq  # one captured table width
        return StaticShape(self.buckets[bisect.bisect_left(self.buckets, entries)], q_len, pages, causal)

    def capture_largest(self) -> None:
        """Capture the static step of the most tokens (`static_tokens`, what KV sizing left room for), before
        any other: later captures of smaller shapes reuse its blocks of the graphs' memory pool instead
        of growing it."""
        longest, limit = query_bucket(self.max_row_len), self.static_tokens
        _, q_len, batch = max((b * q, q, b) for q in (longest >> i for i in range(longest.bit_length()))
                              for b in self.buckets if b * q <= limit)  # the most tokens; of those, the longest rows
        self.graphs.capture(StaticShape(batch, q_len, self.max_pages_per_seq))

    # -- host packing -------------------------------------------------------------------------------
    def _put_static_body(self, inputs: StepInputs, shape: StaticShape) -> np.ndarray:
        """Written in place into the staged sections by a fixed handful of numpy ops: each row cut into
        ceil(q_len / Q) entries (`cut_rows`), per entry its row's tokens, positions and cache slots
        (padding tokens: token 0 at the scratch slot), block table (padding -1), kv/q lengths and causal
        flag; entries past the step's rows are all padding (they see nothing). Returns the flat index
        [N] of every fed token in the [Bb * Q] layout."""
        Bb, Q = shape.batch, shape.q_len
        q_lens, starts, kv_lens, causal = inputs.q_lens, inputs.starts, inputs.kv_lens, inputs.causal
        table_EM = inputs.page_table(shape.pages)
        if inputs.max_q_len <= Q:  # no row is cut: entry e is row e (most steps: the cheap way)
            E, q_lens_E, real_E = len(q_lens), q_lens, q_lens
        else:
            row_E, first_E, real_E, q_lens_E = cut_rows(q_lens, causal, Q)
            E = len(row_E)
            starts, kv_lens, causal, table_EM = starts[row_E] + first_E, kv_lens[row_E], causal[row_E], table_EM[row_E]
        offsets, N = np.arange(Q), len(inputs.ids)
        positions_EQ = starts[:, None] + offsets  # a padding token's position is never read
        slots_EQ = cache_slots(table_EM, positions_EQ, self.cache.page_size)
        section = self.stage.section
        ids = section("ids")
        if N == E * Q:  # every entry full (rows of one length: most steps), so the fed tokens are the first N
            flat_N = np.arange(N)
            ids[:N] = inputs.ids
            ids[N:] = 0
        else:
            real_EQ = offsets < real_E[:, None]
            flat_N = np.flatnonzero(real_EQ)  # the fed tokens fill their entries from the front, in order
            ids.fill(0)
            ids[flat_N] = inputs.ids
            slots_EQ[~real_EQ] = self.cache.scratch_slot
        positions_BQ, slots_BQ = section("positions").reshape(Bb, Q), section("slots").reshape(Bb, Q)
        tables_BM = section("tables").reshape(Bb, shape.pages)
        positions_BQ[:E] = positions_EQ
        slots_BQ[:E] = slots_EQ
        tables_BM[:E] = table_EM
        lengths = (("kv_lens", kv_lens), ("q_lens", q_lens_E)) + ((("causal", causal),) if shape.causal else ())
        for name, values in lengths:
            section(name)[:E] = values
        if E < Bb:  # padding entries: position 0 into the scratch slot, no pages, no queries, no keys
            positions_BQ[E:] = 0
            slots_BQ[E:] = self.cache.scratch_slot
            tables_BM[E:] = -1
            for name, _ in lengths:
                section(name)[E:] = 0
        return flat_N

    def _put_dynamic_body(self, inputs: StepInputs) -> np.ndarray:
        """Packed tokens in order (their flat index is their index)."""
        N = len(inputs.ids)
        self.stage.put("ids", inputs.ids)
        self.stage.put("positions", np.repeat(inputs.starts - inputs.row_tokens, inputs.q_lens) + np.arange(N))
        return np.arange(N)

    @staticmethod
    def _head_sizes(inputs: StepInputs) -> dict[str, int]:
        sizes = {"cand_rows": len(inputs.candidates), "entropy": len(inputs.entropy)}
        for group in (inputs.sampled, inputs.biased):
            if len(group):
                sizes |= {name: len(values) for name, values in group.arrays().items()}
        return sizes

    def _put_head(self, inputs: StepInputs, flat_N: np.ndarray) -> None:
        put = self.stage.put
        put("cand_rows", flat_N[inputs.candidates])
        if len(inputs.entropy):
            put("entropy", inputs.entropy)
        for group in (inputs.sampled, inputs.biased):
            if len(group):
                for name, values in group.arrays().items():
                    put(name, values, values.dtype.type)  # int64, or float64 staged as its bytes

    # -- device work --------------------------------------------------------------------------------
    def _body(self, inputs: StepInputs, shape: StaticShape | None) -> Tensor:
        """Final hidden states [T, D] of the packed (or padded) tokens."""
        get = self.stage.get
        if shape is None:
            positions = self.stage.section("positions")
            table_RM = inputs.page_table(inputs.max_pages)
            rows = np.repeat(np.arange(len(inputs.q_lens)), inputs.q_lens)
            slots = cache_slots(table_RM, positions[:, None], self.cache.page_size, rows)[:, 0]
            attention = PagedAttention.build(
                self.cache, slots,
                [AttentionRow(*row) for row in zip(inputs.q_lens.tolist(), inputs.kv_lens.tolist(), inputs.pages,
                                                   inputs.causal.tolist())],
                self.attention_fn, exact_causal=not self.causal_entries,
            )
            return self.model.hidden(get("ids")[None], get("positions")[None], cache=attention, fused=self.fused_ops)[0]
        if self.graphs is not None:
            return self.graphs.run(shape, self.stage.dev[: StaticInputs.numel(shape)])
        return forward_static(self.model, self.cache, self.attention_fn, self._static_inputs(shape), self.fused_ops)

    def _static_inputs(self, shape: StaticShape) -> StaticInputs:
        """The step's views of the staged buffer, made once per shape (while the buffer stays)."""
        buf, inputs = self._static_views.get(shape, (None, None))
        if buf is not self.stage.dev:
            inputs = StaticInputs.view(self.stage.dev, shape)
            self._static_views[shape] = (self.stage.dev, inputs)
        return inputs

    def _head(self, h_TD: Tensor, inputs: StepInputs) -> tuple[Tensor, Tensor, Tensor | None]:
        """Token [C] (int64) and its probability [C] (fp32) of each candidate row, greedy or sampled;
        the entropy [C] (fp32, 0 outside the E entropy rows) when some row needs it, else None.

        Logits [R, V] in fp32 are made at most `max_head_rows` rows at a time (a full batch of
        speculative verifies has thousands of candidate rows: at a 152k vocabulary, gigabytes once
        sampling sorts them), so the head's memory is bounded whatever the batch; every row's result
        depends on its own logits and draw only, so the chunks change nothing."""
        get = self.stage.get
        h_CD = h_TD.index_select(0, get("cand_rows"))  # not h_TD[rows]: 4x faster on CPU
        C, k = len(inputs.candidates), self.max_head_rows
        E, S = len(inputs.entropy), len(inputs.sampled)
        logits_CV = None  # kept for the sampled and entropy rows when every candidate fits one chunk
        if self.fused_confidence is not None:
            token_C, prob_C = self.fused_confidence(h_CD, self.model.lm_head.weight, self.mask_token_id)
        elif C <= k:
            logits_CV = self.logits(h_CD)
            token_C, prob_C = greedy_confidence(logits_CV, None)
        else:
            token_C, prob_C = _join_pairs([greedy_confidence(self.logits(h_CD[a : a + k]), None) for a in range(0, C, k)])

        def row_logits(rows: Tensor) -> Tensor:  # the mask token already at -inf: mask_token_id=None below
            return logits_CV[rows] if logits_CV is not None else self.logits(h_CD[rows])

        entropy_C = None
        if E:
            rows = get("entropy")
            parts = [token_entropy(row_logits(rows[a : a + k]), None) for a in range(0, E, k)]
            entropy_C = torch.zeros_like(prob_C).index_put((rows,), _join(parts))
        if S:
            rows = get("rows")
            token_S, prob_S = _join_pairs([sample_confidence(row_logits(rows[a : a + k]), None, *self._draws("", a, a + k))
                                           for a in range(0, S, k)])
            token_C, prob_C = token_C.index_put((rows,), token_S), prob_C.index_put((rows,), prob_S)
        if len(inputs.biased):
            # Adjusting holds a few more [rows, V] tensors beside the logits (counts, prompt flags, the
            # adjusted copy): a quarter chunk at a time keeps the head within the same memory.
            rows, kb = get("bias_rows"), max(1, k // 4)
            token_B, prob_B = _join_pairs([self._biased_choice(row_logits(rows[a : a + kb]), inputs.biased, a)
                                           for a in range(0, len(inputs.biased), kb)])
            token_C, prob_C = token_C.index_put((rows,), token_B), prob_C.index_put((rows,), prob_B)
        return token_C, prob_C, entropy_C

    def _biased_choice(self, logits_RV: Tensor, biased: BiasedRows, first: int) -> tuple[Tensor, Tensor]:
        """Token and probability of biased rows [first, first + R) (`StepInputs.biased`): their logits
        adjusted (`fdllm.engine.adjustments`: the bias, the repetition penalty, the presence/frequency
        penalties), then the argmax, or a draw where the row samples (temperature > 0)."""
        R = len(logits_RV)
        get = lambda name, dtype: self.stage.get(f"adj_{name}", dtype)  # noqa: E731
        logits_RV = adjust_logits(logits_RV, ChunkAdjustments.of_rows(biased.adjust, get, first, first + R))
        token_R, prob_R = greedy_confidence(logits_RV, None)
        temperature = biased.draws.temperature[first : first + R]
        if not temperature.any():
            return token_R, prob_R
        temperature_R, *draws = self._draws("bias_", first, first + R)
        drawn_R, drawn_prob_R = sample_confidence(logits_RV, None, temperature_R.clamp(min=1e-2), *draws)
        sampled_R = temperature_R > 0
        return torch.where(sampled_R, drawn_R, token_R), torch.where(sampled_R, drawn_prob_R, prob_R)

    def _draws(self, prefix: str, a: int, b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows [a, b) of staged `SampledRows` (sections `prefix` + field name): temperature, top_p,
        top_k and each row's uniform draw, as `sample_confidence` takes them."""
        part = lambda name, dtype=torch.int64: self.stage.get(prefix + name, dtype)[a:b]  # noqa: E731
        return (part("temperature", torch.float32), part("top_p", torch.float32), part("top_k"),
                counter_uniform(part("seed"), part("counter")))

    def logits(self, h_RD: Tensor) -> Tensor:
        """fp32 logits [R, V] of hidden rows, the mask token's at -inf."""
        return torch.nn.functional.linear(h_RD, self.model.lm_head.weight, self.mask_bias_V).float()

    def _scatter_back(self, works: list[Work], candidate_rows: list[list[int]], tokens: list[float],
                      probs: list[float], entropies: list[float] | None) -> list[Predictions]:
        """Per work: its logit rows' predictions (none for a pure prefill chunk); rows that are no
        candidate get a filler token and probability 0 (the sequence never commits them)."""
        filler = self.mask_token_id if self.mask_token_id is not None else 0
        out, c = [], 0
        for w, cands in zip(works, candidate_rows):
            n, m = len(w.logit_rows), len(cands)
            needs_entropy = m and w.needs_entropy
            if m == n:  # every row a candidate (or none): the step's results in order
                pred = Predictions([int(t) for t in tokens[c : c + n]], probs[c : c + n],
                                   entropies[c : c + n] if needs_entropy else None)
            else:
                pred = Predictions([filler] * n, [0.0] * n, [0.0] * n if needs_entropy else None)
                for j, r in enumerate(cands, c):
                    pred.tokens[r], pred.probs[r] = int(tokens[j]), probs[j]
                if needs_entropy:
                    for j, r in enumerate(cands, c):
                        pred.entropies[r] = entropies[j]
            c += m
            out.append(pred)
        return out


def _join(parts: list[Tensor]) -> Tensor:
    """The head's row chunks joined again (one chunk: as it is, no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _join_pairs(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Chunked (tokens, probs) pairs joined again."""
    tokens, probs = zip(*parts)
    return _join(list(tokens)), _join(list(probs))


HEAD_CHUNK_BYTES = 128 << 20


def head_chunk_rows(vocab_size: int) -> int:
    """Rows of fp32 logits the head makes at a time: HEAD_CHUNK_BYTES of them (220 rows at Qwen2's
    152k vocabulary, hundreds of thousands at a tiny test vocabulary)."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class StaticInputs:
    """Device views of a static step's body inputs (slices of the step's staged buffer)."""

    ids_1T: Tensor
    positions_1T: Tensor
    slots_T: Tensor
    tables_BM: Tensor
    kv_lens_B: Tensor
    q_lens_B: Tensor
    causal_B: Tensor | None  # per-entry causal flags; None: no entry is causal

    @staticmethod
    def sizes(shape: StaticShape) -> dict[str, int]:
        """The flat int64 buffer's sections, in order: the layout the runner stages a static step's
        body inputs in, and a captured graph's input buffer (fdllm.engine.graphs) holds."""
        Bb, T = shape.batch, shape.batch * shape.q_len
        sizes = {"ids": T, "positions": T, "slots": T, "tables": Bb * shape.pages, "kv_lens": Bb, "q_lens": Bb}
        return sizes | ({"causal": Bb} if shape.causal else {})

    @staticmethod
    def numel(shape: StaticShape) -> int:
        return sum(StaticInputs.sizes(shape).values())

    @classmethod
    def view(cls, buf: Tensor, shape: StaticShape) -> StaticInputs:
        """Views of a flat int64 buffer laid out as `sizes` says."""
        sizes = cls.sizes(shape)
        part = dict(zip(sizes, buf[: sum(sizes.values())].split(list(sizes.values()))))
        return cls(part["ids"][None], part["positions"][None], part["slots"], part["tables"].view(shape.batch, shape.pages),
                   part["kv_lens"], part["q_lens"], part.get("causal"))


def forward_static(model: Transformer, cache: KVCache, attention_fn, inputs: StaticInputs, fused: bool = False) -> Tensor:
    """The body of a static step [Bb * Q, D]: what a CUDA graph captures, and the eager path runs."""
    attention = StaticPagedAttention(cache, inputs.slots_T, inputs.tables_BM, inputs.kv_lens_B, inputs.q_lens_B,
                                     attention_fn, inputs.causal_B)
    return model.hidden(inputs.ids_1T, inputs.positions_1T, cache=attention, fused=fused)[0]


@dataclass(frozen=True)
class StepMemory:
    """CUDA memory (bytes) steps need beside the KV cache: what `gpu_memory_utilization` sizing subtracts.

    Measured by running the model (`profile_peak_memory`), except the Triton kernel's split-KV
    partials, which a no-cache forward does not allocate: one call's at most
    (`fdllm.kernels.paged_attention.split_workspace_bytes`; the kernel slices larger calls). Captured
    graphs allocate from a private pool that eager steps cannot reuse, so with graphs the largest
    captured step's activations and partials are held beside the largest eager step's."""

    peak: int  # weights and the largest step's activations, run eagerly
    graph_pool: int  # the largest captured step's activations (0 without graphs)
    workspace: int  # split-KV partials: one call's, and one more in the graph pool

    @property
    def total(self) -> int:
        return self.peak + self.graph_pool + self.workspace

    @classmethod
    def profile(cls, model: Transformer, prefill_tokens: int, static_tokens: int, use_graphs: bool,
                workspace_per_call: int) -> StepMemory:
        before = torch.cuda.memory_allocated(model.device)
        peak = profile_peak_memory(model, max(prefill_tokens, static_tokens))
        # a captured step is the body alone (embedding -> layers -> norm): its head runs eagerly
        graph_pool = profile_peak_memory(model, static_tokens, head=False) - before if use_graphs else 0
        return cls(peak, graph_pool, workspace_per_call * (2 if use_graphs else 1))

    def __str__(self) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        return (f"{gib(self.total)} besides the cache: weights and activations {gib(self.peak)}, "
                f"CUDA-graph pool {gib(self.graph_pool)}, attention workspace {gib(self.workspace)}")


@torch.inference_mode()
def profile_peak_memory(model: Transformer, num_tokens: int, head: bool = True) -> int:
    """Peak CUDA bytes torch allocates with the weights loaded, one no-cache forward of `num_tokens`
    tokens (the largest step's activations) and (`head`) the head's largest chunk sampled with top-p
    (logits, sorted logits and their int64 order: `ModelRunner._head`); what the KV cache must leave room for."""
    device = model.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids_1T = torch.zeros((1, num_tokens), dtype=torch.long, device=device)
    if head:
        rows = min(num_tokens, head_chunk_rows(model.config.vocab_size))
        logits_RV = model(ids_1T, logit_positions=slice(-rows, None))[0].float()
        ones = torch.ones(rows, device=device)
        sample_confidence(logits_RV, None, ones, ones * 0.9, torch.zeros(rows, dtype=torch.long, device=device), ones * 0.5)
    else:
        model.hidden(ids_1T)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
