"""The Prometheus registry every service exports: its own metrics plus the process ones.

A service that builds its own `CollectorRegistry` (so several can live in one test process) loses the
default registry's `process_*` (CPU, resident memory, open fds), `python_info` and `python_gc_*` series;
`service_registry()` puts them back, so every scrape target answers the same CPU/memory questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)


def service_registry() -> CollectorRegistry:
    """A fresh registry that already exports the process, platform and garbage-collector metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class Declare:
    """Declares a service's series in one registry (None: the client's default one), so each declaration is
    its name, help text, label names and, for a histogram, its buckets."""

    def __init__(self, registry: CollectorRegistry | None):
        self._where: dict[str, Any] = {"registry": registry} if registry is not None else {}

    def gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(name, doc, labels, **self._where)

    def counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, labels, **self._where)

    def histogram(self, name: str, doc: str, buckets: Sequence[float], *labels: str) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, **self._where)
