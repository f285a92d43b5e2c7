"""pipelines.finetune config/CLI and the pieces of the worker loop that need no Ray."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import fdllm
from fdllm.tokenizer import add_mask_token, load_tokenizer
from pipelines.data import BAD_REASONS, DataConfig, process_records
from pipelines import finetune
from pipelines.finetune import FinetuneConfig, build_parser, check_output, cli_main, main, resolve_run
from pipelines.train_loop import ShardReader, diffusion_loss_sum, lr_at
from tests.helpers import make_generation_config_checkpoint
from tests.sft_data import good_records, write_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def _parse(argv):
    args = vars(build_parser().parse_args(argv))
    return FinetuneConfig.from_sources(args.pop("config"), **args)


def test_yaml_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: m\ndata: d.jsonl\nlr: 0.001\nmax_steps: 5\nuse_gpu: false\nstrip_reasoning: true\n")
    cfg = _parse(["--config", str(yaml_file), "--lr", "0.01", "--data", "a", "b", "--keep-reasoning", "--use-gpu"])
    assert (cfg.model, cfg.data, cfg.lr, cfg.max_steps) == (str(tmp_path / "m"), [str(tmp_path / "a"), str(tmp_path / "b")], 0.01, 5)
    assert cfg.use_gpu is True and cfg.strip_reasoning is False
    assert _parse(["--config", str(yaml_file)]).strip_reasoning is True  # unset flags keep YAML values


def test_relative_paths_mean_the_driver_directory(tmp_path, monkeypatch):
    """Ray Train workers run in a directory of their own: the driver must hand them absolute paths."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/u")
    cfg = FinetuneConfig(model="assets/base", data=["d/../train.jsonl", "s3://bucket/sft/", "/abs/x.parquet"],
                         output="out", storage_path="~/runs", max_steps=1)
    assert cfg.model == str(tmp_path / "assets" / "base")
    assert cfg.data == [str(tmp_path / "train.jsonl"), "s3://bucket/sft/", "/abs/x.parquet"]
    assert (cfg.output, cfg.storage_path) == (str(tmp_path / "out"), "/home/u/runs")
    assert FinetuneConfig(model="gs://b/m", data=["x"], storage_path="s3://b/runs", max_steps=1).storage_path == "s3://b/runs"


@pytest.mark.parametrize("name", ["tiny.yaml", "qwen2.5-1.5b.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = FinetuneConfig.from_sources(str(CONFIGS / name))
    assert cfg.seq_len % cfg.block_size == 0 and cfg.total_steps() > 0


@pytest.mark.parametrize("change,match", [
    ({"seq_len": 100}, "multiple of block_size"),
    ({"sub_block_size": 5}, "multiple of sub_block_size"),
    ({"max_steps": None}, "max_steps or max_tokens"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"resume": True}, "needs run_name"),
    ({"strategy": "deepspeed", "zero_stage": 1}, "zero_stage must be 2 or 3"),
    ({"objective": "ar"}, "objective must be one of"),
    ({"objective": "joint", "ar_loss_weight": -0.1}, "loss weights"),
    # what the workers or the data would reject only after Ray starts (distillation reads the data there)
    ({"docs_per_batch": 0}, "docs_per_batch must be >= 1"),
    ({"seed": 2**64}, "seed must be in"),
    ({"seed": -(2**63) - 1}, "seed must be in"),
    ({"max_failures": -2}, "max_failures must be >= 0, or -1"),
    ({"data_memory_mb": 0}, "data_memory_mb must be >= 1"),
])
def test_config_validation(change, match):
    base = dict(model="m", data=["d"], max_steps=3, block_size=32, sub_block_size=8, seq_len=64)
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**{**base, **change})


def test_yaml_values_are_read_as_their_options_types(tmp_path):
    """YAML 1.1 reads 1e-5 (no dot) and quoted numbers as strings: read as the option's type."""
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\nlr: 1e-5\nmax_tokens: 1e9\nseq_len: '64'\nblock_size: 32.0\nrun_name: 2024\n")
    cfg = FinetuneConfig.from_sources(str(path))
    assert (cfg.lr, cfg.max_tokens, cfg.seq_len, cfg.block_size, cfg.run_name) == (1e-5, 10**9, 64, 32, "2024")


