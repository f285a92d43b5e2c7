"""`Engine`: block-diffusion (plus AR baseline and lossless speculative) generation with continuous batching.

`step()` = schedule -> run -> postprocess. Requests join (`add_request`) and leave (`abort`, or on
finishing) between steps; `generate` is the batch convenience on top of the step API.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fdllm.cache import KVCache, PageAllocator, kv_budget_pages
from fdllm.config import BlockDiffusionConfig
from fdllm.decoding import SelectionPolicy, StopCriteria
from fdllm.engine.params import (
    DEFAULT_DELIMITERS,
    DEFAULT_ENTROPY_BUDGET,
    EngineConfig,
    MODES,
    GenerationResult,
    SamplingParams,
    SequenceLogprobs,
    check_cache_salt,
    is_int,
)
from fdllm.engine.runner import ModelRunner, StepMemory, lookahead_batch_limit, static_step_tokens
from fdllm.engine.scheduler import Scheduler
from fdllm.engine.scoring import score_pages, score_sequences
from fdllm.engine.sequence import Sequence, TokenCallback
from fdllm.kernels import resolve_attention_backend
from fdllm.loader import parse_device
from fdllm.model import Transformer
from fdllm.quantization import quantize
from fdllm.storage import local_checkpoint
from fdllm.tokenizer import MASK_TOKEN, encode_prompt, has_tokenizer, load_text_tokenizer, mask_token_id, stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Prompt = str | list[int]
# Delimiter texts whose tokens an engine keeps (least recently used go first): requests choose the texts, and
# a one-character text of a 150k vocabulary holds tens of thousands of ids
DELIMITER_CACHE_SIZE = 256


def _one_per_sequence(value: Any, n: int, what: str) -> list:
    """`Engine.score`'s per-sequence arguments: one value for all `n` sequences, or a list of one each."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{n} sequences but {len(values)} {what}")
    return values


def freeze_gc_heap() -> None:
    """Move every object alive now out of the garbage collector's reach (EngineConfig.freeze_gc).

    Collect first: `gc.freeze` keeps what it finds, so garbage cycles left from start-up would never
    be freed. Objects made later (requests, steps) are collected as usual; after the first engine of
    a process, this only scans what was made since the previous freeze.
    """
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    # Given back at exit, so the interpreter's last collection still frees them (nanobind, which
    # triton uses, reports what is left as leaks); one registration however many engines freeze.
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
    log.info("gc: %d start-up objects frozen in %.0f ms (EngineConfig.freeze_gc)", gc.get_freeze_count(),
             1000 * (time.perf_counter() - start))


def speculative_lookahead_max_batch(ecfg: EngineConfig, block_size: int, use_graphs: bool) -> int | None:
    """The scheduler's speculative lookahead limit (running requests; None: every step). With CUDA graphs a
    step of more requests than `lookahead_batch_limit` with their lookahead rows does not fit a captured
    step and runs eagerly (several times slower): that limit is the default there, and a larger one asked
    for is kept, with a warning."""
    asked = ecfg.speculative_lookahead_max_batch
    if not use_graphs or not ecfg.speculative_lookahead:
        return asked
    limit = lookahead_batch_limit(ecfg.max_num_seqs, block_size)
    if asked is not None and asked > limit:
        log.warning("speculative_lookahead_max_batch=%d: steps of more than %d requests with their lookahead rows "
                    "do not fit a captured step and run eagerly (several times slower)", asked, limit)
    return limit if asked is None else asked


def _typed(name: str, value, cls: type):
    """`value`, or a ValueError naming `name` when it is no `cls` (a dict of its fields failed with an
    AttributeError deep inside)."""
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a fdllm.{cls.__name__}, got {type(value).__name__}")
    return value


