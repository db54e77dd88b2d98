"""Patches on 2DMamba's grid of cells (docs/mamba2d.md §2): which cell each patch takes, and the grid's extent.

A patch at level-0 (x, y) takes cell (row, col) = (y // s, x // s), s = the cell size in level-0 px, counted
from the slide's origin as the released code does (it divides by the patch size). By default s is read from
the coords themselves: the GCD of the gaps between their distinct x and between their distinct y values, i.e.
the patching grid's step. For `wsip patch` coords (one grid from the origin) that is `patch_size_level0`
without overlap, and the step with overlap (where dividing by the patch size would put two patches in one
cell); every slide gets its own, so a cohort mixing 20x and 40x scans still tiles. Reading it from the coords
keeps the models' `make_groups(features, coords)` contract. A slide of one patch has no gaps: its
coordinates' own GCD stands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_pipeline.errors import ConfigError

MAX_CELLS = 1 << 22  # a grid this large is a step read wrong, not a slide: ~4 GB per (cells x 256) float32


def grid_step(coords: np.ndarray) -> int:
    """The coords' grid step in level-0 px (module docstring)."""
    gaps = np.concatenate([np.diff(np.unique(coords[:, 0])), np.diff(np.unique(coords[:, 1]))])
    source = gaps if len(gaps) else coords[0]
    return int(np.gcd.reduce(source)) or 1


def place_cells(coords: np.ndarray, cell_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch's cell, int64, from (N, 2) level-0 (x, y) coords; `cell_size` None: inferred.

    Two patches in one cell, or a grid beyond `MAX_CELLS`, mean the cell size does not fit these coords: a
    `ConfigError` naming the `cell_size` option.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0 or coords.min() < 0:
        raise ValueError(f"expected non-negative level-0 coords shaped (N >= 1, 2), got {coords.shape}")
    step = cell_size or grid_step(coords)
    rows, cols = coords[:, 1] // step, coords[:, 0] // step
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if height * width > MAX_CELLS:
        raise ConfigError(f"2dmamba: {len(coords)} patches at a cell size of {step} level-0 px span a {height} x "
                          f"{width} grid; these coords are not on one regular grid: set the model option "
                          "cell_size to their patch step in level-0 px")
    shared = len(coords) - len(np.unique(rows * width + cols))
    if shared:
        raise ConfigError(f"2dmamba: {shared} patch(es) share a grid cell at a cell size of {step} level-0 px; "
                          "set the model option cell_size to the patches' step in level-0 px (or leave it unset)")
    return rows, cols


def grid_frame(
    rows: np.ndarray, cols: np.ndarray, *, crop: bool, extent: Sequence[int] | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((first row, first col), (H, W)) of one slide's grid.

    `crop`: the bounding box of its patches. Otherwise the released grid: from the origin, `extent` (H, W)
    cells, grown to the slide's last row / column where it reaches beyond (the released code would fail
    there); no `extent`: to the slide's last row / column.
    """
    if crop:
        top, left = int(rows.min()), int(cols.min())
        return (top, left), (int(rows.max()) - top + 1, int(cols.max()) - left + 1)
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if extent is not None:
        height, width = max(height, int(extent[0])), max(width, int(extent[1]))
    return (0, 0), (height, width)


def cohort_extent(placements: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """(H, W) holding every slide's cells from the origin: the released per-dataset extent, for our cohort."""
    return (max(int(r.max()) + 1 for r, _ in placements), max(int(c.max()) + 1 for _, c in placements))
