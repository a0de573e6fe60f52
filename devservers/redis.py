"""A real redis-server as a local child process.

Why a private instance instead of the system service: each test session gets
its own port and data dir, and eviction is switched off (noeviction) so a
full cache surfaces as an error instead of silently dropping index entries.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devservers import _proc as proc
from devservers._proc import ManagedProcess, ServerLifecycle, ServerStartError


def redis_server_executable() -> str | None:
    """$HSNN_REDIS_SERVER if set, else `redis-server` on PATH."""
    explicit = proc.env_path("HSNN_REDIS_SERVER")
    if explicit is not None:
        return str(explicit) if explicit.exists() else None
    return shutil.which("redis-server")


class RedisServer(ServerLifecycle):
    """redis-server bound to 127.0.0.1 on a free port, data in `data_dir`.

    `appendonly=True` turns on AOF persistence so data survives stop()/start();
    by default nothing is persisted (`--save ''`, no AOF), which is fastest.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        appendonly: bool = False,
        maxmemory: str | None = None,
        startup_timeout: float = 20.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or proc.free_port()
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.log_path = self.data_dir / "redis.log"
        self._proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Value for redis.Redis.from_url (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why redis cannot be started here, or None if it can (for test skips)."""
        if redis_server_executable() is None:
            return "redis-server not found (run devservers/install.sh or set HSNN_REDIS_SERVER)"
        return None

    def client(self, **kwargs: Any) -> Any:
        """A new redis-py client for this server (caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> RedisServer:
        """Launch redis-server and wait until it answers PING."""
        if self.running:
            return self
        binary = redis_server_executable()
        if binary is None:
            raise ServerStartError(self.unavailable_reason() or "redis-server not found")
        if not proc.port_is_free(self.port):
            raise ServerStartError(f"port {self.port} for Redis is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.data_dir),
            "daemonize": "no",
            "logfile": "",  # stdout, which ManagedProcess appends to redis.log
            "save": "",  # no RDB snapshots
            "appendonly": "yes" if self.appendonly else "no",
            "maxmemory-policy": "noeviction",
        }
        if self.maxmemory:
            options["maxmemory"] = self.maxmemory
        argv = [binary]
        for name, value in options.items():
            argv += [f"--{name}", value]
        argv += self.extra_args
        proc.progress(f"starting Redis on {self.url} (data: {self.data_dir})")
        self._proc = ManagedProcess("Redis", argv, self.log_path, self.data_dir)
        self._proc.spawn()
        took = self._proc.wait_ready(self._pings, self.startup_timeout, f"PING on port {self.port}")
        proc.progress(f"Redis ready on {self.url} after {took:.1f}s")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: redis flushes the AOF (if on) and exits; SIGKILL after `timeout`."""
        if self._proc is not None:
            self._proc.stop(timeout=timeout)
            self._proc = None

    def _pings(self) -> bool:
        if not proc.port_accepts(self.port):
            return False
        client = self.client(socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.url}, {state}, data_dir={str(self.data_dir)!r})"
