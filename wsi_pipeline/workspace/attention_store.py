"""A predicted slide's per-patch attention on disk (`predictions/<run>/<slide_id>_attention.h5`).

Datasets `coords` int64 (N, 2) (level-0 top-left, as in the coords h5), `attention` float32 (N,) (the folds'
mean; 0 for instances the model masked out) and `attention_rank` float32 (N,) (per-slide percentile in (0, 1],
what the heatmap colours); attrs: `patch_size_level0`, `target_mpp`, `slide_mpp`, `patch_config`. Kept so the
viewer and the QuPath export never reload a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_pipeline.errors import UserError, one_line
from wsi_pipeline.workspace.files import h5_bytes, write_bytes_if_changed


@dataclass(frozen=True)
class Attention:
    coords: np.ndarray
    attention: np.ndarray
    rank: np.ndarray
    attrs: dict[str, Any]

    @property
    def patch_size_level0(self) -> int:
        return int(self.attrs["patch_size_level0"])


def write_attention(path: Path, coords: np.ndarray, attention: np.ndarray, rank: np.ndarray,
                    attrs: dict[str, Any]) -> None:
    """Written only when its content changed (predicting a slide again writes nothing)."""

    def fill(f: h5py.File) -> None:
        f.create_dataset("coords", data=np.asarray(coords, np.int64), track_times=False)
        f.create_dataset("attention", data=np.asarray(attention, np.float32), track_times=False)
        f.create_dataset("attention_rank", data=np.asarray(rank, np.float32), track_times=False)
        f.attrs.update(attrs)

    write_bytes_if_changed(path, h5_bytes(fill))


def read_attention(path: Path) -> Attention:
    """The stored attention; a missing or unreadable file is a one-line error naming the fix."""
    fix = "run `wsip predict` for this slide again (it writes this file)"
    if not path.is_file():
        raise UserError(f"{path}: missing (predicted by an older wsip?); {fix}")
    try:
        with h5py.File(path, "r") as f:
            return Attention(f["coords"][:].astype(np.int64), f["attention"][:], f["attention_rank"][:],
                             dict(f.attrs))
    except (OSError, KeyError) as exc:
        raise UserError(f"{path}: unreadable attention ({one_line(exc)}); {fix}") from None
