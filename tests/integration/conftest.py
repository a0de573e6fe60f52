"""Session-wide real Kafka and Redis servers for integration tests.

Without the servers installed (devservers/install.sh) the fixtures skip, so a
plain `pytest` works on a laptop. CI sets HSNN_REQUIRE_SERVERS=1 to turn those
skips into failures: a broken install must not pass as "all skipped".
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from devservers import KafkaServer, RedisServer
from devservers.redis import redis_server_executable

REQUIRE_SERVERS = os.environ.get("HSNN_REQUIRE_SERVERS", "") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: talks to a real Kafka broker / Redis server started by the test setup"
    )


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVERS:
        pytest.fail(f"HSNN_REQUIRE_SERVERS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    """One broker per test session (start-up costs seconds); data under pytest's tmp dir."""
    reason = KafkaServer.unavailable_reason()
    if reason is not None:
        _unavailable(reason)
    with KafkaServer(tmp_path_factory.mktemp("kafka")) as server:  # started, and stopped at the end
        yield server


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of redis-server, for tests that launch their own (e.g. via the CLI)."""
    binary = redis_server_executable()
    if binary is None:
        _unavailable(RedisServer.unavailable_reason() or "redis-server not found")
    assert binary is not None
    return binary


@pytest.fixture(scope="session")
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server per test session; tests should use their own key prefixes."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:  # started, and stopped at the end
        yield server
