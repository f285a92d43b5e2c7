"""The model runner: the only part of the engine that touches tensors.

`run` turns a step's works into one packed varlen forward [1, T] (every sequence's tokens back to
back, per-token positions, attention rows over the paged cache), reads each work's logit rows,
turns them into tokens and confidences (greedy batched; sampling per request with its generator),
applies the threshold rule, and brings the decisions to the host in one transfer. With the Triton
backend greedy rows never materialise logits: the fused confidence kernel reduces the vocab
straight from the final hidden states, and only sampling works get an LM-head matmul.

Shape legend: T packed tokens, B works with logit rows, W logit rows per work (padded), R = B * W,
S works that sample, D model dim, V vocab.
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
    samplers: list[int]  # index (into readers, 0..B-1) of each of the S works that sample (Work.samples)
    sampler_index_S: Tensor  # the same, on the device


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, mask_token_id: int | None, attention_backend: str) -> None:
        """`attention_backend`: a name `fdllm.kernels.select_attention_backend` takes (the engine resolves "auto")."""
        self.model, self.cache, self.mask_token_id = model, cache, mask_token_id
        self.device = model.device
        self.attention_fn = select_attention_backend(attention_backend, self.device)
        self.fused_confidence = None
        if attention_backend == "triton":
            from fdllm.kernels.confidence import fused_confidence

            self.fused_confidence = fused_confidence

    @torch.inference_mode()
    def run(self, works: list[Work]) -> list[tuple[list[int], list[bool]]]:
        """Per work: (token, selected) for each of its logit rows (none for pure prefill chunks)."""
        inputs = self.prepare(works)
        h_1TD = self.model.hidden(inputs.input_ids_1T, inputs.positions_1T, cache=inputs.attention)
        h_RD = h_1TD[0, inputs.logit_index_R]  # only the rows that are read go on to the vocab
        out: list[tuple[list[int], list[bool]]] = [([], []) for _ in works]
        if not inputs.readers:
            return out
        B, W = inputs.candidate_BW.shape
        token_BW, prob_BW, logits_SWV = self.confidence(h_RD.view(B, W, -1), inputs.sampler_index_S)
        for j, b in enumerate(inputs.samplers):
            w = works[inputs.readers[b]]
            p, n = w.seq.params, len(w.logit_rows)
            token_BW[b, :n], prob_BW[b, :n] = sample_confidence(  # real rows only: padding must not use the generator
                logits_SWV[j, :n], self.mask_token_id, p.temperature, p.top_p, p.top_k, w.seq.generator
            )
        select_BW = select_unmask(prob_BW, inputs.candidate_BW, inputs.threshold_B)
        tokens, selected = torch.stack([token_BW, select_BW.long()]).tolist()  # the step's one host sync
        for b, i in enumerate(inputs.readers):
            n = len(works[i].logit_rows)
            out[i] = (tokens[b][:n], [bool(s) for s in selected[b][:n]])
        return out

    def confidence(self, h_BWD: Tensor, sampler_index_S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Greedy token [B, W] (int64) and prob [B, W] (fp32) of every row, and logits [S, W, V] of the
        sampling works' rows (the caller overwrites their greedy values).

        Fused or not, the logits are fp32 with the mask token excluded and an exact tie goes to the
        lowest token id, so the fused kernel decodes like the torch path (and the no-cache reference).
        """
        B, W, _ = h_BWD.shape
        lm_head = self.model.lm_head
        if self.fused_confidence is None:
            logits_BWV = lm_head(h_BWD)
            token_R, prob_R = greedy_confidence(logits_BWV.flatten(0, 1), self.mask_token_id)
            logits_SWV = logits_BWV[sampler_index_S]
        else:
            token_R, prob_R = self.fused_confidence(h_BWD.flatten(0, 1), lm_head.weight, self.mask_token_id)
            logits_SWV = lm_head(h_BWD[sampler_index_S])
        return token_R.view(B, W), prob_R.view(B, W), logits_SWV

    def prepare(self, works: list[Work]) -> StepInputs:
        """Pack the works' tokens back to back; pad each reader's logit rows to W by repeating its last."""
        ids, positions, slots, rows = [], [], [], []
        index, candidates, thresholds, readers, samplers = [], [], [], [], []
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
                if w.samples:
                    samplers.append(len(readers))
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
            samplers=samplers,
            sampler_index_S=torch.tensor(samplers, dtype=torch.long).to(**to),
        )
