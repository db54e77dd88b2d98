"""The workspace root and the file rules every stage relies on: atomic writes and cache-key hashing.

- atomic writes (temp file + rename): a killed run never leaves a half file a later run would trust;
- parameter hashes (with a digest of the code that makes an output, after STAMP) and file fingerprints:
  the cache keys of docs/design.md §10.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from wsi_pipeline.workspace.locks import pid_alive

WORKSPACE_ENV = "WSIP_OUT"
DEFAULT_WORKSPACE = "wsip_out"


def workspace_root(out: str | os.PathLike[str] | None = None) -> Path:
    """`--out` if given, else `$WSIP_OUT`, else `./wsip_out`; absolute and resolved.

    Resolved once, here, so every path a stage records is absolute: a workspace used from another folder
    (or by a Slurm job started elsewhere) finds the same files.
    """
    return Path(out or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()


TMP_MARK = ".tmp-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_name(path: Path) -> Path:
    """`.<name>.tmp-<host>-<pid>-<random>` beside `path`: hidden from globs for finished outputs, and naming
    its writer, so a later run can remove the leftovers of a killed one (`remove_stale_temps`)."""
    return path.parent / f".{path.name}{TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temps(*folders: Path) -> int:
    """Delete temp files whose writer ran on this host and is dead (a SIGKILL skips `atomic_write`'s
    cleanup); temp files of other hosts are left alone. Returns how many were removed."""
    removed = 0
    for folder in folders:
        for tmp in folder.glob(f".*{TMP_MARK}*") if folder.is_dir() else ():
            host, _, rest = tmp.name.rpartition(TMP_MARK)[2].partition("-")
            pid = rest.partition("-")[0]
            if host == _HOST and pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
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
    write_text_atomic(path, _json_text(data))


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_text_if_changed(path: str | os.PathLike[str], text: str) -> None:
    """Write only when the content differs: a fully cached run then writes nothing (read-only workspaces)."""
    with contextlib.suppress(OSError):
        if Path(path).read_text() == text:
            return
    write_text_atomic(path, text)


def write_json_if_changed(path: str | os.PathLike[str], data: Any) -> None:
    write_text_if_changed(path, _json_text(data))


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


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Size + mtime: cheap, and changes whenever the file is replaced or rewritten. A folder (a DICOM WSI
    series) gets a digest of its files' names and fingerprints, so adding, removing or rewriting any changes it."""
    path = Path(path)
    if path.is_dir():
        parts = [f"{p.name}:{file_fingerprint(p)}" for p in sorted(path.iterdir()) if p.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The content hash of a file (encoder weights: features from different weights never mix)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
