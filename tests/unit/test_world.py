"""The embedded world (pipelines/world/): task checkers, corpus, tokenizer, AR pretraining, the
reasoning-on path through data -> train -> decode, and the shipped base."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

import fdllm
from fdllm.model import Transformer
from fdllm.objective import IGNORE_INDEX
from fdllm.tokenizer import load_tokenizer
from pipelines import world
from pipelines.evaluate import prompt_ids
from pipelines.world import cli, corpus, pretrain, scoring, tasks
from pipelines.world import tokenizer as world_tokenizer
from pipelines.world.corpus import WorldConfig
from pipelines.world.pretrain import ModelSpec, PretrainConfig
from tests.helpers import make_tokenizer

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL, SHIPPED_DATA = REPO / "assets" / "tiny-ar-base", REPO / "assets" / "world"


@pytest.fixture(scope="module")
def small_world() -> corpus.World:
    """Every task family, the optional `arith` included."""
    weights = {name: 1.0 for name in tasks.TASKS}
    return corpus.generate_world(WorldConfig(seed=7, num_train=400, num_test=10, num_beyond=3, task_weights=weights))


@pytest.fixture(scope="module")
def tokenizer(small_world):
    return world_tokenizer.train_tokenizer(world_tokenizer.tokenizer_texts(small_world.train), vocab_size=384)


# --- tasks: each record's answer against an independent solver of its prompt text -------------------


def _oracle(category: str, prompt: str) -> str:
    """Solve a prompt from its text alone with Python's own arithmetic, not the task table."""
    body = prompt.split(": ", 1)[1]
    if category == "reverse":
        return body[::-1]
    if category == "sort":
        return "".join(sorted(body))
    if category == "add":
        operands = [int(x) for x in body.split("+")]
        width = max(6, *(len(str(x)) + 1 for x in operands))
        column = "{:0%dd}" % width  # right-aligned, zero-filled: the written-out column sum
        rows = [column.format(x)[::-1] for x in [*operands, sum(operands)]]
        return f"<think>{rows[0]}+{rows[1]}={rows[2]}</think>{sum(operands)}"
    if category == "arith":
        a, op1, b, op2, c = re.fullmatch(r"(\d+)([+-])(\d+)([+-])(\d+)", body).groups()
        first = eval(f"{a}{op1}{b}")  # noqa: S307 - digits and one operator, matched above
        return f"<think>{a}{op1}{b}={first}</think>{eval(f'{first}{op2}{c}')}"  # noqa: S307
    raise AssertionError(f"unknown category {category}")


def _size(category: str, prompt: str) -> int:
    body = prompt.split(": ", 1)[1]
    return len(body) if category in ("reverse", "sort") else max(len(x) for x in re.findall(r"\d+", body))


def test_every_task_answers_exactly_at_every_size(small_world):
    records = small_world.train + small_world.test + small_world.beyond
    assert {r["category"] for r in records} == set(tasks.TASKS)
    for record in records:
        prompt = corpus.user_prompt(record)
        assert record["output"] == _oracle(record["category"], prompt), prompt
        assert record["size"] == _size(record["category"], prompt)
        assert tasks.TASKS[record["category"]].solve(prompt) == record["output"]
    lo_hi = {name: {r["size"] for r in small_world.train if r["category"] == name} for name in tasks.TASKS}
    for name, task in tasks.TASKS.items():
        assert lo_hi[name] <= set(range(task.sizes[0], task.sizes[1] + 1))
        assert {r["size"] for r in small_world.beyond if r["category"] == name} == {task.sizes[1] + 1}


@pytest.mark.parametrize(("prompt", "answer"), [
    ("Add: 999+1", "<think>999000+100000=000100</think>1000"), ("Add: 0+0", "<think>000000+000000=000000</think>0"),
    ("Add: 58+67", "<think>850000+760000=521000</think>125"), ("Add: 123456+1", "<think>6543210+1000000=7543210</think>123457"),
    ("Compute: 10-10+7", "<think>10-10=0</think>7"), ("Compute: 9+99-108", "<think>9+99=108</think>0"),
    ("Reverse: 1200", "0021"), ("Sort: 3130", "0133"),
])
def test_checkers_on_hand_worked_cases(prompt, answer):
    name = {"Add": "add", "Compute": "arith", "Reverse": "reverse", "Sort": "sort"}[prompt.split(":")[0]]
    assert tasks.TASKS[name].solve(prompt) == answer
    assert tasks.final_answer(answer) == answer.rsplit("</think>", 1)[-1]


