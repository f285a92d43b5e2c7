"""pipelines/distill.py without Ray: config and CLI, and the trajectory stage's per-record logic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import fdllm
from pipelines.distill import check_checkpoint, main
from pipelines.finetune_config import DistillConfig, FinetuneConfig
from pipelines.trajectories import CORRECT, DROPPED, REPLACED, TrajectoryGenerator, final_answer, is_correct

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def test_shipped_config_and_help(capsys):
    cfg = DistillConfig.from_sources(str(CONFIGS / "tiny-distill.yaml"))
    assert (cfg.objective, cfg.certainty_weight, cfg.certainty_temperature) == ("certainty", 2.0, 0.5)
    # the block layout is the checkpoint's, the one tiny.yaml (the fine-tune it distils) trains with
    fine_tune = FinetuneConfig.from_sources(str(CONFIGS / "tiny.yaml"))
    assert (cfg.block_size, cfg.sub_block_size) == (None, None) and cfg.model == fine_tune.output
    assert cfg.seq_len % fine_tune.block_size == 0 and cfg.total_steps() > 0
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--wrong-trajectories" in capsys.readouterr().out


@pytest.mark.parametrize("change,match", [
    ({"wrong_trajectories": "keep"}, "wrong_trajectories must be one of"),
    ({"engine_actors": 0}, "engine_actors must be >= 1"),
    ({"engine_gpus": -1}, "engine_gpus"),
    ({"trajectory_threshold": 1.5}, "trajectory_threshold"),
    ({"certainty_temperature": 0}, "certainty_temperature"),
])
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(model="m", data=["d"], max_steps=1, **change)


def test_answers_compare_without_reasoning():
    assert final_answer("<think>1+2</think> 3 ") == "3"
    assert final_answer("<think>unfinished") is None
    assert is_correct("<think>x</think>42", "42") and is_correct(" 42\n", "<think>y</think>42")
    assert not is_correct("<think>42", "42") and not is_correct("41", "42")


def test_checkpoint_must_be_a_dllm_of_the_same_block_layout(dllm_dir, qwen2_dir):
    check_checkpoint(DistillConfig(model=str(dllm_dir), data=["d"], max_steps=1, block_size=8, sub_block_size=4,
                                   seq_len=64))
    # left out, the layout is the checkpoint's (8/4): the defaults had been the fine-tune's 32/8, refused
    cfg = check_checkpoint(DistillConfig(model=str(dllm_dir), data=["d"], max_steps=1, seq_len=64))
    assert (cfg.block_size, cfg.sub_block_size) == (8, 4)
    with pytest.raises(ValueError, match=r"\(8/2\) must be the checkpoint's \(8/4\)"):
        check_checkpoint(DistillConfig(model=str(dllm_dir), data=["d"], max_steps=1, sub_block_size=2, seq_len=64))
    with pytest.raises(ValueError, match="must be the checkpoint's"):
        check_checkpoint(DistillConfig(model=str(dllm_dir), data=["d"], max_steps=1, block_size=16, sub_block_size=4,
                                       seq_len=64))
    with pytest.raises(ValueError, match="no block-diffusion checkpoint"):
        check_checkpoint(DistillConfig(model=str(qwen2_dir), data=["d"], max_steps=1, block_size=8, seq_len=64))


def test_a_checkpoint_with_weights_cut_short_is_refused_before_decoding(dllm_dir, tmp_path):
    import shutil

    model = shutil.copytree(dllm_dir, tmp_path / "dllm")
    (model / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        check_checkpoint(DistillConfig(model=str(model), data=["d"], max_steps=1, block_size=8, sub_block_size=4,
                                       seq_len=64))


def own_answers(path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """What the checkpoint decodes for each prompt (a user turn), as the trajectory stage decodes it."""
    engine = fdllm.Engine.from_pretrained(path)
    from pipelines.trajectories import prompt_token_ids

    ids = [prompt_token_ids(engine, [{"role": "user", "content": p}, {"role": "assistant", "content": ""}])
           for p in prompts]
    return [r.text for r in engine.generate(ids, fdllm.SamplingParams(max_new_tokens=max_new_tokens))]


@pytest.mark.parametrize("wrong", ["drop", "reference"])
def test_trajectory_statuses_and_records(dllm_dir, wrong):
    prompts = ["hello world", "one two", "a b c", "hi there"]  # the random model answers each with some text
    answers = own_answers(dllm_dir, prompts, 12)
    assert all(a.strip() for a in answers)
    rows = [json.dumps({"input": [{"role": "user", "content": prompts[0]}], "output": answers[0]}).encode(),
            json.dumps({"input": prompts[1], "output": "<think>hm</think>" + answers[1]}),  # reasoning aside: right
            {"messages": [{"role": "user", "content": prompts[2]}, {"role": "assistant", "content": "zzz 1"}]},  # wrong
            b"{not json",
            {"input": prompts[3], "output": ""}]
    out = TrajectoryGenerator(str(dllm_dir), 12, None, wrong).process(rows)
    statuses = list(out["status"])
    assert statuses == [CORRECT, CORRECT, REPLACED if wrong == "reference" else DROPPED, "bad_invalid_json",
                        "bad_empty_field"]
    records = [json.loads(r) if r else None for r in out["record"]]
    assert records[0] == {"messages": [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": answers[0]}]}
    assert records[1]["messages"][-1]["content"] == answers[1]  # the trajectory, not the reference with reasoning
    assert records[2] == ({"messages": rows[2]["messages"]} if wrong == "reference" else None)
    assert records[3] is None and records[4] is None


def test_rows_the_engine_would_refuse_are_bad_rows_not_a_failed_batch(dllm_dir, monkeypatch):
    """A prompt too long for the context with max_new_tokens, one holding the mask token or one whose
    chat template raises is counted as a bad row; the rest of its batch is decoded (one such row used
    to fail `generate` for the whole batch, and so the whole distillation)."""
    from fdllm.tokenizer import MASK_TOKEN
    from pipelines import trajectories

    gen = TrajectoryGenerator(str(dllm_dir), 12, None, "drop")
    template = gen.engine.tokenizer.chat_template
    gen.engine.tokenizer.chat_template = ("{% if 'boom' in messages[0]['content'] %}{{ raise_exception('no boom') }}"
                                          "{% endif %}" + template)
    rows = [{"input": "hello world", "output": "x"},
            {"input": "hello " * gen.engine.max_model_len, "output": "x"},
            {"input": f"what is {MASK_TOKEN}?", "output": "x"},
            {"input": "boom", "output": "x"}]
    assert list(gen.process(rows)["status"]) == [DROPPED, "bad_too_long", "bad_mask_token", "bad_template_error"]
    hello = gen.engine.tokenizer("hello").input_ids[0]
    for extra, status in ((0, DROPPED), (1, "bad_too_long")):  # a prompt that exactly fits is decoded
        n = gen.engine.max_model_len - 12 + extra
        monkeypatch.setattr(trajectories, "prompt_token_ids", lambda engine, messages, n=n: [hello] * n)
        assert list(gen.process(rows[:1])["status"]) == [status]


def test_written_trajectories_are_reused_without_decoding(tmp_path, monkeypatch):
    from pipelines import distill

    cfg = DistillConfig(model="m", data=["d"], max_steps=1)
    summary = {"counts": {"correct": 3, "wrong_dropped": 1}, **distill.made_with(cfg)}
    (tmp_path / distill.SUMMARY_FILE).write_text(json.dumps(summary))
    monkeypatch.setattr(distill, "read_raw_records", lambda *a, **k: pytest.fail("decoded again"))
    assert distill.generate_trajectories(cfg, str(tmp_path)) == {"correct": 3, "wrong_dropped": 1}


def test_trajectories_of_a_model_exported_again_to_its_path_are_not_reused(tmp_path):
    """A model fine-tuned again into the same --output path is another model: its trajectories' summary
    names the export they were made from, and a new export there refuses them."""
    from fdllm.storage import publish_dir
    from pipelines import distill

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    model = str(tmp_path / "model")
    publish_dir(src, model)
    cfg = DistillConfig(model=model, data=["d"], max_steps=1)
    summary = distill.made_with(cfg)
    assert summary["model_export_id"]
    distill.check_reusable(summary, cfg, "traj")  # the same export: reused
    publish_dir(src, model)  # fine-tuned again into the same path
    with pytest.raises(ValueError, match="other options \\(the --model export's id '"):
        distill.check_reusable(summary, cfg, "traj")


def test_trajectories_at_a_uri_with_a_query(s3_env, tmp_path, monkeypatch):
    """`--trajectories s3://...?endpoint_override=...` (the endpoint in the URI alone): the records and
    summary.json land under the URI's key, a rerun reuses them, and the path the training reads
    (TRAJECTORIES/trajectories.jsonl, `run`) names them."""
    import boto3

    from fdllm.storage import join
    from pipelines import distill
    from pipelines.data import check_data_files
    from tests.s3_server import make_bucket
    from tests.sft_data import good_records, write_jsonl

    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    bucket = make_bucket("distill")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    directory = f"{bucket}/runs/r/trajectories?endpoint_override={s3_env['AWS_ENDPOINT_URL'].removeprefix('http://')}&scheme=http"
    cfg = DistillConfig(model="m", data=[str(write_jsonl(tmp_path / "sft.jsonl", good_records(2)))], max_steps=1,
                        block_size=32)  # check_checkpoint's, from the checkpoint, in a run

    class Decoded:  # the engine actors' output, without Ray
        def map_batches(self, *args, **kwargs):
            return self

        def repartition(self, *args, **kwargs):
            return self

        def iter_batches(self, **kwargs):
            yield {"record": ['{"input": "q", "output": "a"}', ""], "status": [CORRECT, DROPPED]}

    monkeypatch.setattr(distill, "read_raw_records", lambda *a, **k: Decoded())
    assert distill.generate_trajectories(cfg, directory) == {CORRECT: 1, DROPPED: 1}
    listed = s3.list_objects_v2(Bucket="distill", Prefix="runs/r/trajectories/")["Contents"]
    assert {o["Key"] for o in listed if not o["Key"].endswith("/")} == {  # pyarrow's directory marker aside
        "runs/r/trajectories/trajectories.jsonl", "runs/r/trajectories/summary.json"}
    monkeypatch.setattr(distill, "read_raw_records", lambda *a, **k: pytest.fail("decoded again"))
    assert distill.generate_trajectories(cfg, directory) == {CORRECT: 1, DROPPED: 1}
    assert check_data_files([join(directory, distill.TRAJECTORIES_FILE)]).jsonl == [join(directory, distill.TRAJECTORIES_FILE)]


@pytest.mark.parametrize("change,named", [
    ({"model": "other"}, "--model 'm', now"), ({"data": ["d", "e"]}, "--data ['d'], now"),
    ({"wrong_trajectories": "reference"}, "--wrong-trajectories 'drop', now 'reference'"),
    ({"trajectory_threshold": 0.5}, "--trajectory-threshold None, now 0.5"),
    ({"trajectory_max_new_tokens": 8}, "--trajectory-max-new-tokens 256, now 8"),
])
def test_trajectories_made_otherwise_are_refused_naming_what_differs(tmp_path, monkeypatch, change, named):
    """Another run's trajectories (another model, data or decoding) are not silently trained on."""
    from pipelines import distill

    made = DistillConfig(model="m", data=["d"], max_steps=1)
    summary = {"counts": {"correct": 3}, "model": made.model, "model_export_id": None, "data": made.data,
               "wrong_trajectories": "drop",
               "trajectory_threshold": None, "trajectory_max_new_tokens": 256}  # what `made` writes
    (tmp_path / distill.SUMMARY_FILE).write_text(json.dumps(summary))
    distill.generate_trajectories(made, str(tmp_path))  # the same options: reused
    monkeypatch.setattr(distill, "read_raw_records", lambda *a, **k: pytest.fail("decoded again"))
    now = DistillConfig(**{"model": "m", "data": ["d"], "max_steps": 1, **change})
    with pytest.raises(ValueError, match="new --trajectories") as e:
        distill.generate_trajectories(now, str(tmp_path))
    assert named.replace("'d'", repr(made.data[0])).replace("'m'", repr(made.model)) in str(e.value)
    assert str(e.value).count(", now ") == 1  # only what differs is named
    assert "in a new run" not in str(e.value)
    with pytest.raises(ValueError, match="new --trajectories path to decode them again \\(in a new run"):
        distill.generate_trajectories(dataclasses.replace(now, resume=True, run_name="r"), str(tmp_path))
    (tmp_path / distill.SUMMARY_FILE).write_text(json.dumps({"counts": {"correct": 3}, "model": made.model}))
    with pytest.raises(ValueError, match="not recorded"):  # an older summary: what made it is unknown
        distill.generate_trajectories(made, str(tmp_path))


