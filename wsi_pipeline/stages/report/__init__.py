"""`wsip report`: one self-contained HTML page of a workspace — what failed and why, whether tissue masks are
right, how training went, where the model looks (docs/report.md).

`report(ReportParams(run="esca"), out="wsip_out")` does from Python what `wsip report --run esca` does. The
page (`<out>/report.html`, `Layout.report`) embeds every image (bounded thumbnails, SVG plots), so it opens from
disk, offline, and can be mailed. The other result views are stages of their own: `stages/export.py` (GeoJSON
for QuPath) and `stages/view/` (a zoomable Deep Zoom viewer of a predicted slide).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from wsi_pipeline.errors import InputError, UserError, name_some
from wsi_pipeline.stages.report import collect, evaluation, html
from wsi_pipeline.workspace.files import remove_stale_temps, write_text_atomic
from wsi_pipeline.workspace.layout import Layout
from wsi_pipeline.workspace.manifest import DONE, FAILED, NO_TISSUE

__all__ = ["ReportParams", "ReportResult", "report"]


@dataclass(frozen=True)
class ReportParams:
    run: str | None = None  # only this run (and its predictions); default: every run
    thumbnail_px: int = 256  # longer side of each QC thumbnail (heatmaps: 1.5×); bounds the file size

    def validate(self) -> None:
        if not 64 <= self.thumbnail_px <= 1024:
            raise InputError(f"--thumbnail-px must be in [64, 1024], got {self.thumbnail_px}")


@dataclass(frozen=True)
class ReportResult:
    path: Path
    size_bytes: int
    seconds: float
    slides: int  # slides in the cohort tables' largest stage


def report(params: ReportParams = ReportParams(), *, out: str | Path | Layout | None = None) -> ReportResult:
    """Write `<out>/report.html` (atomically) from the workspace's files; nothing is recomputed."""
    start = time.perf_counter()
    params.validate()
    layout = out if isinstance(out, Layout) else Layout.at(out)
    remove_stale_temps(*layout.staging_dirs())
    runs = [r for r in layout.runs() if r.config.is_file()]
    prediction_sets = layout.prediction_sets()
    if params.run is not None:
        _check_run(params.run, layout, sorted({r.name for r in runs} | {p.run_name for p in prediction_sets}))
        runs = [r for r in runs if r.name == params.run]
        prediction_sets = [p for p in prediction_sets if p.run_name == params.run]
    tables = collect.stage_tables(layout)
    if not tables and not runs and not prediction_sets:
        raise UserError(f"{layout.root}: nothing to report yet (no patches, runs or predictions); run `wsip patch "
                        "SLIDES...` first, or pass the workspace with --out")
    records = [collect.run_record(r) for r in runs]
    predicted = [(p.run_name, collect.prediction_items(p)) for p in prediction_sets]
    slides = max((len(t.rows) for t in tables), default=0)
    overview = [("workspace", str(layout.root)), ("slides", str(slides)),
                *((t.name, ", ".join(f"{t.count(s)} {s}" for s in (DONE, FAILED, NO_TISSUE))) for t in tables),
                ("runs", name_some(r.name for r in records) or "none"),
                ("predicted slides", str(sum(len(items) for _, items in predicted)))]
    parts = {"overview": html.overview(overview), "cohort": html.cohort(tables),
             "qc": html.qc_gallery([(p.name, collect.qc_items(p)) for p in layout.patch_sets()], params.thumbnail_px),
             "runs": html.runs(records),
             "evaluation": evaluation.section(runs, prediction_sets, _comparisons(layout, params.run)),
             "predictions": html.predictions(predicted, layout.root, params.thumbnail_px * 3 // 2)}
    meta = f"{layout.root} · written {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    write_text_atomic(layout.report, html.page(title=f"wsip report: {layout.root.name}", meta=meta, parts=parts))
    return ReportResult(layout.report, layout.report.stat().st_size, time.perf_counter() - start, slides)


def _comparisons(layout: Layout, run: str | None) -> list[Path]:
    """`wsip compare` results, those involving `run` only when one is chosen."""
    return [p for p in layout.comparisons() if run is None or run in p.stem.rsplit("_", 1)[0].split("__vs__")]


def _check_run(name: str, layout: Layout, names: list[str]) -> None:
    if name not in names:
        known = f"runs: {name_some(names)}" if names else "none yet"
        raise UserError(f"--run {name}: no such run in {layout.runs_dir} ({known}); pass one of those or omit "
                        "--run")
