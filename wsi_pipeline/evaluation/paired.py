"""Two models on the same slides: ΔAUC with DeLong's paired test and a paired bootstrap CI, Δ balanced accuracy
with McNemar's exact test (docs/evaluation.md §6). Δ is always B − A."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest

from wsi_pipeline.evaluation import delong
from wsi_pipeline.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_weights, percentile_ci
from wsi_pipeline.evaluation.metrics import decisions, point_metrics, undefined_reason
from wsi_pipeline.evaluation.summary import LEVEL, bootstrap_values


def compare_paired(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, case_ids: tuple[str, ...],
                   classes: tuple[str, ...], *, thresholds: tuple[float, float] = (0.5, 0.5),
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The comparison as JSON-ready data; the same bootstrap weights score both models (paired)."""
    W = bootstrap_weights(case_ids, y, n_resamples=n_resamples, seed=seed)
    why = undefined_reason(y, classes)
    a = point_metrics(y, probs_a, thresholds[0])
    b = point_metrics(y, probs_b, thresholds[1])
    boot_a = bootstrap_values(y, probs_a, W, threshold=thresholds[0], ranking=why is None)
    boot_b = bootstrap_values(y, probs_b, W, threshold=thresholds[1], ranking=why is None)
    result: dict[str, Any] = {"n": len(y), "n_patients": len(set(case_ids)), "classes": list(classes),
                              "bootstrap": {"resamples": n_resamples, "seed": seed, "level": LEVEL,
                                            "unit": "patient", "paired": True}}
    if why is None:
        auc = {"a": a["auc"], "b": b["auc"], "delta": b["auc"] - a["auc"],  # type: ignore[operator]
               "ci": list(percentile_ci(boot_b["auc"] - boot_a["auc"], LEVEL))}
        if len(classes) == 2:
            test = delong.paired_test(y == 1, probs_a[:, 1], probs_b[:, 1])
            auc |= {"test": "DeLong paired", "z": test.z, "p_value": test.p_value}
        else:
            auc |= {"test": None, "p_value": None, "reason": "DeLong's paired test is for two classes; CI only"}
        result["auc"] = auc
    else:
        result["auc"] = {"delta": None, "reason": why}
    result["balanced_accuracy"] = {
        "a": a["balanced_accuracy"], "b": b["balanced_accuracy"],
        "delta": b["balanced_accuracy"] - a["balanced_accuracy"],  # type: ignore[operator]
        "ci": list(percentile_ci(boot_b["balanced_accuracy"] - boot_a["balanced_accuracy"], LEVEL)),
        **mcnemar(decisions(probs_a, thresholds[0]) == y, decisions(probs_b, thresholds[1]) == y)}
    return result


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test on the discordant slides: under H0 each is as likely right for A as for B."""
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    return {"test": "McNemar exact", "only_a_right": only_a, "only_b_right": only_b, "p_value": float(p)}