def test_engine_actors_a_local_ray_instance_cannot_hold_are_refused_before_decoding(dllm_dir, tmp_path, monkeypatch,
                                                                                   caplog):
    """The trajectory stage's actors and data task beside them on a local instance too small for them waited
    forever, with no line said (the fine-tune's own check ran only after the trajectories)."""
    import ray

    from pipelines import distill, finetune
    from tests.sft_data import good_records, write_jsonl

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(finetune, "_started_ray_here", lambda: True)
    monkeypatch.setattr(distill, "generate_trajectories", lambda *a: pytest.fail("decoding started"))
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(2))
    assert main(["--model", str(dllm_dir), "--data", str(data), "--max-steps", "1", "--block-size", "8",
                 "--sub-block-size", "4", "--seq-len", "64", "--storage-path", str(tmp_path / "runs"), "--run-name", "r",
                 "--engine-cpus", "1.5", "--data-cpus", "1", "--engine-gpus", "0.5"]) == 2
    assert ("this run needs 1 engine actor(s) x 1.5 CPU and 0.5 GPU + 1 CPU for the data to decode the trajectories, "
            "and the local Ray instance it started has 2 CPU and 0 GPU: lower --engine-actors, --engine-cpus or "
            "--data-cpus, or submit it to a cluster") in caplog.text


