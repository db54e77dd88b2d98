"""`wsip patch`: tissue segmentation + a patch grid at a physical magnification.

Per slide: plan the read (level, size) from MPP (`grid.plan_read`), segment tissue at ~8 µm/px
(`segment`), lay the grid in level-0 px and keep patches with enough tissue (`grid.tissue_grid`), then
write the CLAM+TRIDENT compatible coords h5, a QC jpg (`qc`), the tissue outline as QuPath GeoJSON (which
`--masks` reads back, docs/report.md) and a manifest row. See docs/design.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from wsi_pipeline import slide as slide_module
from wsi_pipeline.digests import code_digest, file_fingerprint, params_hash
from wsi_pipeline.errors import InputError
from wsi_pipeline.slide import FALLBACK, Slide
from wsi_pipeline.stages import runner
from wsi_pipeline.stages.inputs import SlideSource, split_valid
from wsi_pipeline.stages.patch import grid, qc, segment
from wsi_pipeline.stages.patch.grid import ReadPlan, plan_read, tissue_grid
from wsi_pipeline.stages.patch.params import PatchParams
from wsi_pipeline.stages.patch.segment import SegmentParams, segment_tissue
from wsi_pipeline.stages.runner import SlideOutcome
from wsi_pipeline.units import magnification_for_mpp
from wsi_pipeline.workspace import coords_store, geojson
from wsi_pipeline.workspace.coords_store import coords_are_current, coords_attrs, read_coords, write_coords
from wsi_pipeline.workspace.files import remove_stale_temps, storage_errors, write_json_if_changed
from wsi_pipeline.workspace.layout import Layout, PatchSet
from wsi_pipeline.workspace.shards import parse_shard, take_shard

__all__ = ["PatchParams", "PatchResult", "SegmentParams", "patch", "patch_slide", "plan_read"]

MANIFEST_COLUMNS = ("slide_id", "slide_path", "status", "n_patches", "mpp", "mpp_source", "read_level",
                    "read_size", "tissue", "seconds", "error", "segment_s", "grid_s", "write_s")
# Every module whose behaviour decides the coords: changing any of them invalidates cached coords.
_CODE = code_digest(__file__, grid.__file__, segment.__file__, qc.__file__, coords_store.__file__,
                    geojson.__file__, slide_module.__file__)


@dataclass
class PatchResult:
    """Per-slide outcomes plus the patch set they went to."""

    patch_set: PatchSet
    outcomes: list[SlideOutcome]

    @property
    def out_dir(self) -> Path:
        return self.patch_set.dir


def slide_key(params: PatchParams, source: SlideSource) -> str:
    """Cache key of one slide's coords: all params, the per-slide MPP override and our code digest."""
    return params_hash({"params": asdict(params), "mpp": source.mpp, "code": _CODE})


def _h5_attrs(slide: Slide, plan: ReadPlan, params: PatchParams, tissue_mode: str, key: str, fingerprint: str
              ) -> dict[str, Any]:
    level_w, level_h = slide.level_dimensions[plan.read_level]
    return {
        # CLAM
        "patch_size": int(plan.read_size), "patch_level": int(plan.read_level),
        "downsample": [plan.level_downsample] * 2, "level_dim": [level_w, level_h],
        "downsampled_level_dim": [level_w, level_h], "name": slide.slide_id,
        # TRIDENT
        "patch_size_level0": int(plan.patch_size_level0), "target_magnification": float(params.magnification_x),
        "level0_magnification": float(slide.objective_power or magnification_for_mpp(plan.slide_mpp)),
        "overlap": int(params.overlap_px), "level0_width": int(slide.dimensions[0]),
        "level0_height": int(slide.dimensions[1]),
        # ours
        "target_mpp": float(plan.target_mpp), "slide_mpp": float(plan.slide_mpp),
        "read_level": int(plan.read_level), "read_size": int(plan.read_size),
        "output_size": int(params.patch_size_px), "mpp_source": plan.mpp_source, "tissue_mode": tissue_mode,
        "cache_key": key, "slide_fingerprint": fingerprint,
    }


