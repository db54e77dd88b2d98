"""Locks on shared storage: one holder per slide (or per training run), even across hosts.

`OwnerLock` is a lock *file* created atomically (O_CREAT | O_EXCL), so it works on NFS/Lustre where
`flock` may not, and it records its holder (host, pid, a random token). While held, a daemon thread
touches it every quarter of the stale time, so a long job (a 100,000-patch slide, a training fold) never
looks abandoned. A lock is stale when its holder ran on this host and is dead, or (other hosts, whose pids
we cannot check) when it has not been touched for `$WSIP_LOCK_STALE_S` seconds; stale locks are taken over.
`file_lock` is a short `flock` critical section (manifest updates) on a local sidecar file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

LOCK_STALE_ENV = "WSIP_LOCK_STALE_S"
DEFAULT_LOCK_STALE_S = 6 * 3600.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_after_s() -> float:
    return float(os.environ.get(LOCK_STALE_ENV, DEFAULT_LOCK_STALE_S))


class OwnerLock:
    """An exclusive lock file with a heartbeat; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._heartbeat is not None

    def acquire(self) -> bool:
        """Take the lock (breaking a stale one); False when a live holder has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale():
                    return False
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                               "time": time.time()}, f)
            except OSError:  # a full disk: an empty lock would look "being written" to everyone for hours
                self.path.unlink(missing_ok=True)
                raise
            self._start_heartbeat()
            return True
        return False

    def holder(self) -> dict | None:
        """The holder's record (host, pid, token), or None when the file is absent or being written."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def refresh(self) -> None:
        """Touch the lock if it is still ours (a taken-over lock belongs to its new holder)."""
        record = self.holder()
        if self.held and record is not None and record.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        record = self.holder()
        if record is not None and record.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        interval = max(stale_after_s() / 4, 0.05)

        def beat() -> None:
            while not self._stop.wait(interval):
                self.refresh()

        self._heartbeat = threading.Thread(target=beat, name=f"lock-heartbeat:{self.path.name}", daemon=True)
        self._heartbeat.start()

    def _break_if_stale(self) -> bool:
        record = self.holder()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        if record is None:  # being written this instant, or torn by a crash mid-write
            if age <= stale_after_s():
                return False
            record = {}
        same_host = record.get("host") == socket.gethostname()
        stale = (same_host and not pid_alive(int(record.get("pid", -1)))) or age > stale_after_s()
        if stale:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        return stale

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` for a short critical section (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
