"""`wsip view`: a predicted slide in a page that pans and zooms, attention overlaid (docs/report.md).

Writes `predictions/<run>/viewer/<slide_id>/`, a static folder that opens from disk (file://) with no server
and no network: `index.html`, a copy of OpenSeadragon (installed by npm, see `openseadragon`), the slide's
Deep Zoom tiles from OpenSlide's `DeepZoomGenerator` (`slide_files/`), the attention overlay as a second tiled
layer (`attention_files/`, drawn with the heatmap's colours and multiplied onto the slide, so patch-free
areas stay untouched) and the patch boxes as one vector path (crisp at every zoom, toggled on the page).

The slide is tiled down to the patches' own resolution (the finest detail the model saw; OpenSeadragon
magnifies beyond it), or to level 0 with `full_resolution`: a 40x slide patched at 20x then needs 4× the tiles.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_pipeline.errors import UserError, name_some
from wsi_pipeline.slide import Slide
from wsi_pipeline.stages.view import openseadragon
from wsi_pipeline.stages.view.page import viewer_page
from wsi_pipeline.workspace.attention_store import Attention, read_attention
from wsi_pipeline.workspace.files import remove_stale_temps, temp_name
from wsi_pipeline.workspace.layout import VIEWER_PAGE, Layout, PredictionSet

__all__ = ["ViewParams", "ViewResult", "view"]
OVERLAY_MAX_PX = 4096  # longer side of the attention overlay image (before tiling)
OVERLAY_PX_PER_PATCH = 16


@dataclass(frozen=True)
class ViewParams:
    slide: str  # a slide id predicted by the run
    run: str | None = None  # default: the one run that predicted `slide`
    tile_size: int = 254  # Deep Zoom tile side (+1 px overlap each side: 256 px images)
    full_resolution: bool = False  # tile down to level 0 instead of the patches' resolution


@dataclass(frozen=True)
class ViewResult:
    index: Path  # the page to open
    tiles: int
    seconds: float


def view(params: ViewParams, *, out: str | Path | Layout | None = None) -> ViewResult:
    """Write (or rewrite) the slide's viewer folder; callable from Python exactly as `wsip view`."""
    start = time.perf_counter()
    layout = out if isinstance(out, Layout) else Layout.at(out)
    predictions = _prediction_set(layout, params)
    remove_stale_temps(*layout.staging_dirs())  # a killed view's staging folders (docs/reliability.md)
    record = json.loads(predictions.record(params.slide).read_text())
    attention = read_attention(predictions.attention(params.slide))
    osd = openseadragon.openseadragon_dir()
    target = predictions.viewer(params.slide)
    staging = temp_name(target)
    try:
        with Slide(record["slide_path"]) as slide:
            deep_zoom = slide.deep_zoom(tile_size=params.tile_size)
            level = deep_zoom.level_count - 1
            if not params.full_resolution:
                level -= int(math.floor(math.log2(max(attention.attrs["target_mpp"] / slide.mpp, 1.0))))
            tiles = write_tiles(deep_zoom, staging / "slide_files", level, "jpeg")
            slide_size = deep_zoom.level_dimensions[level]
            overlay = DeepZoomImage(attention_image(attention, slide.dimensions), tile_size=params.tile_size)
            tiles += write_tiles(overlay.generator, staging / "attention_files", overlay.generator.level_count - 1,
                                 "png")
            page = viewer_page(slide_id=params.slide, run=predictions.run_name, record=record,
                               slide_size=slide_size, overlay_size=overlay.size, level0=slide.dimensions,
                               boxes=_boxes_path(attention), tile_size=params.tile_size)
        (staging / VIEWER_PAGE).write_text(page)
        shutil.copytree(osd, staging / "openseadragon")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ViewResult(predictions.viewer_page(params.slide), tiles, time.perf_counter() - start)


def _prediction_set(layout: Layout, params: ViewParams) -> PredictionSet:
    """The run's predictions holding `params.slide`; without --run, the only run that predicted it."""
    if params.run is not None:
        chosen = layout.predictions(params.run)
        if not chosen.record(params.slide).is_file():
            raise UserError(f"{chosen.dir}: run '{params.run}' has no prediction of slide '{params.slide}'; run "
                            f"`wsip predict SLIDE --run {params.run}` first")
        return chosen
    holders = [p for p in layout.prediction_sets() if p.record(params.slide).is_file()]
    if len(holders) == 1:
        return holders[0]
    if not holders:
        raise UserError(f"{layout.predictions_dir}: no run has predicted slide '{params.slide}'; run "
                        "`wsip predict SLIDE --run NAME` first (the slide id is the file name without extension)")
    raise UserError(f"slide '{params.slide}' was predicted by several runs ({name_some(p.run_name for p in holders)}); "
                    "pass --run NAME")


def write_tiles(generator: Any, folder: Path, max_level: int, fmt: str) -> int:
    """Deep Zoom levels 0..max_level as `<level>/<col>_<row>.<fmt>` (what OpenSeadragon's DZI source reads)."""
    options = {"quality": 80} if fmt == "jpeg" else {"compress_level": 6}
    count = 0
    for level in range(max_level + 1):
        (folder / str(level)).mkdir(parents=True)
        cols, rows = generator.level_tiles[level]
        for col in range(cols):
            for row in range(rows):
                generator.get_tile(level, (col, row)).save(folder / str(level) / f"{col}_{row}.{fmt}", **options)
                count += 1
    return count


def attention_image(attention: Attention, level0: tuple[int, int]) -> np.ndarray:
    """The overlay: each patch filled with the heatmap's jet colour of its attention rank, white elsewhere
    (white is neutral under the page's multiply blend)."""
    size0 = attention.patch_size_level0
    scale = min(OVERLAY_PX_PER_PATCH / size0, OVERLAY_MAX_PX / max(level0))
    width, height = max(1, math.ceil(level0[0] * scale)), max(1, math.ceil(level0[1] * scale))
    image = np.full((height, width, 3), 255, np.uint8)
    colours = cv2.applyColorMap((np.clip(attention.rank, 0, 1) * 255).astype(np.uint8)[:, None], cv2.COLORMAP_JET)
    for (x, y), colour in zip(attention.coords, colours[:, 0, ::-1].tolist(), strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = max(x0 + 1, int((x + size0) * scale)), max(y0 + 1, int((y + size0) * scale))
        image[y0:y1, x0:x1] = colour
    return image


class DeepZoomImage:
    """An in-memory RGB image tiled by the same `DeepZoomGenerator` as the slide (via OpenSlide's ImageSlide)."""

    def __init__(self, rgb: np.ndarray, *, tile_size: int):
        from openslide import ImageSlide
        from openslide.deepzoom import DeepZoomGenerator
        from PIL import Image

        self.size = (rgb.shape[1], rgb.shape[0])
        self.generator = DeepZoomGenerator(ImageSlide(Image.fromarray(rgb)), tile_size=tile_size, overlap=1,
                                           limit_bounds=False)


def _boxes_path(attention: Attention) -> str:
    """Every patch as one SVG path in level-0 px: `M x y h s v s h -s z` per patch."""
    s = attention.patch_size_level0
    return "".join(f"M{x} {y}h{s}v{s}h-{s}z" for x, y in attention.coords.tolist())