def test_addition_carries_across_many_digits():
    import random

    rng = random.Random(0)
    problems = [tasks.TASKS["add"].draw(rng, 6) for _ in range(200)]
    sums = [tasks.final_answer(p.answer) for p in problems]
    assert sum(len(total) > 6 for total in sums) > 20  # uniform digits: many sums carry out of the top digit
    assert all(int(total) == sum(map(int, p.prompt[5:].split("+"))) for total, p in zip(sums, problems, strict=True))


# --- corpus ------------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded():
    cfg = WorldConfig(seed=3, num_train=30, num_test=2, num_beyond=1)
    assert corpus.generate_world(cfg) == corpus.generate_world(cfg)
    assert corpus.generate_world(cfg).train != corpus.generate_world(WorldConfig(seed=4, num_train=30, num_test=2)).train


def test_more_train_records_extend_the_same_stream():
    small = corpus.generate_world(WorldConfig(num_train=20, num_test=2))
    large = corpus.generate_world(WorldConfig(num_train=60, num_test=2))
    assert large.test == small.test and large.beyond == small.beyond
    assert large.train[:20] == small.train


def test_records_follow_the_nemotron_schema_and_the_think_switch(small_world):
    seen_field = seen_turn = False
    for record in small_world.train:
        assert set(record) <= {"input", "output", "category", "reasoning", "system_prompt", "size"}
        roles = [m["role"] for m in record["input"]]
        assert roles in (["user"], ["system", "user"])
        assert not ("system_prompt" in record and "system" in roles)  # one place per record
        seen_field |= "system_prompt" in record
        seen_turn |= "system" in roles
        system = corpus.chat_messages(record)[0]["content"]
        reasons = tasks.TASKS[record["category"]].reasoning
        assert record["reasoning"] == ("on" if reasons else "off")
        assert system == ("detailed thinking on" if reasons else "detailed thinking off")
        assert record["output"].startswith("<think>") == reasons
    assert seen_field and seen_turn


def test_held_out_prompts_never_occur_in_train(small_world):
    train_prompts = {corpus.user_prompt(r) for r in small_world.train}
    assert not train_prompts & {corpus.user_prompt(r) for r in small_world.test + small_world.beyond}


def test_data_command_writes_train_and_held_out_files(tmp_path):
    world.main(["data", "--out", str(tmp_path), "--num-train", "12", "--num-test", "2", "--num-beyond", "1", "--seed", "1"])
    train = corpus.read_jsonl(tmp_path / "train.jsonl")
    test, beyond = corpus.read_jsonl(tmp_path / "test.jsonl"), corpus.read_jsonl(tmp_path / "test_beyond.jsonl")
    default_tasks = WorldConfig().task_weights
    assert len(train) == 12 and len(test) == 2 * len(default_tasks) and len(beyond) == len(default_tasks)
    assert [r["category"] for r in test[: len(default_tasks)]] == sorted(default_tasks)  # interleaved by task
    for row in test + beyond:
        assert set(row) == {"prompt", "answer", "messages", "category", "size"}
        assert row["messages"][-1] == {"role": "user", "content": row["prompt"]}
    assert json.loads((tmp_path / "world_config.json").read_text())["seed"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--rebuild", "data", "--out", "{tmp}/out"], "--rebuild takes no subcommand"),  # would rewrite assets/
    (["evaluate", "--data", "{tmp}/none"], "holds neither test.jsonl nor test_beyond.jsonl"),
    (["evaluate", "--data", "{tmp}"], "holds neither test.jsonl nor test_beyond.jsonl"),
    (["evaluate", "--limit", "0"], "--limit must be >= 1"),
    (["evaluate", "--model", "{tmp}/none"], "{tmp}/none: no such checkpoint directory"),
    (["data", "--num-train", "5"], "the following arguments are required: --out"),  # was: assets/world rewritten
    (["pretrain", "--steps", "10"], "the following arguments are required: --out"),  # was: the shipped base replaced
    (["data", "--out", "{tmp}/a_file"], "{tmp}/a_file is a file, not a directory"),
    (["data", "--out", "{tmp}/out", "--num-train", "-5"], "must be >= 0"),
    (["tokenizer", "--data", "{tmp}/none", "--out", "{tmp}/out"], "no train.jsonl in --data {tmp}/none"),
    (["tokenizer", "--out", "{tmp}/a_file/tok"], "{tmp}/a_file/tok is under {tmp}/a_file, which is a file"),
    (["pretrain", "--data", "{tmp}/none", "--out", "{tmp}/out"], "no world_config.json in {tmp}/none"),
    (["pretrain", "--out", "{tmp}/out"], "no tokenizer in {tmp}/out"),  # the tokenizer command writes one there
    (["pretrain", "--out", "{tmp}/out", "--tokenizer", "assets/tiny-ar-base", "--hidden-size", "30"], "multiple of the 4 attention heads"),
    (["pretrain", "--out", "{tmp}/out", "--tokenizer", "assets/tiny-ar-base", "--threads", "0"], "threads >= 1"),
    (["pretrain", "--out", "{tmp}/out", "--tokenizer", "assets/tiny-ar-base", "--lr", "inf"], "need lr > 0"),
    (["pretrain", "--out", "{tmp}/out", "--tokenizer", "assets/tiny-ar-base", "--num-examples", "5", "--batch-size", "8"],
     "num_examples (5) cannot fill a batch of 8"),
    (["pretrain", "--out", "{tmp}/out", "--tokenizer", "{tmp}/other_tokenizer"], "is not a world tokenizer"),
])
def test_cli_refuses_options_it_would_ignore_or_do_nothing_with(argv, message, tmp_path, monkeypatch, capsys):
    """One line and exit 2 before any work (these were tracebacks, some after minutes of work, or a
    transformers error about hub repo ids for a missing tokenizer)."""
    monkeypatch.setattr(cli, "rebuild", lambda: pytest.fail("rebuilt the committed assets in place"))
    for command in ("cmd_data", "cmd_tokenizer", "cmd_pretrain", "cmd_evaluate"):
        monkeypatch.setattr(cli, command, lambda *a, name=command: pytest.fail(f"{name} ran on bad options"))
    (tmp_path / "a_file").write_text("x")
    make_tokenizer().save_pretrained(tmp_path / "other_tokenizer")  # no |<MASK>|: its mask row would be every row
    with pytest.raises(SystemExit) as e:
        world.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.format(tmp=tmp_path) in err.strip().splitlines()[-1], err


