"""The demo's child processes: trainer, indexer and retrieval API, each `python -m <service>` with env settings.

Each child runs in its own session (a terminal Ctrl-C reaches the demo only, which then decides the
shutdown order), writes its output to a log file, and asks Linux to SIGTERM it if the demo process dies
(PR_SET_PDEATHSIG), so a killed demo leaves no orphans. An atexit hook stops whatever is still running.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1
_SERVICE_PREFIXES = ("HSNN_TRAINER_", "HSNN_INDEXER_", "HSNN_API_")
_live: list[Service] = []


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the thread that started it (the demo's main) dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def service_env(settings: dict[str, object]) -> dict[str, str]:
    """The demo's environment for a child: inherited, minus other service settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_PREFIXES)}
    env.pop("HSNN_CONFIG_FILE", None)  # the demo's settings are complete; a stray file must not change them
    env |= {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # three torch processes share a small machine: one thread each
        "MKL_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    env |= {name: str(value) for name, value in settings.items()}
    return env


class Service:
    """One `python -m <module>` child with its output in `log_path`."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_path: Path):
        self.name, self.module, self.env, self.log_path = name, module, env, log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.stop_seconds: float | None = None

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # services start before the traffic thread
            )
        finally:
            log.close()
        _live.append(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exited(self) -> int | None:
        """The exit status if the child has ended, else None."""
        return None if self.popen is None else self.popen.poll()

    def terminate(self) -> None:
        """SIGTERM the child's process group (the child and anything it started)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait for the child after `terminate`; SIGKILL its group after `timeout`. Returns the exit status."""
        if self.popen is None:
            return None
        started = time.monotonic()
        try:
            self.returncode = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.returncode = self.popen.wait(timeout=10)
        self.stop_seconds = time.monotonic() - started
        if self in _live:
            _live.remove(self)
        return self.returncode

    def stop(self, timeout: float) -> int | None:
        self.terminate()
        return self.wait(timeout)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_live):
        service.terminate()
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.wait(10)
