"""Index and beam sizes: what the benchmarks and the load generator serve with."""

import math

import pytest

from bench.sizing import SERVING_WIDENING, beams_for_budget, index_shape


@pytest.mark.parametrize("num_items", [10_000, 100_000, 1_000_000, 10_000_000])
def test_index_shape_gives_about_a_hundred_items_per_leaf(num_items):
    shape = index_shape(num_items)
    assert len(shape) == 2 and shape[0] == shape[1]
    assert 50 <= num_items / math.prod(shape) <= 200


@pytest.mark.parametrize("num_items", [10_000, 100_000, 1_000_000])
def test_leaf_beam_spends_the_budget_and_upper_beams_widen(num_items):
    sizes = index_shape(num_items)
    per_leaf = num_items / math.prod(sizes)
    beams = beams_for_budget(sizes, num_items, 3000, SERVING_WIDENING)
    assert beams[1] == math.ceil(3000 / per_leaf)
    # the top level keeps widening x the parents the leaf beam needs, never more nodes than exist
    assert beams[0] == min(sizes[0], math.ceil(SERVING_WIDENING * beams[1] / sizes[1]))


def test_serving_keeps_more_than_a_couple_of_top_nodes_at_a_million_ads():
    # at 10^6 ads, widening 4 kept 2 of 100 top nodes and lost half of what exhaustive scoring finds
    assert beams_for_budget([100, 100], 1_000_000, 3000, SERVING_WIDENING)[0] >= 5
