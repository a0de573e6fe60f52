"""`hsnn-ops index show|rollback|rebuild` against a real Redis."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from devservers import RedisServer
from hsnn_ops import cli
from streaming import index_store
from streaming.snapshots import SnapshotStore

pytestmark = pytest.mark.integration


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status = cli.main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


@pytest.fixture
def two_versions(redis_server: RedisServer) -> tuple[redis_lib.Redis, str]:
    """Index versions 1 then 2 flipped in under a fresh prefix (meta only: the pointers are what is tested)."""
    client = redis_lib.Redis.from_url(redis_server.url)
    prefix = f"ops{secrets.token_hex(3)}:"
    keys = index_store.IndexKeys(prefix)
    for version, model_version in ((1, 7), (2, 8)):
        client.set(keys.meta(version), json.dumps({"model_version": model_version, "num_items": 100 * version}))
        assert index_store.flip_pointer(client, version - 1 or None, version, prefix)
    return client, prefix


def test_index_show_then_rollback_swaps_current_and_previous(two_versions, redis_server, capsys) -> None:
    client, prefix = two_versions
    where = ["--redis-url", redis_server.url, "--key-prefix", prefix]
    status, shown = run_json(capsys, "index", "show", *where)
    assert status == 0
    assert shown["current"] == {"version": 2, "exists": True, "model_version": 8, "num_items": 200}
    assert shown["previous"]["version"] == 1
    status, answer = run_json(capsys, "index", "rollback", *where)
    assert status == 0 and (answer["current"], answer["previous"]) == (1, 2)
    assert index_store.current_version(client, prefix) == 1


def test_index_rollback_refuses_when_the_previous_version_is_gone(two_versions, redis_server, capsys) -> None:
    client, prefix = two_versions
    client.delete(index_store.IndexKeys(prefix).meta(1))
    status, answer = run_json(capsys, "index", "rollback", "--redis-url", redis_server.url, "--key-prefix", prefix)
    assert status == 1 and "no previous index version" in answer["error"]
    assert index_store.current_version(client, prefix) == 2


def test_index_rebuild_refuses_without_a_promoted_snapshot(redis_server, tmp_path: Path, capsys) -> None:
    SnapshotStore(tmp_path / "store")
    argv = ["--redis-url", redis_server.url, "--key-prefix", "opsnone:", "--store-dir", str(tmp_path / "store")]
    status, answer = run_json(capsys, "index", "rebuild", *argv)
    assert status == 1 and "nothing is promoted" in answer["error"]
