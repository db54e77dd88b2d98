"""The workspace root and the file rules every stage relies on: atomic writes and cache-key hashing.

- atomic writes (temp file + rename): a killed run never leaves a half file a later run would trust;
- parameter hashes (with a digest of the code that makes an output, after STAMP) and file fingerprints:
  the cache keys of docs/design.md §10;
- a workspace that cannot take a write (read-only, unwritable, full) is one `StorageError` line, and
  unchanged content is never rewritten, so a fully cached run works on a read-only workspace
  (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from wsi_pipeline import faults
from wsi_pipeline.errors import InputError, StorageError
from wsi_pipeline.workspace.locks import pid_alive

WORKSPACE_ENV = "WSIP_OUT"
DEFAULT_WORKSPACE = "wsip_out"


def workspace_root(out: str | os.PathLike[str] | None = None) -> Path:
    """`--out` if given, else `$WSIP_OUT`, else `./wsip_out`; absolute and resolved.

    Resolved once, here, so every path a stage records is absolute: a workspace used from another folder
    (or by a Slurm job started elsewhere) finds the same files.
    """
    root = Path(out or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: the workspace (--out, `out:` or $WSIP_OUT) is a file, not a folder; pass a folder")
    return root


TMP_MARK = ".tmp-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_name(path: Path) -> Path:
    """`.<name>.tmp-<host>-<pid>-<random>` beside `path`: hidden from globs for finished outputs, and naming
    its writer, so a later run can remove the leftovers of a killed one (`remove_stale_temps`)."""
    return path.parent / f".{path.name}{TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temps(*folders: Path) -> int:
    """Delete temp files and staging folders whose writer ran on this host and is dead (a SIGKILL skips `atomic_write`'s
    cleanup); temp files of other hosts are left alone. Returns how many were removed."""
    removed = 0
    for folder in folders:
        for tmp in folder.glob(f".*{TMP_MARK}*") if folder.is_dir() else ():
            host, _, rest = tmp.name.rpartition(TMP_MARK)[2].partition("-")
            pid = rest.partition("-")[0]
            if host == _HOST and pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(OSError):  # gone meanwhile, or a read-only workspace: leave it
                    if tmp.is_dir() and not tmp.is_symlink():  # a staging folder (`wsip view`)
                        shutil.rmtree(tmp)
                    else:
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
        faults.point("write")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def save_torch_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """`torch.save` through memory: written to a file directly, a full disk surfaces as torch's errno-less
    RuntimeError; written from bytes, it is the OSError(ENOSPC) every other writer gives."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_h5_atomic(path: str | os.PathLike[str], fill: Callable[[Any], None]) -> None:
    """An HDF5 file made by `fill(h5py.File)` in memory, then written as bytes: a full disk is then the
    OSError(ENOSPC) of one write, not HDF5 errors raised (and printed) while h5py tears down its objects."""
    write_bytes_atomic(path, h5_bytes(fill))


def h5_bytes(fill: Callable[[Any], None]) -> bytes:
    """The bytes of an in-memory HDF5 file made by `fill(h5py.File)`."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        fill(f)
    return buffer.getvalue()


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json_text(data))


def json_text(data: Any) -> str:
    """Strict JSON (what every JSON reader accepts): NaN and ±inf, e.g. an undefined AUC, become null."""
    return json.dumps(_finite_or_null(data), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def _finite_or_null(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: _finite_or_null(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite_or_null(v) for v in data]
    return data


def write_text_if_changed(path: str | os.PathLike[str], text: str) -> None:
    """Write only when the content differs: a fully cached run then writes nothing (read-only workspaces)."""
    write_bytes_if_changed(path, text.encode())


def write_bytes_if_changed(path: str | os.PathLike[str], data: bytes) -> None:
    with contextlib.suppress(OSError):
        if Path(path).read_bytes() == data:
            return
    write_bytes_atomic(path, data)


def write_json_if_changed(path: str | os.PathLike[str], data: Any) -> None:
    write_text_if_changed(path, json_text(data))


_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS,)
_DENIED = (errno.EACCES, errno.EPERM)


def storage_error(exc: BaseException, root: Path) -> StorageError | None:
    """The one-line error for a write the storage refused, or None when `exc` is something else.

    A full disk or a read-only file system can only come from writing; a permission error counts when it
    names a file inside `root` (an unreadable slide elsewhere stays that slide's own failure).
    """
    if isinstance(exc, StorageError):
        return exc
    code = getattr(exc, "errno", None)
    filename = getattr(exc, "filename", None)
    inside = filename is not None and Path(filename).absolute().is_relative_to(root.absolute())
    folder = Path(filename).parent if filename else root
    if code in _FULL:
        return StorageError(f"{folder}: no space left on the device; free some space (or pass --out on another "
                            "disk) and rerun: finished outputs are kept, nothing half-written is")
    if code in _READ_ONLY or (code in _DENIED and inside):
        what = "read-only" if code in _READ_ONLY else "not writable (permission denied)"
        return StorageError(f"{folder}: the workspace {root} is {what} and this run has outputs to write; make it "
                            "writable, or pass --out to a writable folder (fully cached runs read it as it is)")
    return None


@contextlib.contextmanager
def storage_errors(root: Path) -> Iterator[None]:
    """Turn a write the storage refused anywhere in the block into its one-line `StorageError`."""
    try:
        yield
    except OSError as exc:
        error = storage_error(exc, root)
        if error is None:
            raise
        raise error from None


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
