"""`Slide`: one small, obvious object over a whole-slide image (after openslide-python's own surface).

Backends, tried in order: OpenSlide (every vendor format, and DICOM WSI since OpenSlide 4); tiatoolbox's reader
when it is already installed (formats OpenSlide refuses); and a plain-image reader for small untiled TIFF/PNG/JPEG
files (OpenSlide's own `ImageSlide`, PIL-based). Everything else — segmentation, grids — lives outside this module.

A DICOM WSI is a series of .dcm files (one per pyramid level, plus label/overview images) kept in one folder: a
slide is then that folder, or any .dcm file in it, and its id is the folder's name (docs/slides.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import UserError
from wsi_pipeline.units import MPP, Level0Px, LevelPx, mpp_for_magnification

WSI_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm",
)
# Formats only OpenSlide reads: when it cannot, the file is broken (a truncated .svs still opens as a plain TIFF
# of its first page, which has no MPP: "pass --mpp" would be the wrong advice).
_VENDOR_FORMATS = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
# Plausible scan resolutions; anything outside is a placeholder (e.g. 72 dpi TIFF defaults = 352 µm/px).
MPP_RANGE = (0.05, 50.0)
# `MppInfo.source` of a value the user gave: replacing the recorded one, or filling in for a slide without one.
OVERRIDE, FALLBACK = "override", "--mpp (the slide records none)"


class SlideError(UserError):
    """A slide cannot be opened or used; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class MppInfo:
    mpp: MPP
    source: str


def _mpp_from_properties(props: Mapping[str, str]) -> MppInfo | None:
    """docs/design.md §5 order after the override: openslide.mpp > aperio.MPP > TIFF resolution > objective power."""

    def plausible(value: float) -> bool:
        return MPP_RANGE[0] <= value <= MPP_RANGE[1]

    def number(key: str) -> float | None:
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) and value > 0 else None

    mx, my = number("openslide.mpp-x"), number("openslide.mpp-y")
    if mx and plausible(mx):
        return MppInfo(MPP((mx + (my or mx)) / 2), "openslide.mpp")
    aperio = number("aperio.MPP")
    if aperio and plausible(aperio):
        return MppInfo(MPP(aperio), "aperio.MPP")
    xres, unit = number("tiff.XResolution"), props.get("tiff.ResolutionUnit", "").lower()
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if xres and microns_per_unit and plausible(microns_per_unit / xres):
        return MppInfo(MPP(microns_per_unit / xres), "tiff.resolution")
    power = number("openslide.objective-power")
    if power:
        return MppInfo(mpp_for_magnification(power), "objective-power (approximate: 10/power)")
    return None


def _import_tiatoolbox_reader() -> tuple[Any, Any]:
    """tiatoolbox's `import` calls logging.captureWarnings(True) and, when the root logger has no handler, gives it
    INFO-level stdout/stderr handlers: a placeholder handler stops the latter, and the former is undone, so an
    optional fallback neither rewires the app's logging nor prints to stdout."""
    import logging
    import warnings

    root, placeholder, showwarning = logging.getLogger(), logging.NullHandler(), warnings.showwarning
    root.addHandler(placeholder)
    try:
        from tiatoolbox.wsicore.wsireader import VirtualWSIReader, WSIReader
    finally:
        root.removeHandler(placeholder)
        if warnings.showwarning is not showwarning:
            logging.captureWarnings(False)
    return WSIReader, VirtualWSIReader


class _TiatoolboxBackend:
    """Adapter giving tiatoolbox's WSIReader the small OpenSlide surface the rest of `Slide` uses."""

    def __init__(self, path: Path):
        WSIReader, VirtualWSIReader = _import_tiatoolbox_reader()  # noqa: N806 (optional: only when installed)

        reader = WSIReader.open(path)
        if isinstance(reader, VirtualWSIReader):  # a plain image loaded whole: the "image" backend reads it better
            raise ValueError("not a tiled slide")
        self._reader = reader
        info = reader.info
        self.level_dimensions = [tuple(int(v) for v in d) for d in info.level_dimensions]
        self.level_downsamples = [float(d) for d in info.level_downsamples]
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        vendor = "" if info.vendor in (None, "None") else str(info.vendor)  # WSIMeta stores str(None)
        props: dict[str, str] = {"openslide.vendor": vendor}
        if info.mpp is not None:
            props["openslide.mpp-x"], props["openslide.mpp-y"] = (str(float(v)) for v in info.mpp)
        if info.objective_power:
            props["openslide.objective-power"] = str(info.objective_power)
        self.properties = props

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # location is level-0 (baseline) px, as in OpenSlide; pad outside the slide with white, not black
        return self._reader.read_rect(location, size, resolution=level, units="level", pad_constant_values=255)

    def close(self) -> None:
        self._reader = None


