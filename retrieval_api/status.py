"""`GET /status` (a small self-contained HTML page) and `GET /status.json`: what this replica serves, at a glance.

The page shows the served model version and how old its snapshot is, the served index version and its age,
the version the snapshot store has promoted (when the replica follows a store), whether the replica is
ready, and request counts and latency from the API's own Prometheus registry. It has no external assets:
inline CSS, and a few lines of inline script that fetch `/status.json` every few seconds and redraw. The
first render is done on the server, so the page reads correctly without script too.

It reads what the app serves with: its `ServingState`, its metrics, its snapshot store and its `IndexSource`
(through `retrieval_api.dependencies`); `create_app` includes `router`.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from retrieval_api.dependencies import Metrics, Serving, Source, Store
from retrieval_api.metrics import ApiMetrics
from retrieval_api.state import CatalogIndexSource, IndexSource, ServingState
from streaming.snapshots import SnapshotStore

log = logging.getLogger("hsnn.retrieval_api")

REFRESH_MS = 3000
LATENCY_METRIC = "hsnn_api_request_latency_seconds"


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus-style quantile from cumulative (upper bound, count) buckets, linear inside a bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # in the overflow bucket: the largest finite bound is the best we know
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def request_stats(registry: Any) -> dict[str, Any]:
    """Counts by outcome, total, and latency p50/p99 (seconds) over all outcomes of POST /retrieve."""
    counts: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in registry.collect():
        if family.name != LATENCY_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
            elif sample.name.endswith("_bucket"):
                upper = float(sample.labels["le"])
                buckets[upper] = buckets.get(upper, 0.0) + sample.value
    pairs = list(buckets.items())
    return {
        "requests": int(sum(counts.values())),
        "by_outcome": {name: int(value) for name, value in sorted(counts.items())},
        "latency_p50_s": histogram_quantile(0.5, pairs),
        "latency_p99_s": histogram_quantile(0.99, pairs),
    }


def _age(now: float, then: float | None) -> float | None:
    return None if not then else max(0.0, now - then)


def snapshot(state: ServingState, metrics: ApiMetrics, store: SnapshotStore | None, source: IndexSource | None) -> dict:
    """Everything /status.json reports, read now (Redis and the store may be read: run it in a worker thread)."""
    now = time.time()
    pair = state.current()
    served: dict[str, Any] = {"ready": pair is not None}
    if pair is not None:
        served |= {
            "model_version": pair.model_version,
            "index_version": pair.index_version,
            "snapshot_created_at": pair.snapshot_created_at,
            "snapshot_age_s": _age(now, pair.snapshot_created_at),
            "loaded_at": pair.loaded_at,
            "loaded_age_s": _age(now, pair.loaded_at),
            "num_items": int(pair.index.num_items),
        }
    index: dict[str, Any] = {"source": source.kind if source is not None else CatalogIndexSource.kind}
    if source is not None:
        try:
            facts = source.describe(pair.index_version if pair is not None else None)
            served["index_created_at"] = facts.pop("served_created_at", None)
            index |= facts
            if "created_at" in facts:
                index["age_s"] = _age(now, facts["created_at"])
        except Exception as exc:  # Redis away: the page still renders what the replica knows
            index["error"] = f"{type(exc).__name__}: {exc}"
    if pair is not None:  # an index built in process is as old as the pair
        served["index_age_s"] = _age(now, served.get("index_created_at") or pair.loaded_at)
    promoted: dict[str, Any] = {"known": store is not None}
    if store is not None:
        try:
            pointer = store.promoted()
            if pointer is not None:
                promoted |= {"version": pointer.version, "promoted_at": pointer.promoted_at}
        except Exception as exc:
            promoted["error"] = f"{type(exc).__name__}: {exc}"
    return {
        "now": now,
        "served": served,
        "index": index,
        "promoted": promoted,
        "requests": request_stats(metrics.registry),
        "freshness": {  # timestamps of each snapshot swapped in (the histograms' raw data; newest last)
            "watching_since": metrics.watching_since,
            "adoptions": [adoption.as_json() for adoption in list(metrics.adoptions)],
        },
    }


router = APIRouter(tags=["status"])


@router.get("/status.json")
async def status_json(state: Serving, metrics: Metrics, store: Store, source: Source) -> dict[str, Any]:
    """What this replica serves, how old it is, and its request statistics, as JSON."""
    return await asyncio.to_thread(snapshot, state, metrics, store, source)


@router.get("/status", response_class=HTMLResponse)
async def status_page(state: Serving, metrics: Metrics, store: Store, source: Source) -> HTMLResponse:
    """A self-contained HTML status page that refreshes itself from /status.json."""
    return HTMLResponse(render(await asyncio.to_thread(snapshot, state, metrics, store, source)))


# ------------------------------------------------------------------------------------------------ HTML


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _fields(data: dict[str, Any]) -> dict[str, str]:
    """The page's values by element id; the inline script computes the same from /status.json."""
    served, index, promoted, requests = data["served"], data["index"], data["promoted"], data["requests"]
    ready = served["ready"]
    outcomes = ", ".join(f"{k} {v}" for k, v in requests["by_outcome"].items()) or "none yet"
    return {
        "ready": "READY" if ready else "NOT READY",
        "model": str(served.get("model_version", "-")),
        "model_age": fmt_age(served.get("snapshot_age_s")),
        "index": str(served.get("index_version", "-")),
        "index_age": fmt_age(served.get("index_age_s")),
        "items": str(served.get("num_items", "-")),
        "promoted": str(promoted.get("version", "-")) if promoted["known"] else "unknown (no store)",
        "redis_index": f"Redis v{index.get('current_version', '-')}" if index["source"] == "redis" else "in process",
        "requests": str(requests["requests"]),
        "outcomes": outcomes,
        "p50": fmt_ms(requests["latency_p50_s"]),
        "p99": fmt_ms(requests["latency_p99_s"]),
    }


