"""pipelines.data without Ray: schema parsing, label masking, packing, bad-row counting, file checks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fdllm.masks import two_stream_mask
from fdllm.objective import IGNORE_INDEX
from fdllm.tokenizer import MASK_TOKEN
from pipelines.data import (
    BAD_REASONS,
    RECORD_COLUMNS,
    BadRow,
    DataConfig,
    DataError,
    TokenSpec,
    bad_counts,
    check_data_files,
    encode_conversations,
    pack_jsonl_windows,
    plan_jsonl_splits,
    plan_parquet_splits,
    process_records,
    read_jsonl_split,
    read_parquet_split,
    record_to_messages,
)
from tests.helpers import make_tokenizer
from tests.sft_data import BROKEN_ROWS, LLAMA3_PROMPT, expected_bad_counts, good_records, write_jsonl

# Words the test tokenizer round-trips exactly (its byte alphabet is deliberately small).
Q, A, Q2, A2 = "the fox 12 hello 7", "world 19", "hi there", "the quick brown fox"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_list_input_with_system_prompt_and_reasoning():
    rec = {"input": [{"role": "user", "content": Q}], "output": "<think>7 12</think>\n" + A,
           "system_prompt": "detailed thinking on", "reasoning": "on", "category": "math"}
    assert record_to_messages(rec) == [
        {"role": "system", "content": "detailed thinking on"},
        {"role": "user", "content": Q},
        {"role": "assistant", "content": "<think>7 12</think>\n" + A},
    ]
    assert record_to_messages(rec, strip_reasoning=True)[-1] == {"role": "assistant", "content": A}


def test_first_release_llama3_string_is_parsed_back_into_messages():
    rec = {"input": LLAMA3_PROMPT.format(system="detailed thinking off", user=Q + "\nline two"),
           "output": A + "<|eot_id|>", "reasoning": "off"}
    assert record_to_messages(rec) == [
        {"role": "system", "content": "detailed thinking off"},
        {"role": "user", "content": Q + "\nline two"},
        {"role": "assistant", "content": A},
    ]


def test_plain_string_input_and_messages_records():
    assert record_to_messages({"input": Q, "output": A}) == [
        {"role": "user", "content": Q}, {"role": "assistant", "content": A}]
    chat = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
    assert record_to_messages({"messages": chat, "system_prompt": "be brief"})[0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("rec,reason", [
    ({"input": Q, "output": "<think>open " + A}, "unclosed_think"),
    ({"input": Q, "output": "<think>only thoughts</think>"}, "empty_field"),
    ({"input": Q, "output": A, "reasoning": "maybe"}, "wrong_type"),
    ({"input": Q, "output": A, "system_prompt": 3}, "wrong_type"),
    ({"input": "<|start_header_id|>garbage", "output": A}, "bad_chat"),
])
def test_rejects_with_reason(rec, reason):
    with pytest.raises(BadRow) as e:
        record_to_messages(rec, strip_reasoning=True)
    assert e.value.reason == reason


def _docs(out, row):
    """(start, end) of each document of a packed row (the last span is the padding)."""
    ids = out["doc_ids"][row]
    starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    return list(zip(starts, starts[1:] + [len(ids)]))


def test_labels_cover_exactly_the_assistant_answers(tok):
    chat = [{"role": "user", "content": Q}, {"role": "assistant", "content": A},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    cfg = DataConfig(block_size=8, seq_len=128)
    out = process_records([{"messages": chat}], tok, cfg)
    ids, labels = out["input_ids"][0], out["labels"][0]
    (start, end), _pad = _docs(out, 0)
    trained = labels[start:end] != IGNORE_INDEX
    assert (labels[start:end][trained] == ids[start:end][trained]).all()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    n_fill = (end - start) - len(tok.encode(tok.apply_chat_template(chat, tokenize=False).rstrip("\n")))
    # Trained: answer 1 + its <|im_end|>, answer 2 + its <|im_end|>, then the block fill (all <|im_end|>).
    assert tok.decode(ids[start:end][trained]) == A + "<|im_end|>" + A2 + "<|im_end|>" * (1 + n_fill)
    # Not trained: exactly the rest of the rendered conversation.
    rendered = tok.apply_chat_template(chat, tokenize=False)
    rendered = rendered[: rendered.rindex("<|im_end|>")]  # the document ends at the last end-of-turn
    expected_prompt = tok.decode(tok.encode(rendered)).replace(A + "<|im_end|>", "").removesuffix(A2)
    assert tok.decode(ids[start:end][~trained]) == expected_prompt
    assert ids[end - 1] == eot and (end - start) % cfg.block_size == 0
    assert (labels[end:] == IGNORE_INDEX).all()  # the padding tail of the row carries no loss


def test_a_nemotron_input_s_earlier_answers_are_context_not_trained(tok):
    """A Nemotron record's `input` is the prompt, however many turns it holds: only its `output` is trained
    (a prompt/completion pair); the same turns as a `messages` chat train every answer (the test above).
    The document's tokens are the chat's either way."""
    chat = [{"role": "user", "content": Q}, {"role": "assistant", "content": A},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    cfg = DataConfig(block_size=8, seq_len=128)
    nemotron = process_records([{"input": chat[:3], "output": A2}], tok, cfg)
    messages = process_records([{"messages": chat}], tok, cfg)
    (start, end), _pad = _docs(nemotron, 0)
    ids, labels = nemotron["input_ids"][0], nemotron["labels"][0]
    assert (ids == messages["input_ids"][0]).all()
    n_fill = (end - start) - len(tok.encode(tok.apply_chat_template(chat, tokenize=False).rstrip("\n")))
    assert tok.decode(ids[start:end][labels[start:end] != IGNORE_INDEX]) == A2 + "<|im_end|>" * (1 + n_fill)
    marked = [*chat[:1], {**chat[1], "context": True}, *chat[2:]]  # a chat's answer marked as context, so
    assert (process_records([{"messages": marked}], tok, cfg)["labels"] == labels).all()  # a distilled record's


def test_a_template_that_closes_the_conversation_with_eos_trains_every_answer(tok):
    """Phi-3's template ends a whole conversation, not a turn, with EOS, so a conversation rendered up to
    an answer ends with a stop token the whole one has only at its end. Before, every such row was a
    `stop_token` bad row (two stop ids in the last answer's piece) and no earlier answer was trained.
    The closing EOS is template glue: untrained, as is everything after an answer's end of turn; an
    answer that writes a stop token out is still refused."""
    phi = make_tokenizer()
    phi.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}")
    chat = [{"role": "user", "content": Q}, {"role": "assistant", "content": A},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    cfg = DataConfig(block_size=8, seq_len=128)
    out = process_records([{"messages": chat}], phi, cfg)
    assert out["num_docs"].tolist() == [1] and not any(bad_counts(out).values()), bad_counts(out)
    ids, labels = out["input_ids"][0], out["labels"][0]
    (start, end), _pad = _docs(out, 0)
    trained = labels[start:end] != IGNORE_INDEX
    n_fill = (end - start) - len(phi.encode(phi.apply_chat_template(chat, tokenize=False).removesuffix("\n<|endoftext|>")))
    assert phi.decode(ids[start:end][trained]) == A + "<|im_end|>" + A2 + "<|im_end|>" * (1 + n_fill)
    assert "<|endoftext|>" not in phi.decode(ids[start:end])  # the document ends at the last end of turn

    literal = [*chat[:3], {"role": "assistant", "content": "world <|endoftext|> hello"}]
    assert bad_counts(process_records([{"messages": literal}], phi, cfg))["stop_token"] == 1


def test_packing_aligns_documents_to_blocks_and_mask_never_crosses_them(tok):
    cfg = DataConfig(block_size=8, seq_len=128)
    out = process_records(good_records(24), tok, cfg)
    assert out["input_ids"].shape[1] == 128 and out["num_docs"].sum() == 24
    for row in range(len(out["num_docs"])):
        spans = _docs(out, row)
        for start, end in spans:
            assert start % cfg.block_size == 0 and end % cfg.block_size == 0
            assert (out["position_ids"][row, start:end] == np.arange(end - start)).all()
        doc_ids = out["doc_ids"][row]
        assert len(spans) == len(set(doc_ids.tolist()))  # every document (and the padding) its own id
        import torch

        allowed = two_stream_mask(128, cfg.block_size, torch.from_numpy(doc_ids)[None].long())[0, 0]  # [2L, 2L]
        q, k = allowed.nonzero().T
        assert (doc_ids[q % 128] == doc_ids[k % 128]).all()
        assert allowed.any(-1).all()  # no query row left without a key (SDPA would give NaN)


def test_broken_rows_are_counted_by_reason(tok):
    rows = [json.dumps(r) for r in good_records(12)]
    rows[3:3] = [raw for raw, _ in BROKEN_ROWS]
    out = process_records(rows, tok, DataConfig(block_size=8, seq_len=128))
    counts = bad_counts(out)
    assert counts == {r: expected_bad_counts().get(r, 0) for r in BAD_REASONS}
    assert out["num_docs"].sum() == 12
    assert out["bad_too_long"][1:].sum() == 0  # counts ride on the first row only


def test_raw_byte_lines_decode_per_record(tok, tmp_path):
    """jsonl files are read as byte lines: invalid UTF-8 past any file head costs only its own row."""
    good = [json.dumps(r).encode() for r in good_records(6)]
    window = b"\n".join(good[:3] + [b'{"input": "a", "output": "\xc3("}'] + good[3:])
    out = pack_jsonl_windows([window], tokenizer=tok, cfg=DataConfig(block_size=8, seq_len=128),
                             spec=TokenSpec.from_tokenizer(tok))
    assert out["num_docs"].sum() == 6 and bad_counts(out)["bad_unicode"] == 1


def test_a_block_is_padded_with_empty_rows_to_a_multiple_of_the_workers(tok):
    """`build_dataset(row_multiple=N)`: each tokenizing task's rows come in a multiple of N, so their
    total divides among N workers (an equal split then drops none); the padding trains and counts nothing."""
    from pipelines.data import _pack_windows

    window = b"\n".join(json.dumps(r).encode() for r in good_records(3))
    batch = pa.table({"lines": pa.array([window, b"{}"], pa.large_binary())})
    kwargs = {"tokenizer": tok, "cfg": DataConfig(block_size=8, seq_len=128), "spec": TokenSpec.from_tokenizer(tok)}
    alone = _pack_windows(batch, **kwargs)
    n = len(alone["num_docs"])
    for multiple in (1, n, n + 1, 4):
        out = _pack_windows(batch, row_multiple=multiple, **kwargs)
        assert len(out["num_docs"]) == -(-n // multiple) * multiple and all(np.array_equal(out[c][:n], alone[c]) for c in alone)
        assert (out["num_docs"][n:] == 0).all() and (out["num_tokens"][n:] == 0).all()
        assert (out["labels"][n:] == IGNORE_INDEX).all() and not any(out[f"bad_{r}"][n:].any() for r in BAD_REASONS)


# ---------------------------------------------------------------------------------------------
# jsonl files read in byte-range splits (small windows and splits forced by DataConfig)


def _read_all(path, cfg, chunk_bytes=1 << 22):
    """Every window of every split of one file, in split order (what the Ray tasks read)."""
    splits = plan_jsonl_splits([(str(path), path.stat().st_size)], cfg)
    return splits, [w for s in splits for w in read_jsonl_split(s, cfg, chunk_bytes)]


@pytest.mark.parametrize("window,per_split,chunk", [(1, 1, 1), (3, 2, 5), (7, 5, 4096), (64, 1, 3), (10**6, 1, 64)])
@pytest.mark.parametrize("final_newline", [True, False])
def test_splits_own_each_line_exactly_once(tmp_path, window, per_split, chunk, final_newline):
    """Oracle: bytes.split. Lines of 0-40 bytes (blank ones skipped), windows and read chunks far
    smaller than lines, so lines straddle splits, windows and chunks everywhere."""
    import random

    rng = random.Random(window * 31 + per_split)
    lines = [bytes(rng.choice(b"ab {}") for _ in range(rng.randint(0, 40))) for _ in range(300)]
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))
    cfg = DataConfig(block_size=8, seq_len=64, pack_window_bytes=window, read_split_bytes=window * per_split)
    splits, windows = _read_all(path, cfg, chunk)
    assert [w_line for w in windows for w_line in w["lines"].split(b"\n")] == [x for x in lines if x.strip()]
    assert len(splits) == -(-path.stat().st_size // cfg.read_split_bytes)
    offsets = [w["offset"] for w in windows]
    assert offsets == sorted(offsets) and len({o // window for o in offsets}) == len(offsets)  # one row per window


def test_a_file_larger_than_a_split_is_read_completely_and_bad_rows_counted_once(tok, tmp_path):
    records = good_records(40)
    path = write_jsonl(tmp_path / "sft.jsonl", records, [raw for raw, _ in BROKEN_ROWS])
    cfg = DataConfig(block_size=8, seq_len=128, docs_per_batch=4, pack_window_bytes=128, read_split_bytes=256)
    splits, windows = _read_all(path, cfg)
    # the premise: many splits, and broken rows that straddle a split boundary
    data = path.read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")][:-1]
    broken = {raw if isinstance(raw, bytes) else raw.encode() for raw, _ in BROKEN_ROWS}
    straddling = [s for s in starts if data[s:].split(b"\n", 1)[0] in broken
                  and any(s < sp.start < s + len(data[s:].split(b"\n", 1)[0]) for sp in splits)]
    assert len(splits) > 10 and len(straddling) >= 3
    out = pack_jsonl_windows([w["lines"] for w in windows], tokenizer=tok, cfg=cfg, spec=TokenSpec.from_tokenizer(tok))
    assert out["num_docs"].sum() == len(records)
    assert bad_counts(out) == {r: expected_bad_counts().get(r, 0) for r in BAD_REASONS}


def test_packing_does_not_depend_on_the_split_size(tok, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", good_records(60), [raw for raw, _ in BROKEN_ROWS])
    packed = []
    for per_split in (1, 3, 1000):
        cfg = DataConfig(block_size=8, seq_len=64, docs_per_batch=5, pack_window_bytes=256,
                         read_split_bytes=256 * per_split)
        splits, windows = _read_all(path, cfg)
        packed.append((len(splits), pack_jsonl_windows([w["lines"] for w in windows], tokenizer=tok, cfg=cfg,
                                                        spec=TokenSpec.from_tokenizer(tok))))
    (n_small, first), *others = packed
    assert n_small > packed[-1][0] == 1
    for _, out in others:
        assert out.keys() == first.keys() and all((out[c] == first[c]).all() for c in first)


def test_split_must_hold_whole_windows():
    with pytest.raises(ValueError, match="multiple of pack_window_bytes"):
        DataConfig(block_size=8, seq_len=64, pack_window_bytes=100, read_split_bytes=150)


def test_a_template_that_raises_is_counted_not_fatal(tok):
    strict = make_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if 'fox' in m['content'] %}{{ raise_exception('no foxes') }}"
                            "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    records = [{"input": "the fox", "output": "world"}, {"input": Q2, "output": "world 19"}, {"input": "hello", "output": "fox"}]
    out = process_records(records, strict, DataConfig(block_size=8, seq_len=128))
    assert out["num_docs"].sum() == 1 and bad_counts(out)["template_error"] == 2


def test_a_template_that_renders_no_answer_is_counted(tok):
    silent = make_tokenizer()
    silent.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    out = process_records([{"input": Q, "output": A}], silent, DataConfig(block_size=8, seq_len=128))
    assert out["num_docs"].tolist() == [0] and bad_counts(out)["empty_render"] == 1


def test_skipped_rows_summary_warns_above_one_percent():
    from pipelines.data import summarize_bad_rows

    bad = dict.fromkeys(BAD_REASONS, 0) | {"bad_unicode": 1, "template_error": 30}
    line, warnings = summarize_bad_rows(bad, good_docs=969)
    assert line == "rows skipped: 31 of 1000 (bad_unicode=1, template_error=30)"
    assert len(warnings) == 1 and "template_error" in warnings[0] and "3.0%" in warnings[0]
    assert summarize_bad_rows(dict.fromkeys(BAD_REASONS, 0), good_docs=10) == ("rows skipped: 0 of 10 (none)", [])


def test_all_bad_batch_yields_a_count_carrier_row(tok):
    out = process_records(["nope", "{}"], tok, DataConfig(block_size=8, seq_len=32))
    assert out["num_docs"].tolist() == [0]
    assert bad_counts(out)["invalid_json"] == 1 and bad_counts(out)["missing_field"] == 1


def test_overlong_policy_and_mask_token(tok):
    long = {"input": Q, "output": " ".join([A] * 30)}
    assert bad_counts(process_records([long], tok, DataConfig(block_size=8, seq_len=64)))["too_long"] == 1
    out = process_records([long], tok, DataConfig(block_size=8, seq_len=64, overlong="truncate"))
    assert out["num_docs"].tolist() == [1] and out["num_tokens"].tolist() == [64]
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    out = process_records([{"input": Q, "output": A + MASK_TOKEN}], tok, DataConfig(block_size=8, seq_len=64),
                          TokenSpec.from_tokenizer(tok))
    assert bad_counts(out)["mask_token"] == 1


def test_a_row_too_long_for_any_tokenization_is_skipped_untokenized(tok, monkeypatch):
    """Under overlong=skip a row with more characters than seq_len tokens can hold is too_long before the
    tokenizer sees it: an 18 MB row took 86 s of a read task to tokenize, only to be skipped. Rows that
    might fit are tokenized and judged by their tokens, as before."""
    spec, cfg = TokenSpec.from_tokenizer(tok), DataConfig(block_size=8, seq_len=64)
    huge = {"input": Q, "output": "7" * (cfg.seq_len * spec.max_token_chars + 1)}
    near = {"input": Q, "output": " ".join([A] * 30)}  # too long in tokens, not in characters
    seen: list[int] = []
    call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, texts, **kw: seen.extend(map(len, texts)) or call(self, texts, **kw))
    out = process_records([huge, near, {"input": Q, "output": A}], tok, cfg, spec)
    assert bad_counts(out)["too_long"] == 2 and out["num_docs"].sum() == 1
    assert max(seen) < len(huge["output"])  # the huge answer never reached the tokenizer
    assert out["num_docs"].sum() == process_records([{"input": Q, "output": A}], tok, cfg, spec)["num_docs"].sum()


@pytest.mark.parametrize("prompt_chars", [10, 3000])  # the cut in the answer, or in the prompt (no answer kept)
def test_overlong_truncate_tokenizes_a_huge_row_only_as_far_as_it_keeps(tok, monkeypatch, prompt_chars):
    """Under overlong=truncate a 50 MB row was tokenized whole, minutes a pass in silence, to keep seq_len
    tokens: now its first 2 x seq_len x max_token_chars characters are, and the packed sequence is the one
    the whole row gives; a row whose cut holds no answer is too_long, as its whole tokens would be."""
    spec, cfg = TokenSpec.from_tokenizer(tok), DataConfig(block_size=8, seq_len=64, overlong="truncate")
    record = {"input": "q" * prompt_chars + "?", "output": " ".join(["ab cd"] * 2000)}
    from pipelines import data

    with monkeypatch.context() as never_cut:  # the whole row tokenized, as before
        never_cut.setattr(data, "truncate_chars", lambda cfg, spec: 10**12)
        whole = process_records([record], tok, cfg, spec)
    seen: list[int] = []
    call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, texts, **kw: seen.extend(map(len, texts)) or call(self, texts, **kw))
    cut = process_records([record], tok, cfg, spec)
    assert sum(seen) <= 2 * cfg.seq_len * spec.max_token_chars
    assert {k: v.tolist() for k, v in cut.items()} == {k: v.tolist() for k, v in whole.items()}


def test_parquet_rows_parse_like_jsonl(tok, tmp_path):
    recs = [r for r in good_records(8) if "input" in r and isinstance(r["input"], list)]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    out = process_records(pq.read_table(path).to_pylist(), tok, DataConfig(block_size=8, seq_len=128))
    assert out["num_docs"].sum() == len(recs) and sum(bad_counts(out).values()) == 0


def test_parquet_splits_are_runs_of_row_groups_read_as_windows_of_json_lines(tok, tmp_path):
    """Windows of docs_per_batch rows that never cross a row group, only the columns records use, and
    the packing of the rows themselves (each row one JSON line, parsed as a jsonl line is)."""
    recs = [r for r in good_records(24) if isinstance(r.get("input"), list)]
    recs.append({"input": [{"role": "user", "content": "q"}]})  # no output: a bad row
    table = pa.Table.from_pylist(recs).append_column("license", pa.array(["cc-by-4.0"] * len(recs)))
    path = tmp_path / "sft.parquet"
    pq.write_table(table, path, row_group_size=5)
    groups = pq.ParquetFile(path).metadata.num_row_groups
    cfg = DataConfig(block_size=8, seq_len=128, docs_per_batch=2, pack_window_bytes=1, read_split_bytes=1)
    files = [(str(path), check_data_files([str(path)]).row_group_bytes[str(path)])]
    assert len(files[0][1]) == groups
    splits = plan_parquet_splits(files, cfg, first_index=3)
    assert [(s.file_index, s.first, s.stop) for s in splits] == [(3, g, g + 1) for g in range(groups)]
    whole = plan_parquet_splits(files, dataclasses.replace(cfg, read_split_bytes=1 << 30), first_index=3)
    assert [(s.first, s.stop) for s in whole] == [(0, groups)]
    windows = [w for s in splits for w in read_parquet_split(s, cfg)]
    assert windows == list(read_parquet_split(whole[0], cfg))  # the same windows however split
    # 5 rows per group: windows of 2, 2, 1; offsets are row numbers in the file
    assert [w["offset"] for w in windows[:4]] == [0, 2, 4, 5]
    lines = [line for w in windows for line in w["lines"].split(b"\n")]
    used = [c for c in RECORD_COLUMNS if c in table.column_names]
    assert "license" not in used and [json.loads(line) for line in lines] == pq.read_table(path, columns=used).to_pylist()
    out = process_records(lines, tok, DataConfig(block_size=8, seq_len=128))
    assert out["num_docs"].sum() == len(recs) - 1 and bad_counts(out)["missing_field"] == 1
    # a value JSON cannot hold is the bad row it was as a parquet value, not a read that fails
    pq.write_table(pa.table({"input": ["q"], "output": pa.array([b"a"], pa.binary())}), tmp_path / "bytes.parquet")
    odd_file = str(tmp_path / "bytes.parquet")
    (odd,) = read_parquet_split(plan_parquet_splits([(odd_file, check_data_files([odd_file]).row_group_bytes[odd_file])],
                                                    cfg)[0], cfg)
    assert bad_counts(process_records([odd["lines"]], tok, DataConfig(block_size=8, seq_len=128)))["wrong_type"] == 1


def test_a_parquet_value_python_cannot_hold_costs_only_its_row(tok, tmp_path):
    """Parquet readers do not check that strings are UTF-8 (other writers may not either), and a
    timestamp past year 9999 has no Python value: either fails its own row, never the read task."""
    not_utf8 = pa.array([b"world 1", b"w\xffrld", b"world 3"], pa.binary()).view(pa.string())
    when = pa.array([0, 10**15, 0], pa.timestamp("s"))  # the middle one: year ~31 million
    cfg = DataConfig(block_size=8, seq_len=128)
    for name, table, reason in [
        ("utf8", pa.table({"input": ["hello"] * 3, "output": not_utf8}), "bad_unicode"),
        ("time", pa.table({"input": ["hello"] * 3, "output": ["world"] * 3, "category": when}), "wrong_type"),
    ]:
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, path)
        (split,) = plan_parquet_splits([(path, check_data_files([path]).row_group_bytes[path])], cfg)
        windows = [w["lines"] for w in read_parquet_split(split, cfg)]
        out = pack_jsonl_windows(windows, tokenizer=tok, cfg=cfg, spec=TokenSpec.from_tokenizer(tok))
        # the row with the string that is not UTF-8; every row with a timestamp, which is no category
        expected = {r: 0 for r in BAD_REASONS} | {reason: 1 if reason == "bad_unicode" else 3}
        assert bad_counts(out) == expected and out["num_docs"].sum() == 3 - sum(expected.values()), name


def test_a_bom_before_the_first_record_costs_nothing(tok, tmp_path):
    """Editors that save UTF-8 with a byte order mark put it before the first line's record."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "plain.jsonl", good_records(4)).read_bytes())
    cfg = DataConfig(block_size=8, seq_len=128)
    _, windows = _read_all(path, cfg)
    out = pack_jsonl_windows([w["lines"] for w in windows], tokenizer=tok, cfg=cfg, spec=TokenSpec.from_tokenizer(tok))
    assert out["num_docs"].sum() == 4 and sum(bad_counts(out).values()) == 0
    # a BOM before a blank first line (CRLF too) leaves it blank: skipped, no row, no count
    for newline in (b"\n", b"\r\n"):
        path.write_bytes(b"\xef\xbb\xbf" + newline + (tmp_path / "plain.jsonl").read_bytes())
        _, windows = _read_all(path, cfg)
        assert len(b"\n".join(w["lines"] for w in windows).split(b"\n")) == 4


def test_data_directories_skip_hidden_and_underscore_paths(tmp_path):
    """As pyarrow datasets do: a notebook's `.ipynb_checkpoints/` copy is not read twice, and Spark's
    `_temporary/` part files and `_SUCCESS` are not read at all; a directory given by name may be hidden."""
    data = tmp_path / ".data"
    good = write_jsonl(data / "a.jsonl", good_records(2))
    write_jsonl(data / ".ipynb_checkpoints" / "a-checkpoint.jsonl", good_records(2))
    write_jsonl(data / "sub" / ".a.jsonl", good_records(2))
    (data / "_temporary" / "0").mkdir(parents=True)
    (data / "_temporary" / "0" / "part-0.parquet").write_bytes(b"half-written")
    (data / "_SUCCESS.json").write_text("")
    assert check_data_files([str(data)]).jsonl == [str(good)]
    with pytest.raises(DataError, match="names starting with . or _ are skipped"):
        check_data_files([str(data / "sub")])  # only a hidden file in it
    assert check_data_files([str(data / "sub" / ".a.jsonl")]).jsonl == [str(data / "sub" / ".a.jsonl")]  # named


def test_data_uris_keep_their_host_and_query(s3_env, tmp_path, monkeypatch):
    """A file listed under a directory URI keeps the URI's query (pyarrow's `?endpoint_override=`) and
    host, and the read tasks open that; fsspec URIs work as pyarrow ones do. A `#` in a key is a
    character of the name, not a URL fragment (the query stays after it)."""
    import boto3
    import fsspec

    from tests.s3_server import make_bucket, upload_dir

    write_jsonl(tmp_path / "sft" / "train.jsonl", good_records(3))
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist([r for r in good_records(8) if isinstance(r.get("input"), list)][:2]),
                   tmp_path / "parquet" / "train.parquet")
    bucket = make_bucket("query")
    upload_dir(tmp_path / "sft", bucket + "/sft")
    upload_dir(tmp_path / "parquet", bucket + "/parquet")
    boto3.client("s3").put_object(Bucket="query", Key="sft #1/train.jsonl", Body=(tmp_path / "sft" / "train.jsonl").read_bytes())
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint is in the URI alone: losing it reads from AWS
    query = f"?endpoint_override={endpoint.split('://')[1]}&scheme=http"
    cfg = DataConfig(block_size=8, seq_len=128)
    for directory in ("s3://query/sft", "s3://query/sft #1"):
        for path in (directory + query, directory + "/" + query, directory + "/train.jsonl" + query):
            sources = check_data_files([path])
            assert sources.jsonl == [directory + "/train.jsonl" + query], path
            windows = [w for s in plan_jsonl_splits([(u, sources.sizes[u]) for u in sources.jsonl], cfg)
                       for w in read_jsonl_split(s, cfg)]
            assert sum(len(w["lines"].split(b"\n")) for w in windows) == 3
    sources = check_data_files(["s3://query/parquet" + query])  # parquet splits open the URI too
    assert sources.parquet == ["s3://query/parquet/train.parquet" + query]
    windows = [w for s in plan_parquet_splits([(u, sources.row_group_bytes[u]) for u in sources.parquet], cfg)
               for w in read_parquet_split(s, cfg)]
    assert sum(len(w["lines"].split(b"\n")) for w in windows) == 2

    fsspec.filesystem("memory").pipe("/fdllm-test/d/train.jsonl", write_jsonl(tmp_path / "m.jsonl", good_records(2)).read_bytes())
    sources = check_data_files(["memory://fdllm-test/d"])
    assert sources.jsonl == ["memory://fdllm-test/d/train.jsonl"]
    assert len(list(read_jsonl_split(plan_jsonl_splits([(sources.jsonl[0], sources.sizes[sources.jsonl[0]])], cfg)[0],
                                     cfg))) == 1


