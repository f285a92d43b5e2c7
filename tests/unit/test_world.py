"""The embedded world (pipelines/world.py): corpus, tokenizer, AR pretraining, and the shipped base."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from fdllm.tokenizer import load_tokenizer
from pipelines import world
from pipelines.evaluate import prompt_ids
from pipelines.world import ModelSpec, PretrainConfig, WorldConfig

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL, SHIPPED_DATA = REPO / "assets" / "tiny-ar-base", REPO / "assets" / "world"


@pytest.fixture(scope="module")
def small_world() -> world.World:
    return world.generate_world(WorldConfig(seed=7, num_train=400, num_test=50))


@pytest.fixture(scope="module")
def mixed_world() -> world.World:
    """Both tasks (the default corpus is reverse only)."""
    return world.generate_world(WorldConfig(seed=8, num_train=200, num_test=20, task_weights={"reverse": 1, "commas": 1}))


@pytest.fixture(scope="module")
def tokenizer(small_world):
    return world.train_tokenizer(world.tokenizer_texts(small_world.train), vocab_size=384)


# --- corpus -------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded():
    cfg = WorldConfig(seed=3, num_train=30, num_test=10)
    assert world.generate_world(cfg) == world.generate_world(cfg)
    assert world.generate_world(cfg).train != world.generate_world(WorldConfig(seed=4, num_train=30, num_test=10)).train


def test_more_train_records_extend_the_same_stream():
    small = world.generate_world(WorldConfig(num_train=20, num_test=10))
    large = world.generate_world(WorldConfig(num_train=60, num_test=10))
    assert large.test == small.test
    assert large.train[:20] == small.train


def _expected_answer(record: dict) -> str:
    """Solve a record from its prompt text alone, independently of the generator's task table."""
    user = world.user_prompt(record)
    numbers = re.findall(r"\b\d+\b", user)
    if record["category"] == "reverse":
        return " ".join(numbers[::-1])
    if record["category"] == "commas":
        return ",".join(numbers)
    raise AssertionError(f"unknown category {record['category']}")


def test_answers_are_correct_and_numbers_zero_padded(small_world, mixed_world):
    cfg = WorldConfig()
    records = small_world.train + small_world.test + mixed_world.train + mixed_world.test
    assert {r["category"] for r in records} == {"reverse", "commas"}
    for record in records:
        assert record["output"] == _expected_answer(record)
        numbers = re.findall(r"\b\d+\b", world.user_prompt(record))
        assert cfg.min_items <= len(numbers) <= cfg.max_items
        assert all(len(n) == cfg.digits for n in numbers)


def test_records_follow_the_nemotron_schema(small_world):
    seen_system_field = seen_system_turn = False
    for record in small_world.train:
        assert set(record) <= {"input", "output", "category", "reasoning", "system_prompt"}
        assert record["reasoning"] == "off" and isinstance(record["output"], str)
        roles = [m["role"] for m in record["input"]]
        assert roles in (["user"], ["system", "user"])
        assert not ("system_prompt" in record and "system" in roles)  # one place per record
        seen_system_field |= "system_prompt" in record
        seen_system_turn |= "system" in roles
    assert seen_system_field and seen_system_turn
    assert {r["category"] for r in small_world.train} == {"reverse"}


def test_held_out_prompts_never_occur_in_train(small_world):
    train_prompts = {world.user_prompt(r) for r in small_world.train}
    assert not train_prompts & {world.user_prompt(r) for r in small_world.test}


def test_data_command_writes_train_and_test_files(tmp_path):
    world.main(["data", "--out", str(tmp_path), "--num-train", "12", "--num-test", "5", "--seed", "1"])
    train = world.read_jsonl(tmp_path / "train.jsonl")
    test = world.read_jsonl(tmp_path / "test.jsonl")
    assert len(train) == 12 and len(test) == 5
    for row in test:
        assert set(row) == {"prompt", "answer", "messages", "category"}
        assert row["messages"][-1] == {"role": "user", "content": row["prompt"]}
    assert json.loads((tmp_path / "world_config.json").read_text())["seed"] == 1


def test_system_prompt_field_becomes_the_first_turn():
    record = {"input": [{"role": "user", "content": "Reverse: 001 002"}], "system_prompt": "be brief", "output": "002 001"}
    assert world.chat_messages(record)[0] == {"role": "system", "content": "be brief"}


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_splits_digits_and_round_trips(tokenizer):
    text = "Reverse: 042 917 1234567890 ünïcödé \t<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in ids]
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
    assert "".join(p for p in pieces if p.isdigit()) == "0429171234567890"