def patch_slide(source: SlideSource, *, params: PatchParams, patch_set: PatchSet, force: bool = False
                ) -> SlideOutcome:
    """Patch one slide; the unit `run_cohort` parallelises. Raises on unreadable slides (recorded there).

    Coords made from an older version of the file are removed before anything is read: if the slide now
    fails, nothing derived from its previous version stays usable. Coords of the same file made with other
    settings (and their tissue outline) stay until new ones replace them: a request that fails or finds no
    tissue never costs finished work; only the QC image, a diagnostic, shows the latest attempt. Current
    coords are reused only while the tissue outline is there too (a workspace patched before outlines were
    kept gets them).
    """
    coords_path = patch_set.coords(source.slide_id)
    key, fingerprint = slide_key(params, source), file_fingerprint(source.path)
    if not force and is_current(source, params=params, patch_set=patch_set):
        coords, attrs = read_coords(coords_path)
        return SlideOutcome(source.slide_id, runner.CACHED, _manifest_row(attrs, len(coords)))
    old = coords_attrs(coords_path)
    if old is not None and old.get("slide_fingerprint") != fingerprint:
        coords_path.unlink(missing_ok=True)
        patch_set.mask(source.slide_id).unlink(missing_ok=True)
    timings: dict[str, float] = {}
    with Slide(source.path, mpp=source.mpp, mpp_fallback=source.mpp_fallback) as slide:
        plan = plan_read(slide, params)
        t = time.perf_counter()
        sharper = qc.qc_read(slide, params.segment.seg_mpp)
        tissue = segment_tissue(slide, params.segment, user_mask=geojson.region_file(params.masks, source.slide_id),
                                sharper=sharper)
        timings["segment_s"] = time.perf_counter() - t
        t = time.perf_counter()
        coords = tissue_grid(tissue, plan, slide.dimensions, params.min_tissue_fraction)
        timings["grid_s"] = time.perf_counter() - t
        t = time.perf_counter()
        qc.write_qc(patch_set.qc(source.slide_id), slide, tissue, coords, plan.patch_size_level0, sharper)
        attrs = _h5_attrs(slide, plan, params, tissue.mode, key, fingerprint)
        row = _manifest_row(attrs, len(coords))
        if len(coords) == 0:  # the QC image shows why; finished coords of other settings stay
            return SlideOutcome(source.slide_id, runner.NO_TISSUE, row,
                                f"no tissue found ({tissue.tissue_area_um2 / 1e6:.3f} mm² detected); check the "
                                "QC image, or lower --min-tissue / pass a mask")
        geojson.write_geojson(patch_set.mask(source.slide_id),
                              geojson.tissue_features(tissue.contours, tissue.holes, tissue.hole_parents))
        write_coords(coords_path, coords, attrs)
        timings["write_s"] = time.perf_counter() - t
    row.update({k: f"{v:.3f}" for k, v in timings.items()})
    return SlideOutcome(source.slide_id, runner.DONE, row)


def _manifest_row(attrs: dict[str, Any], n_patches: int) -> dict[str, Any]:
    """A slide's manifest columns, from its coords attrs (so a cached slide's row can be rebuilt)."""
    return {"n_patches": n_patches, "mpp": f"{float(attrs['slide_mpp']):.4f}", "mpp_source": attrs["mpp_source"],
            "read_level": int(attrs["read_level"]), "read_size": int(attrs["read_size"]),
            "tissue": attrs["tissue_mode"]}


def is_current(source: SlideSource, *, params: PatchParams, patch_set: PatchSet) -> bool:
    """Whether the slide's finished coords match these params and the slide file as it is now, and its tissue
    outline is there."""
    try:
        fingerprint = file_fingerprint(source.path)
    except OSError:  # a missing slide: its job records the failure
        return False
    coords_path = patch_set.coords(source.slide_id)
    return (coords_are_current(coords_path, slide_key(params, source), fingerprint)
            and _same_fallback(coords_attrs(coords_path) or {}, source) and patch_set.mask(source.slide_id).is_file())


def outputs_intact(source: SlideSource, *, patch_set: PatchSet) -> bool:
    """Whether the slide's finished coords (of any settings) and outline are there for the file as it is now:
    what a failed new request leaves standing, so its `done` row stays (docs/reliability.md)."""
    attrs = coords_attrs(patch_set.coords(source.slide_id))
    try:
        return (attrs is not None and attrs.get("slide_fingerprint") == file_fingerprint(source.path)
                and patch_set.mask(source.slide_id).is_file())
    except OSError:
        return False


def _same_fallback(attrs: dict[str, Any], source: SlideSource) -> bool:
    """Coords patched with the `--mpp` fallback (the slide records none) are current for that value only;
    `--mpp` is not in the cache key, so giving it for a cohort never re-patches the slides that record one."""
    return attrs.get("mpp_source") != FALLBACK or attrs.get("slide_mpp") == source.mpp_fallback


def patch(
    slides: Sequence[SlideSource],
    params: PatchParams = PatchParams(),
    *,
    out: str | Path | Layout | None = None,
    workers: int = 1,
    shard: str | None = None,
    force: bool = False,
    wait: bool = False,
    on_done: Callable[[SlideOutcome], None] | None = None,
) -> PatchResult:
    """Patch a cohort into `<out>/patches/<config>/`; callable from Python exactly as `wsip patch`.

    A cohort whose coords are all current writes nothing (works on a read-only workspace). A slide whose
    file name cannot name outputs (not UTF-8, too long, hidden) fails alone. `wait`: see `run_cohort`.
    """
    params.validate()
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    layout = out if isinstance(out, Layout) else Layout.at(out)
    patch_set = layout.patch_set(params.config_name())
    items, refused = split_valid(take_shard(slides, parse_shard(shard), key=lambda s: s.slide_id))
    with storage_errors(layout.root):
        patch_set.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(*patch_set.output_dirs(), *layout.staging_dirs())
        write_json_if_changed(patch_set.params, {**params.to_dict(), "config": patch_set.name})
        outcomes = [runner.refuse(s, s.slide_id, why, patch_set, MANIFEST_COLUMNS) for s, why in refused]
        for outcome in outcomes:
            if on_done:
                on_done(outcome)
        outcomes += runner.run_cohort(
            partial(patch_slide, params=params, patch_set=patch_set, force=force), items,
            slide_id=lambda s: s.slide_id, outputs=patch_set,
            columns=MANIFEST_COLUMNS, is_current=lambda s: not force and is_current(s, params=params,
                                                                                   patch_set=patch_set),
            workers=workers, wait=wait, kept=partial(outputs_intact, patch_set=patch_set), on_done=on_done,
        )
    return PatchResult(patch_set, outcomes)