def test_check_data_files(tmp_path, caplog):
    good = write_jsonl(tmp_path / "d" / "a.jsonl", good_records(2))
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": Q}]}]), tmp_path / "d" / "b.parquet")
    (tmp_path / "d" / "notes.txt").write_text("ignored in a directory")
    (tmp_path / "d" / "more.jsonl.gz").write_bytes(b"\x1f\x8b")  # skipped in a directory too, and said (it was silent)
    sources = check_data_files([str(tmp_path / "d")])
    assert sources.jsonl == [str(good)] and sources.parquet == [str(tmp_path / "d" / "b.parquet")]
    assert "2 file(s) of another type skipped (only .jsonl, .json and .parquet are read): more.jsonl.gz, notes.txt" in caplog.text

    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage" * 100)  # read; its lines count as bad_unicode
    assert check_data_files([str(tmp_path / "bin.jsonl")]).jsonl == [str(tmp_path / "bin.jsonl")]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "cols.parquet")
    (tmp_path / "array.json").write_text("\ufeff\n  " + json.dumps(good_records(3), indent=1))  # not one object a line
    (tmp_path / "empty").mkdir()
    for name in ("a.jsonl", "b.json"):
        (tmp_path / "empty" / name).write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text(" \n\n\t\r\n")  # passed the emptiness check: Ray started, then failed
    for path, needle in [("missing.jsonl", "not found"), ("bad.parquet", "cannot read"),
                         ("blank.jsonl", "no data: every file holds only whitespace"),
                         ("cols.parquet", "lack"), ("d/notes.txt", "unsupported"), ("array.json", "JSON array"),
                         ("empty", "no data: every file is empty"), ("empty/a.jsonl", "no data: every file is empty")]:
        with pytest.raises(DataError, match=needle):
            check_data_files([str(tmp_path / path)])
    # an empty file beside data is only skipped
    assert check_data_files([str(tmp_path / "empty"), str(good)]).jsonl[-1] == str(good)


