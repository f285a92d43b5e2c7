"""Logit adjustments (SamplingParams' logit_bias, repetition/presence/frequency penalties and
min_tokens) as a step stages them on the host and applies them on the device.

A row's penalties depend on every token known before the position it predicts: the prompt (the
repetition penalty's), the output so far and, within the current block or draft, the offsets
decoded before it. Listing them per row would cost rows x history host work every step (the
first version did). Instead, as vLLM keeps per-request token counts on the device, the host hands
over each request's history once (sparse token lists) and per row only the few block or draft
tokens it knows besides; the device builds dense [rows, vocab] counts a head chunk at a time,
beside the logits it already holds.

Shape legend: B adjusted rows, X adjusted requests, K bias entries, H prompt/output history
entries, W recent (block or draft) entries, R a head chunk's rows, V the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from fdllm.engine.sequence import Sequence


@dataclass(frozen=True)
class Adjustments:
    """How the step's adjusted rows change their logits z, in transformers' and vLLM's order:
    z + bias; then z / repetition (z > 0) or z x repetition for every token of the prompt or generated
    before the row's position; then minus frequency x count + presence for each token generated
    before it. Rows (and requests) are in candidate order; entries are sorted by row or request."""

    row_request: np.ndarray  # [B] int64, nondecreasing: the row's request, 0..X-1
    repetition: np.ndarray  # [X] float64 (1: off)
    frequency: np.ndarray  # [X] float64
    presence: np.ndarray  # [X] float64
    bias_row: np.ndarray  # [K] int64, sorted
    bias_token: np.ndarray  # [K] int64
    bias_value: np.ndarray  # [K] float64 (logit_bias; -inf bans a stop token before min_tokens)
    prompt_request: np.ndarray  # [H] int64, sorted: prompt tokens (the repetition penalty's)
    prompt_token: np.ndarray  # [H] int64
    output_request: np.ndarray  # [H'] int64, sorted: generated tokens every row of the request knows
    output_token: np.ndarray  # [H'] int64
    recent_row: np.ndarray  # [W] int64, sorted: generated tokens a row knows besides those (its block's, draft's)
    recent_token: np.ndarray  # [W] int64

    def __len__(self) -> int:
        return len(self.row_request)

    @property
    def num_requests(self) -> int:
        return len(self.repetition)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def join(self, other: Adjustments) -> Adjustments:
        """These rows, then `other`'s (its rows and requests numbered after ours)."""
        if not len(self) or not len(other):
            return self if len(self) else other
        X = self.num_requests
        B = len(self)
        moved = {"row_request": X, "prompt_request": X, "output_request": X, "recent_row": B, "bias_row": B}
        return Adjustments(**{name: np.concatenate([mine, getattr(other, name) + moved.get(name, 0)])
                              for name, mine in self.arrays().items()})


_EMPTY = np.zeros(0, dtype=np.int64)
NO_ADJUSTMENTS = Adjustments(*([_EMPTY] * 13))


