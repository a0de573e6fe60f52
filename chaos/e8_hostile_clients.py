"""E8: hostile clients against the API process: 200 MB bodies, slowloris sockets, 1,000 concurrent clients.

    python -m chaos e8                                   # full size (about 2.5 minutes)
    python -m chaos e8 --slowloris 200 --clients 200 --seconds 10 --slowloris-seconds 25   # scaled

The API runs as its own process (`python -m retrieval_api`: a tiny model over a planted catalogue,
so its resident memory is its own), with its default limits. Three phases, one after the other:

1. Bodies: a `--body-mb` body to POST /retrieve and to POST /items/events (authenticated), once with
   a Content-Length and once chunked; the client keeps sending until the server answers.
2. Slowloris: `--slowloris` sockets each send a request's headers one byte per `--trickle-s` and never
   finish them, for `--slowloris-seconds`; a socket the server closes is opened again. Meanwhile
   `--probes` closed-loop clients time POST /retrieve.
3. Concurrency: `--clients` closed-loop clients POST /retrieve for `--seconds`.

Pass: every body is answered 413 while the client is still sending, and the server's RSS grows by
less than 2 MB beyond `max_body_bytes` (4 MiB: the most of a body the request gate holds) for
each; /retrieve answers 200 to every probe while the slowloris sockets are held, and the server
closes them (`header_timeout_s`); the concurrent clients get only 200, 429 and 504, and no
connection error; the API's RSS after the three phases is within +-`--rss-tolerance` of its RSS
before them (after a warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.loadgen import drive, rss_mb
from chaos.harness import api_service, wait_ready
from chaos.report import ExperimentResult, loop_result, parse_options
from chaos.world import BEAMS, closed_loop, free_port, planted_world, request_bodies, tiny_model
from retrieval_api.settings import ApiSettings
from streaming.snapshots import SnapshotStore

TOKEN = "chaos-e8-token"
CHUNK = b"[" + b"1," * (32 << 10)  # 64 KiB of a JSON array that never ends
TRICKLE = b"POST /retrieve HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n" + b"X-Slow: 1\r\n" * 10_000


def upload(port: int, path: str, chunked: bool, headers: dict[str, str], body_mb: int = 200) -> tuple[int, int]:
    """Send a `body_mb` body (declared, or chunked without a length) until the server answers; (status, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = [f"POST {path} HTTP/1.1", "Host: api", "Content-Type: application/json", *map(": ".join, headers.items())]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {body_mb << 20}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sent = 0

    def send() -> None:
        nonlocal sent
        frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
        try:
            while sent < body_mb << 20:
                sock.sendall(frame)
                sent += len(CHUNK)
        except OSError:  # the server answered and closed: it does not read the rest
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    status_line = sock.makefile("rb").readline().decode()
    sock.close()
    sender.join(timeout=30)
    return int(status_line.split()[1]), sent


def bodies_phase(pid: int, port: int, body_mb: int) -> dict[str, Any]:
    """Each oversized upload once: its status, bytes sent before the answer, and the server's RSS growth."""
    out = {}
    for path in ("/retrieve", "/items/events"):
        headers = {"Authorization": f"Bearer {TOKEN}"} if path == "/items/events" else {}
        for chunked in (False, True):
            before = rss_mb(pid)
            status, sent = upload(port, path, chunked, headers, body_mb)
            out[f"{path} {'chunked' if chunked else 'content-length'}"] = {
                "status": status,
                "sent_mb": round(sent / (1 << 20), 1),
                "rss_growth_mb": round(rss_mb(pid) - before, 1),
            }
    return out


async def slowloris_phase(url: str, port: int, bodies: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """`--slowloris` sockets trickling headers for `--slowloris-seconds` while `--probes` clients time /retrieve."""
    stop = asyncio.Event()
    opened, closed_by_server, held_s = 0, 0, []
    open_now = 0
    most_open = 0

    async def slow_socket(number: int) -> None:
        nonlocal opened, closed_by_server, open_now, most_open
        await asyncio.sleep(number * 0.002)  # 1,000 connections over 2 s, not in one burst
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            opened += 1
            open_now += 1
            most_open = max(most_open, open_now)
            since = time.monotonic()
            try:
                for byte in TRICKLE:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(args.trickle_s)
                    if stop.is_set():
                        break
                    if reader.at_eof():
                        raise ConnectionResetError("closed by the server")
            except OSError:
                closed_by_server += 1
                held_s.append(time.monotonic() - since)
            finally:
                open_now -= 1
                writer.close()

    sockets = [asyncio.create_task(slow_socket(n)) for n in range(args.slowloris)]
    await asyncio.sleep(min(5.0, args.slowloris_seconds / 4))  # let them connect before timing /retrieve
    probe = await drive(url, bodies, args.probes, args.slowloris_seconds, 0.0, truth={})
    stop.set()
    await asyncio.gather(*sockets, return_exceptions=True)
    return {
        "sockets_opened": opened,
        "most_open_at_once": most_open,
        "closed_by_server": closed_by_server,
        "held_s_median": round(statistics.median(held_s), 1) if held_s else None,
        "held_s_max": round(max(held_s), 1) if held_s else None,
        "retrieve_while_held": _retrieve_summary(probe),
    }


def _retrieve_summary(summary: dict[str, Any]) -> dict[str, Any]:
    statuses = {"200": summary["requests"], **{str(code): n for code, n in summary["errors"].items()}}
    return {
        "statuses": statuses,
        "qps": round(summary["qps"], 1),
        "p50_ms": round(summary["p50_ms"], 1),
        "p99_ms": round(summary["p99_ms"], 1),
    }


def run(args: argparse.Namespace) -> ExperimentResult:
    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-e8-"))
    started = time.monotonic()
    world = planted_world()
    bodies = request_bodies(world, 64)
    store = SnapshotStore(work / "store")
    store.promote(store.write(tiny_model(args.seed)).version)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dead_broker = f"127.0.0.1:{free_port()}"  # item bodies are refused before anything reaches Kafka
    api = api_service(
        store,
        work / "logs",
        port,
        (dead_broker, "e8-items", TOKEN),
        beams=BEAMS,
        catalog=f"planted:{world.item_ids.numel()}:5",
        header_timeout_s=args.header_timeout,
    )
    try:
        api.start()
        wait_ready(api, url)
        pid = api.proc.pid  # type: ignore[union-attr]
        asyncio.run(drive(url, bodies, 8, 5.0, 1.0, truth={}))  # warm-up: first-request allocations are not E8's
        bodies_phase(pid, port, 8)
        time.sleep(1.0)
        rss_before = rss_mb(pid)
        uploads = bodies_phase(pid, port, args.body_mb)
        slowloris = asyncio.run(slowloris_phase(url, port, bodies, args))
        rss_after_slowloris = rss_mb(pid)
        concurrent = asyncio.run(closed_loop(port, bodies, args.clients, args.seconds, args.client_timeout))
        rss_peak = _peak_rss_mb(pid)
        time.sleep(args.settle)
        rss_after = rss_mb(pid)
        api_alive = api.alive
        exit_code = api.stop(timeout=30)
    finally:
        if api.alive:
            api.kill()
    body_limit = args.body_mb << 20
    held_mb = ApiSettings().max_body_bytes / (1 << 20)  # the request gate holds at most this much of a body
    rss_change = rss_after / rss_before - 1
    statuses = concurrent["statuses"]
    probe_statuses = slowloris["retrieve_while_held"]["statuses"]
    checks = {
        "bodies_413_before_buffered": all(
            u["status"] == 413 and u["sent_mb"] * (1 << 20) < body_limit and u["rss_growth_mb"] < held_mb + 2
            for u in uploads.values()
        ),
        "retrieve_answered_while_slowloris_held": set(probe_statuses) == {"200"} and probe_statuses["200"] > 0,
        "slowloris_sockets_closed_by_server": slowloris["closed_by_server"] > 0,
        "slowloris_held_at_once": slowloris["most_open_at_once"] >= args.slowloris * 0.95,
        "concurrent_only_200_429_504": not concurrent["errors"] and set(statuses) <= {"200", "429", "504"},
        "rss_within_tolerance": abs(rss_change) <= args.rss_tolerance,
        "api_stayed_up": api_alive and exit_code in (0, -signal.SIGTERM),  # uvicorn re-raises the SIGTERM it handled
    }
    details = {
        "faults": f"{len(uploads)} x {args.body_mb} MB bodies, {slowloris['sockets_opened']} slowloris sockets, "
        f"{args.clients} concurrent clients",
        "uploads": uploads,
        "slowloris": slowloris,
        "concurrent_clients": concurrent,
        "rss_mb": {
            "before": round(rss_before, 1),
            "after_slowloris": round(rss_after_slowloris, 1),
            "peak_during_concurrency": rss_peak,
            "after": round(rss_after, 1),
            "change": round(rss_change, 3),
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    title = (
        f"{args.body_mb} MB bodies, {args.slowloris:,} slowloris sockets, {args.clients:,} concurrent clients for "
        f"{args.seconds:g} s (413 after <= {max(u['sent_mb'] for u in uploads.values()):g} MB; RSS "
        f"{rss_change:+.1%}; statuses {', '.join(sorted(statuses)) or 'none'})"
    )
    faults = len(uploads) + slowloris["sockets_opened"] + args.clients
    result = loop_result(
        args, "e8", title, started, work, checks, details, faults_injected=faults, lost=0, duplicated=0
    )
    result.http_5xx = sum(n for code, n in {**statuses, **probe_statuses}.items() if int(code) >= 500 and code != "504")
    result.timeouts = sum(n for kind, n in concurrent["errors"].items() if "Timeout" in kind)
    return result


def _peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the most the process has ever held resident (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


OPTIONS = (
    ("--body-mb", int, 200, "size of each oversized body"),
    ("--slowloris", int, 1000, "slowloris sockets held at once"),
    ("--trickle-s", float, 1.0, "seconds between a slowloris socket's bytes"),
    ("--slowloris-seconds", float, 45.0, "seconds /retrieve is timed meanwhile"),
    ("--probes", int, 4, "closed-loop /retrieve clients during slowloris"),
    ("--clients", int, 1000, "concurrent closed-loop /retrieve clients"),
    ("--seconds", float, 60.0, "measured seconds of the concurrent clients"),
    ("--client-timeout", float, 60.0, "seconds a client waits for an answer"),
    ("--settle", float, 5.0, "seconds after the load before RSS is read"),
    ("--header-timeout", float, ApiSettings().header_timeout_s, "the API's header_timeout_s (its default)"),
    ("--rss-tolerance", float, 0.10, "allowed relative RSS change"),
)


def parse(argv: list[str]) -> argparse.Namespace:
    return parse_options("e8", __doc__.splitlines()[0], OPTIONS, argv)
