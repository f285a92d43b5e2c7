"""The AR base's model card (README.md beside the weights), written from the pretraining summary."""

from __future__ import annotations

from typing import Any

from pipelines.world.tasks import TASKS


def _percent_by_task(scores: dict[str, float]) -> str:
    return ", ".join(f"{task} {100 * acc:.1f}%" for task, acc in scores.items())


def model_card(record: dict[str, Any]) -> str:
    m, p, w = record["model"], record["pretrain"], record["world"]
    tasks = "; ".join(f"{name} (sizes {TASKS[name].sizes[0]}-{TASKS[name].sizes[1]}{', reasoning on' if TASKS[name].reasoning else ''})"
                      for name in sorted(w["task_weights"]))
    progress = "; ".join(f"step {h['step']}: {_percent_by_task(h['by_task'])}" for h in record["history"]) or "not checked"
    return f"""# tiny-ar-base

A {record['num_params'] / 1e6:.2f}M-parameter Qwen2-architecture autoregressive model: the AR base of
fdllm's embedded world (`pipelines/world/`), trained on the corpus in `assets/world/`: {tasks}.
Sizes count list digits or operand digits; every digit is one token. It exists so that converting
an AR model to block diffusion (`pipelines/finetune.py`) runs end to end on a CPU with no download.

- Architecture: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} kv heads,
  intermediate {m['intermediate_size']}, tied embeddings, RoPE theta 10000, fp32.
- Tokenizer: byte-level BPE of {record['vocab_size']} tokens, every digit its own token, ChatML chat
  template, eos `<|im_end|>`, pad `<|endoftext|>`. `|<MASK>|` (id 3) is in the vocabulary already,
  so the block-diffusion fine-tune needs no resize; its embedding row is the mean of the ordinary
  rows (AR decoding never produces it).
- Pretraining: AdamW (betas {p['betas'][0]}/{p['betas'][1]}, weight decay {p['weight_decay']}), lr {p['lr']}, {p['warmup_steps']} warmup steps,
  cosine decay to {p['min_lr_ratio']}x, batch {p['batch_size']}, {record['steps']} steps ({record['minutes']:.1f} min on {p['threads']} CPU thread{"s" if p['threads'] > 1 else ""}),
  {p['num_examples']} chat-rendered examples; loss on the answer tokens and `<|im_end|>` only. Seed {p['seed']}.
- Held-out greedy exact match: **{100 * record['test_accuracy']:.1f}%** on {record['num_test']} records of
  `assets/world/test.jsonl` ({_percent_by_task(record['test_accuracy_by_task'])}).
- One size beyond the trained range (`test_beyond.jsonl`, {record['num_beyond']} records, no target):
  {100 * record['beyond_accuracy']:.1f}% ({_percent_by_task(record['beyond_accuracy_by_task'])}).
- Progress on the first {p['eval_samples']} held-out records: {progress}.

Rebuild the corpus, tokenizer and model (byte for byte on the CPU it was made on: one thread,
seeded, deterministic algorithms; floating-point differences are possible on other CPUs):

```
python -m pipelines.world --rebuild
```

Load it with `fdllm.load_model("assets/tiny-ar-base")` or
`transformers.AutoModelForCausalLM.from_pretrained("assets/tiny-ar-base")`; check it with
`python -m pipelines.world evaluate`.
"""
