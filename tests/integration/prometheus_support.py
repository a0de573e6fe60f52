"""A real Prometheus for integration tests: Debian's binary on a free port, scraping given targets every second.

Without `prometheus` on PATH (scripts/install_ops_tools.sh installs it) the caller skips, unless
HSNN_REQUIRE_SERVERS=1 (then it fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from devservers._proc import free_port

REQUIRE = os.environ.get("HSNN_REQUIRE_SERVERS", "") == "1"


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        reason = "prometheus is not installed (bash scripts/install_ops_tools.sh)"
        if REQUIRE:
            pytest.fail(f"HSNN_REQUIRE_SERVERS=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Poll `condition` until it returns something truthy (HTTP errors count as not yet); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def scrape_config(jobs: dict[str, str], metrics_path: str = "/metrics") -> str:
    """prometheus.yml scraping each `job -> host:port` every second."""
    lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s", "scrape_configs:"]
    for job, target in jobs.items():
        lines += [f"  - job_name: {job}", f"    metrics_path: {metrics_path}", "    static_configs:"]
        lines += [f"      - targets: ['{target}']"]
    return "\n".join(lines) + "\n"


@contextmanager
def running_prometheus(jobs: dict[str, str], work: Path) -> Iterator[str]:
    """Prometheus scraping `jobs` (job name -> host:port); yields its base URL, stops it with SIGTERM."""
    binary = prometheus_binary()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "prometheus.yml"
    config.write_text(scrape_config(jobs))
    port = free_port()
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited {process.returncode}:\n{log_path.read_text()}")
            return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200

        wait_for(ready, 60, "prometheus to be ready")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """The instant-query result of `expr` (a list of {metric, value})."""
    answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def targets_up(base: str) -> dict[str, bool]:
    """Scrape job -> whether its target is up."""
    targets = httpx.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    return {t["labels"]["job"]: t["health"] == "up" for t in targets}
