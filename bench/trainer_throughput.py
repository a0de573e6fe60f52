"""Throughput of the online trainer, end to end from Kafka, on realistic impressions.

    python -m bench.trainer_throughput --events 20000 --label after            # starts its own broker (devservers)
    python -m bench.trainer_throughput --bootstrap 127.0.0.1:9092 --events 20000

The impressions come from the marketplace simulator (`worlds.simulator`): users with engagement
histories of up to `--history` (32) events, ads that live for the whole run. The model is the
default preset: `HSNNConfig()` on the simulator's feature schema (MoNN-Large and Medium levels).
The bench produces the items and impressions to fresh topics, runs an OnlineTrainer until it has
drained them and reports events/s, where the time went per event (Kafka poll, items catch-up,
decode + routing, batch build, train step, snapshot) and the click NE of the trained model on the
held-out events (speed that costs quality does not count). Results merge by `--label` into
reports/trainer_throughput.json and the table in reports/trainer_throughput.md.
`--source synthetic` keeps the old 3-event synthetic impressions and `--levels` the per-level presets.

    python -m bench.trainer_throughput --events 6144 --batch-size 512 --ranks 1,2 --label ddp

`--ranks 1,2` (or `1x2,1x1,2x1`: ranks x threads; `2ix1`: the control, 2 single trainers side by side on
a partition each, no torch.distributed) runs the same topics once per group size, side by side
in one command (the first entry with one rank is the ratio's base): each rank is a
process (torch.multiprocessing, gloo on loopback) owning partitions p % ranks == rank, with cores // ranks
torch threads unless `--threads` says otherwise. It reports events/s of the group, the ratio to one rank,
each stage per rank, the lockstep costs (agreeing on a round, waiting for the slower rank, repairing state
changed outside the gradient), a measured allreduce of the dense parameter bytes, and the snapshot size,
into reports/trainer_ddp.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from hsnn.config import HSNNConfig, LTIConfig, preset
from streaming import events as contract
from streaming.events import ImpressionEvent, ItemEvent, ItemFeatures, UserFeatures
from trainer.service import OnlineTrainer
from trainer.settings import TrainerSettings
from worlds.planted import SCHEMA


def make_events(count: int, ads: int, seed: int = 0) -> tuple[list[ItemEvent], list[ImpressionEvent]]:
    g = torch.Generator().manual_seed(seed)
    items = [
        ItemEvent(
            op="create",
            ad_id=ad,
            event_time=1.7e9,
            sequence=1,
            features=ItemFeatures(
                dense=torch.randn(4, generator=g).tolist(), sparse={"advertiser": ad % 97 + 1, "category": ad % 13 + 1}
            ),
        )
        for ad in range(1, ads + 1)
    ]
    ad_ids = torch.randint(1, ads + 1, (count,), generator=g).tolist()
    clicks = (torch.rand(count, generator=g) < 0.1).long().tolist()
    impressions = []
    for i, (ad, click) in enumerate(zip(ad_ids, clicks, strict=True)):
        history = [
            contract.Engagement(
                attributes={"item_id": h, "advertiser": h % 97 + 1, "category": h % 13 + 1}, age_hours=float(j)
            )
            for j, h in enumerate(((ad * 7 + i) % ads + 1, (ad * 13 + i) % ads + 1, ad))
        ]
        impressions.append(
            ImpressionEvent(
                event_id=f"bench-{i}",
                event_time=1.7e9 + i * 0.001,
                user=UserFeatures(
                    dense=[0.1, -0.2], sparse={"segment": [i % 32 + 1], "age_bucket": [i % 8]}, history=history
                ),
                ad_id=ad,
                labels=contract.Labels(click=click, conversion=0),
            )
        )
    return items, impressions


def bench_config(levels: str) -> HSNNConfig:
    if levels == "default":
        level_models = [preset("monn_large"), preset("monn_medium")]
    else:
        level_models = [preset(levels), preset(levels)]
    return HSNNConfig(
        features=SCHEMA,
        levels=[LTIConfig(num_nodes=16), LTIConfig(num_nodes=8)],
        level_models=level_models,
        item_model=preset("monn_small"),
    )


STAGES = ("poll", "items", "decode", "batch", "train", "snapshot")
REPORT = Path(__file__).resolve().parents[1] / "reports" / "trainer_throughput"
DDP_REPORT = Path(__file__).resolve().parents[1] / "reports" / "trainer_ddp"


def simulator_feed(events: int, ads: int, users: int, history: int, seed: int) -> tuple[HSNNConfig, list, list]:
    """(model config on the simulator's schema, item events, impressions), ads alive for the whole run."""
    from worlds.simulator import Marketplace, feature_schema, scaled_config

    config = scaled_config(ads, users, seed).model_copy(
        update={"history_length": history, "mean_ad_lifespan_hours": 1e4, "mean_update_interval_hours": None}
    )
    market = Marketplace(config)
    items = market.initial_item_events()
    impressions, more_items = market.step(events)
    return HSNNConfig(features=feature_schema(config)), items + more_items, impressions


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def merge_results(path: Path, label: str | None, result: dict | None) -> tuple[Path, dict]:
    """Merge `result` under `label` into <path>.json (label None: leave it); returns <path>.md and every result."""
    json_path = path.with_suffix(".json")
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    if label is not None:
        data[label] = result
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path.with_suffix(".md"), data


def write_report(label: str, result: dict, path: Path = REPORT) -> None:
    """Merge `result` under `label` into <path>.json and re-render <path>.md."""
    md_path, data = merge_results(path, label, result)
    lines = [
        "# Online trainer throughput (`python -m bench.trainer_throughput`)",
        "",
        "End to end from Kafka: simulator impressions (histories up to 32 events), default preset HSNN.",
        "Per-stage figures are microseconds per event; NE is the click NE on the held-out events.",
        "",
        "| run | events/s | " + " | ".join(f"{s} us" for s in STAGES) + " | NE | events | batch | threads | commit |",
        "|---|" + "---|" * (len(STAGES) + 6),
    ]
    for name, r in data.items():
        stages = " | ".join(f"{r['us_per_event'][s]:.1f}" for s in STAGES)
        ne = "n/a" if r.get("ne") is None else f"{r['ne']:.4f}"
        lines.append(
            f"| {name} | {r['events_per_second']:,.0f} | {stages} | {ne} | {r['events']:,} | {r['batch_size']} "
            f"| {r['threads']} | {r['commit']} |"
        )
    lines += ["", "Commands:", ""] + [f"- {name}: `{r['command']}`" for name, r in data.items()]
    md_path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trainer_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bootstrap", help="a running broker; default: start one with devservers")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--source", choices=("simulator", "synthetic"), default="simulator")
    parser.add_argument("--ads", type=int, default=2_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--history", type=int, default=32, help="engagements per user history (simulator)")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--levels", default="default", help="synthetic source: 'default' or a preset for both levels")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the over-arches (compile_overarch)")
    parser.add_argument("--label", help="record the result under this name in reports/trainer_throughput.*")
    parser.add_argument(
        "--ranks",
        help="group sizes to run side by side, e.g. '1,2' or '1x2,1x1,2x1' (ranks x torch threads per rank); "
        "report: reports/trainer_ddp.*",
    )
    parser.add_argument(
        "--global-batch",
        action="store_true",
        help="with --ranks: each rank trains batches of batch-size / ranks (the same global batch and steps)",
    )
    parser.add_argument(
        "--round-robin",
        action="store_true",
        help="impression i goes to partition i %% partitions (not by key): equal partitions, so no rank ends with a "
        "short last step alone",
    )
    args = parser.parse_args(argv)
    commit = _git_commit()  # the code that runs is the code at start
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.source == "simulator":
        model_config, items, impressions = simulator_feed(args.events, args.ads, args.users, args.history, args.seed)
    else:
        model_config = bench_config(args.levels)
        items, impressions = make_events(args.events, args.ads, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    server = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        from devservers import KafkaServer

        server = KafkaServer(work / "kafka").start()
        bootstrap = server.bootstrap_servers
    try:
        tag = uuid.uuid4().hex[:6]
        topics = {k: f"bench-{k}-{tag}" for k in ("imp", "items", "dlq", "items-dlq")}
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics(
            [NewTopic(t, args.partitions, 1) for t in topics.values() if t != topics["items"]]
            + [NewTopic(topics["items"], args.partitions, 1, topic_configs={"cleanup.policy": "compact"})]
        )
        admin.close()
        t0 = time.perf_counter()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 18)
        for event in items:
            producer.send(topics["items"], key=contract.event_key(event), value=contract.encode(event))
        record_bytes = 0
        for i, event in enumerate(impressions):
            value = contract.encode(event)
            record_bytes += len(value)
            partition = i % args.partitions if args.round_robin else None
            producer.send(topics["imp"], key=contract.event_key(event), value=value, partition=partition)
        producer.flush()
        producer.close()
        histories = [len(e.user.history) for e in impressions]
        print(
            f"produced {len(impressions)} impressions ({record_bytes / len(impressions):,.0f} B, history mean "
            f"{sum(histories) / len(histories):.1f} max {max(histories)}) + {len(items)} item events "
            f"in {time.perf_counter() - t0:.1f}s"
        )

        config_path = work / "hsnn.json"
        config_path.write_text(model_config.model_dump_json())
        settings = TrainerSettings(
            kafka_bootstrap_servers=bootstrap,
            impressions_topic=topics["imp"],
            items_topic=topics["items"],
            impressions_dlq_topic=topics["dlq"],
            items_dlq_topic=topics["items-dlq"],
            store_dir=str(work / "store"),
            model_config_path=str(config_path),
            batch_size=args.batch_size,
            max_poll_records=args.batch_size,
            metrics_port=0,
            snapshot_every_seconds=1e9,
            snapshot_every_events=10**12,
            compile_overarch=args.compile,
        )
        if args.ranks:
            run_groups(args, settings, work, commit, argv, record_bytes / len(impressions), histories)
            return
        registry = CollectorRegistry()
        trainer = OnlineTrainer(settings, registry=registry)
        trainer.catch_up_items()
        started = time.perf_counter()
        trainer.run(lambda: sum(trainer.offsets.topic(topics["imp"]).values()) >= args.events, max_idle_polls=50)
        drained = time.perf_counter() - started
        metrics = trainer.eval_metrics()
        snapshot_started = time.perf_counter()
        trainer.maybe_snapshot(force=True)
        trainer.timings.snapshot = time.perf_counter() - snapshot_started
        trainer.close()
        t = trainer.timings
        dead = registry.get_sample_value("hsnn_trainer_events_total", {"outcome": "dead_letter"}) or 0
        result = {
            "events": args.events,
            "events_per_second": args.events / drained,
            "seconds": drained,
            "us_per_event": {name: 1e6 * getattr(t, name) / args.events for name in STAGES},
            "ne": metrics.get("ne"),
            "eval_events": int(metrics["events"]),
            "dead_letters": int(dead),
            "clipped_steps": int(registry.get_sample_value("hsnn_trainer_clipped_steps_total") or 0),
            "skipped_steps": int(registry.get_sample_value("hsnn_trainer_skipped_steps_total") or 0),
            "last_grad_norm": registry.get_sample_value("hsnn_trainer_grad_norm"),
            "source": args.source,
            "record_bytes_mean": record_bytes / len(impressions),
            "history_mean": sum(histories) / len(histories),
            "batch_size": args.batch_size,
            "partitions": args.partitions,
            "threads": torch.get_num_threads(),
            "commit": commit,
            "command": "python -m bench.trainer_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        print(f"threads={result['threads']} batch={args.batch_size} source={args.source} dead letters={int(dead)}")
        print(f"drained {args.events} events in {drained:.2f}s: {result['events_per_second']:,.0f} events/s")
        for name in STAGES:
            print(f"  {name:<9}{getattr(t, name):7.2f}s  {result['us_per_event'][name]:7.1f} us/event")
        print(f"held-out click NE: {result['ne']} over {result['eval_events']} events")
        if args.label:
            write_report(args.label, result)
    finally:
        if server is not None:
            server.stop()


# ------------------------------------------------------------------ 1 vs N ranks (--ranks)
def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def _allreduce_seconds(numel: int, repeats: int = 5) -> float:
    """Seconds per allreduce of `numel` float32 (the dense gradient of one step) on the group's backend."""
    import torch.distributed as dist

    tensor = torch.zeros(numel)
    dist.all_reduce(tensor)  # warm-up: connections, buffers
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(tensor)
    return (time.perf_counter() - started) / repeats


class _ShareTrainer(OnlineTrainer):
    """The control run: a single trainer (no torch.distributed) on one rank's share of the partitions."""

    share: tuple[int, int] = (0, 1)

    def _assign_partitions(self) -> None:
        from trainer.rank_group import owns

        rank, world = self.share
        stored = self.kafka.assign(self.offsets, owns=lambda p: owns(p, rank, world))
        self.kafka.enforce_stored_offsets(stored, self.offsets, self.metrics.offset_out_of_range.inc)


def _rank_main(
    rank: int, world: int, port: int, settings_json: str, threads: int, ends: dict, out: str, independent: bool
) -> None:
    """One rank of a bench group (world 1: today's single trainer, no torch.distributed; `independent`: N
    single trainers side by side, each on its share of the partitions, nothing shared: the machine's capacity
    for N processes without DDP)."""
    from trainer.distributed import GroupTrainer
    from trainer.rank_group import owns

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    settings = TrainerSettings.model_validate_json(settings_json).model_copy(
        update={
            "rank": 0 if independent else rank,
            "world_size": 1 if independent else world,
            "master_port": port,
            "torch_threads": threads,
        }
    )
    if independent:
        _ShareTrainer.share = (rank, world)
        settings = settings.model_copy(update={"store_dir": f"{settings.store_dir}-{rank}"})
        trainer: OnlineTrainer = _ShareTrainer(settings)
    elif world > 1:
        trainer = GroupTrainer(settings, registry=CollectorRegistry())
    else:
        trainer = OnlineTrainer(settings)
    topic = settings.impressions_topic
    mine = {int(p): o for p, o in ends.items() if owns(int(p), rank, world)}
    trainer.catch_up_items()
    if independent:  # start together: a file per ready process
        (Path(out) / f"ready{rank}").touch()
        while len(list(Path(out).glob("ready*"))) < world:
            time.sleep(0.01)

    def drained() -> bool:
        return all((trainer.offsets.get(topic, p) or 0) >= o for p, o in mine.items())

    allreduce = None
    params = sum(p.numel() for p in trainer.model.parameters())
    if isinstance(trainer, GroupTrainer):
        allreduce = _allreduce_seconds(params)
        trainer.group.all(True)  # start together
    started = time.perf_counter()
    if isinstance(trainer, GroupTrainer):
        trainer.run(drained, max_idle_polls=50, all_must_stop=True)
    else:
        trainer.run(drained, max_idle_polls=50)
    seconds = time.perf_counter() - started
    snapshot_started = time.perf_counter()
    result = trainer.maybe_snapshot(force=True)
    snapshot_seconds = time.perf_counter() - snapshot_started
    consumed = sum(o for p, o in trainer.offsets.topic(topic).items() if p in mine)
    snapshot_bytes = None
    if result is not None and rank == 0:
        directory = trainer.store.path(result.manifest.version)
        snapshot_bytes = {f.name: f.stat().st_size for f in directory.iterdir() if f.is_file()}
    t = trainer.timings
    report = {
        "rank": rank,
        "seconds": seconds,
        "events": consumed,
        "partitions": sorted(mine),
        "us_per_event": {name: 1e6 * getattr(t, name) / max(1, consumed) for name in STAGES},
        "extra_us_per_event": {k: 1e6 * v / max(1, consumed) for k, v in t.extra.items() if not k.endswith("steps")},
        "steps": {k: int(v) for k, v in t.extra.items() if k.endswith("steps")},
        "snapshot_seconds": snapshot_seconds,
        "ne": None if result is None else result.manifest.eval_metrics.get("ne"),
        "eval_events": None if result is None else result.manifest.eval_metrics.get("events"),
        "replica_mismatches": None if result is None else result.manifest.eval_metrics.get("replica_mismatches"),
        "replica_repairs": getattr(trainer, "replica_repairs", 0),
        "allreduce_seconds": allreduce,
        "dense_param_bytes": 4 * params,
        "snapshot_bytes": snapshot_bytes,
        "threads": torch.get_num_threads(),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    trainer.close()  # a group's last collective was the snapshot barrier


def run_groups(
    args: argparse.Namespace,
    settings: TrainerSettings,
    work: Path,
    commit: str,
    argv: list[str] | None,
    record_bytes: float,
    histories: list[int],
) -> None:
    """Each group size in `--ranks` on the same topics, one after the other, each from the first offset."""
    import os

    import torch.multiprocessing as mp

    from trainer.launcher import free_port

    ends = _end_offsets(settings.kafka_bootstrap_servers, settings.impressions_topic)
    cores = os.cpu_count() or 1
    runs: dict[str, dict] = {}
    for spec in args.ranks.split(","):
        world_text, _, threads_text = spec.partition("x")
        independent = world_text.endswith("i")
        world = int(world_text.rstrip("i"))
        threads = int(threads_text) if threads_text else args.threads or max(1, cores // world)
        name = f"{world}{'i' if independent else ''}x{threads}"
        name = name if name not in runs else f"{name}#{sum(k.split('#')[0] == name for k in runs) + 1}"
        out = work / f"ranks-{name}"
        out.mkdir()
        batch = max(1, args.batch_size // world) if args.global_batch else args.batch_size
        run_settings = settings.model_copy(
            update={
                "store_dir": str(out / "store"),
                "group_id": f"bench-ddp-{world}-{uuid.uuid4().hex[:6]}",
                "batch_size": batch,
                "max_poll_records": batch,
            }
        )
        load = os.getloadavg()[0]
        mp.spawn(
            _rank_main,
            args=(
                world,
                free_port(),
                run_settings.model_dump_json(),
                threads,
                {str(p): o for p, o in ends.items()},
                str(out),
                independent,
            ),
            nprocs=world,
            join=True,
        )
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        events = sum(r["events"] for r in ranks)
        seconds = max(r["seconds"] for r in ranks)
        runs[name] = {
            "ranks": world,
            "independent": independent,
            "threads_per_rank": threads,
            "batch_per_rank": batch,
            "events": events,
            "seconds": seconds,
            "events_per_second": events / seconds,
            "load_average_1m_before": load,
            "per_rank": ranks,
        }
        print(
            f"{world} rank(s) x {threads} thread(s): {events} events in {seconds:.1f}s = "
            f"{events / seconds:,.1f} events/s (1m load before: {load:.2f})"
        )
        for r in ranks:
            print(
                f"  rank {r['rank']}: partitions {r['partitions']}, {r['events']} events, "
                f"train {r['us_per_event']['train']:.0f} us/event, extra {r['extra_us_per_event']}, "
                f"steps {r['steps']}, allreduce {r['allreduce_seconds']}, NE {r['ne']}"
            )
    base = next((run["events_per_second"] for run in runs.values() if run["ranks"] == 1), None)
    for run in runs.values():
        run["ratio_to_one_rank"] = run["events_per_second"] / base if base else None
    result = {
        "runs": runs,
        "cores": cores,
        "events": args.events,
        "batch_size": args.batch_size,
        "global_batch": bool(args.global_batch),
        "round_robin": bool(args.round_robin),
        "partitions": args.partitions,
        "source": args.source,
        "record_bytes_mean": record_bytes,
        "history_mean": sum(histories) / len(histories),
        "commit": commit,
        "command": "python -m bench.trainer_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_ddp_report(args.label or "latest", result)


def _steps_cell(steps: dict[str, int]) -> str:
    """`real + zero-weight` lockstep steps of a rank (blank for a single trainer, which does not count them)."""
    if not steps:
        return ""
    return f"{steps.get('real_steps', 0)} + {steps.get('zero_weight_steps', 0)}"


def write_ddp_report(label: str | None, result: dict | None, path: Path = DDP_REPORT) -> None:
    """Merge `result` under `label` into <path>.json and re-render <path>.md (None: re-render only)."""
    md_path, data = merge_results(path, label, result)
    lines = [
        "# Trainer scale-out: 1 vs N ranks (`python -m bench.trainer_throughput --ranks ...`)",
        "",
        "Run names are ranks x torch threads per rank (#2: the same again, later in the same command); `2ix1` is",
        "the control: 2 single trainers side by side, a partition each, nothing shared (no DDP, no lockstep).",
        "Each rank is a process owning partitions p % ranks == rank, gradients averaged by torch DDP (gloo,",
        "loopback), one lockstep round per poll. Same topics for every group size, run one after the other in one",
        "command. us/event figures are per event the rank consumed; `agree` includes waiting for the slower rank,",
        "`repair` the per-step replica check. allreduce: measured, one allreduce of the dense parameter bytes.",
        "",
    ]
    for label, r in data.items():
        lines += [
            f"## {label} (commit {r['commit']}, {r['cores']} cores, {r['events']:,} events, "
            + (
                f"global batch {r['batch_size']} split over the ranks"
                if r.get("global_batch")
                else f"batch {r['batch_size']} per rank"
            )
            + f", {r['partitions']} partitions)",
            "",
            "| run | events/s | x 1x1 (mean) | load before | rank | batch | events | train us | decode us "
            "| agree us | repair us | steps (real + zero-weight) | allreduce ms | NE |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        singles = [run["events_per_second"] for name, run in r["runs"].items() if name.split("#")[0] == "1x1"]
        base = sum(singles) / len(singles) if singles else None
        for run_name, run in r["runs"].items():
            ratio = "" if base is None else f"{run['events_per_second'] / base:.2f}"
            for i, rank in enumerate(run["per_rank"]):
                extra = rank["extra_us_per_event"]
                steps = rank["steps"]
                allreduce = "" if rank["allreduce_seconds"] is None else f"{1e3 * rank['allreduce_seconds']:.1f}"
                ne = "" if rank["ne"] is None else f"{rank['ne']:.4f}"
                head = (
                    f"| {run_name} | {run['events_per_second']:,.1f} | {ratio} | {run['load_average_1m_before']:.2f} "
                    if i == 0
                    else "| | | | "
                )
                lines.append(
                    head + f"| {rank['rank']} | {run.get('batch_per_rank', r['batch_size'])} | {rank['events']:,} "
                    f"| {rank['us_per_event']['train']:,.0f} "
                    f"| {rank['us_per_event']['decode']:,.0f} | {extra.get('agree', 0):,.0f} "
                    f"| {extra.get('repair', 0):,.0f} "
                    f"| {_steps_cell(steps)} | {allreduce} | {ne} |"
                )
        first = next(iter(r["runs"].values()))["per_rank"][0]
        snap = first.get("snapshot_bytes") or {}
        lines += [
            "",
            f"Dense parameter bytes: {first['dense_param_bytes']:,}; snapshot files: "
            + ", ".join(f"{k} {v:,} B" for k, v in sorted(snap.items())),
            "",
            f"Command: `{r['command']}`",
            "",
        ]
    md_path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
