"""`python -m benchmarks.gpu_suite --smoke` runs every section end to end on CPU, so the GPU suite cannot rot."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from benchmarks import bench_kernels, gpu_suite


def test_gpu_suite_smoke_writes_every_section(tmp_path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path), "--smoke"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["engine exactness", "syncs per step", "decode", "pytest -m gpu", "step profile",
                              "quantized decode", "kernels", "training step"]
    assert all(s["status"] == "ok" for s in sections.values()), [s.get("error") for s in sections.values()]
    assert all(c["pass"] for c in sections["engine exactness"]["checks"])
    modes = {row["mode"] for row in sections["decode"]["table"]}
    assert modes == {"ar", "diffusion cache off", "diffusion cache on", "diffusion cache on, block lookahead",
                     "diffusion cache on, one token a step", "diffusion cache off, one token a step",
                     "speculative", "speculative, no lookahead", "hf generate"}
    rows = {row["mode"]: row for row in sections["decode"]["table"]}
    assert rows["diffusion cache on, one token a step"]["tokens/forward"] == 1.0
    # threshold ~0: a sub-block per step, and the lookahead's forwards take a block's first sub-block too
    assert rows["diffusion cache on, block lookahead"]["tokens/forward"] > rows["diffusion cache on"]["tokens/forward"]
    assert any(row.get("lookahead step cost", 0) > 0 for row in sections["decode"]["table"])
    assert any("speed-up @2.4" in row for row in sections["decode"]["table"])
    quantized = {row["format"]: row for row in sections["quantized decode"]["table"]}
    assert set(quantized) == {"float32", "int8", "int4", "fp8"} and "skipped" in quantized["fp8"]  # fp8: CUDA only
    assert quantized["int8"]["weight MB"] < quantized["float32"]["weight MB"]
    assert {row["objective"] for row in sections["training step"]["table"]} == {"diffusion", "diffusion-uncut", "ar"}
    profiled = {row["run"]: row for row in sections["step profile"]["table"]}  # CPU: no kernels, no eager-only run
    assert set(profiled) == {"ar, graphs off, batch 1", "diffusion cache on, graphs off, batch 1",
                             "diffusion cache on, graphs off, batch 2"}
    assert all(row["steps"] == gpu_suite.PROFILE_STEPS and row["wall ms/step"] > 0 for row in profiled.values())
    assert all(ops["host ops (self us/step)"] for ops in sections["step profile"]["top"].values())
    assert "step profile" in (tmp_path / "report.md").read_text()
    # what comes back from a device: the report, the kernel benchmark's rows and pytest's log, nothing transient
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kernels.json", "pytest_gpu.log", "report.json", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "## decode (ok" in md and "| shape | batch | mode |" in md
    assert "| speed-up @4 |" in md and "| lookahead step cost |" in md  # columns the first row lacks are shown
    assert "[gpu_suite] engine exactness: ok" in capsys.readouterr().out  # progress is printed as it goes


def test_decode_targets_read_their_own_rows():
    """The batch-1 targets: the plain diffusion row (sub-block cache on, graphs) against AR, and AR
    against the roofline; rows without graphs, at other batches or of other modes are not read."""
    def row(mode, ratio=None, **kw):
        return {"shape": "s", "batch": 1, "mode": mode, "graphs": True, "ms/step": 2.0} | (
            {"step/AR step": ratio} if ratio else {}) | kw

    table = [row("ar", **{"roofline ms": 1.0}), row("ar", graphs=False, **{"roofline ms": 0.1}),
             row("diffusion cache off", 2.0), row("diffusion cache on", 1.2), row("diffusion cache on", 9.0, graphs=False),
             row("diffusion cache on", 9.0, batch=8), row("diffusion cache on, block lookahead", 9.0),
             row("speculative", 9.0), {"shape": "s", "batch": 1, "mode": "hf generate", "ms/step": 5.0},
             row("ar, unfused kernels", 1.4)]
    checks = gpu_suite.decode_checks(table)
    assert [(c["value"], c["pass"]) for c in checks] == [(2.0, False), (1.2, True)]
    assert "roofline (1.00 ms)" in checks[0]["what"] and "diffusion step <= 1.3x AR step" in checks[1]["what"]


def test_a_hanging_section_is_recorded_and_a_rerun_of_it_keeps_the_others(tmp_path, monkeypatch):
    """Each section runs in its own process under a time limit; `--sections` reruns some and keeps the
    rest of the report."""
    earlier = {"name": "decode", "status": "ok", "seconds": 1.0, "table": [{"shape": "s", "ms/step": 2.0}]}
    (tmp_path / "report.json").write_text(json.dumps({"meta": {}, "sections": [earlier]}))
    monkeypatch.setitem(gpu_suite.SECTION_TIMEOUT_S, "syncs per step", 0.01)
    assert gpu_suite.main(["--out", str(tmp_path), "--smoke", "--sections", "syncs per step"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["sections"]] == ["syncs per step", "decode"]  # report order
    assert report["sections"][1] == earlier
    assert report["sections"][0]["status"] == "error" and "timed out after 0.01 s" in report["sections"][0]["error"]
    assert "timed out" in (tmp_path / "report.md").read_text()

    monkeypatch.setitem(gpu_suite.SECTION_TIMEOUT_S, "syncs per step", 120)
    assert gpu_suite.main(["--out", str(tmp_path), "--smoke", "--sections", "syncs per step"]) == 0
    sections = json.loads((tmp_path / "report.json").read_text())["sections"]
    assert [(s["name"], s["status"]) for s in sections] == [("syncs per step", "ok"), ("decode", "ok")]
    assert "needs CUDA" in sections[0]["note"]  # the section's own result, written by its process


def test_a_deadline_skips_what_cannot_start_and_cuts_what_runs(tmp_path, monkeypatch):
    """--deadline-s: a device lent for a fixed time ends with a complete report, not a killed run. On a
    clock that only a section's run advances (by 2 s), so a slow machine's start-up cannot skip the first."""
    now = [0.0]
    run = gpu_suite.Report.run
    monkeypatch.setattr(gpu_suite, "deadline_clock", lambda: now[0])
    monkeypatch.setattr(gpu_suite.Report, "run", lambda self, *a: (run(self, *a), now.__setitem__(0, now[0] + 2)))
    monkeypatch.setattr(gpu_suite, "MIN_SECTION_S", 119)
    assert gpu_suite.main(["--out", str(tmp_path), "--smoke", "--sections", "syncs per step,training step",
                           "--deadline-s", "120"]) == 1
    sections = {s["name"]: s for s in json.loads((tmp_path / "report.json").read_text())["sections"]}
    # started with 120 s left (more than the 119 a section needs), and done; then 118 s was left
    assert sections["syncs per step"]["status"] == "ok"
    assert sections["training step"]["status"] == "skipped" and "--deadline-s left" in sections["training step"]["note"]
    assert "## training step (skipped" in (tmp_path / "report.md").read_text()


def test_unknown_sections_are_refused_with_the_valid_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_suite.main(["--out", str(tmp_path), "--sections", "decode,decoding"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown section(s) ['decoding']" in err and "training step" in err


def test_failed_requests_fail_the_run_rather_than_time_it():
    """The engine fails a step's requests instead of raising: a CUDA-only error must not pass for a fast run."""
    ok = SimpleNamespace(finish_reason="length", token_ids=[1, 2], error=None)
    failed = SimpleNamespace(finish_reason="error", token_ids=[], error="RuntimeError: CUDA error: illegal address")
    assert gpu_suite._tokens([ok, ok]) == [[1, 2], [1, 2]]
    with pytest.raises(RuntimeError, match="1 of 2 request.*illegal address"):
        gpu_suite._tokens([ok, failed])


