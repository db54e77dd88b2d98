"""Fold metrics against hand-computed and sklearn values; the mean ± std (ddof=0) summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from wsi_pipeline.stages.train.metrics import classification_metrics, predict_labels, selection_score, summarize

# 6 slides, binary: p1 = [0.9, 0.6, 0.5, 0.4, 0.2, 0.7], truth = [1, 1, 0, 0, 0, 1]
# ŷ = 1[p1 >= 0.5] = [1, 1, 1, 0, 0, 1]  -> TP 3, FP 1 (the 0.5 tie), TN 2, FN 0
Y_BIN = [1, 1, 0, 0, 0, 1]
P1 = np.array([0.9, 0.6, 0.5, 0.4, 0.2, 0.7])


def test_binary_by_hand():
    m = classification_metrics(Y_BIN, np.stack([1 - P1, P1], axis=1))
    assert m["confusion_matrix"] == [[2, 1], [0, 3]]
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1.0) / 2)
    # every positive (0.9, 0.6, 0.7) ranks above every negative (0.5, 0.4, 0.2)
    assert m["auc"] == pytest.approx(1.0)
    assert m["n"] == 6


def test_binary_threshold_ties_go_positive():
    assert predict_labels(np.array([[0.5, 0.5], [0.51, 0.49]])).tolist() == [1, 0]


def test_binary_auc_matches_sklearn_when_imperfect():
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.8, 0.7, 0.3, 0.9, 0.2, 0.6, 0.65])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["auc"] < 1.0


def test_multiclass_macro_against_sklearn():
    y = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.3, 0.6],
            [0.3, 0.4, 0.3],  # true 2, predicted 1
            [0.6, 0.3, 0.1],  # true 1, predicted 0
            [0.5, 0.25, 0.25],
            [0.2, 0.2, 0.6],
            [0.1, 0.8, 0.1],
        ]
    )
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    # macro one-vs-rest by hand: the mean of the three binary AUCs
    by_hand = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert m["auc"] == pytest.approx(by_hand)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 2, 0], [0, 1, 2]]


def test_auc_undefined_is_nan_not_a_crash():
    one_class = classification_metrics([1, 1, 1], np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    assert math.isnan(one_class["auc"])
    assert one_class["accuracy"] == pytest.approx(2 / 3)
    assert one_class["balanced_accuracy"] == pytest.approx(2 / 3)
    missing_class = classification_metrics([0, 1, 1], np.full((3, 3), 1 / 3))
    assert math.isnan(missing_class["auc"])
    assert missing_class["confusion_matrix"] == [[1, 0, 0], [2, 0, 0], [0, 0, 0]]


def test_selection_score_counts_nan_auc_as_zero():
    assert selection_score({"f1": 0.5, "auc": 0.75}) == pytest.approx(1.25)
    assert selection_score({"f1": 0.5, "auc": float("nan")}) == pytest.approx(0.5)


def test_summary_is_mean_and_population_std():
    folds = [{"accuracy": a, "auc": a, "f1": a, "precision": a, "recall": a, "balanced_accuracy": a} for a in (1, 2, 4)]
    summary = summarize(folds)
    mean, std = summary["accuracy"]
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3))
    assert std != pytest.approx(np.std([1, 2, 4], ddof=1))


def test_summary_keeps_nan_visible():
    folds = [classification_metrics([1, 1], np.array([[0.2, 0.8], [0.3, 0.7]])) for _ in range(2)]
    assert math.isnan(summarize(folds)["auc"][0])
    assert summarize(folds)["accuracy"] == (1.0, 0.0)
