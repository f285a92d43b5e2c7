"""What a user of the package reads about it: its version and its license, one truth each."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import fdllm

REPO = Path(__file__).resolve().parents[2]


def test_the_version_is_the_installed_distributions_and_pyprojects():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert fdllm.__version__ == importlib.metadata.version("fdllm") == declared


def test_the_license_file_is_the_apache_license_pyproject_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
    # setuptools (PEP 639) puts LICENSE* of the project's root in the wheel unless license-files says otherwise
    assert "license-files" not in project or "LICENSE" in project["license-files"]