class AdjustmentsBuilder:
    """Gathers a step's `Adjustments`, one adjusted sequence at a time, into one array per field: the
    per-work part is a few numpy calls (its history in one conversion), whatever its length."""

    def __init__(self) -> None:
        self.rows_per_request: list[int] = []
        self.recent_known: list[int] = []
        self.scalars: list[tuple[float, float, float]] = []  # per request: repetition, frequency, presence
        self.bias: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per request with entries
        self.prompt: list[np.ndarray] = []
        self.output: list[np.ndarray] = []
        self.recent: list[np.ndarray] = []

    def add(self, seq: Sequence, predicted: list[int]) -> None:
        """The sequence's candidate rows of this step, by the position each predicts (ascending).

        "Before the position a row predicts" means what the step knows there: the prompt and output,
        the current block's decoded offsets (diffusion: a step decides its offsets in parallel), the
        draft a verify checks (speculative: each verify row sees the draft before it, as AR would have
        generated it), never masks. Penalties count generated tokens only (vLLM's counts)."""
        params = seq.params
        P, first_row = len(seq.prompt), len(self.recent_known)
        self.rows_per_request.append(len(predicted))
        self.scalars.append((params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
        stops = sorted(seq.criteria.stop_token_ids) if params.min_tokens else []
        early = [i for i, p in enumerate(predicted) if p - P < params.min_tokens] if stops else []
        if params.logit_bias or early:
            self.bias.append(_bias_entries(params.logit_bias or {}, len(predicted), early, stops, first_row))

        penalized = params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty
        if not penalized:
            self.recent_known += [0] * len(predicted)
            for part in (self.prompt, self.output, self.recent):
                part.append(_EMPTY)
            return
        # Tokens before `cut` are known to every row; each row knows the recent ones up to its position.
        start = 0 if params.repetition_penalty != 1 else P  # the prompt counts for the repetition penalty only
        history = _known(seq, start, max(P, predicted[-1]))  # positions [start, ...)
        cut = min(max(P, predicted[0]), start + len(history)) - start
        mask = -1 if seq.mask_token_id is None else seq.mask_token_id  # never counted
        prompt, output, recent = history[: P - start], history[P - start : cut], history[cut:]
        self.prompt.append(prompt[prompt != mask])
        self.output.append(output[output != mask])
        self.recent.append(np.where(recent == mask, -1, recent))  # masks stay in place (-1): rows index by position
        n = len(history) - cut
        self.recent_known += [min(max(p - start - cut, 0), n) for p in predicted]

    def build(self) -> Adjustments:
        if not self.rows_per_request:
            return NO_ADJUSTMENTS
        requests = np.arange(len(self.rows_per_request))
        per_request = lambda parts: np.repeat(requests, [len(p) for p in parts])  # noqa: E731
        row_request = np.repeat(requests, self.rows_per_request)
        bias = [np.concatenate(part) for part in zip(*self.bias)] if self.bias else [_EMPTY, _EMPTY, np.zeros(0)]
        return Adjustments(
            row_request, *np.array(self.scalars, dtype=np.float64).T, *bias,
            per_request(self.prompt), np.concatenate(self.prompt), per_request(self.output), np.concatenate(self.output),
            *self._recent_entries(row_request),
        )

    def _recent_entries(self, row_request: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, token) for each recent token each row knows (its request's first recent_known), masks
        left out: a few numpy calls for the whole step."""
        known = np.array(self.recent_known, dtype=np.int64)  # [B]
        lengths = np.array([len(p) for p in self.recent])
        first = (np.cumsum(lengths) - lengths)[row_request]  # [B] where the row's request's recent tokens start
        row = np.repeat(np.arange(len(known)), known)
        index = np.repeat(first - (np.cumsum(known) - known), known) + np.arange(len(row))
        token = np.concatenate(self.recent)[index]
        keep = token >= 0
        return row[keep], token[keep]


def _bias_entries(bias: dict[int, float], B: int, early: list[int], stops: list[int],
                  first_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, token, value) entries, sorted by row, of B rows numbered from `first_row`: the bias at
    every row, and the stop tokens at -inf at the rows `early` (before min_tokens; the entries add up)."""
    tokens = np.fromiter(bias, np.int64, len(bias))
    values = np.fromiter(bias.values(), np.float64, len(bias))
    row, token, value = np.repeat(np.arange(B), len(bias)), np.tile(tokens, B), np.tile(values, B)
    if early:
        row = np.concatenate([row, np.repeat(early, len(stops))])
        token = np.concatenate([token, np.tile(np.array(stops, dtype=np.int64), len(early))])
        value = np.concatenate([value, np.full(len(early) * len(stops), -np.inf)])
        order = np.argsort(row, kind="stable")
        row, token, value = row[order], token[order], value[order]
    return row + first_row, token, value


def _known(seq: Sequence, a: int, b: int) -> np.ndarray:
    """The tokens the sequence knows at positions [a, b) (int64, read only): its tokens, then its
    current block or draft (masks where undecoded)."""
    tokens = seq.token_array()
    n = len(tokens)
    if b <= n:
        return tokens[a:b]
    rest = seq.block if seq.block is not None else seq.draft or []
    return np.concatenate([tokens[a:], np.array(rest[max(a - n, 0) : b - n], dtype=np.int64)])


@dataclass(frozen=True)
class ChunkAdjustments:
    """A head chunk's adjustments as device tensors (slices of the step's staged sections), its rows
    and requests numbered from 0."""

    row_request: Tensor  # [R]
    repetition: Tensor  # [X] fp32
    frequency: Tensor  # [X] fp32
    presence: Tensor  # [X] fp32
    bias: tuple[Tensor, Tensor, Tensor]  # (row, token, value fp32)
    prompt: tuple[Tensor, Tensor]  # (request, token)
    output: tuple[Tensor, Tensor]  # (request, token)
    recent: tuple[Tensor, Tensor]  # (row, token)
    num_requests: int
    penalized: bool  # some row has a penalty (else only the bias applies)

    @classmethod
    def of_rows(cls, adj: Adjustments, get: Callable[[str, torch.dtype], Tensor], a: int, b: int) -> ChunkAdjustments:
        """Rows [a, b) of `adj`, whose arrays the step staged: `get(name, dtype)` is a section on the device."""
        x0, x1 = int(adj.row_request[a]), int(adj.row_request[b - 1]) + 1

        def entries(key: str, lo: int, hi: int, *names: str, shift: int = 0) -> tuple[Tensor, ...]:
            i, j = np.searchsorted(getattr(adj, key), [lo, hi]).tolist()
            parts = [get(name, torch.float32 if name == "bias_value" else torch.int64)[i:j] for name in (key, *names)]
            return (parts[0] - shift if shift else parts[0], *parts[1:])

        floats = [get(name, torch.float32)[x0:x1] for name in ("repetition", "frequency", "presence")]
        requests = slice(x0, x1)
        penalized = bool((adj.repetition[requests] != 1).any() or adj.frequency[requests].any()
                         or adj.presence[requests].any())
        row_request = get("row_request", torch.int64)[a:b]
        return cls(row_request - x0 if x0 else row_request, *floats,
                   entries("bias_row", a, b, "bias_token", "bias_value", shift=a),
                   entries("prompt_request", x0, x1, "prompt_token", shift=x0),
                   entries("output_request", x0, x1, "output_token", shift=x0),
                   entries("recent_row", a, b, "recent_token", shift=a), x1 - x0, penalized)


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
    counts_RV.index_put_(adj.recent, torch.ones(len(adj.recent[1]), device=dev), accumulate=True)
    counted_RV = counts_RV > 0
    rep_R1, frequency_R1, presence_R1 = (x[adj.row_request, None] for x in (adj.repetition, adj.frequency, adj.presence))
    z = torch.where(prompt_RV | counted_RV, torch.where(z > 0, z / rep_R1, z * rep_R1), z)
    return z - (frequency_R1 * counts_RV + presence_R1 * counted_RV)