@pytest.mark.parametrize("text,match", [
    ("lr: fast", "lr must be float"), ("seq_len: 64.5", "seq_len must be int"), ("data: 5", "data must be"),
    ("use_gpu: 'yes'", "use_gpu must be bool"), ("lr: .nan", "lr must be a finite number"), ("lr: .inf", "lr must be"),
    ("weight_decay: -1", "weight_decay >= 0"), ("grad_clip: .nan", "grad_clip must be a finite"),
    ("certainty_weight: .nan", "certainty_weight must be a finite"), ("cpus_per_worker: .nan", "cpus_per_worker must"),
    ("lr: [1", "not valid YAML"),
])
def test_bad_yaml_values_are_one_clear_error_before_ray_starts(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\ndata: [d]\nmax_steps: 1\n{text}\n")
    with pytest.raises(ValueError, match=match):
        FinetuneConfig.from_sources(str(path))
    assert main(["--config", str(path)]) == 2


def test_unknown_yaml_key_and_token_budget(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: [d]\nmax_steps: 1\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        FinetuneConfig.from_sources(str(bad))
    bad.write_text("model: m\ndata: [d]\nmax_steps: 1\nlearning_rate: 1\n1: x\nnull: y\n")  # keys YAML reads as int, None
    with pytest.raises(ValueError, match=r"unknown keys \['1', 'None', 'learning_rate'\]"):
        FinetuneConfig.from_sources(str(bad))
    cfg = FinetuneConfig(model="m", data=["d"], num_workers=2, batch_size=4, seq_len=64, block_size=32,
                         max_tokens=10_000, max_steps=100)
    assert cfg.total_steps() == math.ceil(10_000 / (2 * 4 * 64))


def test_cli_help_and_clear_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--strip-reasoning" in capsys.readouterr().out
    # A missing data file fails before Ray is started.
    assert main(["--model", str(tmp_path), "--data", str(tmp_path / "none.jsonl"), "--max-steps", "1"]) == 2


def test_an_output_that_holds_other_files_is_refused_before_ray_starts(qwen2_dir, tmp_path):
    """The export replaces what --output holds: a directory of the user's files, the storage path (the
    run's checkpoints) or the base model is a clear error (exit 2), and nothing there is touched."""
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(4))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    common = ["--model", str(qwen2_dir), "--data", str(data), "--max-steps", "1", "--storage-path",
              str(tmp_path / "runs"), "--run-name", "r"]
    for output in (tmp_path / "mine", tmp_path / "runs", tmp_path / "runs" / "r", qwen2_dir):
        assert main([*common, "--output", str(output)]) == 2, output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


QUERY = "?endpoint_override=127.0.0.1:1&scheme=http"


@pytest.mark.parametrize("storage_path, model, output", [
    (f"s3://b/runs{QUERY}", "s3://b/base", f"s3://b/runs{QUERY}"),  # the storage path: every run's checkpoints
    (f"s3://b/runs{QUERY}", "s3://b/base", f"s3://b/runs/r/{QUERY}"),  # the run's checkpoints
    (f"s3://b/runs{QUERY}", "s3://b/base", "s3://b/runs/r"),  # the same place, without the query
    ("s3://b/runs", "s3://b/base", f"s3://b/runs{QUERY}"),
    ("s3://b/my%20runs", "s3://b/base", "s3://b/my runs/r"),  # as pyarrow reads the key
    (f"s3://b/runs{QUERY}", f"s3://b/models/base{QUERY}", f"s3://b/models/base{QUERY}"),  # the base model
    (f"s3://b/runs{QUERY}", f"s3://b/models/base{QUERY}", "s3://b/models"),
    ("hdfs://nn:8020/runs?user=me", "hdfs://nn:8020/base", "hdfs://nn:8020/runs/r?user=you"),
])
def test_an_output_holding_the_run_or_the_base_model_is_refused_query_or_not(storage_path, model, output):
    """Compared as strings, a URI's query (`?endpoint_override=...`, kept last by fdllm.storage.join) hid
    that the export would replace the run's checkpoints or the base model."""
    cfg = resolve_run(FinetuneConfig(model=model, data=["d.jsonl"], storage_path=storage_path, run_name="r",
                                     output=output, max_steps=1))
    with pytest.raises(ValueError, match="would hold"):
        check_output(cfg)


@pytest.mark.parametrize("storage_path, model, output", [
    (f"s3://b/runs{QUERY}", "s3://b/base", None),  # the default: STORAGE_PATH/RUN_NAME/servable
    (f"s3://b/runs{QUERY}", "s3://b/base", f"s3://b2/runs{QUERY}"),  # another bucket
    (f"s3://b/runs{QUERY}", "s3://b/base", f"s3://b/runs2{QUERY}"),  # a name that starts alike
    (f"s3://b/runs{QUERY}", "s3://b/base", f"s3://b/runs/r2{QUERY}"),  # another run's directory
    (f"s3://b/runs{QUERY}", f"s3://b/base{QUERY}", f"gs://b/base{QUERY}"),  # another store
    ("hdfs://nn1:8020/runs", "hdfs://nn1:8020/base", "hdfs://nn2:8020/runs"),  # another host
])
def test_an_output_beside_the_run_and_the_base_model_passes(storage_path, model, output, monkeypatch):
    """Other buckets, hosts and names that only start alike are not confused with the run or the model
    (the checks that reach the store are stubbed: none is running)."""
    for check in ("check_directory_path", "check_publishable"):
        monkeypatch.setattr(finetune, check, lambda path: None)
    monkeypatch.setattr(finetune, "_run_exists", lambda storage_path, run_name: False)
    check_output(resolve_run(FinetuneConfig(model=model, data=["d.jsonl"], storage_path=storage_path, run_name="r",
                                            output=output, max_steps=1)))


@pytest.mark.parametrize("option, path", [("--output", "a_file/sub"), ("--storage-path", "a_file"),
                                          ("--storage-path", "a_file/sub")])
def test_an_output_or_storage_path_at_or_under_a_file_is_refused_before_ray_starts(option, path, qwen2_dir, tmp_path,
                                                                                   monkeypatch, caplog):
    """Writers would find out at the first checkpoint, after training: one line naming the option, exit 2."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the paths were checked"))
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(4))
    (tmp_path / "a_file").write_text("x")
    argv = ["--model", str(qwen2_dir), "--data", str(data), "--max-steps", "1", "--run-name", "r",
            "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "runs"), option, str(tmp_path / path)]
    assert main(argv) == 2
    assert f"{option}: {tmp_path / path}" in caplog.text and "is a file" in caplog.text


def test_a_base_model_whose_tokenizer_encodes_nothing_is_refused_before_ray_starts(qwen2_dir, tmp_path, monkeypatch,
                                                                                     caplog):
    """Without tokenizer.json transformers loads tokenizer_config.json alone as a tokenizer with no
    vocabulary, which encodes every row to no tokens: the data would be empty, the run a waste."""
    import shutil

    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the tokenizer was checked"))
    base = shutil.copytree(qwen2_dir, tmp_path / "base")
    (base / "tokenizer.json").unlink()
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(4))
    assert main(["--model", str(base), "--data", str(data), "--max-steps", "1"]) == 2
    assert "tokenizer without a vocabulary" in caplog.text


@pytest.mark.parametrize("name,content,problem", [
    ("model.safetensors", b"cut", "model.safetensors: not a readable safetensors file"),
    ("config.json", b'{"model_type": ', "config.json: not JSON"),
    ("fdllm_config.json", b'{"block_size": 0}', "fdllm_config.json: block_size (0) and sub_block_size"),
])
def test_a_base_model_with_a_broken_file_is_refused_before_ray_starts(name, content, problem, qwen2_dir, tmp_path,
                                                                      monkeypatch, caplog):
    """A file cut short or edited wrong failed in every worker, each restart of them (--max-failures),
    then ended in Ray's traceback; it is one line, naming the file, before Ray starts."""
    import shutil

    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the checkpoint was checked"))
    base = shutil.copytree(qwen2_dir, tmp_path / "base")
    (base / name).write_bytes(content)
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(4))
    assert main(["--model", str(base), "--data", str(data), "--max-steps", "1"]) == 2
    assert f"{base / name}: " in caplog.text and problem in caplog.text, caplog.text


