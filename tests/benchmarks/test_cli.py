"""The benchmarks' command lines refuse a count < 1, an empty or bad list, an output file that is a
directory, a checkpoint that does not load, a device torch does not know and a GPU run without a GPU
at parsing: exit 2 and the option named, before any work."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_host, bench_train, benchmark, data, gpu_suite


def _refused(parse, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


BAD = [
    (bench_host.parse_args, ["--repeats", "0"], "--repeats: must be >= 1"),
    (bench_host.parse_args, ["--batch-sizes", "0"], "--batch-sizes: must be >= 1"),
    (bench_host.parse_args, ["--batch-sizes", "1,-4"], "--batch-sizes: must be >= 1"),
    (bench_host.parse_args, ["--batch-sizes", ","], "--batch-sizes: expected at least one integer"),
    (bench_host.parse_args, ["--batch-sizes", "1,x"], "--batch-sizes: expected comma-separated integers"),
    (bench_host.parse_args, ["--json", "{dir}"], "--json: {dir} is a directory"),
    (benchmark.parse_args, ["decode", "--repeats", "0"], "--repeats: must be >= 1"),
    (benchmark.parse_args, ["decode", "--batch-sizes", ""], "--batch-sizes: expected at least one integer"),
    (benchmark.parse_args, ["train", "--steps", "0"], "--steps: must be >= 1"),
    (benchmark.parse_args, ["train", "--output", "{dir}"], "--output: {dir} is a directory"),
    (benchmark.parse_args, ["train", "--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    (benchmark.parse_args, ["prefix", "--system-len", "0"], "--system-len: must be >= 1"),
    (benchmark.parse_args, ["prefix", "--question-len", "-2"], "--question-len: must be >= 1"),
    (benchmark.parse_args, ["kernels", "--batches", "0,8"], "--batches: must be >= 1"),
    (benchmark.parse_args, ["kernels", "--json", "{dir}"], "--json: {dir} is a directory"),
    (benchmark.parse_args, ["serve", "--concurrency", "0"], "--concurrency: must be >= 1"),
    (benchmark.parse_args, ["serve", "--requests", "0"], "--requests: must be >= 1"),
    (benchmark.parse_args, ["paging", "--requests", "-1"], "--requests: must be >= 1"),
    (benchmark.parse_args, ["prefix", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (benchmark.parse_args, ["score", "--contexts", "0"], "--contexts: must be >= 1"),
    (bench_host.parse_args, ["--model", "{dir}/none"], "--model: {dir}/none: no such checkpoint directory"),
    (benchmark.parse_args, ["decode", "--model", "{dir}"], "--model: no config.json in {dir}"),
    (benchmark.parse_args, ["train", "--model", "{dir}/none"], "--model: {dir}/none: no such checkpoint directory"),
    # amounts: 0 CPUs started a Ray instance that scheduled nothing, forever; 0 GB divided by zero
    (data.build_parser().parse_args, ["--cpus", "0"], "--cpus: must be a finite number > 0, got 0"),
    (data.build_parser().parse_args, ["--data-cpus", "-1"], "--data-cpus: must be a finite number > 0, got -1"),
    (data.build_parser().parse_args, ["--sizes-gb", "0.1", "0"], "--sizes-gb: must be a finite number > 0, got 0"),
    (data.build_parser().parse_args, ["--tokenizer", "{dir}/none"], "--tokenizer: {dir}/none is not a directory"),
    (gpu_suite.main, ["--smoke", "--out", "{dir}/o", "--peak-gbps", "-5"], "--peak-gbps: must be a finite number > 0"),
    (gpu_suite.main, ["--smoke", "--out", "{dir}/o", "--deadline-s", "0"], "--deadline-s must be > 0 (inf: no deadline)"),
    (benchmark.parse_args, ["paging", "--model", "assets"], "--model: no config.json in assets"),
    (benchmark.parse_args, ["score", "--model", "{dir}/none"], "--model: {dir}/none: no such checkpoint directory"),
    (bench_host.parse_args, ["--device", "gpu"], "--device: device 'gpu' is not a torch device"),
    (benchmark.parse_args, ["paging", "--device", "cuda:x"], "--device: device 'cuda:x' is not a torch device"),
    (data.build_parser().parse_args, ["--batch-size", "0"], "--batch-size: must be >= 1"),
    (data.build_parser().parse_args, ["--output", "{dir}"], "--output: {dir} is a directory"),
    (data.build_parser().parse_args, ["--output", "{dir}/no/such/dir/out.json"], "is not an existing directory"),
    # an empty list was an IndexError traceback after the run; an unknown name exit status 1
    (benchmark.parse_args, ["train", "--objectives", ","], "--objectives: expected a comma list of diffusion,"),
    (benchmark.parse_args, ["train", "--objectives", "ar,sft"], "--objectives: unknown objectives ['sft']"),
    (bench_train.main, ["--seq-len", "100", "--block-size", "32"], "bench_train: error: --seq-len (100) must be a multiple"),
    (benchmark.parse_args, ["serve", "--timeout", "nan"], "--timeout: must be a finite number > 0, got nan"),
    # --chaos against no server was an httpx.ConnectError traceback
    (benchmark.main, ["serve", "--url", "http://127.0.0.1:8489", "--chaos", "--concurrency", "1", "--requests", "1"],
     "benchmark serve: error: no answer from http://127.0.0.1:8489 (ConnectError"),
]


@pytest.mark.parametrize("parse, argv, message", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_counts_lists_and_output_files_are_refused_at_parsing(parse, argv, message, tmp_path, capsys):
    err = _refused(parse, [a.format(dir=tmp_path) for a in argv], capsys)
    assert message.format(dir=tmp_path) in err


def test_good_lists_parse_into_ints():
    assert bench_host.parse_args(["--batch-sizes", "1,8,64"]).batch_sizes == [1, 8, 64]
    assert benchmark.parse_args(["serve"]).concurrency == [1, 4, 16]  # the default, as "1,4,16" was
    assert benchmark.parse_args(["serve", "--concurrency", "1,8,"]).concurrency == [1, 8]


@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_gpu_suite_refuses_an_out_that_is_or_is_under_a_file(out, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_suite, "Report", lambda *a, **k: pytest.fail("the suite started"))
    (tmp_path / "a_file").write_text("x")
    assert "--out: " in _refused(gpu_suite.main, ["--out", str(tmp_path / out), "--smoke"], capsys)


def test_gpu_suite_without_cuda_needs_smoke(tmp_path, monkeypatch, capsys):
    """Without --smoke it runs the 1.5B/7B shapes: hours on a CPU. It points to --smoke instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_suite, "Report", lambda *a, **k: pytest.fail("the GPU suite started on a CPU"))
    err = _refused(gpu_suite.main, ["--out", str(tmp_path / "suite")], capsys)
    assert "no CUDA device" in err and "--smoke" in err
    assert not (tmp_path / "suite").exists()


@pytest.mark.parametrize("main, argv, message", [
    (bench_host.main, ["--stub-model", "--batch-sizes", "1", "--threshold", "2"], "bench_host: error: threshold must be"),
    (bench_host.main, ["--stub-model", "--batch-sizes", "1", "--repetition-penalty", "0"],
     "bench_host: error: repetition_penalty must be"),
    (benchmark.main, ["decode", "--heads", "12", "--kv-heads", "5"], "benchmark decode: error: "),
    (benchmark.main, ["score", "--dtype", "bogus"], "benchmark score: error: unsupported dtype 'bogus'"),
])
def test_values_only_the_engine_checks_are_one_line_and_exit_2(main, argv, message, capsys):
    """A threshold, a penalty, a dtype or heads the engine or the model refuses when built were tracebacks (exit 1)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
