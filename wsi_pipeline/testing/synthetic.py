"""Write multi-level slides that OpenSlide opens (docs/design.md §11), for tests, benchmarks and the demo.

Aperio-style TIFF: tifffile (extra `dev`) writes the pyramid; we do not write our own TIFF encoder. Recipe: page
0 tiled 256×256 JPEG with an Aperio description (OpenSlide then reports vendor aperio, MPP and objective power),
page 1 a small untiled thumbnail, then the reduced levels tiled with subfiletype 0.
DICOM WSI: pydicom (extra `dev`) writes one file per level into a series folder (docs/slides.md).
The images: real tissue tiled on glass, procedural H&E, and procedural fluorescence on a dark background.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    compression: str = "jpeg",
) -> Path:
    """Write `image` (h, w, 3 uint8, level 0) as an Aperio SVS-like TIFF with the given reduced levels.

    `compression`: "jpeg" (lossy at `quality`, as scanners write) or "zlib" (lossless: every level reads back
    exactly as `reduced_level` makes it, e.g. for a twin of `write_dicom_slide`).
    """
    import tifffile

    path = Path(path)
    h, w = image.shape[:2]
    codec = f"JPEG/RGB Q={quality}" if compression == "jpeg" else f"{compression.upper()}/RGB"
    description = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} ({tile}x{tile}) {codec}"
        f"|AppMag = {app_mag:g}|MPP = {mpp:.4f}"
    )
    options = {"photometric": "rgb", "compression": compression, "metadata": None,
               **({"compressionargs": {"level": quality}} if compression == "jpeg" else {})}
    thumb_scale = 768 / max(h, w)
    thumb = cv2.resize(image, (max(1, round(w * thumb_scale)), max(1, round(h * thumb_scale))),
                       interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        tif.write(image, tile=(tile, tile), description=description, **options)
        tif.write(thumb, description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> thumbnail", **options)
        for ds in downsamples:
            level = reduced_level(image, ds)
            tif.write(level, tile=(tile, tile), subfiletype=0, description=f"{w}x{h} -> {level.shape[1]}x"
                      f"{level.shape[0]}", **options)
    return path


def reduced_level(image: np.ndarray, downsample: int) -> np.ndarray:
    """A pyramid level: `image` area-resized to ⌊w / downsample⌋ × ⌊h / downsample⌋ (both writers use it)."""
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, w // downsample), max(1, h // downsample)), interpolation=cv2.INTER_AREA)


def write_dicom_slide(
    folder: str | os.PathLike[str],
    image: np.ndarray,
    *,
    mpp: float = 0.25,
    app_mag: float = 40,
    downsamples: Sequence[int] = (4, 16),
    tile: int = 256,
) -> Path:
    """Write `image` as a DICOM WSI series in `folder`: one uncompressed TILED_FULL file per level.

    Levels are `reduced_level`'s, as in `write_aperio_slide`, so a lossless TIFF written from the same image
    is a pixel-exact twin. The attributes are those OpenSlide (libdicom) reads — VL Whole Slide Microscopy
    Image, ImageType …/VOLUME/…, tile and total sizes, 8-bit RGB, PixelSpacing (mm) in the shared functional
    groups, ObjectiveLensPower in the optical path — not a complete IOD (no patient or specimen modules).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
            "FrameOfReferenceUID": generate_uid()}
    h, w = image.shape[:2]
    for i, ds in enumerate((1, *downsamples)):
        level = image if ds == 1 else reduced_level(image, ds)
        spacing_mm = (mpp * h / level.shape[0] / 1000, mpp * w / level.shape[1] / 1000)  # (row, column)
        dataset = _dicom_level(level, tile, spacing_mm, app_mag, original=i == 0, uids=uids)
        dataset.InstanceNumber = i + 1
        dataset.save_as(folder / f"level-{i}.dcm", enforce_file_format=True)
    return folder