def test_an_existing_run_without_resume_is_refused_before_decoding(dllm_dir, tmp_path, monkeypatch):
    """`--resume` is checked before the trajectories are decoded, not after (exit 2, Ray not started)."""
    import ray

    from tests.sft_data import good_records, write_jsonl

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the run was checked"))
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(2))
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert main(["--model", str(dllm_dir), "--data", str(data), "--max-steps", "1", "--block-size", "8",
                 "--sub-block-size", "4", "--seq-len", "64", "--storage-path", str(tmp_path / "runs"),
                 "--run-name", "r"]) == 2


def test_certainty_objective_in_the_train_loop_is_the_distill_loss(qwen2_dir):
    """The train loop's `certainty` objective is `fdllm.objective.certainty_forcing_loss` of the batch
    noised as every objective noises it; lambda 0 is the plain block-diffusion loss."""
    import numpy as np
    import torch

    from fdllm.objective import certainty_forcing_loss, two_stream_batch
    from fdllm.tokenizer import add_mask_token, load_tokenizer
    from pipelines.data import DataConfig, process_records
    from pipelines.train_loop import _row_seed, diffusion_loss_sum
    from tests.sft_data import good_records

    tok = load_tokenizer(qwen2_dir)
    model = fdllm.load_model(qwen2_dir)
    mask_id = add_mask_token(tok, model)
    batch = {k: v[:1] for k, v in process_records(good_records(8), tok, DataConfig(block_size=8, seq_len=64)).items()}
    cpu = torch.device("cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(15):  # a few steps: the frequent tokens (block tails of end-of-turn) get predicted right
        loss, n = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, 0, step, cpu)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    with torch.no_grad():
        got_sum, count = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, 0, 3, cpu, certainty=(2.0, 0.5))
        plain_sum, _ = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, 0, 3, cpu)
        zero_sum, _ = diffusion_loss_sum(model, batch, mask_id, 8, 1e-3, 0, 3, cpu, certainty=(0.0, 0.5))
        ids, labels, pos, docs = (torch.from_numpy(batch[c]).long() for c in ("input_ids", "labels", "position_ids", "doc_ids"))
        gen = torch.Generator().manual_seed(_row_seed(0, 3, np.asarray(batch["input_ids"][0])))
        noised = two_stream_batch(ids, labels, mask_id, 8, 1e-3, pos, docs, gen)
        want, want_count = certainty_forcing_loss(model, noised, 8, 2.0, 0.5)
    assert int(count) == int(want_count)
    assert (got_sum / count).item() == pytest.approx(want.item(), rel=1e-5)
    assert zero_sum.item() == pytest.approx(plain_sum.item(), rel=1e-6)
    assert got_sum.item() != pytest.approx(plain_sum.item(), rel=1e-6)  # some masked position is predicted right


