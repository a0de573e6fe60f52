"""The marketplace simulator: deterministic, on-contract events, a churning corpus, a non-dot-product truth."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from feed.simulate import main
from streaming.events import (
    ImpressionEvent,
    ItemEvent,
    check_user_features,
    decode_impression,
    decode_item,
    encode,
    impressions_to_batch,
    items_to_batch,
    supersedes,
)
from worlds.simulator import Marketplace, MarketplaceConfig, feature_schema

# small and fast-churning: ads live ~30 simulated minutes, a step of 3,000 impressions is 30 minutes
SMALL = MarketplaceConfig(
    seed=3,
    num_ads=400,
    num_advertisers=20,
    campaigns_per_advertiser=3,
    num_categories=12,
    num_users=200,
    num_segments=4,
    history_length=8,
    mean_ad_lifespan_hours=0.5,
    mean_refill_hours=0.05,
    mean_update_interval_hours=1.0,
    impressions_per_hour=6000,
)


def _run(config: MarketplaceConfig, steps: list[int]) -> tuple[list[ItemEvent], list[ImpressionEvent], Marketplace]:
    market = Marketplace(config)
    items = market.initial_item_events()
    impressions: list[ImpressionEvent] = []
    for n in steps:
        imps, its = market.step(n)
        assert len(imps) == n
        impressions += imps
        items += its
    return items, impressions, market


@pytest.fixture(scope="module")
def run() -> tuple[list[ItemEvent], list[ImpressionEvent], Marketplace]:
    return _run(SMALL, [1000, 2000])


def _bytes(events) -> list[bytes]:
    return [encode(e) for e in events]


def test_same_seed_same_bytes_whatever_the_step_sizes(run) -> None:
    items, impressions, _ = run
    again_items, again_impressions, _ = _run(SMALL, [1, 999, 1300, 700])
    assert _bytes(again_items) == _bytes(items)
    assert _bytes(again_impressions) == _bytes(impressions)
    other_items, other_impressions, _ = _run(SMALL.model_copy(update={"seed": 4}), [1000])
    assert _bytes(other_items) != _bytes(items)
    assert _bytes(other_impressions) != _bytes(impressions[:1000])


def test_every_event_decodes_to_itself_and_fits_the_schema(run) -> None:
    items, impressions, market = run
    schema = feature_schema(SMALL)
    assert market.schema == schema
    for event in items:
        assert decode_item(encode(event)) == event
    for event in impressions:
        assert decode_impression(encode(event)) == event
        check_user_features(event.user, schema)
        assert len(event.user.history) <= schema.history_length
    assert len({e.event_id for e in impressions}) == len(impressions)
    # replaying the item events (as the indexer and trainer do) gives the live catalogue; features of ads
    # that expired since are still needed to join their earlier impressions
    catalogue, versions, ever = {}, {}, {}
    for event in items:
        if supersedes(event, versions.get(event.ad_id)):
            versions[event.ad_id] = event
            if event.op == "expire":
                catalogue.pop(event.ad_id, None)
            else:
                catalogue[event.ad_id] = ever[event.ad_id] = event.features
    batch = impressions_to_batch(impressions, schema, ever)
    assert batch.labels.shape == (len(impressions), 2)
    # live_ads() is exactly the replayed catalogue, as items_to_batch builds it
    live = market.live_ads()
    assert set(live.ad_ids.tolist()) == set(catalogue)
    expected = items_to_batch([catalogue[a] for a in live.ad_ids.tolist()], live.ad_ids.tolist(), schema)
    assert torch.equal(live.items.dense, expected.dense)
    for name in schema.item_sparse:
        assert torch.equal(live.items.sparse[name], expected.sparse[name]), name


def test_impressions_only_show_ads_live_at_their_event_time(run) -> None:
    items, impressions, _ = run
    created, expired = {}, {}
    for event in items:
        if event.op == "create":
            created[event.ad_id] = event.event_time
        elif event.op == "expire":
            expired[event.ad_id] = event.event_time
    times = [e.event_time for e in impressions]
    assert times == sorted(times)
    for event in impressions:
        assert created[event.ad_id] <= event.event_time < expired.get(event.ad_id, math.inf), event.ad_id


def test_the_corpus_churns_with_increasing_sequences(run) -> None:
    items, impressions, market = run
    ops = {op: sum(e.op == op for e in items) for op in ("create", "update", "expire")}
    initial = SMALL.num_ads
    assert ops["expire"] > initial // 4 and ops["create"] > initial + initial // 4 and ops["update"] > 0
    last: dict[int, ItemEvent] = {}
    for event in items:
        if event.ad_id in last:
            assert event.sequence > last[event.ad_id].sequence
            assert event.event_time >= last[event.ad_id].event_time
            assert last[event.ad_id].op != "expire"  # an ad id is never revived: new ads get new ids
        else:
            assert event.op == "create" and event.sequence == 1
        last[event.ad_id] = event
    assert max(last) > initial  # new ids were minted
    assert 0.8 * initial <= int(market.live.sum()) <= initial
    assert any(e.ad_id > initial for e in impressions)  # new ads get traffic


def test_labels_are_sane(run) -> None:
    _, impressions, _ = run
    clicks = np.array([e.labels.click for e in impressions])
    conversions = np.array([e.labels.conversion for e in impressions])
    assert np.all(conversions <= clicks)
    assert 0.005 <= clicks.mean() <= 0.15
    assert 0 < conversions.sum() < clicks.sum()
    # clicks enter the history: some later impression carries a history younger than an hour
    assert any(h.age_hours < 0.5 for e in impressions[-500:] for h in e.user.history)


def test_true_probability_depends_on_recency_not_just_on_who_and_what(run) -> None:
    _, _, market = run
    rows = market.live_rows()
    state = market.user_state(0)
    advertiser = int(market.slot_advertiser[rows[0]])
    same = rows[market.slot_advertiser[rows] == advertiser]

    def with_one_engagement(age_hours: float):
        return dataclasses.replace(
            state,
            history_ad=np.array([0] * 7 + [999], dtype=np.int64),
            history_advertiser=np.array([0] * 7 + [advertiser], dtype=np.int32),
            history_category=np.array([0] * 7 + [int(market.slot_category[same[0]])], dtype=np.int32),
            history_age_hours=np.array([0.0] * 7 + [age_hours]),
            exposure_advertiser=np.full_like(state.exposure_advertiser, -1),
        )

    # the same user ids, the same ad, the same engaged item: only the engagement's age differs
    fresh, old = (market.true_click_probability(with_one_engagement(a), same) for a in (1.0, 500.0))
    assert np.all(fresh > 1.5 * old)
    # diminishing returns: a second fresh engagement with the advertiser adds less than the first
    none = market.true_click_logit(
        dataclasses.replace(with_one_engagement(0.0), history_ad=np.zeros(8, np.int64)), same
    )
    one = market.true_click_logit(with_one_engagement(0.0), same)
    two_state = with_one_engagement(0.0)
    two_state = dataclasses.replace(
        two_state,
        history_ad=np.array([0] * 6 + [998, 999]),
        history_advertiser=np.array([0] * 6 + [advertiser] * 2),
        history_category=np.array([0] * 6 + [int(market.slot_category[same[0]])] * 2),
        history_age_hours=np.zeros(8),
    )
    two = market.true_click_logit(two_state, same)
    assert np.all(two - one < one - none)
    # fatigue: having been shown the advertiser a moment ago lowers the probability
    shown = dataclasses.replace(
        with_one_engagement(1.0),
        exposure_advertiser=np.full_like(state.exposure_advertiser, advertiser),
        exposure_age_hours=np.zeros(len(state.exposure_age_hours)),
    )
    assert np.all(market.true_click_probability(shown, same) < fresh)


def test_fast_and_pairwise_truth_agree_and_top_k_is_sorted(run) -> None:
    _, _, market = run
    rows = market.live_rows()
    users = np.arange(12)
    picked = rows[np.arange(12) * 7 % len(rows)]
    hours = np.full(12, market.now_hours)
    pairwise, _ = market._pair_logits(users, picked, hours)
    single = [market.true_click_logit(market.user_state(int(u)), picked[i : i + 1])[0] for i, u in enumerate(users)]
    np.testing.assert_allclose(single, pairwise, rtol=1e-4, atol=1e-4)
    everything = market.true_click_probability(market.user_state(5), rows)
    np.testing.assert_allclose(market.true_click_probability(market.user_state(5), rows[::3]), everything[::3])
    ids, probs = market.true_top_k(5, 10)
    assert np.all(np.diff(probs) <= 0) and probs[0] == pytest.approx(everything.max())
    assert set(ids.tolist()) <= set(market.ad_id[rows].tolist())
    conversion = market.true_conversion_probability(market.user_state(5), rows)
    assert np.all((conversion > 0) & (conversion < 1))


def test_queries_do_not_change_the_event_stream() -> None:
    quiet = Marketplace(SMALL)
    busy = Marketplace(SMALL)
    busy.sample_users(50)
    busy.true_top_k(3, 5)
    busy.user_features(7)
    busy.live_ads()
    assert _bytes(quiet.step(300)[0]) == _bytes(busy.step(300)[0])
    features = busy.user_features(int(busy.sample_users(1)[0]))
    check_user_features(features, busy.schema)
    assert np.array_equal(Marketplace(SMALL).sample_users(20), Marketplace(SMALL).sample_users(20))


def test_config_rejects_unknown_keys_and_the_cli_prints_figures(capsys) -> None:
    with pytest.raises(ValidationError):
        MarketplaceConfig(num_ad=5)
    with pytest.raises(ValidationError):
        MarketplaceConfig.model_validate({"policy": {"uniform": 0.9, "popularity": 0.5}})
    assert main(["--ads", "2000", "--users", "500", "--impressions", "300", "--chunk", "100", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "build: 2,000 ads" in out and "impressions: 300" in out and "true top-100" in out
