"""The locked per-slide runner shared by `patch` and `extract`, and the outcomes it reports.

Both stages behave the same way through it: a bad slide never stops a cohort (it becomes a `failed` row
with a one-line reason), a slide held by another worker is left to it, and every outcome lands in the
stage's manifest.csv. A slide whose outputs are current and recorded `done` is skipped before its lock is
taken, so a fully cached run writes nothing (a read-only workspace works); the job checks again under the
lock, for a worker that finished it meanwhile. A storage that refuses writes (full, read-only) stops the
cohort with one line instead: every later slide would fail the same way (docs/reliability.md).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from wsi_pipeline import faults
from wsi_pipeline.errors import UserError, one_line
from wsi_pipeline.workspace.files import storage_error
from wsi_pipeline.workspace.layout import StageOutputs
from wsi_pipeline.workspace.locks import OwnerLock
from wsi_pipeline.workspace.manifest import DONE, FAILED, FAILURES, NO_TISSUE, manifest_rows, update_manifest
from wsi_pipeline.workspace.slide_id import shown

# Outcomes a job reports: the manifest statuses, plus two that write no row.
CACHED, BUSY = "cached", "busy"
__all__ = ["BUSY", "CACHED", "DONE", "FAILED", "FAILURES", "NO_TISSUE", "SlideOutcome", "refuse", "run_cohort"]


@dataclass
class SlideOutcome:
    slide_id: str
    status: str
    row: dict[str, Any] = field(default_factory=dict)  # the manifest row (a CACHED one: read from the outputs)
    error: str = ""


Job = Callable[[Any], SlideOutcome]
WAIT_POLL_S = 0.5


def refuse(item: Any, slide_id: str, reason: str, outputs: StageOutputs, columns: Sequence[str]) -> SlideOutcome:
    """Record a slide that cannot be processed at all (its name cannot name outputs) as `failed`, shown
    printable: the cohort goes on without it (docs/reliability.md, "Names")."""
    outcome = SlideOutcome(shown(slide_id, limit=240), FAILED, error=reason)
    outcome.row = {"slide_id": outcome.slide_id, "slide_path": shown(str(getattr(item, "path", "")), limit=4096),
                   "status": FAILED, "error": reason}
    update_manifest(outputs.manifest, outcome.row, columns)
    return outcome


def _guarded(job: Job, item: Any, slide_id: str, outputs: StageOutputs, columns: Sequence[str],
             wait: bool = False, kept: Callable[[Any], bool] | None = None) -> SlideOutcome:
    """Lock, run, record. Any exception becomes a `failed` row with a one-line reason, except a refused
    write, which stops the cohort.

    A CACHED outcome is recorded `done` when the manifest says otherwise (a run killed between writing a
    slide's outputs and its row), so the manifest always agrees with the files. For the same reason a `done`
    row stays when a new request fails but `kept(item)` says the finished outputs it describes are intact
    (e.g. coords of other settings): the failure is reported, not recorded over them.
    """
    lock = OwnerLock(outputs.lock(slide_id))
    while not lock.acquire():
        if not wait:
            return SlideOutcome(slide_id, BUSY)
        time.sleep(WAIT_POLL_S)  # the other holder's result is then found current: CACHED
    try:
        faults.point("slide")
        start = time.perf_counter()
        try:
            outcome = job(item)
        except (UserError, OSError, ValueError, KeyError) as exc:
            if storage_error(exc, outputs.dir) is not None:
                raise
            outcome = SlideOutcome(slide_id, FAILED, error=one_line(exc))
        except Exception as exc:  # an unexpected bug must not stop the cohort, but must be visible
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            outcome = SlideOutcome(slide_id, FAILED, error=f"unexpected error: {detail}")
        previous = manifest_rows(outputs.manifest).get(slide_id, {})
        if outcome.status in FAILURES and previous.get("status") == DONE and kept is not None and kept(item):
            outcome.row = previous
        elif outcome.status != CACHED or previous.get("status") != DONE:
            status = DONE if outcome.status == CACHED else outcome.status
            row = {"slide_id": slide_id, "slide_path": str(getattr(item, "path", "")), "status": status,
                   "error": outcome.error, "seconds": f"{time.perf_counter() - start:.3f}", **outcome.row}
            update_manifest(outputs.manifest, row, columns)
            outcome.row = row
    finally:
        lock.release()
    return outcome


def run_cohort(
    job: Job,
    items: Sequence[Any],
    *,
    slide_id: Callable[[Any], str],
    outputs: StageOutputs,
    columns: Sequence[str],
    is_current: Callable[[Any], bool],
    workers: int = 1,
    wait: bool = False,
    kept: Callable[[Any], bool] | None = None,
    on_done: Callable[[SlideOutcome], None] | None = None,
) -> list[SlideOutcome]:
    """Run `job` on every item, in `workers` processes when > 1 (the job must then be picklable).

    `is_current(item)`: whether the item's finished outputs match this run (never True under `--force`);
    with a `done` row as well, the item is CACHED without taking its lock or writing anything.
    `wait`: a slide another process holds is waited for (and its result reused) instead of left BUSY, for a
    caller that needs every result now (`wsip predict`). `kept`: see `_guarded` (picklable with workers > 1).
    """
    outcomes: list[SlideOutcome] = []

    def record(outcome: SlideOutcome) -> None:
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)

    done = {sid for sid, row in manifest_rows(outputs.manifest).items() if row.get("status") == DONE}
    todo = []
    for item in items:
        if slide_id(item) in done and is_current(item):
            record(SlideOutcome(slide_id(item), CACHED))
        else:
            todo.append(item)
    if workers <= 1 or len(todo) <= 1:
        for item in todo:
            record(_guarded(job, item, slide_id(item), outputs, columns, wait, kept))
        return outcomes
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_guarded, job, item, slide_id(item), outputs, columns, wait, kept)
                   for item in todo]
        for future in as_completed(futures):
            record(future.result())
    return outcomes
