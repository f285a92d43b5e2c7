"""pipelines/evaluate.py's held-out records: every malformed file is one line that names the file and
line, before any model loads; never a traceback."""

from __future__ import annotations

import json

import pytest

from pipelines import evaluate
from pipelines.evaluate import load_records

GOOD = {"prompt": "Add: 0+6", "answer": "6", "category": "add",
        "messages": [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "Add: 0+6"}]}


def _file(tmp_path, *lines: str | bytes):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


@pytest.mark.parametrize("bad,needle", [
    ("[1, 2]", ":2: each record needs string 'prompt' and 'answer' fields"),  # JSON, but not an object
    ('"text"', ":2: each record needs string 'prompt' and 'answer'"),
    ("null", ":2: each record needs string 'prompt' and 'answer'"),
    ("not json", ":2: not JSON (Expecting value at column 1)"),
    ('{"prompt": "a", "answer": "b"', ":2: not JSON ("),  # cut short
    ('{"prompt": "a", "answer": 7}', ":2: each record needs string 'prompt' and 'answer'"),
    ('{"prompt": "a", "answer": "b", "messages": "hi"}', ":2: 'messages', when given, must be a non-empty list"),
    ('{"prompt": "a", "answer": "b", "messages": []}', ":2: 'messages', when given, must be a non-empty list"),
    ('{"prompt": "a", "answer": "b", "messages": [{"role": "user"}]}', ":2: 'messages', when given"),
    ('{"prompt": "a", "answer": "b", "category": ["add"]}', ":2: 'category', when given, must be a string"),
    (b'{"prompt": "\xff", "answer": "b"}', ": not UTF-8 text (byte "),
    ('{"prompt": "a\\ud800", "answer": "b"}', ":2: a lone surrogate (an escape such as \\ud800) is no text"),
    ('{"prompt": "a", "answer": "b", "messages": [{"role": "user", "content": "\\udfff"}]}', ":2: a lone surrogate"),
])
def test_a_malformed_record_is_named_by_file_and_line(tmp_path, bad, needle):
    path = _file(tmp_path, json.dumps(GOOD), bad)
    with pytest.raises(ValueError) as error:
        load_records(path)
    assert str(error.value).startswith(str(path)) and needle in str(error.value), str(error.value)


def test_good_records_load_with_odd_unicode_and_blank_lines(tmp_path):
    odd = {"prompt": "a\u2028b \U0001f600 \u0000", "answer": "\u202e\ufeff"}  # a line separator inside a string
    path = _file(tmp_path, json.dumps(GOOD), "", json.dumps(odd, ensure_ascii=False), "   ")
    assert load_records(path) == [GOOD, odd]
    assert load_records(path, limit=1) == [GOOD]
    with pytest.raises(ValueError, match="holds no records"):
        load_records(_file(tmp_path, "", "  "))
    bom = b"\xef\xbb\xbf"  # an editor's BOM opens the file, as the fine-tune's reader allows (a record's own stays)
    assert load_records(_file(tmp_path, bom + json.dumps(GOOD).encode(), json.dumps(odd, ensure_ascii=False))) == [GOOD, odd]


def test_no_records_file_there_is_named_as_such(tmp_path):
    for path, words in ((tmp_path / "missing.jsonl", ": no such records file"),
                        (tmp_path, " is a directory; --data takes a JSONL file of records")):
        with pytest.raises(ValueError) as error:
            load_records(path)
        assert str(error.value) == f"{path}{words}"


def test_the_cli_says_it_in_one_line_with_exit_2(tmp_path, capsys):
    path = _file(tmp_path, "[1]")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "assets/tiny-ar-base", "--data", str(path), "--modes", "ar"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith(
        f" error: {path}:1: each record needs string 'prompt' and 'answer' fields"), err



