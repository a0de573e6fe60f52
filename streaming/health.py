"""Liveness from the main loop: a heartbeat the loop beats, served with /metrics on one port.

`prometheus_client.start_http_server` answers from its own thread, so a main loop stuck in a
call that never returns still looks alive to a probe of /metrics. Here /livez answers 503 once the
loop has not beaten for `max_age_s`, and k8s restarts the pod; /metrics is served as before.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


class Heartbeat:
    """The main loop calls `beat()` once per iteration; a probe reads `age()`."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self._last

    def alive(self) -> bool:
        return self.age() <= self.max_age_s


def serve_metrics_and_liveness(
    port: int, heartbeat: Heartbeat, registry: CollectorRegistry = REGISTRY, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve GET /metrics (Prometheus text) and GET /livez (200 or 503) from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/livez":
                age = heartbeat.age()
                status = 200 if age <= heartbeat.max_age_s else 503
                body = f"main loop last beat {age:.1f}s ago (limit {heartbeat.max_age_s:.0f}s)\n".encode()
                self._answer(status, body, "text/plain; charset=utf-8")
            else:
                self._answer(404, b"not found\n", "text/plain; charset=utf-8")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds are not worth a log line."""

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-liveness", daemon=True).start()
    return server
