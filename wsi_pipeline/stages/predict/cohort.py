"""`wsip predict --labels`: an external validation cohort scored with CIs (docs/evaluation.md §1).

Labels come from `--labels` (the training format: slide_id,label[,case_id]) or from a slide CSV's `label` and
`case_id` columns (`--labels` wins where both name a slide). They are checked before any slide is processed, so
a bad labels file writes nothing: a label for a slide not being predicted, or a class the run does not know,
is one line. Slides without a label are predicted and left out of the metrics (said once). The cohort's
`predictions.csv` and `metrics.json` (:mod:`wsi_pipeline.stages.cohort_table`, :func:`evaluation.evaluate`)
describe the latest labelled call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import InputError, name_some
from wsi_pipeline.evaluation import evaluate
from wsi_pipeline.stages.cohort_table import cohort_csv, cohort_from_rows, columns, row
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.labels_csv import read_labels
from wsi_pipeline.workspace.files import write_json_if_changed, write_text_if_changed
from wsi_pipeline.workspace.layout import PredictionSet, RunDir
from wsi_pipeline.workspace.run_store import recorded_youden

Labels = dict[str, tuple[str, str]]  # slide_id -> (label, case_id)


@dataclass(frozen=True)
class CohortResult:
    metrics_path: Path
    table_path: Path
    evaluation: dict[str, Any]  # metrics.json
    notes: list[str]  # unlabelled or failed slides left out, said once


def cohort_labels(sources: Sequence[SlideSource], labels_path: Path | None) -> tuple[Labels, str]:
    """(labels by slide id, where they came from)."""
    labels = {s.slide_id: (s.label, s.case_id or s.slide_id) for s in sources if s.label}
    if labels_path is None:
        return labels, "the slide CSV's label column"
    if not Path(labels_path).is_file():
        raise InputError(f"--labels {labels_path}: no such file (a CSV slide_id,label[,case_id], as for training)")
    labels |= {sid: (label, case) for sid, label, case in read_labels(Path(labels_path))}
    return labels, str(labels_path)


def check_labels(labels: Labels, slide_ids: Sequence[str], classes: Sequence[str], where: str) -> None:
    """Every label names a slide being predicted and a class of the run; else one line, before any work."""
    extra = [sid for sid in labels if sid not in set(slide_ids)]
    if extra:
        raise InputError(f"{where}: labels for slide(s) not being predicted: {name_some(extra)}; drop those rows "
                         "or pass their slides too")
    unknown = sorted({label for label, _ in labels.values()} - set(classes))
    if unknown:
        raise InputError(f"{where}: label(s) {name_some(map(repr, unknown))} are not classes of the run "
                         f"({', '.join(classes)}); fix the labels (a run scores only the classes it was trained on)")
    if "metrics" in slide_ids:
        raise InputError("a slide named 'metrics' would overwrite the cohort's metrics.json; rename that slide file")


def resolve_threshold(threshold: float | str, run: RunDir, classes: Sequence[str]) -> tuple[float, str]:
    """(threshold, where it came from): a number in (0, 1), or `youden` (recorded on the validation folds)."""
    if len(classes) != 2:
        if threshold != 0.5:
            raise InputError(f"--threshold applies to two classes; run {run.name} has {len(classes)} (argmax)")
        return 0.5, "argmax"
    if threshold == "youden":
        return recorded_youden(run), "Youden (validation folds)"
    try:
        value = float(threshold)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise InputError(f"--threshold {threshold}: give a probability in (0, 1) or `youden`")
    return value, "default" if value == 0.5 else "--threshold"


def write_cohort(prediction_set: PredictionSet, records: Mapping[str, dict[str, Any]], labels: Labels, *,
                 classes: Sequence[str], threshold: tuple[float, str], failed: Sequence[str],
                 context: Mapping[str, Any]) -> CohortResult:
    """predictions.csv (every predicted slide of this call) and metrics.json (its labelled ones)."""
    folds = next(iter(records.values()))["folds"] if records else []
    per_fold = [f"fold{k}_{'prob_' + c}" for k in folds for c in classes]
    rows = []
    for sid, record in records.items():
        label, case = labels.get(sid, (None, sid))
        fold_probs = [repr(p) for probs in record["fold_probabilities"] for p in probs]
        rows.append(row(sid, case, label, [record["probabilities"][c] for c in classes], classes, threshold[0])
                    | dict(zip(per_fold, fold_probs, strict=True)))
    unlabelled = [sid for sid in records if sid not in labels]
    failed_labelled = [sid for sid in failed if sid in labels]
    notes = []
    if unlabelled:
        notes.append(f"{len(unlabelled)} slide(s) without a label ({name_some(unlabelled)}): predicted, left out "
                     "of the metrics")
    if failed_labelled:
        notes.append(f"{len(failed_labelled)} labelled slide(s) failed ({name_some(failed_labelled)}): left out of "
                     "the metrics")
    cohort = cohort_from_rows(rows, tuple(classes))
    evaluation = {**context, "unlabelled": unlabelled, "failed": failed_labelled,
                  **evaluate(cohort, threshold=threshold[0], threshold_source=threshold[1])}
    write_text_if_changed(prediction_set.table, cohort_csv(rows, columns(classes, per_fold)))
    write_json_if_changed(prediction_set.metrics, evaluation)
    return CohortResult(prediction_set.metrics, prediction_set.table, evaluation, notes)
