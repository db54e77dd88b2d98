"""Run a per-slide job over a cohort: inputs, shards, locks, cache checks, manifest rows, worker processes.

Shared by `patch` and `extract`, so both stages behave the same way: a bad slide never stops a cohort, a
slide held by another worker is left to it, and every outcome lands in the stage's manifest.csv.
"""

from __future__ import annotations

import csv
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import InputError, UserError
from wsi_pipeline.slide import is_slide_file
from wsi_pipeline.workspace import SlideLock, update_manifest

# Outcomes a job reports; the last three count as failures in the exit code.
DONE, CACHED, BUSY = "done", "cached", "busy"
FAILED, NO_TISSUE = "failed", "no_tissue"
FAILURES = (FAILED, NO_TISSUE)


@dataclass(frozen=True)
class SlideSource:
    """One slide to process, with its optional per-slide MPP override (from a CSV `mpp` column)."""

    path: Path
    mpp: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def slide_id(self) -> str:
        return self.path.stem


@dataclass
class SlideOutcome:
    slide_id: str
    status: str
    row: dict[str, Any] = field(default_factory=dict)  # the manifest row
    error: str = ""


def _read_slide_csv(path: Path) -> list[SlideSource]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "slide_path" not in (reader.fieldnames or []):
            raise InputError(f"{path}: a slide CSV needs a `slide_path` column (optional: `mpp`)")
        sources = []
        for line, row in enumerate(reader, start=2):
            slide_path = Path(row["slide_path"].strip())
            if not slide_path.is_absolute():
                slide_path = path.parent / slide_path
            mpp_text = (row.get("mpp") or "").strip()
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError:
                raise InputError(f"{path}:{line}: mpp {mpp_text!r} is not a number") from None
            sources.append(SlideSource(slide_path, mpp))
    return sources


def resolve_inputs(inputs: Iterable[str | os.PathLike[str]], *, mpp: float | None = None) -> list[SlideSource]:
    """Files, folders (recursing over known WSI extensions) or CSVs with `slide_path`[, `mpp`] → slides.

    `mpp` (the `--mpp` flag) applies to slides without a CSV value. Duplicate slide ids are an error, since
    every output is named by slide id (CLAM/TRIDENT convention).
    """
    sources: list[SlideSource] = []
    for item in map(Path, inputs):
        if item.is_dir():
            sources += [SlideSource(p) for p in sorted(item.rglob("*")) if p.is_file() and is_slide_file(p)]
        elif item.suffix.lower() == ".csv" and item.is_file():
            sources += _read_slide_csv(item)
        elif item.exists() or is_slide_file(item):
            sources.append(SlideSource(item))
        else:
            raise InputError(f"{item}: no such file or folder")
    sources = [SlideSource(s.path, s.mpp if s.mpp is not None else mpp) for s in sources]
    seen: dict[str, Path] = {}
    for s in sources:
        if s.slide_id in seen and seen[s.slide_id] != s.path:
            raise InputError(f"two slides share the id {s.slide_id!r}: {seen[s.slide_id]} and {s.path}; "
                             "rename one (outputs are named by file name without extension)")
        seen[s.slide_id] = s.path
    unique = {s.slide_id: s for s in sources}
    if not unique:
        raise InputError("no slides found in " + ", ".join(map(str, inputs)))
    return list(unique.values())


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


Job = Callable[[Any], SlideOutcome]


def _guarded(job: Job, item: Any, slide_id: str, lock_dir: Path, manifest: Path,
             columns: Sequence[str]) -> SlideOutcome:
    """Lock, run, record. Any exception becomes a `failed` row with a one-line reason."""
    lock = SlideLock(lock_dir / f"{slide_id}.lock")
    if not lock.acquire():
        return SlideOutcome(slide_id, BUSY)
    start = time.perf_counter()
    try:
        outcome = job(item)
    except (UserError, OSError, ValueError, KeyError) as exc:
        outcome = SlideOutcome(slide_id, FAILED, error=one_line(exc))
    except Exception as exc:  # an unexpected bug must not stop the cohort, but must be visible
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        outcome = SlideOutcome(slide_id, FAILED, error=f"unexpected error: {detail}")
    finally:
        lock.release()
    if outcome.status != CACHED:
        row = {"slide_id": slide_id, "slide_path": str(getattr(item, "path", "")), "status": outcome.status,
               "error": outcome.error,
               "seconds": f"{time.perf_counter() - start:.3f}", **outcome.row}
        update_manifest(manifest, row, columns)
        outcome.row = row
    return outcome


def run_cohort(
    job: Job,
    items: Sequence[Any],
    *,
    slide_id: Callable[[Any], str],
    lock_dir: Path,
    manifest: Path,
    columns: Sequence[str],
    workers: int = 1,
    on_done: Callable[[SlideOutcome], None] | None = None,
) -> list[SlideOutcome]:
    """Run `job` on every item, in `workers` processes when > 1 (the job must then be picklable)."""
    outcomes: list[SlideOutcome] = []

    def record(outcome: SlideOutcome) -> None:
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)

    if workers <= 1 or len(items) <= 1:
        for item in items:
            record(_guarded(job, item, slide_id(item), lock_dir, manifest, columns))
        return outcomes
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_guarded, job, item, slide_id(item), lock_dir, manifest, columns)
                   for item in items]
        for future in as_completed(futures):
            record(future.result())
    return outcomes