def test_os_errors_are_one_line_and_exit_2(tmp_path, caplog):
    """As the quickstart's: an unreadable --config, or an OSError while running, is no traceback."""
    assert main(["--config", str(tmp_path)]) == 2 and f"--config {tmp_path}: Is a directory" in caplog.text

    def run_fn(cfg):
        raise OSError("No space left on device")

    argv = ["--model", "m", "--data", "d", "--max-steps", "1"]
    assert cli_main(argv, build_parser(), FinetuneConfig, run_fn) == 2 and "No space left" in caplog.text


def test_a_run_a_cluster_cannot_hold_yet_waits_with_a_warning_and_one_it_holds_says_nothing(monkeypatch, caplog):
    """A joined cluster may grow (an autoscaler adds nodes): what is missing is a warning, not an error
    (tests/integration/test_finetune.py has the local instance's error)."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    monkeypatch.setattr(finetune, "_started_ray_here", lambda: False)
    cfg = FinetuneConfig(model="m", data=["d"], max_steps=1, num_workers=4, cpus_per_worker=0.5, data_cpus=0.5, use_gpu=True)
    finetune.check_cluster_fits(cfg)
    assert ("this run needs 4 worker(s) x 0.5 CPU and 1 GPU + 0.5 CPU for the data, and the Ray cluster has 2 CPU "
            "and 0 GPU now: it waits for nodes to join") in caplog.text
    caplog.clear()
    finetune.check_cluster_fits(dataclasses.replace(cfg, use_gpu=False))  # the workers' 2 CPUs leave none to the data
    assert "this run needs 4 worker(s) x 0.5 CPU + 0.5 CPU for the data, and the Ray cluster has 2 CPU now" in caplog.text
    caplog.clear()
    finetune.check_cluster_fits(dataclasses.replace(cfg, num_workers=3, use_gpu=False))  # 3 x 0.5 + 0.5 = 2
    assert not caplog.text


def test_the_no_batch_error_counts_the_rows_rank_0_left_or_points_to_its_log(tmp_path):
    from pipelines.checkpoints import NO_BATCH_COUNTS

    cfg = FinetuneConfig(model="m", data=["d"], max_steps=1, storage_path=str(tmp_path), run_name="r")
    assert finetune._no_batch_counts(cfg) == "the workers' log above counts the rows skipped"  # none written
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / NO_BATCH_COUNTS).write_text('{"bad_rows": {"invalid_json": 3, "too_long": 0}, "good_docs": 1}')
    assert finetune._no_batch_counts(cfg) == "rows skipped: 3 of 4 (invalid_json=3)"
    (tmp_path / "r" / NO_BATCH_COUNTS).write_text('{"bad_rows": ')  # cut short
    assert finetune._no_batch_counts(cfg) == "the workers' log above counts the rows skipped"


def test_a_warmup_as_long_as_the_run_is_a_warning(qwen2_dir, tmp_path, caplog):
    """Said as the run is built (here one refused right after, for its --output), not silently accepted."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    argv = _resume_argv(qwen2_dir, tmp_path, "--lr", "1e-3", "--output", str(tmp_path / "out"))
    assert main([*argv, "--warmup-steps", "3"]) == 2 and "--warmup-steps" not in caplog.text  # 4 steps
    assert main([*argv, "--warmup-steps", "8"]) == 2
    assert ("--warmup-steps 8 is not below the run's 4 steps: the learning rate climbs for the whole run (to 0.0005 "
            "at its last step, --lr 0.001)") in caplog.text


def test_the_ingest_is_held_to_its_object_store_budget_and_in_order():
    """Ray Data's own budget is half the object store, which an ingest faster than the trainers filled
    with packed rows (4.1 GB across processes and growing, docs/finetune.md); ordered for exact resumes."""
    options = finetune.ingest_options(64)
    assert options.resource_limits.object_store_memory == 64 * 2**20 and options.preserve_order
    assert FinetuneConfig(model="m", data=["d"], max_steps=1).data_memory_mb == 512