def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "assets/tiny-ar-base", "--data", "assets/world/test.jsonl", "--modes", "ar", "--limit", "1",
                       *argv])
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, words", [
    (["--output", "{tmp}/a_file/rows.json"], "--output: {tmp}/a_file is a file, not a directory"),
    (["--plot", "{tmp}/a_file/sub/plot.png"], "--plot: {tmp}/a_file/sub is under {tmp}/a_file, which is a file, not a directory"),
])
def test_an_output_under_a_file_is_refused_before_decoding(tmp_path, capsys, monkeypatch, flags, words):
    """It failed with FileExistsError after the whole evaluation."""
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a: pytest.fail("decoded before the output was checked"))
    (tmp_path / "a_file").write_text("x")
    assert _refused([f.format(tmp=tmp_path) for f in flags], capsys).endswith(f" error: {words.format(tmp=tmp_path)}")


def test_a_device_this_machine_lacks_is_one_line(capsys, monkeypatch):
    """`--device cuda` without CUDA was a traceback from deep in the engine (pin_memory's "requires a
    CUDA or other accelerator backend"); a name torch does not know, torch's own traceback."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _refused(["--device", "cuda"], capsys).endswith(" error: device 'cuda': this machine has no CUDA device "
                                                           "(torch.cuda.is_available() is False); use cpu")
    assert " error: device 'gpu' is not a torch device (" in _refused(["--device", "gpu"], capsys)


def test_a_model_list_naming_no_model_and_a_parquet_data_file_are_one_line(tmp_path, capsys):
    """`--model ,` printed an empty table and exited 0; a parquet file as --data said "not UTF-8 text"."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", ",", "--data", "assets/world/test.jsonl"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(" error: --model names no model")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"test.parquet: a parquet file \(byte \d+\); --data takes a JSONL file"):
        load_records(tmp_path / "test.parquet")


def test_a_prompt_past_the_context_is_named_by_its_record_before_decoding(tmp_path, capsys):
    """It failed the run from inside a batch's generate(), naming no record."""
    long = {"prompt": "Sort: " + "9 " * 2000, "answer": "x"}
    path = _file(tmp_path, json.dumps(GOOD), json.dumps(long))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "assets/tiny-ar-base", "--data", str(path), "--modes", "ar"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert " error: 1 record(s) too long, such as the one whose prompt starts 'Sort: 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 ': " in err


@pytest.mark.parametrize("flags, option", [(["--model", "assets/tiny-ar-base,{tmp}/gone"], "--model"),
                                           (["--model", "{tmp}/gone", "--base", "assets/tiny-ar-base"], "--model"),
                                           (["--base", "{tmp}/gone"], "--base")])
def test_a_missing_checkpoint_is_refused_before_decoding(tmp_path, capsys, monkeypatch, flags, option):
    """A second model (or --model after --base) that is not there ended the run after the rows before it
    were decoded, and dropped them."""
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a: pytest.fail("decoded before the checkpoints were checked"))
    line = _refused([f.format(tmp=tmp_path) for f in flags], capsys)
    assert f" error: {option}: " in line and f"{tmp_path}/gone" in line


@pytest.mark.parametrize("device,batch_size,warmed", [("cpu", 0, None), ("cuda", 0, ([3, 3, 3], 16)),
                                                       ("cuda", 2, ([3, 3], 16))])
def test_a_gpu_row_is_warmed_up_untimed_and_a_cpu_row_is_not(device, batch_size, warmed):
    """The first row of each engine (the AR base's, which every "vs AR" divides by) paid its Triton
    compiles and CUDA-graph captures in its timed window; on a GPU each row's batch runs two blocks first."""
    from types import SimpleNamespace

    import fdllm
    import torch

    runs = []
    engine = SimpleNamespace(model=SimpleNamespace(device=torch.device(device)), config=SimpleNamespace(block_size=8),
                             tokenizer=lambda text: SimpleNamespace(input_ids=[1, 2, 3]),  # no chat template
                             generate=lambda prompts, params, progress: runs.append(([len(p) for p in prompts],
                                                                                      params.max_new_tokens)))
    evaluate.warm_up(engine, [GOOD] * 3, fdllm.SamplingParams(max_new_tokens=64), batch_size)
    assert runs == ([warmed] if warmed else [])