def test_each_objective_reaches_its_loss():
    from pipelines.train_loop import objective_kwargs

    cfg = DistillConfig(model="m", data=["d"], max_steps=1, certainty_weight=1.5, certainty_temperature=0.25)
    assert objective_kwargs(cfg) == {"joint_weights": None, "certainty": (1.5, 0.25)}
    joint = DistillConfig(model="m", data=["d"], max_steps=1, objective="joint", ar_loss_weight=0.3)
    assert objective_kwargs(joint) == {"joint_weights": (0.3, 0.5), "certainty": None}
    assert objective_kwargs(DistillConfig(model="m", data=["d"], max_steps=1, objective="diffusion")) == {
        "joint_weights": None, "certainty": None}
    both = DistillConfig(model="m", data=["d"], max_steps=1, objective="joint-certainty", certainty_weight=1.5)
    assert objective_kwargs(both) == {"joint_weights": (0.5, 0.5), "certainty": (1.5, 0.5)}
    assert both.causal_prefix and joint.causal_prefix and not cfg.causal_prefix


def test_a_joint_checkpoint_is_distilled_keeping_its_causal_mode(dllm_dir, tmp_path):
    """A causal-prefix checkpoint asked for the certainty objective trains joint-certainty (its AR loss
    and causal clean stream stay); other objectives are left as asked."""
    import shutil

    shutil.copytree(dllm_dir, tmp_path / "joint")
    fdllm.BlockDiffusionConfig.from_checkpoint(tmp_path / "joint", prefix_attention="causal").save(tmp_path / "joint")
    kw = {"model": str(tmp_path / "joint"), "data": ["d"], "max_steps": 1, "block_size": 8, "sub_block_size": 4,
          "seq_len": 64}
    assert check_checkpoint(DistillConfig(**kw)).objective == "joint-certainty"
    assert check_checkpoint(DistillConfig(**kw, objective="diffusion")).objective == "diffusion"
    assert check_checkpoint(DistillConfig(**(kw | {"model": str(dllm_dir)}))).objective == "certainty"


