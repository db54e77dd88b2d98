"""Attention heatmaps over the slide thumbnail (CLAM-style: per-slide percentile scores, jet colours)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from wsi_pipeline.slide import Slide
from wsi_pipeline.workspace.files import atomic_write


def percentile_scores(attention: np.ndarray) -> np.ndarray:
    """Rank-normalise to (0, 1]: raw attention spans orders of magnitude; ranks show where the model looks.

    Exact zeros (instances the model masked out) stay 0.
    """
    scores = np.zeros(len(attention), np.float64)
    live = attention > 0
    if live.any():
        ranks = np.argsort(np.argsort(attention[live]))
        scores[live] = (ranks + 1) / live.sum()
    return scores


def render_heatmap(slide: Slide, coords: np.ndarray, patch_size_level0: int, attention: np.ndarray, path: Path,
                   *, max_size: int = 1024, alpha: float = 0.5) -> Path:
    """Paint each patch's score over the thumbnail and save a PNG (atomically)."""
    thumb = slide.thumbnail(max_size)
    scale = thumb.shape[1] / slide.dimensions[0]
    heat = np.zeros(thumb.shape[:2], np.float32)
    covered = np.zeros(thumb.shape[:2], bool)
    size = max(1, int(round(patch_size_level0 * scale)))
    for (x, y), score in zip(coords, percentile_scores(np.asarray(attention, np.float64)), strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        heat[y0:y0 + size, x0:x0 + size] = np.maximum(heat[y0:y0 + size, x0:x0 + size], score)
        covered[y0:y0 + size, x0:x0 + size] = True
    colours = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    image = cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(image, 1 - alpha, colours, alpha, 0)
    image[covered] = blended[covered]
    with atomic_write(path) as tmp:
        tmp.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    return path
