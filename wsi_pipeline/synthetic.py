"""Write multi-level Aperio-style slides that OpenSlide opens (DESIGN §10), for tests, benchmarks and the demo.

tifffile (extra `dev`) writes the pyramid; we do not write our own TIFF encoder. Recipe: page 0 tiled 256×256
JPEG with an Aperio description (OpenSlide then reports vendor aperio, MPP and objective power), page 1 a
small untiled thumbnail, then the reduced levels tiled with subfiletype 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np


def write_aperio_slide(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    mpp: float = 0.25,
    app_mag: float = 40,
    downsamples: Sequence[int] = (4, 16),
    tile: int = 256,
    quality: int = 80,
) -> Path:
    """Write `image` (h, w, 3 uint8, level 0) as an Aperio SVS-like TIFF with the given reduced levels."""
    import tifffile

    path = Path(path)
    h, w = image.shape[:2]
    description = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} ({tile}x{tile}) JPEG/RGB Q={quality}"
        f"|AppMag = {app_mag:g}|MPP = {mpp:.4f}"
    )
    options = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": quality},
               "metadata": None}
    thumb_scale = 768 / max(h, w)
    thumb = cv2.resize(image, (max(1, round(w * thumb_scale)), max(1, round(h * thumb_scale))),
                       interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        tif.write(image, tile=(tile, tile), description=description, **options)
        tif.write(thumb, description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> thumbnail", **options)
        for ds in downsamples:
            level = cv2.resize(image, (max(1, w // ds), max(1, h // ds)), interpolation=cv2.INTER_AREA)
            tif.write(level, tile=(tile, tile), subfiletype=0, description=f"{w}x{h} -> {level.shape[1]}x"
                      f"{level.shape[0]}", **options)
    return path


def tile_tissue(source: np.ndarray, size: tuple[int, int], *, background: int = 242,
                seed: int = 0) -> np.ndarray:
    """A (h, w) RGB canvas tiled with flipped/rotated copies of real tissue, on a slide-glass background.

    Tiles are placed in a blob-shaped region, so the slide has background around an irregular section —
    what segmentation is meant to find.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    canvas = np.full((h, w, 3), background, np.uint8)
    sh, sw = source.shape[:2]
    region = blob_mask((h, w), rng)
    for y in range(0, h, sh):
        for x in range(0, w, sw):
            piece = source
            if rng.random() < 0.5:
                piece = piece[::-1]
            if rng.random() < 0.5:
                piece = piece[:, ::-1]
            ph, pw = min(sh, h - y), min(sw, w - x)
            keep = region[y:y + ph, x:x + pw, None]
            canvas[y:y + ph, x:x + pw] = np.where(keep, piece[:ph, :pw], canvas[y:y + ph, x:x + pw])
    return canvas


def blob_mask(size: tuple[int, int], rng: np.random.Generator, *, fill: float = 0.55) -> np.ndarray:
    """An irregular tissue-section outline: a smoothed random field thresholded to cover ~`fill` of an ellipse."""
    h, w = size
    small = (max(8, h // 64), max(8, w // 64))
    noise = cv2.GaussianBlur(rng.random(small).astype(np.float32), (0, 0), 2.0)
    yy, xx = np.mgrid[0:small[0], 0:small[1]]
    ellipse = 1 - (((yy - small[0] / 2) / (small[0] / 2)) ** 2 + ((xx - small[1] / 2) / (small[1] / 2)) ** 2)
    field = noise * 0.6 + ellipse
    thresh = np.quantile(field, 1 - fill)
    big = cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)
    return big > thresh


def he_tissue(size: tuple[int, int], *, seed: int = 0, hotspots: int = 0, hotspot_radius: int = 120,
              nuclei_per_mpx: float = 2500.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Procedural H&E-like tissue on glass: pink stroma, purple nuclei, an irregular outline, stain variation.

    `hotspots` small regions get dense, enlarged, darker nuclei (the "tumour" signal of the demo cohort).
    Returns the RGB image and the hotspot centres (level-0 px).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    region = blob_mask((h, w), rng)
    stain = rng.normal(0, 8, 3)  # per-slide stain shift
    stroma = np.array([232, 160, 200]) + stain
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h // 4 + 1, w // 4 + 1)).astype(np.float32), (0, 0), 1.5)
    texture = cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    image = np.clip(stroma + texture * np.array([10, 16, 10]), 0, 255)
    nuclei = np.zeros((h, w), np.uint8)
    n = int(nuclei_per_mpx * h * w / 1e6)
    for x, y in zip(rng.integers(0, w, n), rng.integers(0, h, n), strict=True):
        cv2.ellipse(nuclei, (int(x), int(y)), (int(rng.integers(3, 6)), int(rng.integers(2, 5))),
                    float(rng.uniform(0, 180)), 0, 360, 255, -1)
    inside = np.argwhere(region)
    centres = [tuple(int(v) for v in inside[i][::-1]) for i in rng.integers(0, len(inside), hotspots)] \
        if hotspots and len(inside) else []
    for cx, cy in centres:
        for _ in range(int(hotspot_radius**2 / 40)):
            r, a = hotspot_radius * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            cv2.ellipse(nuclei, (int(cx + r * np.cos(a)), int(cy + r * np.sin(a))),
                        (int(rng.integers(6, 10)), int(rng.integers(5, 8))), float(rng.uniform(0, 180)),
                        0, 360, 255, -1)
    weight = cv2.GaussianBlur(nuclei, (0, 0), 1.0).astype(np.float32)[..., None] / 255
    nucleus = np.array([95, 55, 150]) + stain
    image = image * (1 - weight) + nucleus * weight
    glass = np.array([243, 243, 243], np.float64)
    image = np.where(region[..., None], image, glass)
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.8)
    return np.clip(image, 0, 255).astype(np.uint8), centres