def _openslide_open(path: Path) -> Any:
    """The OpenSlide attempt on its own, so a test can refuse it without also refusing tiatoolbox's OpenSlide."""
    import openslide

    return openslide.OpenSlide(str(path))


def is_dicom_folder(path: Path) -> bool:
    """A folder that directly holds .dcm files: one DICOM WSI series, i.e. one slide (docs/slides.md)."""
    return path.is_dir() and any(p.suffix.lower() == ".dcm" and p.is_file() for p in path.iterdir())


def slide_location(path: Path) -> Path:
    """The path a slide is known by: a .dcm file stands for its series folder, anything else for itself."""
    return path.parent if path.suffix.lower() == ".dcm" and path.is_file() else path


def slide_id_for(path: Path) -> str:
    """Outputs are named by it: the file name without extension (CLAM/TRIDENT convention), or the series
    folder's name for a DICOM WSI, whose files are named by UIDs and are only parts of one slide."""
    location = slide_location(path)
    return location.name if location.is_dir() else location.stem


def _dicom_series_file(folder: Path) -> Path:
    """The .dcm file OpenSlide is given for a series folder: the first in name order that is a DICOM WSI
    (OpenSlide then gathers the rest of that file's series from the folder itself)."""
    import openslide

    for candidate in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file()):
        if openslide.OpenSlide.detect_format(str(candidate)) == "dicom":
            return candidate
    raise SlideError(f"{folder}: no DICOM WSI file (VL Whole Slide Microscopy Image) among its .dcm files; "
                     "give the folder of the slide's series")


