"""The fast fault-injection experiments that need the real broker (and Redis): E7 and E10.

`python -m chaos e7 --cases 1000` and `python -m chaos e10` run the same functions on their own servers.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from chaos.fuzz import run_e7
from chaos.rollback import run_e10

pytestmark = pytest.mark.integration


def test_e7_schemathesis_finds_no_5xx_no_timeouts_and_a_poisoned_request_fails_alone(kafka_server, caplog):
    topic = f"chaos.items.{uuid.uuid4().hex[:8]}"
    kafka_server.create_topics([topic], partitions=2, compacted={topic})
    with caplog.at_level(logging.CRITICAL):
        result = run_e7(kafka_server.bootstrap_servers, topic, cases=200)
    assert result.passed, json.dumps(result.checks, indent=1)[:4000]
    assert result.checks["cases_generated"] >= 200
    assert result.http_5xx == 0 and result.timeouts == 0
    assert result.checks["poisoned_batch"] == {"valid_200": 31, "valid": 31, "poisoned_status": 422}


def test_e10_runbook_rollback_then_expire(kafka_server, redis_server, caplog):
    with caplog.at_level(logging.CRITICAL):
        result = run_e10(kafka_server, redis_server.url)
    assert result.passed, json.dumps(result.checks, indent=1)
    assert result.checks["served_after"]["model_version"] == 1
    assert result.checks["expired_ad_served"] is False
    first, after_rollback = result.checks["index_versions"]
    assert after_rollback > first  # the rollback is a rebuild with the old model, followed downwards by the API