def test_lr_schedule():
    """Warmup over steps 0..9; the cosine decay runs over steps 10..100: step 10 is the peak, step 55 the
    mean of peak and floor, and the floor is reached at 100, not before."""
    lrs = [lr_at(s, 100, 1e-3, 10, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[100] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[10] == pytest.approx(1e-3) and lrs[55] == pytest.approx((1e-3 + 1e-4) / 2) and lrs[99] > lrs[100]


class _Shard:
    def __init__(self, rows):
        self.rows = rows

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        assert batch_format == "numpy" and prefetch_batches >= 1  # workers prefetch
        for i in range(0, len(self.rows), batch_size):
            rows = self.rows[i : i + batch_size]
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _rows(tok, n_batches=3):
    """Rows as Ray would stream them from three map_batches outputs (one with only bad records)."""
    batches = [[*good_records(6, seed=1), "broken"], ["{}"], [*good_records(6, seed=2)]][:n_batches]
    rows = []
    for records in batches:
        out = process_records(records, tok, DataConfig(block_size=8, seq_len=64))
        rows += [{k: v[i] for k, v in out.items()} for i in range(len(out["num_docs"]))]
    return rows


def test_shard_reader_counts_on_consumption_and_skips_on_resume(qwen2_dir):
    tok = load_tokenizer(qwen2_dir)
    rows = _rows(tok)
    n_good = sum(int(r["num_docs"] > 0) for r in rows)
    reader = ShardReader(_Shard(rows), batch_size=2)
    batches = []
    while (b := reader.next_batch()) is not None:
        batches.append(b)
    assert len(batches) == n_good // 2 and batches[0]["input_ids"].shape == (2, 64)
    counts = reader.take_counts()
    assert counts["invalid_json"] == 1 and counts["missing_field"] == 1
    assert counts["good_docs"] == sum(int(r["num_docs"]) for r in rows)  # the partial last batch included

    resumed = ShardReader(_Shard(rows), batch_size=2, skip=2)
    first = resumed.next_batch()
    assert np.array_equal(first["input_ids"], batches[1]["input_ids"]) and resumed.consumed == 4
    assert set(resumed.take_counts()) <= {*BAD_REASONS, "good_docs"}


def _counts(rows) -> Counter:
    """Bad rows by reason and good documents of packed rows, summed here (the oracle of ShardReader's)."""
    counts = Counter()
    for row in rows:
        counts.update({reason: int(row[f"bad_{reason}"]) for reason in BAD_REASONS})
        counts["good_docs"] += int(row["num_docs"])
    return counts


def test_shard_reader_drain_counts_what_an_epoch_ended_by_another_worker_left(qwen2_dir):
    """Another worker's shard ran dry first: the epoch ends here too, with a batch fetched and not
    trained and rows after it; `drain` counts them all, as a full pass over the shard does."""
    tok = load_tokenizer(qwen2_dir)
    rows = _rows(tok)
    full = ShardReader(_Shard(rows), batch_size=2)
    while full.next_batch() is not None:
        pass
    assert full.take_counts() == _counts(rows)

    sequences = [i for i, row in enumerate(rows) if row["num_docs"] > 0]
    assert len(sequences) == 4 and len(rows) == 5  # a carrier of counts only among them
    for skip in (0, 2):  # a fresh epoch, and a resumed one: the sequences it skips were counted before its checkpoint
        reader = ShardReader(_Shard(rows), batch_size=1, skip=skip)
        assert reader.next_batch() is not None
        before = reader.take_counts()
        reader.drain()
        first = sequences[skip - 1] + 1 if skip else 0  # the first row past the skipped sequences
        assert before + reader.take_counts() == _counts(rows[first:]), skip
        assert reader.next_batch() is None and reader.consumed == skip + 1


@pytest.mark.parametrize("objective", [{}, {"joint_weights": (0.5, 0.5)}], ids=["diffusion", "joint"])
def test_noise_depends_on_the_sequence_not_on_the_batch(qwen2_dir, objective):
    """The property behind 'N workers train like one': per-row seeded noise, summed losses add up. The
    joint loss too: its AR mean is weighted by the worker's masked-token count, which is exactly its AR
    target count (the complementary masks cover each loss-carrying token once), so the parts' AR terms
    add up to the whole batch's."""
    tok = load_tokenizer(qwen2_dir)
    model = fdllm.load_model(qwen2_dir)
    mask_id = add_mask_token(tok, model)
    out = process_records(good_records(12), tok, DataConfig(block_size=8, seq_len=64))
    batch = {k: v[:4] for k, v in out.items()}
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    cpu = torch.device("cpu")
    with torch.no_grad():
        whole = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, seed=0, step=3, device=cpu, **objective)
        parts = [diffusion_loss_sum(model, h, mask_id, 8, 1e-3, seed=0, step=3, device=cpu, **objective) for h in halves]
        other_step = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, seed=0, step=4, device=cpu, **objective)
    assert whole[1] == parts[0][1] + parts[1][1]
    assert whole[0].item() == pytest.approx((parts[0][0] + parts[1][0]).item(), rel=1e-5)
    # another step draws other masks; complementary copies train every token either way, so with a
    # random model the sums stay close: only exact equality would mean the same noise
    assert other_step[0].item() != whole[0].item()


@pytest.mark.parametrize("objective", ["diffusion", "diffusion-uncut", "ar"])
def test_bench_train_measures_every_objective(objective):
    import argparse

    from benchmarks import bench_train

    sub = argparse.ArgumentParser().add_subparsers()
    args = bench_train.add_parser(sub).parse_args(["--seq-len", "32", "--batch-size", "2", "--block-size", "8",
                                                   "--steps", "1", "--warmup", "1"])
    result = bench_train._measure(objective, args)  # in-process: `run` would spawn a fresh process
    # >= 0: in the test's process the RSS high-water mark is the suite's (`run` measures in a fresh process)
    assert result["tokens_per_s"] > 0 and result["peak_mem_mib"] >= 0