def test_a_steps_cost_is_timed_over_decode_steps_alone():
    """The eager prefill step (every prompt token of the batch) weighed ~6x more in a diffusion run's ~20
    steps than in an AR run's ~128, biasing the step ratio the 1.3x target reads: ms/step counts only
    the steps after the last prompt token was prefilled; tokens/s stays end to end."""
    import fdllm

    model = gpu_suite.random_model("smoke", torch.device("cpu"), torch.float32)
    engine = gpu_suite._engine(model, model.config.vocab_size - 1, backend="torch", eager=True, cache=True,
                               batch=2, threshold=0.5, block=8, sub=4)
    engine.scheduler.max_prefill_tokens = 40  # two prompts of 30 tokens: prefilled over two steps
    step, prefilled = engine.step, []

    def stepped():  # the prefill steps take a second more
        prefilled.append(any(s.num_prefill_left for s in engine.scheduler.running) or bool(engine.scheduler.waiting))
        if prefilled[-1]:
            time.sleep(1.0)
        return step()

    engine.step = stepped
    timed = gpu_suite._decode_run(engine, [[5] * 30, [6] * 30], fdllm.SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert prefilled[:2] == [True, True] and not any(prefilled[2:])
    assert timed.steps == len(prefilled) and timed.decode_steps == timed.steps - 2
    assert timed.ms_per_step < 100 < 2000 / timed.steps  # the prefill seconds would have been ~200 ms a step
    assert timed.seconds > 2 and timed.tokens_per_s == pytest.approx(timed.tokens / timed.seconds)


def test_step_ratios_compare_runs_made_the_same_way():
    """A row's step cost is against the AR step with graphs on or off like itself; the lookahead step
    cost is the speculative row against the one without its lookahead."""
    def row(mode, ms, graphs=True):
        return {"mode": mode, "graphs": graphs, "ms/step": ms}

    rows = [row("ar", 2.0), row("ar", 8.0, graphs=False), row("diffusion cache on", 3.0),
            row("diffusion cache on", 12.0, graphs=False), row("speculative, no lookahead", 4.0), row("speculative", 5.0)]
    gpu_suite.add_step_ratios(rows)
    assert [r.get("step/AR step") for r in rows] == [None, None, 1.5, 1.5, 2.0, 2.5]
    assert rows[2]["speed-up @2.4"] == pytest.approx(1.6) and rows[2]["speed-up @4"] == pytest.approx(4 / 1.5)
    assert [r.get("lookahead step cost") for r in rows] == [None] * 5 + [1.25]


def test_a_stopped_section_keeps_the_rows_it_wrote(tmp_path):
    """A long section writes its rows as it goes: killed at its timeout, the report keeps them."""
    result = gpu_suite.SectionResult(tmp_path / "section.json")
    result.partial({"table": [{"mode": "ar", "ms/step": 2.0}]})
    written = json.loads((tmp_path / "section.json").read_text())
    assert written["status"] == "partial"
    section = gpu_suite._stopped("timed out after 9 s", "timeout", written, collections.deque(["last line\n"]))
    assert section["status"] == "timeout (partial)" and section["table"] == [{"mode": "ar", "ms/step": 2.0}]
    assert section["error"] == "timed out after 9 s" and section["output tail"] == "last line\n"
    assert gpu_suite._stopped("exited -11", "error", None, collections.deque())["status"] == "error"


def test_a_failing_quantized_format_keeps_the_other_formats(monkeypatch):
    def rows(fmt, *args):
        yield {"format": fmt or "float32", "ms/step": 1.0}
        if fmt == "int8":
            raise RuntimeError("int8 kernel failed")

    monkeypatch.setattr(gpu_suite, "_quantized_rows", rows)
    partials = []
    table = gpu_suite.quantized(torch.device("cpu"), True, partials.append)["table"]
    assert {"format": "int8", "error": "RuntimeError('int8 kernel failed')"} in table
    assert [row["format"] for row in table if "ms/step" in row] == ["float32", "int8", "int4"]  # fp8: skipped on CPU
    assert partials[-1]["table"] == table


def test_a_failing_decode_engine_is_its_runs_error_rows_and_the_table_goes_on(monkeypatch):
    """An engine that cannot be built (a kernel that does not compile, a failed capture: what a new
    configuration, as the Triton decode GEMM's rows, risks on its first GPU run) costs its own rows."""
    real = gpu_suite._engine

    def engine(*args, cache, **kwargs):
        if not cache:
            raise RuntimeError("capture failed")
        return real(*args, cache=cache, **kwargs)

    monkeypatch.setattr(gpu_suite, "_engine", engine)
    partials = []
    table = gpu_suite.decode(torch.device("cpu"), True, 0.0, partials.append)["table"]
    failed = [row for row in table if "error" in row]
    assert {row["mode"] for row in failed} == {"diffusion cache off", "diffusion cache off, one token a step"}
    assert all(row["error"] == "RuntimeError: capture failed" for row in failed)
    measured = {row["mode"] for row in table if "ms/step" in row}
    assert {"ar", "diffusion cache on", "speculative"} <= measured
    assert "step/AR step" in next(row for row in table if row["mode"] == "diffusion cache on")
    assert partials[-1]["table"][-1]["mode"] == table[-1]["mode"]


def test_a_failing_profile_run_is_an_error_row_and_the_others_run(monkeypatch):
    real = gpu_suite._profiled_steps

    def profiled(engine, prompts, mode, *args):
        if len(prompts) > 1:
            raise RuntimeError("profiler failed")
        return real(engine, prompts, mode, *args)

    monkeypatch.setattr(gpu_suite, "_profiled_steps", profiled)
    table = gpu_suite.step_profile(torch.device("cpu"), True)["table"]
    assert [row["run"] for row in table] == ["ar, graphs off, batch 1", "diffusion cache on, graphs off, batch 1",
                                             "diffusion cache on, graphs off, batch 2"]
    assert table[-1]["error"] == "RuntimeError: profiler failed"
    assert all(row["kernels/step"] >= 0 and row["steps"] > 0 for row in table[:2])


def test_failed_requests_fail_the_sync_count_rather_than_count_nothing():
    failed = SimpleNamespace(finish_reason="error", token_ids=[], error="RuntimeError: CUDA error")
    engine = SimpleNamespace(step=lambda: [failed], runner=SimpleNamespace(graphs=None), num_running=0)
    with pytest.raises(RuntimeError, match="CUDA error"):
        gpu_suite.syncs_of_full_decode_steps(engine, 8)


def test_a_failing_kernel_backend_is_a_row_and_a_broken_flash_attn_is_skipped(monkeypatch):
    """The kernels section: one backend's failure must not lose the others' rows; a flash-attn wheel
    built for another torch (found, but raises at import) is skipped with why."""
    row = bench_kernels._measured("paged_attention", "flash_attn", 1, 64, 8, 1000, 1.0, lambda: 1 / 0)
    assert row.ms is None and row.error == "ZeroDivisionError: division by zero"
    assert bench_kernels._measured("confidence", "triton", 1, 0, 8, 10**6, 1.0, lambda: (1.0, 0.0)).gbps == 1.0

    def broken(name):
        raise OSError("flash_attn_2_cuda.so: undefined symbol")

    module = ModuleType("flash_attn")
    module.__getattr__ = broken
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert "undefined symbol" in bench_kernels.flash_attn_skipped(torch.device("cuda"), torch.bfloat16)
    assert bench_kernels.flash_attn_skipped(torch.device("cpu"), torch.bfloat16) == "needs CUDA and fp16 or bf16"


def test_a_section_whose_package_is_missing_is_skipped_with_the_install_line(tmp_path, monkeypatch):
    """torchao (quant extra) and pytest (dev extra) are not in the GPU extra: the section that needs one
    is recorded as skipped with how to install it, not failed at its import, and the others run."""
    find_spec = gpu_suite.importlib.util.find_spec
    monkeypatch.setattr(gpu_suite.importlib.util, "find_spec", lambda name: None if name == "torchao" else find_spec(name))
    assert gpu_suite.main(["--out", str(tmp_path), "--smoke", "--sections", "quantized decode"]) == 1
    (section,) = json.loads((tmp_path / "report.json").read_text())["sections"]
    assert section["status"] == "skipped" and "needs torchao" in section["note"]
    assert gpu_suite.INSTALL_ALL in section["note"] and '".[train,serve,gpu,quant,dev]"' in gpu_suite.INSTALL_ALL


def test_the_engine_oracle_imports_without_pytest(tmp_path):
    """The exactness section imports the no-cache reference on a GPU machine installed with the GPU
    extras, where pytest may be absent."""
    code = "import sys; sys.modules['pytest'] = None; from tests.reference import reference_generate; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=gpu_suite.REPO)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_on_a_gpu_the_run_ends_by_the_8_minute_target_unless_told_otherwise(tmp_path, monkeypatch):
    """Without --deadline-s a GPU run gives its sections what is left of 480 s; a section's own processes
    (pytest, bench_kernels) get a limit inside the section's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    given = {}

    def run(self, name, child_argv, timeout_s):
        given[name] = timeout_s
        self.add(name, {"status": "ok"}, 0.0)

    monkeypatch.setattr(gpu_suite.Report, "run", run)
    gpu_suite.main(["--out", str(tmp_path), "--sections", "decode"])
    assert gpu_suite.DEFAULT_DEADLINE_S - 5 < given["decode"] <= gpu_suite.DEFAULT_DEADLINE_S
    gpu_suite.main(["--out", str(tmp_path), "--sections", "decode", "--deadline-s", "inf"])
    assert given["decode"] == gpu_suite.SECTION_TIMEOUT_S["decode"]
    assert gpu_suite.inner_timeout(180) < 180


def test_bench_kernels_writes_each_row_as_it_is_measured(tmp_path):
    """The kernels section keeps the rows measured before a time limit stops bench_kernels."""
    path = tmp_path / "kernels.json"
    rows = bench_kernels.Rows(str(path), {"device": "d", "skipped": {}})
    rows.write()
    assert json.loads(path.read_text())["rows"] == []
    rows.add(bench_kernels._measured("confidence", "triton", 1, 0, 8, 10**6, 1.0, lambda: (1.0, 0.0)))
    written = json.loads(path.read_text())
    assert written["device"] == "d" and [r["backend"] for r in written["rows"]] == ["triton"]


def _command_lines() -> dict[int, list[bytes]]:
    """argv of each process running now (one that ends while read is left out)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
    return found


def _processes_mentioning(text: str) -> list[int]:
    return [pid for pid, argv in _command_lines().items() if any(text.encode() in arg for arg in argv)]


def _section_result_files(out: Path) -> set[Path]:
    """Where the suite writing to `out` has its running sections leave their results. Read from the
    sections' own command lines: a forked child carries its parent's until it execs."""
    return {Path(argv[argv.index(b"--section-result") + 1].decode()) for argv in _command_lines().values()
            if b"--section-result" in argv and str(out).encode() in argv}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_stopped_suite_stops_its_running_section(tmp_path):
    """Each section runs in a session of its own (so a timeout kills what it started); a suite stopped
    by SIGTERM (`timeout`, a scheduler) or Ctrl-C must take the running section with it, not leave it
    running on the device for up to its time limit, nor its scratch directory in /tmp."""
    out = tmp_path / "stopped-suite"
    suite = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(out), "--smoke",
                              "--sections", "decode"], cwd=gpu_suite.REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    for line in suite.stdout:
        if "[gpu_suite] decode ..." in line:
            break
    deadline = time.monotonic() + 120
    while not _section_result_files(out) and time.monotonic() < deadline:  # the section has started
        time.sleep(0.1)
    (result_file,) = _section_result_files(out)
    assert result_file.parent.is_dir()
    suite.send_signal(signal.SIGTERM)
    assert suite.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_mentioning(str(out))
    assert not result_file.parent.exists()


