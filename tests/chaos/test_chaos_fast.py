"""The fast fault-injection experiments that need no broker: E4 (snapshot corruption) and E5 (numeric poison).

`python -m chaos e4` / `e5` run the same functions and record them in reports/reliability.json.
"""

from __future__ import annotations

import json
import logging

from chaos.poison import run_e5
from chaos.report import record
from chaos.snapshot_faults import CORRUPTIONS, run_e4


def test_e4_every_snapshot_corruption_is_refused_or_fallen_back(tmp_path, caplog):
    with caplog.at_level(logging.CRITICAL):
        result = run_e4()
    assert result.passed, json.dumps(result.checks, indent=1)
    assert result.faults_injected == len(CORRUPTIONS) == 7
    for name in CORRUPTIONS:
        outcome = result.checks[name]
        assert outcome["served_model_version"] == 1 and outcome["status"] == 200, (name, outcome)
        assert outcome["reader"].startswith("refused"), (name, outcome)
    assert result.http_5xx == 0
    record(result, tmp_path / "reliability.json", None)  # the report merges by experiment key
    record(result, tmp_path / "reliability.json", None)
    assert list(json.loads((tmp_path / "reliability.json").read_text())["experiments"]) == ["e4"]


def test_e5_numeric_poison_is_rejected_and_clean_records_pass(caplog):
    with caplog.at_level(logging.CRITICAL):
        result = run_e5()
    assert result.passed, json.dumps(result.checks, indent=1)
    assert result.faults_injected >= 60
    assert result.checks["poison_accepted"] == 0 and result.checks["forwarded_to_kafka"] == 0
    assert result.lost == 0 and result.http_5xx == 0
