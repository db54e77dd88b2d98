"""`wsip patch`: tissue segmentation + a patch grid at a physical magnification (DESIGN §5–§6).

Per slide: plan the read (level, size) from MPP, segment tissue at ~8 µm/px, lay the grid in level-0 px,
keep patches whose tissue fraction (integral image, O(1) per patch) reaches `min_tissue`, and write the
CLAM+TRIDENT compatible coords h5, a QC jpg and a manifest row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import cv2
import h5py
import numpy as np

from wsi_pipeline.errors import InputError
from wsi_pipeline.slide import Slide, SlideError
from wsi_pipeline.stages import cohort
from wsi_pipeline.stages.cohort import SlideOutcome, SlideSource
from wsi_pipeline.stages.segment import SegmentParams, TissueMask, segment_tissue
from wsi_pipeline.units import MPP, Level0Px, LevelPx, mpp_for_magnification
from wsi_pipeline.workspace import (
    atomic_write,
    code_digest,
    params_hash,
    parse_shard,
    slide_fingerprint,
    take_shard,
    workspace_root,
    write_json_atomic,
)

MANIFEST_COLUMNS = ("slide_id", "slide_path", "status", "n_patches", "mpp", "mpp_source", "read_level",
                    "read_size", "seconds", "error")
_CODE = code_digest(__file__, Path(__file__).with_name("segment.py"))
TOLERANCE = 0.02  # DESIGN §5: a downsample within 2% of a level's (or of an integer ratio) counts as equal


@dataclass(frozen=True)
class PatchParams:
    """Everything that decides which patches a slide gets (all of it, plus our code digest, is hashed)."""

    magnification: float = 20.0
    patch_size: int = 256
    overlap: int = 0  # px at the target magnification, shared by neighbouring patches
    min_tissue: float = 0.25
    allow_upsample: bool = False
    segment: SegmentParams = field(default_factory=SegmentParams)
    masks: Path | None = None  # folder of <slide_id>.geojson / <slide_id>.png user masks

    @classmethod
    def from_dict(cls, data: dict) -> PatchParams:
        """Rebuild from a `params.json` (what `wsip predict` does to patch a new slide like the cohort)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["segment"] = SegmentParams(**values.get("segment", {}))
        values["masks"] = Path(values["masks"]) if values.get("masks") else None
        return cls(**values)

    def config_name(self) -> str:
        """`20x_256px_0px`; a short hash suffix when any other knob differs from its default."""
        base = f"{self.magnification:g}x_{self.patch_size}px_{self.overlap}px"
        extra = {k: v for k, v in asdict(self).items() if k not in ("magnification", "patch_size", "overlap")}
        default = {k: v for k, v in asdict(PatchParams()).items() if k in extra}
        return base if extra == default else f"{base}_{params_hash(extra)[:6]}"


@dataclass(frozen=True)
class ReadPlan:
    """How one slide is read for this magnification: which level, how many px, and the grid step."""

    target_mpp: MPP
    slide_mpp: MPP
    mpp_source: str
    read_level: int
    read_size: LevelPx
    level_downsample: float
    patch_size_level0: Level0Px
    step_level0: Level0Px


def plan_read(slide: Slide, params: PatchParams) -> ReadPlan:
    """DESIGN §5: coarsest level with enough resolution; read round(patch × ds / level_ds) px there."""
    info = slide.mpp_info
    mpp = slide.mpp  # raises the "pass --mpp" error when nothing records it
    target = mpp_for_magnification(params.magnification)
    downsample = target / mpp
    if downsample < 1 - TOLERANCE and not params.allow_upsample:
        raise SlideError(
            f"{slide.path}: {params.magnification:g}x needs {target:.3f} µm/px but the slide's finest is "
            f"{mpp:.3f} µm/px; use a lower --mag or pass --allow-upsample")
    level = slide.best_level_for_downsample(downsample, TOLERANCE)
    level_ds = slide.level_downsamples[level]
    ratio = downsample / level_ds
    if round(ratio) >= 1 and abs(ratio - round(ratio)) <= TOLERANCE * ratio:
        ratio = float(round(ratio))
    read_size = max(1, round(params.patch_size * ratio))
    size0 = round(read_size * level_ds)
    step0 = max(1, round((params.patch_size - params.overlap) * ratio * level_ds))
    return ReadPlan(target, mpp, info.source if info else "", level, LevelPx(read_size), level_ds,
                    Level0Px(size0), Level0Px(step0))


