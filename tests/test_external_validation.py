"""External validation end to end (docs/evaluation.md): `wsip train` records pooled out-of-fold statistics and a
Youden threshold, `wsip predict --labels` scores a labelled cohort with CIs, `wsip compare` pairs two runs, and
bad labels are one line that writes nothing."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from wsi_pipeline.errors import UserError
from wsi_pipeline.stages.compare import CompareParams, compare
from wsi_pipeline.stages.inputs import resolve_inputs
from wsi_pipeline.stages.predict import PredictParams, predict
from wsi_pipeline.stages.predict.cohort import resolve_threshold
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.testing.synthetic import make_demo_cohort
from wsi_pipeline.workspace.layout import Layout, RunDir


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_cohort):
    """A 10-slide training cohort (conftest's `small_cohort`, its workspace copied) with runs `a`, `b` (same
    splits) and `c` (other splits), and an external cohort of 4 labelled slides (2 patients × 2 slides) plus one
    unlabelled slide."""
    root = tmp_path_factory.mktemp("study")
    labels = small_cohort / "labels.csv"
    ext_labels = make_demo_cohort(root / "ext" / "slides", n_slides=4, size=(1024, 1536), hotspots=2, seed=8)
    external = root / "external"
    external.mkdir()
    for slide in (root / "ext" / "slides").glob("*.svs"):
        shutil.copy(slide, external / f"ext_{slide.name}")
    shutil.copy(root / "ext" / "holdout.svs", external / "unlabelled.svs")
    rows = read_rows(ext_labels)
    (root / "ext_labels.csv").write_text("slide_id,label,case_id\n" + "".join(
        f"ext_{r['slide_id']},{r['label']},ext_{r['case_id']}\n" for r in rows))
    ws = root / "ws"
    shutil.copytree(small_cohort / "ws", ws)
    [features] = Layout(ws).feature_sets()
    base = {"data": {"features": str(features.dir), "labels": str(labels)},
            "splits": {"folds": 2, "val_fraction": 0.5}, "model": {"name": "abmil"},
            "optim": {"epochs": 2, "select_after": 0, "min_epochs": 0}, "device": "cpu", "out": str(ws)}
    results = {}
    for name, seed, split_seed in (("a", 1, 42), ("b", 2, 42), ("c", 1, 7)):
        cfg = {**base, "name": name, "seed": seed, "splits": {**base["splits"], "seed": split_seed}}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        results[name] = train(TrainParams(root / f"{name}.yaml"))
    return root, ws, results


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_train_records_pooled_out_of_fold_auc_with_ci_and_a_youden_threshold(study):
    _, ws, results = study
    run = ws / "runs" / "a"
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation == results["a"].evaluation
    rows = read_rows(run / "oof_predictions.csv")
    assert len(rows) == 10  # k-fold: every slide tested once
    y = [r["label"] == "tumour" for r in rows]
    auc = evaluation["pooled_out_of_fold"]["slide"]["metrics"]["auc"]
    assert auc["value"] == pytest.approx(roc_auc_score(y, [float(r["prob_tumour"]) for r in rows]))
    assert auc["ci"][0] <= auc["value"] <= auc["ci"][1]
    val_rows = [r for k in (0, 1) for r in read_rows(run / f"fold_{k}" / "val_preds.csv")]
    threshold = evaluation["youden"]["threshold"]
    assert threshold in [float(r["prob_tumour"]) for r in val_rows]  # picked on validation slides only
    assert "Pooled out-of-fold AUC" in (run / "report.md").read_text()


@pytest.mark.e2e
def test_predict_with_labels_scores_the_cohort_like_scikit_learn(study):
    root, ws, _ = study
    result = predict(resolve_inputs([root / "external"]), PredictParams(run="a", labels=root / "ext_labels.csv",
                                                                        heatmap=False), out=ws)
    assert result.cohort is not None
    assert result.cohort.notes == ["1 slide(s) without a label (unlabelled): predicted, left out of the metrics"]
    rows = read_rows(ws / "predictions" / "a" / "predictions.csv")
    assert {r["slide_id"] for r in rows} == {"ext_demo_00", "ext_demo_01", "ext_demo_02", "ext_demo_03",
                                             "unlabelled"}
    assert [c for c in rows[0] if c.startswith("fold")] == [f"fold{k}_prob_{c}" for k in (0, 1)
                                                          for c in ("normal", "tumour")]
    labelled = [r for r in rows if r["label"]]
    for r in labelled:  # the per-slide records and the table agree
        record = json.loads((ws / "predictions" / "a" / f"{r['slide_id']}.json").read_text())
        assert float(r["prob_tumour"]) == record["probabilities"]["tumour"]
    metrics = json.loads((ws / "predictions" / "a" / "metrics.json").read_text())
    expected = roc_auc_score([r["label"] == "tumour" for r in labelled], [float(r["prob_tumour"]) for r in labelled])
    assert metrics["slide"]["metrics"]["auc"]["value"] == pytest.approx(expected, abs=1e-12)
    assert metrics["slide"]["n"] == 4 and metrics["patient"]["n"] == 2  # P00 = slides 0 & 2, P01 = 1 & 3
    assert metrics["unlabelled"] == ["unlabelled"] and "NaN" not in (ws / "predictions/a/metrics.json").read_text()


@pytest.mark.e2e
def test_labels_in_a_slides_csv_and_the_youden_threshold(study, tmp_path):
    root, ws, results = study
    slides_csv = tmp_path / "slides.csv"
    slides_csv.write_text("slide_path,label,case_id\n" + "".join(
        f"{root / 'external' / f'ext_demo_{i:02d}.svs'},{'tumour' if i % 2 else 'normal'},P{i}\n" for i in range(4)))
    result = predict(resolve_inputs([slides_csv]), PredictParams(run="b", threshold="youden", heatmap=False), out=ws)
    threshold = result.cohort.evaluation["threshold"]
    assert threshold == {"value": results["b"].evaluation["youden"]["threshold"], "source": "Youden (validation folds)"}
    rows = read_rows(ws / "predictions" / "b" / "predictions.csv")
    assert all(r["predicted"] == ("tumour" if float(r["prob_tumour"]) >= threshold["value"] else "normal")
               for r in rows)
    assert result.cohort.evaluation["patient"]["n"] == 4  # one patient per slide here


@pytest.mark.e2e
def test_one_class_only_says_auc_undefined(study, tmp_path, wsip):
    root, ws, _ = study
    labels = tmp_path / "tumours.csv"
    labels.write_text("slide_id,label\next_demo_01,tumour\next_demo_03,tumour\n")
    proc = wsip(["predict", root / "external" / "ext_demo_01.svs", root / "external" / "ext_demo_03.svs",
                 "--run", "c", "--labels", labels, "--no-heatmap", "--out", ws], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "undefined: no labelled slide of class 'normal'" in proc.stderr  # the fork server's output, both streams
    text = (ws / "predictions" / "c" / "metrics.json").read_text()
    assert json.loads(text)["slide"]["metrics"]["auc"]["value"] is None and "NaN" not in text


@pytest.mark.e2e
@pytest.mark.parametrize(("rows", "expected"), [
    ("ext_demo_00,normal\nnot_given,tumour\n", "labels for slide(s) not being predicted: not_given"),
    ("ext_demo_00,benign\n", "label(s) 'benign' are not classes of the run (normal, tumour)"),
    ("slide_id,label\n", "no slides listed"),
])
def test_bad_labels_are_refused_before_anything_is_written(study, tmp_path, rows, expected):
    root, ws, _ = study
    labels = tmp_path / "labels.csv"
    labels.write_text(rows if rows.startswith("slide_id") else "slide_id,label\n" + rows)
    before = digest(ws)
    with pytest.raises(UserError, match=re.escape(expected)):
        predict(resolve_inputs([root / "external" / "ext_demo_00.svs"]), PredictParams(run="a", labels=labels),
                out=ws)
    assert digest(ws) == before


@pytest.mark.e2e
def test_a_bad_label_is_one_line_exit_2_from_the_cli(study, tmp_path, wsip):
    root, ws, _ = study
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\next_demo_00,benign\n")
    proc = wsip(["predict", root / "external" / "ext_demo_00.svs", "--run", "a", "--labels", labels, "--out", ws],
                tmp_path)
    assert proc.returncode == 2 and "'benign' are not classes of the run" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_compare_two_runs_on_the_same_splits_and_refuse_other_slides(study, wsip):
    root, ws, _ = study
    proc = wsip(["compare", "a", "b", "--on", "cv", "--out", ws], root, COLUMNS="200")
    assert proc.returncode == 0, proc.stderr
    assert "AUC" in proc.stderr and "DeLong paired" in proc.stderr and "McNemar exact" in proc.stderr
    record = json.loads((ws / "comparisons" / "a__vs__b_cv.json").read_text())
    a = read_rows(ws / "runs" / "a" / "oof_predictions.csv")
    b = {r["slide_id"]: r for r in read_rows(ws / "runs" / "b" / "oof_predictions.csv")}
    y = [r["label"] == "tumour" for r in a]
    delta = roc_auc_score(y, [float(b[r["slide_id"]]["prob_tumour"]) for r in a]) - roc_auc_score(
        y, [float(r["prob_tumour"]) for r in a])
    assert record["auc"]["delta"] == pytest.approx(delta)
    assert 0 <= record["auc"]["p_value"] <= 1 and record["auc"]["ci"][0] <= delta <= record["auc"]["ci"][1]
    refused = wsip(["compare", "a", "c", "--on", "cv", "--out", ws], root)
    assert refused.returncode == 2 and "not trained on the same splits" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    predict(resolve_inputs([root / "external"]), PredictParams(run="a", labels=root / "ext_labels.csv",
                                                               heatmap=False), out=ws)
    with pytest.raises(UserError, match="did not see the same slides"):  # b scored other slides (a slides CSV)
        compare(CompareParams("a", "c"), out=ws)
    assert np.isfinite(record["balanced_accuracy"]["p_value"])


def test_threshold_choices_are_checked(tmp_path):
    """No training needed: a number in (0, 1), `youden` (recorded or one line saying why not), argmax for 3+."""
    run = RunDir(tmp_path / "r")
    assert resolve_threshold(0.3, run, ("a", "b")) == (0.3, "--threshold")
    assert resolve_threshold(0.5, run, ("a", "b")) == (0.5, "default")
    with pytest.raises(UserError, match=r"--threshold 1.5: give a probability in \(0, 1\)"):
        resolve_threshold(1.5, run, ("a", "b"))
    with pytest.raises(UserError, match="no recorded Youden threshold"):
        resolve_threshold("youden", run, ("a", "b"))
    with pytest.raises(UserError, match="applies to two classes"):
        resolve_threshold(0.3, run, ("a", "b", "c"))
    assert resolve_threshold(0.5, run, ("a", "b", "c")) == (0.5, "argmax")
