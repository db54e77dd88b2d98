"""Tissue segmentation (docs/design.md §6): fast, CPU-only, no weights, thresholds in physical units.

At ~8 µm/px: HSV saturation → median blur → Otsu (floored, so an empty glass slide stays empty) →
morphological close → contours with holes → area filters in µm². Optional: black-artefact and pen-mark
removal, and a user mask (QuPath GeoJSON polygons in level-0 px, or a PNG) that restricts the tissue.

Fluorescence (dark background, docs/slides.md): brightness (per-pixel max over the channels) replaces saturation,
floored above the background instead, and nothing is removed as "black"; everything after the threshold is the
same. `tissue="auto"` picks it when the segmentation image is mostly dark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from wsi_pipeline.slide import Slide, SlideError
from wsi_pipeline.units import MPP, Microns, SquareMicrons
from wsi_pipeline.workspace.geojson import geojson_rings, read_geojson

TISSUE_MODES = ("auto", "brightfield", "fluorescence")
DARK_MEDIAN = 100  # auto: a segmentation image whose median brightness (0–255) is below this is fluorescence


@dataclass(frozen=True)
class SegmentParams:
    """Knobs of the tissue detector; areas and lengths are physical so they mean the same at every scan."""

    seg_mpp: MPP = MPP(8.0)
    saturation_threshold: int | None = None  # None: Otsu, floored at `min_saturation`
    min_saturation: int = 15
    median_blur_um: Microns = Microns(56.0)
    close_um: Microns = Microns(64.0)
    min_region_um2: SquareMicrons = SquareMicrons(50_000.0)  # 0.05 mm²: drops dust and debris
    min_hole_um2: SquareMicrons = SquareMicrons(20_000.0)  # smaller holes are filled
    remove_black: bool = True  # folds, marker ink, scanner edges (value < 50)
    remove_pen: bool = False  # blue/green pen marks (strongly saturated, hue 90–150°)
    tissue: str = "auto"  # auto | brightfield (stain on bright glass) | fluorescence (signal on a dark background)
    min_signal: int = 10  # fluorescence: tissue is at least this much brighter than the background (0–255)


@dataclass
class TissueMask:
    """A binary mask at `downsample` × level 0, plus its contours in level-0 px (for QC and GeoJSON)."""

    mask: np.ndarray  # uint8 {0, 255}, (h, w)
    downsample: float  # level-0 px per mask px
    image: np.ndarray  # the RGB image the mask was computed on (QC background)
    mode: str = "brightfield"  # the tissue mode used: brightfield or fluorescence (`auto` resolved)
    contours: list[np.ndarray] = field(default_factory=list)  # outer contours, level-0 px, (k, 2)
    holes: list[np.ndarray] = field(default_factory=list)
    hole_parents: list[int] = field(default_factory=list)  # per hole: the index of its outer contour
    tissue_area_um2: float = 0.0


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def _saturation_mask(rgb: np.ndarray, params: SegmentParams, px_um: float) -> np.ndarray:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], _odd(params.median_blur_um / px_um))
    if params.saturation_threshold is not None:
        thresh = params.saturation_threshold
    else:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thresh = max(int(otsu), params.min_saturation)
    mask = (sat > thresh).astype(np.uint8) * 255
    if params.remove_black:
        mask[hsv[..., 2] < 50] = 0
    if params.remove_pen:
        hue = hsv[..., 0].astype(np.int32) * 2  # OpenCV hue is 0–179
        mask[(hue >= 90) & (hue <= 150) & (hsv[..., 1] > 100)] = 0
    return mask


def tissue_mode(image: np.ndarray, tissue: str = "auto") -> str:
    """`brightfield` or `fluorescence`: `tissue` itself unless it is `auto`, which looks at the background's
    brightness. Glass is bright (brightfield slides have a median near 240 even when stained tissue fills most of
    the frame); a fluorescence background is near black, and its signal is dim in 8-bit renderings."""
    if tissue != "auto":
        return tissue
    return "fluorescence" if float(np.median(image.max(axis=2))) < DARK_MEDIAN else "brightfield"


def _brightness_mask(rgb: np.ndarray, params: SegmentParams, px_um: float) -> np.ndarray:
    """Fluorescence: per-pixel max over the channels (any stain's signal) → median blur → Otsu, floored at
    `min_signal` over the background (the darkest 1%), so an empty dark slide stays empty."""
    value = cv2.medianBlur(np.ascontiguousarray(rgb.max(axis=2)), _odd(params.median_blur_um / px_um))
    otsu, _ = cv2.threshold(value, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thresh = max(int(otsu), int(np.percentile(value, 1)) + params.min_signal)
    return (value > thresh).astype(np.uint8) * 255


def _close(mask: np.ndarray, params: SegmentParams, px_um: float) -> np.ndarray:
    """Morphological close: joins tissue split by thin gaps (both modes)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(params.close_um / px_um),) * 2)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)


