"""Process plumbing shared by the Kafka and Redis wrappers.

Both servers are plain child processes: we pick loopback ports, redirect the
server's output into a log file inside its data dir, poll until it answers,
and stop it with SIGTERM (SIGKILL only as a last resort). Keeping this in one
place means both wrappers fail the same way: with a message that shows the
tail of the server log instead of a bare timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

_PR_SET_PDEATHSIG = 1

# Children still running at interpreter exit are stopped by the atexit hook,
# so an aborted pytest run or a crashed demo does not leave brokers behind.
_live: set[ManagedProcess] = set()


class ServerStartError(RuntimeError):
    """A server process exited early or did not become ready in time."""


def progress(message: str) -> None:
    """Progress goes to stderr so stdout stays clean for machine-readable output."""
    print(f"[devservers] {message}", file=sys.stderr, flush=True)


def free_port(exclude: Sequence[int] = ()) -> int:
    """Ask the kernel for an unused loopback port.

    There is a small window between closing the probe socket and the server
    binding it; on a test machine that race is acceptable and far simpler
    than passing pre-bound sockets to a JVM.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port
    raise RuntimeError("could not find a free loopback port")


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port (used before a restart)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to 127.0.0.1:port succeeds."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(log {path} is empty)"


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it if we die.

    Covers the case the atexit hook cannot: the Python process being killed
    with SIGKILL (e.g. a CI timeout). Best effort, no-op off Linux. Caveat:
    Linux ties this to the *thread* that started the child, so start servers
    from a thread that outlives them (the main thread in tests and the CLI).
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ManagedProcess:
    """One server child process with its output appended to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def spawn(self) -> None:
        """Start the child in its own session so a terminal Ctrl-C reaches us,
        not the server: we decide the shutdown order."""
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        _live.add(self)

    def wait_ready(self, probe: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll `probe` until it returns True; return the seconds it took.

        Raises ServerStartError (with the log tail) if the process exits or
        the timeout passes, and stops the process in the timeout case so a
        half-started server does not linger.
        """
        start = time.monotonic()
        next_note = start + 5.0
        while True:
            if self._popen is None or self._popen.poll() is not None:
                code = None if self._popen is None else self._popen.returncode
                raise ServerStartError(
                    f"{self.name} exited with code {code} before it was ready.\n"
                    f"--- tail of {self.log_path} ---\n{tail(self.log_path)}"
                )
            with contextlib.suppress(Exception):
                if probe():
                    return time.monotonic() - start
            now = time.monotonic()
            if now - start > timeout:
                self.stop(timeout=10.0)
                raise ServerStartError(
                    f"{self.name} was not ready after {timeout:.0f}s ({what}).\n"
                    f"--- tail of {self.log_path} ---\n{tail(self.log_path)}"
                )
            if now >= next_note:
                progress(f"still waiting for {self.name} ({what}), {now - start:.0f}s so far...")
                next_note = now + 5.0
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM for a clean shutdown (flushes logs), SIGKILL after `timeout`."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                progress(f"{self.name} ignored SIGTERM for {timeout:.0f}s; sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
                popen.wait()
        _live.discard(self)
        return popen.returncode


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.stop(timeout=15.0)


def env_path(var: str) -> Path | None:
    """A path from an environment variable, or None if unset/empty."""
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else None


_Server = TypeVar("_Server", bound="ServerLifecycle")


class ServerLifecycle:
    """running, pid, restart() and the context-manager protocol, shared by KafkaServer and RedisServer."""

    _proc: ManagedProcess | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self: _Server) -> _Server:
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def restart(self: _Server) -> _Server:
        self.stop()
        return self.start()

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
