"""Slide-level classification metrics, as GMMamba computes them (docs/gmmamba.md §9), and their summary.

Binary (C = 2): ŷ = 1[p₁ ≥ 0.5]; AUC is ROC-AUC on p₁; F1, precision and recall are for the positive
class 1 (sklearn `average='binary'`), i.e. the second entry of the config's class order.
Multi-class: ŷ = argmax; F1, precision, recall are macro averages; AUC is the macro one-vs-rest ROC-AUC
over labels range(C).
AUC is undefined when a class has no slide in `y_true` (a tiny val or test set): it is NaN then, never an
exception, so a fold still reports its other metrics; NaN carries into the summary mean on purpose
(a `nanmean` would hide that a fold could not be scored). Precision/recall/F1 with nothing predicted
positive are 0 (sklearn `zero_division=0`).
The summary is mean ± population std (ddof=0) over folds; the original code has no aggregation, so this
is our documented choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from wsi_pipeline.evaluation.metrics import decisions

SCALARS = ("accuracy", "auc", "f1", "precision", "recall", "balanced_accuracy")


def predict_labels(probs: np.ndarray) -> np.ndarray:
    """Binary: 1[p₁ ≥ 0.5] (ties go to the positive class, as in the original); else argmax (the decision rule
    of `wsi_pipeline.evaluation`, shared with predict)."""
    return decisions(np.asarray(probs, dtype=np.float64), 0.5)


def classification_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """All metrics for labels `y_true` (class indices) and class probabilities `probs` (N, C).

    Returns the `SCALARS` as floats plus `confusion_matrix` (C × C list, rows = true class) and `n`.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    labels = list(range(n_classes))
    y_pred = predict_labels(probs)
    average = "binary" if n_classes == 2 else "macro"
    scores = {"labels": labels, "average": average, "zero_division": 0}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "auc": roc_auc(y_true, probs),
        "f1": float(f1_score(y_true, y_pred, **scores)),
        "precision": float(precision_score(y_true, y_pred, **scores)),
        "recall": float(recall_score(y_true, y_pred, **scores)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC on p₁, or macro one-vs-rest AUC; NaN when some class is absent from `y_true`."""
    n_classes = probs.shape[1]
    if set(np.unique(y_true).tolist()) != set(range(n_classes)):
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def selection_score(metrics: Mapping[str, Any]) -> float:
    """Val F1 + AUC, the model-selection criterion (from ACMIL); an undefined AUC counts as 0."""
    auc = metrics["auc"]
    return float(metrics["f1"]) + (0.0 if np.isnan(auc) else float(auc))


def summarize(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std)} over folds for every scalar metric; std is the population std (ddof=0)."""
    return {
        name: (float(np.mean(values)), float(np.std(values, ddof=0)))
        for name in SCALARS
        if (values := [float(m[name]) for m in fold_metrics])
    }


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes in `y_true`, as sklearn defines it, without its one-class warning."""
    if len(np.unique(y_true)) == 1:
        return float(np.mean(y_pred == y_true))
    return float(balanced_accuracy_score(y_true, y_pred))