def _dicom_level(level: np.ndarray, tile: int, spacing_mm: tuple[float, float], app_mag: float, *,
                 original: bool, uids: dict[str, str]) -> Any:
    """One pyramid level as a pydicom Dataset: frames are the tiles in row-major order (TILED_FULL), edge
    tiles padded with black as the standard allows (readers crop to the total pixel matrix)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

    h, w = level.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    padded[:h, :w] = level
    frames = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for key, uid in uids.items():
        setattr(ds, key, uid)
    ds.Modality = "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if original else \
        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
    ds.NumberOfFrames, ds.DimensionOrganizationType = rows * cols, "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures = Dataset()
    measures.PixelSpacing = [f"{v:.10g}" for v in spacing_mm]  # DS strings: at most 16 characters
    measures.SliceThickness = "0.001"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier, optical_path.ObjectiveLensPower = "1", f"{app_mag:g}"
    ds.OpticalPathSequence, ds.NumberOfOpticalPaths = [optical_path], 1
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return ds


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
    nuclei = _nuclei((h, w), rng, nuclei_per_mpx)
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


def _nuclei(size: tuple[int, int], rng: np.random.Generator, per_mpx: float) -> np.ndarray:
    """A uint8 {0, 255} mask of small random ellipses (3–5 × 2–4 px half-axes), `per_mpx` per megapixel."""
    h, w = size
    nuclei = np.zeros((h, w), np.uint8)
    n = int(per_mpx * h * w / 1e6)
    params = zip(rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(3, 6, n), rng.integers(2, 5, n),
                 rng.uniform(0, 180, n), strict=True)
    for x, y, a, b, angle in params:
        cv2.ellipse(nuclei, (int(x), int(y)), (int(a), int(b)), float(angle), 0, 360, 255, -1)
    return nuclei


def fluorescence_tissue(size: tuple[int, int], *, stain: str = "dapi", seed: int = 0, fill: float = 0.85
                        ) -> np.ndarray:
    """Procedural fluorescence on a dark background (camera offset and noise), tissue over `fill` of the frame.

    `stain="dapi"`: blue nuclei over faint autofluorescence; `"tritc"`: a textured orange-red signal filling
    the tissue. Both are dim (mostly below the value-50 "black" cut of brightfield segmentation), as 8-bit
    renderings of a fluorescence channel often are.
    """
    if stain not in ("dapi", "tritc"):
        raise ValueError(f"stain must be 'dapi' or 'tritc', got {stain!r}")
    rng = np.random.default_rng(seed)
    h, w = size
    region = blob_mask((h, w), rng, fill=fill)
    image = rng.normal(4.0, 1.5, (h, w, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32), (0, 0), 3.0)
    texture = cv2.resize(texture / (texture.std() + 1e-6), (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    if stain == "tritc":
        signal = np.array([34.0, 12.0, 4.0], np.float32) * (1 + 0.25 * texture)
    else:
        weight = cv2.GaussianBlur(_nuclei((h, w), rng, 3000.0), (0, 0), 1.0).astype(np.float32)[..., None] / 255
        signal = np.array([4.0, 6.0, 10.0], np.float32) * (1 + 0.25 * texture) + weight * np.float32([8, 30, 90])
    image += np.where(region[..., None], signal, np.float32(0))
    return np.clip(image, 0, 255).astype(np.uint8)


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
                     workers: int = 2, prefix: str = "demo") -> Path:
    """A labelled cohort of procedural H&E slides + `labels.csv` (slide_id,label,case_id); deterministic.

    Every other slide is `tumour`: it differs from `normal` only in `hotspots` small clusters of dense,
    enlarged nuclei (a few % of the tissue) — a MIL problem, not a global colour shift. Slides 0 & 2 and
    1 & 3 share a patient (case_id), so patient-level splitting matters. A held-out `tumour` slide,
    `holdout.svs`, is written beside the cohort (not in labels.csv) for `wsip predict`. The lesions of every
    tumour slide are written as GeoJSON to `annotations/<slide_id>.geojson` beside the cohort folder.
    Slides are named `<prefix>_<i>` (another prefix makes a second cohort whose names do not clash).
    """
    from concurrent.futures import ProcessPoolExecutor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    annotations = folder.parent / "annotations"
    rows, jobs = [], []
    for i in range(n_slides + 1):
        held_out = i == n_slides
        slide_id = "holdout" if held_out else f"{prefix}_{i:02d}"
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
