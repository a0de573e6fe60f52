"""Load generator and latency benchmark of the retrieval API (a report, not a test).

    python -m retrieval_api.loadgen --ads 10000 100000 1000000 --concurrency 1 32 --duration 10

For each corpus size N it:

1. trains a tiny HSNN once on the planted problem (a 20k-ad world with 64 categories), writes it
   to a snapshot store, and generates N ads from the same categories vectorised (same category
   centres, advertisers nested in categories), saved as a catalogue file;
2. starts the real service (`python -m retrieval_api`) in a child process on a free port, which
   loads the snapshot and builds the index through the hot-swap watcher;
3. drives POST /retrieve with httpx at each concurrency (closed loop: every client sends its next
   request when the previous one is answered) for `--duration` seconds after a warm-up, and
   records p50/p99 latency and QPS; 32 concurrent clients run twice, with batching on and with
   max_batch=1, to show the batching gain;
4. profiles one batch of 32 in process (cProfile) and compares the scoring FLOP/s (from the
   cost accounting) with the machine's float32 matmul GFLOP/s.

Writes reports/api_latency.json, reports/api_latency.md and reports/api_latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
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

from hsnn.features import ItemBatch, UserBatch
from hsnn.model import HSNN
from hsnn.planted import PlantedWorld, make_batches, make_users, make_world, tiny_hsnn_config
from hsnn.serving import retrieve
from hsnn.snapshots import SnapshotStore
from hsnn.training import train
from retrieval_api.catalogs import save_catalog
from retrieval_api.state import Catalog, load_pair_from_store

CATEGORIES = 64
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


def train_model(base: PlantedWorld, steps: int, nodes: tuple[int, int], seed: int) -> HSNN:
    torch.manual_seed(seed)
    model = HSNN(tiny_hsnn_config(num_nodes=nodes))
    batches = make_batches(base, max(1, steps // 4), 256, seed=seed + 1, users_per_batch=64)
    train(model, (batches * 4)[:steps])
    return model.eval()


def user_bodies(users: UserBatch, k: int) -> list[dict]:
    bodies = []
    for row in range(len(users)):
        live = users.history["item_id"][row] > 0
        history = [
            {
                "attributes": {name: int(values[row, h]) for name, values in users.history.items()},
                "age_hours": round(float(users.history_age[row, h]), 3),
            }
            for h in torch.nonzero(live).flatten().tolist()
        ]
        sparse = {name: [i for i in ids[row].tolist() if i > 0] for name, ids in users.sparse.items()}
        user = {"dense": users.dense[row].tolist(), "sparse": sparse, "history": history}
        bodies.append({"user": user, "k": k})
    return bodies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(store_dir: Path, catalog_path: Path, beams: list[int], max_batch: int, max_wait_ms: float, log: Path):
    """The real service in a child process; yields its base URL once /readyz answers 200."""
    port = free_port()
    env = {
        **os.environ,
        "HSNN_API_BEAMS": json.dumps(beams),
        "HSNN_API_MAX_BATCH": str(max_batch),
        "HSNN_API_MAX_WAIT_MS": str(max_wait_ms),
        "HSNN_API_QUEUE_SIZE": "1024",
    }
    command = [sys.executable, "-m", "retrieval_api", "--port", str(port), "--store-dir", str(store_dir)]
    command += ["--catalog", str(catalog_path), "--log-level", "warning"]
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
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def drive(url: str, bodies: list[dict], concurrency: int, duration: float, warmup: float) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request when answered."""
    latencies: list[float] = []
    items_scored: list[int] = []
    flops: list[int] = []
    errors: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        measuring = False
        stop = False

        async def client_loop(number: int) -> None:
            i = number
            while not stop:
                body = bodies[i % len(bodies)]
                i += concurrency
                started = time.perf_counter()
                response = await client.post("/retrieve", json=body)
                elapsed = time.perf_counter() - started
                if not measuring:
                    continue
                if response.status_code != 200:
                    errors[response.status_code] = errors.get(response.status_code, 0) + 1
                    continue
                latencies.append(elapsed)
                cost = response.json()["cost"]
                items_scored.append(cost["items_scored"])
                flops.append(cost["flops"])

        tasks = [asyncio.create_task(client_loop(n)) for n in range(concurrency)]
        await asyncio.sleep(warmup)
        measuring = True
        started = time.perf_counter()
        await asyncio.sleep(duration)
        measuring, stop = False, True
        elapsed = time.perf_counter() - started
        await asyncio.gather(*tasks)
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    return {
        "requests": len(latencies),
        "errors": errors,
        "qps": len(latencies) / elapsed,
        "p50_ms": quantile(0.50),
        "p99_ms": quantile(0.99),
        "mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else float("nan"),
        "items_scored": sum(items_scored) / len(items_scored) if items_scored else 0,
        "mflops_per_query": sum(flops) / len(flops) / 1e6 if flops else 0,
    }


