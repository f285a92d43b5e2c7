"""The model runner: the only part of the engine that touches tensors.

`run` turns a step's works into one packed varlen forward [1, T] (every sequence's tokens back to
back, per-token positions, attention rows over the paged cache), reads each work's logit rows,
turns them into tokens and confidences (greedy batched; sampling per request with its generator),
applies the threshold rule, and brings the decisions to the host in one transfer.

Shape legend: T packed tokens, B works with logit rows, W logit rows per work (padded), V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fdllm.cache import KVCache, PagedAttention
from fdllm.decoding import greedy_confidence, sample_confidence, select_unmask
from fdllm.engine.sequence import Work
from fdllm.kernels import select_attention_backend
from fdllm.model import Transformer


@dataclass
class StepInputs:
    """A step's device inputs, built on the host in one place and copied once."""

    input_ids_1T: Tensor
    positions_1T: Tensor
    attention: PagedAttention
    logit_index_R: Tensor  # packed token index of each logit row, R = B * W
    candidate_BW: Tensor  # bool: the row may be accepted (padding rows never)
    threshold_B: Tensor  # fp32
    readers: list[int]  # index (into the step's works) of each of the B works that read logits


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, mask_token_id: int | None, attention_backend: str) -> None:
        """`attention_backend`: a name `fdllm.kernels.select_attention_backend` takes (the engine resolves "auto")."""
        self.model, self.cache, self.mask_token_id = model, cache, mask_token_id
        self.device = model.device
        self.attention_fn = select_attention_backend(attention_backend, self.device)

    @torch.inference_mode()
    def run(self, works: list[Work]) -> list[tuple[list[int], list[bool]]]:
        """Per work: (token, selected) for each of its logit rows (none for pure prefill chunks)."""
        inputs = self.prepare(works)
        logits_RV = self.model(
            inputs.input_ids_1T, inputs.positions_1T, cache=inputs.attention, logit_positions=inputs.logit_index_R
        )[0]
        out: list[tuple[list[int], list[bool]]] = [([], []) for _ in works]
        if not inputs.readers:
            return out
        B, W = inputs.candidate_BW.shape
        token_BW, prob_BW = (t.view(B, W) for t in greedy_confidence(logits_RV, self.mask_token_id))
        logits_BWV = logits_RV.view(B, W, -1)
        for b, i in enumerate(inputs.readers):
            w, p = works[i], works[i].seq.params
            if p.temperature > 0:  # only the work's real rows: padding must not consume its generator
                n = len(w.logit_rows)
                token_BW[b, :n], prob_BW[b, :n] = sample_confidence(
                    logits_BWV[b, :n], self.mask_token_id, p.temperature, p.top_p, p.top_k, w.seq.generator
                )
        select_BW = select_unmask(prob_BW, inputs.candidate_BW, inputs.threshold_B)
        tokens, selected = torch.stack([token_BW, select_BW.long()]).tolist()  # the step's one host sync
        for b, i in enumerate(inputs.readers):
            n = len(works[i].logit_rows)
            out[i] = (tokens[b][:n], [bool(s) for s in selected[b][:n]])
        return out

    def prepare(self, works: list[Work]) -> StepInputs:
        """Pack the works' tokens back to back; pad each reader's logit rows to W by repeating its last."""
        ids, positions, slots, rows = [], [], [], []
        index, candidates, thresholds, readers = [], [], [], []
        W = max(len(w.logit_rows) for w in works)
        for i, w in enumerate(works):
            offset = len(ids)
            pos = range(w.start, w.start + len(w.token_ids))
            ids += w.token_ids
            positions += pos
            slots += [w.seq.slot(p) for p in pos]
            rows += w.rows
            if w.logit_rows:
                pad = W - len(w.logit_rows)
                index += [offset + r for r in w.logit_rows] + [offset + w.logit_rows[-1]] * pad
                candidates.append(w.candidates + [False] * pad)
                thresholds.append(w.seq.threshold)
                readers.append(i)
        to = {"device": self.device, "non_blocking": True}
        return StepInputs(
            input_ids_1T=torch.tensor([ids]).to(**to),
            positions_1T=torch.tensor([positions]).to(**to),
            attention=PagedAttention.build(self.cache, slots, rows, self.attention_fn),
            logit_index_R=torch.tensor(index, dtype=torch.long).to(**to),
            candidate_BW=torch.tensor(candidates, dtype=torch.bool).reshape(len(readers), W).to(**to),
            threshold_B=torch.tensor(thresholds, dtype=torch.float32).to(**to),
            readers=readers,
        )
