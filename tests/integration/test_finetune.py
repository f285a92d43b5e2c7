"""pipelines/finetune.py end to end on a local Ray instance (2 CPUs): training, bad-row counts,
servable checkpoints, worker failure and resume, and 1 vs 2 workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import fdllm  # noqa: E402
from fdllm.config import BlockDiffusionConfig  # noqa: E402
from fdllm.tokenizer import MASK_TOKEN, load_tokenizer  # noqa: E402
from pipelines.data import BAD_REASONS  # noqa: E402
from pipelines.finetune import FinetuneConfig, build_parser, run  # noqa: E402
from tests.helpers import start_local_ray  # noqa: E402
from tests.sft_data import BROKEN_ROWS, expected_bad_counts, good_records, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def _config(*argv: str) -> FinetuneConfig:
    args = vars(build_parser().parse_args(list(argv)))
    return FinetuneConfig.from_sources(args.pop("config"), **args)


def _common(model: Path, data: Path, storage: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--storage-path", str(storage),
            "--cpus-per-worker", "0.5", "--data-cpus", "0.5", "--block-size", "8", "--sub-block-size", "4",
            "--seq-len", "128", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1"]


def _descendants(pid: int) -> list[int]:
    """Processes started (transitively) by `pid`, from /proc: only our own Ray's workers."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        found += children
        frontier = children
    return found


def _train_workers() -> set[int]:
    pids = set()
    for pid in _descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.add(pid)
        except OSError:
            continue
    return pids


def _registered(run_dir: Path, checkpoint: str) -> bool:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return checkpoint in snapshot.read_text()
    except OSError:
        return False


def _kill_a_worker_after(run_dir: Path, checkpoint: str, earlier: set[int], killed: list[int], timeout: float = 600) -> None:
    """SIGKILL one training worker of the run once Ray Train has registered `checkpoint`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _registered(run_dir, checkpoint):
        time.sleep(0.1)
    for pid in sorted(_train_workers() - earlier):
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return


def _losses(result) -> dict[int, float]:
    return {m["step"]: m["loss"] for _, m in result.best_checkpoints}


@pytest.fixture(scope="module")
def lockstep(local_ray, qwen2_dir, tmp_path_factory):
    """Flags of runs that train on the same sequences every step in any worker layout, and the
    uninterrupted single-worker DDP run of them: the reference the other layouts must match.

    Four records that pack one per sequence: an epoch is exactly one global batch of 4, so 1 x 4 and
    2 x 2 workers see the same sequences every step, and noise is seeded per sequence."""
    tmp = tmp_path_factory.mktemp("lockstep")
    records = [r for r in good_records(16) if "messages" in r][:4]
    data = write_jsonl(tmp / "sft.jsonl", records, [raw for raw, _ in BROKEN_ROWS])  # counted, never packed
    common = [*_common(qwen2_dir, data, tmp / "runs"), "--max-steps", "4", "--save-every", "2",
              "--keep-checkpoints", "10", "--seq-len", "48"]
    reference = run(_config(*common, "--num-workers", "1", "--batch-size", "4", "--run-name", "one",
                            "--output", str(tmp / "one-servable")))
    return common, tmp / "runs", reference


def test_bad_rows_are_counted_once_and_the_export_is_servable(lockstep, qwen2_dir):
    """The reference run end to end: four epochs of four sequences, each broken row counted once by
    its reason, and an export that opens in transformers with fdllm's logits."""
    common, runs, result = lockstep
    m = result.metrics
    assert m["step"] == 4 and m["epoch"] >= 1  # more than one pass: bad rows are still counted once
    assert {r: m[f"bad_{r}"] for r in BAD_REASONS} == {r: expected_bad_counts().get(r, 0) for r in BAD_REASONS}
    assert torch.isfinite(torch.tensor(m["loss"])) and m["tokens"] > 0 and m["tokens_per_s"] > 0

    out = runs.parent / "one-servable"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "fdllm_config.json"} <= files
    assert "train_state.pt" not in files
    block = BlockDiffusionConfig.load(out)
    tok = load_tokenizer(out)
    assert (block.block_size, block.sub_block_size) == (8, 4)
    assert block.mask_token_id == tok.convert_tokens_to_ids(MASK_TOKEN)

    import transformers

    ours = fdllm.load_model(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert ours.config.vocab_size > block.mask_token_id
    ids = torch.tensor([tok.encode("the fox 12 hello 7")])
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-4)
    base = fdllm.load_model(qwen2_dir)
    assert not torch.equal(base.lm_head.weight, ours.lm_head.weight[: base.config.vocab_size])  # it trained


