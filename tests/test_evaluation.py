"""The statistics module (docs/evaluation.md): bootstrap, weighted metrics vs scikit-learn, DeLong vs its O(n²)
definition, calibration, Youden, McNemar, and CI coverage on simulated cohorts with a known AUC."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from wsi_pipeline.evaluation import Cohort, compare_paired, delong, evaluate, weighted, youden_threshold
from wsi_pipeline.evaluation.bootstrap import bootstrap_weights, percentile_ci
from wsi_pipeline.evaluation.calibration import reliability
from wsi_pipeline.evaluation.metrics import point_metrics
from wsi_pipeline.evaluation.paired import mcnemar
from wsi_pipeline.evaluation.summary import bootstrap_values
from wsi_pipeline.workspace.files import json_text


def _binary(n: int, seed: int, separation: float = 1.0, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = rng.normal(separation * y, 1.0)
    if ties:
        score = np.round(score, 1)  # many ties: the hard case for rank statistics
    p = 1 / (1 + np.exp(-score))
    return y, np.c_[1 - p, p]


def test_bootstrap_resamples_patients_within_their_class() -> None:
    cases = ("p0", "p0", "p1", "p2", "p2", "p2", "p3", "p4")
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    W = bootstrap_weights(cases, y, n_resamples=300, seed=1)
    assert W.shape == (300, 8)
    assert (W[:, 0] == W[:, 1]).all() and (W[:, 3] == W[:, 5]).all()  # a patient's slides move together
    patient_counts = W[:, [0, 2, 3, 6, 7]]
    assert (patient_counts[:, :2].sum(1) == 2).all() and (patient_counts[:, 2:].sum(1) == 3).all()
    assert np.array_equal(W, bootstrap_weights(cases, y, n_resamples=300, seed=1))
    assert not np.array_equal(W, bootstrap_weights(cases, y, n_resamples=300, seed=2))


def test_weighted_metrics_equal_scikit_learn_on_each_resample() -> None:
    """A weight row of draw counts must score exactly as scikit-learn scores the resampled (repeated) slides."""
    y, probs = _binary(60, seed=3)
    cases = tuple(f"c{i // 2}" for i in range(60))
    W = bootstrap_weights(cases, y, n_resamples=5, seed=0)
    values = bootstrap_values(y, probs, W, threshold=0.4)
    for b, row in enumerate(W):
        idx = np.repeat(np.arange(60), row.astype(int))
        yb, pb = y[idx], probs[idx]
        expected = point_metrics(yb, pb, threshold=0.4)
        for name, value in expected.items():
            assert values[name][b] == pytest.approx(value, abs=1e-12), name
        assert values["auc"][b] == pytest.approx(roc_auc_score(yb, pb[:, 1]))


def test_weighted_multiclass_metrics_equal_scikit_learn() -> None:
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + np.eye(3)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    W = bootstrap_weights(tuple(map(str, range(60))), y, n_resamples=4, seed=0)
    values = bootstrap_values(y, probs, W, threshold=0.5)
    for b, row in enumerate(W):
        idx = np.repeat(np.arange(60), row.astype(int))
        yb, pb = y[idx], probs[idx]
        assert values["auc"][b] == pytest.approx(roc_auc_score(yb, pb, multi_class="ovr", average="macro"))
        assert values["f1"][b] == pytest.approx(f1_score(yb, pb.argmax(1), average="macro"))
        assert values["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(yb, pb.argmax(1)))
        assert values["average_precision"][b] == pytest.approx(
            average_precision_score(np.eye(3)[yb], pb, average="macro"))


def _delong_reference(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by definition, O(m·n): ψ(x, y) = 1 if x > y, ½ if x = y; V10, V01; S = S10/m + S01/n."""
    x, yn = scores[:, positive], scores[:, ~positive]
    psi = (x[:, :, None] > yn[:, None, :]) + 0.5 * (x[:, :, None] == yn[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    aucs = psi.mean(axis=(1, 2))
    k = len(scores)
    s10 = np.array([[np.cov(v10[i], v10[j])[0, 1] for j in range(k)] for i in range(k)])
    s01 = np.array([[np.cov(v01[i], v01[j])[0, 1] for j in range(k)] for i in range(k)])
    return aucs, s10 / x.shape[1] + s01 / yn.shape[1]


def test_delong_equals_its_definition() -> None:
    y, probs_a = _binary(80, seed=7)
    _, probs_b = _binary(80, seed=8, separation=0.3)
    positive = y == 1
    scores = np.stack([probs_a[:, 1], np.where(positive, probs_b[:, 1] + 0.1, probs_b[:, 1])])
    aucs, cov = delong.covariance(positive, scores)
    ref_aucs, ref_cov = _delong_reference(positive, scores)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)
    assert aucs[0] == pytest.approx(roc_auc_score(y, scores[0]))
    test = delong.paired_test(positive, scores[0], scores[1])
    z = (ref_aucs[1] - ref_aucs[0]) / np.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert test.z == pytest.approx(z) and test.p_value == pytest.approx(2 * norm.sf(abs(z)))


def test_delong_on_a_small_hand_computed_example() -> None:
    """Positives 0.9, 0.8, 0.4; negatives 0.7, 0.4, 0.1: ψ-matrix rows (1,1,1), (1,1,1), (0,½,1)."""
    positive = np.array([1, 1, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.8, 0.4, 0.7, 0.4, 0.1])
    aucs, cov = delong.covariance(positive, score[None])
    assert aucs[0] == pytest.approx(7.5 / 9)
    v10 = np.array([1, 1, 0.5])  # per positive
    v01 = np.array([2 / 3, 2.5 / 3, 1])  # per negative
    assert cov[0, 0] == pytest.approx(np.var(v10, ddof=1) / 3 + np.var(v01, ddof=1) / 3)


def test_ci_covers_the_true_auc_in_at_least_90_percent_of_simulated_cohorts() -> None:
    """Binormal cohorts (negatives N(0,1), positives N(d,1)): the true AUC is Φ(d/√2)."""
    d, n_cohorts, n_pos, n_neg = 1.2, 200, 40, 60
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    cases = tuple(map(str, range(len(y))))
    W = bootstrap_weights(cases, y, n_resamples=1000, seed=0)
    covered_boot = covered_delong = 0
    for _ in range(n_cohorts):
        score = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        lo, hi = percentile_ci(weighted.auc(y == 1, score, W))
        covered_boot += lo <= true_auc <= hi
        _, dlo, dhi = delong.auc_ci(y == 1, score)
        covered_delong += dlo <= true_auc <= dhi
    assert covered_boot / n_cohorts >= 0.90
    assert covered_delong / n_cohorts >= 0.90


def test_ece_and_reliability_bins() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    calibrated = reliability(y, np.c_[1 - p, p])
    assert calibrated["ece"] < 0.02 and len(calibrated["bins"]) == 10
    assert sum(b["count"] for b in calibrated["bins"]) == p.size
    overconfident = np.clip((p - 0.5) * 2 + 0.5, 0, 1)  # pushed away from 0.5
    ece = reliability(y, np.c_[1 - overconfident, overconfident])["ece"]
    naive = 0.0
    for k in range(10):
        in_bin = (overconfident >= k / 10) & ((overconfident < (k + 1) / 10) if k < 9 else (overconfident <= 1))
        if in_bin.any():
            naive += in_bin.mean() * abs(y[in_bin].mean() - overconfident[in_bin].mean())
    assert ece == pytest.approx(naive, abs=1e-9) and ece > 0.1


def test_youden_threshold_maximises_j() -> None:
    y, probs = _binary(200, seed=4, ties=False)
    t = youden_threshold(y, probs[:, 1])
    def j(cut: float) -> float:
        called = probs[:, 1] >= cut
        return called[y == 1].mean() - called[y == 0].mean()
    assert j(t) == pytest.approx(max(j(c) for c in probs[:, 1]))
    assert youden_threshold(np.zeros(5, int), probs[:5, 1]) is None


def test_mcnemar_exact_p_value() -> None:
    """1 vs 9 discordant slides: p = 2·P(X ≤ 1 | n = 10, ½) = 2·11/1024."""
    right_a = np.array([True] * 1 + [False] * 9 + [True] * 5)
    right_b = np.array([False] * 1 + [True] * 9 + [True] * 5)
    result = mcnemar(right_a, right_b)
    assert (result["only_a_right"], result["only_b_right"]) == (1, 9)
    assert result["p_value"] == pytest.approx(22 / 1024)


def test_evaluate_agrees_with_scikit_learn_and_stays_strict_json() -> None:
    y, probs = _binary(120, seed=9)
    cohort = Cohort(tuple(f"s{i}" for i in range(120)), tuple(f"p{i // 3}" for i in range(120)), y, probs,
                    ("normal", "tumor"))
    result = evaluate(cohort, n_resamples=200)
    slide = result["slide"]["metrics"]
    assert slide["auc"]["value"] == roc_auc_score(y, probs[:, 1])
    assert slide["auc"]["ci"][0] < slide["auc"]["value"] < slide["auc"]["ci"][1]
    assert result["positive_class"] == "tumor" and len(result["slide"]["curves"]["roc"]["band"][0]) == 51
    json.loads(json_text(result))  # strict: no NaN anywhere


def test_one_class_only_makes_auc_undefined_said_plainly() -> None:
    y = np.ones(6, int)
    probs = np.c_[np.linspace(0.1, 0.6, 6), 1 - np.linspace(0.1, 0.6, 6)]
    result = evaluate(Cohort(tuple("abcdef"), tuple("abcdef"), y, probs, ("normal", "tumor")), n_resamples=50)
    auc = result["slide"]["metrics"]["auc"]
    assert auc["value"] is None and "no labelled slide of class 'normal'" in auc["reason"]
    assert "NaN" not in json_text(result) and "curves" not in result["slide"]


def test_paired_comparison_of_two_models() -> None:
    y, strong = _binary(150, seed=12, separation=2.0)
    _, weak = _binary(150, seed=13, separation=0.2)
    cases = tuple(map(str, range(150)))
    result = compare_paired(y, weak, strong, cases, ("a", "b"), n_resamples=300)
    auc = result["auc"]
    assert auc["delta"] == pytest.approx(roc_auc_score(y, strong[:, 1]) - roc_auc_score(y, weak[:, 1]))
    assert auc["ci"][0] > 0 and auc["p_value"] < 0.01
    same = compare_paired(y, strong, strong, cases, ("a", "b"), n_resamples=50)
    assert same["auc"]["delta"] == 0 and same["auc"]["p_value"] == 1.0 and same["balanced_accuracy"]["p_value"] == 1


def test_few_patients_get_a_caution_next_to_their_cis() -> None:
    y, probs = _binary(40, seed=1)
    many = evaluate(Cohort(tuple(map(str, range(40))), tuple(map(str, range(40))), y, probs, ("a", "b")),
                    n_resamples=50)
    assert "caution" not in many["slide"]
    few = evaluate(Cohort(tuple(map(str, range(40))), tuple(f"p{v}{i % 3}" for i, v in enumerate(y)), y, probs,
                          ("a", "b")), n_resamples=50)
    assert "few patients (3 of class 'a', 3 of class 'b')" in few["slide"]["caution"]


def test_patient_level_is_the_mean_probability_of_its_slides() -> None:
    probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.5, 0.5], [0.1, 0.9]])
    cohort = Cohort(("a", "b", "c", "d"), ("p", "p", "q", "r"), np.array([1, 1, 0, 1]), probs, ("x", "y"))
    patients = cohort.by_patient()
    assert patients.slide_ids == ("p", "q", "r") and patients.y.tolist() == [1, 0, 1]
    np.testing.assert_allclose(patients.probs, [[0.3, 0.7], [0.5, 0.5], [0.1, 0.9]])
    mixed = Cohort(("a", "b"), ("p", "p"), np.array([0, 1]), probs[:2], ("x", "y"))
    assert mixed.by_patient() is None and mixed.mixed_label_patients() == ["p"]
    assert "patients with slides of different labels: p" in evaluate(mixed, n_resamples=20)["patient"]["undefined"]
