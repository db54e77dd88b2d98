"""`wsip predict`: new slides, end to end, exactly like the training cohort, cached.

The run records how its features were made (`runs/<name>/features.json`: the patch and extract params and
the weights' sha256). A new slide goes through the same `patch` and `extract` functions with those params,
in the workspace's own `predictions/_slides/` (so a slide named like a training slide never touches the
cohort's files), then through every fold's selected model. Fold probabilities are averaged; per-instance
attention (masked instances: zero) becomes a heatmap. Outputs: `predictions/<run name>/<slide_id>.json`,
`<slide_id>_heatmap.png` and `<slide_id>_attention.h5` (per-patch attention, for `wsip view` and the QuPath
export), rewritten only when they change: predicting a slide again writes nothing (a read-only workspace works
once its predictions are there).

With labels (`labels`, or a slide CSV's `label` column) the call is an external validation:
`predictions/<run name>/predictions.csv` and `metrics.json` hold the cohort's statistics with CIs
(:mod:`wsi_pipeline.stages.predict.cohort`, docs/evaluation.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wsi_pipeline.device import resolve_device
from wsi_pipeline.errors import UserError
from wsi_pipeline.slide import Slide
from wsi_pipeline.stages.extract import extract
from wsi_pipeline.stages.inputs import SlideSource, split_valid
from wsi_pipeline.stages.patch import patch
from wsi_pipeline.stages.predict.annotations import annotation_file, outer_rings, top_k_on_annotation
from wsi_pipeline.stages.predict.cohort import (
    CohortResult,
    check_labels,
    cohort_labels,
    resolve_threshold,
    write_cohort,
)
from wsi_pipeline.stages.predict.heatmap import percentile_scores, render_heatmap
from wsi_pipeline.stages.predict.trained_run import find_run, load_fold_models, predict_bag, recorded_stage_params
from wsi_pipeline.stages.runner import DONE, FAILED, FAILURES
from wsi_pipeline.workspace.attention_store import write_attention
from wsi_pipeline.workspace.feature_store import feature_attrs
from wsi_pipeline.workspace.files import remove_stale_temps, storage_errors, write_json_if_changed
from wsi_pipeline.workspace.layout import Layout, RunDir
from wsi_pipeline.workspace.peer_features import read_bag
from wsi_pipeline.workspace.run_store import parse_splits_csv
from wsi_pipeline.workspace.slide_id import shown

__all__ = ["PredictParams", "PredictResult", "SlidePrediction", "predict"]


@dataclass(frozen=True)
class PredictParams:
    run: Path | str | None = None  # a runs/<name> folder or a run name; default: the newest trained run
    fold: int | None = None  # one fold's model instead of the average of all folds
    device: str = "auto"
    heatmap: bool = True
    annotations: Path | None = None  # folder of <slide_id>.geojson regions (e.g. lesions): outlined on the
    # heatmap, and the fraction of the 10 most-attended patches on them is recorded (`top10_on_annotation`)
    labels: Path | None = None  # CSV slide_id,label[,case_id]: score the cohort (predictions.csv, metrics.json)
    threshold: float | str = 0.5  # p(positive) cut of binary decisions, or "youden" (the run's, from val folds)


@dataclass
class SlidePrediction:
    slide_id: str
    status: str  # DONE | FAILED (the manifest vocabulary)
    probabilities: dict[str, float] | None = None
    predicted: str | None = None
    json_path: Path | None = None
    heatmap_path: Path | None = None
    qc_path: Path | None = None
    error: str = ""
    note: str = ""  # e.g. a name shared with a training slide


@dataclass
class PredictResult:
    run_dir: Path
    classes: tuple[str, ...]
    predictions: list[SlidePrediction]
    out_dir: Path  # predictions/<run name>/
    cohort: CohortResult | None = None  # with labels: the cohort's statistics (metrics.json)


def predict(slides: Sequence[SlideSource], params: PredictParams = PredictParams(), *,
            out: str | Path | None = None) -> PredictResult:
    """Predict each slide with a trained run; callable from Python exactly as `wsip predict`."""
    if params.annotations is not None and not Path(params.annotations).is_dir():
        raise UserError(f"--annotations {params.annotations}: no such folder (one <slide_id>.geojson per slide)")
    layout = Layout.at(out)
    with storage_errors(layout.root):
        return _predict(slides, params, layout)


def _predict(slides: Sequence[SlideSource], params: PredictParams, layout: Layout) -> PredictResult:
    run = find_run(layout, params.run)
    device = resolve_device(params.device)
    models = load_fold_models(run, params.fold, device)
    classes = tuple(models[0][1]["model"]["classes"])
    labels, labels_from = cohort_labels(slides, params.labels)
    if labels:  # checked before any slide is processed: a bad labels file writes nothing
        check_labels(labels, [s.slide_id for s in slides], classes, labels_from)
    threshold = resolve_threshold(params.threshold, run, classes)
    record, patch_params, extract_params = recorded_stage_params(run)
    work = layout.prediction_slides()
    slides, refused = split_valid(slides)
    # wait=True: a slide another `wsip predict` is patching or encoding is waited for, then its result reused
    errors = {o.slide_id: o.error for o in patch(slides, patch_params, out=work, wait=True).outcomes
              if o.status in FAILURES}
    patched = [s.slide_id for s in slides if s.slide_id not in errors]
    if patched:  # else every slide failed its patching: nothing to encode
        extracted = extract(replace(extract_params, device=params.device), out=work, slide_ids=patched, wait=True)
        _check_same_features(extracted.feature_set.params, record)
        errors |= {o.slide_id: o.error for o in extracted.outcomes if o.status == FAILED}
    prediction_set = layout.predictions(run.name)
    remove_stale_temps(prediction_set.dir, *layout.staging_dirs())
    training_ids = _training_ids(run)
    predictions = [SlidePrediction(shown(s.slide_id), FAILED, error=why) for s, why in refused]
    records = {}
    for source in slides:
        sid = source.slide_id
        if sid in errors:
            predictions.append(SlidePrediction(sid, FAILED, error=errors[sid]))
            continue
        h5_path = extracted.feature_set.h5(sid)
        features, coords = read_bag(h5_path)
        mean, attention, per_fold = predict_bag(models, features, coords, device)
        note = (f"{sid} is also the name of a slide this run trained on; it was processed separately in "
                f"{work.root}, the training files are untouched") if sid in training_ids else ""
        result = {"slide_id": sid, "slide_path": str(source.path), "run": str(run.dir), "classes": list(classes),
                  "probabilities": dict(zip(classes, mean.tolist(), strict=True)),
                  "predicted": classes[int(np.argmax(mean))], "folds": [m["fold"] for _, m in models],
                  "fold_probabilities": per_fold, "n_patches": len(features),
                  "features": str(extracted.feature_set.dir), **({"note": note} if note else {})}
        attrs = feature_attrs(h5_path)
        size0 = int(attrs["patch_size_level0"])
        write_attention(prediction_set.attention(sid), coords, attention, percentile_scores(attention),
                        {"patch_size_level0": size0, "target_mpp": float(attrs["target_mpp"]),
                         "slide_mpp": float(attrs["slide_mpp"]), "patch_config": patch_params.config_name()})
        regions = annotation_file(params.annotations, sid)
        with Slide(source.path, mpp=source.mpp, mpp_fallback=source.mpp_fallback) as slide:
            if regions is not None:
                result["top10_on_annotation"] = top_k_on_annotation(regions, slide.dimensions, coords, size0,
                                                                    attention)
            heatmap_path = render_heatmap(
                slide, coords, size0, attention, prediction_set.heatmap(sid),
                annotations=outer_rings(regions) if regions else (),
                title=f"{sid}: {result['predicted']} ({max(mean):.2f}), run {run.name}") if params.heatmap else None
        json_path = prediction_set.record(sid)
        write_json_if_changed(json_path, result)
        records[sid] = result
        predictions.append(SlidePrediction(sid, DONE, result["probabilities"], result["predicted"], json_path,
                                           heatmap_path, work.patch_set(patch_params.config_name()).qc(sid),
                                           note=note))
    cohort = None
    if any(sid in labels for sid in records):
        context = {"run": run.name, "fold": params.fold if params.fold is not None else "mean of the folds",
                   "labels": labels_from}
        cohort = write_cohort(prediction_set, records, labels, classes=classes, threshold=threshold,
                              failed=list(errors), context=context)
    return PredictResult(run.dir, classes, predictions, prediction_set.dir, cohort)


def _check_same_features(params_json: Path, record: dict) -> None:
    """The new slides' features must come from the very weights the run was trained on."""
    made = json.loads(params_json.read_text())
    if made.get("weights_sha256") != record.get("weights_sha256"):
        raise UserError(f"{params_json.parent}: encoder weights {made.get('weights_sha256')} differ from the run's "
                        f"({record.get('weights_sha256')}); pass the weights the run was trained with")


def _training_ids(run: RunDir) -> set[str]:
    return {r.slide_id for r in parse_splits_csv(run.splits).rows} if run.splits.is_file() else set()
