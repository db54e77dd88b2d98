"""One cohort's evaluation as `metrics.json` holds it: every metric with its 95% CI, DeLong's AUC CI,
confusion matrix, calibration and the ROC / PR curves with bootstrap bands, at slide and patient level
(docs/evaluation.md). Used by `wsip train` (pooled out-of-fold), `wsip predict --labels` and `wsip report`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsi_pipeline.evaluation import delong, weighted
from wsi_pipeline.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_weights, percentile_ci
from wsi_pipeline.evaluation.calibration import reliability
from wsi_pipeline.evaluation.cohort import Cohort
from wsi_pipeline.evaluation.metrics import confusion, decisions, metric_names, point_metrics, undefined_reason

LEVEL = 0.95
CURVE_GRID = np.linspace(0.0, 1.0, 51)
PATIENT_RULE = "patient probability = mean over the patient's slides"
FEW_PATIENTS = 10  # below this many patients in a class, resampling them says little: the CIs get a caution


def evaluate(cohort: Cohort, *, threshold: float = 0.5, threshold_source: str = "default",
             n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The JSON-ready evaluation of `cohort` (strict JSON: an undefined value is null with its reason)."""
    patients = cohort.by_patient()
    mixed = cohort.mixed_label_patients()
    return {
        "classes": list(cohort.classes),
        **({"positive_class": cohort.classes[1]} if len(cohort.classes) == 2 else {}),
        "threshold": ({"value": threshold, "source": threshold_source} if len(cohort.classes) == 2
                      else {"value": None, "source": "argmax (more than two classes)"}),
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": LEVEL, "unit": "patient",
                      "stratified_by": "class of the patient's first slide"},
        "slide": evaluate_level(cohort, threshold=threshold, n_resamples=n_resamples, seed=seed),
        "patient": (evaluate_level(patients, threshold=threshold, n_resamples=n_resamples, seed=seed,
                                   curves=False) | {"aggregation": PATIENT_RULE} if patients is not None else
                    {"undefined": f"patients with slides of different labels: {', '.join(mixed[:5])}"}),
    }


def evaluate_level(cohort: Cohort, *, threshold: float, n_resamples: int, seed: int,
                   curves: bool = True) -> dict[str, Any]:
    """Metrics with CIs, confusion matrix, calibration (and curves) of one level (slides or patients)."""
    y, probs = cohort.y, cohort.probs
    why = undefined_reason(y, cohort.classes)
    W = bootstrap_weights(cohort.case_ids, y, n_resamples=n_resamples, seed=seed)
    resampled = bootstrap_values(y, probs, W, threshold=threshold, ranking=why is None)
    metrics: dict[str, Any] = {}
    for name, value in point_metrics(y, probs, threshold).items():
        if value is None:
            metrics[name] = {"value": None, "ci": None, "reason": why or "undefined: no slide of that class"}
        else:
            lo, hi = percentile_ci(resampled[name], LEVEL)
            metrics[name] = {"value": value, "ci": [lo, hi] if np.isfinite(lo) else None}
    result: dict[str, Any] = {
        "n": len(cohort), "n_patients": cohort.n_patients,
        "n_per_class": {c: int((y == i).sum()) for i, c in enumerate(cohort.classes)},
        "metrics": metrics,
        "confusion_matrix": confusion(y, probs, threshold),
        "calibration": reliability(y, probs),
    }
    caution = few_patients(cohort)
    if caution:
        result["caution"] = caution
    if len(cohort.classes) == 2 and why is None:
        auc, lo, hi = delong.auc_ci(y == 1, probs[:, 1], LEVEL)
        result["auc_delong"] = {"value": auc, "ci": [lo, hi]}
        if curves:
            result["curves"] = curve_bands(y == 1, probs[:, 1], W)
    return result


def few_patients(cohort: Cohort) -> str | None:
    """A plain warning when some class has fewer than FEW_PATIENTS patients, else None."""
    counts = {c: len({k for k, y in zip(cohort.case_ids, cohort.y, strict=True) if y == i})
              for i, c in enumerate(cohort.classes)}
    few = [f"{n} of class {c!r}" for c, n in counts.items() if 0 < n < FEW_PATIENTS]
    if not few:
        return None
    return (f"few patients ({', '.join(few)}): the bootstrap can only reshuffle these, so its CIs are rough "
            "(degenerate with one patient in a class)")


def bootstrap_values(y: np.ndarray, probs: np.ndarray, W: np.ndarray, *, threshold: float,
                     ranking: bool = True) -> dict[str, np.ndarray]:
    """Every metric of :func:`metric_names` on each resample of `W` (B, n) → {name: (B,)}."""
    n_classes = probs.shape[1]
    values = weighted.confusion_scores(weighted.confusion(y, decisions(probs, threshold), W, n_classes))
    if not ranking:
        return values
    if n_classes == 2:
        values["auc"] = weighted.auc(y == 1, probs[:, 1], W)
        values["average_precision"] = weighted.average_precision(y == 1, probs[:, 1], W)
    else:
        values["auc"] = np.mean([weighted.auc(y == c, probs[:, c], W) for c in range(n_classes)], axis=0)
        values["average_precision"] = np.mean(
            [weighted.average_precision(y == c, probs[:, c], W) for c in range(n_classes)], axis=0)
    return {k: values[k] for k in metric_names(n_classes)}


def curve_bands(positive: np.ndarray, score: np.ndarray, W: np.ndarray) -> dict[str, Any]:
    """ROC (TPR at each FPR of the grid) and PR (precision at each recall) with 95% bootstrap bands."""
    point_tpr, point_precision = weighted.curve_bands(positive, score, np.ones((1, len(score))), CURVE_GRID)
    tpr, precision = weighted.curve_bands(positive, score, W, CURVE_GRID)
    tail = 100 * (1 - LEVEL) / 2

    def band(values: np.ndarray) -> list[list[float]]:
        return np.round(np.nanpercentile(values, [tail, 100 - tail], axis=0), 4).tolist()

    grid = CURVE_GRID.round(4).tolist()
    return {"roc": {"fpr": grid, "tpr": point_tpr[0].round(4).tolist(), "band": band(tpr)},
            "pr": {"recall": grid, "precision": point_precision[0].round(4).tolist(), "band": band(precision)}}
