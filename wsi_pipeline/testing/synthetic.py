"""Write multi-level Aperio-style slides that OpenSlide opens (docs/design.md §11), for tests, benchmarks and the demo.

tifffile (extra `dev`) writes the pyramid; we do not write our own TIFF encoder. Recipe: page 0 tiled 256×256
JPEG with an Aperio description (OpenSlide then reports vendor aperio, MPP and objective power), page 1 a
small untiled thumbnail, then the reduced levels tiled with subfiletype 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from wsi_pipeline.units import magnification_for_mpp


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
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    yy, xx = np.mgrid[0:small[0], 0:small[1]]
    ellipse = 1 - (((yy - small[0] / 2) / (small[0] / 2)) ** 2 + ((xx - small[1] / 2) / (small[1] / 2)) ** 2)
    field = noise * 0.35 + ellipse
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
    stain = rng.normal(0, 8, 3).astype(np.float32)  # per-slide stain shift
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h // 4 + 1, w // 4 + 1)).astype(np.float32), (0, 0), 1.5)
    texture = cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    image = (np.array([232, 160, 200], np.float32) + stain) + texture * np.array([10, 16, 10], np.float32)
    nuclei = np.zeros((h, w), np.uint8)
    n = int(nuclei_per_mpx * h * w / 1e6)
    params = zip(rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(3, 6, n), rng.integers(2, 5, n),
                 rng.uniform(0, 180, n), strict=True)
    for x, y, a, b, angle in params:
        cv2.ellipse(nuclei, (int(x), int(y)), (int(a), int(b)), float(angle), 0, 360, 255, -1)
    inside = np.flatnonzero(region[::8, ::8])
    picks = rng.choice(inside, hotspots) if hotspots and len(inside) else []
    centres = [(int(i % ((w + 7) // 8)) * 8, int(i // ((w + 7) // 8)) * 8) for i in picks]
    for cx, cy in centres:
        m = int(hotspot_radius**2 / 40)
        r, t = hotspot_radius * np.sqrt(rng.random(m)), rng.uniform(0, 2 * np.pi, m)
        for x, y, a, b, angle in zip(cx + r * np.cos(t), cy + r * np.sin(t), rng.integers(6, 10, m),
                                     rng.integers(5, 8, m), rng.uniform(0, 180, m), strict=True):
            cv2.ellipse(nuclei, (int(x), int(y)), (int(a), int(b)), float(angle), 0, 360, 255, -1)
    weight = cv2.GaussianBlur(nuclei, (0, 0), 1.0).astype(np.float32)[..., None] * np.float32(1 / 255)
    image += (np.array([95, 55, 150], np.float32) + stain - image) * weight
    image[~region] = 243.0  # glass
    image = cv2.GaussianBlur(image, (0, 0), 0.8)
    return np.clip(image, 0, 255).astype(np.uint8), centres


DEMO_CLASSES = ("normal", "tumour")


@dataclass(frozen=True)
class _DemoSlide:
    path: Path
    annotation: Path | None  # where its lesions' GeoJSON goes (tumour slides)
    size: tuple[int, int]
    mpp: float
    seed: int
    hotspots: int
    hotspot_radius: int


def _demo_slide(job: _DemoSlide) -> Path:
    image, centres = he_tissue(job.size, seed=job.seed, hotspots=job.hotspots, hotspot_radius=job.hotspot_radius)
    if job.annotation is not None:
        write_lesions_geojson(job.annotation, centres, job.hotspot_radius + 10)  # + the largest nucleus
    return write_aperio_slide(job.path, image, mpp=job.mpp, app_mag=round(magnification_for_mpp(job.mpp)),
                              downsamples=(4, 16))


def write_lesions_geojson(path: Path, centres: list[tuple[int, int]], radius: float) -> Path:
    """The ground truth of a generated slide: one circular polygon (level-0 px) per lesion, as QuPath writes
    annotations (a FeatureCollection of Polygon features with closed rings)."""
    angles = np.linspace(0, 2 * np.pi, 33)[:-1]
    features = []
    for cx, cy in centres:
        ring = [[round(cx + radius * np.cos(a), 1), round(cy + radius * np.sin(a), 1)] for a in angles]
        features.append({"type": "Feature", "properties": {"objectType": "annotation",
                                                           "classification": {"name": "Tumor"}},
                         "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def make_demo_cohort(folder: str | os.PathLike[str], *, n_slides: int = 16, size: tuple[int, int] = (4096, 6144),
                     mpp: float = 0.5, hotspots: int = 5, hotspot_radius: int = 120, seed: int = 0,
                     workers: int = 2) -> Path:
    """A labelled cohort of procedural H&E slides + `labels.csv` (slide_id,label,case_id); deterministic.

    Every other slide is `tumour`: it differs from `normal` only in `hotspots` small clusters of dense,
    enlarged nuclei (a few % of the tissue) — a MIL problem, not a global colour shift. Slides 0 & 2 and
    1 & 3 share a patient (case_id), so patient-level splitting matters. A held-out `tumour` slide,
    `holdout.svs`, is written beside the cohort (not in labels.csv) for `wsip predict`. The lesions of every
    tumour slide are written as GeoJSON to `annotations/<slide_id>.geojson` beside the cohort folder.
    """
    from concurrent.futures import ProcessPoolExecutor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    annotations = folder.parent / "annotations"
    rows, jobs = [], []
    for i in range(n_slides + 1):
        held_out = i == n_slides
        slide_id = "holdout" if held_out else f"demo_{i:02d}"
        tumour = held_out or DEMO_CLASSES[i % 2] == "tumour"
        if not held_out:
            case = f"P{i % 2:02d}" if i < 4 else f"P{i:02d}"
            rows.append(f"{slide_id},{DEMO_CLASSES[int(tumour)]},{case}")
        path = (folder.parent if held_out else folder) / f"{slide_id}.svs"
        jobs.append(_DemoSlide(path, annotations / f"{slide_id}.geojson" if tumour else None, size, mpp,
                               seed * 1000 + (999 if held_out else i), hotspots if tumour else 0, hotspot_radius))
    todo = [job for job in jobs if not job.path.exists()]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_demo_slide, todo))
    labels = folder.parent / "labels.csv"
    labels.write_text("slide_id,label,case_id\n" + "\n".join(rows) + "\n")
    return labels
