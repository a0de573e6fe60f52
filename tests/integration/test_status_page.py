"""The API's status page in a real browser: Debian's headless Chromium renders /status from a live server.

The API runs under uvicorn in a thread, on a free loopback port, following a snapshot store whose promoted
snapshot is a small HSNN (index built in process from planted ads). Chromium takes a screenshot (checked
for size and for not being blank) and dumps the DOM after its scripts ran (checked for the versions).
Without chromium the test skips, unless HSNN_REQUIRE_SERVERS=1 (then it fails):
`bash scripts/install_browser.sh` installs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from hsnn.model import HSNN
from hsnn.training import train
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, CatalogIndexSource
from streaming.snapshots import SnapshotStore
from worlds.planted import make_batches, make_users, make_world, tiny_hsnn_config

pytestmark = pytest.mark.integration

REQUIRE = os.environ.get("HSNN_REQUIRE_SERVERS", "") == "1"
WIDTH, HEIGHT = 1200, 800
SNAPSHOT_VERSION = 2  # two snapshots written, the second promoted: the page must show 2, not 1


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (bash scripts/install_browser.sh)"
    if REQUIRE:
        pytest.fail(f"HSNN_REQUIRE_SERVERS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def user_body(world) -> dict:
    users, _ = make_users(world, 1, seed=5)
    live = users.history["item_id"][0] > 0
    history = [
        {"attributes": {n: int(v[0, h]) for n, v in users.history.items()}, "age_hours": float(users.history_age[0, h])}
        for h in torch.nonzero(live).flatten().tolist()
    ]
    sparse = {name: [i for i in ids[0].tolist() if i > 0] for name, ids in users.sparse.items()}
    return {"user": {"dense": users.dense[0].tolist(), "sparse": sparse, "history": history}, "k": 10}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SnapshotStore]]:
    """A live API on a free port, serving promoted snapshot 2 of a fresh store."""
    world = make_world(num_items=300, seed=7)
    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4)))
    train(model, make_batches(world, 2, 64, seed=1, users_per_batch=16))
    store = SnapshotStore(tmp_path_factory.mktemp("status-store"))
    store.write(model)
    store.write(model, parent=1)
    store.promote(SNAPSHOT_VERSION)
    settings = ApiSettings(store_dir=str(store.root), reload_interval_s=0.2)
    source = CatalogIndexSource(Catalog(item_ids=world.item_ids, items=world.items))
    app = create_app(settings, store=store, index_source=source)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="status-api", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not become ready"
            time.sleep(0.2)
        body = user_body(world)
        for _ in range(5):
            assert httpx.post(f"{base}/retrieve", json=body, timeout=30).status_code == 200
        yield base, store
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def run_chromium(*args: str, tmp: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def test_status_json_reports_the_served_pair(served) -> None:
    base, store = served
    data = httpx.get(f"{base}/status.json", timeout=10).json()
    manifest = store.manifest(SNAPSHOT_VERSION)
    assert data["served"]["ready"] is True
    assert data["served"]["model_version"] == SNAPSHOT_VERSION
    assert data["served"]["index_version"] == SNAPSHOT_VERSION
    assert data["served"]["snapshot_created_at"] == pytest.approx(manifest.created_at)
    assert 0 <= data["served"]["snapshot_age_s"] < 600
    assert data["promoted"] == {
        "known": True,
        "version": SNAPSHOT_VERSION,
        "promoted_at": pytest.approx(time.time(), abs=600),
    }
    assert data["requests"]["requests"] >= 5 and data["requests"]["by_outcome"]["ok"] >= 5
    assert data["requests"]["latency_p50_s"] > 0


def test_status_page_renders_in_headless_chromium(served, tmp_path: Path) -> None:
    from PIL import Image

    base, _ = served
    page = httpx.get(f"{base}/status", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text.replace(base, "") and "https://" not in page.text, "external asset"

    shot = tmp_path / "status.png"
    result = run_chromium(f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", f"{base}/status", tmp=tmp_path)
    assert shot.exists(), f"no screenshot; chromium said:\n{result.stderr[-2000:]}"
    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    pixels = np.asarray(image).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = counts.max() / len(pixels)
    dark = float((pixels.max(axis=1) < 100).mean())  # the header bar and the figures
    assert len(colours) >= 8, f"only {len(colours)} colours: a blank page?"
    assert background < 0.9, f"{background:.1%} of the pixels are one colour: a blank page?"
    assert dark > 0.02, f"only {dark:.1%} dark pixels: no header or text rendered?"

    # --dump-dom prints the DOM after the page's scripts ran; give the refresh script time to run once
    result = run_chromium("--dump-dom", "--virtual-time-budget=4000", f"{base}/status", tmp=tmp_path)
    dom = result.stdout
    assert 'id="model">2<' in dom, dom[:3000]
    assert 'id="index">2<' in dom
    assert 'id="promoted">2<' in dom
    assert 'id="ready" class="ok">READY<' in dom
