"""fdllm.paths: a project's own package named like fdllm's (serve/, pipelines/) in the working directory,
which Ray's workers import in place of fdllm's, is refused before Ray starts."""

from __future__ import annotations

import pytest

from fdllm.paths import shadowing_package

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _package(directory, name: str, *modules: str):
    (directory / name).mkdir()
    (directory / name / "__init__.py").write_text("")
    for module in modules:
        (directory / name / f"{module}.py").write_text("")


def test_a_package_of_the_same_name_hides_the_module_unless_it_holds_it(tmp_path):
    _package(tmp_path, "serve", "handlers")
    assert shadowing_package("serve.app", tmp_path) == tmp_path / "serve"
    assert shadowing_package("pipelines.train_loop", tmp_path) is None  # no such package there
    (tmp_path / "pipelines").mkdir()  # a plain folder (no __init__.py): an installed package wins over it
    assert shadowing_package("pipelines.train_loop", tmp_path) is None
    assert shadowing_package("serve.app", REPO) is None and shadowing_package("fdllm.engine", REPO) is None  # the checkout


def test_fdllm_serve_and_the_fine_tune_refuse_to_start_where_their_workers_would_import_another_package(
        tmp_path, monkeypatch, capsys, caplog):
    """Run from a project holding serve/ and pipelines/ packages of its own, every replica failed with "No module
    named 'serve.app'" and the fine-tune's workers with "No module named 'pipelines.finetune_config'"."""
    import ray

    from pipelines.finetune import main as finetune
    from serve.app import main as fdllm_serve

    _package(tmp_path, "serve")
    _package(tmp_path, "pipelines", "etl")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(SystemExit) as e:
        fdllm_serve(["--model", str(REPO / "assets/tiny-ar-base")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{tmp_path / 'serve'} is a package named like fdllm's 'serve'" in err, err
    assert finetune(["--model", str(REPO / "assets/tiny-ar-base"), "--data", "x.jsonl", "--max-steps", "1"]) == 2
    assert f"{tmp_path / 'pipelines'} is a package named like fdllm's 'pipelines'" in caplog.text
