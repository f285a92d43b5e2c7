"""Plain dataclasses the engine takes and returns: per-request sampling, engine sizing, results."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from fdllm.decoding import SELECTIONS
from fdllm.config import is_finite_number, is_int
from fdllm.kernels import ATTENTION_BACKENDS, FLASH_ATTN_PAGE_MULTIPLE, LINEAR_BACKENDS
from fdllm.quantization import QUANTIZATIONS, check_quantization

MODES = ("diffusion", "ar", "speculative")
# Sampling divides logits by the temperature: below this the division overflows fp32 on ordinary
# logit gaps (1e-30 turns a row into inf/nan), and above it the distribution is uniform for all uses.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0
# torch.Generator.manual_seed's range; seeds equal mod 2**64 (-1 and 2**64 - 1) draw one stream, as there
SEED_RANGE = (-(2**63), 2**64)
# Dividing a logit by the repetition penalty (< 1 favours repeats) must stay finite in fp32 (1e-300 made
# rows inf/nan, whose draws are garbage); past these bounds a penalty changes nothing more in practice.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
MAX_TOP_K = 2**31 - 1  # past any vocabulary (staged as int64: 2**63 could not be)
MAX_STOP_TOKEN_IDS = 64
DEFAULT_ENTROPY_BUDGET = 1.0  # gamma (nats) of selection="entropy_budget" when the request gives none
MAX_LOGIT_BIAS = 100.0  # |bias| (OpenAI's range: -100 bans a token, +100 forces it)
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
DEFAULT_DELIMITERS = ("\n",)  # adaptive sub-block boundaries: newline tokens (with a tokenizer) and the end tokens
MAX_DELIMITERS, MAX_DELIMITER_CHARS = 16, 32
MAX_NUM_SEQS = 1 << 16  # far past any batch a replica runs (vLLM's default is 256); 2**63 built buckets until OOM


def check_cache_salt(salt: object) -> None:
    """ValueError unless `salt` is None or a non-empty string: SamplingParams.cache_salt, Engine.score's."""
    if salt is not None and not (isinstance(salt, str) and salt):
        raise ValueError(f"cache_salt must be a non-empty string or None, got {salt!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request is decoded. Validated on construction (ValueError with the reason)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (max-probability confidence); > 0: sampling
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None  # per-request generator seed for sampling; None: nondeterministic
    stop_token_ids: tuple[int, ...] = ()  # added to the tokenizer's and the checkpoint's end tokens (unless ignore_eos)
    stop: tuple[str, ...] = ()  # stop strings; the output text ends before the first one
    threshold: float | None = None  # None: the engine's BlockDiffusionConfig.threshold
    # "ar": the autoregressive baseline on the same engine and cache; "speculative": drafts each block
    # in diffusion mode and verifies it with one causal forward, so the output is the model's own AR
    # output (token for token, greedy or sampled with the same seed) in fewer forwards. None: the
    # engine's `default_mode` (diffusion for a block-diffusion model, AR for a plain AR checkpoint).
    mode: str | None = None
    ignore_eos: bool = False  # True: only stop_token_ids/stop/max_new_tokens end the request
    # Selection policy of diffusion steps and speculative drafts (fdllm.decoding.SelectionPolicy, docs/method.md §5):
    # "threshold" (the paper's, with `threshold`) or "entropy_budget" (commit the lowest-entropy masked
    # positions while their summed entropy stays <= entropy_budget; always at least one).
    selection: str = "threshold"
    entropy_budget: float | None = None  # gamma in nats, >= 0; None: DEFAULT_ENTROPY_BUDGET. Only with "entropy_budget"
    # Adaptive sub-block boundary: a delimiter predicted in the current sub-block with confidence above
    # this ends the sub-block after it. None: fixed sub-blocks.
    delimiter_threshold: float | None = None
    # Delimiters as text, resolved by the engine's tokenizer to every token whose text contains one;
    # None: DEFAULT_DELIMITERS when the engine has a tokenizer. The end tokens (the tokenizer's stop
    # tokens, the model's EOS and stop_token_ids) are always delimiters.
    delimiters: tuple[str, ...] | None = None
    delimiter_token_ids: tuple[int, ...] = ()  # more delimiters, as token ids
    # Diffusion mode: the forward that opens a block (the previous block's commit, or the prompt's last
    # chunk) also runs the block's first denoising step, with the block's first token still masked,
    # and commits only what passes the selection rule: one forward fewer per block. An approximation
    # beyond the paper and docs/method.md (docs/decoding.md): outputs may differ from the plain schedule.
    block_lookahead: bool = False
    # Added to the logits of these token ids (OpenAI's logit_bias, values in [-100, 100]) at every
    # position the request decodes, before greedy selection or sampling, in every mode (a speculative
    # request's output is then AR's with the same bias). Confidences are the biased distribution's;
    # the entropy of selection="entropy_budget" stays the model's own, as with temperature.
    logit_bias: dict[int, float] | None = None
    # OpenAI's penalties, in [-2, 2]: each token's logits lose frequency_penalty x (times the request
    # generated it before the position decoded) + presence_penalty (if it did at all). Before means what
    # the step knows there: in diffusion mode, the output and the current block's offsets decoded
    # before it (parallel decoding decides a step's offsets without each other's counts); in AR and
    # speculative mode every token before it, so speculative's output is AR's with the same penalties.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF's and vLLM's, > 0: the logit z of every token in the prompt or generated before the position
    # becomes z / repetition_penalty if z > 0, else z x repetition_penalty (1: off); after the bias,
    # before the presence/frequency penalties (transformers' and vLLM's order).
    repetition_penalty: float = 1.0
    # vLLM's: the request's stop tokens (EOS, stop_token_ids) cannot be decoded at its first min_tokens
    # output positions (their logits are -inf there); stop strings still end it.
    min_tokens: int = 0
    # vLLM's: mixed into the request's prefix-cache keys, so that it shares cached blocks only with requests
    # of the same salt. Without it, any client could tell from a response's cached tokens (or its time to
    # first token) whether another client had sent a prompt: tenants of one server give each their own.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        """Reject values that could not be decoded meaningfully, before they reach a step: one bad
        request must fail alone at the boundary, never inside a batch other requests share."""
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not is_finite_number(self.temperature) or not (
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE
        ):
            raise ValueError(
                f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {self.temperature!r}"
            )
        if not is_finite_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an int in [0, {MAX_TOP_K}] (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise ValueError(f"seed must be an int in [-2**63, 2**64), got {self.seed!r}")
        if self.threshold is not None and (not is_finite_number(self.threshold) or not 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be a number in (0, 1], got {self.threshold!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None (the engine's default), got {self.mode!r}")
        for name in ("ignore_eos", "block_lookahead"):  # a truthy "false" from a form or CLI would pass for True
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.block_lookahead and self.mode not in (None, "diffusion"):  # None: checked once the engine resolves it
            raise ValueError(f"block_lookahead applies to mode='diffusion' only, got mode={self.mode!r} "
                             "(speculative mode's own lookahead is EngineConfig.speculative_lookahead)")
        check_cache_salt(self.cache_salt)
        self._check_selection()
        self._check_adjustments()
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(
                f"stop must be a tuple or list of non-empty strings (wrap a single one as (s,)), got {self.stop!r}"
            )
        if (
            not isinstance(self.stop_token_ids, (tuple, list))
            or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS
            or not all(is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise ValueError(
                f"stop_token_ids must be a tuple of at most {MAX_STOP_TOKEN_IDS} token ids, got {self.stop_token_ids!r}"
            )

    @functools.cached_property
    def adjusts_logits(self) -> bool:
        """Whether its tokens are decided from logits it adjusts (bias, penalties): the runner's biased rows.
        Read per sequence per step; the parameters are frozen, so it is computed once."""
        return (bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)
                or self.repetition_penalty != 1 or self.min_tokens > 0)

    def _check_adjustments(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens!r}")
        if not is_finite_number(self.repetition_penalty) or not (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ValueError(f"repetition_penalty must be a number in [{MIN_REPETITION_PENALTY:g}, "
                             f"{MAX_REPETITION_PENALTY:g}] (1: off), got {self.repetition_penalty!r}")
        bias = self.logit_bias
        if bias is None:
            return
        if (not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS_TOKENS
                or not all(is_int(t) and t >= 0 and is_finite_number(v) and abs(v) <= MAX_LOGIT_BIAS for t, v in bias.items())):
            raise ValueError(f"logit_bias must map at most {MAX_LOGIT_BIAS_TOKENS} token ids to numbers in "
                             f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}"[:500])

    def _check_selection(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.entropy_budget is not None:
            if not is_finite_number(self.entropy_budget) or self.entropy_budget < 0:
                raise ValueError(f"entropy_budget must be a number >= 0 (nats), got {self.entropy_budget!r}")
            if self.selection != "entropy_budget":
                raise ValueError("entropy_budget applies to selection='entropy_budget' only; set selection too")
        if self.threshold is not None and self.selection == "entropy_budget":
            raise ValueError("threshold does not apply to selection='entropy_budget' (entropy_budget replaces it)")
        if self.delimiter_threshold is not None and (
            not is_finite_number(self.delimiter_threshold) or not 0.0 <= self.delimiter_threshold <= 1.0
        ):
            raise ValueError(f"delimiter_threshold must be a number in [0, 1], got {self.delimiter_threshold!r}")
        if self.delimiters is not None and (
            not isinstance(self.delimiters, (tuple, list)) or len(self.delimiters) > MAX_DELIMITERS
            or not all(isinstance(d, str) and 0 < len(d) <= MAX_DELIMITER_CHARS for d in self.delimiters)
        ):
            raise ValueError(
                f"delimiters must be a tuple of at most {MAX_DELIMITERS} non-empty strings of at most "
                f"{MAX_DELIMITER_CHARS} characters, got {self.delimiters!r}"
            )
        if not isinstance(self.delimiter_token_ids, (tuple, list)) or len(self.delimiter_token_ids) > MAX_STOP_TOKEN_IDS or not all(
            is_int(t) and t >= 0 for t in self.delimiter_token_ids
        ):
            raise ValueError(f"delimiter_token_ids must be a tuple of at most {MAX_STOP_TOKEN_IDS} token ids, "
                             f"got {self.delimiter_token_ids!r}")
        if (self.delimiters or self.delimiter_token_ids) and self.delimiter_threshold is None:  # () asks for nothing
            raise ValueError("delimiters and delimiter_token_ids need delimiter_threshold (the adaptive sub-block boundary)")


# EngineConfig fields that take one of a few names (checked in its __post_init__): what CLIs offer
# as their flags' choices (`serve.app.add_engine_arguments`)
ENGINE_CHOICES: dict[str, tuple[str, ...]] = {"quantization": QUANTIZATIONS, "attention_backend": ATTENTION_BACKENDS,
                                              "linear_backend": LINEAR_BACKENDS}


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Sizing and execution of the engine: KV pages, batch, prefill budget, attention backend, graphs."""

    num_pages: int | None = None  # KV pages (one block each); None: sized by kv_cache_gib / gpu_memory_utilization
    kv_cache_gib: float | None = None  # None: gpu_memory_utilization on CUDA, 1 GiB elsewhere
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory for weights + activations + KV cache
    max_num_seqs: int = 64  # running sequences per step (CUDA-graph batches: up to 4x as many entries, rows cut)
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per step (chunked by block)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    attention_backend: str = "auto"  # "auto" (triton on CUDA, else torch) | "torch" | "triton" | "flash_attn"
    enforce_eager: bool = False  # True: never capture CUDA graphs (on by default on CUDA with triton/flash_attn)
    # With the Triton backend: RMSNorm and RoPE as Triton kernels, q/k/v and gate/up as one GEMM each
    # (fdllm.kernels.fused_ops, Transformer.fuse_projections). False: eager torch's ops (A/B timing, numerics)
    fuse_kernels: bool = True
    # The fused forward's projections: "torch" (cuBLAS), or "triton": fdllm.kernels.linear's GEMM for steps of
    # at most 32 rows (batch-1 decode), row-invariant, with the MLP's SiLU gate in its prologue; larger steps
    # stay on torch's. Needs fuse_kernels with the Triton attention backend, and unquantized weights. Not yet
    # the default: whether it beats cuBLAS is the GPU suite's "triton linears" rows to measure (docs/gpu.md).
    linear_backend: str = "torch"
    # True: every decode step runs as max_num_seqs entries of one block each (longer rows cut in two),
    # so no GEMM ever changes shape and a request's logits are bitwise the same whatever else runs (the
    # kernels are batch-invariant either way). Costs speed. Prefill steps keep their own shapes, as do
    # steps that need more than max_num_seqs entries (lookaheads, two rows per request, of a nearly
    # full batch). It also reserves each request's every KV page at admission (prompt + max_new_tokens),
    # so no request is ever preempted: a preempted request's recomputed K/V need not be bitwise the
    # K/V it had, and a diffusion request with the sub-block cache resumes with a refresh step.
    deterministic: bool = False
    # Weights quantized when the engine is built (fdllm.quantization: "int8" | "int4" | "fp8"), in place:
    # the model passed to Engine is changed. None: the model's own dtype.
    quantization: str | None = None
    # Speculative mode: a verify forward (and the prompt's last prefill chunk) also drafts the next
    # round, so a fully accepted round costs one forward, not a draft plus a verify. Same tokens either way.
    speculative_lookahead: bool = True
    # ... but only in steps with at most this many running requests (None: every step; with CUDA graphs, up to
    # max_num_seqs / 2, the verifies with lookahead rows that a captured step holds: a larger value runs the
    # steps past that eagerly, with a warning at start-up). The lookahead adds a
    # block of query rows to each verify: a latency win that can cost throughput where forwards are
    # compute-bound (large batches; vLLM's speculative_disable_by_batch_size plays the same role).
    speculative_lookahead_max_batch: int | None = None
    # Once built, collect then `gc.freeze()` the process's heap (torch, transformers, the model: a few
    # hundred thousand objects), so the collector's oldest generation stops re-scanning it: at a full
    # batch that full scan stalls one step in ~60 by 70-200 ms (vLLM and SGLang freeze theirs too).
    # Process-wide: objects alive now are never collected as cycles later (`gc.unfreeze()` undoes it).
    freeze_gc: bool = True
    # Automatic prefix caching (vLLM's name): the K/V pages of prompt and committed blocks stay cached
    # after their request, and a request whose prompt starts with the same blocks (a system prompt,
    # a few-shot context, the earlier turns of a chat) shares them instead of prefilling them again.
    # Cached pages count as free and are evicted least recently used first. Same tokens either way.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_tokens", *_OPTIONAL_COUNTS):
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL_COUNTS) and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be an int >= 1{' or None' * (name in _OPTIONAL_COUNTS)}, got {value!r}")
        if self.max_num_seqs > MAX_NUM_SEQS:  # the static steps' batch buckets and activations grow with it
            raise ValueError(f"max_num_seqs must be at most {MAX_NUM_SEQS}, got {self.max_num_seqs}")
        if self.kv_cache_gib is not None and (not is_finite_number(self.kv_cache_gib) or self.kv_cache_gib <= 0):
            raise ValueError(f"kv_cache_gib must be a number > 0 or None, got {self.kv_cache_gib!r}")
        if not is_finite_number(self.gpu_memory_utilization) or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("enforce_eager", "fuse_kernels", "deterministic", "speculative_lookahead", "freeze_gc",
                     "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {LINEAR_BACKENDS}, got {self.linear_backend!r}")
        if self.linear_backend == "triton" and (not self.fuse_kernels or self.quantization is not None):
            raise ValueError("linear_backend='triton' runs in the fused forward on unquantized weights: it needs "
                             f"fuse_kernels=True and quantization=None, got fuse_kernels={self.fuse_kernels}, "
                             f"quantization={self.quantization!r}")
        check_quantization(self.quantization)  # the name, and torchao installed (the device's part: check_for)

    def check_for(self, block_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Refuse settings a model of `block_size`-token blocks (a KV page holds one), on `device` in
        `dtype`, cannot run: known from the checkpoint's config alone, so the CLIs and the app builder
        check them before any model is loaded (`device` None: the device's part waits for the engine)."""
        if self.attention_backend == "flash_attn" and block_size % FLASH_ATTN_PAGE_MULTIPLE:
            raise ValueError(
                f"attention_backend='flash_attn' needs KV pages of a multiple of {FLASH_ATTN_PAGE_MULTIPLE} tokens, "
                f"but a page holds one diffusion block ({block_size} tokens); use 'triton' (the CUDA default)"
            )
        if self.max_prefill_tokens < block_size:
            raise ValueError(f"max_prefill_tokens ({self.max_prefill_tokens}) must be >= block_size ({block_size})")
        check_quantization(self.quantization, device, dtype)


_OPTIONAL_COUNTS = ("num_pages", "max_model_len", "speculative_lookahead_max_batch")  # EngineConfig's: None or >= 1


@dataclass(kw_only=True)
class GenerationResult:
    """A finished request: generated tokens only (cut after a stop), text, and per-request stats."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length" | "abort" | "error" (a failure inside a step)
    error: str | None = None  # with finish_reason "error": what failed (the details are in the engine log)
    num_forwards: int = 0  # forward passes this request took part in (speculative: drafts and verifies)
    # speculative mode: draft tokens proposed to a verify forward, and those it confirmed; a verify checks a whole
    # draft, so both count positions past a stop the round settled (they measure drafting, not the output)
    num_drafted: int = 0
    num_accepted: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not computed)
    num_preemptions: int = 0  # times the request gave its KV pages back and was prefilled again
    time_to_first_token_s: float | None = None  # None: no token was produced
    latency_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.num_forwards if self.num_forwards else 0.0

    @property
    def forwards_per_token(self) -> float:
        return self.num_forwards / len(self.token_ids) if self.token_ids else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Speculative mode: the fraction of draft tokens the causal verify confirmed (0 without drafts)."""
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0


@dataclass(frozen=True)
class SequenceLogprobs:
    """`Engine.score`'s answer for one token sequence: position i's causal log-probability
    log p(token_i | tokens before it) (None at position 0, which nothing predicts, and before the
    call's `score_from`), and the `top_logprobs` most likely tokens there as (token id,
    log-probability), most likely first (empty where the log-probability is None). The mask token is
    never a prediction (-inf when scored)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]