def test_ray_train_per_report_lines_are_silenced(caplog):
    """The console keeps rank 0's one line per report; Ray Train's own report/checkpoint lines go."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    from pipelines.train_loop import _quiet_ray_train_reports

    _quiet_ray_train_reports()
    with caplog.at_level(logging.INFO):
        logging.getLogger(context.__file__).info("Reporting training result 1: TrainingReport(metrics={...})")
        logging.getLogger(storage.__name__).info("Checkpoint successfully created at: ...")
        logging.getLogger("pipelines.train_loop").info("step 5/20 loss 1.0")
    assert [r.getMessage() for r in caplog.records] == ["step 5/20 loss 1.0"]


def test_driver_and_worker_modules_do_not_import_each_other():
    """finetune.py (driver) and train_loop.py (workers) share finetune_config.py and checkpoints.py;
    neither imports the other's module, so a worker never loads the driver's CLI."""
    import ast
    from pathlib import Path

    pipelines = Path(__file__).resolve().parents[2] / "pipelines"

    def imported(name: str) -> set[str]:
        tree = ast.parse((pipelines / f"{name}.py").read_text())
        mods = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
            elif isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
        return mods

    assert "pipelines.finetune" not in imported("train_loop")
    for shared in ("finetune_config", "checkpoints"):
        assert not {"pipelines.finetune", "pipelines.train_loop"} & imported(shared), shared
    assert "pipelines.finetune_config" in imported("train_loop") and "pipelines.finetune_config" in imported("finetune")


def test_resolve_run_names_the_run_and_puts_the_export_under_it(tmp_path, monkeypatch):
    from pipelines.finetune import resolve_run

    monkeypatch.chdir(tmp_path)
    cfg = resolve_run(FinetuneConfig(model="base", data=["s3://b/data/", "train.jsonl"], storage_path="runs",
                                     run_name="r", max_steps=1))
    assert (cfg.model, cfg.data, cfg.storage_path) == (
        str(tmp_path / "base"), ["s3://b/data/", str(tmp_path / "train.jsonl")], str(tmp_path / "runs"))
    assert cfg.output == str(tmp_path / "runs" / "r" / "servable")
    remote = resolve_run(FinetuneConfig(model="s3://b/m", data=["d"], storage_path="gs://b/runs/", run_name="r",
                                        max_steps=1))
    assert remote.model == "s3://b/m" and remote.output == "gs://b/runs/r/servable"
    named = resolve_run(FinetuneConfig(model="m", data=["d"], output="out", max_steps=1))
    assert named.output == str(tmp_path / "out") and named.run_name.startswith("fdllm-")


def test_deepspeed_workers_get_the_cpu_accelerator_and_a_missing_package_is_a_clear_error(monkeypatch):
    from pipelines import finetune, train_loop

    cpu = FinetuneConfig(model="m", data=["d"], max_steps=1, strategy="deepspeed")
    assert finetune.worker_env(cpu)["DS_ACCELERATOR"] == "cpu"  # else DeepSpeed probes for CUDA
    gpu = FinetuneConfig(model="m", data=["d"], max_steps=1, strategy="deepspeed", use_gpu=True)
    assert "DS_ACCELERATOR" not in finetune.worker_env(gpu)  # DeepSpeed detects CUDA itself
    monkeypatch.setattr(train_loop, "has_deepspeed", lambda: False)
    with pytest.raises(ValueError, match="needs the deepspeed package"):
        finetune.build_trainer(cpu)  # before any worker starts


def test_deepspeed_on_cpu_skips_compiling_its_inference_all_reduce(monkeypatch):
    """DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce (44 s on 2 cores) at
    `initialize`, for tensor-parallel inference only: a CPU run skips it (its collectives are gloo's)."""
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.comm.torch import build_shm_op

    from pipelines.train_loop import skip_deepspeed_shm_build

    compatible = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(compatible, "deepspeed_shm_comm", compatible["deepspeed_shm_comm"])  # restored after
    assert compatible["deepspeed_shm_comm"]  # on Linux DeepSpeed would build it
    skip_deepspeed_shm_build()
    assert build_shm_op() is None  # returns before compiling anything


def test_joint_objective_in_the_train_loop_weights_the_packed_ar_loss(qwen2_dir):
    """--objective joint with weights (1, 0) trains exactly `fdllm.objective.ar_loss` of the packed
    batch (documents kept apart); (0, 1) the diffusion loss under a causal clean stream."""
    from fdllm.objective import ar_loss

    tok = load_tokenizer(qwen2_dir)
    model = fdllm.load_model(qwen2_dir)
    mask_id = add_mask_token(tok, model)
    batch = {k: v[:2] for k, v in process_records(good_records(8), tok, DataConfig(block_size=8, seq_len=64)).items()}
    ids, labels, pos, docs = (torch.from_numpy(batch[c]).long() for c in ("input_ids", "labels", "position_ids", "doc_ids"))
    assert len(set(docs[0].tolist())) > 1  # packed: the AR part must keep documents apart
    cpu = torch.device("cpu")
    with torch.no_grad():
        ar_sum, count = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, 0, 3, cpu, joint_weights=(1.0, 0.0))
        expected, _ = ar_loss(model, ids, labels, pos, docs)
        diff_only, _ = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, 0, 3, cpu, joint_weights=(0.0, 1.0))
        block_causal, _ = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, 0, 3, cpu)
    assert (ar_sum / count).item() == pytest.approx(expected.item(), rel=1e-5)
    assert diff_only.item() != pytest.approx(block_causal.item(), rel=1e-6)  # the clean stream attends causally


def test_a_failed_publish_fails_the_step_before_its_checkpoint_is_reported(tmp_path, monkeypatch):
    """The servable export is published before Ray stores the checkpoint: if publishing fails (a transient
    store error), Ray's retry resumes from the previous checkpoint and publishes again. Reported first,
    a failed publish at the last step was retried from the final checkpoint, with nothing left to do:
    the run succeeded without its export."""
    import ray.train

    from pipelines import train_loop

    events = []

    def save(directory, *args):
        (directory / "model.safetensors").write_bytes(b"weights")

    def publish(directory, output):
        events.append("publish")
        raise OSError("transient S3 error")

    monkeypatch.setattr(train_loop, "_save_checkpoint", save)
    monkeypatch.setattr(train_loop, "export_servable", publish)
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: events.append("report"))
    cfg = FinetuneConfig(model="m", data=["d"], max_steps=4, storage_path=str(tmp_path / "runs"), run_name="r")
    to_save = (None, None, None, train_loop.TrainState(step=4), cfg)
    with pytest.raises(OSError, match="transient"):
        train_loop._report({"step": 4}, to_save, str(tmp_path / "servable"))
    assert events == ["publish"]  # no checkpoint of step 4 reported: the retry redoes it

    monkeypatch.setattr(train_loop, "export_servable", lambda directory, output: events.append("publish"))
    events.clear()
    train_loop._report({"step": 4}, to_save, str(tmp_path / "servable"))
    assert events == ["publish", "report"]


