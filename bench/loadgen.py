"""Load generator and latency benchmark of the retrieval API (a report, not a test).

    python -m bench.loadgen --ads 10000 100000 1000000 --concurrency 1 32 --duration 10
    python -m bench.loadgen --device cuda ...   # on a GPU machine (scripts/loadgen_gpu.sh)

For each corpus size N it:

1. sizes the index from the corpus (`bench.sizing.index_shape`: about 100 items per leaf), trains an
   HSNN with those codebooks on the planted problem (a 20k-ad world with 64 categories): `--model paper`
   (MoNN-Small item model, MoNN-Large/Medium level models) or `tiny`; the index clusters each item's
   click-logit profile over probe users (`--index-input score_profile`),
   writes it to a snapshot store, and generates N ads from the same categories vectorised (same
   category centres, advertisers nested in categories), saved as a catalogue file; the service
   builds the index with the build-time capacity cap (`build_index`'s default factor);
2. picks beams from an items-scored budget (`hsnn.lti.beams_for_budget`) and computes, in process,
   the same model's exhaustive top-k for the first `--recall-users` users (the recall reference);
3. starts the real service (`python -m retrieval_api`) in a child process on a free port, which
   loads the snapshot and builds the index through the hot-swap watcher;
4. drives POST /retrieve with httpx: closed loop at each concurrency (every client sends its next
   request when the previous one is answered), the largest concurrency again with max_batch=1 (the
   batching gain), and open loop at `--open-load` x the best closed-loop QPS (requests sent at fixed
   intended times whether or not earlier ones were answered; latency counts from the intended send
   time, so a stalled server is charged for the queue it builds). Each row records p50/p99, QPS,
   items scored, recall@k of the served top-k vs the exhaustive top-k, and the service's RSS;
5. times one batch in process with the precomputed item-half tables and with plain `pair_logits`
   (the before/after of the same run), profiles it (cProfile) and compares the scoring FLOP/s
   (from the cost accounting) with the machine's float32 matmul GFLOP/s.

Writes reports/api_latency.json, reports/api_latency.md and reports/api_latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.exhaustive import retrieve_exhaustive
from bench.sizing import SERVING_WIDENING, beams_for_budget, index_shape
from clitools.arguments import float_above, int_at_least
from hsnn.config import HSNNConfig, preset
from hsnn.features import ItemBatch, UserBatch
from hsnn.index import DEFAULT_CAPACITY_FACTOR
from hsnn.model import HSNN
from hsnn.serving import retrieve
from hsnn.training import train
from retrieval_api.catalogs import save_catalog
from retrieval_api.state import Catalog, load_pair_from_store
from streaming.snapshots import SnapshotStore
from worlds.planted import PlantedWorld, make_batches, make_users, make_world, tiny_hsnn_config, user_json

CATEGORIES = 64
MAX_K = 1000  # RetrieveRequest.k's limit: a larger k would only collect 422s
ADVERTISERS_PER_CATEGORY = 8


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matmul throughput of this machine (torch, all intra-op threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        torch.matmul(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def scaled_catalog(base: PlantedWorld, num_items: int, seed: int) -> Catalog:
    """N ads drawn like the planted world's (vectorised): category centres estimated from `base`."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(base.item_category, minlength=CATEGORIES).clamp(min=1).unsqueeze(1).float()
    centres = torch.zeros(CATEGORIES, base.items.dense.shape[1]).index_add_(0, base.item_category, base.items.dense)
    centres = centres / counts
    category = torch.randint(CATEGORIES, (num_items,), generator=g)
    advertiser = category * ADVERTISERS_PER_CATEGORY + torch.randint(
        ADVERTISERS_PER_CATEGORY, (num_items,), generator=g
    )
    dense = centres[category] + 0.3 * torch.randn(num_items, centres.shape[1], generator=g)
    item_ids = torch.arange(1, num_items + 1)
    items = ItemBatch(dense=dense, sparse={"item_id": item_ids, "advertiser": advertiser + 1, "category": category + 1})
    return Catalog(item_ids=item_ids, items=items)


