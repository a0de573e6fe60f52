"""The checks of scripts/compose_smoke.sh against a running compose stack; appends one line per result.

1. The API answers POST /retrieve from the promoted snapshot (served model version == promoted version).
2. Prometheus scrapes every HSNN target (trainer, indexer, retrieval_api) and they are up.
3. An ad created through POST /items/events becomes part of the served index (index size grows by one and
   the ad is retrievable for some user, or at least indexed: both are reported).
The restart phase also requires the served model to be no older than before `docker compose down`.
Exit status 1 when a required check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from hsnn_client import RequestRejected, RetrievalClient, RetryPolicy, Unavailable

JOBS = ("trainer", "indexer", "retrieval_api")
STATE_FILE = "last_served_model.json"


def wait(what: str, condition: Any, timeout_s: float, every: float = 5.0) -> Any:
    started = time.monotonic()
    while True:
        try:
            value = condition()
        except (httpx.HTTPError, Unavailable, RequestRejected, KeyError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f}s")
        time.sleep(every)


def status(api: str) -> dict[str, Any]:
    return httpx.get(f"{api}/status.json", timeout=10).json()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True)
    parser.add_argument("--api", required=True)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--timeout-s", type=float, default=1200)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args()
    lines: list[str] = []
    failed = False

    def report(ok: bool, text: str, required: bool = True) -> None:
        nonlocal failed
        failed |= required and not ok
        line = f"[{args.phase}] {'ok  ' if ok else ('FAIL' if required else 'warn')} {text}"
        print(line, flush=True)
        lines.append(line)

    started = time.monotonic()
    try:
        ready = wait(
            "the API serving a promoted snapshot",
            lambda: (s := status(args.api))["served"].get("ready") and s,
            args.timeout_s,
        )
        report(True, f"API ready after {time.monotonic() - started:.0f}s")
        client = RetrievalClient(args.api, items_token=os.environ.get("HSNN_API_ITEMS_TOKEN"), retry=RetryPolicy())
        schema = client.schema().features
        user = {"dense": [0.0] * schema.user_dense_dim}
        answer = client.retrieve(user, k=10)
        promoted = ready["promoted"].get("version")
        report(
            answer.model_version == promoted and len(answer.ads) == 10,
            f"/retrieve answered {len(answer.ads)} ads from model {answer.model_version} / index "
            f"{answer.index_version}; promoted snapshot {promoted}",
        )
        state = Path(args.summary).with_name(STATE_FILE)
        if args.phase == "restart" and state.exists():
            before = json.loads(state.read_text())["model_version"]
            report(
                answer.model_version >= before, f"after down/up serves model {answer.model_version} (before: {before})"
            )
        state.write_text(json.dumps({"model_version": answer.model_version}))

        def all_up() -> dict[str, bool] | None:
            targets = httpx.get(f"{args.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            health = {t["labels"]["job"]: t["health"] == "up" for t in targets}
            return health if all(health.get(job) for job in JOBS) else None

        try:
            health = wait("every target up in Prometheus", all_up, 120)
            report(True, f"Prometheus scrapes {', '.join(sorted(health))}: all up")
        except TimeoutError as err:
            report(False, str(err))

        before = status(args.api)["served"]["num_items"]
        ad_id = 1_900_000_000 + random.randrange(1_000_000)
        features = {
            "dense": [0.5] * schema.item_dense_dim,
            "sparse": {name: min(7, cardinality - 1) for name, cardinality in schema.item_sparse.items()},
        }
        features["sparse"]["item_id"] = ad_id % schema.item_sparse.get("item_id", 1)
        event = {"schema_version": 1, "op": "create", "ad_id": ad_id, "event_time": time.time(), "sequence": 1}
        client.send_item_events([event | {"features": features}])
        created = time.monotonic()
        try:
            grown = wait(
                "the created ad in the served index", lambda: status(args.api)["served"]["num_items"] > before, 120, 1
            )
            report(bool(grown), f"created ad {ad_id} indexed and served after {time.monotonic() - created:.1f}s")
        except TimeoutError as err:
            report(False, str(err))
        found = any(
            ad_id
            in {ad.ad_id for ad in client.retrieve({"dense": [random.gauss(0, 1) for _ in user["dense"]]}, k=1000).ads}
            for _ in range(20)
        )
        report(
            found,
            f"created ad {ad_id} {'returned' if found else 'not returned'} by /retrieve (k=1000, 20 users)",
            required=False,
        )
    except (TimeoutError, httpx.HTTPError, Unavailable, RequestRejected) as err:
        report(False, f"{type(err).__name__}: {err}")
    with args.summary.open("a") as summary:
        summary.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