def test_the_data_pipeline_imports_no_torch():
    """Ray Data's processes that read, tokenize and pack import `pipelines.data` (through the functions
    they run): without torch and the engine each starts ~2 s sooner, on the way to the first batch."""
    import subprocess
    import sys

    probe = "import sys, pipelines.data; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_fdllm_public_names_load_on_use_and_a_module_not_imported_says_so():
    import subprocess
    import sys

    probe = """
import fdllm
try:
    fdllm.engine
except AttributeError as e:
    print(e)
print(fdllm.Engine.__module__, fdllm.load_model.__module__, fdllm.ModelConfig.__module__,
      all(getattr(fdllm, name).__name__ == name for name in fdllm.__all__))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "module 'fdllm' has no attribute 'engine': `import fdllm.engine` first (the package imports its " \
                     "modules when used, not all at once)"
    assert out[1] == "fdllm.engine.engine fdllm.model fdllm.config True"


def test_the_block_tail_after_the_answer_is_end_of_turn_and_trained(tok):
    """The positions after a document's last end-of-turn token up to its block end are that token and
    are trained (labels = the token), as the module docstring says (the decoder fills whole blocks).
    The conversation is chosen to leave a partial block (the two-turn chat of
    test_labels_cover_exactly_the_assistant_answers is exactly 11 blocks, so it has no fill to check)."""
    chat = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
    cfg = DataConfig(block_size=8, seq_len=128)
    out = process_records([{"messages": chat}], tok, cfg)
    ids, labels, doc_ids = out["input_ids"][0], out["labels"][0], out["doc_ids"][0]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    n_doc = len(tok.encode(tok.apply_chat_template(chat, tokenize=False).rstrip("\n")))  # ends at <|im_end|>
    assert n_doc % cfg.block_size, "the test needs a conversation that leaves a partial block"
    padded = -(-n_doc // cfg.block_size) * cfg.block_size
    assert (doc_ids[:padded] == doc_ids[0]).all() and doc_ids[padded] != doc_ids[0]
    assert ids[n_doc - 1] == eot and labels[n_doc - 1] == eot  # the answer's own end of turn
    tail = slice(n_doc, padded)
    assert (ids[tail] == eot).all() and (labels[tail] == eot).all()  # the fill: end of turn, trained
    assert (labels[padded:] == IGNORE_INDEX).all()  # the row's padding is not


def test_a_window_of_more_records_than_docs_per_batch_loses_none(tok):
    """A pack window holding more lines than `docs_per_batch` is packed in groups of that many: every
    record of every group is packed or counted (the split tests' windows never hold a whole group)."""
    import json

    from pipelines.data import TokenSpec, bad_counts, pack_jsonl_windows
    from tests.sft_data import good_records

    lines = [json.dumps(r).encode() for r in good_records(10)]
    lines.insert(4, b"{not json")  # a bad row where the second group starts
    cfg = DataConfig(block_size=8, seq_len=128, docs_per_batch=4)
    out = pack_jsonl_windows([b"\n".join(lines)], tokenizer=tok, cfg=cfg, spec=TokenSpec.from_tokenizer(tok))
    assert out["num_docs"].sum() == 10
    assert bad_counts(out)["invalid_json"] == 1 and sum(bad_counts(out).values()) == 1
    assert len(out["num_docs"]) >= 3  # groups of 4, 4 and 3 lines are packed apart


def test_documents_that_exactly_fill_a_row_share_it():
    """First-fit packing puts a document in a row whose room equals its length: two half-row documents
    and four quarter-row ones pack into full rows, no padding and no extra row."""
    from pipelines.data import Document, pack_documents

    docs = [Document([7] * 64, [7] * 64), Document([8] * 64, [8] * 64)] + [Document([9] * 32, [9] * 32)] * 4
    out = pack_documents(docs, seq_len=128, pad_id=0)
    assert out["num_docs"].tolist() == [2, 4] and out["num_tokens"].tolist() == [128, 128]
    assert (out["labels"] != IGNORE_INDEX).all()  # no padding anywhere


@pytest.mark.parametrize("overlong", ["skip", "truncate"])
def test_a_document_of_exactly_seq_len_tokens_is_kept_whole(tok, overlong):
    """A document whose block-padded length equals seq_len fits a row: not too_long, not cut."""
    from pipelines.data import bad_counts

    record = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}
    roomy = process_records([record], tok, DataConfig(block_size=8, seq_len=256))
    length = int(roomy["num_tokens"][0])  # its padded length
    out = process_records([record], tok, DataConfig(block_size=8, seq_len=length, overlong=overlong))
    assert out["num_docs"].tolist() == [1] and not any(bad_counts(out).values())
    assert (out["input_ids"][0] == roomy["input_ids"][0][:length]).all()
    assert (out["labels"][0] == roomy["labels"][0][:length]).all()