def model_config(name: str, nodes: tuple[int, ...], **overrides) -> HSNNConfig:
    """The served HSNN: "tiny" (the tests' MoNNs) or "paper" (MoNN-Small item model, MoNN-Large/Medium level
    models as in the paper), both on the planted world's features, with these codebooks and config overrides."""
    config = tiny_hsnn_config(num_nodes=tuple(nodes))
    if name == "paper":
        levels = [preset("monn_large"), preset("monn_medium")] + [preset("monn_medium")] * max(0, len(nodes) - 2)
        config = config.model_copy(update={"level_models": levels[: len(nodes)], "item_model": preset("monn_small")})
    elif name != "tiny":
        raise ValueError(f"unknown model {name!r}: tiny or paper")
    return HSNNConfig.model_validate(config.model_dump() | overrides)


def model_overrides(args: argparse.Namespace) -> dict:
    """HSNNConfig fields the command line sets."""
    return {"index_input": args.index_input, "probe_users": args.probe_users}


def train_model(
    base: PlantedWorld, steps: int, nodes: tuple[int, ...], seed: int, model: str = "tiny", **overrides
) -> HSNN:
    torch.manual_seed(seed)
    model = HSNN(model_config(model, nodes, **overrides))
    batches = make_batches(base, max(1, steps // 4), 256, seed=seed + 1, users_per_batch=64)
    train(model, (batches * 4)[:steps])
    return model.eval()


def user_bodies(users: UserBatch, k: int) -> list[dict]:
    return [{"user": user_json(users, row, age_decimals=3), "k": k} for row in range(len(users))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@contextlib.contextmanager
def serve(
    store_dir: Path,
    catalog_path: Path,
    beams: list[int],
    max_batch: int,
    max_wait_ms: float,
    log: Path,
    threads: int = 1,
    device: str = "cpu",
):
    """The real service in a child process; yields (base URL, process) once /readyz answers 200. `threads` caps
    its torch intra-op threads (on a small shared box, spinning OpenMP threads of two processes fight)."""
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HSNN_API_DEVICE": device,
        "HSNN_API_BEAMS": json.dumps(beams),
        "HSNN_API_MAX_BATCH": str(max_batch),
        "HSNN_API_MAX_WAIT_MS": str(max_wait_ms),
        "HSNN_API_QUEUE_SIZE": "1024",
    }
    command = [sys.executable, "-m", "retrieval_api", "--port", str(port), "--store-dir", str(store_dir)]
    command += ["--catalog", str(catalog_path), "--log-level", "WARNING"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        until = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited with {process.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > until:
                raise TimeoutError(f"the service did not become ready; see {log}")
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Tally:
    """What one row measured: latencies, costs, errors and recall vs the exhaustive top-k."""

    def __init__(self, truth: dict[int, set[int]]):
        self.truth = truth  # body number -> exhaustive top-k ad ids (for the first recall users)
        self.latencies: list[float] = []
        self.items_scored: list[int] = []
        self.flops: list[int] = []
        self.recalls: list[float] = []
        self.errors: dict[int, int] = {}

    def add(self, body_number: int, response: httpx.Response, seconds: float) -> None:
        if response.status_code != 200:
            self.errors[response.status_code] = self.errors.get(response.status_code, 0) + 1
            return
        self.latencies.append(seconds)
        answer = response.json()
        self.items_scored.append(answer["cost"]["items_scored"])
        self.flops.append(answer["cost"]["flops"])
        expected = self.truth.get(body_number)
        if expected:
            served = {ad["ad_id"] for ad in answer["ads"]}
            self.recalls.append(len(served & expected) / len(expected))

    def summary(self, elapsed: float) -> dict:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

        n = len(ordered)
        return {
            "requests": n,
            "errors": self.errors,
            "qps": n / elapsed,
            "p50_ms": quantile(0.50),
            "p99_ms": quantile(0.99),
            "mean_ms": sum(ordered) / n * 1000 if n else float("nan"),
            "items_scored": sum(self.items_scored) / n if n else 0,
            "mflops_per_query": sum(self.flops) / n / 1e6 if n else 0,
            "recall_vs_exhaustive": sum(self.recalls) / len(self.recalls) if self.recalls else float("nan"),
            "recall_samples": len(self.recalls),
        }


async def drive(
    url: str, bodies: list[dict], concurrency: int, duration: float, warmup: float, truth: dict[int, set[int]]
) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request when answered."""
    tally = Tally(truth)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        measuring = False
        stop = False

        async def client_loop(number: int) -> None:
            i = number
            while not stop:
                body_number = i % len(bodies)
                i += concurrency
                started = time.perf_counter()
                response = await client.post("/retrieve", json=bodies[body_number])
                if measuring:
                    tally.add(body_number, response, time.perf_counter() - started)

        tasks = [asyncio.create_task(client_loop(n)) for n in range(concurrency)]
        await asyncio.sleep(warmup)
        measuring = True
        started = time.perf_counter()
        await asyncio.sleep(duration)
        measuring, stop = False, True
        elapsed = time.perf_counter() - started
        await asyncio.gather(*tasks)
    return tally.summary(elapsed) | {"mode": "closed"}


async def drive_open(
    url: str, bodies: list[dict], rate: float, duration: float, warmup: float, truth: dict[int, set[int]]
) -> dict:
    """Open-loop load: request i is due at start + i / rate and sent then, whatever is still in flight;
    its latency runs from that intended time (no coordinated omission: a stall is charged to every
    request scheduled behind it, including any time the client itself was late to send)."""
    tally = Tally(truth)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        loop_start = time.perf_counter()
        measure_from, measure_to = loop_start + warmup, loop_start + warmup + duration

        async def one(i: int, due: float) -> None:
            body_number = i % len(bodies)
            response = await client.post("/retrieve", json=bodies[body_number])
            if measure_from <= due < measure_to:
                tally.add(body_number, response, time.perf_counter() - due)

        tasks = []
        i = 0
        while (due := loop_start + i / rate) < measure_to:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
            i += 1
        await asyncio.gather(*tasks)
    return tally.summary(duration) | {"mode": "open", "offered_qps": rate}


def exhaustive_truth(pair, users: UserBatch, k: int) -> dict[int, set[int]]:
    """Body number -> the same model's exhaustive top-k ad ids: the reference of recall_vs_exhaustive."""
    results = retrieve_exhaustive(pair.model, pair.index, users, k=k)
    return {row: set(r.item_ids.tolist()) for row, r in enumerate(results)}


def _time_retrieve(pair, group: UserBatch, beams: list[int], k: int, precomputed: bool) -> dict:
    runs, started = 0, time.perf_counter()
    while runs < 5 or time.perf_counter() - started < 2:
        results = retrieve(pair.model, pair.index, group, k=k, beams=beams, precomputed=precomputed)
        runs += 1
    seconds = (time.perf_counter() - started) / runs
    return {
        "ms": seconds * 1000,
        "ms_per_query": seconds * 1000 / len(group),
        "gflops": sum(r.cost.flops for r in results) / seconds / 1e9,
    }


def profile_batch(pair, users: UserBatch, beams: list[int], k: int, batch: int = 32) -> dict:
    """In-process scoring of one batch (no HTTP): wall time, FLOP/s, and where the time goes (cProfile).

    Each size is timed with the precomputed item halves (what the service runs) and with plain
    `pair_logits` (before), interleaved so both see the same machine load; FLOP/s counts what each ran.
    """
    chosen = users.select(torch.arange(batch, device=users.dense.device) % len(users))
    single = users.select(torch.tensor([0], device=users.dense.device))
    for precomputed in (True, False):
        for _ in range(2):
            retrieve(pair.model, pair.index, chosen, k=k, beams=beams, precomputed=precomputed)
    timings = {}
    for name, group in (("batch_1", single), (f"batch_{batch}", chosen)):
        timings[name] = _time_retrieve(pair, group, beams, k, True)
        timings[f"{name}_plain"] = _time_retrieve(pair, group, beams, k, False)
        timings[name]["speedup_vs_plain"] = timings[f"{name}_plain"]["ms"] / timings[name]["ms"]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        retrieve(pair.model, pair.index, chosen, k=k, beams=beams)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(12)
    repo = str(Path(__file__).resolve().parents[1]) + "/"  # machine paths out of the report
    lines = [line.replace(repo, "") for line in text.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return {"timings": timings, "profile_top_tottime": lines[start:]}


def leaf_stats(index) -> dict:
    sizes = index.levels[-1].sizes.float()
    return {
        "nodes_per_level": [len(level.keys) for level in index.levels],
        "leaf_size_mean": float(sizes.mean()),
        "leaf_size_max": int(sizes.max()),
    }


def run(args: argparse.Namespace) -> dict:
    """Every corpus size: train, index, measure in process, then drive the service; write the reports."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hsnn-loadgen-"))
    log = work / "service.log"
    print(f"work dir {work} (service log {log})", flush=True)
    gflops = matmul_gflops()
    print(f"float32 matmul 1024x1024: {gflops:.1f} GFLOP/s", flush=True)
    base = make_world(num_items=20_000, num_categories=CATEGORIES, advertisers_per_category=ADVERTISERS_PER_CATEGORY)
    users = make_users(base, 256, seed=99)[0]
    # requests cycle over the users whose exhaustive top-k is known, so every answer has a recall
    recall_users = users.select(torch.arange(min(args.recall_users, len(users))))
    bodies = user_bodies(recall_users, args.k)
    report: dict = {
        "command": "python -m bench.loadgen " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "matmul_gflops_fp32_1024": gflops,
        },
        "config": {
            "beams": args.beams,
            "nodes": args.nodes,
            "items_budget": args.items_budget,
            "widening": args.widening,
            "capacity_factor": DEFAULT_CAPACITY_FACTOR,
            "recall_users": len(recall_users),
            "open_load": args.open_load,
            "k": args.k,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "duration_s": args.duration,
            "train_steps": args.train_steps,
            "model": args.model,
            "model_overrides": model_overrides(args),
            "threads": args.threads,
            "device": args.device,
        },
        "results": [],
        "corpora": {},
    }
    for num_items in args.ads:
        nodes = args.nodes or index_shape(num_items)
        beams = args.beams or beams_for_budget(nodes, num_items, args.items_budget, args.widening)
        started = time.perf_counter()
        model = train_model(base, args.train_steps, tuple(nodes), seed=0, model=args.model, **model_overrides(args))
        print(
            f"\n{num_items} ads: trained the {args.model} HSNN {nodes} for {args.train_steps} steps in "
            f"{time.perf_counter() - started:.1f}s; beams {beams}",
            flush=True,
        )
        store_dir = work / f"store-{num_items}"
        store = SnapshotStore(store_dir)
        store.promote(store.write(model).version)
        catalog = scaled_catalog(base, num_items, seed=num_items)
        catalog_path = work / f"catalog-{num_items}.safetensors"
        save_catalog(catalog, catalog_path)
        started = time.perf_counter()
        pair = load_pair_from_store(store, 1, catalog, device=args.device)
        build_s = time.perf_counter() - started
        corpus = {"index_build_s": build_s, "codebook_sizes": nodes, "beams": beams, **leaf_stats(pair.index)}
        started = time.perf_counter()
        truth = exhaustive_truth(pair, recall_users.to(args.device), args.k)
        corpus["exhaustive_s_per_user"] = (time.perf_counter() - started) / len(recall_users)
        corpus |= profile_batch(pair, users.to(args.device), beams, args.k)
        report["corpora"][str(num_items)] = corpus
        t1, t32 = corpus["timings"]["batch_1"], corpus["timings"]["batch_32"]
        print(
            f"  index built in {build_s:.1f}s, {corpus['nodes_per_level']} nodes, leaf size mean "
            f"{corpus['leaf_size_mean']:.0f} max {corpus['leaf_size_max']}; in process, precomputed vs plain: "
            f"batch 1 {t1['speedup_vs_plain']:.2f}x, batch 32 {t32['speedup_vs_plain']:.2f}x",
            flush=True,
        )
        del pair
        modes = [(c, args.max_batch) for c in args.concurrency]
        if max(args.concurrency) > 1:
            modes.append((max(args.concurrency), 1))
        for max_batch in sorted({m for _, m in modes}, reverse=True):
            server = serve(store_dir, catalog_path, beams, max_batch, args.max_wait_ms, log, args.threads, args.device)
            with server as (url, process):
                rows = []
                for concurrency in [c for c, m in modes if m == max_batch]:
                    rows.append(asyncio.run(drive(url, bodies, concurrency, args.duration, args.warmup, truth)))
                    rows[-1] |= {"concurrency": concurrency}
                if max_batch == args.max_batch and args.open_load > 0:
                    rate = args.open_load * max(r["qps"] for r in rows)
                    rows.append(asyncio.run(drive_open(url, bodies, rate, args.duration, args.warmup, truth)))
                    rows[-1] |= {"concurrency": 0}  # open loop: no fixed client count
                for result in rows:
                    result |= {"ads": num_items, "max_batch": max_batch, "rss_mb": rss_mb(process.pid)}
                    report["results"].append(result)
                    print(
                        f"  {result['mode']:<6} c={result['concurrency']:<3} max_batch={max_batch:<3} "
                        f"{result['qps']:8.1f} QPS  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                        f"items/query {result['items_scored']:.0f}  recall {result['recall_vs_exhaustive']:.3f}  "
                        f"rss {result['rss_mb']:.0f} MB  errors {result['errors']}",
                        flush=True,
                    )
        write_reports(report, out_dir)  # after every corpus, so a long run leaves its finished rows
    return report


def _row(report: dict, ads: int, concurrency: int, max_batch: int) -> dict | None:
    return next(
        (
            r
            for r in report["results"]
            if (r["ads"], r["concurrency"], r["max_batch"]) == (ads, concurrency, max_batch)
            and r.get("mode", "closed") == "closed"
        ),
        None,
    )


def extrapolate(report: dict, target: int = 10_000_000) -> dict:
    """Items scored, FLOPs and memory per replica at `target` ads, from the measured corpora: per-query costs
    fitted as a + b log10(N) (the budget keeps them near flat), RSS as a + b N over the two largest corpora."""
    closed = [r for r in report["results"] if r.get("mode", "closed") == "closed" and r["concurrency"] == 1]
    by_ads = {r["ads"]: r for r in sorted(closed, key=lambda r: r["ads"])}
    if len(by_ads) < 2:
        return {}
    ads = list(by_ads)

    def log_fit(key: str) -> float:
        x = torch.tensor([math.log10(a) for a in ads], dtype=torch.float64)
        y = torch.tensor([by_ads[a][key] for a in ads], dtype=torch.float64)
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        return float(y.mean() + slope * (math.log10(target) - x.mean()))

    small, large = ads[-2], ads[-1]
    per_ad = (by_ads[large]["rss_mb"] - by_ads[small]["rss_mb"]) / (large - small)  # MiB per ad
    rss = by_ads[large]["rss_mb"] + per_ad * (target - large)
    items = log_fit("items_scored")
    mflops = log_fit("mflops_per_query")
    gflops = report["corpora"][str(large)]["timings"]["batch_32"]["gflops"]
    return {
        "ads": target,
        "items_scored": items,
        "mflops_per_query": mflops,
        "rss_bytes_per_ad": per_ad * 2**20,
        "rss_mb": rss,
        "scoring_ms_at_measured_gflops": mflops / 1e3 / gflops * 1e3 if gflops > 0 else float("nan"),
        "scoring_ms_at_half_matmul": mflops / 1e3 / (0.5 * report["machine"]["matmul_gflops_fp32_1024"]) * 1e3,
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Retrieval API latency",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, torch {machine['torch']}; "
        f"float32 matmul 1024x1024: **{machine['matmul_gflops_fp32_1024']:.1f} GFLOP/s**. "
        f"Index shape from the corpus (`index_shape`), build-time cap {report['config'].get('capacity_factor')} x "
        f"level mean, beams from a budget of {report['config'].get('items_budget')} items scored, widening "
        f"{report['config'].get('widening', 4.0)} "
        f"(`beams_for_budget`; fixed beams/nodes if given: {report['config']['beams']} / {report['config']['nodes']}); "
        f"model {report['config'].get('model')} {report['config'].get('model_overrides')}, "
        f"{report['config'].get('train_steps')} training steps, {report['config'].get('threads')} torch thread(s); "
        f"k={report['config']['k']}, max_wait_ms={report['config']['max_wait_ms']} (adaptive), "
        f"{report['config']['duration_s']} s per row. Recall is recall@{report['config']['k']} of the served top-k "
        f"vs the same model's exhaustive top-k ({report['config'].get('recall_users')} users). Open loop: "
        f"{report['config'].get('open_load')} x the best closed-loop QPS, latency from the intended send time. "
        "The machine is shared with other benchmark runs: compare rows measured side by side, not absolute times.",
        "",
        "| ads | mode | clients | max_batch | QPS | p50 ms | p99 ms | items scored/query | MFLOPs/query | "
        "recall vs exhaustive | RSS MB | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        mode = r.get("mode", "closed")
        clients = f"{r.get('offered_qps', 0):.1f}/s" if mode == "open" else str(r["concurrency"])
        lines.append(
            f"| {r['ads']:,} | {mode} | {clients} | {r['max_batch']} | {r['qps']:.1f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['items_scored']:.0f} | {r['mflops_per_query']:.2f} | "
            f"{r.get('recall_vs_exhaustive', float('nan')):.3f} | {r.get('rss_mb', float('nan')):.0f} | "
            f"{sum(r['errors'].values())} |"
        )
    lines += [
        "",
        "In process (no HTTP), the same batch timed with the precomputed item halves and with plain "
        "`pair_logits`, interleaved:",
        "",
        "| ads | codebooks | beams | nodes used per level | mean / max leaf size | index build s | "
        "batch 1 ms (plain) | speed-up | batch 32 ms per query (plain) | speed-up | scoring GFLOP/s (batch 32) |",
        "| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ads, c in report["corpora"].items():
        t1, t32 = c["timings"]["batch_1"], c["timings"]["batch_32"]
        p1, p32 = c["timings"].get("batch_1_plain", t1), c["timings"].get("batch_32_plain", t32)
        lines.append(
            f"| {int(ads):,} | {c.get('codebook_sizes')} | {c.get('beams')} | {c['nodes_per_level']} | "
            f"{c['leaf_size_mean']:.0f} / {c['leaf_size_max']} | {c['index_build_s']:.1f} | "
            f"{t1['ms']:.2f} ({p1['ms']:.2f}) | {t1.get('speedup_vs_plain', 1):.2f}x | "
            f"{t32['ms_per_query']:.2f} ({p32['ms_per_query']:.2f}) | {t32.get('speedup_vs_plain', 1):.2f}x | "
            f"{t32['gflops']:.2f} |"
        )
    ads = [int(a) for a in report["corpora"]]
    biggest_c = max(r["concurrency"] for r in report["results"])
    lines += ["", "## Targets", ""]
    single_big = _row(report, max(ads), 1, report["config"]["max_batch"])
    single_small = _row(report, min(ads), 1, report["config"]["max_batch"])
    if single_big and single_small and single_small["p99_ms"] > 0:
        lines.append(
            f"- p99 single request at {max(ads):,} ads: {single_big['p99_ms']:.2f} ms (target <= 20 ms"
            f"{' at 10^6' if max(ads) != 1_000_000 else ''})."
        )
        lines.append(
            f"- p99 growth {min(ads):,} -> {max(ads):,} ads: "
            f"{single_big['p99_ms'] / single_small['p99_ms']:.2f}x (target <= 2x from 10^4 to 10^6)."
        )
    for a in ads:
        on = _row(report, a, biggest_c, report["config"]["max_batch"])
        off = _row(report, a, biggest_c, 1)
        if on and off and off["qps"] > 0:
            lines.append(
                f"- batching gain at {a:,} ads, {biggest_c} clients: {on['qps'] / off['qps']:.2f}x QPS (target >= 3x)."
            )
        recalls = [r["recall_vs_exhaustive"] for r in report["results"] if r["ads"] == a and r.get("recall_samples")]
        if recalls:
            lines.append(f"- recall@k vs exhaustive at {a:,} ads: {min(recalls):.3f} (worst row; target >= 0.9).")
        opened = next((r for r in report["results"] if r["ads"] == a and r.get("mode") == "open"), None)
        if opened:
            lines.append(
                f"- open loop at {a:,} ads, {opened['offered_qps']:.1f} req/s offered: p99 {opened['p99_ms']:.2f} ms "
                "(target <= 50 ms at 80% of max QPS)."
            )
        gflops = report["corpora"][str(a)]["timings"]["batch_32"]["gflops"]
        share = gflops / report["machine"]["matmul_gflops_fp32_1024"]
        lines.append(f"- scoring at {a:,} ads: {gflops:.2f} GFLOP/s, {share:.1%} of matmul (target >= 50%).")
    paper = extrapolate(report)
    if paper:
        lines += [
            "",
            f"## {paper['ads']:,} ads on paper (`extrapolate`: per-query costs a + b log10 N, RSS a + b N)",
            "",
            f"- items scored per query: {paper['items_scored']:.0f}; {paper['mflops_per_query']:.1f} MFLOPs per query",
            f"- scoring time per query: {paper['scoring_ms_at_measured_gflops']:.1f} ms at the measured scoring "
            f"GFLOP/s, {paper['scoring_ms_at_half_matmul']:.2f} ms at half the matmul roofline",
            f"- RSS per replica: {paper['rss_mb'] / 1024:.1f} GiB ({paper['rss_bytes_per_ad']:.0f} B per ad "
            "between the two largest corpora)",
        ]
    first = report["corpora"][str(max(ads))]
    lines += [
        "",
        f"## Where the time goes (cProfile of 5 in-process batches of 32 at {max(ads):,} ads, by tottime)",
        "",
        "```",
        *first["profile_top_tottime"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = sorted({(r.get("mode", "closed"), r["concurrency"], r["max_batch"]) for r in report["results"]})
    for mode, concurrency, max_batch in modes:
        rows = sorted(
            (
                r
                for r in report["results"]
                if (r.get("mode", "closed"), r["concurrency"], r["max_batch"]) == (mode, concurrency, max_batch)
            ),
            key=lambda r: r["ads"],
        )
        if mode == "open":
            label = f"open loop at {report['config'].get('open_load')} x max QPS, max_batch={max_batch}"
        else:
            label = f"{concurrency} client{'s' if concurrency > 1 else ''}, max_batch={max_batch}"
        line = ax.plot([r["ads"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=f"p99, {label}")
        ax.plot(
            [r["ads"] for r in rows],
            [r["p50_ms"] for r in rows],
            marker=".",
            linestyle="--",
            color=line[0].get_color(),
            label=f"p50, {label}",
        )
    ax.axhline(20, color="grey", linewidth=0.8, linestyle=":", label="20 ms target (single request, p99)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ads in the corpus")
    ax.set_ylabel("latency (ms)")
    ax.set_title(
        f"POST /retrieve latency, ~{report['config'].get('items_budget')} items scored, "
        f"{report['machine']['cpus']} CPUs"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(report: dict, out_dir: Path) -> None:
    report["extrapolated"] = extrapolate(report)
    (out_dir / "api_latency.json").write_text(json.dumps(report, indent=2))
    (out_dir / "api_latency.md").write_text(markdown(report))
    try:
        plot(report, out_dir / "api_latency.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(f"\nwrote {out_dir}/api_latency.json, .md, .png", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int_at_least(1), nargs="+", default=[10_000, 100_000], help="corpus sizes")
    parser.add_argument("--concurrency", type=int_at_least(1), nargs="+", default=[1, 32], help="concurrent clients")
    parser.add_argument("--duration", type=float_above(0), default=10.0, help="measured seconds per row")
    parser.add_argument(
        "--warmup", type=float_above(0, inclusive=True), default=1.0, help="unmeasured seconds before each row"
    )
    parser.add_argument(
        "--beams", type=int_at_least(1), nargs="+", help="nodes kept per level (default: from --items-budget)"
    )
    parser.add_argument(
        "--items-budget", type=int_at_least(1), default=3000, help="items scored per query the beams aim at"
    )
    parser.add_argument(
        "--widening",
        type=float_above(1.0, inclusive=True),
        default=SERVING_WIDENING,
        help="parents kept per level: this many x the parents the next beam needs (beams_for_budget)",
    )
    parser.add_argument(
        "--nodes", type=int_at_least(2), nargs="+", help="codebook size per level (default: index_shape(ads))"
    )
    parser.add_argument(
        "--open-load", type=float_above(0), default=0.8, help="open-loop rate as a share of the best QPS"
    )
    parser.add_argument(
        "--recall-users", type=int_at_least(1), default=32, help="users sent (their exhaustive top-k is known)"
    )
    parser.add_argument("--train-steps", type=int_at_least(1), default=400, help="training steps of 256 impressions")
    parser.add_argument("--k", type=int_at_least(1, MAX_K), default=100, help="ads per request")
    parser.add_argument("--max-batch", type=int_at_least(1), default=32, help="max_batch of the batching runs")
    parser.add_argument(
        "--max-wait-ms", type=float_above(0, inclusive=True), default=2.0, help="max_wait_ms of the batching runs"
    )
    parser.add_argument("--model", default="paper", choices=["paper", "tiny"], help="served HSNN (`model_config`)")
    parser.add_argument(
        "--index-input",
        default="score_profile",
        choices=["score_profile", "item_embedding"],
        help="what the index clusters (HSNNConfig.index_input): score_profile puts items the same users like "
        "in one leaf (the beam's ceiling at 2,000 items: 0.94 vs 0.79 with item_embedding at 10^4)",
    )
    parser.add_argument(
        "--probe-users", type=int_at_least(1), default=32, help="probe users of the score_profile input"
    )
    parser.add_argument(
        "--threads", type=int_at_least(1), default=1, help="torch threads, in process and in the service"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="HSNN_API_DEVICE of the service")
    parser.add_argument("--out", default="reports", help="output directory")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the .md/.png (and extrapolation) from a report")
    args = parser.parse_args(argv)
    if args.render:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_reports(json.loads(Path(args.render).read_text()), Path(args.out))
        return
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