class Engine:
    """Serves one model: `generate` for batches, `add_request`/`abort`/`step` for streaming servers.

    `config` holds the block-diffusion settings (block/sub-block size, sub-block cache, default
    threshold, mask token id); `engine_config` the cache and batch sizing; `default_mode` the mode of
    requests whose SamplingParams give none (None: diffusion when there is a mask token, else AR;
    `from_pretrained` makes it AR for a checkpoint that is not a block-diffusion fine-tune). Not
    thread-safe: drive it from one thread.
    """

    def __init__(
        self, model: Transformer, tokenizer: PreTrainedTokenizerBase | None = None,
        config: BlockDiffusionConfig | None = None, engine_config: EngineConfig | None = None,
        default_mode: str | None = None, ar_checkpoint: bool = False,
    ) -> None:
        """`ar_checkpoint`: the model was never fine-tuned for block diffusion (`from_pretrained`: no
        fdllm_config.json), so its causal distribution is its own and it scores, whatever its tokenizer holds."""
        config = _typed("config", config or BlockDiffusionConfig(), BlockDiffusionConfig)
        engine_config = _typed("engine_config", engine_config or EngineConfig(), EngineConfig)
        if config.mask_token_id is None and (mask := mask_token_id(tokenizer)) is not None:
            config = config.replace(mask_token_id=mask)
        vocab = model.config.vocab_size
        if config.mask_token_id is not None and not 0 <= config.mask_token_id < vocab:
            raise ValueError(f"mask_token_id {config.mask_token_id} is outside the model's vocabulary ({vocab})")
        if config.mask_token_id is None:
            log.warning("no mask token (config or tokenizer %s): only mode='ar' requests are served", MASK_TOKEN)
        self._tokenizer_stop_ids = frozenset(stop_token_ids(tokenizer)) if tokenizer is not None else frozenset()
        self._tokenizer_stop_ids |= model.config.end_token_ids
        if config.mask_token_id in self._tokenizer_stop_ids:  # never predicted: no request would ever end on it
            raise ValueError(f"mask_token_id {config.mask_token_id} is an end token of the model or its tokenizer "
                             f"{sorted(self._tokenizer_stop_ids)}; the mask token must be a token of its own")
        if default_mode is None:
            default_mode = "ar" if config.mask_token_id is None else "diffusion"
        elif default_mode not in MODES or (default_mode != "ar" and config.mask_token_id is None):
            raise ValueError(f"default_mode must be one of {MODES} ('ar' only without a mask token), got {default_mode!r}")
        self.default_mode = default_mode
        L = config.block_size
        engine_config.check_for(L, model.device, model.dtype)
        quantized = getattr(model, "quantization", None)  # set by an earlier engine on this model, in place
        if quantized is not None and quantized != engine_config.quantization:
            raise ValueError(f"the model's weights were quantized to {quantized!r} in place (by an earlier engine); "
                             f"EngineConfig(quantization={engine_config.quantization!r}) would run them as they are: "
                             f"pass quantization={quantized!r}, or load the model again")
        self.model, self.tokenizer, self.config, self.engine_config = model, tokenizer, config, engine_config
        self.ar_checkpoint = ar_checkpoint
        mc = model.config
        self.max_model_len = min(mc.max_position_embeddings, engine_config.max_model_len or mc.max_position_embeddings)
        self.attention_backend = resolve_attention_backend(engine_config.attention_backend, model.device)
        fuse = engine_config.fuse_kernels and self.attention_backend == "triton"
        if engine_config.linear_backend == "triton" and not fuse:
            raise ValueError(f"linear_backend='triton' runs in the fused forward of the Triton attention backend; "
                             f"attention_backend {engine_config.attention_backend!r} is {self.attention_backend!r} "
                             f"on {model.device}")
        if engine_config.quantization is not None:  # once every check passed (the model is changed in place),
            quantize(model, engine_config.quantization)  # and before the KV cache is sized from the memory left
        if fuse and getattr(model, "quantization", None) is None:
            # the runner's fused forward: q/k/v and gate/up as one GEMM each. Before the KV cache is sized:
            # the stacked weights replace the separate ones, whose freed blocks go back to the device here
            model.fuse_projections(engine_config.linear_backend)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        # Graphs capture block tables of max_model_len pages: the kernels read only kv_len of them, while
        # the torch reference gathers them all, so it stays eager.
        use_graphs = model.device.type == "cuda" and not engine_config.enforce_eager and self.attention_backend != "torch"
        num_pages = engine_config.num_pages or self._default_num_pages(L, use_graphs)
        try:
            cache = KVCache(mc.num_hidden_layers, num_pages, L, mc.n_kv_heads, mc.dim_per_head, model.dtype, model.device,
                            fused_writes=fuse)
        except (RuntimeError, MemoryError) as exc:  # torch's "can't allocate 36028797018996736 bytes", or CUDA's OOM
            gib = num_pages * KVCache.page_bytes(mc.num_hidden_layers, L, mc.n_kv_heads, mc.dim_per_head, model.dtype) / 2**30
            raise ValueError(f"the KV cache of {num_pages} pages ({gib:.3g} GiB) does not fit on {model.device}: set "
                             f"num_pages or kv_cache_gib lower ({type(exc).__name__}: {str(exc)[:200]})") from None
        self.allocator = PageAllocator(num_pages)
        self.scheduler = Scheduler(
            self.allocator, max_num_seqs=engine_config.max_num_seqs, max_prefill_tokens=engine_config.max_prefill_tokens,
            block_size=L, lookahead_max_batch=speculative_lookahead_max_batch(engine_config, L, use_graphs),
            prefix_caching=engine_config.enable_prefix_caching, reserve_worst_case=engine_config.deterministic,
        )
        self.runner = ModelRunner(
            model, cache, config.mask_token_id, self.attention_backend, max_row_len=L + 1,
            max_num_seqs=engine_config.max_num_seqs,
            max_pages_per_seq=-(-self.max_model_len // L), use_cuda_graphs=use_graphs,
            fixed_query_len=L if engine_config.deterministic else None, fuse_kernels=fuse,
        )
        if use_graphs:
            self.runner.capture_largest()
        self._ids = itertools.count()
        self._vocab_text: list[str] | None = None  # each token's text, decoded once for delimiter strings
        # delimiter text -> the tokens containing it; clients choose the texts, so the cache is bounded
        self._tokens_containing = functools.lru_cache(maxsize=DELIMITER_CACHE_SIZE)(self._find_tokens_containing)
        self._aborted: list[Sequence] = []  # reported by the next step()
        self._undelivered: list[GenerationResult] = []  # finished while generate() drove the engine
        log.info(
            "engine: %d KV pages of %d tokens, max_model_len %d, attention backend %s (asked %r), CUDA graphs %s, %s",
            num_pages, L, self.max_model_len, self.attention_backend, engine_config.attention_backend,
            "on" if use_graphs else "off", config,
        )
        if engine_config.freeze_gc:
            freeze_gc_heap()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: BlockDiffusionConfig | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = torch.float32, engine_config: EngineConfig | None = None,
        default_mode: str | None = None,
    ) -> Engine:
        """Load model (+ tokenizer if present) from an HF checkpoint dir. `config` None: the checkpoint's
        fdllm_config.json or defaults; a None mask_token_id is taken from the checkpoint, then the tokenizer.
        `default_mode` None: diffusion for a block-diffusion fine-tune (it has fdllm_config.json), else AR:
        a model never fine-tuned to fill masks decodes noise by diffusion.
        `path` may be an object-store URI, read through this node's cache (fdllm.storage)."""
        device = parse_device(device)  # before anything is read or fetched
        if config is not None:  # before the model is read
            _typed("config", config, BlockDiffusionConfig)
        if engine_config is not None:
            _typed("engine_config", engine_config, EngineConfig)
        path = local_checkpoint(path)
        saved = BlockDiffusionConfig.load(path)
        if default_mode is None and saved is None:
            default_mode = "ar"
            log.info("%s has no fdllm_config.json: a plain AR checkpoint, not a block-diffusion fine-tune; requests "
                     "that give no mode decode AR", path)
        if config is None:
            config = saved or BlockDiffusionConfig()
        elif config.mask_token_id is None and saved is not None and saved.mask_token_id is not None:
            config = config.replace(mask_token_id=saved.mask_token_id)
        model = Transformer.from_pretrained(path, dtype=dtype, device=device)
        tokenizer = load_text_tokenizer(path) if has_tokenizer(path) else None
        return cls(model, tokenizer, config, engine_config, default_mode, ar_checkpoint=saved is None)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages the prefix cache holds (EngineConfig.enable_prefix_caching); the idle ones count as free."""
        return self.allocator.num_cached

    @property
    def num_preemptions(self) -> int:
        """Requests preempted so far for want of free KV pages (each prefilled again later)."""
        return self.scheduler.num_preemptions

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._aborted or self._undelivered)

    # -- step API -----------------------------------------------------------------------------------
    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        on_tokens: TokenCallback | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError (engine unaffected) on bad input.

        `on_tokens(request_id, new_token_ids, finished)` is called from `step()` whenever tokens
        become final, in order; the last call has finished=True.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):  # a dict (or generate's params as one) failed deep in _validate
            raise ValueError(f"params must be a fdllm.SamplingParams, got {type(params).__name__}")
        if params.mode is None:
            params = dataclasses.replace(params, mode=self.default_mode)
        ids = self._encode(prompt)
        if request_id is None:
            request_id = str(next(self._ids))
            while self._in_use(request_id):  # a number the caller chose for another request
                request_id = str(next(self._ids))
        elif not isinstance(request_id, str) or not request_id:  # an int 5 and the engine's own "5" would be two ids
            raise ValueError(f"request id must be a non-empty str, got {request_id!r}")
        elif self._in_use(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        self._validate(ids, params)
        criteria = StopCriteria(
            max_new_tokens=params.max_new_tokens, stop_token_ids=self.stop_token_ids_for(params), stop=tuple(params.stop),
            decode=self._decode,
        )
        if params.temperature > 0 and params.seed is None:  # a fresh stream; a given seed is reproducible
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        cfg = self.config
        seq = Sequence(
            request_id=request_id, prompt=ids, params=params, criteria=criteria,
            block_size=cfg.block_size, sub_block_size=cfg.sub_block_size,
            use_sub_block_cache=cfg.use_sub_block_cache,
            threshold=cfg.threshold if params.threshold is None else params.threshold,
            mask_token_id=cfg.mask_token_id, arrival=time.perf_counter(), on_tokens=on_tokens,
            causal_prefix=cfg.causal_prefix, policy=self.selection_policy(params),
            lookahead=self.engine_config.speculative_lookahead,
        )
        self.scheduler.add(seq)
        return request_id

    def _in_use(self, request_id: str) -> bool:
        """A running or waiting request's id, or one whose result a step() has yet to deliver (aborted, or
        finished while generate() drove the engine): results are told apart by id, so a new request under
        it would be handed the old one's (the async engine's stream of a reused id got the aborted result)."""
        return (self.scheduler.find(request_id) is not None or any(s.request_id == request_id for s in self._aborted)
                or any(r.request_id == request_id for r in self._undelivered))

    def abort(self, request_id: str) -> None:
        """Cancel a request now (its pages are freed at once); its result comes from the next step()."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            log.debug("abort of unknown or finished request %s ignored", request_id)
            return
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        self._aborted.append(seq)

    def step(self) -> list[GenerationResult]:
        """One forward over every running sequence; returns the requests that finished in it.

        Never raises for a request's sake: an error while planning or applying one sequence's work
        fails that request alone, an error in the batched forward fails that step's batch, and one in
        an array batch's array code (`fdllm.engine.array_batch`) the requests in it (neither can be
        attributed); either way the request ends with finish_reason "error", the error is logged with
        the request ids, and every other request keeps decoding.
        """
        finished = self._undelivered + [self._finish(seq) for seq in self._aborted]
        self._undelivered, self._aborted = [], []
        works, batches, broken = self.scheduler.schedule()
        for seq, exc in broken:
            log.error("request %s failed while planning its step: %r", seq.request_id, exc, exc_info=exc)
            finished.append(self._fail(seq, exc))
        if not works and not batches:
            return finished
        try:
            outputs = self.runner.run(works, batches)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            seqs = [w.seq for w in works] + [seq for batch in batches for seq in batch.seqs]
            log.exception("the forward of a step failed; failing its batch of %d request(s) %s", len(seqs),
                          [seq.request_id for seq in seqs])
            return finished + [self._fail(seq, exc) for seq in seqs]
        now = time.perf_counter()
        for work, predictions in zip(works, outputs):
            self._take(work.seq, work.seq.apply, (work, predictions), now, finished)
            self.scheduler.register(work.seq)
        for batch in batches:
            try:
                batch.apply()
            except Exception as exc:  # noqa: BLE001 - array code over every batched request: not attributable
                log.exception("applying the %s of %d request(s) failed; failing them %s", type(batch).__name__,
                              len(batch.seqs), [seq.request_id for seq in batch.seqs])
                finished += [self._fail(seq, exc) for seq in batch.seqs if seq.finish_reason is None]
                continue
            for seq in batch.finalizing:
                self.scheduler.register(seq)
            for seq in batch.settling:
                self._take(seq, seq.settle, (), now, finished)
        return finished

    def _take(self, seq: Sequence, apply: Callable[..., list[int]], args: tuple, now: float,
              finished: list[GenerationResult]) -> None:
        """`apply(*args)`: the step's result taken by one request, returning the tokens it settles;
        then stream them, or finish the request. An error fails that request alone (see `step`)."""
        if seq.finish_reason is not None:  # aborted by a callback earlier in this step
            return
        try:
            new = apply(*args)
            if new and seq.first_token_time is None:
                seq.first_token_time = now
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                finished.append(self._finish(seq, new))
            elif new:
                self._notify(seq, new, finished=False)
        except Exception as exc:  # noqa: BLE001 - see `step`
            log.exception("request %s failed while applying its step", seq.request_id)
            finished.append(self._fail(seq, exc))

    def generate(
        self, prompts: Iterable[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt (one params for all, or one per prompt); results in prompt order.

        Other requests (step API) keep running meanwhile; their results come from the next step(). If it
        raises (a bad prompt: none of them ran; Ctrl-C; a RuntimeError when pages `hold_free_pages` keeps
        back are all its waiting requests could use), its requests are gone from the engine, no result left.
        """
        prompts = self._prompt_list(prompts)
        params = params or SamplingParams()
        if not isinstance(params, (SamplingParams, list, tuple)):  # a dict was read as its keys
            raise ValueError(f"params must be a fdllm.SamplingParams or a list of them (one per prompt), got "
                             f"{type(params).__name__}")
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} SamplingParams")
        rids: list[str] = []
        done: dict[str, GenerationResult] = {}
        others: list[GenerationResult] = []  # other callers' requests' results, for the next step() to deliver
        bar = None
        try:
            for p, sp in zip(prompts, per_prompt):
                rids.append(self.add_request(p, sp))
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(rids), desc="generate", unit="req")
            mine = set(rids)
            while len(done) < len(rids):
                idle_waiting = 0 if self.scheduler.running else len(self.scheduler.waiting)
                for result in self.step():
                    if result.request_id not in mine:
                        others.append(result)
                        continue
                    done[result.request_id] = result
                    if bar is not None:
                        bar.update()
                if idle_waiting and not self.scheduler.running and len(self.scheduler.waiting) == idle_waiting:
                    self._refuse_held_pages()  # nothing ran and the step admitted nothing: nothing ever will
        finally:
            if bar is not None:
                bar.close()
            self._undelivered += others
            # A bad prompt (none of them ran), an error or an interrupt (Ctrl-C): the call's requests leave the
            # engine with no result behind, or they would run on for nobody and hold its pages.
            self._drop({rid for rid in rids if rid not in done})
        return [done[r] for r in rids]

    def _drop(self, request_ids: set[str]) -> None:
        """End these requests with no result delivered (their caller is gone)."""
        for rid in request_ids:
            if (seq := self.scheduler.find(rid)) is not None:
                self.scheduler.finish(seq)
        self._aborted = [seq for seq in self._aborted if seq.request_id not in request_ids]

    def _refuse_held_pages(self) -> None:
        """RuntimeError for waiting requests a step with nothing running did not admit: the pages
        `hold_free_pages` keeps back are all that would fit them, and only this caller releases them."""
        if self.scheduler.held_pages:
            raise RuntimeError(f"{len(self.scheduler.waiting)} waiting request(s) cannot be admitted while "
                               f"hold_free_pages({self.scheduler.held_pages}) keeps the pages they need "
                               f"({self.num_free_pages} free); release them with hold_free_pages(0)")

    @property
    def scores_causally(self) -> bool:
        """Whether the checkpoint has a causal distribution to `score` with: its clean stream attends
        causally (BlockDiffusionConfig.prefix_attention "causal": the joint objective), or it is an AR
        model (no mask token, or `ar_checkpoint`: the world's AR base has one in its tokenizer, for the
        fine-tune). Under block-causal attention a position sees the block it would predict."""
        return self.config.causal_prefix or self.config.mask_token_id is None or self.ar_checkpoint

    def score(self, prompts: Iterable[Prompt], top_logprobs: int = 0, score_from: int | Seq[int] = 1,
              cache_salt: str | None | Seq[str | None] = None) -> list[SequenceLogprobs]:
        """Each sequence's causal log-probabilities (the model's AR distribution, mask token excluded as
        in decoding): what OpenAI `logprobs`/`echo` and lm-evaluation-harness's loglikelihood tasks read.
        `top_logprobs`: how many of the most likely tokens to return at each position. `score_from`: the
        first position scored (one for all, or one per sequence; earlier ones are None): the whole
        blocks before it that the prefix cache holds are read, not recomputed (a finished request's
        prompt, when only its completion is scored). `cache_salt` (one for all, or one per sequence): the
        prefix cache's salt of each, as `SamplingParams.cache_salt` (its request's, to read its prompt).

        Runs prefill's path (`fdllm.engine.scoring`): forwards of at most max_prefill_tokens tokens
        packing several sequences, over pages borrowed from the free pool and given back. Call it
        between steps, from the thread that steps the engine (it leaves every request as it was).
        ValueError: a checkpoint that does not `scores_causally`, or bad input (nothing is scored);
        `fdllm.cache.OutOfPages`: running requests hold too much of the cache for all of these
        sequences' pages (`score_pages`) now (retry after a step, or with fewer).
        """
        if not self.scores_causally:
            raise ValueError("log-probabilities need a causal checkpoint: this one's prompt and committed blocks attend "
                             "block-causally (bidirectionally inside a block), so no position's logits are a causal "
                             "prediction; fine-tune with the joint objective (prefix_attention: causal)")
        prompts = self._prompt_list(prompts)
        vocab = self.model.config.vocab_size
        if not is_int(top_logprobs) or not 0 <= top_logprobs <= vocab:
            raise ValueError(f"top_logprobs must be an integer in [0, {vocab}], got {top_logprobs!r}")
        encoded = [self._encode(p) for p in prompts]
        starts = _one_per_sequence(score_from, len(encoded), "score_from positions")
        salts = _one_per_sequence(cache_salt, len(encoded), "cache salts")
        for ids, start, salt in zip(encoded, starts, salts):
            self._check_fits(ids, 0)
            if not is_int(start) or not 1 <= start <= len(ids):
                raise ValueError(f"score_from must be an integer in [1, {len(ids)}] (the sequence's length), got {start!r}")
            check_cache_salt(salt)
        return score_sequences(self.runner, self.allocator, encoded, top_logprobs, self.config.block_size,
                               self.engine_config.max_prefill_tokens, starts, salts)

    def hold_free_pages(self, n: int) -> None:
        """Admit no new request into the last `n` unreserved pages (0: none held). A caller that waits
        between steps for pages to free (a score the cache has no room for yet) is otherwise overtaken
        by every request that arrives after it, each taking the pages that free."""
        if not is_int(n) or n < 0:
            raise ValueError(f"held pages must be an int >= 0, got {n!r}")
        self.scheduler.held_pages = n

    def score_pages(self, token_ids: list[int]) -> int:
        """KV pages `score` borrows at most for a sequence of these tokens (all of a call's at once;
        blocks the prefix cache holds are read instead)."""
        return score_pages(len(token_ids), self.config.block_size)

    def selection_policy(self, params: SamplingParams) -> SelectionPolicy:
        """The request's selection policy: its fields, the engine's defaults, delimiters resolved to
        token ids (ValueError when they cannot be: text delimiters without a tokenizer)."""
        return SelectionPolicy(
            selection=params.selection,
            threshold=self.config.threshold if params.threshold is None else params.threshold,
            entropy_budget=DEFAULT_ENTROPY_BUDGET if params.entropy_budget is None else params.entropy_budget,
            delimiter_threshold=params.delimiter_threshold,
            delimiter_ids=self.delimiter_ids(params) if params.delimiter_threshold is not None else frozenset(),
        )

    def delimiter_ids(self, params: SamplingParams) -> frozenset[int]:
        """Token ids that end an adaptive sub-block: `delimiter_token_ids`, the end tokens (the tokenizer's
        stop tokens, the model's EOS, `stop_token_ids`) and every token whose text contains one of
        `delimiters` (None: DEFAULT_DELIMITERS when there is a tokenizer)."""
        ids = set(params.delimiter_token_ids) | set(params.stop_token_ids) | self._tokenizer_stop_ids
        texts = params.delimiters
        if texts is None:
            texts = DEFAULT_DELIMITERS if self.tokenizer is not None else ()
        if texts and self.tokenizer is None:
            raise ValueError("delimiters as text need a tokenizer; use delimiter_token_ids instead")
        for text in texts:
            ids |= self._tokens_containing(text)
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in ids):
            raise ValueError(f"delimiter_token_ids must be in [0, {vocab})")
        return frozenset(ids)

    def _find_tokens_containing(self, text: str) -> frozenset[int]:
        if self._vocab_text is None:  # once per engine: a batch decode of the vocabulary
            self._vocab_text = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        found = frozenset(i for i, t in enumerate(self._vocab_text) if text in t)
        if not found:
            raise ValueError(f"delimiters: no token of the tokenizer contains {text!r}")
        return found

    # -- helpers ------------------------------------------------------------------------------------
    def _default_num_pages(self, block_size: int, use_graphs: bool) -> int:
        """KV pages when EngineConfig.num_pages is unset: kv_cache_gib, or on CUDA gpu_memory_utilization of
        the device after weights and what steps need besides (`fdllm.engine.runner.StepMemory`); never more
        than max_num_seqs full-length sequences use."""
        mc, ecfg = self.model.config, self.engine_config
        page_bytes = KVCache.page_bytes(mc.num_hidden_layers, block_size, mc.n_kv_heads, mc.dim_per_head, self.model.dtype)
        pages_per_seq = -(-self.max_model_len // block_size)
        needed = ecfg.max_num_seqs * pages_per_seq
        if ecfg.kv_cache_gib is not None or self.model.device.type != "cuda":
            return max(1, min(int((ecfg.kv_cache_gib or 1.0) * 2**30) // page_bytes, needed))
        static_tokens = static_step_tokens(ecfg.max_num_seqs, block_size + 1)  # the largest static decode step
        workspace = 0
        if self.attention_backend == "triton":
            from fdllm.kernels.paged_attention import split_workspace_bytes

            workspace = split_workspace_bytes(mc.num_attention_heads, mc.dim_per_head, pages_per_seq * block_size)
        memory = StepMemory.profile(self.model, min(ecfg.max_prefill_tokens, self.max_model_len), static_tokens,
                                    use_graphs, workspace)
        log.info("KV sizing: %s", memory)
        return max(1, min(kv_budget_pages(page_bytes, ecfg.gpu_memory_utilization, self.model.device, memory.total), needed))

    @staticmethod
    def _notify(seq: Sequence, new: list[int], finished: bool) -> None:
        if seq.on_tokens is None:
            return
        try:
            seq.on_tokens(seq.request_id, new, finished)
        except Exception:  # a failing consumer must not stop the other requests' step
            log.exception("on_tokens callback of request %s failed", seq.request_id)

    def stop_token_ids_for(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a request of `params`: its `stop_token_ids`, and unless `ignore_eos` the
        tokenizer's EOS and end-of-turn tokens and the checkpoint's end tokens."""
        return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._tokenizer_stop_ids)

    def _finish(self, seq: Sequence, new: list[int] | None = None) -> GenerationResult:
        self._notify(seq, new or [], finished=True)
        ids = seq.output
        if seq.finish_reason == "stop" and ids and ids[-1] in seq.criteria.stop_token_ids:
            ids = ids[:-1]  # the stop token ends the text, as vLLM's: not its text (a special token's is none anyway)
        text = self._decode(ids)
        if seq.finish_reason == "stop" and seq.params.stop:
            text = seq.criteria.cut_text(text)
        return seq.result(time.perf_counter(), text)

    def _fail(self, seq: Sequence, exc: Exception) -> GenerationResult:
        """End a request that a step could not serve: pages back, consumer told, result with the error."""
        self.scheduler.finish(seq)
        seq.finish_reason = "error"
        self._notify(seq, [], finished=True)
        result = seq.result(time.perf_counter(), text="")
        result.error = f"{type(exc).__name__}: {exc}"
        return result

    @staticmethod
    def _prompt_list(prompts: Iterable[Prompt]) -> list[Prompt]:
        """`generate`'s and `score`'s prompts as a list (any iterable of prompts: a generator too). One
        string passed alone was read as one prompt per character and silently answered: a ValueError."""
        if isinstance(prompts, (str, bytes)):
            raise ValueError(f"prompts must be a list of prompts, got a {type(prompts).__name__}; wrap one prompt as [prompt]")
        if not isinstance(prompts, Iterable):
            raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        return list(prompts)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids (list[int]) instead")
            try:  # a lone surrogate ("\ud800", from a JSON escape or surrogateescape) is no UTF-8 text
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"the prompt is not valid Unicode text: {e.reason} at index {e.start}") from None
            return encode_prompt(self.tokenizer, prompt)
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        for i, t in enumerate(prompt):
            if not is_int(t):  # True would be read as token 1
                raise ValueError(f"a prompt's token ids are ints, got {type(t).__name__} at index {i}")
        return list(prompt)

    def _decode(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
        if params.mode != "ar" and self.config.mask_token_id is None:
            raise ValueError(
                f"mode {params.mode!r} needs a mask token id (BlockDiffusionConfig.mask_token_id); use mode='ar'"
            )
        self._check_fits(ids, params.max_new_tokens)
        vocab = self.model.config.vocab_size
        for name, token_ids in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids)):
            if max(token_ids, default=0) >= vocab:
                raise ValueError(f"{name} token ids must be in [0, {vocab}), got {max(token_ids)}")
        if params.mode == "diffusion" and self.config.mask_token_id in ids:
            raise ValueError(f"prompt holds the mask token (id {self.config.mask_token_id}), which diffusion mode "
                             "reads as a position to decode; mode='ar' or 'speculative' takes it as a token")

    def _check_fits(self, ids: list[int], new_tokens: int) -> None:
        """ValueError unless token ids `ids` followed by `new_tokens` tokens fit the model and the cache."""
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed (text that tokenizes to nothing is empty too)")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        total = len(ids) + new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({new_tokens}) = {total} "
                f"exceeds the context length max_model_len={self.max_model_len}"
            )
        pages = -(-total // self.config.block_size)
        if pages > self.num_pages:
            raise ValueError(
                f"the request needs {pages} KV pages but the cache has {self.num_pages}; "
                "shorten it or give the engine more pages"
            )
