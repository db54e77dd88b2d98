"""`wsip export stamp`: a feature set in STAMP's layout, so STAMP trains and draws heatmaps from wsip features.

Our features h5 (`features` + `coords` in level-0 px, docs/design.md §7) is CLAM's layout, which CLAM and TRIDENT
read as is. STAMP's loader wants something else (KatherLab/STAMP, `modeling/data.py` `get_coords` and the writer
in `preprocessing`): dataset `feats` (N, D), dataset `coords` (N, 2) as the tiles' top-left corners in µm, and
attrs `unit = "um"`, `tile_size_um`, `tile_size_px`, `feat_type = "tile"` and `extractor` (their name for the
encoder, where they have one); without µm coordinates it refuses the file. One file per slide,
`<feature set>/stamp/<slide_id>.h5`; the sources are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from wsi_pipeline.errors import InputError, UserError
from wsi_pipeline.workspace.files import atomic_write, storage_errors
from wsi_pipeline.workspace.layout import FeatureSet, Layout

TOOLS = ("stamp",)
# our encoder name -> STAMP's extractor name (their `ExtractorName`); others are recorded as "wsip-<name>"
STAMP_EXTRACTORS = {"uni": "uni", "uni2_h": "uni2", "conch_v15": "conch1_5", "virchow2": "virchow2",
                    "hoptimus0": "h-optimus-0", "hoptimus1": "h-optimus-1", "gigapath": "gigapath"}


@dataclass(frozen=True)
class ExportFeaturesParams:
    tool: str = "stamp"
    patches: str | None = None  # patch config; automatic when the workspace has one
    features: str | None = None  # feature set (e.g. "uni"); automatic when the patch config has one

    def validate(self) -> None:
        if self.tool not in TOOLS:
            raise InputError(f"wsip export {self.tool}: choose {', '.join(TOOLS)} (CLAM and TRIDENT read "
                             "h5_files/ as is)")


@dataclass
class ExportFeaturesResult:
    written: list[Path]
    out_dir: Path


def export_features(params: ExportFeaturesParams = ExportFeaturesParams(), *,
                    out: str | Path | Layout | None = None) -> ExportFeaturesResult:
    """Write every finished slide of one feature set in ``params.tool``'s layout. Callable from Python exactly
    as `wsip export stamp`."""
    params.validate()
    layout = out if isinstance(out, Layout) else Layout.at(out)
    feature_set = _pick_feature_set(layout, params)
    out_dir = feature_set.export_dir(params.tool)
    sources = sorted(feature_set.h5_dir.glob("*.h5"))
    if not sources:
        raise UserError(f"{feature_set.h5_dir}: no features h5 to export; run `wsip extract` first")
    with storage_errors(layout.root):
        written = [write_stamp(src, out_dir / src.name) for src in sources]
    return ExportFeaturesResult(written, out_dir)


def _pick_feature_set(layout: Layout, params: ExportFeaturesParams) -> FeatureSet:
    patch_set = layout.pick_patch_set(params.patches)
    sets = [fs for fs in layout.feature_sets() if fs.patch_config == patch_set.name]
    if params.features:
        chosen = [fs for fs in sets if fs.name == params.features]
        if not chosen:
            known = ", ".join(fs.name for fs in sets) or "none yet"
            raise UserError(f"--features {params.features}: no such feature set under {patch_set.name} (have: {known})")
        return chosen[0]
    if len(sets) != 1:
        known = ", ".join(fs.name for fs in sets)
        raise UserError(f"{layout.features_dir(patch_set.name)}: "
                        + (f"several feature sets ({known}); pass --features NAME" if sets else
                           "no features yet; run `wsip extract` first"))
    return sets[0]


def write_stamp(src: Path, dst: Path) -> Path:
    """One wsip features h5 → one STAMP features h5 (µm coordinates from the slide's MPP the coords recorded)."""
    with h5py.File(src, "r") as f:
        feats, coords, attrs = f["features"][:], f["coords"][:], dict(f.attrs)
    try:
        mpp, size_level0 = float(attrs["slide_mpp"]), int(attrs["patch_size_level0"])
    except KeyError as missing:
        raise UserError(f"{src}: no {missing} attribute (not written by `wsip extract`); cannot place its "
                        "patches in µm") from None
    encoder = str(attrs.get("encoder", ""))
    with atomic_write(dst) as tmp, h5py.File(tmp, "w") as g:
        g["feats"] = feats
        g["coords"] = (coords.astype(np.float64) * mpp).astype(np.float32)
        g.attrs["extractor"] = STAMP_EXTRACTORS.get(encoder, f"wsip-{encoder}")
        g.attrs["unit"] = "um"
        g.attrs["tile_size_um"] = size_level0 * mpp
        g.attrs["tile_size_px"] = int(attrs.get("output_size", size_level0))
        g.attrs["feat_type"] = "tile"
        for key in ("encoder", "weights_sha256", "slide_mpp", "target_magnification", "cache_key"):
            if key in attrs:
                g.attrs[f"wsip_{key}"] = attrs[key]
    return dst
