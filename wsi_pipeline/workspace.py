"""The workspace: where outputs live, and the rules that make every stage resumable.

Everything a stage needs to be idempotent and safe under concurrency lives here:
- atomic writes (temp file + rename), so a killed run never leaves a half file a later run would trust;
- parameter hashes (with a digest of the stage's own code, after STAMP) and slide fingerprints:
  the cache keys;
- per-slide lock files (atomic create, holder pid/host, stale-lock recovery), so two workers on shared
  storage never do the same slide;
- manifest.csv rows, updated under a file lock;
- `--shard i/N` partitioning (also from Slurm job-array variables).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from wsi_pipeline.errors import InputError

WORKSPACE_ENV = "WSIP_OUT"
DEFAULT_WORKSPACE = "wsip_out"
LOCK_STALE_ENV = "WSIP_LOCK_STALE_S"
DEFAULT_LOCK_STALE_S = 6 * 3600.0

T = TypeVar("T")


def workspace_root(out: str | os.PathLike[str] | None = None) -> Path:
    """`--out` if given, else `$WSIP_OUT`, else `./wsip_out` (so the commands chain without paths)."""
    return Path(out or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temp name starts with a dot and carries pid + uuid, so concurrent writers never collide and
    readers that glob for finished outputs never see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def code_digest(*files: str | os.PathLike[str]) -> str:
    """sha256 of source files: part of a stage's cache key, so changing the algorithm invalidates outputs."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def params_hash(params: Mapping[str, Any]) -> str:
    """A short, stable hash of JSON-able parameters (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """Size + mtime: cheap, and changes whenever the file is replaced or rewritten."""
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class SlideLock:
    """An exclusive per-slide lock file, created atomically (O_CREAT | O_EXCL).

    A lock is stale when its holder ran on this host and is dead, or (other hosts, where we cannot check
    the pid) when it has not been refreshed for `$WSIP_LOCK_STALE_S` seconds; stale locks are taken over.
    """

    path: Path
    held: bool = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale():
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
            self.held = True
            return True
        return False

    def refresh(self) -> None:
        """Touch the lock so workers on other hosts see it is alive (long jobs call this now and then)."""
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def _break_if_stale(self) -> bool:
        try:
            info = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except (FileNotFoundError, json.JSONDecodeError):
            # Vanished (released) or being written this instant: retry once; a torn file is treated as live.
            return not self.path.exists()
        stale_after = float(os.environ.get(LOCK_STALE_ENV, DEFAULT_LOCK_STALE_S))
        same_host = info.get("host") == socket.gethostname()
        stale = (same_host and not _pid_alive(int(info.get("pid", -1)))) or age > stale_after
        if stale:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        return stale

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -------------------------------------------------------------------------------------------- manifest


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def update_manifest(path: str | os.PathLike[str], row: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Insert or replace the row for `row['slide_id']`, under a lock, written atomically."""
    path = Path(path)
    with _file_lock(path.with_suffix(".lock")):
        rows = [r for r in read_manifest(path) if r.get("slide_id") != row["slide_id"]]
        rows.append({c: "" if row.get(c) is None else row.get(c) for c in columns})
        rows.sort(key=lambda r: r["slide_id"])
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- shards


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """`"i/N"` → (i, N); None → Slurm's array variables when set, else None (no sharding).

    With Slurm, the task's index is relative to SLURM_ARRAY_TASK_MIN so arrays like 1-8 work too.
    """
    if spec:
        try:
            i_str, n_str = spec.split("/")
            i, n = int(i_str), int(n_str)
        except ValueError:
            raise InputError(f"--shard must look like i/N (e.g. 0/4), got {spec!r}") from None
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        return None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard i/N needs 0 <= i < N, got {i}/{n}")
    return i, n


def take_shard(items: Sequence[T], shard: tuple[int, int] | None, key: Any = str) -> list[T]:
    """Deterministic round-robin split over items sorted by `key` (same list on every worker)."""
    ordered = sorted(items, key=key)
    if shard is None:
        return ordered
    i, n = shard
    return ordered[i::n]