def profile_batch(pair, users: UserBatch, beams: list[int], k: int, batch: int = 32) -> dict:
    """In-process scoring of one batch (no HTTP): wall time, FLOP/s, and where the time goes (cProfile)."""
    torch.set_num_threads(os.cpu_count() or 1)
    chosen = users.select(torch.arange(batch) % len(users))
    single = users.select(torch.tensor([0]))
    for _ in range(3):
        retrieve(pair.model, pair.index, chosen, k=k, beams=beams)
    timings = {}
    for name, group in (("batch_1", single), (f"batch_{batch}", chosen)):
        runs, started = 0, time.perf_counter()
        while runs < 5 or time.perf_counter() - started < 2:
            results = retrieve(pair.model, pair.index, group, k=k, beams=beams)
            runs += 1
        seconds = (time.perf_counter() - started) / runs
        total_flops = sum(r.cost.flops for r in results)
        timings[name] = {
            "ms": seconds * 1000,
            "ms_per_query": seconds * 1000 / len(group),
            "gflops": total_flops / seconds / 1e9,
        }
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
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hsnn-loadgen-"))
    log = work / "service.log"
    print(f"work dir {work} (service log {log})", flush=True)
    gflops = matmul_gflops()
    print(f"float32 matmul 1024x1024: {gflops:.1f} GFLOP/s", flush=True)
    base = make_world(num_items=20_000, num_categories=CATEGORIES, advertisers_per_category=ADVERTISERS_PER_CATEGORY)
    started = time.perf_counter()
    model = train_model(base, args.train_steps, tuple(args.nodes), seed=0)
    print(
        f"trained a tiny HSNN {tuple(args.nodes)} for {args.train_steps} steps in {time.perf_counter() - started:.1f}s",
        flush=True,
    )
    users = make_users(base, 256, seed=99)[0]
    bodies = user_bodies(users, args.k)
    report: dict = {
        "command": "python -m retrieval_api.loadgen " + " ".join(sys.argv[1:]),
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
            "k": args.k,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "duration_s": args.duration,
            "train_steps": args.train_steps,
        },
        "results": [],
        "corpora": {},
    }
    for num_items in args.ads:
        store_dir = work / f"store-{num_items}"
        store = SnapshotStore(store_dir)
        store.promote(store.write(model).version)
        catalog = scaled_catalog(base, num_items, seed=num_items)
        catalog_path = work / f"catalog-{num_items}.safetensors"
        save_catalog(catalog, catalog_path)
        started = time.perf_counter()
        pair = load_pair_from_store(store, 1, catalog)
        build_s = time.perf_counter() - started
        corpus = {"index_build_s": build_s, **leaf_stats(pair.index)}
        corpus |= profile_batch(pair, users, args.beams, args.k)
        report["corpora"][str(num_items)] = corpus
        print(
            f"\n{num_items} ads: index built in {build_s:.1f}s, {corpus['nodes_per_level']} nodes, "
            f"leaf size mean {corpus['leaf_size_mean']:.0f} max {corpus['leaf_size_max']}",
            flush=True,
        )
        del pair
        modes = [(c, args.max_batch) for c in args.concurrency]
        if max(args.concurrency) > 1:
            modes.append((max(args.concurrency), 1))
        for max_batch in sorted({m for _, m in modes}, reverse=True):
            with serve(store_dir, catalog_path, args.beams, max_batch, args.max_wait_ms, log) as url:
                for concurrency in [c for c, m in modes if m == max_batch]:
                    result = asyncio.run(drive(url, bodies, concurrency, args.duration, args.warmup))
                    result |= {"ads": num_items, "concurrency": concurrency, "max_batch": max_batch}
                    report["results"].append(result)
                    print(
                        f"  c={concurrency:<3} max_batch={max_batch:<3} {result['qps']:8.1f} QPS  "
                        f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                        f"items/query {result['items_scored']:.0f}  errors {result['errors']}",
                        flush=True,
                    )
    write_reports(report, out_dir)
    return report


