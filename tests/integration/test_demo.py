"""The one-command demo end to end: `python -m demo --until-served` against real Kafka and Redis.

It must start everything, reach "the API serves a published snapshot with its Redis index, a new ad
created through the API is retrievable, and recall against the simulator's truth was measured", stop
everything in order (the trainer's final snapshot included), exit 0 and print its summary.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devservers import KafkaServer, RedisServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REQUIRE = os.environ.get("HSNN_REQUIRE_SERVERS", "") == "1"
CAP_S = 120  # the demo's own limit (--duration with --until-served: exit 1 when it runs out)
TIMEOUT_S = 150


def test_demo_until_served(tmp_path: Path) -> None:
    for reason in (KafkaServer.unavailable_reason(), RedisServer.unavailable_reason()):
        if reason:
            if REQUIRE:
                pytest.fail(f"HSNN_REQUIRE_SERVERS=1 but {reason}", pytrace=False)
            pytest.skip(reason)
    command = [
        sys.executable,
        "-m",
        "demo",
        "--until-served",
        "--duration",
        str(CAP_S),
        "--port",
        "0",
        "--interval",
        "3",
        "--recall-users",
        "4",
        "--data-dir",
        str(tmp_path / "demo"),
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the demo stops its services on SIGTERM
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        pytest.fail(f"the demo ran past {TIMEOUT_S}s:\n{output[-6000:]}")
    assert process.returncode == 0, output[-6000:]
    summary = output[output.index("== summary ==") :]

    published = re.search(r"^snapshots published: (\d+) \(latest v(\d+), promoted v(\d+)", summary, re.M)
    assert published and int(published.group(1)) >= 1, summary
    index = re.search(r"^index: version (\d+) in Redis, built from snapshot (\d+)", summary, re.M)
    assert index and int(index.group(1)) >= 1, summary
    served = re.search(r"^api: served model (\d+) / index (\d+)", summary, re.M)
    assert served and int(served.group(1)) >= 1 and int(served.group(2)) >= 1, summary
    assert re.search(r"^item create -> retrievable: ad \d+ in [\d.]+s", summary, re.M), summary
    recall = re.search(r"^recall@(\d+): ([\d.]+) vs the simulator's true top-\d+", summary, re.M)
    assert recall and 0.0 <= float(recall.group(2)) <= 1.0, summary
    assert re.search(r"^trainer: [\d,]+ events trained .*exited 0", summary, re.M), summary
    assert "stopped by --until-served" in summary
    # Freshness from the API's adoption timestamps: the first snapshot is published after the API starts, so
    # at least that adoption is a sample (seconds, not the minutes a stale start would give).
    fresh = re.search(r"^freshness: snapshot published -> served p50 ([\d.]+)s / p99 ([\d.]+)s", summary, re.M)
    assert fresh and 0.0 <= float(fresh.group(1)) <= float(fresh.group(2)) < 60, summary
