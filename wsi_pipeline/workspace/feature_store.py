"""Where patch features live while a slide is being encoded, and once done (docs/design.md §4).

While encoding, rows stream into `.partial/<slide_id>.zarr` one chunk at a time; a chunk counts only once
its marker file exists (written after the chunk's data), so a killed run resumes from the last complete
chunk. When every chunk is there, `h5_files/<slide_id>.h5` (CLAM keys + attrs) and `pt_files/<slide_id>.pt`
appear atomically and the partial is removed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_pipeline import faults
from wsi_pipeline.workspace.files import save_torch_atomic, write_h5_atomic, write_text_atomic
from wsi_pipeline.workspace.layout import pt_key


class PartialFeatures:
    """A zarr array (n_rows, dim) float32 chunked by rows, with one completion marker per chunk."""

    def __init__(self, path: Path, n_rows: int, dim: int, chunk_rows: int, key: str):
        import zarr

        self.path, self.n_rows, self.dim, self.chunk_rows = path, n_rows, dim, chunk_rows
        self.n_chunks = max(1, -(-n_rows // chunk_rows))
        self._markers = path / "done"
        meta = {"key": key, "n_rows": n_rows, "dim": dim, "chunk_rows": chunk_rows}
        meta_file = path / "wsip.json"
        if path.exists() and _read_meta(meta_file) != meta:
            shutil.rmtree(path)  # other settings, or a creation torn by a kill or a full disk: start over
        if not path.exists():
            path.mkdir(parents=True)
            zarr.open_array(str(path / "features"), mode="w", shape=(n_rows, dim), chunks=(chunk_rows, dim),
                            dtype="float32")
            self._markers.mkdir()
            write_text_atomic(meta_file, json.dumps(meta))  # last: its presence means the store is whole
        self._array = zarr.open_array(str(path / "features"), mode="r+")

    def done_chunks(self) -> set[int]:
        return {int(p.name) for p in self._markers.iterdir() if p.name.isdigit()}

    def chunk_rows_range(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min(self.n_rows, (chunk + 1) * self.chunk_rows))

    def write_chunk(self, chunk: int, features: np.ndarray) -> None:
        rows = self.chunk_rows_range(chunk)
        if features.shape != (len(rows), self.dim):
            raise ValueError(f"chunk {chunk}: expected {(len(rows), self.dim)}, got {features.shape}")
        self._array[rows.start:rows.stop] = features
        faults.point("chunk")
        (self._markers / str(chunk)).touch()

    def read_all(self) -> np.ndarray:
        return np.asarray(self._array[:], dtype=np.float32)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_features(h5_path: Path | None, pt_path: Path | None, features: np.ndarray, coords: np.ndarray,
                   attrs: Mapping[str, Any]) -> None:
    """Write the finished feature files; the pt goes first so a present h5 means both are complete.

    pt-only feature sets keep their cache key in a `<slide_id>.key` sidecar (a bare tensor has no attrs).
    """
    if pt_path is not None:
        import torch

        save_torch_atomic(pt_path, torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        if h5_path is None:
            write_text_atomic(pt_key(pt_path), str(attrs["cache_key"]))
    if h5_path is not None:
        def fill(f: h5py.File) -> None:
            f.create_dataset("features", data=features.astype(np.float32, copy=False))
            f.create_dataset("coords", data=coords.astype(np.int64, copy=False))
            for k, v in attrs.items():
                f.attrs[k] = v

        try:
            write_h5_atomic(h5_path, fill)
        except Exception:  # e.g. a full disk: no pt of an unfinished slide stays either
            if pt_path is not None:
                pt_path.unlink(missing_ok=True)
            raise


def features_are_current(h5_path: Path | None, pt_path: Path | None, key: str) -> bool:
    """Finished outputs are reused only when every requested file exists and the h5 carries `key`."""
    if pt_path is not None and not pt_path.exists():
        return False
    probe = h5_path if h5_path is not None else pt_key(pt_path)
    try:
        if h5_path is None:
            return probe.read_text() == key
        with h5py.File(probe, "r") as f:
            return f.attrs.get("cache_key") == key
    except (OSError, KeyError):
        return False


def feature_attrs(h5_path: Path) -> dict[str, Any]:
    """The attrs of a features h5 (encoder, weights sha, and the coords attrs such as patch_size_level0)."""
    with h5py.File(h5_path, "r") as f:
        return dict(f.attrs)