def _row(report: dict, ads: int, concurrency: int, max_batch: int) -> dict | None:
    return next(
        (r for r in report["results"] if (r["ads"], r["concurrency"], r["max_batch"]) == (ads, concurrency, max_batch)),
        None,
    )


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Retrieval API latency",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, torch {machine['torch']}; "
        f"float32 matmul 1024x1024: **{machine['matmul_gflops_fp32_1024']:.1f} GFLOP/s**. "
        f"Beams {report['config']['beams']}, k={report['config']['k']}, index nodes {report['config']['nodes']}, "
        f"max_wait_ms={report['config']['max_wait_ms']}, {report['config']['duration_s']} s per row.",
        "",
        "| ads | clients | max_batch | QPS | p50 ms | p99 ms | items scored/query | MFLOPs/query | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['ads']:,} | {r['concurrency']} | {r['max_batch']} | {r['qps']:.1f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['items_scored']:.0f} | {r['mflops_per_query']:.1f} | "
            f"{sum(r['errors'].values())} |"
        )
    lines += [
        "",
        "| ads | nodes per level | mean / max leaf size | index build s | in-process ms: batch 1 | "
        "batch 32 (per query) | scoring GFLOP/s (batch 32) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for ads, c in report["corpora"].items():
        t1, t32 = c["timings"]["batch_1"], c["timings"]["batch_32"]
        lines.append(
            f"| {int(ads):,} | {c['nodes_per_level']} | {c['leaf_size_mean']:.0f} / {c['leaf_size_max']} | "
            f"{c['index_build_s']:.1f} | {t1['ms']:.2f} | {t32['ms']:.1f} ({t32['ms_per_query']:.2f}) | "
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
    modes = sorted({(r["concurrency"], r["max_batch"]) for r in report["results"]})
    for concurrency, max_batch in modes:
        rows = sorted(
            (r for r in report["results"] if (r["concurrency"], r["max_batch"]) == (concurrency, max_batch)),
            key=lambda r: r["ads"],
        )
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
    ax.set_title(f"POST /retrieve latency, beams {report['config']['beams']}, {report['machine']['cpus']} CPUs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(report: dict, out_dir: Path) -> None:
    (out_dir / "api_latency.json").write_text(json.dumps(report, indent=2))
    (out_dir / "api_latency.md").write_text(markdown(report))
    try:
        plot(report, out_dir / "api_latency.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(f"\nwrote {out_dir}/api_latency.json, .md, .png", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval_api.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, nargs="+", default=[10_000, 100_000], help="corpus sizes")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent clients")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row")
    parser.add_argument("--beams", type=int, nargs="+", default=[8, 16], help="nodes kept per level")
    parser.add_argument("--nodes", type=int, nargs=2, default=[32, 32], help="codebook size per index level")
    parser.add_argument("--train-steps", type=int, default=150, help="training steps of 256 impressions")
    parser.add_argument("--k", type=int, default=100, help="ads per request")
    parser.add_argument("--max-batch", type=int, default=32, help="max_batch of the batching runs")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="max_wait_ms of the batching runs")
    parser.add_argument("--out", default="reports", help="output directory")
    args = parser.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
