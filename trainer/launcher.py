"""`python -m trainer --ranks N`: run N trainer ranks as one group, and restart the whole group when one fails.

Why restart all of them: a rank's effect lives in the replicas of every other rank (averaged gradients), so a
rank cannot rejoin on its own. Every rank of the new group resumes from the last snapshot, whose manifest
holds every partition's offset: the events the dead group trained after that snapshot are trained once more
and their earlier effect is gone with the old processes, so each event counts exactly once per snapshot
lineage (docs/trainer.md, "Several ranks").

The launcher forwards SIGTERM/SIGINT to every rank (they agree on a last round, then a final snapshot) and
exits with 0 once all ranks did. Exit codes 2, 3 and 4 of a rank (halted, lease held, lease lost) are not
retried: they need an operator, and the launcher exits with that code.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from trainer.settings import TrainerSettings

log = logging.getLogger("hsnn.trainer.launcher")

NOT_RETRIED = (2, 3, 4)  # trainer/__main__.py: halted, lease held, lease lost
STOP_GRACE_S = 15.0  # after a rank failed, how long the others get to exit before SIGKILL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def strip_ranks(argv: Sequence[str]) -> list[str]:
    """The command line of a rank: the launcher's own, without `--ranks`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ranks":
            skip = True
            continue
        if arg.startswith("--ranks="):
            continue
        out.append(arg)
    return out


def rank_env(settings: TrainerSettings, rank: int, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(settings.ranks),
            "MASTER_ADDR": settings.master_addr,
            "MASTER_PORT": str(port),
            "HSNN_TRAINER_RANKS": "1",
            "HSNN_TRAINER_TORCH_THREADS": str(threads),
        }
    )
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(f"HSNN_TRAINER_{name}", None)  # torch's variables above decide
    return env


class Launcher:
    """Starts the ranks, watches them, restarts the group after a failure, forwards the stop signal."""

    def __init__(self, settings: TrainerSettings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.argv = strip_ranks(argv)
        self.threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.ranks)
        self.fixed_port = settings.master_port if "master_port" in settings.model_fields_set else 0
        self.stop = threading.Event()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.generation = 0

    def start_group(self) -> None:
        port = self.fixed_port or free_port()
        self.generation += 1
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "trainer", *self.argv],
                env=rank_env(self.settings, rank, port, self.threads),
            )
            for rank in range(self.settings.ranks)
        ]
        log.info(
            "group %d: ranks %s (pids %s), rendezvous port %d, %d torch threads each",
            self.generation,
            list(range(self.settings.ranks)),
            [p.pid for p in self.procs],
            port,
            self.threads,
        )

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def stop_group(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the ranks still running, SIGKILL those still there after `grace` seconds."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.signal_all(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def latest_snapshot(self) -> int | None:
        from streaming.snapshots import SnapshotStore

        try:
            return SnapshotStore(self.settings.store_dir).latest_version()
        except OSError:
            return None

    def run(self) -> int:
        restarts = 0  # in a row without a new snapshot: a group that keeps snapshotting may restart forever
        self.start_group()
        started_at = self.latest_snapshot()
        forwarded = False
        while True:
            time.sleep(0.1)
            if self.stop.is_set() and not forwarded:
                self.signal_all(signal.SIGTERM)  # every rank stops after one agreed round, then snapshots
                forwarded = True
            codes = [p.poll() for p in self.procs]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if not failed:
                if all(c == 0 for c in codes):
                    return 0
                continue
            rank, code = failed[0]
            if self.stop.is_set():  # stopping anyway: wait for the rest, report the failure
                self.stop_group()
                return code if code > 0 else 1
            log.error("group %d: rank %d exited with %s; stopping the other ranks", self.generation, rank, code)
            self.stop_group()
            if code in NOT_RETRIED:
                return code
            latest = self.latest_snapshot()
            restarts = 1 if latest != started_at else restarts + 1
            if restarts > self.settings.max_group_restarts:
                log.critical("giving up after %d group restarts", restarts - 1)
                return 1
            time.sleep(min(5.0, 0.5 * restarts))
            if self.stop.is_set():
                return 0
            log.info("restarting the group from the last snapshot %s (restart %d in a row)", latest, restarts)
            self.start_group()
            started_at = latest


def launch(settings: TrainerSettings, argv: Sequence[str]) -> int:
    launcher = Launcher(settings, argv)

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: the ranks finish one round, then a final snapshot", signum)
        launcher.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return launcher.run()
