"""End to end on a generated cohort (issue #5): patch → extract → train → predict, through the stage functions."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from wsi_pipeline.errors import UserError
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.predict import PredictParams, predict
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.stages.train.metrics import classification_metrics
from wsi_pipeline.workspace.layout import Layout

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_cohort):
    """10 slides in two classes (4 sharing patients), patched and encoded (random weights) once per run
    (conftest's `small_cohort`), here a copy of that workspace and a GMMamba run trained 3-fold on it."""
    root = tmp_path_factory.mktemp("e2e")
    (root / "holdout.svs").symlink_to(small_cohort / "holdout.svs")
    shutil.copytree(small_cohort / "ws", root / "ws")
    [features] = Layout(root / "ws").feature_sets()
    labels = small_cohort / "labels.csv"
    config = {"name": "e2e", "data": {"features": str(features.dir), "labels": str(labels)},
              "splits": {"folds": 3, "val_fraction": 0.25, "seed": 42}, "model": {"name": "gmmamba"},
              "optim": {"epochs": 3, "select_after": 0, "patience": 2, "min_epochs": 1},
              "seed": 1, "device": "cpu", "out": str(root / "ws")}
    cfg = root / "e2e.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return root, train(TrainParams(config=cfg)), labels


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_summary_metrics_match_preds_and_patients_never_straddle_partitions(trained):
    root, result, labels = trained
    run = result.run_dir
    assert (run / "summary.csv").exists() and (run / "report.md").exists()
    cases = {r["slide_id"]: r["case_id"] for r in read_csv(labels)}
    splits = read_csv(run / "splits.csv")
    for fold in {r["fold"] for r in splits}:
        owner: dict[str, str] = {}
        for r in (r for r in splits if r["fold"] == fold):
            assert owner.setdefault(cases[r["slide_id"]], r["split"]) == r["split"]
    for fold in result.folds:
        test = fold.metrics["test"]
        for key in ("accuracy", "auc", "f1", "balanced_accuracy"):
            assert np.isnan(test[key]) or 0 <= test[key] <= 1
        preds = read_csv(run / f"fold_{fold.fold}" / "preds.csv")
        y = [result.classes.index(r["label"]) for r in preds]
        probs = np.array([[float(r[f"prob_{c}"]) for c in result.classes] for r in preds])
        recomputed = classification_metrics(y, probs)
        assert recomputed["accuracy"] == pytest.approx(test["accuracy"])
        assert recomputed["f1"] == pytest.approx(test["f1"])
        assert np.isnan(test["auc"]) and np.isnan(recomputed["auc"]) or recomputed["auc"] == pytest.approx(test["auc"])


def test_predict_new_slide_twice_reuses_cache(trained):
    root, result, _ = trained
    holdout = SlideSource(root / "holdout.svs")
    params = PredictParams(run=result.run_dir)
    first = predict([holdout], params, out=root / "ws").predictions[0]
    assert first.status == "done", first.error
    coords = root / "ws/predictions/_slides/patches/20x_256px_0px/coords/holdout.h5"
    feats = next((root / "ws/predictions/_slides/features").glob("*/*/h5_files/holdout.h5"))
    stamps = (coords.stat().st_mtime_ns, feats.stat().st_mtime_ns)
    second = predict([holdout], params, out=root / "ws").predictions[0]
    assert (coords.stat().st_mtime_ns, feats.stat().st_mtime_ns) == stamps  # nothing recomputed
    assert sum(first.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert first.probabilities == second.probabilities
    record = json.loads(first.json_path.read_text())
    assert record["probabilities"] == first.probabilities and len(record["folds"]) == 3
    assert first.heatmap_path.stat().st_size > 1000 and first.qc_path.exists()


def test_predict_errors_are_one_clear_line(trained, tmp_path):
    root, result, _ = trained
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide")
    outcome = predict([SlideSource(bad)], PredictParams(run=result.run_dir), out=root / "ws").predictions[0]
    assert outcome.status == "failed" and "broken.svs" in outcome.error and "\n" not in outcome.error
    empty_run = root / "ws/runs/unfinished"
    (empty_run / "fold_0").mkdir(parents=True)
    with pytest.raises(UserError, match="incomplete run"):
        predict([SlideSource(root / "holdout.svs")], PredictParams(run=empty_run), out=root / "ws")


def test_2dmamba_trains_and_predicts_a_heatmap_on_the_same_features(trained):
    """`model: {name: 2dmamba}` on the cohort above; its heatmap shows real patches only (docs/mamba2d.md §3)."""
    root, result, _ = trained
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    config.update(name="e2e_2dmamba", model={"name": "2dmamba", "d_model": 16}, optim={**config["optim"], "epochs": 1})
    (root / "e2e_2dmamba.yaml").write_text(yaml.safe_dump(config))
    run = train(TrainParams(config=root / "e2e_2dmamba.yaml")).run_dir
    done = predict([SlideSource(root / "holdout.svs")], PredictParams(run=run), out=root / "ws").predictions[0]
    assert done.status == "done", done.error
    assert sum(done.probabilities.values()) == pytest.approx(1.0, abs=1e-6) and len(json.loads(
        done.json_path.read_text())["folds"]) == 3
    assert done.heatmap_path.stat().st_size > 1000 and done.heatmap_path.name == "holdout_heatmap.png"
