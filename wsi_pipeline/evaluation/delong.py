"""DeLong's AUC variance: a CI for one AUC and the paired test of two AUCs on the same slides
(docs/evaluation.md §3).

DeLong, DeLong & Clarke-Pearson (1988) write the AUC as a U-statistic; its variance follows from each
positive's and each negative's "structural component" (the share of the other class it out-ranks). The
components are computed from mid-ranks (Sun & Xu 2014), O(n log n). Written here because neither
scikit-learn nor scipy provides it; the tests check it against the O(n²) definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata


@dataclass(frozen=True)
class PairedTest:
    auc_a: float
    auc_b: float
    delta: float  # auc_b − auc_a
    se: float
    z: float
    p_value: float  # two-sided


def components(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For k score vectors (k, n): (AUCs (k,), positives' components (k, m), negatives' components (k, n − m)).

    A positive's component is the share of negatives it out-ranks (ties ½), a negative's the share of
    positives that out-rank it; the AUC is the mean of either.
    """
    positive = positive.astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong needs at least one positive and one negative")
    all_ranks = rankdata(scores, axis=1)
    pos_ranks = rankdata(scores[:, positive], axis=1)
    neg_ranks = rankdata(scores[:, ~positive], axis=1)
    v_pos = (all_ranks[:, positive] - pos_ranks) / n
    v_neg = 1.0 - (all_ranks[:, ~positive] - neg_ranks) / m
    return v_pos.mean(axis=1), v_pos, v_neg


def covariance(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs (k,), their k × k DeLong covariance matrix)."""
    aucs, v_pos, v_neg = components(positive, scores)
    m, n = v_pos.shape[1], v_neg.shape[1]
    s_pos = np.cov(v_pos, ddof=1).reshape(len(aucs), len(aucs)) if m > 1 else np.zeros((len(aucs),) * 2)
    s_neg = np.cov(v_neg, ddof=1).reshape(len(aucs), len(aucs)) if n > 1 else np.zeros((len(aucs),) * 2)
    return aucs, s_pos / m + s_neg / n


def auc_ci(positive: np.ndarray, score: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, lower, upper): AUC ± z·SE, clipped to [0, 1]."""
    aucs, cov = covariance(positive, score[None, :])
    half = norm.ppf(0.5 + level / 2) * np.sqrt(max(cov[0, 0], 0.0))
    return float(aucs[0]), float(max(aucs[0] - half, 0.0)), float(min(aucs[0] + half, 1.0))


def paired_test(positive: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> PairedTest:
    """DeLong's test of AUC(b) = AUC(a) for two scores of the same slides (two-sided)."""
    aucs, cov = covariance(positive, np.stack([score_a, score_b]))
    delta = float(aucs[1] - aucs[0])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    if se == 0.0:  # identical rankings (or a perfect split by both): no evidence of a difference
        return PairedTest(float(aucs[0]), float(aucs[1]), delta, 0.0, 0.0, 1.0)
    z = delta / se
    return PairedTest(float(aucs[0]), float(aucs[1]), delta, se, float(z), float(2 * norm.sf(abs(z))))
