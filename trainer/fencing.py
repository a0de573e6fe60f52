"""One trainer per snapshot store: a lease with a fencing epoch, kept in the store itself.

Two trainers on one store would both train every event and interleave snapshots whose offsets
contradict each other. The lease is a directory of epoch files, `leases/000000000007.json`, each
created with O_EXCL, so exactly one process wins an epoch. The highest epoch is the lease. Its owner
renews it (rewrites `renewed_at`) from the main loop and checks before every snapshot that no higher
epoch exists; if one does, it has been fenced off and steps down without writing.

A new trainer takes the next epoch when the lease is free: no lease yet, a lease not renewed for
`ttl_s`, or a lease whose owner process on this host is gone (a SIGKILLed trainer restarted in the
same pod or machine does not wait out the TTL). Otherwise it waits up to `wait_s` and then refuses
to start.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

LEASE_DIR = "leases"


class LeaseHeld(RuntimeError):
    """Another live trainer holds the store's lease."""


class LeaseLost(RuntimeError):
    """A newer trainer took the lease: this one must stop without writing a snapshot."""


@dataclass(frozen=True)
class LeaseRecord:
    epoch: int
    owner: str  # unique per process
    host: str
    pid: int
    acquired_at: float
    renewed_at: float


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrainerLease:
    def __init__(self, store_root: str | Path, ttl_s: float = 30.0) -> None:
        self.dir = Path(store_root) / LEASE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.epoch: int | None = None
        self._last_renewal = 0.0

    # ------------------------------------------------------------------ reading
    def _path(self, epoch: int) -> Path:
        return self.dir / f"{epoch:012d}.json"

    def _epochs(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit())

    def current(self) -> LeaseRecord | None:
        """The lease: the record of the highest epoch (None if there is none yet)."""
        for epoch in reversed(self._epochs()):
            try:
                return LeaseRecord(**json.loads(self._path(epoch).read_text()))
            except (OSError, ValueError, TypeError):
                # being created this instant (O_EXCL file still empty): it is the lease, not yet readable
                return LeaseRecord(epoch, "?", "?", -1, time.time(), time.time())
        return None

    def _free(self, record: LeaseRecord | None) -> bool:
        if record is None:
            return True
        if time.time() - record.renewed_at > self.ttl_s:
            return True
        if record.host == self.host and record.pid > 0:
            # same host: a dead pid, or our own pid (a restarted container reuses pid 1), is a dead owner
            return record.pid == os.getpid() or not _pid_alive(record.pid)
        return False

    # ------------------------------------------------------------------ owning
    def acquire(self, wait_s: float = 0.0) -> int:
        """Take the next epoch once the lease is free; LeaseHeld after `wait_s` if a live owner keeps it."""
        deadline = time.monotonic() + wait_s
        while True:
            record = self.current()
            if self._free(record):
                epoch = (record.epoch if record else 0) + 1
                if self._create(epoch):
                    self.epoch = epoch
                    self._prune(epoch)
                    return epoch
                continue  # another process took that epoch first: look again
            if time.monotonic() >= deadline:
                assert record is not None
                raise LeaseHeld(
                    f"the store {self.dir.parent} is leased to trainer pid {record.pid} on {record.host} "
                    f"(epoch {record.epoch}, renewed {time.time() - record.renewed_at:.0f}s ago, ttl {self.ttl_s:.0f}s)"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _record(self, epoch: int, acquired_at: float) -> LeaseRecord:
        return LeaseRecord(epoch, self.owner, self.host, os.getpid(), acquired_at, time.time())

    def _create(self, epoch: int) -> bool:
        try:
            fd = os.open(self._path(epoch), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self._record(epoch, time.time())), handle)
            handle.flush()
            os.fsync(handle.fileno())
        self._last_renewal = time.monotonic()
        return True

    def check(self) -> None:
        """Raise LeaseLost if a newer epoch exists (call right before writing anything to the store)."""
        if self.epoch is None:
            raise LeaseLost("this trainer holds no lease")
        newest = self._epochs()
        if newest and newest[-1] != self.epoch:
            raise LeaseLost(f"lease epoch {newest[-1]} supersedes ours ({self.epoch}): another trainer took over")

    def renew(self, force: bool = False) -> None:
        """Refresh `renewed_at` (at most every ttl/4 unless forced); raises LeaseLost if fenced off."""
        if not force and time.monotonic() - self._last_renewal < self.ttl_s / 4:
            return
        self.check()
        assert self.epoch is not None
        path = self._path(self.epoch)
        acquired = json.loads(path.read_text())["acquired_at"]
        tmp = path.with_name(f".{path.name}.{self.owner}.tmp")
        tmp.write_text(json.dumps(asdict(self._record(self.epoch, acquired))))
        os.replace(tmp, path)
        self._last_renewal = time.monotonic()

    def release(self) -> None:
        """Mark the lease free now (a clean shutdown lets the next trainer start without waiting)."""
        if self.epoch is None:
            return
        try:
            self.check()
            path = self._path(self.epoch)
            record = json.loads(path.read_text())
            record["renewed_at"] = 0.0
            tmp = path.with_name(f".{path.name}.{self.owner}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except (LeaseLost, OSError, ValueError):
            pass
        self.epoch = None

    def _prune(self, keep_from: int) -> None:
        """Old epoch files are history only; keep the last few."""
        for epoch in self._epochs():
            if epoch < keep_from - 4:
                self._path(epoch).unlink(missing_ok=True)
