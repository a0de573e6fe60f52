"""E7: schemathesis (`--checks all`) against the live API, and a poisoned request inside a full micro-batch.

The API runs under uvicorn on a loopback port, serving a planted catalogue and forwarding item
events to a real Kafka topic. Schemathesis derives requests from the published OpenAPI (valid
and invalid ones) and runs every check; a status counter wrapped around the app counts what the
server really answered. Pass: no 5xx other than the documented deadline 504 (a client asking for
a 2 ms deadline), no timeouts, no check failures, and 31 of 32 concurrent requests answered 200
beside one poisoned request.

Two documented allowances, set in the generated schemathesis config: POST /retrieve may answer
422 to schema-valid data (the dense width and feature names belong to the served model, which
the static schema cannot know), and 504 (the request's own deadline passed).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from chaos.report import ExperimentResult
from chaos.world import BEAMS, live_api, planted_world, request_bodies, tiny_model, wait_until
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from streaming.snapshots import SnapshotStore

TOKEN = "chaos-e7-token"
CASES_PER_MAX_EXAMPLE = 4  # cases schemathesis generates per unit of --max-examples over this API (measured)
CONFIG = """
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx"]

[[operations]]
include-path = "/retrieve"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429", "504"]
"""


async def poisoned_batch(url: str, body: dict) -> dict[str, int]:
    """31 valid requests and one with an id past int64, sent at once over HTTP."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        requests = [client.post("/retrieve", json=body) for _ in range(31)]
        requests.insert(13, client.post("/retrieve", json={**body, "exclude_ad_ids": [10**30]}))
        responses = await asyncio.gather(*requests)
    codes = [r.status_code for r in responses]
    poisoned = codes.pop(13)
    return {"valid_200": sum(c == 200 for c in codes), "valid": len(codes), "poisoned_status": poisoned}


def schemathesis(url: str, cases: int, workdir: Path, timeout_s: float, seed: int) -> tuple[int, str]:
    """Run the schemathesis CLI once; returns (exit code, its output)."""
    (workdir / "schemathesis.toml").write_text(CONFIG)
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(max(1, round(cases / CASES_PER_MAX_EXAMPLE))),
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--request-timeout",
        "5",
        "--seed",
        str(seed),
        "--no-color",
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout_s)
    return done.returncode, done.stdout + done.stderr


def run_e7(kafka_bootstrap: str, items_topic: str, cases: int = 200, timeout_s: float = 900) -> ExperimentResult:
    """`kafka_bootstrap`/`items_topic`: a live broker and an existing topic for POST /items/events."""
    started = time.monotonic()
    command = "python -m chaos e7" + ("" if cases == 200 else f" --cases {cases}")
    result = ExperimentResult("e7", f"schemathesis --checks all, ~{cases} cases, live API", command)
    world = planted_world()
    body = request_bodies(world, 1)[0]
    with tempfile.TemporaryDirectory(prefix="chaos-e7-") as tmp:
        store = SnapshotStore(Path(tmp) / "store")
        store.promote(store.write(tiny_model(0)).version)
        settings = ApiSettings(
            beams=BEAMS,
            store_dir=str(store.root),
            catalog=f"planted:{world.item_ids.numel()}:5",
            items_token=TOKEN,
            kafka_bootstrap_servers=kafka_bootstrap,
            items_topic=items_topic,
        )
        with live_api(create_app(settings)) as (url, counter):

            async def ready() -> bool:
                async with httpx.AsyncClient(base_url=url) as client:
                    return (await client.get("/readyz")).status_code == 200

            asyncio.run(wait_until(ready, 60, "the API serving snapshot 1"))
            counter.statuses.clear()  # the 503s of /readyz before the first load are not the experiment's
            batch = asyncio.run(poisoned_batch(url, body))
            # Runs with new seeds until `cases` were generated (how many one run makes is not linear).
            codes, outputs, generated = [], [], 0
            deadline = time.monotonic() + timeout_s
            while generated < cases and time.monotonic() < deadline and len(codes) < 10:
                code, output = schemathesis(
                    url, cases - generated, Path(tmp), deadline - time.monotonic(), 7 + len(codes)
                )
                found = re.search(r"(\d+) generated", output)
                if found is None:
                    break
                codes.append(code)
                outputs.append(output)
                generated += int(found.group(1))
            statuses = dict(counter.statuses)
    code = max(codes, default=1)
    output = "\n".join(outputs)
    failures = re.findall(r"❌ (ST\d+ [^:\n]+): (\d+)", output)
    result.runs = len(codes)
    result.faults_injected = generated
    result.http_5xx = sum(n for status, n in statuses.items() if status >= 500 and status != 504)
    result.timeouts = len(re.findall(r"timed out|ReadTimeout|Timeout error", output, re.IGNORECASE))
    result.checks = {
        "schemathesis_exit_code": code,
        "cases_generated": result.faults_injected,
        "check_failures": {name: sum(int(n) for other, n in failures if other == name) for name, _ in failures},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "deadline_504": statuses.get(504, 0),
        "poisoned_batch": batch,
        "summary": output[output.rfind("SUMMARY") :][:1500] if "SUMMARY" in output else output[-1500:],
        "failures": output[output.find("FAILURES") : output.rfind("SUMMARY")][:6000] if "FAILURES" in output else "",
    }
    passed = (
        code == 0
        and result.http_5xx == 0
        and result.timeouts == 0
        and result.faults_injected > 0
        and batch == {"valid_200": 31, "valid": 31, "poisoned_status": 422}
    )
    return result.finish(passed, started)