def _open_backend(path: Path) -> tuple[Any, str]:
    import importlib.util

    import openslide

    errors: list[str] = []
    try:
        return _openslide_open(path), "openslide"
    except (openslide.OpenSlideError, OSError) as exc:  # OpenSlideUnsupportedFormatError is a subclass
        errors.append(f"OpenSlide: {exc}")
    if importlib.util.find_spec("tiatoolbox") is not None:  # probe without importing (its import has side effects)
        try:
            return _TiatoolboxBackend(path), "tiatoolbox"
        except Exception as exc:  # any reader failure means "cannot open"
            errors.append(f"tiatoolbox: {exc}")
    if path.suffix.lower() in _VENDOR_FORMATS:  # OpenSlide's own format: a plain-image read of it is wrong
        raise SlideError(f"{path}: cannot open as a slide ({'; '.join(errors)}); is the file complete (not "
                         "truncated) and a WSI?")
    try:
        return openslide.ImageSlide(str(path)), "image"
    except Exception as exc:  # PIL raises many types for non-images
        errors.append(f"image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise SlideError(f"{path}: cannot open as a slide ({'; '.join(errors)}); is the file complete and a WSI?")


def _tiff_mpp_from_pil(slide: Any) -> dict[str, str]:
    """Plain-image TIFFs: expose their resolution tags the way OpenSlide names them."""
    image = getattr(slide, "_image", None)
    tags = getattr(image, "tag_v2", None)
    if not tags or 282 not in tags or 296 not in tags:
        return {}
    unit = {2: "inch", 3: "centimeter"}.get(int(tags[296]))
    return {"tiff.XResolution": str(float(tags[282])), "tiff.ResolutionUnit": unit} if unit else {}


class Slide:
    """An open whole-slide image. Coordinates passed in are level-0 pixels; sizes are at the read level.

    >>> with Slide("a.svs", mpp=None) as s:
    ...     patch = s.read_region((x, y), level=0, size=(256, 256))  # (256, 256, 3) uint8 RGB
    """

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None,
                 mpp_fallback: float | None = None):
        self.path = Path(path)
        if is_dicom_folder(self.path):
            file = _dicom_series_file(self.path)
        elif self.path.is_dir():
            raise SlideError(f"{self.path}: a folder, and no DICOM WSI series (no .dcm files in it); give a slide "
                             "file, or the folder of a DICOM series")
        elif not self.path.is_file():
            raise SlideError(f"{self.path}: no such file; check the path")
        else:
            file = self.path
        self._handle, self.backend = _open_backend(file)
        props = dict(self._handle.properties)
        if self.backend == "image":
            props.update(_tiff_mpp_from_pil(self._handle))
        self.properties: Mapping[str, str] = props
        self._mpp_override, self._mpp_fallback = mpp, mpp_fallback
        try:
            self.level_dimensions: list[tuple[int, int]] = [tuple(d) for d in self._handle.level_dimensions]
            self.level_downsamples: list[float] = [float(d) for d in self._handle.level_downsamples]
        except Exception as exc:
            raise SlideError(f"{self.path}: unreadable pyramid ({exc}); the file may be corrupt") from None

    # ---------------------------------------------------------------- metadata
    @property
    def slide_id(self) -> str:
        """File name without extension (CLAM/TRIDENT convention); a DICOM series' folder name."""
        return slide_id_for(self.path)

    @property
    def dimensions(self) -> tuple[Level0Px, Level0Px]:
        w, h = self.level_dimensions[0]
        return Level0Px(w), Level0Px(h)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str:
        return self.properties.get("openslide.vendor") or self.backend

    @property
    def objective_power(self) -> float | None:
        try:
            return float(self.properties["openslide.objective-power"])
        except (KeyError, ValueError):
            return None

    @property
    def mpp_info(self) -> MppInfo | None:
        """The slide's µm/px and where it came from (the override, what the slide records, else the fallback),
        or None when nothing gives one."""
        if self._mpp_override is not None:
            return self._given_mpp(self._mpp_override, OVERRIDE)
        recorded = _mpp_from_properties(self.properties)
        if recorded is None and self._mpp_fallback is not None:
            return self._given_mpp(self._mpp_fallback, FALLBACK)
        return recorded

    def _given_mpp(self, value: float, source: str) -> MppInfo:
        if not (math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]):
            raise SlideError(f"{self.path}: µm/px {value} is implausible (0.05–50 µm/px)")
        return MppInfo(MPP(float(value)), source)

    @property
    def mpp(self) -> MPP:
        info = self.mpp_info
        if info is None:
            raise SlideError(
                f"{self.path}: the slide records no microns-per-pixel; pass --mpp (e.g. --mpp 0.25 for 40x, "
                "0.5 for 20x) or an `mpp` column in the slide CSV"
            )
        return info.mpp

    # ---------------------------------------------------------------- pixels
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[LevelPx, LevelPx] | tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3); transparent/out-of-slide pixels composited on white."""
        try:
            region = self._handle.read_region((int(location[0]), int(location[1])), int(level),
                                              (int(size[0]), int(size[1])))
        except Exception as exc:
            raise SlideError(f"{self.path}: read failed at {location} level {level} ({exc})") from None
        return _to_rgb(np.asarray(region))

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.02) -> int:
        """The level with the largest downsample still ≤ `downsample` (2% tolerance): cheapest enough read."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + tolerance)]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def read_downsampled(self, downsample: float, *, stripe_pixels: int = 1 << 24) -> np.ndarray:
        """The whole slide at `downsample` × level 0, from the best level, area-resized.

        Reads in horizontal stripes, so a single-level 100k-px slide never sits in memory at full size.
        """
        import cv2

        level = self.best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        factor = max(downsample / level_ds, 1.0)
        lw, lh = self.level_dimensions[level]
        out_w, out_h = max(1, round(lw / factor)), max(1, round(lh / factor))
        rows = max(1, int(stripe_pixels // (lw * factor)))
        stripes = []
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            y0, y1 = round(r0 * factor), min(lh, round(r1 * factor))
            stripe = self.read_region((0, round(y0 * level_ds)), level, (lw, max(1, y1 - y0)))
            stripes.append(cv2.resize(stripe, (out_w, r1 - r0), interpolation=cv2.INTER_AREA))
        return np.concatenate(stripes, axis=0)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most about `max_size` px."""
        return self.read_downsampled(max(max(self.dimensions) / max_size, 1.0))

    def deep_zoom(self, *, tile_size: int = 254, overlap: int = 1) -> Any:
        """OpenSlide's `DeepZoomGenerator` over the whole level-0 plane (no bounds cropping, so level-0 patch
        coordinates place overlays exactly): the tiles of a zoomable viewer. OpenSlide and plain-image slides."""
        from openslide.deepzoom import DeepZoomGenerator

        if self.backend not in ("openslide", "image"):
            raise SlideError(f"{self.path}: read through {self.backend}, which has no Deep Zoom tiler; the zoomable "
                             "viewer needs a slide OpenSlide can open")
        return DeepZoomGenerator(self._handle, tile_size=tile_size, overlap=overlap, limit_bounds=False)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, {w}x{h}, levels={self.level_count})"


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """Composite RGBA (OpenSlide returns un-premultiplied RGBA) on white; pass RGB through."""
    if array.ndim == 3 and array.shape[2] == 4:
        alpha = array[..., 3:4]
        if alpha.min() == 255:
            import cv2  # lazily: `wsip --help` stays light

            # one SIMD pass; numpy's strided 3-of-4 copy costs ~2 ms per 512² patch, a fifth of a patch read
            return cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGBA2RGB)
        a = alpha.astype(np.uint16)
        return ((array[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def is_slide_file(path: Path) -> bool:
    return path.suffix.lower() in WSI_EXTENSIONS
