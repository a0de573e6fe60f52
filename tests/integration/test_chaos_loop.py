"""Scaled-down E1, E3 and E6 (chaos/): each takes 1-2 minutes on 2 busy cores, so they run only on request.

    HSNN_CHAOS_LOOP=1 .venv/bin/python -m pytest tests/integration/test_chaos_loop.py -q

The full-size runs are `python -m chaos e1`, `python -m chaos e3` and `python -m chaos e6` (docs/reliability.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos import e1_trainer_kills, e3_redis_faults, e6_large_records
from devservers import KafkaServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("HSNN_CHAOS_LOOP") != "1", reason="slow fault injection: set HSNN_CHAOS_LOOP=1"),
]


def _common(kafka: KafkaServer, tmp_path: Path) -> list[str]:
    return ["--bootstrap", kafka.bootstrap_servers, "--work", str(tmp_path), "--report-key", ""]


def test_e1_trainer_kills_lose_nothing_and_train_nothing_twice(kafka_server: KafkaServer, tmp_path: Path) -> None:
    args = e1_trainer_kills.parse(["--impressions", "2000", "--kills", "3", *_common(kafka_server, tmp_path)])
    result = e1_trainer_kills.run(args)
    assert result.passed, result.checks
    assert result.lost == 0 and result.duplicated == 0
    assert result.checks["details"]["kills_mid_snapshot"] >= 1


def test_e3_redis_kill_and_flushall_never_shrink_the_index(kafka_server: KafkaServer, tmp_path: Path) -> None:
    args = e3_redis_faults.parse(["--ads", "1200", *_common(kafka_server, tmp_path)])
    result = e3_redis_faults.run(args)
    assert result.passed, result.checks
    assert result.faults_injected == 2


def test_e6_900_kb_records_are_dead_lettered_and_nothing_stalls(kafka_server: KafkaServer, tmp_path: Path) -> None:
    args = e6_large_records.parse(["--impressions", "1200", "--huge", "2", *_common(kafka_server, tmp_path)])
    result = e6_large_records.run(args)
    assert result.passed, result.checks
    assert result.checks["details"]["largest_letter_bytes"] < 64 * 1024
