"""The QC picture of a patched slide: thumbnail, tissue contours, holes and the kept patch boxes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from wsi_pipeline.slide import Slide
from wsi_pipeline.stages.patch.segment import TissueMask
from wsi_pipeline.workspace.files import atomic_write

QC_SIZE = 1024  # px of the QC image's longer side (about)


def qc_read(slide: Slide, seg_mpp: float) -> np.ndarray | None:
    """A sharper whole-slide read for QC (~1024 px) when the segmentation image would be smaller than that.

    Only small slides get one; segmentation then reuses it, so every slide is still read once.
    """
    qc_ds = max(max(slide.dimensions) / QC_SIZE, 1.0)
    return slide.read_downsampled(qc_ds) if qc_ds < seg_mpp / slide.mpp else None


def write_qc(path: Path, slide: Slide, tissue: TissueMask, coords: np.ndarray, patch_size_level0: int,
             background: np.ndarray | None = None) -> None:
    """Thumbnail + tissue contours (green), holes (blue) and kept patch boxes (yellow), as a JPEG.

    Drawn on `background` (a sharper read, see `qc_read`) when given, else on the segmentation image; a
    fluorescence thumbnail is contrast-stretched first, since its dim signal on black is invisible as is.
    """
    image = tissue.image if background is None else background
    ds = slide.dimensions[0] / image.shape[1]
    if tissue.mode == "fluorescence":
        image = stretch_contrast(image)
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    for polygons, colour, width in ((tissue.contours, (0, 160, 0), 2), (tissue.holes, (200, 80, 0), 1)):
        scaled = [np.round(c / ds).astype(np.int32)[:, None, :] for c in polygons]
        cv2.drawContours(image, scaled, -1, colour, width)
    size = patch_size_level0 / ds
    for x, y in coords / ds:
        cv2.rectangle(image, (int(x), int(y)), (int(x + size), int(y + size)), (0, 200, 230), 1)
    with atomic_write(path) as tmp:
        tmp.write_bytes(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())


def stretch_contrast(rgb: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """Map the `low`–`high` percentiles of all channels together onto 0–255 (colours keep their balance)."""
    lo, hi = np.percentile(rgb, (low, high))
    scale = 255.0 / max(float(hi - lo), 1.0)
    return np.clip((rgb.astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)
