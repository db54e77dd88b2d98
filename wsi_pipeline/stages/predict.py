"""`wsip predict`: a new slide, end to end, exactly like the training cohort, with the cache (DESIGN §9).

The run records which feature set it trained on; that feature set records its patch config and encoder.
So a new slide goes through the same `patch` and `extract` functions with the same parameters (in the same
workspace: already-processed slides are reused, not recomputed), then through every fold's selected model.
Fold probabilities are averaged; per-instance attention (masked instances: zero) becomes a heatmap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipeline.device import resolve_device
from wsi_pipeline.errors import UserError
from wsi_pipeline.feature_store import feature_attrs, read_bag
from wsi_pipeline.heatmap import render_heatmap
from wsi_pipeline.slide import Slide
from wsi_pipeline.stages.cohort import SlideSource, one_line
from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.patch import PatchParams, patch
from wsi_pipeline.trainer import ModelSpec
from wsi_pipeline.workspace import workspace_root, write_json_atomic


@dataclass(frozen=True)
class PredictParams:
    run: Path | None = None  # a runs/<name> folder; default: the newest finished run in the workspace
    fold: int | None = None  # one fold's model instead of the average of all folds
    device: str = "auto"
    heatmap: bool = True


@dataclass
class SlidePrediction:
    slide_id: str
    status: str  # "done" | "failed"
    probabilities: dict[str, float] | None = None
    predicted: str | None = None
    json_path: Path | None = None
    heatmap_path: Path | None = None
    qc_path: Path | None = None
    error: str = ""


@dataclass
class PredictResult:
    run_dir: Path
    classes: tuple[str, ...]
    predictions: list[SlidePrediction]


def find_run(root: Path, run: Path | None) -> Path:
    """The given run, or the newest run under `<root>/runs` that has at least one trained fold."""
    if run is not None:
        if not run.is_dir():
            raise UserError(f"{run}: no such run folder; pass --run runs/<name> of a finished `wsip train`")
        return run
    runs = [p for p in (root / "runs").glob("*") if any(p.glob("fold_*/best.pt"))]
    if not runs:
        raise UserError(f"{root / 'runs'}: no trained run; run `wsip train --cfg ...` first or pass --run")
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in p.glob("fold_*/best.pt")))


def load_fold_models(run_dir: Path, fold: int | None, device: torch.device) -> list[tuple[torch.nn.Module, dict]]:
    paths = sorted(run_dir.glob("fold_*/best.pt"))
    if fold is not None:
        paths = [p for p in paths if p.parent.name == f"fold_{fold}"]
    if not paths:
        which = f"fold_{fold}/best.pt" if fold is not None else "fold_*/best.pt"
        raise UserError(f"{run_dir}: incomplete run (no {which}); finish `wsip train` or pick another --run/--fold")
    models = []
    for path in paths:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            meta = checkpoint["meta"]
            model = ModelSpec(**{**meta["model"], "classes": tuple(meta["model"]["classes"])}).build()
            model.load_state_dict(checkpoint["model_state"])
        except (OSError, KeyError, RuntimeError, TypeError) as exc:
            raise UserError(f"{path}: unreadable checkpoint ({one_line(exc)}); retrain this fold") from None
        models.append((model.to(device).eval(), meta))
    return models


def recorded_stage_params(features_dir: Path) -> tuple[Path, PatchParams, ExtractParams]:
    """(workspace root, patch params, extract params) the run's features were made with."""
    try:
        extract_record = json.loads((features_dir / "params.json").read_text())
        patch_dir = Path(extract_record["patch_dir"])
        patch_record = json.loads((patch_dir / "params.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{features_dir}: feature set without its params.json ({one_line(exc)}); predict needs "
                        "features made by `wsip extract`") from None
    known = {f.name for f in fields(ExtractParams)}
    extract_params = ExtractParams(**{k: tuple(v) if k == "formats" else v for k, v in extract_record.items()
                                      if k in known})
    return patch_dir.parent.parent, PatchParams.from_dict(patch_record), extract_params


@torch.inference_mode()
def predict_bag(models: Sequence[tuple[torch.nn.Module, dict]], features: np.ndarray, coords: np.ndarray,
                device: torch.device) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """(mean probabilities (C,), mean attention (N,), per-fold probabilities) over the fold models."""
    x, c = torch.from_numpy(features).to(device), torch.from_numpy(coords).to(device)
    probs, attention = [], np.zeros(len(features))
    groups_by_key: dict[Any, Any] = {}
    for model, _ in models:
        key = getattr(model, "group_cache_key", None)
        if key not in groups_by_key:  # same grouping for every fold: compute once
            groups_by_key[key] = model.make_groups(features, coords)
        logits, attn = model(x, c, groups=groups_by_key[key])
        probs.append(torch.softmax(logits.float(), dim=-1)[0].cpu().numpy())
        if attn is not None:
            attention += attn.float().cpu().numpy() / len(models)
    mean = np.mean(probs, axis=0)
    return mean, attention, [p.tolist() for p in probs]


def predict(slides: Sequence[SlideSource], params: PredictParams = PredictParams(), *,
            out: str | Path | None = None) -> PredictResult:
    """Predict each slide with a trained run; callable from Python exactly as `wsip predict`."""
    run_dir = find_run(workspace_root(out), params.run)
    device = resolve_device(params.device)
    models = load_fold_models(run_dir, params.fold, device)
    meta = models[0][1]
    classes = tuple(meta["model"]["classes"])
    root, patch_params, extract_params = recorded_stage_params(Path(meta["features"]))
    patch_result = patch(slides, patch_params, out=root)
    patched = {o.slide_id: o for o in patch_result.outcomes}
    extract_params = replace(extract_params, device=params.device)
    extracted = extract(extract_params, out=root, slide_ids=[s.slide_id for s in slides])
    feature_dir = extracted.out_dir
    if feature_dir.resolve() != Path(meta["features"]).resolve():
        raise UserError(f"{feature_dir}: features differ from the run's ({meta['features']}); are the encoder "
                        "weights the ones the run was trained with?")
    failed = {o.slide_id: o.error for o in extracted.outcomes if o.status == "failed"}
    predictions = []
    for source in slides:
        sid = source.slide_id
        error = patched[sid].error if patched[sid].status in ("failed", "no_tissue") else failed.get(sid, "")
        if error:
            predictions.append(SlidePrediction(sid, "failed", error=error))
            continue
        h5_path = feature_dir / "h5_files" / f"{sid}.h5"
        features, coords = read_bag(h5_path)
        mean, attention, per_fold = predict_bag(models, features, coords, device)
        out_dir = root / "predictions"
        record = {"slide_id": sid, "slide_path": str(source.path), "run": str(run_dir), "classes": list(classes),
                  "probabilities": dict(zip(classes, mean.tolist(), strict=True)),
                  "predicted": classes[int(np.argmax(mean))], "folds": [m["fold"] for _, m in models],
                  "fold_probabilities": per_fold, "n_patches": len(features), "features": str(feature_dir)}
        json_path = out_dir / f"{sid}.json"
        write_json_atomic(json_path, record)
        heatmap_path = None
        if params.heatmap:
            size0 = int(feature_attrs(h5_path)["patch_size_level0"])
            with Slide(source.path, mpp=source.mpp) as slide:
                heatmap_path = render_heatmap(slide, coords, size0, attention, out_dir / f"{sid}_heatmap.png")
        predictions.append(SlidePrediction(sid, "done", record["probabilities"], record["predicted"], json_path,
                                           heatmap_path, patch_result.out_dir / "qc" / f"{sid}.jpg"))
    return PredictResult(run_dir, classes, predictions)
