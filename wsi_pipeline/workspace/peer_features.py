"""Feature folders written by other tools, read as they are: CLAM, TRIDENT and STAMP (and ours).

- wsip / CLAM: `<folder>/h5_files/<slide_id>.h5`, datasets `features` (N, D) and `coords` (N, 2) level-0 px.
- TRIDENT: `<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5`, the same two datasets in a
  flat folder (attrs on the datasets).
- STAMP: `<folder>/<slide>.h5`, dataset `feats` (or `patch_embeddings`) and `coords` (N, 2) in µm, with attrs
  `unit = "um"`, `tile_size_um` (and `tile_size_px`); STAMP's own loader refuses files without them.

The MIL models need only the patches' relative positions (groups, grid cells), so STAMP's µm become px at the
tile resolution, ``round(coords_um * tile_size_px / tile_size_um)``: integers on the tiles' grid. A run records
which layout it read (`features.json`, docs/encoders.md "Features in and out").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.workspace.h5_limits import check_declared_size
from wsi_pipeline.workspace.layout import H5_FOLDER
from wsi_pipeline.workspace.slide_id import check_slide_id

FEATURE_KEYS = ("features", "feats", "patch_embeddings")


@dataclass(frozen=True)
class FeatureFolder:
    """Where a feature folder's h5 files are and whose layout they follow."""

    h5_dir: Path
    layout: str  # "wsip/CLAM" | "TRIDENT" | "STAMP"

    def h5(self, slide_id: str) -> Path:
        """A slide's features file, for a slide id checked not to name a path outside the folder."""
        return self.h5_dir / f"{check_slide_id(slide_id)}.h5"

    def describe(self) -> str:
        return {"wsip/CLAM": "wsip/CLAM: h5_files/<slide_id>.h5, `features` + `coords` in level-0 px",
                "TRIDENT": "TRIDENT: <slide_id>.h5 in a flat folder, `features` + `coords` in level-0 px",
                "STAMP": "STAMP: <slide_id>.h5, `feats` + `coords` in µm, read as px at the tile resolution "
                         "(coords_um × tile_size_px / tile_size_um)"}[self.layout]


def feature_folder(folder: Path) -> FeatureFolder:
    """The layout of ``folder`` (a `data.features` value), from its files; a folder of neither is one line."""
    if (folder / H5_FOLDER).is_dir():
        return FeatureFolder(folder / H5_FOLDER, "wsip/CLAM")
    first = next(iter(sorted(folder.glob("*.h5"))), None) if folder.is_dir() else None
    if folder.name == H5_FOLDER:  # the inside of a wsip/CLAM folder: its parent says what it is
        raise ConfigError(f"{folder}: no {H5_FOLDER}/ folder here (point data.features at its parent)")
    if first is None:
        raise ConfigError(f"{folder}: no {H5_FOLDER}/ folder and no .h5 files here; data.features must be a feature "
                          "folder written by `wsip extract`, CLAM, TRIDENT or STAMP")
    with h5py.File(first, "r") as f:
        key = features_key(f)
    return FeatureFolder(folder, "TRIDENT" if key == "features" else "STAMP")


def features_key(f: h5py.File) -> str | None:
    """The dataset holding the features: `features` (wsip, CLAM, TRIDENT), `feats` or `patch_embeddings` (STAMP)."""
    return next((k for k in FEATURE_KEYS if k in f), None)


def coords_px(f: h5py.File) -> np.ndarray:
    """(N, 2) int64 coords: as stored when in px; STAMP's µm on the tile grid (module docstring)."""
    coords = f["coords"][:]
    attrs = f.attrs
    if attrs.get("unit") == "um" or "tile_size_um" in attrs:
        tile_um = float(attrs.get("tile_size_um", attrs.get("tile_size", 0)))
        if tile_um <= 0:
            raise ConfigError(f"{f.filename}: coords in µm without a tile_size_um attribute; re-extract with STAMP")
        scale = float(attrs.get("tile_size_px", 0) or tile_um) / tile_um
        return np.rint(np.asarray(coords, dtype=np.float64) * scale).astype(np.int64)
    return np.asarray(coords).astype(np.int64)


def read_bag(h5_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, coords (N, 2) int64) from a features h5 of any of the layouts above."""
    with h5py.File(h5_path, "r") as f:
        key = features_key(f)
        if key is None or "coords" not in f:
            raise ConfigError(f"{h5_path}: needs datasets {' or '.join(FEATURE_KEYS)} and 'coords'")
        for name in (key, "coords"):
            check_declared_size(f[name], h5_path)
        return f[key][:].astype(np.float32), coords_px(f)