def test_the_roofline_reads_each_devices_own_bandwidth():
    """A substring lookup gave "NVIDIA H100 PCIe" (2.0 TB/s) and "NVIDIA H100 NVL" (3.9) the SXM H100's
    3.35 TB/s, and every A100 the 80 GB SXM's: the roofline target was read against the wrong peak."""
    names = {"NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H100 PCIe": 2000.0, "NVIDIA H100 NVL": 3900.0,
             "NVIDIA H200": 4800.0, "NVIDIA A100-SXM4-80GB": 2039.0, "NVIDIA A100 80GB PCIe": 1935.0,
             "NVIDIA A100-SXM4-40GB": 1555.0, "NVIDIA A100-PCIE-40GB": 1555.0, "NVIDIA L4": 0.0}
    assert {name: gpu_suite.peak_gbps(name) for name in names} == names


def test_each_sync_is_counted_with_the_line_that_made_it(monkeypatch):
    """The count alone does not say what to fix: the lines do. Only torch's sync warning counts: the 2
    syncs in one AR step of the first H200 runs were one sync and the mode's own once-per-process
    warning (torch: the mode "does not yet detect all synchronizing operations"), which failed the
    syncs row and test_one_sync_per_decode_step."""
    import warnings

    modes = []

    def set_mode(mode):  # torch's first use in a process warns once, from set_sync_debug_mode's own line
        if not modes:
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations", UserWarning)
        modes.append(mode)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    running = [3, 3, 3, 8, 8, 0]  # three prefill steps, two counted steps, then done

    def step():
        running.pop(0)
        warnings.warn("called a synchronizing CUDA operation", UserWarning)  # torch warns from the caller's line
        return []

    engine_type = type("Engine", (), {"num_running": property(lambda self: running[0])})
    where = collections.Counter()
    engine = engine_type()
    engine.step, engine.runner = step, SimpleNamespace(graphs=None)
    counts = gpu_suite.syncs_of_full_decode_steps(engine, 8, where)
    assert counts == [1, 1] and modes == ["warn", "default"] * 2
    (line, n), = where.items()
    assert n == 2 and line.startswith("tests/benchmarks/test_gpu_suite.py:")
    assert line.endswith(": called a synchronizing CUDA operation")


