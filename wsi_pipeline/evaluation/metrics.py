"""Point estimates of the classification metrics, by scikit-learn (docs/evaluation.md §1).

Binary (two classes): the positive class is the second of the run's classes; a slide is called positive when
p(positive) ≥ `threshold` (0.5 unless chosen, docs/evaluation.md §5); AUC and average precision rank by
p(positive); F1, sensitivity and specificity are for the positive class. More classes: the prediction is the
argmax, F1 and average precision are macro averages, AUC is the macro one-vs-rest AUC.
A metric that the cohort cannot define (AUC when one class has no slide) is `None` here, with the reason in
:func:`undefined_reason`: never NaN, never an exception.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

BINARY = ("auc", "balanced_accuracy", "accuracy", "f1", "sensitivity", "specificity", "average_precision")
MULTICLASS = ("auc", "balanced_accuracy", "accuracy", "f1", "average_precision")
RANKING = ("auc", "average_precision")  # need every class present in the cohort


def metric_names(n_classes: int) -> tuple[str, ...]:
    return BINARY if n_classes == 2 else MULTICLASS


def decisions(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary: 1[p₁ ≥ threshold]; more classes: the argmax (the threshold does not apply)."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def undefined_reason(y: np.ndarray, classes: tuple[str, ...] | list[str]) -> str | None:
    """Why AUC and average precision (and the recall of a missing class) are undefined on this cohort, or None
    when every class has a labelled slide."""
    missing = [c for i, c in enumerate(classes) if not (y == i).any()]
    if not missing:
        return None
    return f"undefined: no labelled slide of class {', '.join(map(repr, missing))}"


def point_metrics(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float | None]:
    """Every metric of :func:`metric_names` by scikit-learn; the ranking ones None when a class is absent."""
    n_classes = probs.shape[1]
    labels = list(range(n_classes))
    predicted = decisions(probs, threshold)
    defined = len(np.unique(y)) == n_classes
    values: dict[str, float | None] = {
        "accuracy": accuracy_score(y, predicted),
        "balanced_accuracy": (balanced_accuracy_score(y, predicted) if len(np.unique(y)) > 1
                              else accuracy_score(y, predicted)),
    }
    if n_classes == 2:
        values["f1"] = f1_score(y, predicted, labels=labels, zero_division=0)
        values["sensitivity"] = recall_score(y, predicted, pos_label=1, zero_division=0) if (y == 1).any() else None
        values["specificity"] = recall_score(y, predicted, pos_label=0, zero_division=0) if (y == 0).any() else None
        values["auc"] = roc_auc_score(y, probs[:, 1]) if defined else None
        values["average_precision"] = average_precision_score(y, probs[:, 1]) if defined else None
    else:
        values["f1"] = f1_score(y, predicted, labels=labels, average="macro", zero_division=0)
        onehot = np.eye(n_classes)[y]
        values["auc"] = (roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels)
                         if defined else None)
        values["average_precision"] = average_precision_score(onehot, probs, average="macro") if defined else None
    return {k: (None if values[k] is None else float(values[k])) for k in metric_names(n_classes)}


def confusion(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> list[list[int]]:
    """C × C counts, rows = true class, at the threshold."""
    n_classes = probs.shape[1]
    return confusion_matrix(y, decisions(probs, threshold), labels=list(range(n_classes))).tolist()