def test_data_of_no_training_batch_fails_once_with_why(local_ray, qwen2_dir, tmp_path):
    """Rows that pack no sequence (all broken) fail the run at once with a DataError that says why and
    counts every row: the workers stop, and rank 0 leaves the counts for the driver. A worker error
    would restart the worker group (--max-failures; forever at -1) to fail the same way, and end in
    Ray's traceback. Two workers, and
    rows that do not divide among them (three carriers of counts: docs_per_batch 6), so the padding
    to a multiple of the workers and the drain of what another worker left run in real workers too."""
    from pipelines.data import DataError

    data = write_jsonl(tmp_path / "sft.jsonl", [], [raw for raw, _ in BROKEN_ROWS])
    counts = ", ".join(f"{r}={n}" for r in BAD_REASONS if (n := expected_bad_counts().get(r, 0)))
    with pytest.raises(DataError, match=r"the data gave no training batch: its good rows pack fewer than 2 worker\(s\) "
                                        r"x 2 sequences of 128 tokens; give more data") as error:
        run(_config(*_common(qwen2_dir, data, tmp_path / "runs"), "--max-steps", "2", "--batch-size", "2",
                    "--num-workers", "2", "--docs-per-batch", "6", "--max-failures", "1", "--run-name", "no-data"))
    assert str(error.value).endswith(f"; rows skipped: {len(BROKEN_ROWS)} of {len(BROKEN_ROWS)} ({counts})")


def test_a_diverging_run_stops_with_a_clear_error_and_publishes_nothing_of_it(local_ray, qwen2_dir, tmp_path, caplog):
    """At --lr 1e9 the loss is NaN by step 2: the run went on to its last step, exited 0 with "loss nan", and
    published NaN weights over the last good export. Now its workers stop at the first non-finite loss,
    before saving it, and the driver raises; the export is the last finite checkpoint's."""
    from safetensors.torch import load_file

    from pipelines.finetune import TrainingDiverged

    import logging

    caplog.set_level(logging.INFO, logger="fdllm.finetune")
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(64), [])
    output = tmp_path / "servable"
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ \(loss nan.*nothing from that step on was saved"):
        run(_config(*_common(qwen2_dir, data, tmp_path / "runs"), "--lr", "1e9", "--max-steps", "6", "--save-every", "1",
                    "--batch-size", "1", "--num-workers", "1", "--max-failures", "0", "--run-name", "diverged",
                    "--output", str(output)))
    weights = load_file(output / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "runs" / "diverged" / "diverged.json").exists()  # read, and gone: a resume is not taken for it
    # said as the run starts: the name and the resume command an interrupted run needs
    assert "run diverged: checkpoints in " in caplog.text and "--run-name diverged --resume continues it" in caplog.text


def test_a_run_the_local_ray_instance_cannot_hold_fails_at_once(local_ray, qwen2_dir, tmp_path):
    """This process started the Ray instance (2 CPUs), so no node will join: 4 workers x 0.5 CPU and
    the data's 0.5 would wait forever (Ray Train retries starting the workers without end, Ray Data
    waits for a CPU); the run says so before any worker starts."""
    from pipelines.finetune import _started_ray_here

    assert _started_ray_here()
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(8), [])
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"this run needs 4 worker\(s\) x 0\.5 CPU \+ 0\.5 CPU for the data, and the "
                                         r"local Ray instance it started has 2 CPU: lower --num-workers"):
        run(_config(*_common(qwen2_dir, data, tmp_path / "runs"), "--num-workers", "4", "--max-steps", "2"))
    assert time.monotonic() - start < 60


