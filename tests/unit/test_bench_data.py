"""benchmarks.data's synthetic corpus: the real LLaMA-Nemotron schema, both `input` forms, reasoning
on and off, long `<think>` traces; every record parses with the pipeline's own reader."""

from __future__ import annotations

import json
import statistics

from benchmarks.data import CorpusWriter
from pipelines.data import parse_jsonl_line, record_to_messages


def test_synthetic_corpus_is_in_the_nemotron_schema(tmp_path):
    path = tmp_path / "c.jsonl"
    stats = CorpusWriter(seed=1).write(path, 600_000)
    lines = path.read_bytes().splitlines()
    assert stats["rows"] == len(lines) and stats["bytes"] == path.stat().st_size >= 600_000
    records = [parse_jsonl_line(line) for line in lines]
    for record in records:
        messages = record_to_messages(record)  # raises BadRow on anything the pipeline would skip
        assert messages[-1]["role"] == "assistant" and messages[0]["role"] == "system"
        assert ("<think>" in record["output"]) == (record["reasoning"] == "on")
    as_list = [r for r in records if isinstance(r["input"], list)]
    as_llama3 = [r for r in records if isinstance(r["input"], str)]
    assert as_list and as_llama3 and all(r["input"].startswith("<|begin_of_text|>") for r in as_llama3)
    think = [len(r["output"].split("</think>")[0]) for r in records if r["reasoning"] == "on"]
    plain = [len(r["output"]) for r in records if r["reasoning"] == "off"]
    assert statistics.median(think) > 3 * statistics.median(plain) and max(think) > 15_000
    assert json.loads(lines[0]) == records[0]
