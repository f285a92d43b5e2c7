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
from tests.sft_data import BROKEN_ROWS, expected_bad_counts, good_records, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=os.environ.get("FDLLM_TEST_RAY_LOGS") == "1")
    yield
    ray.shutdown()


def _config(*argv: str) -> FinetuneConfig:
    args = vars(build_parser().parse_args(list(argv)))
    return FinetuneConfig.from_sources(args.pop("config"), **args)


def _common(model: Path, data: Path, storage: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--storage-path", str(storage),
            "--cpus-per-worker", "0.5", "--data-cpus", "0.5", "--block-size", "8", "--sub-block-size", "4",
            "--seq-len", "128", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1"]


def test_end_to_end_counts_bad_rows_and_checkpoint_is_servable(local_ray, qwen2_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(24), [raw for raw, _ in BROKEN_ROWS])
    out = tmp_path / "out"
    cfg = _config(*_common(qwen2_dir, data, tmp_path / "runs"), "--output", str(out), "--num-workers", "2",
                  "--batch-size", "2", "--max-steps", "6", "--save-every", "3", "--run-name", "e2e")
    result = run(cfg)

    m = result.metrics
    assert m["step"] == 6 and m["epoch"] >= 1  # more than one pass: bad rows are still counted once
    assert {r: m[f"bad_{r}"] for r in BAD_REASONS} == {r: expected_bad_counts().get(r, 0) for r in BAD_REASONS}
    assert torch.isfinite(torch.tensor(m["loss"])) and m["tokens"] > 0 and m["tokens_per_s"] > 0

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


def test_worker_failure_resumes_and_two_workers_match_one(local_ray, qwen2_dir, tmp_path):
    # Four records that pack one per sequence: an epoch is exactly one global batch of 4, so both
    # layouts see the same sequences every step, and noise is seeded per sequence.
    records = [r for r in good_records(16) if "messages" in r][:4]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    common = [*_common(qwen2_dir, data, tmp_path / "runs"), "--max-steps", "4", "--save-every", "2",
              "--keep-checkpoints", "10", "--seq-len", "48"]

    one = run(_config(*common, "--num-workers", "1", "--batch-size", "4", "--run-name", "one"))

    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_after, args=(tmp_path / "runs" / "two", "step_00000002", _train_workers(), killed),
        daemon=True,
    )
    killer.start()
    two = run(_config(*common, "--num-workers", "2", "--batch-size", "2", "--run-name", "two", "--max-failures", "1"))
    killer.join()

    assert killed, "no training worker was found to kill"
    assert two.metrics["step"] == 4 and two.metrics["restored_step"] == 2  # resumed, not restarted
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [2, 4]
    for step in l1:  # the curve continues exactly where it was: weights, optimizer and step restored
        assert l2[step] == pytest.approx(l1[step], rel=1e-4, abs=1e-5), (step, l1, l2)
    assert l1[4] < l1[2]
    snapshot = json.loads((tmp_path / "runs" / "two" / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot  # the run can be continued later with --resume
