"""The model runner: the only part of the engine that touches tensors.

`run` turns a step's works into one packed varlen forward [1, T] (every sequence's tokens back to
back, per-token positions, attention rows over the paged cache), reads each work's logit rows,
turns them into tokens and confidences (greedy batched; sampling per request with its generator),
applies the threshold rule, and brings the decisions to the host in one transfer.

Shape legend: T packed tokens, B works with logit rows, W logit rows per work (padded), V vocab.
"""

from __future__ import annotations

import torch

from fdllm.cache import AttentionFn, KVCache, PagedAttention
from fdllm.decoding import greedy_confidence, sample_confidence, select_unmask
from fdllm.engine.sequence import Work
from fdllm.model import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, mask_token_id: int | None, backend: AttentionFn) -> None:
        self.model, self.cache, self.mask_token_id, self.backend = model, cache, mask_token_id, backend
        self.device = model.device

    @torch.inference_mode()
    def run(self, works: list[Work]) -> list[tuple[list[int], list[bool]]]:
        """Per work: (token, selected) for each of its logit rows."""
        ids, positions, slots, rows = [], [], [], []
        for w in works:
            pos = range(w.start, w.start + len(w.token_ids))
            ids += w.token_ids
            positions += pos
            slots += [w.seq.slot(p) for p in pos]
            rows += w.rows
        readers = [(i, w) for i, w in enumerate(works) if w.logit_rows]
        out: list[tuple[list[int], list[bool]]] = [([], []) for _ in works]
        W = max((len(w.logit_rows) for _, w in readers), default=0)
        # Logit rows of work b, padded to W by repeating its last row (padding is never a candidate).
        index, candidates, offset = [], [], 0
        for w in works:
            if w.logit_rows:
                index += [offset + r for r in w.logit_rows] + [offset + w.logit_rows[-1]] * (W - len(w.logit_rows))
                candidates.append(w.candidates + [False] * (W - len(w.candidates)))
            offset += len(w.token_ids)
        to = dict(device=self.device, non_blocking=True)
        attention = PagedAttention.build(self.cache, slots, rows, self.backend)
        logits_RV = self.model(
            torch.tensor([ids]).to(**to), torch.tensor([positions]).to(**to), cache=attention,
            logit_positions=torch.tensor(index, dtype=torch.long).to(**to) if readers else slice(0, 0),
        )[0]
        if not readers:  # prefill chunks only
            return out
        B = len(readers)
        token_BW, prob_BW = (t.view(B, W) for t in greedy_confidence(logits_RV, self.mask_token_id))
        logits_BWV = logits_RV.view(B, W, -1)
        for b, (_, w) in enumerate(readers):
            p = w.seq.params
            if p.temperature > 0:  # only the work's real rows: padding must not consume its generator
                n = len(w.logit_rows)
                token_BW[b, :n], prob_BW[b, :n] = sample_confidence(
                    logits_BWV[b, :n], self.mask_token_id, p.temperature, p.top_p, p.top_k, w.seq.generator
                )
        threshold_B = torch.tensor([w.seq.threshold for _, w in readers], dtype=torch.float32).to(**to)
        select_BW = select_unmask(prob_BW, torch.tensor(candidates).to(**to), threshold_B)
        tokens, selected = torch.stack([token_BW, select_BW.long()]).tolist()  # the step's one host sync
        for b, (i, w) in enumerate(readers):
            n = len(w.logit_rows)
            out[i] = (tokens[b][:n], [bool(s) for s in selected[b][:n]])
        return out
