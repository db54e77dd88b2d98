"""A labelled cohort's per-slide predictions as a CSV: `predictions/<run>/predictions.csv` (`wsip predict
--labels`) and `runs/<name>/oof_predictions.csv` (pooled out-of-fold); what `wsip compare` pairs on
(docs/evaluation.md §6).

Columns: slide_id, case_id, label (blank: an unlabelled slide), prob_<class> per class (the run's class
order), predicted (at the recorded threshold), then any extra columns (per-fold probabilities).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from wsi_pipeline.errors import InputError
from wsi_pipeline.evaluation import Cohort
from wsi_pipeline.evaluation.metrics import decisions

PROB = "prob_"


def cohort_csv(rows: Sequence[Mapping[str, str]], cohort_columns: Sequence[str]) -> str:
    """The CSV text of `rows` (dicts with every column of `cohort_columns`)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(cohort_columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def columns(classes: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    return ["slide_id", "case_id", "label", *(PROB + c for c in classes), "predicted", *extra]


def row(slide_id: str, case_id: str, label: str | None, probs: Sequence[float], classes: Sequence[str],
        threshold: float) -> dict[str, str]:
    """One slide's row; `predicted` at `threshold` (two classes) or the argmax."""
    predicted = classes[int(decisions(np.asarray([probs], dtype=np.float64), threshold)[0])]
    return {"slide_id": slide_id, "case_id": case_id, "label": label or "",
            **{PROB + c: repr(float(p)) for c, p in zip(classes, probs, strict=True)}, "predicted": predicted}


def cohort_from_rows(rows: Sequence[Mapping[str, str]], classes: Sequence[str]) -> Cohort:
    """The labelled rows as a :class:`Cohort` (unlabelled rows are left out)."""
    labelled = [r for r in rows if r["label"]]
    return Cohort(tuple(r["slide_id"] for r in labelled), tuple(r["case_id"] for r in labelled),
                  np.array([classes.index(r["label"]) for r in labelled], dtype=np.int64),
                  np.array([[float(r[PROB + c]) for c in classes] for r in labelled]).reshape(len(labelled),
                                                                                              len(classes)),
                  tuple(classes))


def read_cohort(path: Path) -> Cohort:
    """A predictions CSV back as its labelled :class:`Cohort`, classes from its `prob_` columns."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            classes = [c[len(PROB):] for c in reader.fieldnames or [] if c.startswith(PROB)]
            rows = list(reader)
        return cohort_from_rows(rows, classes)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: missing or unreadable predictions table ({exc}); rerun the command that "
                         "writes it") from None
