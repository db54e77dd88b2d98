"""Calibration: the reliability diagram (10 equal-width bins) and the expected calibration error
(docs/evaluation.md §4).

Binary: p(positive) against the observed share of positives. More classes: the top-label confidence (the
largest probability) against the share of slides whose argmax is right. Bins are scikit-learn's
`calibration_curve(strategy="uniform")`; ECE = Σ_bins (n_bin / n) · |observed − mean confidence|.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve

N_BINS = 10


def reliability(y: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """{"kind", "bins": [{"confidence", "observed", "count"}] (non-empty bins), "ece"}."""
    if probs.shape[1] == 2:
        kind, hit, confidence = "p(positive) vs share positive", (y == 1), probs[:, 1]
    else:
        kind, hit, confidence = "top-label confidence vs share correct", probs.argmax(1) == y, probs.max(1)
    confidence = np.clip(confidence, 0.0, 1.0)
    observed, mean_confidence = calibration_curve(hit.astype(int), confidence, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)  # calibration_curve's bins
    counts = counts[counts > 0]
    ece = float(np.sum(counts / len(y) * np.abs(observed - mean_confidence)))
    bins = [{"confidence": float(c), "observed": float(o), "count": int(k)}
            for c, o, k in zip(mean_confidence, observed, counts, strict=True)]
    return {"kind": kind, "bins": bins, "ece": ece}
