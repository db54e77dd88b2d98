"""What `wsip report` shows, read from the workspace's own files: manifests, QC images, run folders, predictions.

Nothing is recomputed: fold numbers come from each fold's `metrics.json` (test metrics at the selected epoch,
confusion matrix included), mean ± std from the run's `summary.csv`, curves from `log.csv` and `preds.csv`,
all read through `workspace/run_store.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_pipeline.workspace.layout import Layout, PatchSet, PredictionSet, RunDir
from wsi_pipeline.workspace.manifest import FAILED, NO_TISSUE, read_manifest
from wsi_pipeline.workspace.run_store import (
    finished_folds,
    read_config_text,
    read_log,
    read_metrics,
    read_preds,
    read_summary,
    split_sizes,
)
from wsi_pipeline.workspace.slide_id import name_problem

# Manifest columns a person reads, in this order (the rest are timings and paths).
SHOWN_COLUMNS = ("slide_id", "status", "n_patches", "mpp", "mpp_source", "dim", "seconds", "patches_per_s", "error")
_STATUS_ORDER = {FAILED: 0, NO_TISSUE: 1}  # failures first; everything else (done, stale) after


@dataclass(frozen=True)
class StageTable:
    """One stage output's manifest: `patches/<config>` or `features/<config>/<set>`."""

    name: str
    columns: tuple[str, ...]
    rows: list[dict[str, str]]  # failures first

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


@dataclass(frozen=True)
class QCItem:
    slide_id: str
    status: str
    n_patches: str
    error: str
    image: Path | None  # None: the slide never got a QC image (unreadable)


@dataclass(frozen=True)
class FoldRecord:
    fold: int
    metrics: dict[str, Any]  # metrics.json
    log: list[dict[str, str]]  # log.csv rows
    preds: list[dict[str, str]]  # preds.csv rows (test slides)


@dataclass(frozen=True)
class RunRecord:
    name: str
    config_yaml: str
    classes: tuple[str, ...]
    split_sizes: list[tuple[str, dict[str, int]]]  # (fold, {split: slides})
    folds: list[FoldRecord]  # finished folds
    summary: dict[str, tuple[str, str]]  # metric -> (mean, std) from summary.csv; empty while training

    @property
    def metric_names(self) -> list[str]:
        """The scalar test metrics, in the order training wrote them."""
        test = self.folds[0].metrics["test"] if self.folds else {}
        return [k for k, v in test.items() if isinstance(v, float | int) and k != "n"]


@dataclass(frozen=True)
class PredictionItem:
    slide_id: str
    record: dict[str, Any]  # <slide_id>.json
    heatmap: Path | None
    viewer: Path | None  # viewer/<slide_id>/index.html when `wsip view` made one


def failures_first(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(rows, key=lambda r: (_STATUS_ORDER.get(r.get("status", ""), 2), r.get("slide_id", "")))


def stage_tables(layout: Layout) -> list[StageTable]:
    """Every patch set, then every feature set, with the manifest columns a person reads."""
    tables = []
    for output in (*layout.patch_sets(), *layout.feature_sets()):
        rows = read_manifest(output.manifest)
        columns = tuple(c for c in SHOWN_COLUMNS if rows and c in rows[0])
        tables.append(StageTable(str(output.dir.relative_to(layout.root)), columns, failures_first(rows)))
    return tables


def qc_items(patch_set: PatchSet) -> list[QCItem]:
    """The patch set's slides, failures first, with their QC image when there is one."""
    items = []
    for row in failures_first(read_manifest(patch_set.manifest)):
        qc = patch_set.qc(row["slide_id"]) if name_problem(row["slide_id"]) is None else None  # refused name
        items.append(QCItem(row["slide_id"], row["status"], row.get("n_patches", ""), row.get("error", ""),
                            qc if qc and qc.is_file() else None))
    return items


def run_record(run: RunDir) -> RunRecord:
    folds = [FoldRecord(fold.number, read_metrics(fold), read_log(fold), read_preds(fold))
             for fold in finished_folds(run)]
    preds = folds[0].preds if folds else []
    classes = tuple(k[5:] for k in (preds[0] if preds else {}) if k.startswith("prob_"))
    sizes = [(str(fold), parts) for fold, parts in split_sizes(run)]
    return RunRecord(run.name, read_config_text(run), classes, sizes, folds, read_summary(run))


def prediction_items(predictions: PredictionSet) -> list[PredictionItem]:
    items = []
    for slide_id in predictions.slide_ids():
        heatmap, viewer = predictions.heatmap(slide_id), predictions.viewer_page(slide_id)
        items.append(PredictionItem(slide_id, json.loads(predictions.record(slide_id).read_text()),
                                    heatmap if heatmap.is_file() else None, viewer if viewer.is_file() else None))
    return items
