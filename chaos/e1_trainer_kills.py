"""E1: random SIGKILLs of the trainer during a feed with 1% malformed records, then a SIGTERM drain.

    python -m chaos e1                                         # full size: 200,000 impressions, 20 kills
    python -m chaos e1 --impressions 3000 --kills 3            # the scaled run of the test suite
    python -m chaos e2-trainer                                 # E1 with 3 broker SIGKILLs (E2 during E1)

`--broker-kills N` (default 3 for `e2-trainer`, recorded under that key) also SIGKILLs the broker N
times while a trainer consumes, spread over the run, and restarts it `--broker-down` seconds later
on the same data; the trainer is then left to consume a while before its own kill. It needs the
experiment's own broker (no `--bootstrap`). The pass condition is E1's.

The feed arrives in `kills + 1` parts, one before each kill and the last before the drain. Every
other kill waits for a snapshot to be in its staging directory and lands there (mid-snapshot).
Pass: trained + held-out + dead-lettered = produced (by Kafka position), no event id trained twice,
the final snapshot's offsets = the log end, no unfinished snapshot left in the store.
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.trainer_throughput import bench_config, make_events
from chaos.harness import (
    Service,
    create_topics,
    end_offsets,
    kafka_bootstrap,
    kill_broker,
    produce,
    read_topic,
    wait_for,
)
from chaos.report import ExperimentResult, experiment_parser, loop_result, parse_loop_args
from streaming.events import ImpressionEvent, UserFeatures, encode, event_key, read_dead_letter
from streaming.snapshots import SnapshotStore
from trainer.bookkeeping import consumed_ids, is_held_out
from worlds.planted import tiny_hsnn_config

HOLDOUT = 20


def malformed_record(i: int, ads: int, template: ImpressionEvent) -> bytes:
    """Three kinds in turn: not JSON, an ad that does not exist, a dense width the model does not have."""
    kind = i % 3
    if kind == 0:
        return b'{"schema_version": 1, "event_id": "cut-' + str(i).encode()
    if kind == 1:
        return encode(template.model_copy(update={"event_id": f"bad-ad-{i}", "ad_id": ads + 1000 + i}))
    return encode(template.model_copy(update={"event_id": f"bad-width-{i}", "user": UserFeatures(dense=[1.0] * 7)}))


def build_feed(args: argparse.Namespace) -> tuple[list[Any], list[tuple[bytes, bytes, str | None]]]:
    """Items, and impression records (key, value, event id or None when malformed), malformed spread at random."""
    rng = random.Random(args.seed)
    items, impressions = make_events(args.impressions, args.ads, seed=args.seed)
    bad = max(1, round(args.impressions * args.malformed)) if args.malformed > 0 else 0
    records: list[tuple[bytes, bytes, str | None]] = [(event_key(e), encode(e), e.event_id) for e in impressions]
    for i in range(bad):
        bad_record = (f"bad-{i}".encode(), malformed_record(i, args.ads, impressions[0]), None)
        records.insert(rng.randrange(len(records) + 1), bad_record)
    return items, records


def run(args: argparse.Namespace) -> ExperimentResult:
    rng = random.Random(args.seed + 1)
    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-e1-"))
    items, records = build_feed(args)
    tag = uuid.uuid4().hex[:6]
    topics = {k: f"e1-{k}-{tag}" for k in ("impressions", "items", "impressions-dlq", "items-dlq")}
    config = work / "hsnn.json"
    config.write_text((tiny_hsnn_config() if args.model == "tiny" else bench_config("default")).model_dump_json())
    store_dir = work / "store"
    ids_path = work / "trained-ids.txt"
    started = time.monotonic()
    brokers: list[Any] = []
    if args.broker_kills and args.bootstrap:
        raise SystemExit("--broker-kills kills the experiment's own broker: no --bootstrap")
    broker_at = {int((i + 0.5) * args.kills / args.broker_kills) for i in range(args.broker_kills)}
    broker_kills = 0
    with kafka_bootstrap(work, args.bootstrap, brokers) as bootstrap:
        create_topics(bootstrap, list(topics.values()), args.partitions, compacted=[topics["items"]])
        produce(bootstrap, topics["items"], [(event_key(e), encode(e)) for e in items])
        trainer = Service(
            "trainer",
            "HSNN_TRAINER_",
            {
                "kafka_bootstrap_servers": bootstrap,
                "group_id": f"e1-{tag}",
                "impressions_topic": topics["impressions"],
                "items_topic": topics["items"],
                "impressions_dlq_topic": topics["impressions-dlq"],
                "items_dlq_topic": topics["items-dlq"],
                "store_dir": store_dir,
                "model_config_path": config,
                "batch_size": args.batch_size,
                "max_poll_records": args.batch_size,
                "holdout_one_in": HOLDOUT,
                "metrics_port": 0,
                "trained_ids_path": ids_path,
                "snapshot_every_events": args.snapshot_every,
                "snapshot_every_seconds": 3600,
                "lease_wait_s": 120,
                "log_level": "INFO",
            },
            work / "logs",
        )
        staging = store_dir / "tmp"
        parts = [records[i :: args.kills + 1] for i in range(args.kills + 1)]  # interleaved: each part spans time
        positions: dict[tuple[int, int], tuple[bytes, str | None]] = {}
        mid_snapshot = 0
        exits: list[int | None] = []
        for kill in range(args.kills):
            sent = produce(bootstrap, topics["impressions"], [(k, v) for k, v, _ in parts[kill]])
            positions.update({pos: (k, eid) for pos, (k, _, eid) in zip(sent, parts[kill], strict=True)})
            left_over = set(staging.iterdir()) if staging.exists() else set()
            trainer.start()
            wait_for(lambda: _lease_epoch(store_dir) >= trainer.starts, 120, "the new trainer's lease", 0.05)
            if kill in broker_at:  # the broker dies under a consuming trainer, then the trainer does
                time.sleep(rng.uniform(args.min_wait, 2 * args.min_wait))
                kill_broker(brokers[0])
                time.sleep(args.broker_down)
                brokers[0].start()  # from this (the main) thread: devservers ties a server to its starting thread
                broker_kills += 1
                time.sleep(rng.uniform(2 * args.min_wait, 4 * args.min_wait))
            elif kill % 2 == 1 and _kill_in_snapshot(trainer, staging, left_over, args.max_wait):
                mid_snapshot += 1
            else:
                time.sleep(rng.uniform(args.min_wait, 3 * args.min_wait))
            code = trainer.proc.poll()  # type: ignore[union-attr]
            if code is not None and code != -signal.SIGKILL:  # it exited by itself (not a mid-snapshot kill)
                exits.append(code)
            trainer.kill()
        sent = produce(bootstrap, topics["impressions"], [(k, v) for k, v, _ in parts[-1]])
        positions.update({pos: (k, eid) for pos, (k, _, eid) in zip(sent, parts[-1], strict=True)})
        end = end_offsets(bootstrap, topics["impressions"])
        good_ids = {eid for _, eid in positions.values() if eid is not None}
        expected_trained = {e for e in good_ids if not is_held_out(e, HOLDOUT)}

        trainer.start()
        wait_for(lambda: _lines(ids_path) >= len(expected_trained), args.drain_timeout, "the drain", 0.2)
        code = trainer.stop()
        letters = [read_dead_letter(r.value) for r in read_topic(bootstrap, topics["impressions-dlq"])]

    store = SnapshotStore(store_dir)
    final = store.manifest(store.latest_version())
    trained = consumed_ids(ids_path)
    id_position = {eid: pos for pos, (_, eid) in positions.items() if eid is not None}
    trained_positions = {id_position[e] for e in trained if e in id_position}
    held_positions = {id_position[e] for e in good_ids if is_held_out(e, HOLDOUT)}
    dead_positions = {(letter.partition, letter.offset) for letter in letters}
    accounted = trained_positions | held_positions | dead_positions
    lost = len(set(positions) - accounted)
    duplicated = len(trained) - len(set(trained))
    unfinished = [p.name for p in staging.iterdir()] if staging.exists() else []
    unfinished += [p.name for p in store.versions_dir.iterdir() if p.name.isdigit() and not (p / "DONE").exists()]
    final_offsets = {int(p): o for p, o in final.offsets.get(topics["impressions"], {}).items()}
    checks = {
        "sigterm_exit_0": code == 0,
        "accounted_equals_produced": len(accounted & set(positions)) == len(positions) and lost == 0,
        "held_out_and_trained_disjoint": not (set(trained) & {e for e in good_ids if is_held_out(e, HOLDOUT)}),
        "dead_letters_are_the_malformed": {p for p, (_, eid) in positions.items() if eid is None} == dead_positions,
        "no_id_trained_twice": duplicated == 0,
        "final_offsets_are_log_end": final_offsets == end,
        "no_unfinished_snapshots": not unfinished,
        "trained_total_matches": int(final.eval_metrics.get("trained_events_total", -1)) == len(set(trained)),
    }
    details = {
        "faults": f"{args.kills} SIGKILL ({mid_snapshot} mid-snapshot), {len(positions) - len(good_ids)} malformed"
        + (f", {broker_kills} broker SIGKILL + restart" if broker_kills else ""),
        "broker_kills": broker_kills,
        "trainer_exits_before_kill": exits,
        "produced": len(positions),
        "trained": len(set(trained)),
        "held_out": len(held_positions),
        "dead_lettered": len(dead_positions),
        "dead_letter_records": len(letters),
        "kills": args.kills,
        "kills_mid_snapshot": mid_snapshot,
        "trainer_starts": trainer.starts,
        "snapshots_written": final.version,
        "unfinished_snapshots": unfinished,
        "model": args.model,
        "seconds": round(time.monotonic() - started, 1),
    }
    title = f"trainer SIGKILLs ({mid_snapshot} mid-snapshot) during a feed with 1% malformed, then SIGTERM drain"
    if broker_kills:
        title = f"broker SIGKILL + restart x{broker_kills} while the trainer consumes, during E1 ({title})"
    return loop_result(
        args,
        args.experiment,
        title,
        started,
        work,
        checks,
        details,
        faults_injected=args.kills + broker_kills + (len(positions) - len(good_ids)),
        lost=lost,
        duplicated=duplicated,
    )


def _kill_in_snapshot(trainer: Service, staging: Path, left_over: set[Path], timeout: float) -> bool:
    """SIGKILL as soon as a new snapshot staging dir appears; False if none appeared within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and trainer.alive:
        if staging.exists() and set(staging.iterdir()) - left_over:
            trainer.kill()
            return True
        time.sleep(0.002)
    return False


