"""Attention heatmaps a pathologist can read: the slide stays visible under a translucent overlay, a colour bar
says what the colours mean, and annotated regions (e.g. lesions) are outlined when given.

Scores are normalised per slide by rank (CLAM's convention): raw attention spans orders of magnitude and only
the ranking within one slide is comparable; the colour bar's label says so. Patches the model masked out
(attention exactly 0) stay at the bottom of the scale.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_pipeline.slide import Slide
from wsi_pipeline.workspace.files import write_bytes_if_changed

Polygon = np.ndarray  # (k, 2) level-0 px


def percentile_scores(attention: np.ndarray) -> np.ndarray:
    """Rank-normalise to (0, 1]; exact zeros (instances the model masked out) stay 0."""
    scores = np.zeros(len(attention), np.float64)
    live = attention > 0
    if live.any():
        ranks = np.argsort(np.argsort(attention[live]))
        scores[live] = (ranks + 1) / live.sum()
    return scores


def heat_image(shape: tuple[int, int], scale: float, coords: np.ndarray, patch_size_level0: int,
               scores: np.ndarray) -> np.ndarray:
    """(h, w) float image at `scale` × level 0: each patch painted with its score (max where patches overlap),
    NaN where there is no patch (drawn transparent)."""
    heat = np.full(shape, np.nan, np.float32)
    size = max(1, int(round(patch_size_level0 * scale)))
    for (x, y), score in zip(coords, scores, strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        block = heat[y0:y0 + size, x0:x0 + size]
        block[:] = np.fmax(block, score)
    return heat


def render_heatmap(slide: Slide, coords: np.ndarray, patch_size_level0: int, attention: np.ndarray, path: Path,
                   *, annotations: Sequence[Polygon] = (), title: str = "", max_size: int = 1024,
                   alpha: float = 0.45) -> Path:
    """Save the thumbnail with the attention overlay, a colour bar and annotation outlines as a PNG (rewritten
    only when its bytes change: a cached prediction writes nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = slide.thumbnail(max_size)
    scale = thumb.shape[1] / slide.dimensions[0]
    heat = heat_image(thumb.shape[:2], scale, coords, patch_size_level0,
                      percentile_scores(np.asarray(attention, np.float64)))
    height, width = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * height / width + 0.8), dpi=120)
    ax.imshow(thumb)
    overlay = ax.imshow(np.ma.masked_invalid(heat), cmap="jet", vmin=0, vmax=1, alpha=alpha,
                        interpolation="nearest")
    for i, polygon in enumerate(annotations):
        ring = np.asarray(polygon, np.float64) * scale
        ring = np.vstack([ring, ring[:1]])
        ax.plot(ring[:, 0], ring[:, 1], color="lime", linewidth=1.5, label="annotation" if i == 0 else None)
    if len(annotations):
        ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(overlay, ax=ax, fraction=0.035, pad=0.02)
    bar.set_label("attention rank within this slide (percentile)", fontsize=8)
    bar.solids.set_alpha(1)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes_if_changed(path, png.getvalue())
    return path