def test_tokenizer_specials_and_chat_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert [loaded.convert_tokens_to_ids(t) for t in world.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    assert loaded("|<MASK>|", add_special_tokens=False).input_ids == [3]


def test_examples_carry_loss_on_the_answer_and_end_token_only(tokenizer, small_world):
    record = small_world.train[0]
    example = world.encode_example(tokenizer, record)
    answer_ids = [t for t in example.labels if t != world.IGNORE_INDEX]
    assert tokenizer.decode(answer_ids) == record["output"] + "<|im_end|>"
    assert example.input_ids[-len(answer_ids) :] == answer_ids


def test_the_list_starts_at_the_same_token_in_every_prompt(tokenizer, small_world):
    # The tiny model learns positional copying fast only when prefixes do not shift the list.
    starts = set()
    for record in small_world.train[:100]:
        ids = world.encode_example(tokenizer, record).input_ids
        tokens = [tokenizer.decode([i]) for i in ids]
        starts.add(next(i for i, t in enumerate(tokens) if t.isdigit()))
    assert len(starts) == 1


# --- model and decoding -------------------------------------------------------------------------


def test_one_eval_engine_follows_the_training_weights(tokenizer, small_world):
    # pretrain() builds its evaluation engine once: later calls must decode the weights as they are
    # then, from a fresh cache, exactly as an engine built at that point does.
    torch.manual_seed(0)
    spec = ModelSpec(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    model = world.Transformer(spec.model_config(tokenizer))
    rows = [world.test_row(r) for r in small_world.test[:6]]
    engine = world.eval_engine(model, tokenizer)
    prompts = [prompt_ids(engine, r) for r in rows]
    before = [r.token_ids for r in engine.generate(prompts, world.EVAL_PARAMS)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    after = [r.token_ids for r in engine.generate(prompts, world.EVAL_PARAMS)]
    assert after != before
    assert after == [r.token_ids for r in world.eval_engine(model, tokenizer).generate(prompts, world.EVAL_PARAMS)]
    assert engine.num_free_pages == engine.num_pages and not engine.has_unfinished()


def test_scaled_down_chain_runs_end_to_end(tmp_path):
    data, out = tmp_path / "world", tmp_path / "model"
    world.main(["data", "--out", str(data), "--num-train", "64", "--num-test", "4"])
    world.main(["tokenizer", "--data", str(data), "--out", str(out), "--vocab-size", "300"])
    world.main([
        "pretrain", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "8",
        "--num-examples", "64", "--hidden-size", "32", "--layers", "1", "--eval-every", "0",
    ])
    summary = json.loads((out / world.SUMMARY_FILE).read_text())
    assert summary["steps"] == 3 and summary["num_test"] == 4
    # Three small steps from a 0.02-std init: the loss is still about that of a uniform guess, ln(V).
    assert math.isfinite(summary["final_loss"])
    assert 0.7 * math.log(summary["vocab_size"]) < summary["final_loss"] < 1.3 * math.log(summary["vocab_size"])
    assert (out / "README.md").is_file()
    import fdllm

    model = fdllm.load_model(out)
    tokenizer = load_tokenizer(out)
    assert model.config.vocab_size == len(tokenizer) == summary["vocab_size"]
    assert summary["num_params"] == sum(p.numel() for p in model.parameters())
    # The reported accuracy is that of the saved checkpoint on the saved test records.
    test = world.read_jsonl(data / "test.jsonl")
    accuracy, by_category = world.exact_match(world.eval_engine(model, tokenizer), test)
    assert summary["test_accuracy"] == accuracy and summary["test_accuracy_by_category"] == by_category


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(99) == pytest.approx(1e-4, rel=1e-2)
    lrs = [cfg.lr_at(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_configs_reject_bad_values():
    with pytest.raises(ValueError):
        WorldConfig(min_items=6, max_items=5)
    with pytest.raises(ValueError):
        WorldConfig(task_weights={"sort": 1.0})
    with pytest.raises(ValueError):
        PretrainConfig(minutes=0)


# --- the shipped base ---------------------------------------------------------------------------


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="assets/tiny-ar-base not built")
def test_shipped_base_solves_held_out_problems():
    import fdllm

    torch.set_num_threads(2)
    engine = world.eval_engine(fdllm.load_model(SHIPPED_MODEL), load_tokenizer(SHIPPED_MODEL))
    rows = world.read_jsonl(SHIPPED_DATA / "test.jsonl")[:50]
    accuracy, by_category = world.exact_match(engine, rows)
    assert accuracy > 0.9 and by_category["reverse"] == accuracy


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="assets/tiny-ar-base not built")
def test_shipped_base_opens_in_transformers_with_equal_logits():
    from transformers import AutoModelForCausalLM

    import fdllm

    ours = fdllm.load_model(SHIPPED_MODEL)
    theirs = AutoModelForCausalLM.from_pretrained(str(SHIPPED_MODEL), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
