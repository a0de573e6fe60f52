"""An ad marketplace simulator with a hidden ground truth: the data source of the feed, the benchmark and the demo.

The world: advertisers own campaigns, campaigns own ad *slots*. A slot holds one ad at a time; the ad
expires after a random lifespan, the slot stays empty for a while, then a new ad (a new ad id, new
creative) is created in it, so the corpus churns at a roughly constant size. Users have a segment, age
bucket, gender and region, latent interests that drift over simulated time, an engagement history (their
own simulated clicks) and a short memory of the advertisers they were shown (ad fatigue).

Every output is a `streaming.events` model (ImpressionEvent, ItemEvent, UserFeatures, ItemFeatures), so the
pipeline, the benchmark and the tests all read the simulator through the one parser.

Time advances in ticks of `tick_minutes`. Item events (create / update / expire) happen on tick boundaries
and carry the boundary as their event_time; impressions of a tick happen strictly inside it. So an ad is
live at time t exactly when its create time <= t < its expire time, and the live set is constant within a
tick. `step(n)` returns whole ticks' worth of item events and exactly n impressions (a partly consumed
tick is kept in a buffer), which makes the event stream independent of how callers chunk their `step`
calls: the same seed gives the same bytes.

The hidden click model (see docs/simulator.md for the formula) is deliberately not a dot product: it has a
segment x category table, a concave recency-weighted affinity to advertisers and categories from the user's
own engagement history, exposure fatigue, a region x advertiser term and per-ad quality.

Everything is numpy arrays over slots and users; nothing per ad is a Python object until an event is
emitted, and item events for a large catalogue are generated lazily in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator

from hsnn.config import FeatureSchema, StrictModel
from hsnn.features import ItemBatch
from streaming.events import ImpressionEvent, ItemEvent, ItemFeatures, UserFeatures

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class ClickModelConfig(StrictModel):
    """Coefficients of the hidden click and conversion models (docs/simulator.md has the formula)."""

    base_logit: float = -4.6
    segment_category_scale: float = Field(1.0, ge=0, description="Std of the segment x category table T.")
    gender_category_scale: float = Field(0.2, ge=0, description="Std of the gender x category table G.")
    interest_weight: float = Field(1.2, ge=0, description="w_z in w_z * tanh(<z_u(t), v_i> / sqrt(L)).")
    advertiser_affinity_weight: float = Field(2.0, ge=0, description="w_a: concave in past engagements.")
    advertiser_recency_hours: float = Field(24.0, gt=0, description="tau_a of the advertiser affinity.")
    category_affinity_weight: float = Field(0.8, ge=0)
    category_recency_hours: float = Field(72.0, gt=0)
    fatigue_weight: float = Field(0.6, ge=0, description="w_f: logit lost per recent exposure to the advertiser.")
    fatigue_hours: float = Field(6.0, gt=0)
    regional_share: float = Field(0.3, ge=0, le=1, description="Share of advertisers that target one region.")
    region_weight: float = Field(0.7, ge=0, description="+w in the home region of a regional advertiser, -w out.")
    campaign_quality_std: float = Field(0.3, ge=0)
    ad_quality_std: float = Field(0.3, ge=0)
    conversion_base_logit: float = -2.4
    conversion_campaign_std: float = Field(0.6, ge=0, description="Landing-page quality per campaign.")
    conversion_age_category_scale: float = Field(0.4, ge=0, description="Std of the age bucket x category table B.")
    conversion_returning_weight: float = Field(0.8, ge=0, description="Returning customers convert more.")


class LoggingPolicyConfig(StrictModel):
    """Which ad the (simulated) production system showed. The rest of the mass is affinity-biased."""

    uniform: float = Field(0.25, ge=0, le=1, description="Uniform over live ads (exploration).")
    popularity: float = Field(0.15, ge=0, le=1, description="Advertiser chosen by its budget weight.")
    retarget: float = Field(0.15, ge=0, le=1, description="An advertiser from the user's engagement history.")
    candidates: int = Field(16, ge=1, description="Affinity branch: best of this many uniform candidates ...")
    noise: float = Field(1.0, ge=0, description="... by true logit + this scale x Gumbel noise.")

    @model_validator(mode="after")
    def _mass(self) -> LoggingPolicyConfig:
        if self.uniform + self.popularity + self.retarget > 1 + 1e-9:
            raise ValueError("uniform + popularity + retarget must be at most 1")
        return self


class MarketplaceConfig(StrictModel):
    """Size, dynamics and hidden ground truth of one simulated marketplace. Same config + seed = same events."""

    seed: int = 0
    num_ads: int = Field(10_000, ge=1, description="Ad slots = live ads at the start (churn keeps it near this).")
    num_advertisers: int = Field(500, ge=1)
    campaigns_per_advertiser: int = Field(4, ge=1)
    advertiser_size_sigma: float = Field(1.0, ge=0, description="Lognormal spread of advertiser sizes (ads).")
    num_categories: int = Field(64, ge=1)
    num_users: int = Field(10_000, ge=1)
    num_segments: int = Field(16, ge=1)
    num_age_buckets: int = Field(8, ge=1)
    num_regions: int = Field(20, ge=1)
    user_dense_dim: int = Field(4, ge=0)
    item_dense_dim: int = Field(8, ge=0)
    latent_dim: int = Field(8, ge=1, description="Hidden interest space (not emitted).")
    interest_drift: float = Field(0.6, ge=0, description="Amplitude of interest drift around the user's base.")
    interest_drift_period_hours: float = Field(72.0, gt=0, description="Typical period of the drift.")
    user_activity_sigma: float = Field(1.0, ge=0, description="Lognormal spread of how often users are seen.")
    history_length: int = Field(16, ge=1, description="Engagements kept per user (and emitted).")
    initial_history_hours: float = Field(168.0, gt=0, description="Initial histories span this far back.")
    exposure_memory: int = Field(8, ge=1, description="Recent exposures remembered per user (fatigue).")
    mean_ad_lifespan_hours: float = Field(48.0, gt=0, description="Exponential lifespan of an ad.")
    mean_refill_hours: float = Field(1.0, gt=0, description="A slot stays empty this long on average.")
    mean_update_interval_hours: float | None = Field(
        96.0, gt=0, description="Creative refresh (op 'update') every this many hours on average; None: never."
    )
    impressions_per_hour: float = Field(20_000.0, gt=0, description="Traffic: how fast simulated time runs.")
    tick_minutes: float = Field(1.0, gt=0, description="Item events happen on tick boundaries.")
    start_time: float = Field(1_767_225_600.0, gt=0, lt=1e11, description="Epoch seconds of simulated hour 0.")
    item_id_buckets: int | None = Field(None, ge=2, description="Schema buckets for item_id; default ~2 x num_ads.")
    click_model: ClickModelConfig = Field(default_factory=ClickModelConfig)
    policy: LoggingPolicyConfig = Field(default_factory=LoggingPolicyConfig)


def feature_schema(config: MarketplaceConfig) -> FeatureSchema:
    """The FeatureSchema of everything the simulator emits (ids are 1-based; 0 is missing)."""
    item_buckets = config.item_id_buckets or min(max(1024, 2 * config.num_ads), 1 << 21)
    return FeatureSchema(
        user_dense_dim=config.user_dense_dim,
        user_sparse={
            "segment": config.num_segments + 1,
            "age_bucket": config.num_age_buckets + 1,
            "gender": 4,
            "region": config.num_regions + 1,
        },
        item_dense_dim=config.item_dense_dim,
        item_sparse={
            "item_id": item_buckets,
            "advertiser": config.num_advertisers + 1,
            "campaign": config.num_advertisers * config.campaigns_per_advertiser + 1,
            "category": config.num_categories + 1,
        },
        history_attributes=["item_id", "advertiser", "category"],
        interaction_attributes=["advertiser", "category"],
        history_length=config.history_length,
        recency_scale=config.click_model.advertiser_recency_hours,
        tasks=["click", "conversion"],
    )


# --------------------------------------------------------------------------------------------
# State snapshots handed to callers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserState:
    """One user as the hidden model sees them at `hours` (simulated hours since start_time)."""

    row: int
    hours: float
    segment: int
    age_bucket: int
    gender: int
    region: int
    interest: np.ndarray  # (latent_dim,) z_u(t)
    history_ad: np.ndarray  # (H,) ad ids, 0 = empty slot; oldest first
    history_advertiser: np.ndarray  # (H,) 0-based
    history_category: np.ndarray  # (H,) 0-based
    history_age_hours: np.ndarray  # (H,)
    exposure_advertiser: np.ndarray  # (E,) 0-based, -1 = none
    exposure_age_hours: np.ndarray  # (E,)


@dataclass(frozen=True)
class LiveAds:
    """The live catalogue: `rows` index the marketplace's slot arrays (for true_click_probability)."""

    rows: np.ndarray  # (N,) int64 slot rows
    ad_ids: np.ndarray  # (N,) int64
    items: ItemBatch  # the same ads, as streaming.events.items_to_batch would build them from their events


