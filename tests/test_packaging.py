"""Packaging: console scripts resolve, extras split with [dev] holding them all, bounds that the code needs."""

from __future__ import annotations

import re
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()
SCRIPTS = {
    "hsnn-trainer": "trainer.__main__:main",
    "hsnn-indexer": "indexer.__main__:main",
    "hsnn-api": "retrieval_api.__main__:main",
    "hsnn-feed": "feed.__main__:main",
    "hsnn-ops": "hsnn_ops.cli:main",
}


def _table(name: str) -> str:
    """The text of one [table] of pyproject.toml (tomllib is 3.11+, the project supports 3.10)."""
    match = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", PYPROJECT, flags=re.M | re.S)
    assert match, name
    return match.group(1)


def test_console_scripts_are_declared_and_installed() -> None:
    declared = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', _table("project.scripts"), flags=re.M))
    assert declared == SCRIPTS
    installed = {ep.name: ep for ep in distribution("hsnn-serve").entry_points if ep.group == "console_scripts"}
    for name, target in SCRIPTS.items():
        assert installed[name].value == target, f"{name}: reinstall (pip install -e .) to pick up pyproject"
        assert callable(installed[name].load())


@pytest.mark.parametrize(
    ("requirement", "why"),
    [
        ('"setuptools>=77"', "the SPDX license string"),
        ('"starlette>=0.48"', "status.HTTP_422_UNPROCESSABLE_CONTENT"),
        ('"pydantic-settings>=2.15"', "cli_show_env_vars in --help"),
        ('"uvicorn[standard]', "uvloop and httptools"),
        ('"kafka-python[crc32c]', "CRC checks in C"),
    ],
)
def test_lower_bounds_the_code_relies_on(requirement: str, why: str) -> None:
    assert requirement in PYPROJECT, why


def test_dev_extra_is_every_other_extra() -> None:
    extras = set(re.findall(r"^([\w-]+) = \[", _table("project.optional-dependencies"), flags=re.M))
    assert {"serve", "bench", "test", "deploy-test", "dev"} <= extras
    dev = re.search(r'^dev = \["hsnn-serve\[([\w,-]+)\]"\]', PYPROJECT, flags=re.M)
    assert dev and set(dev.group(1).split(",")) == extras - {"dev"}


def test_license_file_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in PYPROJECT and 'license-files = ["LICENSE"]' in PYPROJECT
