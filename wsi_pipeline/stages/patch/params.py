"""`PatchParams`: everything that decides which patches a slide gets, and the config folder it names."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.digests import params_hash
from wsi_pipeline.errors import InputError
from wsi_pipeline.stages.patch.segment import TISSUE_MODES, SegmentParams

MAG_RANGE = (0.1, 1000.0)  # beyond these no scanner and no grid makes sense (and inf would name a folder)
MAX_PATCH_PX = 16384


@dataclass(frozen=True)
class PatchParams:
    """All of it, plus a digest of the patching code, is the coords' cache key."""

    magnification_x: float = 20.0  # target magnification: 20 → 0.5 µm/px, 10 → 1.0
    patch_size_px: int = 256  # patch side at the target magnification
    overlap_px: int = 0  # shared by neighbouring patches, at the target magnification
    min_tissue_fraction: float = 0.25  # a patch is kept when at least this much of it is tissue
    allow_upsample: bool = False
    segment: SegmentParams = field(default_factory=SegmentParams)
    masks: Path | None = None  # folder of <slide_id>.geojson / <slide_id>.png user masks

    def validate(self) -> None:
        """Each bad value is a one-line error naming its flag."""
        if not (math.isfinite(self.magnification_x) and MAG_RANGE[0] <= self.magnification_x <= MAG_RANGE[1]):
            raise InputError(f"--mag must be a positive magnification from {MAG_RANGE[0]:g} to {MAG_RANGE[1]:g} "
                             f"(e.g. 20 or 10), got {self.magnification_x:g}")
        if not 1 <= self.patch_size_px <= MAX_PATCH_PX:
            raise InputError(f"--patch-size must be at least 1 px and at most {MAX_PATCH_PX}, got {self.patch_size_px}")
        if not 0 <= self.overlap_px < self.patch_size_px:
            raise InputError(f"--overlap must be in [0, patch size {self.patch_size_px}), got {self.overlap_px}")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise InputError(f"--min-tissue must be in [0, 1], got {self.min_tissue_fraction}")
        if self.segment.tissue not in TISSUE_MODES:
            raise InputError(f"--tissue {self.segment.tissue}: choose {', '.join(TISSUE_MODES)}")
        if self.masks is not None and not Path(self.masks).is_dir():
            raise InputError(f"--masks {self.masks}: no such folder (one <slide_id>.geojson or .png per slide)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchParams:
        """Rebuild from a recorded `params.json` (what `wsip predict` does to patch a new slide like the cohort)."""
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["segment"] = SegmentParams(**values.get("segment", {}))
        values["masks"] = Path(values["masks"]) if values.get("masks") else None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "masks": str(self.masks) if self.masks else None}

    def config_name(self) -> str:
        """`20x_256px_0px`; a short hash suffix when any other knob differs from its default."""
        base = f"{self.magnification_x:g}x_{self.patch_size_px}px_{self.overlap_px}px"
        main = ("magnification_x", "patch_size_px", "overlap_px")
        extra = {k: v for k, v in asdict(self).items() if k not in main}
        default = {k: v for k, v in asdict(PatchParams()).items() if k in extra}
        return base if extra == default else f"{base}_{params_hash(extra)[:6]}"
