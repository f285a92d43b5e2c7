"""The fdllm decoder against HF transformers: logits parity and checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch

import fdllm
from fdllm.model import Transformer
from tests.helpers import VOCAB, make_generation_config_checkpoint, tiny_hf_model


# Llama 3.1's scaling at a tiny model's size: with head_dim 16 and theta 5e5 the wavelengths (6.3, 32.5,
# 168, ...) fall in each of its three bands (high < 64/4 <= medium <= 64/1 < low)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def _random_batch(batch: int = 3, length: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("llama", {}),
        ("llama", {"attention_bias": True, "rope_theta": 500000.0}),
        ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
        ("llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}),
        ("qwen2", {"rope_scaling": {"type": "linear", "factor": 4.0}}),  # transformers 4's key
        ("qwen2", {"attention_bias": False}),  # HF's Qwen2 reads no such field: q/k/v keep their biases
        ("qwen2", {"use_sliding_window": False, "sliding_window": 8}),  # Qwen2.5's config: a window never used
    ],
)
def test_logits_match_transformers(tmp_path, arch, overrides):
    hf = tiny_hf_model(arch, **overrides)
    hf.save_pretrained(tmp_path)
    ours = fdllm.load_model(tmp_path)
    ids = _random_batch()
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_explicit_positions_and_dense_causal_mask_match_default(qwen2_dir):
    model = fdllm.load_model(qwen2_dir)
    ids = _random_batch(2, 16)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        a = model(ids)
        b = model(ids, position_ids=torch.arange(16)[None], mask=causal)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_save_then_transformers_load_gives_identical_logits(tmp_path, tie):
    import transformers

    hf = tiny_hf_model("qwen2", tie_word_embeddings=tie)
    hf.save_pretrained(tmp_path / "hf")
    ours = fdllm.load_model(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = _random_batch()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
        assert torch.equal(fdllm.load_model(tmp_path / "ours")(ids), ours(ids))


def test_rope_scaling_round_trips_through_transformers(tmp_path):
    """A Llama 3.1-style checkpoint saved by fdllm loads in transformers with its scaling (and in fdllm again)."""
    import transformers

    hf = tiny_hf_model("llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    hf.save_pretrained(tmp_path / "hf")
    fdllm.load_model(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = _random_batch()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
        assert torch.equal(fdllm.load_model(tmp_path / "ours")(ids), fdllm.load_model(tmp_path / "hf")(ids))


UNSUPPORTED = [  # features the model would otherwise run without, wrong: each refused, naming it
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0, "layer_types": None},
     r"sliding-window attention \(window 8\)"),
    ({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}, "sliding-window attention"),
    ({"quantization_config": {"quant_method": "fbgemm_fp8"}}, "pre-quantized checkpoint.*fbgemm_fp8"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope scaling 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' needs low_freq_factor > 0, got None"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "'linear' needs factor > 0, got 0"),
]


@pytest.mark.parametrize("edit, message", UNSUPPORTED, ids=[str(e) for e, _ in UNSUPPORTED])
def test_unsupported_config_features_are_refused(tmp_path, qwen2_dir, edit, message):
    cfg = json.loads((qwen2_dir / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    (tmp_path / "model.safetensors").symlink_to(qwen2_dir / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        fdllm.load_model(tmp_path)


def _checkpoint_with(tmp_path, source, edit_tensors, **config) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(source / "model.safetensors")
    edit_tensors(state)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(json.loads((source / "config.json").read_text()) | config))


def test_weights_stored_quantized_are_refused(tmp_path, qwen2_dir):
    """fp8 weights beside their scales, the config's quantization_config removed: cast to float as they are,
    every layer would be off by its scale."""
    name = "model.layers.0.mlp.down_proj.weight"

    def to_fp8(state):
        state[name] = state[name].to(torch.float8_e4m3fn)
        state[name.replace("weight", "weight_scale")] = torch.ones(1)

    _checkpoint_with(tmp_path, qwen2_dir, to_fp8)
    with pytest.raises(ValueError, match=f"{name} is stored as torch.float8_e4m3fn"):
        fdllm.load_model(tmp_path)


def test_unused_tensors_are_named(tmp_path, qwen2_dir, caplog):
    def add(state):
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old exports': not worth a word
        state["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(1)

    _checkpoint_with(tmp_path, qwen2_dir, add)
    with caplog.at_level("WARNING", logger="fdllm.loader"):
        fdllm.load_model(tmp_path)
    assert "holds 1 tensors the qwen2 model does not use, ignored: model.layers.0.mlp.down_proj.weight_scale" in caplog.text


def test_a_tied_checkpoint_with_another_head_is_refused(tmp_path):
    """tie_word_embeddings with an lm_head.weight that is not the embedding: which one is meant is not ours
    to guess (transformers 4 used the embedding, 5 the head); the same tensor twice is a tied copy and loads."""
    source = tmp_path / "hf"
    tiny_hf_model("qwen2").save_pretrained(source)
    same, other = tmp_path / "same", tmp_path / "other"
    for target, head in ((same, lambda s: s["model.embed_tokens.weight"].clone()),
                         (other, lambda s: s["lm_head.weight"])):
        target.mkdir()
        _checkpoint_with(target, source, lambda s, head=head: s.update({"lm_head.weight": head(s)}),
                         tie_word_embeddings=True)
    tied = fdllm.load_model(same)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="lm_head.weight differs from it"):
        fdllm.load_model(other)


def test_sharded_save_round_trips(tmp_path, qwen2_dir):
    import transformers

    model = fdllm.load_model(qwen2_dir)
    model.save_pretrained(tmp_path, max_shard_size=64 << 10)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = _random_batch()
    with torch.no_grad():
        expect = model(ids)
        assert torch.equal(fdllm.load_model(tmp_path)(ids), expect)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert (hf(ids).logits - expect).abs().max().item() < 1e-5


def test_a_shard_index_names_no_weight_file_outside_the_checkpoint(tmp_path, qwen2_dir):
    """An index someone else wrote is not trusted to name this node's files: `path / name` of an absolute
    name, or one with `..`, loaded (and checked) another checkpoint's weights from elsewhere on the node."""
    import shutil

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(qwen2_dir, elsewhere)
    for name in (str(elsewhere / "model.safetensors"), "../elsewhere/model.safetensors"):
        ckpt = tmp_path / "ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir()
        shutil.copy(qwen2_dir / "config.json", ckpt)
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": name}}))
        with pytest.raises(ValueError, match="outside the checkpoint directory"):
            fdllm.load_model(ckpt)
        with pytest.raises(ValueError, match="outside the checkpoint directory"):
            fdllm.loader.check_checkpoint(ckpt)


