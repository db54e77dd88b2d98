"""A bound on what an h5 dataset may declare before it is read (docs/reliability.md, "Readers").

An HDF5 header can declare any shape: a 1.6 KB file can claim (2^34, 512) float32 rows, and reading it would
ask for 32 TiB. Real bags compress little (float features), so a dataset declaring far more bytes than its
file holds is refused with one line before any read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import InputError

RATIO = 1000  # declared bytes per byte of file, at most (zeros compress ~1000×; features ~1-3×)
FLOOR = 64 << 20  # small files may always declare this much
CEILING = 64 << 30  # and no file more than this


def check_declared_size(dataset: Any, path: Path) -> None:
    """Raise a one-line `InputError` when `dataset` (an h5py Dataset) declares an implausible size."""
    declared = math.prod(int(n) for n in dataset.shape) * dataset.dtype.itemsize
    limit = min(CEILING, max(FLOOR, RATIO * path.stat().st_size))
    if declared > limit:
        raise InputError(f"{path}: dataset '{dataset.name.lstrip('/')}' declares shape {tuple(dataset.shape)} "
                         f"({declared / 2**30:.1f} GiB) in a {path.stat().st_size} byte file; the file is damaged "
                         "or not ours: re-create it (`wsip extract --force` / `wsip patch --force`)")
