"""The Youden threshold: the p(positive) cut that maximises sensitivity + specificity − 1 on validation
predictions (docs/evaluation.md §5). Picked on the validation folds only, never on the test set, so the test
metrics at that threshold stay unbiased."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve


def youden_threshold(y: np.ndarray, p_positive: np.ndarray) -> float | None:
    """The threshold of scikit-learn's ROC curve with the largest J = TPR − FPR; None without both classes."""
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(y, p_positive)
    finite = np.isfinite(thresholds)  # the first point's threshold is +inf (nothing called positive)
    best = np.argmax(np.where(finite, tpr - fpr, -np.inf))
    return float(thresholds[best])
