"""pipelines/quickstart.py's arguments: checked before the fine-tune starts, one line and exit 2."""

from __future__ import annotations

import pytest

from pipelines import quickstart


@pytest.mark.parametrize("thresholds", ["abc", "2", "nan", "0", ","])
def test_bad_thresholds_are_refused_before_the_fine_tune(thresholds, capsys):
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--thresholds", thresholds])
    assert e.value.code == 2 and "thresholds" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_a_limit_below_one_is_refused_before_the_fine_tune(limit, monkeypatch, capsys):
    monkeypatch.setattr(quickstart, "run", lambda cfg: pytest.fail("the fine-tune started"))
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--limit", limit])
    assert e.value.code == 2 and f"--limit must be >= 1, got {limit}" in capsys.readouterr().err


def test_a_bad_fine_tune_option_is_one_line_and_exit_2(tmp_path, monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the options were checked"))
    assert quickstart.main(["--max-steps", "0", "--output", str(tmp_path)]) == 2
    assert "max_steps must be >= 1" in caplog.text


@pytest.mark.parametrize("output", ["a_file", "a_file/run"])
def test_an_output_that_cannot_be_a_directory_is_named_as_the_option_given(output, tmp_path, monkeypatch, caplog):
    """It was reported as the fine-tune's --storage-path (OUTPUT/ray), an option the user never gave."""
    monkeypatch.setattr(quickstart, "run", lambda cfg: pytest.fail("the fine-tune started"))
    (tmp_path / "a_file").write_text("x")
    assert quickstart.main(["--output", str(tmp_path / output)]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith(f"--output: {tmp_path / output} ") and "a file, not a directory" in error, error


def test_resume_continues_the_named_run(tmp_path, monkeypatch, capsys):
    """The fine-tune's log says "--run-name NAME --resume continues it": the quickstart takes both, and
    --resume without a name (a new timestamped run, nothing to continue) is refused."""
    class Started(Exception):
        pass

    def run(cfg):
        runs.append(cfg)
        raise Started

    runs = []
    monkeypatch.setattr(quickstart, "run", run)
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--resume", "--output", str(tmp_path)])
    assert e.value.code == 2 and "--resume needs --run-name" in capsys.readouterr().err
    with pytest.raises(Started):
        quickstart.main(["--run-name", "quickstart-1", "--resume", "--output", str(tmp_path)])
    (cfg,) = runs
    assert cfg.run_name == "quickstart-1" and cfg.resume and cfg.storage_path == str(tmp_path / "ray")


def test_an_installed_wheel_is_told_the_assets_are_the_repositorys(tmp_path, monkeypatch, caplog):
    """A wheel holds no assets/ (the model, the corpus): the quickstart suggested `--rebuild`, which would
    have written them into site-packages. Outside a checkout it says where they are."""
    site = tmp_path / "site-packages"
    monkeypatch.setattr(quickstart, "BASE", site / "assets" / "tiny-ar-base")
    monkeypatch.setattr(quickstart, "WORLD", site / "assets" / "world")
    monkeypatch.setattr(quickstart, "run", lambda cfg: pytest.fail("the fine-tune started"))
    assert quickstart.main([]) == 2
    assert "are in the repository, not in the installed package: clone it" in caplog.text and "--rebuild" not in caplog.text
