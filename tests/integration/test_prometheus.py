"""A real Prometheus scrapes a real retrieval API, and its query API returns what the snapshot manifest says.

The API runs under uvicorn in a thread on a free loopback port, following a snapshot store whose promoted
snapshot is a small HSNN. Debian's `prometheus` binary (scripts/install_ops_tools.sh installs it) starts on
another free port with a generated config that scrapes the API's /metrics every second. The test waits for
the target to be up, then asks `/api/v1/query` for `hsnn_api_served_snapshot_timestamp_seconds` and
`hsnn_api_model_version`, and compares them with the promoted manifest. Without prometheus the test skips,
unless HSNN_REQUIRE_SERVERS=1 (then it fails).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from prometheus_support import query, running_prometheus, targets_up, wait_for

from devservers._proc import free_port
from hsnn.model import HSNN
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, CatalogIndexSource
from streaming.snapshots import SnapshotStore
from worlds.planted import make_world, tiny_hsnn_config

pytestmark = pytest.mark.integration

PROMOTED = 2


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, SnapshotStore]]:
    """The API on a free port, serving promoted snapshot 2 (snapshot 1 exists too, not promoted)."""
    world = make_world(num_items=200, seed=9)
    torch.manual_seed(1)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4)))
    store = SnapshotStore(tmp_path_factory.mktemp("prom-store"))
    store.write(model)
    store.write(model, parent=1)
    store.promote(PROMOTED)
    settings = ApiSettings(store_dir=str(store.root), reload_interval_s=0.2)
    app = create_app(
        settings, store=store, index_source=CatalogIndexSource(Catalog(item_ids=world.item_ids, items=world.items))
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="prom-api", daemon=True)
    thread.start()
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200, 60, "the API")
        yield port, store
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def prometheus(api, tmp_path: Path) -> Iterator[str]:
    """Prometheus scraping the API every second; yields its base URL."""
    api_port, _ = api
    with running_prometheus({"hsnn-api": f"127.0.0.1:{api_port}"}, tmp_path / "prometheus") as base:
        yield base


def test_prometheus_scrapes_the_served_snapshot_time(api, prometheus: str) -> None:
    _, store = api
    manifest = store.manifest(PROMOTED)

    wait_for(lambda: targets_up(prometheus).get("hsnn-api"), 60, "the API target to be up")
    result = wait_for(lambda: query(prometheus, "hsnn_api_served_snapshot_timestamp_seconds"), 30, "a sample")
    assert len(result) == 1 and result[0]["metric"]["job"] == "hsnn-api"
    assert float(result[0]["value"][1]) == pytest.approx(manifest.created_at, rel=0, abs=1e-6)
    version = query(prometheus, "hsnn_api_model_version")
    assert float(version[0]["value"][1]) == PROMOTED
    up = query(prometheus, 'up{job="hsnn-api"}')
    assert float(up[0]["value"][1]) == 1
