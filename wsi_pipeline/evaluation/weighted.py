"""Classification metrics under sample weights, for all bootstrap resamples at once (docs/evaluation.md §2).

`W` is a (B, n) weight matrix (one row per resample, from :mod:`.bootstrap`); each function returns (B,)
values, equal to scikit-learn's metric on the resampled cohort (the tests check it). Point estimates are
scikit-learn's own (:mod:`.metrics`); this module exists because calling scikit-learn 1,000 times per metric
costs seconds, while one sort and a few cumulative sums over the (B, n) matrix cost milliseconds.
"""

from __future__ import annotations

import numpy as np


def _tie_groups(score: np.ndarray, W: np.ndarray, positive: np.ndarray, *, descending: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per resample, (positive weight, negative weight) at each distinct score, in score order: (B, T) each."""
    order = np.argsort(-score if descending else score, kind="stable")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    w = W[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    return pos, neg


def auc(positive: np.ndarray, score: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted ROC-AUC: P(score of a positive > a negative's) + ½ P(tie); NaN where a class has no weight."""
    pos, neg = _tie_groups(score, W, positive.astype(bool), descending=False)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each score
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / total, np.nan)


def average_precision(positive: np.ndarray, score: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted average precision, scikit-learn's step sum Σ (Rₖ − Rₖ₋₁) Pₖ over descending distinct scores."""
    pos, neg = _tie_groups(score, W, positive.astype(bool), descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos / total * precision).sum(axis=1)
    return np.where(total[:, 0] > 0, ap, np.nan)


def confusion(y: np.ndarray, predicted: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, C, C) weighted confusion matrices, rows = true class."""
    cell = np.zeros((len(y), n_classes * n_classes))
    cell[np.arange(len(y)), y * n_classes + predicted] = 1.0
    return (W @ cell).reshape(len(W), n_classes, n_classes)


def confusion_scores(matrices: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, F1 (binary: class 1; else macro), and for two classes sensitivity and
    specificity (recall of class 1 and of class 0), from (B, C, C) confusion matrices; as scikit-learn with
    `zero_division=0`, balanced accuracy over the classes present."""
    diag = np.diagonal(matrices, axis1=1, axis2=2)
    true_n, predicted_n = matrices.sum(axis=2), matrices.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(true_n > 0, diag / true_n, np.nan)
        f1_per_class = np.where(true_n + predicted_n > 0, 2 * diag / (true_n + predicted_n), 0.0)
        scores = {"accuracy": diag.sum(axis=1) / matrices.sum(axis=(1, 2)),
                  "balanced_accuracy": np.nanmean(recall, axis=1)}
    if matrices.shape[1] == 2:
        scores |= {"f1": f1_per_class[:, 1], "sensitivity": recall[:, 1], "specificity": recall[:, 0]}
    else:
        scores["f1"] = f1_per_class.mean(axis=1)
    return scores


def curve_bands(positive: np.ndarray, score: np.ndarray, W: np.ndarray, grid: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per resample, the ROC curve's TPR at each FPR of `grid` and the PR curve's precision at each recall of
    `grid` (step interpolation, as the curves are drawn): two (B, len(grid)) arrays."""
    pos, neg = _tie_groups(score, W, positive.astype(bool), descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    tpr = tp / tp[:, -1:]
    fpr = fp / fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
    tpr_at = np.empty((len(W), len(grid)))
    precision_at = np.empty((len(W), len(grid)))
    for b in range(len(W)):  # searchsorted is 1-D; B calls on T points each take milliseconds
        reached = np.searchsorted(fpr[b], grid, side="right") - 1  # the last threshold with FPR <= grid
        tpr_at[b] = np.where(reached >= 0, tpr[b, np.maximum(reached, 0)], 0.0)
        first = np.minimum(np.searchsorted(tpr[b], grid, side="left"), tpr.shape[1] - 1)  # first with TPR >= grid
        precision_at[b] = precision[b, first]
    return tpr_at, precision_at