# --------------------------------------------------------------------------------------------
# The marketplace
# --------------------------------------------------------------------------------------------

_POLICY_UNIFORM, _POLICY_POPULAR, _POLICY_RETARGET, _POLICY_AFFINITY = 0, 1, 2, 3


class Marketplace:
    """A seeded, deterministic ad marketplace. See the module docstring for the time model."""

    def __init__(self, config: MarketplaceConfig | None = None) -> None:
        self.config = config = config or MarketplaceConfig()
        self.schema = feature_schema(config)
        streams = np.random.SeedSequence(config.seed).spawn(4)
        world_rng = np.random.default_rng(streams[0])
        self._rng = np.random.default_rng(streams[1])  # the event stream
        self._eval_rng = np.random.default_rng(streams[2])  # sample_users: never perturbs the event stream
        self._tick_hours = config.tick_minutes / 60.0
        self._build_world(world_rng)
        self._build_ads(world_rng)
        self._build_users(world_rng, np.random.default_rng(streams[3]))
        self._tick = -1  # index of the current tick; its window is [tick, tick + 1) * tick_hours
        self._buffer: list[ImpressionEvent] = []
        self._impression_counter = 0
        self._now_hours = 0.0
        self._due: np.ndarray = np.zeros(0, dtype=np.int64)
        self._due_until = -math.inf

    # ------------------------------------------------------------------ construction
    def _build_world(self, rng: np.random.Generator) -> None:
        c, m = self.config, self.config.click_model
        L = c.latent_dim
        self.category_latent = rng.standard_normal((c.num_categories, L)).astype(np.float32)
        self.segment_centre = rng.standard_normal((c.num_segments, L)).astype(np.float32)
        self.segment_category = (
            m.segment_category_scale * rng.standard_normal((c.num_segments, c.num_categories))
        ).astype(np.float32)
        self.gender_category = (m.gender_category_scale * rng.standard_normal((3, c.num_categories))).astype(np.float32)
        self.age_category_conversion = (
            m.conversion_age_category_scale * rng.standard_normal((c.num_age_buckets, c.num_categories))
        ).astype(np.float32)
        # advertisers: a main category (popular categories host more advertisers), a size, a budget weight
        category_popularity = rng.dirichlet(np.full(c.num_categories, 0.7))
        self.advertiser_category = rng.choice(c.num_categories, size=c.num_advertisers, p=category_popularity)
        sizes = rng.lognormal(0.0, c.advertiser_size_sigma, c.num_advertisers)
        self.advertiser_budget = rng.lognormal(0.0, 1.0, c.num_advertisers)
        regional = rng.random(c.num_advertisers) < m.regional_share
        self.advertiser_region = np.where(regional, rng.integers(0, c.num_regions, c.num_advertisers), -1)
        # campaigns: mostly the advertiser's main category
        n_campaigns = c.num_advertisers * c.campaigns_per_advertiser
        self.campaign_advertiser = np.repeat(np.arange(c.num_advertisers), c.campaigns_per_advertiser)
        own = rng.random(n_campaigns) < 0.7
        self.campaign_category = np.where(
            own, self.advertiser_category[self.campaign_advertiser], rng.integers(0, c.num_categories, n_campaigns)
        )
        self.campaign_quality = (m.campaign_quality_std * rng.standard_normal(n_campaigns)).astype(np.float32)
        self.campaign_conversion = (m.conversion_campaign_std * rng.standard_normal(n_campaigns)).astype(np.float32)
        # slots: contiguous per campaign, campaigns contiguous per advertiser, so an advertiser is a slot range
        campaign_weight = np.repeat(sizes / c.campaigns_per_advertiser, c.campaigns_per_advertiser)
        edges = np.concatenate([[0.0], np.cumsum(campaign_weight)]) / campaign_weight.sum() * c.num_ads
        self.campaign_start = np.round(edges).astype(np.int64)
        self.campaign_start[-1] = c.num_ads
        self.advertiser_start = self.campaign_start[:: c.campaigns_per_advertiser].copy()
        self.advertiser_start = np.append(self.advertiser_start[: c.num_advertisers], c.num_ads)
        self.item_projection = rng.standard_normal((c.item_dense_dim, L + 1)).astype(np.float32)
        self.user_projection = rng.standard_normal((c.user_dense_dim, L)).astype(np.float32)

    def _build_ads(self, rng: np.random.Generator) -> None:
        c = self.config
        S = c.num_ads
        counts = np.diff(self.campaign_start)
        self.slot_campaign = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
        self.slot_advertiser = self.campaign_advertiser[self.slot_campaign].astype(np.int32)
        self.slot_category = self.campaign_category[self.slot_campaign].astype(np.int32)
        self.ad_id = np.arange(1, S + 1, dtype=np.int64)
        self._next_ad_id = S + 1
        self.live = np.ones(S, dtype=bool)
        self.sequence = np.ones(S, dtype=np.int64)
        self.latent = np.empty((S, c.latent_dim), dtype=np.float32)
        self.quality = np.empty(S, dtype=np.float32)
        self.dense = np.empty((S, c.item_dense_dim), dtype=np.float32)
        # exponential lifespans are memoryless: an ad alive at 0 has Exp(mean) left and was created Exp(mean) ago
        self.created_at = -np.minimum(rng.exponential(c.mean_ad_lifespan_hours, S), 4 * c.mean_ad_lifespan_hours)
        self.expires_at = rng.exponential(c.mean_ad_lifespan_hours, S)
        self.refill_at = np.full(S, np.inf)
        self.next_update = self._draw_update(rng, np.zeros(S))
        self._new_creatives(rng, np.arange(S))

    def _draw_update(self, rng: np.random.Generator, now: np.ndarray) -> np.ndarray:
        interval = self.config.mean_update_interval_hours
        if interval is None:
            return np.full(len(now), np.inf)
        return now + rng.exponential(interval, len(now))

    def _new_creatives(self, rng: np.random.Generator, rows: np.ndarray) -> None:
        """Draw latent vector, quality and observed dense features for the ads now in `rows`."""
        c = self.config
        n = len(rows)
        latent = 0.8 * self.category_latent[self.slot_category[rows]] + 0.6 * rng.standard_normal((n, c.latent_dim))
        self.latent[rows] = latent
        self._refresh_creatives(rng, rows)

    def _refresh_creatives(self, rng: np.random.Generator, rows: np.ndarray) -> None:
        """A new creative for the same ad: new quality and dense features, same latent topic."""
        c = self.config
        n = len(rows)
        quality = self.campaign_quality[self.slot_campaign[rows]] + c.click_model.ad_quality_std * rng.standard_normal(
            n
        )
        self.quality[rows] = quality
        hidden = np.concatenate([self.latent[rows] / math.sqrt(c.latent_dim), quality[:, None]], axis=1)
        observed = hidden @ self.item_projection.T + 0.2 * rng.standard_normal((n, c.item_dense_dim))
        self.dense[rows] = np.round(observed, 4)  # 4 decimals: short JSON, exact float32 round trip

    def _build_users(self, rng: np.random.Generator, history_rng: np.random.Generator) -> None:
        c = self.config
        U, L, J = c.num_users, c.latent_dim, 3
        self.user_segment = rng.integers(0, c.num_segments, U).astype(np.int32)
        self.user_age_bucket = rng.integers(0, c.num_age_buckets, U).astype(np.int32)
        self.user_gender = rng.choice(3, size=U, p=[0.1, 0.45, 0.45]).astype(np.int32)
        self.user_region = rng.integers(0, c.num_regions, U).astype(np.int32)
        self.user_base = (self.segment_centre[self.user_segment] + 0.7 * rng.standard_normal((U, L))).astype(np.float32)
        # drift: a few random sinusoids per user, so z_u(t) is a pure function of t (queries have no side effects)
        self.drift_amplitude = (c.interest_drift / math.sqrt(J) * rng.standard_normal((U, J, L))).astype(np.float32)
        periods = c.interest_drift_period_hours * rng.lognormal(0.0, 0.5, (U, J))
        self.drift_frequency = (2 * math.pi / periods).astype(np.float32)
        self.drift_phase = rng.uniform(0, 2 * math.pi, (U, J)).astype(np.float32)
        self.user_noise = (0.3 * rng.standard_normal((U, c.user_dense_dim))).astype(np.float32)
        activity = rng.lognormal(0.0, c.user_activity_sigma, U)
        self._user_cdf = np.cumsum(activity) / activity.sum()
        H, E = c.history_length, c.exposure_memory
        self.history_ad = np.zeros((U, H), dtype=np.int64)
        self.history_advertiser = np.zeros((U, H), dtype=np.int32)
        self.history_category = np.zeros((U, H), dtype=np.int32)
        self.history_time = np.zeros((U, H), dtype=np.float64)
        self.exposure_advertiser = np.full((U, E), -1, dtype=np.int32)
        self.exposure_time = np.full((U, E), -np.inf)
        # initial histories: a random number of past clicks on ads of categories the user's segment likes
        rng = history_rng
        lengths = rng.integers(0, H + 1, U)
        by_category = np.argsort(self.slot_category, kind="stable")
        cat_start = np.searchsorted(self.slot_category[by_category], np.arange(c.num_categories + 1))
        liked = np.exp(2.0 * self.segment_category) * (cat_start[1:] > cat_start[:-1])[None, :]
        cdf = np.cumsum(liked, axis=1)
        cdf /= cdf[:, -1:]
        draws = rng.random((U, H))
        cats = np.empty((U, H), dtype=np.int64)
        for segment in range(c.num_segments):  # per segment: no (users x categories) temporaries
            members = self.user_segment == segment
            cats[members] = np.searchsorted(cdf[segment], draws[members], side="right")
        cats = np.minimum(cats, c.num_categories - 1)
        pick = cat_start[cats] + (rng.random((U, H)) * (cat_start[cats + 1] - cat_start[cats])).astype(np.int64)
        rows = by_category[np.minimum(pick, c.num_ads - 1)]
        ages = np.sort(rng.uniform(0, 1, (U, H)), axis=1)[:, ::-1] * np.minimum(
            c.initial_history_hours, -self.created_at[rows]
        )
        filled = np.arange(H)[None, :] >= (H - lengths)[:, None]  # oldest first, right-aligned
        self.history_ad[filled] = self.ad_id[rows][filled]
        self.history_advertiser[filled] = self.slot_advertiser[rows][filled]
        self.history_category[filled] = self.slot_category[rows][filled]
        self.history_time[filled] = -ages[filled]

    # ------------------------------------------------------------------ public queries
    @property
    def now(self) -> float:
        """Current simulated time, epoch seconds."""
        return self.config.start_time + self._now_hours * 3600.0

    @property
    def now_hours(self) -> float:
        return self._now_hours

    def interest(self, users: np.ndarray, hours: np.ndarray | float) -> np.ndarray:
        """z_u(t) for users (P,) at times (P,) or a scalar: (P, latent_dim)."""
        t = np.broadcast_to(np.asarray(hours, dtype=np.float32), users.shape)
        angle = self.drift_frequency[users] * t[:, None] + self.drift_phase[users]  # (P, J)
        return self.user_base[users] + np.einsum("pj,pjl->pl", np.sin(angle), self.drift_amplitude[users])

    def user_state(self, user_row: int, hours: float | None = None) -> UserState:
        t = self._now_hours if hours is None else float(hours)
        u = int(user_row)
        valid = self.history_ad[u] > 0
        return UserState(
            row=u,
            hours=t,
            segment=int(self.user_segment[u]),
            age_bucket=int(self.user_age_bucket[u]),
            gender=int(self.user_gender[u]),
            region=int(self.user_region[u]),
            interest=self.interest(np.array([u]), t)[0],
            history_ad=self.history_ad[u].copy(),
            history_advertiser=self.history_advertiser[u].copy(),
            history_category=self.history_category[u].copy(),
            history_age_hours=np.where(valid, t - self.history_time[u], 0.0),
            exposure_advertiser=self.exposure_advertiser[u].copy(),
            exposure_age_hours=t - self.exposure_time[u],
        )

    def user_features(self, user_row: int, hours: float | None = None) -> UserFeatures:
        """What a request for this user would carry now (or at `hours`): the same as in its impressions."""
        t = self._now_hours if hours is None else float(hours)
        payload = self._user_payloads(np.array([int(user_row)]), np.array([t]))[0]
        return UserFeatures.model_validate(payload)

    def sample_users(self, n: int) -> np.ndarray:
        """n user rows drawn by activity (as traffic would), from a stream separate from the events."""
        return np.searchsorted(self._user_cdf, self._eval_rng.random(n) * self._user_cdf[-1], side="right").clip(
            0, self.config.num_users - 1
        )

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.live)

    def live_ads(self) -> LiveAds:
        rows = self.live_rows()
        return LiveAds(rows=rows, ad_ids=self.ad_id[rows].copy(), items=self.item_batch(rows))

    def item_batch(self, rows: np.ndarray) -> ItemBatch:
        """Slot rows as an ItemBatch, equal to items_to_batch over those ads' ItemFeatures."""
        return ItemBatch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense[rows])),
            sparse={
                "item_id": torch.from_numpy(self.ad_id[rows].astype(np.int64)),
                "advertiser": torch.from_numpy(self.slot_advertiser[rows].astype(np.int64) + 1),
                "campaign": torch.from_numpy(self.slot_campaign[rows].astype(np.int64) + 1),
                "category": torch.from_numpy(self.slot_category[rows].astype(np.int64) + 1),
            },
        )

    def item_features(self, row: int) -> ItemFeatures:
        return ItemFeatures.model_validate(self._item_payloads(np.array([int(row)]))[0])

    def live_catalogue(self) -> dict[int, ItemFeatures]:
        """ad id -> ItemFeatures of every live ad (for impressions_to_batch; Python objects, so small worlds)."""
        rows = self.live_rows()
        return {
            int(a): ItemFeatures.model_validate(p)
            for a, p in zip(self.ad_id[rows], self._item_payloads(rows), strict=True)
        }

    def row_of_ad(self, ad_ids: np.ndarray) -> np.ndarray:
        """Slot rows of live ad ids (-1 where the ad is not live)."""
        rows = self.live_rows()
        ids = self.ad_id[rows]
        order = np.argsort(ids)
        pos = np.searchsorted(ids[order], ad_ids).clip(0, max(len(ids) - 1, 0))
        found = len(ids) > 0
        hit = found & (ids[order][pos] == ad_ids) if found else np.zeros(len(ad_ids), dtype=bool)
        return np.where(hit, rows[order][pos], -1)

    # ------------------------------------------------------------------ hidden ground truth
    def true_click_logit(self, state: UserState, ad_rows: np.ndarray) -> np.ndarray:
        """Hidden click logit of one user against many ads (slot rows), float32.

        Everything that depends on the ad only through its advertiser or category is folded into one
        per-advertiser and one per-category table first, so the per-ad work is two gathers, a small
        matrix-vector product and a tanh. Over most of the slots it is computed for every slot and
        gathered once at the end (cheaper than gathering each input).
        """
        c, m = self.config, self.config.click_model
        rows = np.asarray(ad_rows, dtype=np.int64)
        valid = state.history_ad > 0
        adv_score = np.zeros(c.num_advertisers)
        np.add.at(
            adv_score,
            state.history_advertiser[valid],
            np.exp(-state.history_age_hours[valid] / m.advertiser_recency_hours),
        )
        cat_score = np.zeros(c.num_categories)
        np.add.at(
            cat_score, state.history_category[valid], np.exp(-state.history_age_hours[valid] / m.category_recency_hours)
        )
        shown = state.exposure_advertiser >= 0
        fatigue = np.zeros(c.num_advertisers)
        np.add.at(fatigue, state.exposure_advertiser[shown], np.exp(-state.exposure_age_hours[shown] / m.fatigue_hours))
        home = self.advertiser_region
        per_advertiser = (
            m.advertiser_affinity_weight * (1 - np.exp(-adv_score))
            - m.fatigue_weight * fatigue
            + np.where(home < 0, 0.0, np.where(home == state.region, m.region_weight, -m.region_weight))
        ).astype(np.float32)
        per_category = (
            m.base_logit
            + self.segment_category[state.segment]
            + self.gender_category[state.gender]
            + m.category_affinity_weight * (1 - np.exp(-cat_score))
        ).astype(np.float32)
        z = state.interest.astype(np.float32) / np.float32(math.sqrt(c.latent_dim))
        whole = len(rows) > c.num_ads // 4
        take = slice(None) if whole else rows
        logit = self.latent[take] @ z
        np.tanh(logit, out=logit)
        logit *= np.float32(m.interest_weight)
        logit += per_category[self.slot_category[take]]
        logit += per_advertiser[self.slot_advertiser[take]]
        logit += self.quality[take]
        return logit[rows] if whole else logit

    def true_click_probability(self, state: UserState, ad_rows: np.ndarray) -> np.ndarray:
        """P(click | user state, ad) for every slot row in `ad_rows` (vectorised; ~10^6 ads in well under 1 s)."""
        return _sigmoid(self.true_click_logit(state, ad_rows))

    def true_conversion_probability(self, state: UserState, ad_rows: np.ndarray) -> np.ndarray:
        """P(conversion | click, user state, ad)."""
        m = self.config.click_model
        rows = np.asarray(ad_rows, dtype=np.int64)
        valid = state.history_ad > 0
        adv_score = np.zeros(self.config.num_advertisers)
        np.add.at(
            adv_score,
            state.history_advertiser[valid],
            np.exp(-state.history_age_hours[valid] / m.advertiser_recency_hours),
        )
        logit = (
            m.conversion_base_logit
            + self.campaign_conversion[self.slot_campaign[rows]]
            + self.age_category_conversion[state.age_bucket, self.slot_category[rows]]
            + m.conversion_returning_weight * (1 - np.exp(-adv_score[self.slot_advertiser[rows]]))
        )
        return _sigmoid(logit)

    def true_top_k(self, user_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ad ids and true click probabilities of the user's k best live ads now, best first."""
        rows = self.live_rows()
        prob = self.true_click_probability(self.user_state(user_row), rows)
        k = min(k, len(rows))
        top = np.argpartition(-prob, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        top = top[np.argsort(-prob[top], kind="stable")]
        return self.ad_id[rows[top]], prob[top]

    def _pair_logits(self, users: np.ndarray, rows: np.ndarray, hours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Click and conversion logits for P (user, slot, time) pairs; same formula as true_click_logit."""
        c, m = self.config, self.config.click_model
        adv, cat, camp = self.slot_advertiser[rows], self.slot_category[rows], self.slot_campaign[rows]
        valid = self.history_ad[users] > 0
        age = hours[:, None] - self.history_time[users]
        adv_score = ((self.history_advertiser[users] == adv[:, None]) & valid) * np.exp(
            -age / m.advertiser_recency_hours
        )
        adv_affinity = 1 - np.exp(-adv_score.sum(axis=1))
        cat_score = ((self.history_category[users] == cat[:, None]) & valid) * np.exp(-age / m.category_recency_hours)
        exposure_age = hours[:, None] - self.exposure_time[users]
        fatigue = ((self.exposure_advertiser[users] == adv[:, None]) * np.exp(-exposure_age / m.fatigue_hours)).sum(1)
        home = self.advertiser_region[adv]
        interest = np.einsum("pl,pl->p", self.latent[rows], self.interest(users, hours)) / math.sqrt(c.latent_dim)
        click = (
            m.base_logit
            + self.segment_category[self.user_segment[users], cat]
            + self.gender_category[self.user_gender[users], cat]
            + m.interest_weight * np.tanh(interest)
            + m.advertiser_affinity_weight * adv_affinity
            + m.category_affinity_weight * (1 - np.exp(-cat_score.sum(axis=1)))
            - m.fatigue_weight * fatigue
            + np.where(home < 0, 0.0, np.where(home == self.user_region[users], m.region_weight, -m.region_weight))
            + self.quality[rows]
        )
        conversion = (
            m.conversion_base_logit
            + self.campaign_conversion[camp]
            + self.age_category_conversion[self.user_age_bucket[users], cat]
            + m.conversion_returning_weight * adv_affinity
        )
        return click, conversion

    # ------------------------------------------------------------------ events
    def _item_payloads(self, rows: np.ndarray) -> list[dict]:
        dense = self.dense[rows].astype(np.float64).round(4).tolist()
        adv = (self.slot_advertiser[rows] + 1).tolist()
        camp = (self.slot_campaign[rows] + 1).tolist()
        cat = (self.slot_category[rows] + 1).tolist()
        return [
            {"dense": d, "sparse": {"advertiser": a, "campaign": m, "category": k}}
            for d, a, m, k in zip(dense, adv, camp, cat, strict=True)
        ]

    def _item_events(self, op: str, rows: np.ndarray, hours: np.ndarray) -> list[ItemEvent]:
        times = (self.config.start_time + np.asarray(hours, dtype=np.float64) * 3600.0).round(3).tolist()
        ids, seqs = self.ad_id[rows].tolist(), self.sequence[rows].tolist()
        if op == "expire":
            return [
                ItemEvent(op="expire", ad_id=a, event_time=t, sequence=s)
                for a, t, s in zip(ids, times, seqs, strict=True)
            ]
        payloads = self._item_payloads(rows)
        return [
            ItemEvent.model_validate({"op": op, "ad_id": a, "event_time": t, "sequence": s, "features": f})
            for a, t, s, f in zip(ids, times, seqs, payloads, strict=True)
        ]

    def iter_initial_item_events(self, chunk_size: int = 10_000) -> Iterator[list[ItemEvent]]:
        """Creates for the initial catalogue, lazily in chunks (10^6 ads never exist as objects all at once).

        Only valid before the first `step` (the catalogue changes afterwards).
        """
        rows = np.flatnonzero(self.live)
        for start in range(0, len(rows), chunk_size):
            part = rows[start : start + chunk_size]
            yield self._item_events("create", part, self.created_at[part])

    def initial_item_events(self) -> list[ItemEvent]:
        """A create for every initially live ad (event_time = its creation, in the past)."""
        return [event for chunk in self.iter_initial_item_events() for event in chunk]

    def step(self, n_impressions: int) -> tuple[list[ImpressionEvent], list[ItemEvent]]:
        """Advance time until n impressions happened; returns them and the item events of the ticks entered.

        Item events come sorted by event_time and never after an impression that needs them: an ad's create
        is returned no later than (in this call or an earlier one) the first impression showing it.
        """
        impressions: list[ImpressionEvent] = []
        items: list[ItemEvent] = []
        while len(impressions) < n_impressions:
            if not self._buffer:
                items += self._advance_tick()
                self._buffer = self._tick_impressions()
                self._buffer.reverse()  # pop() from the end = earliest first
                continue
            take = min(n_impressions - len(impressions), len(self._buffer))
            for _ in range(take):
                impressions.append(self._buffer.pop())
        if impressions:
            self._now_hours = max(self._now_hours, (impressions[-1].event_time - self.config.start_time) / 3600.0)
        return impressions, items

    def _advance_tick(self) -> list[ItemEvent]:
        """Enter the next tick: apply the expires, creates and updates due at its start boundary."""
        self._tick += 1
        t = self._tick * self._tick_hours
        self._now_hours = t
        if t > self._due_until:  # slots with an event in the next 64 ticks (one O(slots) scan per window)
            self._due_until = t + 64 * self._tick_hours
            next_event = np.where(self.live, np.minimum(self.expires_at, self.next_update), self.refill_at)
            self._due = np.flatnonzero(next_event <= self._due_until)
        due = self._due
        live = self.live[due]
        expire = due[live & (self.expires_at[due] <= t)]
        update = due[live & (self.expires_at[due] > t) & (self.next_update[due] <= t)]
        create = due[~live & (self.refill_at[due] <= t)]
        rng, c = self._rng, self.config
        events: list[ItemEvent] = []
        if len(expire):
            self.sequence[expire] += 1
            self.live[expire] = False
            self.refill_at[expire] = t + rng.exponential(c.mean_refill_hours, len(expire))
            events += self._item_events("expire", expire, np.full(len(expire), t))
        if len(update):
            self.sequence[update] += 1
            self._refresh_creatives(rng, update)
            self.next_update[update] = self._draw_update(rng, np.full(len(update), t))
            events += self._item_events("update", update, np.full(len(update), t))
        if len(create):
            self.ad_id[create] = np.arange(self._next_ad_id, self._next_ad_id + len(create))
            self._next_ad_id += len(create)
            self.sequence[create] = 1
            self.live[create] = True
            self.created_at[create] = t
            self.expires_at[create] = t + rng.exponential(c.mean_ad_lifespan_hours, len(create))
            self.refill_at[create] = np.inf
            self.next_update[create] = self._draw_update(rng, np.full(len(create), t))
            self._new_creatives(rng, create)
            events += self._item_events("create", create, np.full(len(create), t))
        return events

    def _sample_live(
        self, rng: np.random.Generator, n: int, lo: np.ndarray | None = None, hi: np.ndarray | None = None
    ):
        """n live slot rows, uniform within [lo, hi) slot ranges (default: everything); -1 where none was found."""
        S = self.config.num_ads
        lo = np.zeros(n, dtype=np.int64) if lo is None else lo
        hi = np.full(n, S, dtype=np.int64) if hi is None else hi
        out = np.full(n, -1, dtype=np.int64)
        todo = np.flatnonzero(hi > lo)
        for _ in range(8):  # rejection sampling: ~97% of slots are live in steady state
            if not len(todo):
                break
            pick = lo[todo] + (rng.random(len(todo)) * (hi[todo] - lo[todo])).astype(np.int64)
            ok = self.live[pick]
            out[todo[ok]] = pick[ok]
            todo = todo[~ok]
        return out

    def _choose_ads(self, rng: np.random.Generator, users: np.ndarray, hours: np.ndarray) -> np.ndarray:
        """The logging policy: which live slot each impression shows."""
        p, n = self.config.policy, len(users)
        branch = np.searchsorted(
            np.cumsum([p.uniform, p.popularity, p.retarget]), rng.random(n), side="right"
        )  # 0 uniform, 1 popular, 2 retarget, 3 affinity
        rows = self._sample_live(rng, n)
        popular = np.flatnonzero(branch == _POLICY_POPULAR)
        if len(popular):
            cdf = np.cumsum(self.advertiser_budget)
            adv = np.searchsorted(cdf, rng.random(len(popular)) * cdf[-1], side="right").clip(0, len(cdf) - 1)
            got = self._sample_live(rng, len(popular), self.advertiser_start[adv], self.advertiser_start[adv + 1])
            rows[popular] = np.where(got >= 0, got, rows[popular])
        retarget = np.flatnonzero(branch == _POLICY_RETARGET)
        if len(retarget):
            H = self.config.history_length
            slot = rng.integers(0, H, len(retarget))
            has = self.history_ad[users[retarget], slot] > 0
            adv = self.history_advertiser[users[retarget], slot]
            got = self._sample_live(rng, len(retarget), self.advertiser_start[adv], self.advertiser_start[adv + 1])
            rows[retarget] = np.where(has & (got >= 0), got, rows[retarget])
        affinity = np.flatnonzero(branch == _POLICY_AFFINITY)
        if len(affinity):
            C = p.candidates
            cand = self._sample_live(rng, len(affinity) * C)
            cand = np.where(cand >= 0, cand, np.repeat(rows[affinity], C))
            logit, _ = self._pair_logits(np.repeat(users[affinity], C), cand, np.repeat(hours[affinity], C))
            score = logit + p.noise * rng.gumbel(size=len(cand))
            best = score.reshape(-1, C).argmax(axis=1)
            rows[affinity] = cand.reshape(-1, C)[np.arange(len(affinity)), best]
        missing = rows < 0  # only possible when nearly nothing is live
        if missing.any():
            live = self.live_rows()
            if not len(live):
                raise RuntimeError("no live ads to show")
            rows[missing] = live[rng.integers(0, len(live), int(missing.sum()))]
        return rows

    def _tick_impressions(self) -> list[ImpressionEvent]:
        c, rng = self.config, self._rng
        n = int(rng.poisson(c.impressions_per_hour * self._tick_hours))
        if n == 0 or not self.live.any():
            return []
        start = self._tick * self._tick_hours
        hours = start + np.sort(rng.random(n)) * self._tick_hours
        hours = np.minimum(hours, np.nextafter(start + self._tick_hours, -np.inf))
        users = np.searchsorted(self._user_cdf, rng.random(n) * self._user_cdf[-1], side="right").clip(
            0, c.num_users - 1
        )
        rows = self._choose_ads(rng, users, hours)
        click_logit, conversion_logit = self._pair_logits(users, rows, hours)
        click = rng.random(n) < _sigmoid(click_logit)
        conversion = click & (rng.random(n) < _sigmoid(conversion_logit))
        payloads = self._user_payloads(users, hours)
        # millisecond times, kept inside the tick after rounding: [its start boundary, its end boundary)
        lo = round(c.start_time + start * 3600.0, 3)
        hi = round(c.start_time + (start + self._tick_hours) * 3600.0, 3) - 0.001
        times = np.clip((c.start_time + hours * 3600.0).round(3), lo, hi).tolist()
        ids = self.ad_id[rows].tolist()
        events = []
        for i in range(n):
            self._impression_counter += 1
            events.append(
                ImpressionEvent.model_validate(
                    {
                        "event_id": f"sim{c.seed}-{self._impression_counter:010d}",
                        "event_time": times[i],
                        "user": payloads[i],
                        "ad_id": ids[i],
                        "labels": {"click": int(click[i]), "conversion": int(conversion[i])},
                    }
                )
            )
        self._record(users, rows, hours, click)
        return events

    def _record(self, users: np.ndarray, rows: np.ndarray, hours: np.ndarray, click: np.ndarray) -> None:
        """Exposures (every impression) and engagements (clicks) enter the users' memories, in time order."""
        for u, r, t in zip(users.tolist(), rows.tolist(), hours.tolist(), strict=True):
            self.exposure_advertiser[u, :-1] = self.exposure_advertiser[u, 1:]
            self.exposure_time[u, :-1] = self.exposure_time[u, 1:]
            self.exposure_advertiser[u, -1] = self.slot_advertiser[r]
            self.exposure_time[u, -1] = t
        for i in np.flatnonzero(click).tolist():
            u, r = int(users[i]), int(rows[i])
            for array in (self.history_ad, self.history_advertiser, self.history_category, self.history_time):
                array[u, :-1] = array[u, 1:]
            self.history_ad[u, -1] = self.ad_id[r]
            self.history_advertiser[u, -1] = self.slot_advertiser[r]
            self.history_category[u, -1] = self.slot_category[r]
            self.history_time[u, -1] = hours[i]

    def _user_payloads(self, users: np.ndarray, hours: np.ndarray) -> list[dict]:
        c = self.config
        z = self.interest(users, hours)
        dense = (z @ self.user_projection.T / math.sqrt(c.latent_dim) + self.user_noise[users]).astype(np.float64)
        dense_lists = dense.round(4).tolist()
        seg, age = (self.user_segment[users] + 1).tolist(), (self.user_age_bucket[users] + 1).tolist()
        gender, region = (self.user_gender[users] + 1).tolist(), (self.user_region[users] + 1).tolist()
        hist_ad = self.history_ad[users].tolist()
        hist_adv = (self.history_advertiser[users] + 1).tolist()
        hist_cat = (self.history_category[users] + 1).tolist()
        hist_age = np.maximum(hours[:, None] - self.history_time[users], 0.0).round(3).tolist()
        out = []
        for i in range(len(users)):
            history = [
                {"attributes": {"item_id": a, "advertiser": v, "category": k}, "age_hours": g}
                for a, v, k, g in zip(hist_ad[i], hist_adv[i], hist_cat[i], hist_age[i], strict=True)
                if a > 0
            ]
            out.append(
                {
                    "dense": dense_lists[i],
                    "sparse": {
                        "segment": [seg[i]],
                        "age_bucket": [age[i]],
                        "gender": [gender[i]],
                        "region": [region[i]],
                    },
                    "history": history,
                }
            )
        return out

    def nbytes(self) -> int:
        """Bytes held in the marketplace's numpy arrays (slots, users, tables)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.negative(x)
    np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)
    return out


__all__ = [
    "ClickModelConfig",
    "LiveAds",
    "LoggingPolicyConfig",
    "Marketplace",
    "MarketplaceConfig",
    "UserState",
    "feature_schema",
]


# --------------------------------------------------------------------------------------------
# Sizing
# --------------------------------------------------------------------------------------------


def scaled_config(ads: int, users: int, seed: int) -> MarketplaceConfig:
    """The CLI's (and benchmark's) sizing rule: ~200 ads per advertiser, categories grow slowly."""
    return MarketplaceConfig(
        seed=seed,
        num_ads=ads,
        num_advertisers=max(20, ads // 200),
        num_categories=int(min(512, max(32, 8 * round(math.sqrt(ads) / 8)))),
        num_users=users,
    )