def test_bad_data_or_output_fail_before_ray_starts(dllm_dir, tmp_path, monkeypatch, caplog):
    """What the training stage would refuse (a missing data file, an --output of other files or a file,
    or one that would hold the trajectories) is refused before Ray starts and the trajectories are
    decoded (exit 2), logged as distill's (it said fdllm.finetune)."""
    import ray

    from tests.sft_data import good_records, write_jsonl

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the checks"))
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(2))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    common = ["--model", str(dllm_dir), "--max-steps", "1", "--block-size", "8", "--sub-block-size", "4",
              "--seq-len", "64", "--storage-path", str(tmp_path / "runs")]
    for flags in (["--data", str(tmp_path / "missing.jsonl")],
                  ["--data", str(data), "--output", str(tmp_path / "mine")],
                  ["--data", str(data), "--output", str(tmp_path / "mine" / "notes.txt")],
                  # the trajectories, written first, would be "other files" to the export at the end
                  ["--data", str(data), "--output", str(tmp_path / "out"), "--trajectories", str(tmp_path / "out" / "t")]):
        caplog.clear()
        assert main([*common, *flags]) == 2, flags
        assert [(r.name, r.levelname) for r in caplog.records if r.levelname == "ERROR"] == [("fdllm.distill", "ERROR")]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_trajectory_cut_off_mid_thought_is_never_correct():
    from pipelines.trajectories import is_correct

    assert not is_correct("<think>still thinking", "<think>a reference with an open tag")
    assert is_correct("<think>x</think> 42 ", "42")


