"""The Prometheus registry every service exports: its own metrics plus the process ones.

A service that builds its own `CollectorRegistry` (so several can live in one test process) loses the
default registry's `process_*` (CPU, resident memory, open fds), `python_info` and `python_gc_*` series;
`service_registry()` puts them back, so every scrape target answers the same CPU/memory questions.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector


def service_registry() -> CollectorRegistry:
    """A fresh registry that already exports the process, platform and garbage-collector metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
