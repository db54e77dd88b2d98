"""A run's pooled out-of-fold evaluation (docs/evaluation.md §1, §5): `runs/<name>/evaluation.json` and
`oof_predictions.csv`.

Mean ± std over folds says how much the folds differ; the pooled out-of-fold figures say how good the model
is: every test slide's probability (from the fold that held it out; a slide tested by several Monte-Carlo
repeats contributes its mean probability) scored at once, with 95% CIs by the patient-stratified bootstrap.
The Youden threshold is picked on the validation slides of every fold pooled the same way (never on test),
so `wsip predict --threshold youden` decides new slides with a cut the test folds did not choose.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from wsi_pipeline.evaluation import evaluate, youden_threshold
from wsi_pipeline.stages.cohort_table import PROB, cohort_csv, cohort_from_rows, columns, row
from wsi_pipeline.stages.train.labels import LabelledSlides
from wsi_pipeline.workspace.files import write_json_if_changed, write_text_if_changed
from wsi_pipeline.workspace.layout import RunDir

POOLING = ("each test slide scored by the fold that held it out (mean probability over the Monte-Carlo repeats "
           "that tested it)")


def write_run_evaluation(run: RunDir, slides: LabelledSlides, folds: Sequence[int]) -> dict[str, Any]:
    """Pool the folds' test (and val) predictions, evaluate, write both files; returns evaluation.json."""
    classes = slides.classes
    case_of = {s.slide_id: s.case_id for s in slides.slides}
    test_rows = _pooled([run.fold(k).preds for k in folds], classes, case_of)
    record: dict[str, Any] = {"pooling": POOLING,
                              "pooled_out_of_fold": evaluate(cohort_from_rows(test_rows, classes)),
                              "youden": _youden(run, folds, classes, case_of)}
    write_text_if_changed(run.oof_predictions, cohort_csv(test_rows, columns(classes)))
    write_json_if_changed(run.evaluation, record)
    return record


def _youden(run: RunDir, folds: Sequence[int], classes: tuple[str, ...], case_of: dict[str, str]
            ) -> dict[str, Any]:
    if len(classes) != 2:
        return {"threshold": None, "reason": "a threshold applies to two classes; more classes use the argmax"}
    paths = [run.fold(k).val_preds for k in folds]
    if not all(p.is_file() for p in paths):
        return {"threshold": None, "reason": "folds trained by an older wsip kept no validation predictions; "
                                             "retrain the run (--force) to record one"}
    val = cohort_from_rows(_pooled(paths, classes, case_of), classes)
    threshold = youden_threshold(val.y, val.probs[:, 1])
    if threshold is None:
        return {"threshold": None, "reason": "the validation slides hold one class only"}
    return {"threshold": threshold, "picked_on": f"{len(val)} validation slides of {len(folds)} folds, pooled "
            "(max sensitivity + specificity − 1); never the test slides"}


def _pooled(paths: Sequence, classes: tuple[str, ...], case_of: dict[str, str]) -> list[dict[str, str]]:
    """Rows of the folds' preds CSVs, one per slide (mean probability where a slide appears several times)."""
    probs: dict[str, list[list[float]]] = defaultdict(list)
    labels: dict[str, str] = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                probs[r["slide_id"]].append([float(r[PROB + c]) for c in classes])
                labels[r["slide_id"]] = r["label"]
    return [row(sid, case_of.get(sid, sid), labels[sid], np.mean(p, axis=0).tolist(), classes, 0.5)
            for sid, p in probs.items()]
