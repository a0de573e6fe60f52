"""Every service's Prometheus registry: one label vocabulary, and the process metrics on each scrape target."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from indexer.metrics import IndexerMetrics
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from trainer.metrics import TrainerMetrics
from trainer.publisher import PublisherMetrics

# The label names a service metric may carry, one per idea: the result of a request or an event is always
# `outcome` (never status, kind or result), why something happened is `reason` (never cause), the dependency
# that failed is `system`. One dashboard query shape then works for every service.
LABEL_VOCABULARY = frozenset({"outcome", "reason", "system", "partition", "level"})


def _metric_holders() -> dict[str, list[object]]:
    """Each service's metrics objects (the API's from a real app)."""
    trainer = CollectorRegistry()
    return {
        "api": [create_app(ApiSettings()).state.metrics],
        "indexer": [IndexerMetrics()],
        "trainer": [TrainerMetrics(trainer), PublisherMetrics(trainer)],
    }


def _registries() -> dict[str, CollectorRegistry]:
    return {service: holders[0].registry for service, holders in _metric_holders().items() if service != "trainer"}


@pytest.mark.parametrize("service", ["api", "indexer", "trainer"])
def test_hsnn_metrics_use_the_shared_label_vocabulary(service: str) -> None:
    """Label names are checked on the declarations, so a series that has not been observed yet counts too."""
    declared = {
        (metric._name, label)
        for holder in _metric_holders()[service]
        for metric in vars(holder).values()
        if isinstance(metric, MetricWrapperBase)
        for label in metric._labelnames
    }
    assert declared, f"no labelled metrics found for {service}"
    strays = sorted(pair for pair in declared if pair[1] not in LABEL_VOCABULARY)
    assert not strays, f"labels outside {sorted(LABEL_VOCABULARY)}: {strays}"


def test_api_counts_requests_by_outcome() -> None:
    with TestClient(create_app(ApiSettings())) as client:
        assert client.post("/retrieve", json={"user": {"dense": [0.0]}, "k": 1}).status_code == 503
        registry = client.app.state.metrics.registry
    latency = registry.get_sample_value("hsnn_api_request_latency_seconds_count", {"outcome": "not_ready"})
    errors = registry.get_sample_value("hsnn_api_errors_total", {"outcome": "not_ready"})
    assert latency == errors == 1


@pytest.mark.parametrize("service", ["api", "indexer"])
def test_service_registries_export_process_metrics(service: str) -> None:
    """The API and the indexer build their own registries; CPU and memory must still be scraped from them."""
    names = {family.name for family in _registries()[service].collect()}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= names


def test_api_metrics_endpoint_serves_process_metrics() -> None:
    with TestClient(create_app(ApiSettings())) as client:
        text = client.get("/metrics").text
    assert "\nprocess_resident_memory_bytes " in text and "\nprocess_cpu_seconds_total " in text