def _filter_regions(mask: np.ndarray, params: SegmentParams, px_area_um2: float
                    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[int]]:
    """Keep regions ≥ min_region_um2 with their holes ≥ min_hole_um2; return mask, contours (mask px) and
    each hole's outer contour (a polygon with holes, as GeoJSON writes it)."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(mask)
    outers: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    parents: list[int] = []
    if hierarchy is None:
        return out, outers, holes, parents
    hierarchy = hierarchy[0]
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:  # a hole; handled with its parent
            continue
        if cv2.contourArea(contour) * px_area_um2 < params.min_region_um2:
            continue
        outers.append(contour)
        child = hierarchy[i][2]
        while child != -1:
            if cv2.contourArea(contours[child]) * px_area_um2 >= params.min_hole_um2:
                holes.append(contours[child])
                parents.append(len(outers) - 1)
            child = hierarchy[child][0]
    cv2.drawContours(out, outers, -1, 255, thickness=cv2.FILLED)
    _cut_holes(out, holes)
    return out, outers, holes, parents


def _cut_holes(mask: np.ndarray, holes: list[np.ndarray]) -> None:
    """Clear the inside of each hole. A hole's contour runs on the tissue pixels around it, so those are drawn
    back: the mask is then exactly the region, and a hole read back from its contour (GeoJSON, `--masks`)
    clears the same pixels instead of eating one more ring of tissue each time."""
    cv2.drawContours(mask, holes, -1, 0, thickness=cv2.FILLED)
    cv2.drawContours(mask, holes, -1, 255, thickness=1)


def load_user_mask(path: Path, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Rasterise a QuPath GeoJSON (polygons in level-0 px) or read a PNG mask, at the mask's resolution."""
    h, w = shape
    if path.suffix.lower() in (".geojson", ".json"):
        out = np.zeros((h, w), np.uint8)
        for ring, fill in geojson_rings(read_geojson(path)):
            pts = np.round(np.asarray(ring, dtype=np.float64)[:, :2] / downsample).astype(np.int32)
            if fill:
                cv2.fillPoly(out, [pts], 255)
            else:
                _cut_holes(out, [pts[:, None, :]])
        return out
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SlideError(f"{path}: unreadable mask image; use a PNG (non-zero = tissue) or a GeoJSON")
    return (cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST) > 0).astype(np.uint8) * 255


def segment_tissue(slide: Slide, params: SegmentParams = SegmentParams(), *, user_mask: Path | None = None,
                   sharper: np.ndarray | None = None) -> TissueMask:
    """Segment tissue on a low-resolution read of the slide (the read dominates the cost).

    `sharper`: the whole slide already read at a finer scale (the caller's QC image); it is area-resized
    instead of reading the slide a second time.
    """
    mpp = slide.mpp
    downsample = max(params.seg_mpp / mpp, 1.0)
    if sharper is None:
        image = slide.read_downsampled(downsample)
    else:
        w, h = slide.dimensions
        size = (max(1, round(w / downsample)), max(1, round(h / downsample)))
        image = cv2.resize(sharper, size, interpolation=cv2.INTER_AREA)
    # the real scale of the image we got (rounding of its size)
    downsample = slide.dimensions[0] / image.shape[1]
    px_um = downsample * mpp
    mode = tissue_mode(image, params.tissue)
    threshold = _brightness_mask if mode == "fluorescence" else _saturation_mask
    mask = _close(threshold(image, params, px_um), params, px_um)
    if user_mask is not None:
        mask &= load_user_mask(user_mask, mask.shape, downsample)
    mask, outers, holes, hole_parents = _filter_regions(mask, params, px_um * px_um)
    return TissueMask(
        mask=mask,
        downsample=downsample,
        image=image,
        mode=mode,
        contours=[(c[:, 0, :] * downsample).astype(np.int64) for c in outers],
        holes=[(c[:, 0, :] * downsample).astype(np.int64) for c in holes],
        hole_parents=hole_parents,
        tissue_area_um2=float(np.count_nonzero(mask)) * px_um * px_um,
    )
