"""Metric formulas on hand-computed cases."""

import math

import pytest
import torch

from hsnn.metrics import index_health, log_loss, normalized_entropy


def test_normalized_entropy_hand_computed():
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # predicting the base rate everywhere gives NE = 1
    assert normalized_entropy(torch.full((4,), 0.25), labels) == pytest.approx(1.0)
    probs = torch.tensor([0.5, 0.1, 0.2, 0.1])
    expected_ll = -(math.log(0.5) + math.log(0.9) + math.log(0.8) + math.log(0.9)) / 4
    base = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert log_loss(probs, labels) == pytest.approx(expected_ll)
    assert normalized_entropy(probs, labels) == pytest.approx(expected_ll / base)
    assert normalized_entropy(probs, labels, base_rate=0.5) == pytest.approx(expected_ll / math.log(2))


def test_index_health_counts_dead_nodes_and_imbalance():
    health = index_health(torch.tensor([0, 0, 0, 1]), num_nodes=4)
    assert health["dead_nodes"] == 2 and health["used_nodes"] == 2
    assert health["max_over_mean"] == pytest.approx(3.0)  # max 3 over mean 1
    even = index_health(torch.arange(8) % 4, num_nodes=4)
    assert even["max_over_mean"] == pytest.approx(1.0) and even["entropy"] == pytest.approx(1.0)
    assert even["gini"] == pytest.approx(0.0)
