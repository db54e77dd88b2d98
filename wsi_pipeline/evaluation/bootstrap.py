"""The patient-stratified bootstrap: resample weights for every slide, B resamples at once (docs/evaluation.md §2).

Slides of one patient are not independent, so the unit of resampling is the patient: each resample draws, within
every stratum (the patients' class), as many patients as the stratum has, with replacement, and every slide of a
drawn patient enters with the patient's draw count as its weight. Stratifying keeps every class present in every
resample, so a metric defined on the cohort (AUC needs both classes) stays defined on every resample.
Written here because no maintained library resamples clusters within strata as a (B, n) weight matrix, which is
what makes 1,000 resamples of 1,000 slides take milliseconds instead of seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0


def patient_index(case_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(patient index of each slide, patient ids in first-seen order)."""
    order = list(dict.fromkeys(case_ids))
    position = {c: i for i, c in enumerate(order)}
    return np.array([position[c] for c in case_ids], dtype=np.int64), order


def patient_strata(patient_of_slide: np.ndarray, y: np.ndarray, n_patients: int) -> np.ndarray:
    """Each patient's stratum: the label of its first slide (as the splits take it, docs/gmmamba.md §9)."""
    strata = np.full(n_patients, -1, dtype=np.int64)
    for slide in range(len(patient_of_slide) - 1, -1, -1):  # backwards: the first slide's label wins
        strata[patient_of_slide[slide]] = y[slide]
    return strata


def bootstrap_weights(case_ids: Sequence[str], y: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED) -> np.ndarray:
    """(n_resamples, n_slides) weights: how often each slide's patient was drawn in each resample."""
    patient, patients = patient_index(case_ids)
    counts = patient_draw_counts(patient_strata(patient, np.asarray(y), len(patients)), n_resamples=n_resamples,
                                 seed=seed)
    return counts[:, patient]


def patient_draw_counts(strata: np.ndarray, *, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_patients) draw counts; within each stratum the counts of a resample sum to its size."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, len(strata)))
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        k = len(members)
        draws = rng.integers(0, k, size=(n_resamples, k)) + np.arange(n_resamples)[:, None] * k
        counts[:, members] = np.bincount(draws.ravel(), minlength=n_resamples * k).reshape(n_resamples, k)
    return counts


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap values (NaN resamples, e.g. a class drawn empty, are left out)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)