_CARDS = (
    ("model", "Served model", "model_age", "snapshot age"),
    ("index", "Served index", "index_age", "index age"),
    ("promoted", "Promoted in store", "redis_index", "current index"),
    ("requests", "Requests", "outcomes", "by outcome"),
    ("p50", "Latency p50", "p99", "p99"),
    ("items", "Ads in the index", None, None),
)

_STYLE = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:0;background:#f4f6fa;color:#1d2433}
header{background:#1d2433;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:16px}
header h1{font-size:20px;margin:0;font-weight:600}
#ready{padding:4px 12px;border-radius:12px;font-weight:700;font-size:14px}
.ok{background:#2e9e5b;color:#fff}.bad{background:#d64545;color:#fff}
main{display:grid;grid-template-columns:repeat(3,1fr);gap:16px;padding:24px}
.card{background:#fff;border-radius:8px;padding:16px 18px;box-shadow:0 1px 3px rgba(0,0,0,.12);
border-top:4px solid #3b6fd8}
.card h2{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#5a6478;margin:0 0 8px}
.big{font-size:34px;font-weight:700;color:#1d2433}.sub{font-size:13px;color:#5a6478;margin-top:6px}
footer{padding:0 24px 16px;font-size:12px;color:#7a8496}
"""

_SCRIPT = """
function age(s){if(s===null||s===undefined)return"-";if(s<120)return Math.round(s)+" s";
if(s<7200)return(s/60).toFixed(1)+" min";return(s/3600).toFixed(1)+" h";}
function ms(s){return(s===null||s===undefined)?"-":(s*1000).toFixed(1)+" ms";}
function val(v){return(v===null||v===undefined)?"-":String(v);}
function set(id,t){var e=document.getElementById(id);if(e)e.textContent=t;}
async function tick(){
 try{const r=await fetch("/status.json",{cache:"no-store"});const d=await r.json();
  const s=d.served,i=d.index,p=d.promoted,q=d.requests;
  const e=document.getElementById("ready");e.textContent=s.ready?"READY":"NOT READY";
  e.className=s.ready?"ok":"bad";
  set("model",val(s.model_version));set("model_age",age(s.snapshot_age_s));
  set("index",val(s.index_version));set("index_age",age(s.index_age_s));set("items",val(s.num_items));
  set("promoted",p.known?val(p.version):"unknown (no store)");
  set("redis_index",i.source==="redis"?"Redis v"+val(i.current_version):"in process");
  set("requests",String(q.requests));
  const o=Object.entries(q.by_outcome).map(x=>x[0]+" "+x[1]).join(", ");set("outcomes",o||"none yet");
  set("p50",ms(q.latency_p50_s));set("p99",ms(q.latency_p99_s));
  set("updated",new Date(d.now*1000).toLocaleTimeString());
 }catch(err){set("updated","refresh failed: "+err);}
}
setInterval(tick,REFRESH);
"""


def render(data: dict[str, Any]) -> str:
    values = {key: html.escape(value) for key, value in _fields(data).items()}
    cards = []
    for big, title, sub, sub_title in _CARDS:
        line = f'<div class="sub">{sub_title}: <span id="{sub}">{values[sub]}</span></div>' if sub else ""
        body = f'<h2>{title}</h2><div class="big" id="{big}">{values[big]}</div>{line}'
        cards.append(f'<section class="card">{body}</section>')
    ready_class = "ok" if data["served"]["ready"] else "bad"
    updated = time.strftime("%H:%M:%S", time.localtime(data["now"]))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>HSNN retrieval API status</title><style>{_STYLE}</style></head><body>"
        f'<header><h1>HSNN retrieval API</h1><span id="ready" class="{ready_class}">{values["ready"]}</span></header>'
        f"<main>{''.join(cards)}</main>"
        f'<footer>updated <span id="updated">{updated}</span>; refreshes every {REFRESH_MS // 1000} s from '
        '<a href="/status.json">/status.json</a> &middot; <a href="/metrics">/metrics</a></footer>'
        f"<script>const REFRESH={REFRESH_MS};{_SCRIPT}</script></body></html>"
    )
