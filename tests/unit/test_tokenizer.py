"""The mask token and chat helpers."""

from __future__ import annotations

import subprocess
import sys

import torch

import fdllm
from fdllm.tokenizer import MASK_TOKEN, add_mask_token, render_chat, stop_token_ids
from tests.helpers import VOCAB, make_tokenizer, tiny_hf_model


def test_mask_token_reuses_an_unused_padded_row(qwen2_dir):
    model = fdllm.load_model(qwen2_dir)
    tok = make_tokenizer()
    assert len(tok) < VOCAB  # padded vocabulary, as Qwen2.5's
    mask_id = add_mask_token(tok, model)
    assert mask_id == len(tok) - 1 and mask_id < VOCAB
    assert model.config.vocab_size == VOCAB  # no resize
    emb = model.model.embed_tokens.weight
    assert torch.allclose(emb[mask_id], emb[:mask_id].mean(0))
    assert add_mask_token(tok, model) == mask_id  # idempotent
    assert tok.decode([mask_id]) == MASK_TOKEN


def test_mask_token_grows_a_full_vocabulary(tmp_path):
    tok = make_tokenizer()
    tiny_hf_model("qwen2", vocab_size=len(tok)).save_pretrained(tmp_path)
    model = fdllm.load_model(tmp_path)
    mask_id = add_mask_token(tok, model)
    assert mask_id == len(tok) - 1 == model.config.vocab_size - 1
    assert model.lm_head.weight.shape[0] == model.model.embed_tokens.weight.shape[0] == len(tok)
    model.save_pretrained(tmp_path / "grown")
    assert fdllm.load_model(tmp_path / "grown").config.vocab_size == len(tok)
    with torch.no_grad():
        assert model(torch.tensor([[mask_id, 3]])).shape == (1, 2, len(tok))


def test_stop_tokens_and_chat():
    tok = make_tokenizer()
    ids = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids and tok.eos_token_id in ids
    text = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n")


def test_llama3_end_tokens_all_stop():
    """Llama 3.1's generation_config ends on end_of_text, eot (a turn) and eom (a tool call's message)."""
    tok = make_tokenizer()
    llama3 = ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    tok.add_special_tokens({"additional_special_tokens": llama3})
    assert set(tok.convert_tokens_to_ids(llama3)) <= set(stop_token_ids(tok))


def test_engine_package_never_imports_ray():
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['fastapi'] = None\n"
        "import fdllm, fdllm.objective, fdllm.masks, fdllm.tokenizer, fdllm.kernels.reference\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(fdllm.__path__, 'fdllm.'): importlib.import_module(m.name)\n"
        "assert 'ray' not in sys.modules or sys.modules['ray'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
