"""The locked per-slide runner shared by `patch` and `extract`, and the outcomes it reports.

Both stages behave the same way through it: a bad slide never stops a cohort (it becomes a `failed` row
with a one-line reason), a slide held by another worker is left to it, and every outcome lands in the
stage's manifest.csv.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import UserError, one_line
from wsi_pipeline.workspace.locks import OwnerLock
from wsi_pipeline.workspace.manifest import DONE, FAILED, FAILURES, NO_TISSUE, update_manifest

# Outcomes a job reports: the manifest statuses, plus two that write no row.
CACHED, BUSY = "cached", "busy"
__all__ = ["BUSY", "CACHED", "DONE", "FAILED", "FAILURES", "NO_TISSUE", "SlideOutcome", "run_cohort"]


@dataclass
class SlideOutcome:
    slide_id: str
    status: str
    row: dict[str, Any] = field(default_factory=dict)  # the manifest row
    error: str = ""


Job = Callable[[Any], SlideOutcome]


def _guarded(job: Job, item: Any, slide_id: str, lock_dir: Path, manifest: Path,
             columns: Sequence[str]) -> SlideOutcome:
    """Lock, run, record. Any exception becomes a `failed` row with a one-line reason."""
    lock = OwnerLock(lock_dir / f"{slide_id}.lock")
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
    try:
        if outcome.status != CACHED:
            row = {"slide_id": slide_id, "slide_path": str(getattr(item, "path", "")), "status": outcome.status,
                   "error": outcome.error, "seconds": f"{time.perf_counter() - start:.3f}", **outcome.row}
            update_manifest(manifest, row, columns)
            outcome.row = row
    finally:
        lock.release()
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
