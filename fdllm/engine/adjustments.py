"""Logit adjustments (SamplingParams' logit_bias, repetition/presence/frequency penalties and
min_tokens) as a step stages them on the host and applies them on the device.

A row's penalties depend on every token known before the position it predicts: the prompt (the
repetition penalty's), the output so far and, within the current block or draft, the offsets
decoded before it. Listing them per row would cost rows x history host work every step (the
first version did: ~20 ms a step at batch 64). Instead, as vLLM keeps per-request token counts on
the device, the host hands over each request's history once (sparse token lists) and, per row,
only how much of the request's recent tokens (the block or draft) it knows; the device builds
dense [rows, vocab] counts a head chunk at a time, beside the logits it already holds.

Shape legend: B adjusted rows, X adjusted requests, K bias entries, H prompt/output history
entries, W recent entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from fdllm.engine.sequence import Sequence, Work


@dataclass(frozen=True)
class Adjustments:
    """How the step's adjusted rows change their logits z, in transformers' and vLLM's order:
    z + bias; then z / repetition (z > 0) or z x repetition for every token of the prompt or generated
    before the row's position; then minus frequency x count + presence for each token generated
    before it. Rows (and requests) are in candidate order; entries are sorted by row or request."""

    row_request: np.ndarray  # [B] int64, nondecreasing: the row's request, 0..X-1
    repetition: np.ndarray  # [B] float64 (1: off)
    frequency: np.ndarray  # [B] float64
    presence: np.ndarray  # [B] float64
    recent_known: np.ndarray  # [B] int64: how many of its request's recent tokens the row knows
    bias_row: np.ndarray  # [K] int64, sorted
    bias_token: np.ndarray  # [K] int64
    bias_value: np.ndarray  # [K] float64 (logit_bias; -inf bans a stop token before min_tokens)
    prompt_request: np.ndarray  # [H] int64, sorted: prompt tokens (the repetition penalty's)
    prompt_token: np.ndarray  # [H] int64
    output_request: np.ndarray  # [H'] int64, sorted: generated tokens every row of the request knows
    output_token: np.ndarray  # [H'] int64
    recent_request: np.ndarray  # [W] int64, sorted: generated tokens past those, in position order
    recent_offset: np.ndarray  # [W] int64: the token's index among its request's recent tokens
    recent_token: np.ndarray  # [W] int64, -1 where still masked

    def __len__(self) -> int:
        return len(self.row_request)

    @property
    def num_requests(self) -> int:
        return int(self.row_request[-1]) + 1 if len(self) else 0

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def join(self, other: Adjustments) -> Adjustments:
        """These rows, then `other`'s (its rows and requests after ours)."""
        return Adjustments.concat([self, other])

    @staticmethod
    def concat(parts: list[Adjustments]) -> Adjustments:
        """The parts' rows in order, each part's rows and requests numbered after the previous parts'."""
        parts = [p for p in parts if len(p)]
        if len(parts) <= 1:
            return parts[0] if parts else NO_ADJUSTMENTS
        first_request = np.cumsum([0] + [p.num_requests for p in parts[:-1]])
        first_row = np.cumsum([0] + [len(p) for p in parts[:-1]])
        moved = {name: first_request for name in ("row_request", "prompt_request", "output_request", "recent_request")}
        moved["bias_row"] = first_row

        def cat(name: str) -> np.ndarray:
            arrays = [getattr(p, name) for p in parts]
            if name in moved:
                arrays = [a + shift for a, shift in zip(arrays, moved[name].tolist())]
            return np.concatenate(arrays)

        return Adjustments(**{f.name: cat(f.name) for f in fields(Adjustments)})


_EMPTY = np.zeros(0, dtype=np.int64)
NO_ADJUSTMENTS = Adjustments(*([_EMPTY] * 15))


