"""The file rules every stage relies on when it writes into the workspace.

- atomic writes (temp file + rename): a killed run never leaves a half file a later run would trust;
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
from wsi_pipeline.errors import StorageError
from wsi_pipeline.workspace.locks import pid_alive

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