def _run_killing_a_worker(common: list[str], runs: Path, run_name: str, *flags: str):
    """Run on 2 workers, SIGKILLing one once the step-2 checkpoint is registered (one restart allowed)."""
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_after, args=(runs / run_name, "step_00000002", _train_workers(), killed), daemon=True,
    )
    killer.start()
    result = run(_config(*common, *flags, "--num-workers", "2", "--batch-size", "2", "--run-name", run_name,
                         "--max-failures", "1"))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.metrics["step"] == 4 and result.metrics["restored_step"] == 2  # resumed, not restarted
    counted = {r: result.metrics[f"bad_{r}"] for r in BAD_REASONS}  # summed over workers, kept across the restart
    assert counted == {r: expected_bad_counts().get(r, 0) for r in BAD_REASONS}
    return result


def test_worker_failure_resumes_and_two_workers_match_one(lockstep):
    common, runs, one = lockstep
    two = _run_killing_a_worker(common, runs, "two")

    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [2, 4]
    for step in l1:  # the curve continues exactly where it was: weights, optimizer and step restored
        assert l2[step] == pytest.approx(l1[step], rel=1e-4, abs=1e-5), (step, l1, l2)
    assert l1[4] < l1[2]
    snapshot = json.loads((runs / "two" / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot  # the run can be continued later with --resume, in its own layout only (Ray's real snapshot):
    with pytest.raises(ValueError, match=r"--num-workers 2, now 1; --batch-size 2, now 4\): resume it with those"):
        run(_config(*common, "--num-workers", "1", "--batch-size", "4", "--run-name", "two", "--resume"))


def _zero_fp32_weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint, consolidated offline from every rank's optimizer
    shards by DeepSpeed's own tool: an oracle independent of the export's live gather."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(Path(checkpoint_dir) / "deepspeed"), tag="latest")


@pytest.mark.parametrize("stage,kill", [(2, False), (3, True)], ids=["zero2", "zero3-killed"])
def test_deepspeed_matches_ddp_resumes_and_exports_strictly(lockstep, stage, kill, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # for the oracle's deepspeed import in this process
    common, runs, ddp = lockstep
    name, out = f"zero{stage}", runs.parent / f"zero{stage}-servable"
    flags = ["--strategy", "deepspeed", "--zero-stage", str(stage), "--output", str(out)]
    if kill:  # the resume check rides on this run: killed after step 2, it must still match DDP
        zero = _run_killing_a_worker(common, runs, name, *flags)
    else:
        zero = run(_config(*common, *flags, "--num-workers", "2", "--batch-size", "2", "--run-name", name))

    ld, lz = _losses(ddp), _losses(zero)
    assert sorted(lz) == [2, 4]
    # fp32 on both sides: only the order of the reductions differs (ZeRO's bucketed reduce-scatter and
    # partitioned grad norm vs one worker's sums), ~1e-7 relative per step, amplified by Adam to ~5e-7
    # after 4 steps (measured), while a step of training moves it by ~1e-2: a resume that lost
    # weights, optimizer moments or the step would not stay within rel 1e-4.
    for step in ld:
        assert lz[step] == pytest.approx(ld[step], rel=1e-4, abs=1e-5), (step, ld, lz)
    assert zero.metrics["epoch"] == ddp.metrics["epoch"]  # the data position survived the restart

    # The export opens strictly in transformers and fdllm, with the trained weights' logits.
    import transformers

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    ours = fdllm.load_model(out)
    trained = fdllm.load_model(out)
    trained.load_state_dict(_zero_fp32_weights(zero.checkpoint.path), strict=True)
    ids = torch.tensor([load_tokenizer(out).encode("the fox 12 hello 7")])
    with torch.no_grad():
        expected = trained(ids)
        assert torch.allclose(ours(ids), expected, rtol=0, atol=1e-5)
        assert torch.allclose(hf.eval()(ids).logits, expected, rtol=0, atol=1e-5)