def test_generation_config_is_saved_back_as_the_checkpoint_had_it(tmp_path):
    """A fine-tune's export is its base model saved again: Qwen2.5's and Llama 3 Instruct's end tokens past
    config.json's one, and their sampling defaults, are in generation_config.json, which the save dropped
    (transformers' generate on the export ran past <|endoftext|>). Oracle: transformers' GenerationConfig."""
    import transformers

    base, out = make_generation_config_checkpoint(tmp_path / "base", (2, 0)), tmp_path / "out"
    fdllm.load_model(base).save_pretrained(out)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, 0]
    assert json.loads((out / "generation_config.json").read_text()) == json.loads((base / "generation_config.json").read_text())
    assert "generation_config" not in json.loads((out / "config.json").read_text())  # a file of its own
    (out / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(ValueError, match="generation_config.json's eos_token_id must be a token id or a list"):
        fdllm.load_model(out)


@pytest.mark.parametrize("dtype,rel_tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision_load_and_save(tmp_path, qwen2_dir, dtype, rel_tol):
    """Every tensor is the fp32 checkpoint's value rounded to `dtype`, and the logits stay within the
    dtype's rounding of the fp32 oracle (measured: bf16 ~0.6%, fp16 ~0.08% relative error)."""
    fp32 = fdllm.load_model(qwen2_dir)
    model = fdllm.load_model(qwen2_dir, dtype=dtype)
    assert model.dtype == dtype
    model.save_pretrained(tmp_path)
    again = fdllm.load_model(tmp_path, dtype=None)  # None keeps the checkpoint's dtype
    assert again.dtype == dtype
    exact = fp32.state_dict()
    for name, tensor in again.state_dict().items():
        assert tensor.dtype == dtype and torch.equal(tensor, exact[name].to(dtype)), name
    ids = _random_batch(2, 24)
    with torch.no_grad():
        ref, got = fp32(ids), again(ids).float()
    assert ((got - ref).norm() / ref.norm()).item() < rel_tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_unknown_architecture_is_a_clear_error(tmp_path, qwen2_dir):
    cfg = json.loads((qwen2_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*mamba"):
        fdllm.load_model(tmp_path)


def test_a_config_without_the_model_dimensions_is_named(tmp_path, qwen2_dir):
    """A truncated config.json (a hand-written one, a failed upload) names what it lacks, not a TypeError."""
    cfg = json.loads((qwen2_dir / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers"):
        del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="qwen2 config lacks hidden_size, num_hidden_layers"):
        fdllm.load_model(tmp_path)


def test_an_engine_refuses_a_tokenizer_that_encodes_nothing(tmp_path, qwen2_dir):
    """tokenizer_config.json without tokenizer.json loads (transformers 5) as a tokenizer without a
    vocabulary: every prompt would be no tokens. The engine names it instead of serving that."""
    import shutil

    base = shutil.copytree(qwen2_dir, tmp_path / "base")
    (base / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer without a vocabulary"):
        fdllm.Engine.from_pretrained(base)
    assert fdllm.Engine.from_pretrained(qwen2_dir).tokenizer("a b").input_ids


def test_missing_tensor_is_named(tmp_path, qwen2_dir):
    _checkpoint_with(tmp_path, qwen2_dir, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        fdllm.load_model(tmp_path)


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("mask", ["causal", "block"])
def test_bf16_autocast_training_feeds_attention_one_dtype(qwen2_dir, monkeypatch, mask):
    """Mixed-precision training (fp32 weights, bf16 autocast): the residual stream and RoPE tables stay
    fp32 while the projections are bf16; q and k must not come out of RoPE promoted to fp32 beside a
    bf16 v (compiled flex attention on a GPU would then rely on autocast's forward-only shim)."""
    import fdllm.model as model_module

    seen, inner = [], model_module.masked_attention
    monkeypatch.setattr(model_module, "masked_attention",
                        lambda q, k, v, m: seen.append((q.dtype, k.dtype, v.dtype)) or inner(q, k, v, m))
    model = fdllm.load_model(qwen2_dir)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    attn_mask = None if mask == "causal" else torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, mask=attn_mask)
    logits.float().sum().backward()
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    with torch.no_grad():
        reference = model(ids, mask=attn_mask)  # fp32: the mixed-precision logits stay close
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_replaced_weights_retire_the_fused_projection(qwen2_dir, monkeypatch):
    """Quantizing in place installs new weights: the stale fused copy must not be multiplied by."""
    from fdllm.kernels import fused_ops
    from fdllm.model import apply_rope

    model = fdllm.load_model(qwen2_dir)
    model.fuse_projections()
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight = torch.nn.Parameter(torch.zeros_like(attn.k_proj.weight))
    assert not attn.qkv.valid
    x = torch.randn(1, 3, model.config.hidden_size)
    _, k, _ = attn.qkv(x)
    assert torch.equal(k, attn.k_proj.bias.expand_as(k))  # the new (zero) weight, not the fused one
    monkeypatch.setattr(fused_ops, "apply_rope_fused", apply_rope)  # torch's RoPE: no Triton needed for this
    ones = torch.ones(1, 3, attn.head_dim)
    _, k_BTKH, _ = attn._rotated_qkv(x, ones, 0 * ones, fused=True)  # cos 1, sin 0: RoPE changes nothing
    assert torch.equal(k_BTKH, attn.k_proj.bias.view(attn.n_kv, attn.head_dim).expand_as(k_BTKH))
    model.fuse_projections()  # fuses again, over the new weights
    assert attn.qkv.valid
    model.unfuse_projections()
    assert attn.qkv is None and model.model.layers[0].mlp.gate_up is None


def test_a_llama3_scaled_model_decodes_as_hf_generates_past_its_original_context(tmp_path):
    """The scaled frequencies reach every path that computes RoPE: the engine's chunked prefill and cached,
    paged decoding of a 100-token prompt (past the 64-token original context) give HF generate's tokens."""
    import transformers

    hf = tiny_hf_model("llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, max_position_embeddings=256)
    hf.save_pretrained(tmp_path)
    engine = fdllm.Engine(fdllm.load_model(tmp_path), None, fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4),
                          fdllm.EngineConfig(num_pages=64, max_prefill_tokens=32), ar_checkpoint=True)
    prompt = _random_batch(1, 100)[0].tolist()
    got = engine.generate([prompt], fdllm.SamplingParams(max_new_tokens=16, mode="ar", ignore_eos=True))[0]
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 100, dtype=torch.long), max_new_tokens=16,
                      do_sample=False, pad_token_id=0, eos_token_id=None)[0, 100:].tolist()
    assert isinstance(hf, transformers.LlamaForCausalLM) and got.token_ids == ref
    ids = prompt + ref  # and the chunked, paged scoring forward's log-probabilities, to HF's
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].double(), -1)
    want = want.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(engine.score([ids])[0].logprobs[1:], dtype=torch.float64), want,
                               atol=1e-4, rtol=0)