def test_pytest_gpu_names_the_failing_tests(monkeypatch, tmp_path):
    out = "..F\nFAILED tests/kernels/test_x.py::test_y - AssertionError: no\n1 failed, 2 passed in 1.0s\n"
    monkeypatch.setattr(gpu_suite.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=out, stderr="", returncode=1))
    result = gpu_suite.pytest_gpu(smoke=False, budget_s=60, out=tmp_path)
    assert result["failed"] == ["FAILED tests/kernels/test_x.py::test_y - AssertionError: no"]
    assert (tmp_path / "pytest_gpu.log").read_text() == out
    assert not result["checks"][0]["pass"]


@pytest.mark.parametrize("summary, ok", [("25 passed in 40.1s", True), ("2 passed, 23 skipped in 3.0s", True),
                                         ("25 skipped, 170 deselected in 2.0s", False)])
def test_pytest_gpu_passes_only_when_a_test_ran(monkeypatch, summary, ok):
    monkeypatch.setattr(gpu_suite.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=summary, stderr="", returncode=0))
    assert gpu_suite.pytest_gpu(smoke=False, budget_s=60)["checks"][0]["pass"] is ok


def test_decode_shapes_and_batches_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path), "--smoke", "--decode-shapes", "qwen2.5-1.5b,gpt-5"])
    assert "expected a comma list of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path), "--smoke", "--decode-batches", "0"])


def test_a_failing_check_fails_the_run_and_is_named():
    """A section that ends with a failing check (exactness, pytest -m gpu) is no passing run: exit 1, named."""
    ok = {"name": "decode", "status": "ok", "checks": [gpu_suite._check("fine", 1, True)]}
    bad = {"name": "engine exactness", "status": "ok", "checks": [gpu_suite._check("graphs == eager", False, False)]}
    assert gpu_suite.outcome([ok]) == ("", 0)
    line, status = gpu_suite.outcome([bad, ok])
    assert status == 1 and "failed checks: ['engine exactness: graphs == eager']" in line
    assert gpu_suite.outcome([{"name": "kernels", "status": "error"}]) == (
        "; sections with errors or skipped: ['kernels']", 1)
