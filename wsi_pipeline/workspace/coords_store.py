"""Patch coordinates on disk: the CLAM/TRIDENT-compatible coords h5 (docs/design.md §4).

Dataset `coords` int64 (N, 2) = level-0 top-left (x, y); its attrs carry the read plan (CLAM, TRIDENT and
our own names) plus `cache_key` and `slide_fingerprint`, the two facts that decide whether it is current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_pipeline.errors import UserError, one_line
from wsi_pipeline.workspace.files import write_h5_atomic
from wsi_pipeline.workspace.h5_limits import check_declared_size


def write_coords(path: Path, coords: np.ndarray, attrs: dict[str, Any]) -> None:
    def fill(f: h5py.File) -> None:
        dset = f.create_dataset("coords", data=coords.astype(np.int64))
        for k, v in attrs.items():
            dset.attrs[k] = v

    write_h5_atomic(path, fill)


def read_coords(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(coords (N, 2) int64, attrs); an unreadable file is a one-line error naming the fix."""
    try:
        with h5py.File(path, "r") as f:
            check_declared_size(f["coords"], path)
            return f["coords"][:].astype(np.int64), dict(f["coords"].attrs)
    except (OSError, KeyError) as exc:
        raise UserError(f"{path}: unreadable coords file ({one_line(exc)}); rerun `wsip patch --force`") from None


def coords_attrs(path: Path) -> dict[str, Any] | None:
    """The attrs of a finished coords file, or None when it is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return dict(f["coords"].attrs)
    except (OSError, KeyError):
        return None


def coords_are_current(path: Path, key: str, fingerprint: str) -> bool:
    """A finished coords file is reused only if its cache key and slide fingerprint both match."""
    attrs = coords_attrs(path)
    return attrs is not None and attrs.get("cache_key") == key and attrs.get("slide_fingerprint") == fingerprint