def test_configs_reject_bad_values():
    with pytest.raises(ValueError):
        WorldConfig(task_weights={"multiply": 1.0})
    with pytest.raises(ValueError):
        WorldConfig(task_weights={"sort": 0.0})
    with pytest.raises(ValueError):
        PretrainConfig(minutes=0)


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_splits_digits_and_round_trips(tokenizer):
    text = "Add: 042+917 <think>1234567890</think> ünïcödé \t<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in ids]
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
    assert "".join(p for p in pieces if p.isdigit()) == "0429171234567890"


def test_tokenizer_specials_and_chat_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert [loaded.convert_tokens_to_ids(t) for t in world_tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    assert loaded("|<MASK>|", add_special_tokens=False).input_ids == [3]


def test_examples_carry_loss_on_the_answer_and_end_token_only(tokenizer, small_world):
    record = next(r for r in small_world.train if r["reasoning"] == "on")
    example = pretrain.encode_example(tokenizer, record)
    answer_ids = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids) == record["output"] + "<|im_end|>"  # the think trace carries loss too
    assert example.input_ids[-len(answer_ids) :] == answer_ids


# --- pretraining and decoding ------------------------------------------------------------------------


def test_one_eval_engine_follows_the_training_weights(tokenizer, small_world):
    # pretrain() builds its evaluation engine once: later calls must decode the weights as they are
    # then, from a fresh cache, exactly as an engine built at that point does.
    torch.manual_seed(0)
    model = Transformer(ModelSpec(hidden_size=32, num_hidden_layers=1, intermediate_size=64).model_config(tokenizer))
    rows = [corpus.test_row(r) for r in small_world.test[:6]]
    engine = scoring.eval_engine(model, tokenizer)
    prompts = [prompt_ids(engine, r) for r in rows]
    before = [r.token_ids for r in engine.generate(prompts, scoring.EVAL_PARAMS)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    after = [r.token_ids for r in engine.generate(prompts, scoring.EVAL_PARAMS)]
    assert after != before
    assert after == [r.token_ids for r in scoring.eval_engine(model, tokenizer).generate(prompts, scoring.EVAL_PARAMS)]
    assert engine.num_free_pages == engine.num_pages and not engine.has_unfinished()


def test_reasoning_on_path_data_train_decode(tokenizer, small_world):
    """A reasoning-on record goes through the chat rendering, is learnt by the AR loss, and greedy
    decoding then writes its `<think>` trace and the answer after it, scored as an exact match."""
    record = next(r for r in small_world.train if r["reasoning"] == "on")
    row = corpus.test_row(record)
    assert row["messages"][0] == {"role": "system", "content": "detailed thinking on"}
    torch.manual_seed(0)
    model = Transformer(ModelSpec(hidden_size=32, num_hidden_layers=1, intermediate_size=64).model_config(tokenizer))
    cfg = PretrainConfig(steps=60, batch_size=1, lr=1e-2, warmup_steps=1, eval_every=0, weight_decay=0.0)
    summary = pretrain.pretrain(model, tokenizer, [record], [row], cfg)  # memorize the one record
    assert summary["steps"] == cfg.steps
    engine = scoring.eval_engine(model, tokenizer)
    text = engine.generate([prompt_ids(engine, row)], scoring.EVAL_PARAMS)[0].text
    assert text.startswith("<think>") and tasks.final_answer(text) == tasks.final_answer(record["output"])
    assert scoring.exact_match(engine, [row]) == (1.0, {record["category"]: 1.0})


def test_scaled_down_chain_runs_end_to_end_and_rebuilds_byte_for_byte(tmp_path):
    data, out, again = tmp_path / "world", tmp_path / "model", tmp_path / "again"
    world.main(["data", "--out", str(data), "--num-train", "64", "--num-test", "1", "--num-beyond", "1"])
    world.main(["tokenizer", "--data", str(data), "--out", str(out), "--vocab-size", "300"])
    trained = {f.name: f.read_bytes() for f in out.iterdir()}
    pretrain_args = ["--data", str(data), "--tokenizer", str(out), "--steps", "3", "--batch-size", "8",
                     "--num-examples", "64", "--hidden-size", "32", "--layers", "1", "--eval-every", "0"]
    world.main(["pretrain", "--out", str(out), *pretrain_args])
    world.main(["pretrain", "--out", str(again), *pretrain_args])
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    for name, content in trained.items():  # the trained tokenizer, not what transformers rebuilds from it
        assert (out / name).read_bytes() == (again / name).read_bytes() == content, name
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    assert summary["steps"] == 3 and summary["num_test"] == summary["num_beyond"] == len(WorldConfig().task_weights)
    # Three small steps from a 0.02-std init: the loss is still about that of a uniform guess, ln(V).
    assert math.isfinite(summary["final_loss"])
    assert 0.7 * math.log(summary["vocab_size"]) < summary["final_loss"] < 1.3 * math.log(summary["vocab_size"])
    assert (out / "README.md").is_file()
    model, tokenizer = fdllm.load_model(out), load_tokenizer(out)
    assert model.config.vocab_size == len(tokenizer) == summary["vocab_size"]
    assert summary["num_params"] == sum(p.numel() for p in model.parameters())
    # The reported accuracy is that of the saved checkpoint on the saved test records.
    accuracy, by_task = scoring.exact_match(scoring.eval_engine(model, tokenizer), corpus.read_jsonl(data / "test.jsonl"))
    assert summary["test_accuracy"] == accuracy and summary["test_accuracy_by_task"] == by_task


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(99) == pytest.approx(1e-4, rel=1e-2)
    lrs = [cfg.lr_at(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


# --- the shipped base --------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="assets/tiny-ar-base not built")
def test_shipped_base_scores_what_its_model_card_says():
    # The committed summary is the committed weights' own score on the committed held-out files;
    # the list tasks are solved (addition is not yet: see the README's world section).
    torch.set_num_threads(2)
    engine = scoring.eval_engine(fdllm.load_model(SHIPPED_MODEL), load_tokenizer(SHIPPED_MODEL))
    summary = json.loads((SHIPPED_MODEL / cli.SUMMARY_FILE).read_text())
    accuracy, by_task = scoring.exact_match(engine, corpus.read_jsonl(SHIPPED_DATA / "test.jsonl"))
    assert (accuracy, by_task) == (summary["test_accuracy"], summary["test_accuracy_by_task"])
    assert set(by_task) == set(json.loads((SHIPPED_DATA / "world_config.json").read_text())["task_weights"])
    assert min(by_task.values()) >= 0.95 and set(by_task) == {"add", "reverse", "sort"}, by_task


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="assets/tiny-ar-base not built")
def test_shipped_base_opens_in_transformers_with_equal_logits():
    from transformers import AutoModelForCausalLM

    ours = fdllm.load_model(SHIPPED_MODEL)
    theirs = AutoModelForCausalLM.from_pretrained(str(SHIPPED_MODEL), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
