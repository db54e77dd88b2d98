"""Region annotations (QuPath GeoJSON, level-0 px) given to `wsip predict --annotations DIR`: outlines for the
heatmap, and how well the model's attention lands on them.

The localisation score is the fraction of the k most-attended patches that overlap an annotated region: a
simple, model-agnostic check that a correct prediction is correct for the right reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_pipeline.stages.patch.grid import box_fractions
from wsi_pipeline.stages.patch.segment import load_user_mask
from wsi_pipeline.workspace.geojson import geojson_rings, read_geojson, region_file

MASK_DOWNSAMPLE = 8.0  # level-0 px per mask px: fine enough for patch-sized regions


def annotation_file(folder: Path | None, slide_id: str) -> Path | None:
    """`<folder>/<slide_id>.geojson` (or `.json`) when it exists."""
    return region_file(folder, slide_id, (".geojson", ".json"))


def outer_rings(path: Path) -> list[np.ndarray]:
    """The outer ring of every polygon in a GeoJSON file, as (k, 2) level-0 px arrays."""
    return [np.asarray(ring, np.float64)[:, :2] for ring, outer in geojson_rings(read_geojson(path)) if outer]


def top_k_on_annotation(path: Path, dims: tuple[int, int], coords: np.ndarray, patch_size_level0: int,
                        attention: np.ndarray, k: int = 10) -> float:
    """Fraction of the `k` most-attended patches that overlap an annotated region at all."""
    shape = (int(np.ceil(dims[1] / MASK_DOWNSAMPLE)), int(np.ceil(dims[0] / MASK_DOWNSAMPLE)))
    mask = load_user_mask(path, shape, MASK_DOWNSAMPLE)
    top = np.argsort(-np.asarray(attention, np.float64), kind="stable")[:k]
    return float(np.mean(box_fractions(mask, MASK_DOWNSAMPLE, coords[top], patch_size_level0) > 0))
