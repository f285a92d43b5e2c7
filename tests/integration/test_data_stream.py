"""pipelines.data.build_dataset on a local Ray instance: a jsonl file read in many byte-range splits,
or parquet files in many runs of row groups, give exactly the rows, bad-row counts and packed
sequences of a single split, in the same order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from pipelines.data import BAD_REASONS, DataConfig, bad_counts, build_dataset, check_data_files  # noqa: E402
from tests.helpers import make_tokenizer, start_local_ray  # noqa: E402
from tests.sft_data import BROKEN_ROWS, expected_bad_counts, good_records, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def _packed(sources, split_bytes: int) -> dict[str, np.ndarray]:
    cfg = DataConfig(block_size=8, seq_len=128, docs_per_batch=6, pack_window_bytes=1024, read_split_bytes=split_bytes)
    dataset = build_dataset(sources, make_tokenizer(), cfg, num_cpus=0.5)
    dataset.context.execution_options.preserve_order = True  # as the fine-tune's ingest runs it
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    # Tokenizing runs in the read's task, however few splits the files make (here fewer than Ray's
    # parallelism hint of twice the CPUs), jsonl or parquet: raw text never waits in the object store.
    operators = [line for line in dataset.stats().splitlines() if line.startswith("Operator")]
    assert any("ReadRawSplits->MapBatches(_pack_windows)" in line for line in operators), operators
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}


def test_split_file_streams_every_row_once_in_a_deterministic_packing(local_ray, tmp_path):
    records = good_records(24)
    path = write_jsonl(tmp_path / "sft.jsonl", records, [raw for raw, _ in BROKEN_ROWS])
    sources = check_data_files([str(path)])
    assert path.stat().st_size > 3 * 1024  # several 1 KiB splits: lines straddle their boundaries
    many, one = _packed(sources, 1024), _packed(sources, 1 << 20)
    for out in (many, one):
        assert out["num_docs"].sum() == len(records)
        assert bad_counts(out) == {r: expected_bad_counts().get(r, 0) for r in BAD_REASONS}
    assert many.keys() == one.keys() and all(np.array_equal(many[c], one[c]) for c in one)


def test_parquet_files_of_both_input_formats_stream_together(local_ray, tmp_path):
    """The schema allows `input` as a message list or a Llama-3 prompt string; files may differ, and a
    single Ray read cannot unify a string column with a list one (it raised before reading a row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = good_records(24)
    for kind in (list, str):
        rows = [r for r in records if isinstance(r.get("input"), kind)]
        assert rows, kind
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{kind.__name__}.parquet", row_group_size=3)
    sources = check_data_files([str(tmp_path)])
    many, one = _packed(sources, 1024), _packed(sources, 1 << 20)  # splits of a few row groups, or one per file
    assert one["num_docs"].sum() == sum(isinstance(r.get("input"), (list, str)) for r in records)
    assert many.keys() == one.keys() and all(np.array_equal(many[c], one[c]) for c in one)


def _read_as_workers(dataset, workers: int) -> list[dict[str, np.ndarray]]:
    """The rows each of N Ray Train workers gets: Ray Train's `streaming_split(N, equal=True)`, every
    split read at once (one reader per worker)."""
    dataset.context.execution_options.preserve_order = True
    splits = dataset.streaming_split(workers, equal=True)
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda split: list(split.iter_batches(batch_size=None, batch_format="numpy")), splits))
    return [{c: np.concatenate([b[c] for b in part]) for c in part[0]} for part in parts]


def test_an_equal_split_among_workers_drops_no_document_and_no_count(local_ray, tmp_path):
    """An equal split drops as many rows as its total exceeds a multiple of the workers by, cutting blocks
    and requeueing their halves, so which rows is not up to us. Here the data ends with broken rows,
    whose rows only carry their counts: with `row_multiple` N (the fine-tune's) nothing is dropped, and
    the workers together read every document and every count; 3 workers also get rows in equal number."""
    records = good_records(4)
    path = write_jsonl(tmp_path / "sft.jsonl", records, [raw for raw, _ in BROKEN_ROWS])  # broken rows last
    sources, tokenizer = check_data_files([str(path)]), make_tokenizer()
    cfg = DataConfig(block_size=8, seq_len=128, docs_per_batch=4)  # 7 rows, the last carrying a count
    rows = len(_read_as_workers(build_dataset(sources, tokenizer, cfg, num_cpus=0.5), 1)[0]["num_docs"])
    expected = {r: expected_bad_counts().get(r, 0) for r in BAD_REASONS}
    for workers in (2, 3):
        assert rows % workers, "the rows must not divide equally, or nothing is dropped"
        parts = _read_as_workers(build_dataset(sources, tokenizer, cfg, num_cpus=0.5, row_multiple=workers), workers)
        out = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        assert out["num_docs"].sum() == len(records) and bad_counts(out) == expected, workers
        assert len({len(p["num_docs"]) for p in parts}) == 1 and len(out["num_docs"]) % workers == 0