def _lease_epoch(store_dir: Path) -> int:
    """The newest lease epoch in the store (each trainer start takes the next one)."""
    leases = store_dir / "leases"
    return max((int(p.stem) for p in leases.glob("*.json") if p.stem.isdigit()), default=0) if leases.exists() else 0


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def parse(argv: list[str], experiment: str = "e1") -> argparse.Namespace:
    parser = experiment_parser(experiment, __doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=200_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--malformed", type=float, default=0.01, help="share of extra malformed records")
    parser.add_argument("--ads", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--snapshot-every", type=int, default=0, help="events between snapshots (0: ~3 per part)")
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny", help="tiny HSNN or the bench preset")
    parser.add_argument("--min-wait", type=float, default=1.0, help="seconds after a start before a timed kill")
    parser.add_argument("--max-wait", type=float, default=30.0, help="longest wait for a kill point")
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--broker-kills", type=int, default=3 if experiment == "e2-trainer" else 0, help="broker SIGKILLs + restarts"
    )
    parser.add_argument("--broker-down", type=float, default=2.0, help="seconds the broker stays down")
    args = parse_loop_args(parser, experiment, argv)
    args.experiment = experiment
    if args.snapshot_every <= 0:
        args.snapshot_every = max(50, args.impressions // ((args.kills + 1) * 3))
    return args