def work_adjustments(work: Work, rows: list[int]) -> Adjustments:
    """The `Adjustments` of one work's candidate logit rows `rows` (ascending), as request 0.

    "Before the position a row predicts" means what the step knows there: the prompt and output,
    the current block's decoded offsets (diffusion: a step decides its offsets in parallel), the
    draft a verify checks (speculative: each verify row sees the draft before it, as AR would have
    generated it), never masks. Penalties count generated tokens only (vLLM's counts)."""
    seq, params = work.seq, work.seq.params
    B, P, mask = len(rows), len(seq.prompt), seq.mask_token_id
    predicted = np.array([work.start + work.logit_rows[r] + 1 for r in rows], dtype=np.int64)  # the token shift
    per_row = lambda value: np.full(B, value, dtype=np.float64)  # noqa: E731

    bias = params.logit_bias or {}
    bias_row = np.repeat(np.arange(B), len(bias))
    bias_token = np.tile(np.fromiter(bias, np.int64, len(bias)), B)
    bias_value = np.tile(np.fromiter(bias.values(), np.float64, len(bias)), B)
    stops = sorted(seq.criteria.stop_token_ids) if params.min_tokens else []
    early = np.flatnonzero(predicted - P < params.min_tokens) if stops else _EMPTY
    if len(early):  # stop tokens banned at output positions before min_tokens (the entries accumulate)
        bias_row = np.concatenate([bias_row, np.repeat(early, len(stops))])
        bias_token = np.concatenate([bias_token, np.tile(np.array(stops, dtype=np.int64), len(early))])
        bias_value = np.concatenate([bias_value, np.full(len(early) * len(stops), -np.inf)])
        order = np.argsort(bias_row, kind="stable")
        bias_row, bias_token, bias_value = bias_row[order], bias_token[order], bias_value[order]

    prompt = output = recent = _EMPTY
    recent_known = np.zeros(B, dtype=np.int64)
    if params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
        # Tokens before `cut` are known to every row; each row knows the recent ones up to its position.
        first = 0 if params.repetition_penalty != 1 else P  # the prompt counts for the repetition penalty only
        cut, end = max(P, int(predicted[0])), max(P, int(predicted[-1]))
        history = np.array(_known(seq, first, end), dtype=np.int64)  # positions [first, end)
        cut = min(cut, first + len(history))
        if mask is not None:
            history[history == mask] = -1
        prompt, output, recent = history[: P - first], history[P - first : cut - first], history[cut - first :]
        prompt, output = prompt[prompt >= 0], output[output >= 0]
        recent_known = np.clip(predicted - cut, 0, len(recent))
    zeros = lambda n: np.zeros(n, dtype=np.int64)  # noqa: E731
    return Adjustments(zeros(B), per_row(params.repetition_penalty), per_row(params.frequency_penalty),
                       per_row(params.presence_penalty), recent_known, bias_row, bias_token, bias_value,
                       zeros(len(prompt)), prompt, zeros(len(output)), output,
                       zeros(len(recent)), np.arange(len(recent)), recent)


def _known(seq: Sequence, a: int, b: int) -> list[int]:
    """The tokens the sequence knows at positions [a, b): its tokens, then its current block or draft."""
    tokens, rest = seq.tokens, seq.block if seq.block is not None else seq.draft or []
    n = len(tokens)
    return tokens[a:b] if b <= n else tokens[a:] + rest[max(a - n, 0) : b - n]