def test_the_engine_actors_get_the_records_a_batch_at_a_time(tmp_path, monkeypatch):
    """A read split (thousands of records) was one block: one engine actor decoded all of it, whatever
    --engine-actors, and the stage said nothing until it was done (the world's 20,000 prompts: 4.5 min, one
    line). The records reach the actors in blocks of --trajectory-batch-size."""
    from pipelines import distill
    from tests.sft_data import good_records, write_jsonl

    calls = []

    class Dataset:  # Ray Data's chain, recorded
        def map_batches(self, fn, **kwargs):
            calls.append(("map_batches", getattr(fn, "__name__", fn)))
            return self

        def repartition(self, *args, **kwargs):
            calls.append(("repartition", kwargs.get("target_num_rows_per_block")))
            return self

        def iter_batches(self, **kwargs):
            yield {"record": ['{"input": "q", "output": "a"}'], "status": [CORRECT]}

    monkeypatch.setattr(distill, "read_raw_records", lambda *a, **k: Dataset())
    cfg = DistillConfig(model="m", data=[str(write_jsonl(tmp_path / "sft.jsonl", good_records(2)))], max_steps=1,
                        trajectory_batch_size=16, block_size=32)
    assert distill.generate_trajectories(cfg, str(tmp_path / "t")) == {CORRECT: 1}
    assert calls.index(("repartition", 16)) < calls.index(("map_batches", "TrajectoryGenerator"))


@pytest.mark.parametrize("content", ["", "{cut", "[]", '{"model": "m"}', '{"counts": null}', '{"counts": {"correct": "3"}}'])
def test_a_summary_that_is_no_summary_is_one_clear_error(tmp_path, content):
    """A summary.json cut short or edited: a bare JSON error naming no file, or an AttributeError/KeyError
    traceback (its counts read later), before."""
    from pipelines import distill

    (tmp_path / distill.SUMMARY_FILE).write_text(content)
    cfg = DistillConfig(model="m", data=["d"], max_steps=1)
    with pytest.raises(ValueError, match="summary.json is no summary of trajectories: .*remove it"):
        distill.generate_trajectories(cfg, str(tmp_path))


@pytest.mark.parametrize("counts,said", [
    ({"bad_invalid_json": 3}, "no record of --data could be decoded (bad rows skipped: {'bad_invalid_json': 3}"),
    ({"wrong_dropped": 2, "bad_too_long": 1}, "every one was wrong (try --wrong-trajectories reference)"),
])
def test_no_trajectory_to_train_on_says_why(dllm_dir, tmp_path, monkeypatch, caplog, counts, said):
    """Data of bad rows only was refused as "every one was wrong (try --wrong-trajectories reference)",
    which would not help."""
    import ray

    from pipelines import distill
    from tests.sft_data import good_records, write_jsonl

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(distill, "check_fits", lambda *a: None)
    monkeypatch.setattr(distill, "generate_trajectories", lambda *a: counts)
    data = write_jsonl(tmp_path / "sft.jsonl", good_records(2))
    assert main(["--model", str(dllm_dir), "--data", str(data), "--max-steps", "1", "--block-size", "8",
                 "--sub-block-size", "4", "--seq-len", "64", "--storage-path", str(tmp_path / "runs"),
                 "--run-name", "r"]) == 2
    assert said in caplog.text


def test_only_the_trajectory_of_a_multi_turn_chat_is_trained():
    """An earlier assistant turn of a `messages` record (the data's text, not the model's trajectory) carried
    loss, and the certainty term, in the distilled record."""
    from fdllm.tokenizer import load_tokenizer
    from pipelines.data import DataConfig, process_records, record_to_messages
    from pipelines.trajectories import distilled_record

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "EARLIER"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "reference"}]
    record = distilled_record(record_to_messages({"messages": chat}), "mine")
    tok = load_tokenizer(CONFIGS.parents[1] / "assets" / "tiny-ar-base")  # its template renders earlier answers
    packed = process_records([record], tok, DataConfig(block_size=8, seq_len=128))
    trained = tok.decode([t for t, label in zip(packed["input_ids"][0], packed["labels"][0]) if label != -100])
    assert "mine" in trained and "EARLIER" not in trained