def tissue_grid(tissue: TissueMask, plan: ReadPlan, dims: tuple[int, int], min_tissue: float) -> np.ndarray:
    """Level-0 (x, y) of every grid patch inside the slide whose tissue fraction ≥ `min_tissue`."""
    w0, h0 = dims
    size, step = plan.patch_size_level0, plan.step_level0
    if w0 < size or h0 < size:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(0, w0 - size + 1, step, dtype=np.int64)
    ys = np.arange(0, h0 - size + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    integral = cv2.integral((tissue.mask > 0).astype(np.uint8))  # (h+1, w+1), int32
    mh, mw = tissue.mask.shape
    ds = tissue.downsample
    x0 = np.clip(np.floor(coords[:, 0] / ds), 0, mw).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / ds), 0, mh).astype(np.int64)
    x1 = np.clip(np.ceil((coords[:, 0] + size) / ds), 0, mw).astype(np.int64)
    y1 = np.clip(np.ceil((coords[:, 1] + size) / ds), 0, mh).astype(np.int64)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return coords[inside / area >= min_tissue]


def _h5_attrs(slide: Slide, plan: ReadPlan, params: PatchParams, key: str, fingerprint: str) -> dict:
    level_w, level_h = slide.level_dimensions[plan.read_level]
    return {
        # CLAM
        "patch_size": int(plan.read_size), "patch_level": int(plan.read_level),
        "downsample": [plan.level_downsample] * 2, "level_dim": [level_w, level_h],
        "downsampled_level_dim": [level_w, level_h], "name": slide.slide_id,
        # TRIDENT
        "patch_size_level0": int(plan.patch_size_level0), "target_magnification": float(params.magnification),
        "level0_magnification": float(slide.objective_power or 10.0 / plan.slide_mpp),
        "overlap": int(params.overlap), "level0_width": int(slide.dimensions[0]),
        "level0_height": int(slide.dimensions[1]),
        # ours
        "target_mpp": float(plan.target_mpp), "slide_mpp": float(plan.slide_mpp),
        "read_level": int(plan.read_level), "read_size": int(plan.read_size),
        "output_size": int(params.patch_size), "mpp_source": plan.mpp_source,
        "params_hash": key, "slide_fingerprint": fingerprint,
    }


def write_coords(path: Path, coords: np.ndarray, attrs: dict) -> None:
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset("coords", data=coords.astype(np.int64))
        for k, v in attrs.items():
            dset.attrs[k] = v


def coords_are_current(path: Path, key: str, fingerprint: str) -> bool:
    """A finished coords file is reused only if its params hash and slide fingerprint both match."""
    try:
        with h5py.File(path, "r") as f:
            attrs = f["coords"].attrs
            return attrs.get("params_hash") == key and attrs.get("slide_fingerprint") == fingerprint
    except (OSError, KeyError):
        return False


def qc_read(slide: Slide, seg_mpp: float) -> np.ndarray | None:
    """A sharper whole-slide read for QC (~1024 px) when the segmentation image would be smaller than that.

    Only small slides get one; segmentation then reuses it, so every slide is still read once.
    """
    qc_ds = max(max(slide.dimensions) / 1024, 1.0)
    return slide.read_downsampled(qc_ds) if qc_ds < seg_mpp / slide.mpp else None


def write_qc(path: Path, slide: Slide, tissue: TissueMask, coords: np.ndarray, plan: ReadPlan,
             background: np.ndarray | None = None) -> None:
    """Thumbnail + tissue contours (green), holes (blue) and kept patch boxes (yellow).

    Drawn on `background` (a sharper read, see `qc_read`) when given, else on the segmentation image.
    """
    image = tissue.image if background is None else background
    ds = slide.dimensions[0] / image.shape[1]
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    for polygons, colour, width in ((tissue.contours, (0, 160, 0), 2), (tissue.holes, (200, 80, 0), 1)):
        scaled = [np.round(c / ds).astype(np.int32)[:, None, :] for c in polygons]
        cv2.drawContours(image, scaled, -1, colour, width)
    size = plan.patch_size_level0 / ds
    for x, y in coords / ds:
        cv2.rectangle(image, (int(x), int(y)), (int(x + size), int(y + size)), (0, 200, 230), 1)
    with atomic_write(path) as tmp:
        tmp.write_bytes(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())


