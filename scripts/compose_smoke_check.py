"""The checks of scripts/compose_smoke.sh against a running compose stack; appends one line per result.

1. The API serves the promoted snapshot with its index, and POST /retrieve answers from it.
2. Prometheus scrapes every HSNN target (trainer, indexer, retrieval_api) and they are up.
3. (first phase) An ad created through POST /items/events is acknowledged, catalogued by the indexer and in the
   served index; whether /retrieve returns it for one of 20 random users is reported, not required.
The restart phase also requires the served model to be no older than before `docker compose down`.
Exit status 1 when a required check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
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


def in_catalogue(ad_id: int) -> bool:
    """The indexer's Redis catalogue holds the ad (asked from inside the indexer container: Redis is internal)."""
    container = subprocess.run(
        [
            "docker",
            "ps",
            "-q",
            "--filter",
            "label=com.docker.compose.project=hsnn-smoke",
            "--filter",
            "label=com.docker.compose.service=indexer",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    probe = (
        "import sys, redis; from streaming.index_store import catalog_entry; "
        "from indexer.settings import IndexerSettings; "
        f"s = IndexerSettings(); sys.exit(0 if catalog_entry(redis.Redis.from_url(s.redis_url), {ad_id}, s.key_prefix) "
        "else 1)"
    )
    return subprocess.run(["docker", "exec", container, "python", "-c", probe], capture_output=True).returncode == 0


def check_item_create(client: RetrievalClient, schema: Any, api: str, report: Any) -> None:
    """POST /items/events, then: catalogued by the indexer, and in the served index (same version grew by
    one, or a newer index built after the create), then returned by /retrieve for some user (best effort)."""
    baseline = status(api)["served"]
    ad_id = 1_900_000_000 + random.randrange(1_000_000)
    features = {
        "dense": [0.5] * schema.item_dense_dim,
        # item_id is the ad id itself (streaming.events): not sent
        "sparse": {name: min(7, size - 1) for name, size in schema.item_sparse.items() if name != "item_id"},
    }
    event = {"schema_version": 1, "op": "create", "ad_id": ad_id, "event_time": time.time(), "sequence": 1}
    accepted = client.send_item_events([event | {"features": features}])
    created = time.monotonic()
    report(accepted.accepted == 1, f"POST /items/events: ad {ad_id} acknowledged by Kafka")

    def served() -> bool:
        now = status(api)["served"]
        if now["index_version"] == baseline["index_version"]:
            return now["num_items"] > baseline["num_items"]
        return now["index_version"] > baseline["index_version"] and in_catalogue(ad_id)

    try:
        wait("the created ad in the served index", lambda: in_catalogue(ad_id) and served(), 600, 2)
        report(True, f"created ad {ad_id} catalogued and in the served index after {time.monotonic() - created:.0f}s")
    except TimeoutError as err:
        report(False, str(err))

    def random_user() -> dict[str, list[float]]:
        return {"dense": [random.gauss(0, 1) for _ in range(schema.user_dense_dim)]}

    found = any(ad_id in {ad.ad_id for ad in client.retrieve(random_user(), k=1000).ads} for _ in range(20))
    outcome = "returned" if found else "not returned"
    report(found, f"created ad {ad_id} {outcome} by /retrieve (k=1000, 20 random users)", required=False)


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

        def serving_promoted() -> dict[str, Any] | None:
            current = status(args.api)
            promoted = current["promoted"].get("version")
            ready = current["served"].get("ready") and promoted is not None
            return current if ready and current["served"]["model_version"] == promoted else None

        ready = wait("the API serving the promoted snapshot with its index", serving_promoted, args.timeout_s)
        promoted = ready["promoted"]["version"]
        report(True, f"API serves promoted snapshot {promoted} after {time.monotonic() - started:.0f}s")
        client = RetrievalClient(args.api, items_token=os.environ.get("HSNN_API_ITEMS_TOKEN"), retry=RetryPolicy())
        schema = client.schema().features
        user = {"dense": [0.0] * schema.user_dense_dim}
        answer = client.retrieve(user, k=10)
        report(
            answer.model_version >= promoted and len(answer.ads) == 10,
            f"/retrieve answered {len(answer.ads)} ads from model {answer.model_version} / index "
            f"{answer.index_version} (promoted {promoted})",
        )
        state = Path(args.summary).with_name(STATE_FILE)
        if args.phase == "restart" and state.exists():
            before = json.loads(state.read_text())["model_version"]
            report(
                answer.model_version >= before,
                f"after down + up: serves model {answer.model_version} (before down: {before}); volumes intact",
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
        if args.phase == "first":
            check_item_create(client, schema, args.api, report)
    except (TimeoutError, httpx.HTTPError, Unavailable, RequestRejected) as err:
        report(False, f"{type(err).__name__}: {err}")
    with args.summary.open("a") as summary:
        summary.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
