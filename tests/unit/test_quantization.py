"""Weight quantization (torchao) on CPU: what is quantized, against a from-scratch int8 oracle, and the
engine's exactness (cached decoding == no-cache recompute) on the same quantized weights."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest
import torch

import fdllm
from fdllm.quantization import quantize, weight_bytes
from tests.reference import reference_generate
from tests.unit.test_engine import make_engine, params, random_prompts

pytest.importorskip("torchao")

CPU_FORMATS = ("int8", "int4")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_weights(model):
    return {name: p for name, p in model.named_parameters() if name.startswith("model.layers.")
            and name.rsplit(".", 2)[-2] in DECODER_LINEARS and name.endswith("weight")}


@pytest.mark.parametrize("fmt", CPU_FORMATS)
def test_only_decoder_linears_are_quantized_and_logits_stay_close(sharp_dir, fmt):
    ref = fdllm.load_model(sharp_dir)
    model = fdllm.Engine(fdllm.load_model(sharp_dir), engine_config=fdllm.EngineConfig(quantization=fmt),
                         config=fdllm.BlockDiffusionConfig(mask_token_id=0)).model
    assert model.quantization == fmt
    quantized = linear_weights(model)
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert all(type(p.data) is not torch.Tensor for p in quantized.values()), "every decoder linear is a torchao tensor"
    assert type(model.lm_head.weight.data) is torch.Tensor and type(model.model.embed_tokens.weight.data) is torch.Tensor
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids), model(ids)
    rel = float((a - b).abs().max() / a.abs().max())
    assert 0 < rel < {"int8": 0.02, "int4": 0.2}[fmt], rel  # changed (really quantized), yet close
    assert weight_bytes(model) < weight_bytes(ref)


@pytest.mark.parametrize("fmt", CPU_FORMATS)
def test_quantizing_leaves_the_process_compiler_settings_alone(sharp_dir, fmt):
    """torchao's configs default to switching on coordinate-descent tuning for every later torch.compile
    of the process (a replica's, or the GPU suite's training section after its quantized decode)."""
    inductor = pytest.importorskip("torch._inductor.config")
    names = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul")
    before = {name: getattr(inductor, name) for name in names}
    quantize(fdllm.load_model(sharp_dir), fmt)
    assert {name: getattr(inductor, name) for name in names} == before


def test_int8_matches_a_from_scratch_per_channel_int8_model(sharp_dir):
    """Independent oracle: symmetric per-output-channel int8 over all 255 levels (scale = max|w| / 127.5,
    codes clamped to [-128, 127]). Every layer's weight as torchao computes with it (its public
    `dequantize`) equals the oracle's, except each row's largest-magnitude entry, which sits exactly on
    the +-127.5 rounding tie (torchao multiplies by the reciprocal scale): there one code step apart at most.
    And the quantized layer computes with exactly that weight."""
    model = fdllm.load_model(sharp_dir)
    weights = {name: p.detach().clone() for name, p in linear_weights(model).items()}
    quantize(model, "int8")
    quantized = linear_weights(model)
    x = torch.randn(5, model.config.hidden_size)
    for name, w in weights.items():
        scale = w.abs().amax(dim=1, keepdim=True) / 127.5
        oracle = torch.clamp(torch.round(w / scale), -128, 127) * scale
        used = quantized[name].dequantize()
        tie = w.abs() == w.abs().amax(dim=1, keepdim=True)
        assert torch.allclose(used[~tie], oracle[~tie], rtol=0, atol=1e-7), name
        assert ((used - oracle).abs() <= scale * 1.0001)[tie].all(), name
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, q_proj.weight.dequantize(), q_proj.bias)
        assert torch.allclose(q_proj(x), expected, atol=1e-5)


def test_int8_weight_bytes_are_about_a_quarter_of_fp32(sharp_dir):
    model = fdllm.load_model(sharp_dir)
    linear = sum(p.numel() * 4 for p in linear_weights(model).values())
    before = weight_bytes(model)
    quantize(model, "int8")
    saved = before - weight_bytes(model)
    # int8 data + one fp32 scale per output channel: ~3/4 of the linears' fp32 bytes saved
    assert 0.7 * linear < saved < 0.76 * linear, (saved, linear)


@pytest.mark.parametrize("fmt", CPU_FORMATS)
def test_cached_decoding_equals_recompute_on_quantized_weights(sharp_dir, fmt):
    model = fdllm.load_model(sharp_dir)
    engine = make_engine(model, quantization=fmt)
    prompts = random_prompts(3, [5, 8, 13])
    for prompt, res in zip(prompts, engine.generate(prompts, params(max_new_tokens=12))):
        assert res.token_ids == reference_generate(model, prompt, 12, 8, 4, 0.4), f"prompt length {len(prompt)}"


def test_bad_formats_are_clear_errors(sharp_dir):
    with pytest.raises(ValueError, match=r"quantization must be one of \('int8', 'int4', 'fp8'\)"):
        fdllm.EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="'fp8' needs a CUDA GPU of compute capability 8.9"):
        fdllm.Engine(fdllm.load_model(sharp_dir), engine_config=fdllm.EngineConfig(quantization="fp8"),
                     config=fdllm.BlockDiffusionConfig(mask_token_id=0))
    model = quantize(fdllm.load_model(sharp_dir), "int8")
    assert quantize(model, "int8") is model  # a second engine on it reuses the weights
    with pytest.raises(ValueError, match="already quantized to 'int8'"):
        quantize(model, "int4")


def test_a_refused_engine_leaves_the_model_as_it_was_and_a_quantized_model_needs_its_format(sharp_dir):
    """The model is quantized in place, so only once every check passed: a refused engine had left it int8,
    and the next engine, asked for no quantization, ran those int8 weights while its config said None."""
    model = fdllm.load_model(sharp_dir)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        fdllm.Engine(model, engine_config=fdllm.EngineConfig(quantization="int8", max_prefill_tokens=4),
                     config=fdllm.BlockDiffusionConfig(mask_token_id=0))
    assert getattr(model, "quantization", None) is None and type(model.model.layers[0].self_attn.q_proj.weight) is torch.nn.Parameter
    fdllm.Engine(model, engine_config=fdllm.EngineConfig(quantization="int8"), config=fdllm.BlockDiffusionConfig(mask_token_id=0))
    with pytest.raises(ValueError, match="quantized to 'int8' in place.*pass quantization='int8'"):
        fdllm.Engine(model, config=fdllm.BlockDiffusionConfig(mask_token_id=0))


def test_formats_this_machine_cannot_run_are_refused_before_any_work(sharp_dir, tmp_path, monkeypatch, capsys):
    """fp8 on a CPU, int4 on CUDA in float16, or torchao missing: refused where the settings are read
    (EngineConfig, the server's builder, fdllm-evaluate's arguments), not when a replica or a later
    evaluation row quantizes (evaluate printed nothing after its unquantized rows had run)."""
    from pipelines.evaluate import main
    from serve.app import ServerConfig

    engine = {"quantization": "fp8"}
    with pytest.raises(ValueError, match="'fp8' needs a CUDA GPU"):
        ServerConfig(model="m", device="cpu", engine=engine)
    ServerConfig(model="m", engine=engine)  # "auto": the replicas' device, which the builder may not have
    with pytest.raises(ValueError, match="'int4' on CUDA runs bf16 models"):
        ServerConfig(model="m", device="cuda", dtype="float16", engine={"quantization": "int4"})
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "ab", "answer": "x"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(sharp_dir), "--data", str(data), "--modes", "ar", "--quantization", "none,fp8", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--quantization: quantization 'fp8' needs a CUDA GPU" in err, err
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"quantization 'int8' needs torchao: pip install 'fdllm\[quant\]'"):
        fdllm.EngineConfig(quantization="int8")
    fdllm.EngineConfig()  # no quantization asked: torchao not needed


def test_saving_a_quantized_model_is_refused(sharp_dir, tmp_path):
    """An engine quantizes the caller's model in place; saving it then failed deep in safetensors
    ("invalid python storage")."""
    model = quantize(fdllm.load_model(sharp_dir), "int8")
    with pytest.raises(ValueError, match="quantized to int8 in place"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_evaluate_reports_weight_bytes_and_agreement(sharp_dir, tmp_path):
    from pipelines.evaluate import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ("ab", "hello", "tiny world")))
    rows = main(["--model", str(sharp_dir), "--data", str(data), "--modes", "ar", "--quantization", "none,int8",
                 "--max-new-tokens", "6", "--output", str(tmp_path / "rows.json")])
    assert [r.quantization for r in rows] == [None, "int8"]
    assert rows[0].agreement is None and 0.0 <= rows[1].agreement <= 1.0
    assert rows[1].weight_bytes < rows[0].weight_bytes
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved[1]["quantization"] == "int8" and "outputs" not in saved[1]
    with pytest.raises(SystemExit):
        main(["--model", str(sharp_dir), "--data", str(data), "--quantization", "int3"])


def test_quantizing_a_model_with_stacked_projections_drops_the_stale_stacks(sharp_dir):
    """An engine on the Triton backend stacks q/k/v and gate/up (views of one weight); quantizing the
    same model in place later gives the linears new weights: the stacks must go, not be multiplied by."""
    plain, fused = fdllm.load_model(sharp_dir), fdllm.load_model(sharp_dir)
    fused.fuse_projections()
    quantize(plain, "int8")
    quantize(fused, "int8")
    assert all(layer.self_attn.qkv is None and layer.mlp.gate_up is None for layer in fused.model.layers)
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fused(ids), plain(ids))
