"""Adapters from each data set to the harness's BenchData, with the protocol each one uses."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from bench.datasets import gowalla, movielens
from bench.harness import BenchData
from hsnn.events import ItemFeatures, impressions_to_batch, users_to_batch
from hsnn.features import TrainingBatch
from hsnn.planted import SCHEMA, make_batches, make_users, make_world, true_logits
from hsnn.progress import progress_bar
from hsnn.simulator import Marketplace, feature_schema, scaled_config


def planted_data(num_items: int, num_eval_users: int, batch_size: int = 256, seed: int = 0) -> BenchData:
    """The planted problem of the core tests, sized up: true scores known, held-out clicks sampled.

    Held-out positives per eval user: 300 random items, each clicked with its true probability.
    """
    world = make_world(num_items=num_items, num_categories=16, advertisers_per_category=8, seed=seed)
    users, segment = make_users(world, num_eval_users, seed=seed + 7_777)
    g = torch.Generator().manual_seed(seed + 1)
    relevant = []
    for u in range(num_eval_users):
        rows = torch.randint(num_items, (300,), generator=g)
        probs = torch.sigmoid(true_logits(world, users, segment, rows, torch.full((300,), u)))
        clicked = torch.bernoulli(probs, generator=g).bool()
        relevant.append(set(world.item_ids[rows[clicked]].tolist()))

    def batches(num_batches: int, batch_seed: int):
        # generated lazily in chunks so a long budget does not hold every batch in memory
        for chunk in itertools.count():
            done = chunk * 20
            if done >= num_batches:
                return
            yield from make_batches(
                world, min(20, num_batches - done), batch_size, seed=batch_seed * 1000 + chunk, users_per_batch=64
            )

    def true_scores(rows: torch.Tensor) -> torch.Tensor:
        all_items = torch.arange(num_items)
        return torch.stack(
            [true_logits(world, users, segment, all_items, torch.full((num_items,), int(u))) for u in rows]
        )

    hierarchy = torch.stack([world.item_category, world.item_advertiser % 8], dim=1)
    return BenchData(
        name="planted",
        schema=SCHEMA,
        item_ids=world.item_ids,
        items=world.items,
        batches=batches,
        eval_users=users,
        relevant=relevant,
        eval_impressions=make_batches(world, 4, 512, seed=seed + 99, users_per_batch=128),
        hierarchy=hierarchy,
        true_scores=true_scores,
        notes={"protocol": "uniform logging policy; held-out clicks sampled from the planted click model"},
    )


def gowalla_data(
    root: str | Path | None,
    num_eval_users: int | None,
    test_path: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 250,
) -> BenchData:
    """Gowalla (NGCF split): train on train.txt, evaluate on valid.txt (or a test file given by path)."""
    data = gowalla.load_gowalla(root, test_path=test_path)
    eval_source = "the given test file" if test_path else "valid.txt"
    notes = {"anchor": "LightGCN Recall@20 = 0.1830 on the official test split (not valid.txt)"}
    return implicit_feedback_data(
        "gowalla", data, gowalla, num_eval_users, eval_source, batch_size=batch_size, seed=seed, notes=notes
    )


def movielens_data(
    root: str | Path | None, num_eval_users: int | None, seed: int = 0, batch_size: int = 250
) -> BenchData:
    """MovieLens-100K (rating >= 4 positive; each user's newest 20% of positives held out)."""
    data = movielens.load_movielens(root)
    held_out = "the newest 20% per user"
    return implicit_feedback_data(
        "movielens", data, movielens, num_eval_users, held_out, batch_size=batch_size, seed=seed
    )


def implicit_feedback_data(
    name: str,
    data,
    loader,
    num_eval_users: int | None,
    eval_source: str,
    negatives: int = 4,
    batch_size: int = 250,
    seed: int = 0,
    notes: dict[str, str] | None = None,
) -> BenchData:
    """Shared protocol for implicit-feedback sets (Gowalla, MovieLens): `loader` provides
    `training_batches` and `user_batch`. Retrieval excludes each user's train items; log-loss
    training uses `negatives` uniformly sampled non-positives per positive.
    """
    rng = np.random.default_rng(seed)
    eval_rows = data.eval.users_with_items()
    if num_eval_users is not None and num_eval_users < len(eval_rows):
        eval_rows = np.sort(rng.choice(eval_rows, num_eval_users, replace=False))
    eval_users = loader.user_batch(data, eval_rows)
    relevant = [set((data.eval[int(u)] + 1).tolist()) for u in eval_rows]
    exclude = [torch.from_numpy(data.train[int(u)] + 1) for u in eval_rows]

    def batches(num_batches: int, batch_seed: int):
        produced = 0
        for epoch in itertools.count():
            for batch in loader.training_batches(data, batch_size // (1 + negatives), negatives, batch_seed + epoch):
                if produced >= num_batches:
                    return
                produced += 1
                yield batch

    # held-out impressions for NE: one eval positive per user plus `negatives` sampled negatives (the
    # training ratio, so the base rate matches), with the user's full train history
    pick = eval_rows[: min(2000, len(eval_rows))]
    positives = np.array([data.eval[int(u)][0] for u in pick])
    negative_rows = gowalla.sample_negatives(data.train, pick, negatives, rng).T.reshape(-1)
    users = loader.user_batch(data, np.tile(pick, 1 + negatives))
    rows = torch.from_numpy(np.concatenate([positives, negative_rows]))
    labels = torch.cat([torch.ones(len(pick)), torch.zeros(len(pick) * negatives)]).unsqueeze(1)
    impressions = [
        TrainingBatch(users=users, items=data.items.select(rows), labels=labels, item_keys=data.item_ids[rows])
    ]
    return BenchData(
        name=name,
        schema=data.schema,
        item_ids=data.item_ids,
        items=data.items,
        batches=batches,
        eval_users=eval_users,
        relevant=relevant,
        eval_impressions=impressions,
        exclude=exclude,
        notes={
            "protocol": f"batches of {batch_size} rows: train positives + {negatives} uniform negatives each;"
            f" eval on {eval_source}; "
            f"train items excluded from retrieval; NE on one held-out positive + {negatives} negatives per user",
            **(notes or {}),
        },
    )


def simulator_data(
    num_ads: int, num_users: int, num_eval_users: int, train_batches: int, batch_size: int = 256, seed: int = 0
) -> BenchData:
    """The marketplace simulator: train on its logged impressions, evaluate against its hidden truth.

    The training stream is generated once (the same batches for every model). The corpus is the
    set of ads live when training ends. Held-out positives per eval user: 300 random live ads, each
    clicked with its true probability. The "existing hierarchy" is category -> advertiser bucket
    (advertiser id mod 16 within the category).
    """
    market = Marketplace(scaled_config(ads=num_ads, users=num_users, seed=seed))
    schema = feature_schema(market.config)
    catalogue: dict[int, ItemFeatures] = market.live_catalogue()
    cached: list[TrainingBatch] = []
    for _ in progress_bar(range(train_batches), "simulate training impressions"):
        impressions, item_events = market.step(batch_size)
        for event in item_events:
            if event.features is not None:
                catalogue[event.ad_id] = event.features
        cached.append(impressions_to_batch(impressions, schema, catalogue))
    held_out = []
    for _ in range(4):
        impressions, item_events = market.step(512)
        for event in item_events:
            if event.features is not None:
                catalogue[event.ad_id] = event.features
        held_out.append(impressions_to_batch(impressions, schema, catalogue))

    live = market.live_ads()
    order = np.argsort(live.ad_ids)
    rows_by_id, item_ids = live.rows[order], torch.from_numpy(live.ad_ids[order])
    items = live.items.select(torch.from_numpy(order))
    user_rows = market.sample_users(num_eval_users)
    states = [market.user_state(int(u)) for u in user_rows]
    eval_users = users_to_batch([market.user_features(int(u)) for u in user_rows], schema)
    rng = np.random.default_rng(seed + 1)
    relevant = []
    for state in states:
        picks = rng.integers(len(rows_by_id), size=300)
        clicked = rng.random(300) < market.true_click_probability(state, rows_by_id[picks])
        relevant.append(set(item_ids[torch.from_numpy(picks[clicked])].tolist()))

    def batches(num_batches: int, _batch_seed: int):
        for i in range(num_batches):
            yield cached[i % len(cached)]

    def true_scores(rows: torch.Tensor) -> torch.Tensor:
        logits = [market.true_click_logit(states[int(r)], rows_by_id) for r in rows]
        return torch.from_numpy(np.stack(logits)).float()

    category = items.sparse["category"]
    hierarchy = torch.stack([torch.unique(category, return_inverse=True)[1], items.sparse["advertiser"] % 16], dim=1)
    return BenchData(
        name="simulator",
        schema=schema,
        item_ids=item_ids,
        items=items,
        batches=batches,
        eval_users=eval_users,
        relevant=relevant,
        eval_impressions=held_out,
        hierarchy=hierarchy,
        true_scores=true_scores,
        notes={
            "protocol": f"{train_batches * batch_size:,} logged impressions from the simulator's logging policy; "
            "held-out clicks sampled from its hidden click model",
            "corpus": f"{len(item_ids):,} ads live at the end of training",
        },
    )
