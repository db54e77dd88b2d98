"""Where a slide's patches go: the read plan (which level, how many pixels) and the tissue-filtered grid.

Physical units, not pyramid levels (docs/design.md §5): the target MPP comes from the
magnification, the slide is read at the coarsest level that still has enough resolution, and the grid is
laid in level-0 pixels, so coordinates mean the same for every reader (CLAM, TRIDENT, our extract stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from wsi_pipeline.slide import Slide, SlideError
from wsi_pipeline.stages.patch.params import PatchParams
from wsi_pipeline.stages.patch.segment import TissueMask
from wsi_pipeline.units import MPP, Level0Px, LevelPx, mpp_for_magnification

TOLERANCE = 0.02  # a downsample within 2% of a level's (or of an integer ratio) counts as equal


@dataclass(frozen=True)
class ReadPlan:
    """How one slide is read for a magnification: which level, how many px, and the grid step."""

    target_mpp: MPP
    slide_mpp: MPP
    mpp_source: str
    read_level: int
    read_size: LevelPx
    level_downsample: float
    patch_size_level0: Level0Px
    step_level0: Level0Px


def plan_read(slide: Slide, params: PatchParams) -> ReadPlan:
    """Coarsest level with enough resolution; read round(patch × ds / level_ds) px there.

    A ratio within 2% of an integer is snapped to it, so a 0.499 µm/px scan at 20x reads exactly 256 px.
    """
    info = slide.mpp_info
    mpp = slide.mpp  # raises the "pass --mpp" error when nothing records it
    target = mpp_for_magnification(params.magnification_x)
    downsample = target / mpp
    if downsample < 1 - TOLERANCE and not params.allow_upsample:
        raise SlideError(
            f"{slide.path}: {params.magnification_x:g}x needs {target:.3f} µm/px but the slide's finest is "
            f"{mpp:.3f} µm/px; use a lower --mag or pass --allow-upsample")
    level = slide.best_level_for_downsample(downsample, TOLERANCE)
    level_ds = slide.level_downsamples[level]
    ratio = downsample / level_ds
    if round(ratio) >= 1 and abs(ratio - round(ratio)) <= TOLERANCE * ratio:
        ratio = float(round(ratio))
    read_size = max(1, round(params.patch_size_px * ratio))
    size0 = round(read_size * level_ds)
    step0 = max(1, round((params.patch_size_px - params.overlap_px) * ratio * level_ds))
    return ReadPlan(target, mpp, info.source if info else "", level, LevelPx(read_size), level_ds,
                    Level0Px(size0), Level0Px(step0))


def tissue_grid(tissue: TissueMask, plan: ReadPlan, dims: tuple[int, int], min_tissue_fraction: float
                ) -> np.ndarray:
    """Level-0 (x, y) of every grid patch inside the slide whose tissue fraction ≥ `min_tissue_fraction`.

    Raster order (by y, then x), as CLAM and TRIDENT write it. The fraction comes from an integral image
    of the mask: O(1) per patch.
    """
    w0, h0 = dims
    size, step = plan.patch_size_level0, plan.step_level0
    if w0 < size or h0 < size:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(0, w0 - size + 1, step, dtype=np.int64)
    ys = np.arange(0, h0 - size + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    return coords[box_fractions(tissue.mask, tissue.downsample, coords, size) >= min_tissue_fraction]


def box_fractions(mask: np.ndarray, downsample: float, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """For each level-0 box (x, y, size), the fraction of it that is non-zero in `mask` (a mask at
    `downsample` × level 0). An integral image makes it O(1) per box."""
    integral = cv2.integral((mask > 0).astype(np.uint8))  # (h+1, w+1), int32
    mh, mw = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / downsample), 0, mw).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / downsample), 0, mh).astype(np.int64)
    x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / downsample), 0, mw).astype(np.int64)
    y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / downsample), 0, mh).astype(np.int64)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area
