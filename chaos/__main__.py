"""`python -m chaos <experiment>`: run one fault-injection experiment and record its result.

    python -m chaos e4               # snapshot corruption
    python -m chaos e5               # numeric poison (event and API side)
    python -m chaos e7 --cases 1000  # schemathesis against the live API (starts Kafka from devservers)
    python -m chaos e10              # runbook rollback, then an expire (starts Kafka and Redis)
    python -m chaos fast             # e4, e5, e7 (~200 cases) and e10
    python -m chaos e1 | e3 | e6     # trainer SIGKILLs, Redis kill -9 / FLUSHALL, 900 KB records (--help: sizes)
    python -m chaos e2 | e9          # broker SIGKILLs under item posts, Kafka down under item posts + /retrieve
    python -m chaos e2-trainer       # broker SIGKILLs while the trainer consumes, during E1
    python -m chaos e8               # 200 MB bodies, 1,000 slowloris sockets, 1,000 concurrent clients
    python -m chaos soak --minutes 10  # 80% of max /retrieve QPS with feed, trainer and indexer running

Results go to reports/reliability.json (merged by experiment) and the table in docs/reliability.md.
Exit status 1 when an experiment fails its pass condition.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from chaos.report import DOCS_PATH, REPORT_PATH, ExperimentResult, finish, record

EXPERIMENTS = ("e4", "e5", "e7", "e10")
# The streaming-loop experiments take their own options (`python -m chaos e1 --help`) and start their own servers.
LOOP_EXPERIMENTS = {
    "e1": "chaos.e1_trainer_kills",
    "e2": "chaos.e2_broker_kills",
    "e3": "chaos.e3_redis_faults",
    "e6": "chaos.e6_large_records",
    "e8": "chaos.e8_hostile_clients",
    "e9": "chaos.e9_kafka_down",
    "soak": "chaos.soak",
    "e2-trainer": "chaos.e1_trainer_kills",  # E2's broker kills during E1's feed, recorded under its own key
}


@contextlib.contextmanager
def servers(need_kafka: bool, need_redis: bool) -> Iterator[tuple[object | None, object | None]]:
    """Kafka and Redis from devservers (installed by scripts/setup.sh), for as long as the experiment runs."""
    from devservers import KafkaServer, RedisServer

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-servers-")))
        kafka = stack.enter_context(KafkaServer(tmp / "kafka")) if need_kafka else None
        redis = stack.enter_context(RedisServer(tmp / "redis")) if need_redis else None
        yield kafka, redis


def run(name: str, cases: int) -> ExperimentResult:
    if name == "e4":
        from chaos.snapshot_faults import run_e4

        return run_e4()
    if name == "e5":
        from chaos.poison import run_e5

        return run_e5()
    if name == "e7":
        from chaos.fuzz import run_e7

        with servers(need_kafka=True, need_redis=False) as (kafka, _):
            topic = f"chaos.items.{uuid.uuid4().hex[:8]}"
            kafka.create_topics([topic], partitions=2, compacted={topic})  # type: ignore[union-attr]
            return run_e7(kafka.bootstrap_servers, topic, cases=cases)  # type: ignore[union-attr]
    if name == "e10":
        from chaos.rollback import run_e10

        with servers(need_kafka=True, need_redis=True) as (kafka, redis):
            return run_e10(kafka, redis.url)  # type: ignore[union-attr]
    raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LOOP_EXPERIMENTS:  # each parses its own options, runs, records and prints its result
        experiment = importlib.import_module(LOOP_EXPERIMENTS[argv[0]])
        args = experiment.parse(argv[1:], argv[0]) if argv[0] == "e2-trainer" else experiment.parse(argv[1:])
        return finish(experiment.run(args), args.report_key)
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "fast"])
    parser.add_argument("--cases", type=int, default=200, help="schemathesis cases for e7 (about)")
    parser.add_argument("--report", type=Path, default=REPORT_PATH, help="JSON report to merge the result into")
    parser.add_argument("--docs", type=Path, default=DOCS_PATH, help="markdown page whose table is rewritten")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = EXPERIMENTS if args.experiment == "fast" else (args.experiment,)
    failed = []
    for name in names:
        result = run(name, args.cases)
        record(result, args.report, args.docs)
        summary = {k: v for k, v in asdict(result).items() if k != "checks"}
        print(json.dumps(summary), flush=True)
        if not result.passed:
            failed.append(name)
            print(json.dumps(result.checks, indent=2, default=str)[:4000], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