def test_a_jsonl_windows_offset_is_its_first_lines_byte_offset(tmp_path):
    """`read_jsonl_split`'s `offset`: the byte offset of the window's first line (oracle: the file's bytes)."""
    from pipelines.data import plan_jsonl_splits, read_jsonl_split

    lines = [b'{"a": %d}' % i + b" " * (i % 7) for i in range(60)]
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = path.read_bytes()
    cfg = DataConfig(block_size=8, seq_len=64, pack_window_bytes=40, read_split_bytes=120)
    windows = [w for s in plan_jsonl_splits([(str(path), len(data))], cfg) for w in read_jsonl_split(s, cfg)]
    assert len(windows) > 5 and any(w["lines"].count(b"\n") for w in windows)  # windows of several lines
    for w in windows:
        assert data[w["offset"]:].split(b"\n", 1)[0] == w["lines"].split(b"\n", 1)[0]
        assert w["offset"] == 0 or data[w["offset"] - 1] == ord("\n")


def test_a_system_prompt_field_beside_a_system_turn_keeps_the_turn():
    """A record whose messages open with a system turn keeps that turn; its `system_prompt` is not added as a
    second one (which would make the row a bad_chat and drop it)."""
    from pipelines.data import record_to_messages

    record = {"input": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}], "output": "a",
              "system_prompt": "be verbose"}
    assert record_to_messages(record) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]
    assert record_to_messages({"input": "q", "output": "a", "system_prompt": "be verbose"})[0] == {
        "role": "system", "content": "be verbose"}