def test_the_checkpoint_and_its_servable_export_keep_the_base_models_generation_config(tmp_path):
    """The end tokens and sampling defaults that transformers' generate and vLLM read from the base's
    generation_config.json (Qwen2.5's config.json names one of its two end tokens) were left out of
    the checkpoint, so of the export. Oracle: transformers' GenerationConfig of the base."""
    from types import SimpleNamespace

    import transformers

    from pipelines.checkpoints import export_servable
    from pipelines.train_loop import TrainState, _save_checkpoint

    base, checkpoint, servable = make_generation_config_checkpoint(tmp_path / "base"), tmp_path / "ckpt", tmp_path / "out"
    model, tokenizer = fdllm.load_model(base), load_tokenizer(base)
    parallel = SimpleNamespace(save_optimizer=lambda directory: {}, hf_module=lambda: model, decay_all=False)  # DDP's rank 0
    checkpoint.mkdir()
    _save_checkpoint(checkpoint, parallel, tokenizer, fdllm.BlockDiffusionConfig(mask_token_id=add_mask_token(tokenizer, model)),
                     TrainState(), FinetuneConfig(model=str(base), data=["d"], max_steps=1))
    export_servable(checkpoint, str(servable))
    expected = transformers.GenerationConfig.from_pretrained(base)
    assert transformers.GenerationConfig.from_pretrained(servable).to_dict() == expected.to_dict()
    assert expected.eos_token_id == [2, 0]


def test_a_checkpoint_directory_left_by_a_cut_short_write_is_cleared_before_the_report(tmp_path, monkeypatch):
    """Ray Train copies a checkpoint's files into its storage directory: a directory of the same step left by
    a write a crash cut short (before Ray registered it) would keep its stale files beside the new ones."""
    import ray.train

    from pipelines import train_loop

    stale = tmp_path / "runs" / "r" / "step_00000004" / "deepspeed" / "zero_pp_rank_3_mp_rank_00_optim_states.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a shard of the write that crashed")
    monkeypatch.setattr(train_loop, "_save_checkpoint", lambda directory, *args: (directory / "a").write_text("new"))
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: None)
    cfg = FinetuneConfig(model="m", data=["d"], max_steps=4, storage_path=str(tmp_path / "runs"), run_name="r")
    train_loop._report({"step": 4}, (None, None, None, train_loop.TrainState(step=4), cfg), None)
    assert not stale.parent.parent.exists()


def test_resume_skips_sequences_not_rows_past_a_row_without_documents(qwen2_dir):
    """`skip` counts trained sequences: a row without documents (a count carrier, or `row_multiple`
    padding) among the skipped rows must not use up one of them, or the resumed run trains a sequence
    twice (the other resume test skips only rows before the carrier)."""
    rows = _rows(load_tokenizer(qwen2_dir))
    sequences = [i for i, row in enumerate(rows) if row["num_docs"] > 0]
    carrier = next(i for i, row in enumerate(rows) if row["num_docs"] == 0)
    skip = sum(i < carrier for i in sequences) + 1  # one sequence past the carrier
    assert skip < len(sequences)
    resumed = ShardReader(_Shard(rows), batch_size=1, skip=skip)
    first = resumed.next_batch()
    assert np.array_equal(first["input_ids"][0], rows[sequences[skip]]["input_ids"])
    assert resumed.consumed == skip + 1


def test_good_docs_count_documents_not_rows(qwen2_dir):
    """`good_docs` (the base of the skipped-rows share) counts documents: rows packing several of them
    count each (in `_rows` every row holds one document, so rows and documents agree there)."""
    from pipelines.data import DataConfig, process_records
    from tests.sft_data import good_records

    out = process_records(good_records(8), load_tokenizer(qwen2_dir), DataConfig(block_size=8, seq_len=256))
    rows = [{k: v[i] for k, v in out.items()} for i in range(len(out["num_docs"]))]
    assert out["num_docs"].sum() == 8 and out["num_docs"].max() > 1  # the premise: rows of several documents
    reader = ShardReader(_Shard(rows), batch_size=1)
    while reader.next_batch() is not None:
        pass
    assert reader.take_counts()["good_docs"] == 8


def _run_worker_loop(qwen2_dir, tmp_path, monkeypatch, rows, checkpoint=None, save_to=None, **options):
    """`train_loop_per_worker` on one worker with Ray Train's calls replaced by fakes: the shard is `rows`,
    the run resumes from `checkpoint` (a directory) if given, checkpoints are written to `save_to` if given,
    and each report is recorded as (metrics, whether it carried a checkpoint)."""
    from types import SimpleNamespace

    import ray.train
    import ray.train.torch

    from pipelines import train_loop
    from pipelines.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(model=str(qwen2_dir), data=["unused.jsonl"], storage_path=str(tmp_path), run_name="r",
                         block_size=8, seq_len=64, batch_size=1, **options)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: checkpoint and ray.train.Checkpoint.from_directory(str(checkpoint)))
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: _Shard(rows))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kw: model)
    monkeypatch.setattr(train_loop, "_progress_bar", lambda *args: train_loop._NoProgress())
    reports = []

    def report(metrics, to_save, output):
        reports.append((metrics, to_save is not None))
        if to_save is not None and save_to is not None:
            save_to.mkdir(exist_ok=True)
            train_loop._save_checkpoint(save_to, *to_save)

    monkeypatch.setattr(train_loop, "_report", report)
    train_loop.train_loop_per_worker({"cfg": cfg})
    return reports


