"""Adapters from each data set to the harness's BenchData, with the protocol each one uses."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from bench.datasets import gowalla, movielens
from bench.harness import BenchData
from clitools.progress import progress_bar
from hsnn.features import TrainingBatch
from streaming.events import ItemFeatures, impressions_to_batch, users_to_batch
from worlds.planted import SCHEMA, make_batches, make_users, make_world, true_logits
from worlds.simulator import Marketplace, feature_schema, scaled_config


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


GOWALLA_PROTOCOLS = ("valid", "official")
MOVIELENS_PROTOCOLS = ("recbole", "newest20")
GOWALLA_VALID_EVAL_USERS = 3000  # the `valid` protocol's default: a fixed random sample of the valid users
NE_NEGATIVES = 4  # sampled negatives per held-out positive in the NE impressions of the implicit sets


def gowalla_data(
    root: str | Path | None,
    num_eval_users: int | None = GOWALLA_VALID_EVAL_USERS,
    test_path: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 250,
    protocol: str = "valid",
    negatives: int = 4,
) -> BenchData:
    """Gowalla (NGCF split) under one of two protocols, both full ranking with train items masked.

    - "valid": train on train.txt, evaluate on valid.txt for `num_eval_users` users sampled with
      `seed` from those with valid items (None: all of them).
    - "official": train on train.txt + valid.txt (the NGCF/LightGCN training set), evaluate every
      user with items in `test_path` (the official test.txt, kept outside the shared folder). This
      is the protocol of the published figures (LightGCN Recall@20 = 0.1830, NDCG@20 = 0.1554).
    """
    if protocol not in GOWALLA_PROTOCOLS:
        raise ValueError(f"gowalla protocol must be one of {GOWALLA_PROTOCOLS}, not {protocol!r}")
    if protocol == "official":
        if test_path is None:
            raise ValueError("the official Gowalla protocol needs the official test.txt by path (--test-file)")
        data = gowalla.load_gowalla(root, test_path=test_path)
        num_eval_users, eval_source = None, f"{Path(test_path).name} (every user with test items)"
    else:
        if test_path is not None:
            raise ValueError("the valid protocol evaluates on valid.txt; a test file needs --protocol official")
        data = gowalla.load_gowalla(root)
        eval_source = "valid.txt"
    notes = {
        "anchor": "LightGCN Recall@20 = 0.1830, NDCG@20 = 0.1554 on the official split (train+valid -> test)",
        "evaluation": "full ranking over all items, each user's training items masked; Recall@K and NDCG@K"
        " (ideal DCG over min(|held-out|, K)) averaged over evaluated users",
    }
    return implicit_feedback_data(
        f"gowalla_{protocol}" if protocol != "valid" else "gowalla",
        data,
        gowalla,
        num_eval_users,
        eval_source,
        negatives=negatives,
        batch_size=batch_size,
        seed=seed,
        notes=notes,
    )


def protocol_data(
    dataset: str,
    protocol: str | None = None,
    test_file: str | None = None,
    eval_users: int | None = None,
    data_root: str | None = None,
    seed: int = 0,
    batch_size: int = 250,
    negatives: int = 4,
) -> tuple[BenchData, str]:
    """An implicit-feedback data set under its protocol (default: gowalla valid, movielens recbole), for
    the single-method tools; returns (data, protocol). Protocols that evaluate every user ignore `eval_users`."""
    if dataset == "gowalla":
        protocol = protocol or ("official" if test_file else "valid")
        users = None if protocol == "official" else eval_users or GOWALLA_VALID_EVAL_USERS
        data = gowalla_data(
            data_root,
            users,
            test_path=test_file,
            seed=seed,
            batch_size=batch_size,
            protocol=protocol,
            negatives=negatives,
        )
        return data, protocol
    if dataset == "movielens":
        protocol = protocol or "recbole"
        users = None if protocol == "recbole" else eval_users
        data = movielens_data(
            data_root, users, seed=seed, batch_size=batch_size, protocol=protocol, negatives=negatives
        )
        return data, protocol
    raise ValueError(f"no (user, item) protocol for data set {dataset!r}; choose gowalla or movielens")


def movielens_data(
    root: str | Path | None,
    num_eval_users: int | None = None,
    seed: int = 0,
    batch_size: int = 250,
    protocol: str = "recbole",
    split_order: str = "time",
    negatives: int = 4,
) -> BenchData:
    """MovieLens-100K (rating >= 4 is a positive) under one of two protocols.

    - "recbole": RecBole's default general-recommendation protocol. Each user's positives split
      80/10/10 (train/valid/test, `ratio_parts`) in time order (`split_order="random"`: shuffled, as
      RecBole's RO ordering); train on train, evaluate the test part of every user that has one,
      full ranking with train and valid items masked. `num_eval_users` must be None (all users).
    - "newest20": the earlier protocol of this repo: each user's newest 20% of positives held out,
      `num_eval_users` users sampled, train items masked. Not comparable with published figures.
    """
    if protocol not in MOVIELENS_PROTOCOLS:
        raise ValueError(f"movielens protocol must be one of {MOVIELENS_PROTOCOLS}, not {protocol!r}")
    if protocol == "newest20":
        data = movielens.load_movielens(root)
        return implicit_feedback_data(
            "movielens_newest20",
            data,
            movielens,
            num_eval_users,
            "the newest 20% per user",
            negatives=negatives,
            batch_size=batch_size,
            seed=seed,
        )
    data = movielens.load_movielens(root, split="recbole", split_order=split_order, seed=seed)
    notes = {
        "evaluation": "RecBole default protocol: per-user 80/10/10 split"
        f" ({'time-ordered' if split_order == 'time' else 'random order'}), test part evaluated, full ranking with"
        " train and valid items masked, every user with test items; Recall@K and NDCG@K as RecBole defines them",
    }
    return implicit_feedback_data(
        "movielens",
        data,
        movielens,
        num_eval_users,
        "the test part (10% per user)",
        negatives=negatives,
        batch_size=batch_size,
        seed=seed,
        notes=notes,
        masked_also=data.valid,
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
    masked_also: gowalla.Interactions | None = None,
) -> BenchData:
    """Shared protocol for implicit-feedback sets (Gowalla, MovieLens): `loader` provides
    `training_batches` and `user_batch`. Retrieval excludes each user's train items (and their
    `masked_also` items, e.g. validation positives when the test part is evaluated); log-loss
    training uses `negatives` uniformly sampled non-positives per positive.
    """
    rng = np.random.default_rng(seed)
    eval_rows = data.eval.users_with_items()
    if num_eval_users is not None and num_eval_users < len(eval_rows):
        eval_rows = np.sort(rng.choice(eval_rows, num_eval_users, replace=False))
    eval_users = loader.user_batch(data, eval_rows)
    relevant = [set((data.eval[int(u)] + 1).tolist()) for u in eval_rows]
    exclude = [torch.from_numpy(data.train[int(u)] + 1) for u in eval_rows]
    if masked_also is not None:
        exclude = [
            torch.cat([e, torch.from_numpy(masked_also[int(u)] + 1)]) for e, u in zip(exclude, eval_rows, strict=True)
        ]

    def batches(num_batches: int, batch_seed: int):
        produced = 0
        for epoch in itertools.count():
            for batch in loader.training_batches(data, batch_size // (1 + negatives), negatives, batch_seed + epoch):
                if produced >= num_batches:
                    return
                produced += 1
                yield batch

    # held-out impressions for NE: one eval positive per user plus NE_NEGATIVES sampled negatives, with the
    # user's full train history; fixed whatever the training ratio, so NE compares across runs (every
    # model is Platt-scaled on a slice of these first, which absorbs a different training base rate)
    pick = eval_rows[: min(2000, len(eval_rows))]
    positives = np.array([data.eval[int(u)][0] for u in pick])
    negative_rows = gowalla.sample_negatives(data.train, pick, NE_NEGATIVES, rng).T.reshape(-1)
    users = loader.user_batch(data, np.tile(pick, 1 + NE_NEGATIVES))
    rows = torch.from_numpy(np.concatenate([positives, negative_rows]))
    labels = torch.cat([torch.ones(len(pick)), torch.zeros(len(pick) * NE_NEGATIVES)]).unsqueeze(1)
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
        train_pairs=(torch.from_numpy(data.train.owners()), torch.from_numpy(data.train.items)),
        num_users=data.num_users,
        notes={
            "protocol": f"batches of {batch_size} rows: train positives + {negatives} uniform negatives each;"
            f" eval on {eval_source}; "
            f"train{' and valid' if masked_also is not None else ''} items excluded from retrieval;"
            f" NE on one held-out positive + {NE_NEGATIVES} negatives per user",
            **(notes or {}),
        },
    )


def stream_positions(stream_length: int, num_batches: int, batch_seed: int, base_seed: int) -> list[int]:
    """Which logged batches a `batches(num_batches, batch_seed)` call reads, in order.

    The simulator logs one time-ordered stream. Seed `base_seed + j` reads the `num_batches` batches
    that follow j earlier chunks of the same length, wrapping only past the end of the log: the base
    seed starts at the first batch, and a training run split into equal phases with consecutive seeds
    (k-means phase 2, EM rounds) continues through the log instead of replaying its opening again.
    """
    start = (batch_seed - base_seed) * num_batches
    return [(start + i) % stream_length for i in range(num_batches)]


def simulator_data(
    num_ads: int, num_users: int, num_eval_users: int, train_batches: int, batch_size: int = 256, seed: int = 0
) -> BenchData:
    """The marketplace simulator: train on its logged impressions, evaluate against its hidden truth.

    The training stream is generated once (the same batches for every model trained with the same
    seed; see `stream_positions` for what other seeds read). The corpus is the
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

    def batches(num_batches: int, batch_seed: int):
        yield from (cached[i] for i in stream_positions(len(cached), num_batches, batch_seed, seed))

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
