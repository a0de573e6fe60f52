"""The benchmark's own metrics on hand-computed cases."""

import math

import pytest
import torch

from bench.metrics import auc


def test_auc_counts_ordered_pairs_and_halves_ties():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # positives 0.9 and 0.3, negatives 0.5 and 0.3: pairs (0.9>0.5, 0.9>0.3, 0.3<0.5, 0.3=0.3) -> 2.5 / 4
    assert auc(torch.tensor([0.9, 0.5, 0.3, 0.3]), labels) == pytest.approx(0.625)
    assert auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0])))
