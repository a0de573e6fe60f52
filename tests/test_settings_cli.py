"""One configuration system: flags over env over the config file, `--help` without starting, strict files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from indexer.settings import IndexerSettings
from retrieval_api.settings import ApiSettings
from streaming.settings import ServiceSettings
from trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parent.parent
SERVICES: dict[str, type[ServiceSettings]] = {
    "trainer": TrainerSettings,
    "indexer": IndexerSettings,
    "retrieval_api": ApiSettings,
}


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_help_lists_every_setting_with_its_env_name_and_starts_nothing(module: str) -> None:
    settings_cls = SERVICES[module]
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}"), done.stdout[:200]
    text = " ".join(done.stdout.split())  # argparse wraps long names across lines
    prefix = settings_cls.model_config["env_prefix"]
    for name in settings_cls.model_fields:
        assert f"--{name.replace('_', '-')}" in text, name
        assert f"{prefix}{name.upper()}" in text.replace("- ", "-"), name


def test_flag_beats_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hsnn.json"
    config.write_text(json.dumps({"indexer": {"batch_size": 10, "group_id": "from-file", "items_topic": "file"}}))
    monkeypatch.setenv("HSNN_CONFIG_FILE", str(config))
    monkeypatch.setenv("HSNN_INDEXER_BATCH_SIZE", "20")
    monkeypatch.setenv("HSNN_INDEXER_GROUP_ID", "from-env")
    settings = IndexerSettings.from_cli(["--batch-size", "30"], prog="hsnn-indexer")
    assert (settings.batch_size, settings.group_id, settings.items_topic) == (30, "from-env", "file")


def test_unknown_key_in_the_config_file_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hsnn.json"
    config.write_text(json.dumps({"trainer": {"batch_size": 64, "bacth_size": 128}}))
    monkeypatch.setenv("HSNN_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match=r"section 'trainer' has unknown setting\(s\) bacth_size"):
        TrainerSettings()


def test_a_secret_is_refused_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="HSNN_API_ITEMS_TOKEN"):
        ApiSettings.from_cli(["--items-token=hunter2"], prog="hsnn-api")


def test_a_bad_flag_value_is_refused() -> None:
    with pytest.raises((SystemExit, ValidationError)):
        IndexerSettings.from_cli(["--batch-size", "0"], prog="hsnn-indexer")


def test_one_name_per_setting_across_services() -> None:
    """A setting that means the same thing in two services has the same name in both."""
    names = {name for cls in SERVICES.values() for name in cls.model_fields}
    bootstrap = {n for n in names if "bootstrap" in n}
    prefixes = {n for n in names if "prefix" in n}
    assert bootstrap == {"kafka_bootstrap_servers"}, bootstrap
    assert prefixes == {"key_prefix"}, prefixes
    for cls in SERVICES.values():
        assert "log_level" in cls.model_fields
