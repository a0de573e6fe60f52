"""The Open Bandit NE / calibration report on one campaign of the real sample."""

import json

import numpy as np
import pytest
import torch

from bench.calibration import run_calibration, time_split, write_calibration_report
from bench.datasets._common import datasets_dir
from bench.datasets.open_bandit import OBD_DIR

pytestmark = pytest.mark.skipif(not (datasets_dir() / OBD_DIR).exists(), reason="Open Bandit sample not present")


def test_time_split_keeps_order_and_covers_every_row():
    train, fit, measure = time_split(1000)
    assert (len(train), len(fit), len(measure)) == (700, 100, 200)
    assert np.array_equal(np.concatenate([train, fit, measure]), np.arange(1000))


def test_report_on_one_campaign_is_well_formed(tmp_path):
    torch.set_num_threads(1)
    report = run_calibration(epochs=1, resamples=50, campaigns=("men",))
    assert report["impressions"]["train"] == 14_000 and report["clicks"]["measured"] > 0
    models = report["models"]
    assert {"two_tower", "monn", "hsnn_joint", "item_ctr_table", "constant_train_ctr"} == set(models)
    for name, m in models.items():
        assert 0.0 < m["ne"] < 5.0 and m["calibration"] > 0.0
        low, high = m["ne_ci95"]
        assert low <= m["ne"] <= high or (name == "two_tower" and low <= high)
    assert models["two_tower"]["ne_vs_two_tower_percent"] == 0.0
    assert all(0.0 <= m["auc"] <= 1.0 for name, m in models.items() if name != "constant_train_ctr")
    paths = write_calibration_report(report, tmp_path)
    assert json.loads(paths[0].read_text())["dataset"] == "open_bandit"
    assert "| item_ctr_table |" in paths[1].read_text()
    assert paths[2].stat().st_size > 10_000