def test_the_last_step_is_checkpointed_when_max_steps_is_no_multiple_of_save_every(qwen2_dir, tmp_path, monkeypatch):
    """A run of 3 steps saving every 2 checkpoints (and so exports) steps 2 and 3: the final weights are
    never lost to the save interval (the integration runs use max_steps multiples of save_every)."""
    rows = _rows(load_tokenizer(qwen2_dir))
    reports = _run_worker_loop(qwen2_dir, tmp_path, monkeypatch, rows, max_steps=3, save_every=2, log_every=100)
    assert [(m["step"], saved) for m, saved in reports] == [(2, True), (3, True)]


def test_rows_are_counted_once_over_several_epochs(qwen2_dir, tmp_path, monkeypatch):
    """Later epochs re-read the same rows: the reported bad-row and good-document counts are one pass's."""
    from pipelines.data import BAD_REASONS

    rows = _rows(load_tokenizer(qwen2_dir))
    per_epoch = sum(int(r["num_docs"] > 0) for r in rows)
    reports = _run_worker_loop(qwen2_dir, tmp_path, monkeypatch, rows, max_steps=2 * per_epoch + 1, save_every=1000,
                               log_every=1)
    last = reports[-1][0]
    assert last["epoch"] == 2
    once = _counts(rows)
    assert {r: last[f"bad_{r}"] for r in BAD_REASONS} == {r: once[r] for r in BAD_REASONS} and any(once[r] for r in BAD_REASONS)
    assert last["good_docs"] == once["good_docs"]


def test_each_step_trains_at_the_schedules_rate_for_that_step(qwen2_dir, tmp_path, monkeypatch):
    """Step s (0-based; reported as step s + 1) uses lr_at(s): the first step is warmup's first rate."""
    rows = _rows(load_tokenizer(qwen2_dir))
    reports = _run_worker_loop(qwen2_dir, tmp_path, monkeypatch, rows, max_steps=3, save_every=1000, log_every=1,
                               lr=1e-3, warmup_steps=2, min_lr_ratio=0.1)
    assert [(m["step"], m["lr"]) for m, _ in reports] == [(s, lr_at(s - 1, 3, 1e-3, 2, 0.1)) for s in (1, 2, 3)]


def test_a_run_resumed_at_the_end_of_an_epoch_trains_on_into_the_next(qwen2_dir, tmp_path, monkeypatch):
    """A checkpoint taken at the last batch of an epoch (consumed = the shard's sequences) resumes into a
    new epoch: it is not a run whose data gave no batch."""
    rows = _rows(load_tokenizer(qwen2_dir))
    per_epoch = sum(int(r["num_docs"] > 0) for r in rows)
    options = dict(save_every=per_epoch, log_every=1)
    # one whole epoch, checkpointed at its last step; then resumed from that checkpoint
    _run_worker_loop(qwen2_dir, tmp_path, monkeypatch, rows, save_to=tmp_path / "ckpt", max_steps=per_epoch, **options)
    reports = _run_worker_loop(qwen2_dir, tmp_path, monkeypatch, rows, checkpoint=tmp_path / "ckpt",
                               max_steps=per_epoch + 2, **options)
    assert [(m["step"], m["epoch"], m["restored_step"]) for m, _ in reports] == [
        (per_epoch + 1, 1, per_epoch), (per_epoch + 2, 1, per_epoch)]


def _resumable_run(qwen2_dir, tmp_path, record: FinetuneConfig | None, **config_changes) -> str:
    """The run "r" under tmp_path/runs as Ray Train leaves it: its snapshot names the latest checkpoint,
    which holds the base model's config.json (with `config_changes`) and, unless None, `record`'s options."""
    import json

    from pipelines.checkpoints import RUN_SETTINGS, SNAPSHOT, run_settings

    checkpoint = tmp_path / "runs" / "r" / "step_00000002"
    checkpoint.mkdir(parents=True)
    config = json.loads((qwen2_dir / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, **config_changes}))
    if record is not None:
        (checkpoint / RUN_SETTINGS).write_bytes(run_settings(record))
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": checkpoint.name, "metrics": {"step": 2}}}
    (checkpoint.parent / SNAPSHOT).write_text(json.dumps(snapshot))
    return str(checkpoint)


def _resume_argv(qwen2_dir, tmp_path, *flags: str) -> list[str]:
    data = tmp_path / "sft.jsonl"
    if not data.exists():
        write_jsonl(data, good_records(4))
    return ["--model", str(qwen2_dir), "--data", str(data), "--storage-path", str(tmp_path / "runs"), "--run-name", "r",
            "--block-size", "8", "--sub-block-size", "4", "--seq-len", "64", "--max-steps", "4", *flags]


