"""What the demo looks at while it runs: metrics pages, the snapshot store, the Redis index and the API.

Stdlib HTTP only (urllib), so the demo needs nothing beyond the services' own dependencies.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from streaming import index_store
from streaming.events import ItemEvent
from streaming.snapshots import SnapshotStore


def http_json(
    url: str, body: Any = None, token: str | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, Any] | None]:
    """(status, parsed JSON or None); status 0 when the server cannot be reached."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"null")
        except ValueError:
            return err.code, None
    except (OSError, ValueError):
        return 0, None


def scrape(url: str, timeout: float = 3.0) -> dict[str, float]:
    """A Prometheus text page as {sample name + sorted labels: value}; empty if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


@dataclass
class StoreView:
    latest: int | None = None
    latest_created_at: float | None = None
    latest_ne: float | None = None
    trained_total: float | None = None  # events trained over the lineage, from the newest manifest
    promoted: int | None = None


def store_view(store: SnapshotStore) -> StoreView:
    view = StoreView()
    try:
        versions = store.versions()
        if versions:
            manifest = store.manifest(versions[-1])
            view.latest, view.latest_created_at = manifest.version, manifest.created_at
            view.latest_ne = manifest.eval_metrics.get("ne")
            view.trained_total = manifest.eval_metrics.get("trained_events_total")
        pointer = store.promoted()
        view.promoted = pointer.version if pointer else None
    except (OSError, ValueError):  # a version being pruned under us: next tick
        pass
    return view


@dataclass
class IndexInfo:
    version: int | None = None
    model_version: int | None = None
    created_at: float | None = None
    num_live: int | None = None
    delta: int = 0


def redis_index(redis: Any, prefix: str) -> IndexInfo:
    info = IndexInfo()
    try:
        info.version = index_store.current_version(redis, prefix)
        if info.version is not None:
            meta = index_store.read_meta(redis, info.version, prefix)
            info.model_version = int(meta["model_version"])
            info.created_at = float(meta["created_at"])
            info.num_live = meta.get("num_live")
            info.delta = index_store.delta_length(redis, info.version, prefix)
    except Exception:  # Redis restarting or a version being collected: next tick
        pass
    return info


# ------------------------------------------------------------------------------------------- recall


@dataclass
class RecallResult:
    k: int
    users: int
    recall: float
    random_baseline: float
    model_version: int
    index_version: int
    at: float = field(default_factory=time.time)


def measure_recall(api: str, traffic: Any, k: int, users: int) -> RecallResult | None:
    """Recall@k of the API's answers against the simulator's true top-k, over `users` sampled users.

    The requests carry what each user's impression would carry now, and the truth is the hidden click
    model ranked over every live ad at the same simulated moment.
    """
    with traffic.lock:
        market = traffic.market
        rows = [int(r) for r in market.sample_users(users)]
        bodies = [{"user": market.user_features(r).model_dump(mode="json"), "k": k} for r in rows]
        truths = [set(market.true_top_k(r, k)[0].tolist()) for r in rows]
        live = int(market.live.sum())
    hits, asked, versions = [], 0, None
    for body, truth in zip(bodies, truths, strict=True):
        status, answer = http_json(f"{api}/retrieve", body, timeout=30)
        if status != 200 or answer is None:
            continue
        got = {ad["ad_id"] for ad in answer["ads"]}
        hits.append(len(got & truth) / max(1, len(truth)))
        asked += 1
        versions = (answer["model_version"], answer["index_version"])
    if not asked or versions is None:
        return None
    return RecallResult(
        k=k,
        users=asked,
        recall=float(np.mean(hits)),
        random_baseline=min(1.0, k / max(1, live)),
        model_version=versions[0],
        index_version=versions[1],
    )


# ------------------------------------------------------------------------------ create -> retrievable


@dataclass
class CreateCheck:
    ad_id: int
    created_at: float | None = None  # when /items/events answered 202
    seen_after_s: float | None = None
    seen_in: tuple[int, int] | None = None  # (model, index) version that returned it
    error: str | None = None
    rounds: int = 0


def post_create(api: str, token: str, template: ItemEvent, ad_id: int) -> CreateCheck:
    """Create a new ad (a copy of a real ad's features under a new id) through POST /items/events."""
    check = CreateCheck(ad_id=ad_id)
    event = ItemEvent(op="create", ad_id=ad_id, event_time=time.time(), sequence=1, features=template.features)
    status, body = http_json(f"{api}/items/events", {"events": [event.model_dump(mode="json")]}, token=token)
    if status != 202:
        check.error = f"POST /items/events answered {status}: {body}"
    else:
        check.created_at = time.time()
    return check


def find_ad(api: str, traffic: Any, check: CreateCheck, max_rounds: int = 8) -> bool:
    """Is the ad retrievable now? Asks for 1000 ads at a time, excluding what earlier rounds returned.

    With beams that cover the whole index the search is exhaustive, so the rounds list every live ad.
    """
    with traffic.lock:
        row = int(traffic.market.sample_users(1)[0])
        user = traffic.market.user_features(row).model_dump(mode="json")
    excluded: list[int] = []
    for _ in range(max_rounds):
        check.rounds += 1
        status, answer = http_json(f"{api}/retrieve", {"user": user, "k": 1000, "exclude_ad_ids": excluded}, timeout=30)
        if status != 200 or answer is None:
            return False
        ids = [ad["ad_id"] for ad in answer["ads"]]
        if check.ad_id in ids:
            check.seen_after_s = time.time() - (check.created_at or time.time())
            check.seen_in = (answer["model_version"], answer["index_version"])
            return True
        if len(ids) < 1000 or len(excluded) + len(ids) > 10_000:
            return False
        excluded += ids
    return False
