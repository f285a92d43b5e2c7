"""The engine's independent oracle: block diffusion recomputed from scratch at every step, with no
KV cache, no batching and none of the engine's code (docs/method.md §3). Tests hold the engine to it, and
the GPU suite does on the device, so it imports nothing of the test runner's."""

from __future__ import annotations

import torch

from fdllm.masks import block_causal_mask
from tests.helpers import VOCAB

MASK = VOCAB - 1  # the tiny test models' mask token


@torch.no_grad()
def reference_generate(model, prompt, max_new_tokens, block_size, sub_block_size, threshold, stop_ids=(),
                       causal_prefix=False, mask_token_id=MASK, logit_bias=None, presence=0.0, frequency=0.0,
                       repetition=1.0, min_tokens=0):
    """Block diffusion with no cache: every step recomputes the whole sequence under the block-causal
    mask (`causal_prefix`: causal over the committed tokens, the current block sees itself and them).
    `logit_bias`: added to every prediction's logits; `presence`/`frequency`: OpenAI's penalties on the
    tokens generated before the predicted position, `repetition` HF's on the prompt's and those tokens,
    as the step starts; `stop_ids` never predicted at the first `min_tokens` output positions (SamplingParams)."""
    L, S, P = block_size, sub_block_size, len(prompt)

    def logits(seq):
        ids = torch.tensor([seq], device=model.device)
        if causal_prefix:
            q, k = torch.arange(len(seq))[:, None], torch.arange(len(seq))[None, :]
            mask = ((k <= q) | (q >= len(committed)))[None, None].to(model.device)
        else:
            mask = block_causal_mask(len(seq), L, device=model.device)
        return model(ids, mask=mask)[0].float()

    def confident(row, position):
        row = row.clone()
        for token, bias in (logit_bias or {}).items():
            row[token] += bias
        if position - P < min_tokens:
            row[list(stop_ids)] = float("-inf")
        for token in {t for t in (committed + block)[:position] if t != mask_token_id} if repetition != 1 else ():
            row[token] = row[token] / repetition if row[token] > 0 else row[token] * repetition
        before = [t for t in (committed + block)[P:position] if t != mask_token_id]
        for token in set(before):
            row[token] -= frequency * before.count(token) + presence
        row[mask_token_id] = float("-inf")
        prob = row.softmax(-1)
        return int(prob.argmax()), float(prob.max())

    full = P - P % L
    committed, block = list(prompt[:full]), []
    block = list(prompt[full:]) if P % L else [confident(logits(committed)[-1], P)[0]]
    block += [mask_token_id] * (L - len(block))
    out = []
    while True:
        start = len(committed)
        for token in block[P + len(out) - start :]:  # settle the decoded prefix
            if token == mask_token_id:
                break
            out.append(token)
            if token in stop_ids:
                return out
            if len(out) == max_new_tokens:
                return out
        masked = [p for p in range(L) if block[p] == mask_token_id]  # max_new_tokens only cuts the output
        if not masked:  # commit: the clean block's last logit opens the next block
            committed += block
            block = [confident(logits(committed)[-1], len(committed))[0]] + [mask_token_id] * (L - 1)
            continue
        sub = masked[0] - masked[0] % S
        rows = logits(committed + block)
        cands = [p for p in range(sub, sub + S) if p in masked]
        preds = {p: confident(rows[start + p - 1], start + p) for p in cands}  # token shift: p reads p-1
        best = max(cands, key=lambda p: preds[p][1])
        for p in cands:
            if p == best or preds[p][1] > threshold:
                block[p] = preds[p][0]
