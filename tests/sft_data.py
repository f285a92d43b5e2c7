"""Small SFT corpora in the LLaMA-Nemotron post-training schema, written by tests (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def good_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` valid records cycling through the schema variants: list input, Llama-3 string input,
    plain string input, and `messages` chats; words the test tokenizer knows."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        question, answer = f"the fox {a} hello {b}", f"world {a + b}"
        kind = i % 4
        if kind == 0:
            out.append({"input": [{"role": "user", "content": question}], "output": f"<think>{a} {b}</think>{answer}",
                        "system_prompt": "detailed thinking on", "reasoning": "on", "category": "math"})
        elif kind == 1:
            out.append({"input": LLAMA3_PROMPT.format(system="detailed thinking off", user=question),
                        "output": answer + "<|eot_id|>", "reasoning": "off", "category": "math"})
        elif kind == 2:
            out.append({"input": question, "output": answer, "category": "chat"})
        else:
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


# Broken rows (jsonl lines, text or raw bytes), each with the reason it must be counted under.
BROKEN_ROWS: list[tuple[str | bytes, str]] = [
    ('{"input": "hello", "output": ', "invalid_json"),
    ("[1, 2, 3]", "invalid_json"),
    ('{"input": ' + "[" * 5000 + "]" * 5000 + ', "output": "x"}', "invalid_json"),  # nesting past Python's stack
    ('{"input": "hello", "output": "world", "answer": ' + "9" * 5000 + "}", "invalid_json"),  # past int's 4300 digits
    (json.dumps({"input": "hello"}), "missing_field"),
    (json.dumps({"category": "math"}), "missing_field"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                 "input": "hello", "output": "world"}), "two_schemas"),  # both well formed: which one trains?
    (json.dumps({"input": "hello", "output": 42}), "wrong_type"),
    (json.dumps({"input": [{"role": "user"}], "output": "world"}), "wrong_type"),
    (json.dumps({"input": "hello", "output": "   "}), "empty_field"),
    (json.dumps({"messages": []}), "empty_field"),
    (json.dumps({"messages": [{"role": "user", "content": "hello"}]}), "bad_chat"),
    (json.dumps({"input": [{"role": "robot", "content": "hello"}], "output": "world"}), "bad_chat"),
    (json.dumps({"input": "hello", "output": "world " * 400}), "too_long"),
    (b'{"input": "hello", "output": "w\xffrld"}', "bad_unicode"),  # not UTF-8
    ('{"input": "hello", "output": "w\\ud800rld"}', "bad_unicode"),  # a lone surrogate escape
    (json.dumps({"input": "hello", "output": "WORLD"}), "empty_render"),  # the test tokenizer drops capitals
    (json.dumps({"input": "hello", "output": "world <|endoftext|> hello"}), "stop_token"),  # would teach a stop mid-answer
]


def expected_bad_counts(rows: list[tuple[str | bytes, str]] = BROKEN_ROWS) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, reason in rows:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def write_jsonl(path: Path, records: list[dict[str, Any]], raw_lines: list[str | bytes] = ()) -> Path:
    """Records as JSON lines, with `raw_lines` (e.g. broken rows, bytes written as they are)
    interleaved every few lines."""
    lines = [json.dumps(r).encode() for r in records]
    for i, raw in enumerate(raw_lines):
        lines.insert(min(len(lines), 3 * i + 1), raw if isinstance(raw, bytes) else raw.encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path