def test_a_resume_that_moves_the_data_position_is_refused_naming_each_change(qwen2_dir, tmp_path, caplog):
    """The saved data position counts the sequences each worker's shard consumed, in the layout the run
    had: resumed with other workers, batch, packing or rendering it would skip the wrong rows (the audit's
    2 x 1 resume of a 1 x 2 run trained on other sequences than an uninterrupted run). Refused before
    Ray starts, naming each option with both values and how to start afresh from the weights instead."""
    saved = _parse([*_resume_argv(qwen2_dir, tmp_path), "--batch-size", "2"])
    checkpoint = _resumable_run(qwen2_dir, tmp_path, saved)
    changed = ["--num-workers", "2", "--batch-size", "1", "--docs-per-batch", "8", "--strip-reasoning"]
    assert main([*_resume_argv(qwen2_dir, tmp_path, *changed), "--resume", "--lr", "0.5"]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert all(f"{flag} {old}, now {new}" in error for flag, old, new in [
        ("--num-workers", 1, 2), ("--batch-size", 2, 1), ("--docs-per-batch", 256, 8),
        ("--strip-reasoning", False, True)]), error
    assert "--lr" not in error and f"another --run-name, no --resume and --model {checkpoint}" in error
    assert "\n" not in error


def test_a_resume_with_another_model_is_refused_its_weights_come_from_the_checkpoint(qwen2_dir, dllm_dir, tmp_path):
    from pipelines.checkpoints import check_resume

    saved = _parse(_resume_argv(qwen2_dir, tmp_path))
    _resumable_run(qwen2_dir, tmp_path, saved)
    with pytest.raises(ValueError, match=f"--model '{qwen2_dir}', now '{dllm_dir}'"):
        check_resume(dataclasses.replace(saved, model=str(dllm_dir), resume=True))


def test_a_resume_with_other_training_options_warns_what_changed(qwen2_dir, tmp_path, caplog):
    from pipelines.checkpoints import check_resume

    saved = _parse(_resume_argv(qwen2_dir, tmp_path, "--lr", "0.001"))
    checkpoint = _resumable_run(qwen2_dir, tmp_path, saved)
    assert check_resume(dataclasses.replace(saved, resume=True)) == checkpoint and not caplog.text
    assert check_resume(dataclasses.replace(saved, resume=True, lr=0.05, max_steps=6)) == checkpoint
    assert ("resuming run 'r' with options changed since checkpoint" in caplog.text
            and "--lr 0.001 -> 0.05; --max-steps 4 -> 6" in caplog.text)


def test_a_checkpoint_of_before_the_record_resumes_with_a_warning(qwen2_dir, tmp_path, caplog):
    """Checkpoints written before runs recorded their options still resume: nothing can be checked."""
    from pipelines.checkpoints import check_resume

    checkpoint = _resumable_run(qwen2_dir, tmp_path, None)
    cfg = _parse([*_resume_argv(qwen2_dir, tmp_path), "--resume"])
    assert check_resume(cfg) == checkpoint and "records no run options" in caplog.text


def test_the_train_loop_records_the_runs_options_in_each_checkpoint(qwen2_dir, tmp_path, monkeypatch):
    """What `check_resume` reads: the options of the run that wrote the checkpoint, kept out of the export."""
    import json

    from pipelines.checkpoints import NOT_SERVABLE, RUN_SETTINGS, TRAIN_STATE
    from pipelines.train_loop import DECAY_MATRICES

    rows = _rows(load_tokenizer(qwen2_dir), n_batches=1)
    _run_worker_loop(qwen2_dir, tmp_path, monkeypatch, rows, save_to=tmp_path / "ckpt", max_steps=1, lr=3e-4)
    recorded = json.loads((tmp_path / "ckpt" / RUN_SETTINGS).read_text())
    assert (recorded["lr"], recorded["seq_len"], recorded["num_workers"], recorded["run_name"]) == (3e-4, 64, 1, "r")
    assert RUN_SETTINGS in NOT_SERVABLE
    # and the optimizer's layout: checkpoints without this mark resume into the one group they were made with
    saved = torch.load(tmp_path / "ckpt" / TRAIN_STATE, weights_only=False)
    assert saved[DECAY_MATRICES] is True and len(saved["optimizer"]["param_groups"]) == 2


@pytest.mark.parametrize("resume", [False, True])
def test_a_seq_len_past_the_models_positions_is_refused_before_ray_starts(qwen2_dir, tmp_path, caplog, resume):
    """2**36 passed validation and failed in a Ray Data packing task, a 200-line traceback later; on a
    resume the checkpoint's config.json is the one read (max_position_embeddings 512 in the base, 256 here)."""
    argv = _resume_argv(qwen2_dir, tmp_path, "--seq-len", "384" if resume else str(2**36))
    if resume:
        checkpoint = _resumable_run(qwen2_dir, tmp_path, _parse(argv), max_position_embeddings=256)
        argv.append("--resume")
    assert main(argv) == 2
    where, positions = (checkpoint, 256) if resume else (qwen2_dir, 512)
    assert f"--seq-len {384 if resume else 2**36} is more than the {positions} positions of {where}" in caplog.text


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_shrinks_matrices_and_spares_norms_and_biases(qwen2_dir, monkeypatch, decay_all):
    """Under zero gradients Adam's update is 0, so one step leaves each tensor scaled by its decay alone:
    (1 - lr x wd) for the 2-D ones, 1 for RMSNorm gains and biases. `decay_all` is the one-group optimizer of
    checkpoints written before the split, which a resume of them keeps."""
    import ray.train.torch

    from pipelines.train_loop import Parallel

    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kw: model)
    model = fdllm.load_model(qwen2_dir, dtype=torch.float32, device="cpu")
    cfg = FinetuneConfig(model="m", data=["d"], max_steps=1, strategy="ddp", weight_decay=0.1)
    parallel = Parallel(model, cfg, torch.device("cpu"), decay_all=decay_all)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lr = 1e-2
    parallel.step(sum((p * 0).sum() for p in model.parameters()), lr)
    vectors = [name for name, p in before.items() if p.dim() == 1]
    assert any("norm" in n for n in vectors) and any(n.endswith("bias") for n in vectors)
    for name, p in model.named_parameters():
        kept = 1.0 if p.dim() == 1 and not decay_all else 1 - lr * 0.1
        torch.testing.assert_close(p.detach(), before[name] * kept, rtol=1e-6, atol=0, msg=name)


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('ran').write_text('pwned')",))


def test_train_state_loads_what_a_run_saves_and_never_runs_code(tmp_path, monkeypatch):
    """A resume read train_state.pt with a full unpickle: a checkpoint planted in a shared bucket ran its
    code in every worker. What a run saves (counters, AdamW's state dict) loads; an object does not."""
    from pipelines.train_loop import TrainState, load_train_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = {"state": dataclasses.asdict(TrainState(step=3)), "decay_matrices": True, "optimizer": optimizer.state_dict()}
    torch.save(saved, tmp_path / "train_state.pt")
    loaded = load_train_state(tmp_path / "train_state.pt")
    assert loaded["state"] == saved["state"] and loaded["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer"])
    monkeypatch.chdir(tmp_path)
    torch.save({"state": _RunsCode()}, tmp_path / "planted.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_train_state(tmp_path / "planted.pt")
    assert not (tmp_path / "ran").exists()
