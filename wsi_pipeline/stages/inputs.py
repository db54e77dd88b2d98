"""Which slides a command works on: files, folders and slide CSVs, turned into `SlideSource`s."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from wsi_pipeline.errors import InputError
from wsi_pipeline.slide import MPP_RANGE, is_slide_file, slide_id_for, slide_location
from wsi_pipeline.workspace.csv_text import decoded_lines
from wsi_pipeline.workspace.slide_id import name_problem, shown


@dataclass(frozen=True)
class SlideSource:
    """One slide to process (absolute path), with its MPP override (a CSV `mpp` column or `--mpp-override`:
    wins over what the slide records), its MPP fallback (`--mpp`: used only when the slide records none), and
    the optional `label` and `case_id` columns of a slide CSV (what `wsip predict` scores, docs/evaluation.md).

    A DICOM WSI is its series folder: a .dcm file given here stands for the folder it is in.
    """

    path: Path
    mpp: float | None = None
    mpp_fallback: float | None = None
    label: str | None = None
    case_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", slide_location(Path(self.path).expanduser().absolute()))

    @property
    def slide_id(self) -> str:
        """File name without extension (CLAM/TRIDENT convention), or a DICOM series' folder name: outputs are
        named by it."""
        return slide_id_for(self.path)


def check_mpp(value: float | None, what: str) -> float | None:
    """A plausible µm/px (finite, within `MPP_RANGE`), or a one-line `InputError` before any work."""
    if value is not None and not (math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]):
        raise InputError(f"{what} {value!r} is not a plausible µm per pixel ({MPP_RANGE[0]}–{MPP_RANGE[1]:g}; e.g. "
                         "0.25 for 40x, 0.5 for 20x)")
    return value


def _csv_mpp(text: str, where: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}: mpp {text!r} is not a positive number of µm per pixel (e.g. 0.25 or 0.5)")
    return check_mpp(value, f"{where}: mpp")


def _read_slide_csv(path: Path) -> list[SlideSource]:
    reader = csv.DictReader(decoded_lines(path))
    if "slide_path" not in (reader.fieldnames or []):
        raise InputError(f"{path}: a slide CSV needs a `slide_path` column (optional: `mpp`, `label`, `case_id`)")
    sources = []
    for line, row in enumerate(reader, start=2):
        text = (row["slide_path"] or "").strip()
        if not text:
            raise InputError(f"{path}:{line}: empty slide_path (fill it in or drop the row)")
        slide_path = Path(text)
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        label, case_id = ((row.get(k) or "").strip() or None for k in ("label", "case_id"))
        sources.append(SlideSource(slide_path, _csv_mpp((row.get("mpp") or "").strip(), f"{path}:{line}"),
                                   label=label, case_id=case_id))
    return sources


def resolve_inputs(inputs: Iterable[str | os.PathLike[str]], *, mpp: float | None = None,
                   mpp_override: float | None = None) -> list[SlideSource]:
    """Files, folders (recursing over known WSI extensions) or CSVs with `slide_path`[, `mpp`] → slides.

    In a folder, the .dcm files of one sub-folder are one DICOM WSI series, so one slide named by that folder.

    `mpp` (`--mpp`) is the fallback of slides that record no MPP; `mpp_override` (`--mpp-override`) replaces
    the recorded MPP of slides without a CSV value (docs/slides.md). Both are checked first. A path given on
    the command line that does not exist is an input error; a CSV row naming a missing file fails that slide
    only. Duplicate slide ids are an error, since every output is named by slide id.
    """
    check_mpp(mpp, "--mpp")
    check_mpp(mpp_override, "--mpp-override")
    inputs = list(inputs)
    sources: list[SlideSource] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = (p for p in sorted(item.rglob("*")) if p.is_file() and is_slide_file(p))
            sources += [SlideSource(p) for p in dict.fromkeys(map(slide_location, files))]
        elif item.suffix.lower() == ".csv" and item.is_file():
            sources += _read_slide_csv(item)
        elif item.exists():
            sources.append(SlideSource(item))
        else:
            raise InputError(f"{item}: no such file or folder (check the path)")
    sources = [replace(s, mpp=s.mpp if s.mpp is not None else mpp_override, mpp_fallback=mpp) for s in sources]
    seen: dict[str, Path] = {}
    for s in sources:
        if s.slide_id in seen and seen[s.slide_id] != s.path:
            raise InputError(f"two slides share the id {s.slide_id!r}: {seen[s.slide_id]} and {s.path}; "
                             "rename one (outputs are named by file name without extension, or by a DICOM "
                             "series' folder name)")
        seen[s.slide_id] = s.path
    unique = {s.slide_id: s for s in sources}
    if not unique:
        raise InputError("no slides found in " + ", ".join(map(str, inputs)))
    return list(unique.values())


def split_valid(sources: Sequence[SlideSource]) -> tuple[list[SlideSource], list[tuple[SlideSource, str]]]:
    """(slides whose ids can name outputs, [(slide, one-line reason)] for the others): a file name that is not
    UTF-8, too long or hidden fails its own slide only, and the rest of the cohort goes on."""
    valid, invalid = [], []
    for source in sources:
        problem = name_problem(source.slide_id)
        if problem is None:
            valid.append(source)
        else:
            invalid.append((source, f"{shown(str(source.path))}: slide id {problem}; rename the file"))
    return valid, invalid
