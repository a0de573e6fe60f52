"""`hsnn-ops`: snapshot commands on a real store, health against canned and missing APIs, help and JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from hsnn.model import HSNN
from hsnn_ops import cli
from streaming.snapshots import SnapshotStore
from worlds.planted import tiny_hsnn_config

ROOT = Path(__file__).resolve().parents[2]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status = cli.main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    """Three snapshots of a tiny HSNN, the newest (3) promoted."""
    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config(num_nodes=(4, 2)))
    snapshots = SnapshotStore(tmp_path / "store")
    for version in (1, 2, 3):
        snapshots.write(model, eval_metrics={"ne": 0.9 - version / 100}, parent=version - 1 or None)
    snapshots.promote(3)
    return snapshots


def test_snapshots_list_marks_the_promoted_newest_first(store: SnapshotStore, capsys) -> None:
    status, listing = run_json(capsys, "snapshots", "list", "--store-dir", str(store.root))
    assert status == 0 and listing["promoted"] == 3
    assert [(row["version"], row["promoted"]) for row in listing["snapshots"]] == [(3, True), (2, False), (1, False)]
    assert listing["snapshots"][0]["eval_metrics"]["ne"] == pytest.approx(0.87)
    assert cli.main(["snapshots", "list", "--store-dir", str(store.root)]) == 0
    text = capsys.readouterr().out
    assert "promoted: 3" in text and "* v3" in text


def test_snapshots_show_verifies_the_files(store: SnapshotStore, capsys) -> None:
    status, manifest = run_json(capsys, "snapshots", "show", "2", "--verify", "--store-dir", str(store.root))
    assert status == 0 and manifest["version"] == 2 and manifest["verified"] and not manifest["promoted"]
    damaged = next(p for p in store.path(2).iterdir() if p.suffix == ".safetensors")
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    status, answer = run_json(capsys, "snapshots", "show", "2", "--verify", "--store-dir", str(store.root))
    assert status == 1 and "sha256" in answer["error"]


def test_rollback_promotes_the_previous_version_then_refuses_past_the_oldest(store: SnapshotStore, capsys) -> None:
    status, answer = run_json(capsys, "snapshots", "rollback", "--store-dir", str(store.root))
    assert status == 0 and (answer["previous"], answer["promoted"]) == (3, 2)
    assert store.promoted().version == 2
    assert run_json(capsys, "snapshots", "rollback", "--store-dir", str(store.root))[1]["promoted"] == 1
    status, answer = run_json(capsys, "snapshots", "rollback", "--store-dir", str(store.root))
    assert status == 1 and "no snapshot older than the promoted 1" in answer["error"]
    assert store.promoted().version == 1


def test_promote_and_rollback_to_a_named_version(store: SnapshotStore, capsys) -> None:
    assert run_json(capsys, "snapshots", "rollback", "--to", "1", "--store-dir", str(store.root))[1]["promoted"] == 1
    assert run_json(capsys, "snapshots", "promote", "3", "--store-dir", str(store.root))[1]["promoted"] == 3
    status, answer = run_json(capsys, "snapshots", "promote", "9", "--store-dir", str(store.root))
    assert status == 1 and "9" in answer["error"] and store.promoted().version == 3


@pytest.mark.parametrize("variable", ["HSNN_INDEXER_STORE_DIR", "HSNN_TRAINER_STORE_DIR"])
def test_store_dir_falls_back_to_the_service_container_setting(
    variable: str, store: SnapshotStore, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("HSNN_INDEXER_STORE_DIR", raising=False)
    monkeypatch.setenv(variable, str(store.root))
    assert run_json(capsys, "snapshots", "list")[1]["promoted"] == 3


def _status(model: int, promoted: int, age: float) -> dict[str, Any]:
    return {
        "served": {"ready": True, "model_version": model, "index_version": 4, "snapshot_age_s": age},
        "promoted": {"known": True, "version": promoted},
        "requests": {"requests": 10},
    }


@pytest.mark.parametrize(
    ("status_json", "healthy", "problem"),
    [
        (_status(3, 3, 60.0), True, None),
        (_status(2, 3, 60.0), False, "serves model 2, promoted is 3"),
        (_status(3, 3, 7200.0), False, "7200s old"),
        ({"served": {"ready": False}, "promoted": {"known": False}}, False, "not ready"),
    ],
)
def test_health_compares_served_with_promoted(status_json, healthy, problem, capsys, monkeypatch) -> None:
    def fake_get(url: str, timeout: float) -> httpx.Response:
        assert url == "http://api.example:8000/status.json"
        return httpx.Response(200, json=status_json, request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", fake_get)
    status, report = run_json(capsys, "health", "--api-url", "http://api.example:8000/")
    assert report["healthy"] is healthy and status == (0 if healthy else 1)
    assert problem is None or problem in report["problem"]


def test_health_of_an_unreachable_api_is_unhealthy(capsys) -> None:
    status, report = run_json(capsys, "health", "--api-url", "http://127.0.0.1:1")
    assert status == 1 and not report["healthy"] and "unreachable" in report["problem"]


@pytest.mark.parametrize(
    "command",
    [
        ["snapshots", "list"],
        ["snapshots", "show"],
        ["snapshots", "promote"],
        ["snapshots", "rollback"],
        ["index", "show"],
        ["index", "rebuild"],
        ["index", "rollback"],
        ["health"],
    ],
)
def test_every_command_has_help_with_a_json_option(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_console_entry_point_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hsnn_ops", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: hsnn-ops")
    assert all(group in done.stdout for group in ("snapshots", "index", "health"))