@dataclass
class PatchResult:
    """Per-slide outcomes plus where they went; `failures` decides the exit code."""

    out_dir: Path
    outcomes: list[SlideOutcome]

    @property
    def failures(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status in cohort.FAILURES]


def slide_key(params: PatchParams, source: SlideSource) -> str:
    """Cache key of one slide's coords: all params, the per-slide MPP override and our code digest."""
    return params_hash({"params": asdict(params), "mpp": source.mpp, "code": _CODE})


def patch_slide(source: SlideSource, *, params: PatchParams, out_dir: Path, force: bool = False
                ) -> SlideOutcome:
    """Patch one slide; the unit `run_cohort` parallelises. Raises on unreadable slides (recorded there)."""
    coords_path = out_dir / "coords" / f"{source.slide_id}.h5"
    key, fingerprint = slide_key(params, source), slide_fingerprint(source.path)
    if not force and coords_are_current(coords_path, key, fingerprint):
        return SlideOutcome(source.slide_id, cohort.CACHED)
    timings: dict[str, float] = {}
    with Slide(source.path, mpp=source.mpp) as slide:
        plan = plan_read(slide, params)
        t = time.perf_counter()
        mask_path = _user_mask(params.masks, source.slide_id)
        sharper = qc_read(slide, params.segment.seg_mpp)
        tissue = segment_tissue(slide, params.segment, user_mask=mask_path, sharper=sharper)
        timings["segment_s"] = time.perf_counter() - t
        t = time.perf_counter()
        coords = tissue_grid(tissue, plan, slide.dimensions, params.min_tissue)
        timings["grid_s"] = time.perf_counter() - t
        t = time.perf_counter()
        write_qc(out_dir / "qc" / f"{source.slide_id}.jpg", slide, tissue, coords, plan, sharper)
        row = {"slide_path": str(source.path), "n_patches": len(coords), "mpp": f"{plan.slide_mpp:.4f}",
               "mpp_source": plan.mpp_source, "read_level": plan.read_level, "read_size": plan.read_size}
        if len(coords) == 0:
            coords_path.unlink(missing_ok=True)
            return SlideOutcome(source.slide_id, cohort.NO_TISSUE, row,
                                f"no tissue found ({tissue.tissue_area_um2 / 1e6:.3f} mm² detected); check the "
                                "QC image, or lower --min-tissue / pass a mask")
        write_coords(coords_path, coords, _h5_attrs(slide, plan, params, key, fingerprint))
        timings["write_s"] = time.perf_counter() - t
    row.update({k: f"{v:.3f}" for k, v in timings.items()})
    return SlideOutcome(source.slide_id, cohort.DONE, row)


def _user_mask(folder: Path | None, slide_id: str) -> Path | None:
    if folder is None:
        return None
    for suffix in (".geojson", ".json", ".png"):
        if (candidate := folder / f"{slide_id}{suffix}").exists():
            return candidate
    return None


def patch(
    slides: Sequence[SlideSource],
    params: PatchParams = PatchParams(),
    *,
    out: str | Path | None = None,
    workers: int = 1,
    shard: str | None = None,
    force: bool = False,
    on_done: Callable[[SlideOutcome], None] | None = None,
) -> PatchResult:
    """Patch a cohort into `<out>/patches/<config>/`; callable from Python exactly as `wsip patch`."""
    if not 0 <= params.overlap < params.patch_size:
        raise InputError(f"--overlap must be in [0, patch size), got {params.overlap}")
    if not 0 <= params.min_tissue <= 1:
        raise InputError(f"--min-tissue must be in [0, 1], got {params.min_tissue}")
    out_dir = workspace_root(out) / "patches" / params.config_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "params.json", {**asdict(params), "config": params.config_name()})
    items = take_shard(slides, parse_shard(shard), key=lambda s: s.slide_id)
    outcomes = cohort.run_cohort(
        partial(patch_slide, params=params, out_dir=out_dir, force=force), items,
        slide_id=lambda s: s.slide_id, lock_dir=out_dir / ".locks", manifest=out_dir / "manifest.csv",
        columns=MANIFEST_COLUMNS + ("segment_s", "grid_s", "write_s"), workers=workers, on_done=on_done,
    )
    return PatchResult(out_dir, outcomes)
