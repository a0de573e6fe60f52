"""The benchmark's own metrics on hand-computed cases."""

import math

import pytest
import torch

from bench.metrics import auc, calibration, recall_at_k


def test_auc_counts_ordered_pairs_and_halves_ties():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # positives 0.9 and 0.3, negatives 0.5 and 0.3: pairs (0.9>0.5, 0.9>0.3, 0.3<0.5, 0.3=0.3) -> 2.5 / 4
    assert auc(torch.tensor([0.9, 0.5, 0.3, 0.3]), labels) == pytest.approx(0.625)
    assert auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0])))


def test_calibration_is_mean_prediction_over_mean_label():
    assert calibration(torch.tensor([0.2, 0.4]), torch.tensor([1.0, 0.0])) == pytest.approx(0.6)


def test_recall_at_k_hand_computed():
    retrieved = [[1, 2, 3, 4], [9, 8, 7, 6], [5]]
    relevant = [{2, 4, 10}, {6}, set()]  # the third user has no positives and is skipped
    assert recall_at_k(retrieved, relevant, k=2) == pytest.approx((1 / 3 + 0) / 2)
    assert recall_at_k(retrieved, relevant, k=4) == pytest.approx((2 / 3 + 1) / 2)