@dataclass(frozen=True)
class ChunkAdjustments:
    """A head chunk's adjustments as device tensors (slices of the step's staged sections), its rows
    and requests numbered from 0."""

    row_request: Tensor  # [R]
    repetition: Tensor  # [R] fp32
    frequency: Tensor  # [R] fp32
    presence: Tensor  # [R] fp32
    recent_known: Tensor  # [R]
    bias: tuple[Tensor, Tensor, Tensor]  # (row, token, value fp32)
    prompt: tuple[Tensor, Tensor]  # (request, token)
    output: tuple[Tensor, Tensor]  # (request, token)
    recent: tuple[Tensor, Tensor, Tensor]  # (request, offset, token)
    num_requests: int
    recent_width: int
    penalized: bool  # some row has a penalty (else only the bias applies)

    @classmethod
    def slice(cls, adj: Adjustments, get: Callable[[str, torch.dtype], Tensor], a: int, b: int) -> ChunkAdjustments:
        """Rows [a, b) of `adj`, whose arrays the step staged: `get(name, dtype)` is a section on the device."""
        x0, x1 = int(adj.row_request[a]), int(adj.row_request[b - 1]) + 1

        def entries(key: str, lo: int, hi: int, *names: str, shift: int = 0) -> tuple[Tensor, ...]:
            i, j = np.searchsorted(getattr(adj, key), [lo, hi]).tolist()
            return tuple(get(name, torch.float32 if name == "bias_value" else torch.int64)[i:j] - (shift if name == key else 0)
                         for name in (key, *names))

        floats = [get(name, torch.float32)[a:b] for name in ("repetition", "frequency", "presence")]
        rows = slice(a, b)
        penalized = bool((adj.repetition[rows] != 1).any() or adj.frequency[rows].any() or adj.presence[rows].any())
        recent = entries("recent_request", x0, x1, "recent_offset", "recent_token", shift=x0)
        return cls(get("row_request", torch.int64)[a:b] - x0, *floats, get("recent_known", torch.int64)[a:b],
                   entries("bias_row", a, b, "bias_token", "bias_value", shift=a),
                   entries("prompt_request", x0, x1, "prompt_token", shift=x0),
                   entries("output_request", x0, x1, "output_token", shift=x0),
                   recent, x1 - x0, _recent_width(adj, x0, x1), penalized)


def _recent_width(adj: Adjustments, x0: int, x1: int) -> int:
    """The most recent tokens a request of [x0, x1) has (its offsets count from 0)."""
    i, j = np.searchsorted(adj.recent_request, [x0, x1]).tolist()
    return int(adj.recent_offset[i:j].max()) + 1 if j > i else 0


def adjust_logits(logits_RV: Tensor, adj: ChunkAdjustments) -> Tensor:
    """The chunk's logits adjusted (a new tensor): see `Adjustments`. Counts are built densely, one
    [R, V] fp32 tensor beside the logits, from the requests' sparse histories; adding ones is exact,
    so the result does not depend on the order of the device's atomic adds."""
    row, token, value = adj.bias
    z = logits_RV.index_put((row, token), value, accumulate=True)
    if not adj.penalized:
        return z
    X, V, dev = adj.num_requests, logits_RV.shape[1], logits_RV.device
    counts_XV = torch.zeros(X, V, device=dev)
    counts_XV.index_put_(adj.output, torch.ones(len(adj.output[1]), device=dev), accumulate=True)
    prompt_XV = torch.zeros(X, V, dtype=torch.bool, device=dev)
    prompt_XV.index_put_(adj.prompt, torch.ones(len(adj.prompt[1]), dtype=torch.bool, device=dev))
    counts_RV, prompt_RV = counts_XV[adj.row_request], prompt_XV[adj.row_request]
    if adj.recent_width:
        request, offset, token = adj.recent
        recent_XW = torch.full((X, adj.recent_width), -1, dtype=torch.int64, device=dev)
        recent_XW[request, offset] = token
        recent_RW = recent_XW[adj.row_request]
        known_RW = (torch.arange(adj.recent_width, device=dev) < adj.recent_known[:, None]) & (recent_RW >= 0)
        counts_RV.scatter_add_(1, recent_RW.clamp(min=0), known_RW.float())
    counted_RV = counts_RV > 0
    rep_R1 = adj.repetition[:, None]
    z = torch.where(prompt_RV | counted_RV, torch.where(z > 0, z / rep_R1, z * rep_R1), z)
    return z - (adj.frequency[:, None] * counts_RV + adj.presence[:, None] * counted_RV)
