"""`wsip export geojson`: per slide, one GeoJSON FeatureCollection QuPath imports as is (docs/report.md).

Tissue regions (annotations with holes, from the patch stage's `masks/<slide_id>.geojson`) plus one tile per
patch, in level-0 px. With a run: the run's predicted slides, each tile carrying the measurements `attention`
(the folds' mean) and `attention_rank` (its per-slide percentile, what the heatmaps colour) and the slide's
predicted class → `predictions/<run>/<slide_id>.geojson`. Without: a cohort patch set's slides, tiles
unclassified → `patches/<config>/geojson/<slide_id>.geojson`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from wsi_pipeline.errors import InputError, UserError, one_line
from wsi_pipeline.workspace.attention_store import read_attention
from wsi_pipeline.workspace.coords_store import read_coords
from wsi_pipeline.workspace.geojson import Feature, read_features, tile_features, write_geojson
from wsi_pipeline.workspace.layout import Layout, PatchSet, PredictionSet
from wsi_pipeline.workspace.manifest import DONE, read_manifest

__all__ = ["GeoJSONParams", "GeoJSONResult", "export_geojson"]
_REPATCH = "patched by an older wsip, which kept no outline: run `wsip patch` again with the same settings"


@dataclass(frozen=True)
class GeoJSONParams:
    run: str | None = None  # export this run's predictions (attention, predicted class)
    patches: str | None = None  # else this cohort patch config (default: the only one)


@dataclass
class GeoJSONResult:
    out_dir: Path
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # slide_id -> one-line reason


def export_geojson(params: GeoJSONParams = GeoJSONParams(), *, out: str | Path | Layout | None = None
                   ) -> GeoJSONResult:
    """Write one FeatureCollection per slide; a slide that cannot be exported is reported, the others go on."""
    layout = out if isinstance(out, Layout) else Layout.at(out)
    if params.run is not None and params.patches is not None:
        raise InputError("pass --run (a run's predicted slides) or --patches (a cohort patch config), not both")
    if params.run is not None:
        predictions = layout.predictions(params.run)
        if not predictions.slide_ids():
            raise UserError(f"{predictions.dir}: run '{params.run}' has predicted no slide yet; run `wsip predict "
                            f"SLIDES... --run {params.run}` first")
        return _export(predictions.dir, predictions.slide_ids(), partial(_prediction_features, layout, predictions),
                       predictions.geojson)
    patch_set = layout.pick_patch_set(params.patches)
    done = [r["slide_id"] for r in read_manifest(patch_set.manifest) if r["status"] == DONE]
    return _export(patch_set.geojson_dir, done, partial(_cohort_features, patch_set), patch_set.geojson)


def _export(out_dir: Path, slide_ids: Sequence[str], features_of: Callable[[str], list[Feature]],
            path_of: Callable[[str], Path]) -> GeoJSONResult:
    result = GeoJSONResult(out_dir)
    for slide_id in slide_ids:
        try:
            write_geojson(path_of(slide_id), features_of(slide_id))
        except (UserError, OSError, KeyError, ValueError) as exc:
            result.failed[slide_id] = one_line(exc)
            continue
        result.written.append(path_of(slide_id))
    return result


def _prediction_features(layout: Layout, predictions: PredictionSet, slide_id: str) -> list[Feature]:
    attention = read_attention(predictions.attention(slide_id))
    record = json.loads(predictions.record(slide_id).read_text())
    patch_set = layout.prediction_slides().patch_set(str(attention.attrs["patch_config"]))
    tissue = read_features(patch_set.mask(slide_id), fix=f"run `wsip predict` for {slide_id} again")
    tiles = tile_features(attention.coords, attention.patch_size_level0, classification=record["predicted"],
                          measurements={"attention": attention.attention, "attention_rank": attention.rank})
    return tissue + tiles


def _cohort_features(patch_set: PatchSet, slide_id: str) -> list[Feature]:
    coords, attrs = read_coords(patch_set.coords(slide_id))
    tissue = read_features(patch_set.mask(slide_id), fix=_REPATCH)
    return tissue + tile_features(coords, int(attrs["patch_size_level0"]))
