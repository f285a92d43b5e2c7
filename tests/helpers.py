"""Builders for tiny random models and a local tokenizer used across the test suite."""

from __future__ import annotations

import os
import time

import torch

from pipelines.finetune import LOCAL_RAY_TRAIN_ENV

VOCAB = 96

# Ray Train's timing knobs (pipelines.finetune.LOCAL_RAY_TRAIN_ENV) for every Ray the suite starts (set by
# conftest.py before any does, inherited by its processes), clusters included, where a run's own fit
# leaves Ray's defaults: a run's end and a killed worker are seen at once, no preemption watcher. What a
# run does is unchanged. The README's commands run as a user's would (tests/integration/test_docs.py
# drops these: the fine-tune sets them itself for a local instance it started).
RAY_TRAIN_TEST_ENV = dict(LOCAL_RAY_TRAIN_ENV)


def tiny_hf_config(arch: str = "qwen2", **overrides):
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    raise ValueError(arch)


def tiny_hf_model(arch: str = "qwen2", **overrides):
    """A random HF CausalLM in fp32 with non-zero biases (so bias handling is actually checked)."""
    import transformers

    torch.manual_seed(0)
    cfg = tiny_hf_config(arch, **overrides)
    cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def make_tokenizer():
    """A small byte-level BPE tokenizer (an HF fast tokenizer with a ChatML template), built from a
    fixed vocabulary rather than trained, so every process tokenizes identically. Covers lowercase,
    digits and common punctuation (other characters are dropped); smaller than VOCAB, so the model's
    embedding is "padded" as Qwen2.5's is."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    symbols = [byte_level.pre_tokenize_str(c)[0][0] for c in string.ascii_lowercase + string.digits + " \n,.!?:-'"]
    merges = [("h", "e"), ("l", "l"), ("Ġ", "t"), ("Ġ", "w")]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + symbols + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def make_generation_config_checkpoint(path, eos_token_ids: tuple[int, ...] = (2, 0)):
    """A tiny random Qwen2 checkpoint (with tokenizer) saved by transformers as Qwen2.5's is: config.json
    names one end token, generation_config.json all of `eos_token_ids` and the vendor's sampling defaults."""
    import transformers

    model = tiny_hf_model("qwen2", eos_token_id=eos_token_ids[0])
    model.generation_config = transformers.GenerationConfig(eos_token_id=list(eos_token_ids), do_sample=True,
                                                            temperature=0.7, top_p=0.8)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_bos_tokenizer():
    """`make_tokenizer` as Llama 3's is: its post-processor adds `<|begin_of_text|>` to every encoded
    text and its chat template writes that BOS too (a rendered chat tokenized with special tokens
    begins with two)."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    return tok


def make_dllm_checkpoint(path, block_size: int = 8, sub_block_size: int = 4, prefix_attention: str = "block_causal",
                         **overrides):
    """A servable tiny random block-diffusion checkpoint: model + tokenizer (with |<MASK>|) + fdllm config
    (`prefix_attention="causal"`: as the joint objective saves it)."""
    import fdllm
    from fdllm.tokenizer import add_mask_token

    tiny_hf_model("qwen2", **overrides).save_pretrained(path)
    model = fdllm.load_model(path)
    tok = make_tokenizer()
    mask_id = add_mask_token(tok, model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    fdllm.BlockDiffusionConfig(block_size=block_size, sub_block_size=sub_block_size, mask_token_id=mask_id,
                               prefix_attention=prefix_attention).save(path)
    return path


def make_sharp_checkpoint(path, head_scale: float = 20.0):
    """A tiny random Qwen2 checkpoint (with tokenizer, no EOS) whose LM head is scaled up: its
    predictions are confident enough that thresholds unmask several tokens per step."""
    model = tiny_hf_model("qwen2")
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def hf_causal_logprobs(path, ids: list[int], mask_token_id: int | None = None) -> torch.Tensor:
    """[T-1, V] log p(. | ids[:i+1]) by transformers' own forward of the checkpoint at `path` (the
    oracle of `Engine.score`), the mask token excluded as the engine's decoding excludes it."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    if mask_token_id is not None:
        logits[:, mask_token_id] = float("-inf")
    return logits.log_softmax(-1)



def start_local_ray(num_cpus: float) -> None:
    """A Ray instance of the test's own, of `num_cpus` logical CPUs: `address="local"`, so a cluster
    already running on the machine (a developer's `ray start`, as the README shows; RAY_ADDRESS) is
    left alone, where a plain `ray.init(num_cpus=...)` would try to join it and fail. Workers' logs
    reach the console with FDLLM_TEST_RAY_LOGS=1."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=os.environ.get("FDLLM_TEST_RAY_LOGS") == "1")


def slow_steps(engine, seconds: float = 0.05) -> None:
    """Make each `engine.step()` take `seconds` longer, so that a long request is still running (400 steps:
    ~20 s), or commands queue up, while a test acts beside it."""
    step = engine.step
    engine.step = lambda: (time.sleep(seconds), step())[1]


def deployed(app: dict):
    """What `serve deploy` makes of a Serve config file's application: the app builder's deployment with
    the file's `deployments:` entry laid over its options, as Serve lays a config file over the code's."""
    from serve.app import build_app

    deployment = build_app(app["args"])._bound_deployment
    for options in app.get("deployments", []):
        options = dict(options)
        assert options.pop("name") == deployment.name, "a `deployments:` entry names no deployment of the app"
        deployment = deployment.options(**options)
    return deployment