def _sentencepiece_tokenizer():
    """A tokenizer as Llama 2's (HF's legacy conversion): a SentencePiece vocabulary whose normalizer
    prepends "▁" to every text it tokenizes, and a [INST] chat template."""
    import string

    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + "[]/"
    pieces = ["<unk>", "<s>", "</s>", "▁", *chars, *("▁" + c for c in chars), "▁hi", "▁hello", "▁there", "▁[INST]", "▁[/INST]"]
    tok = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 2 else -5.0) for p in pieces], unk_id=0))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                          "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    return fast


def test_a_sentencepiece_answer_is_tokenized_as_inside_the_conversation():
    """Llama 2's tokenizer prepends "▁" to each text: the answer " hello there </s>" tokenized alone began with a
    lone "▁" that the conversation (and so the model, answering after "[/INST]") never has."""
    tok = _sentencepiece_tokenizer()
    spec = TokenSpec.from_tokenizer(tok)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    doc = encode_conversations(tok, [messages], spec, DataConfig(block_size=4, seq_len=16))[0]
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    assert doc.input_ids[: len(full)] == full
    assert [t for t in doc.labels[: len(full)] if t != IGNORE_INDEX] == tok.convert_tokens_to_ids(["▁hello", "▁there", "▁", "</s>"])
    assert spec.prepends_to_pieces and not TokenSpec.from_tokenizer(make_tokenizer()).prepends_to_pieces
