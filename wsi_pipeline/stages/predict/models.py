"""A trained run as `wsip predict` uses it: which run, its fold models, and how its features were made."""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipeline.errors import UserError, one_line
from wsi_pipeline.stages.extract import ExtractParams
from wsi_pipeline.stages.patch import PatchParams
from wsi_pipeline.stages.train.folds import ModelSpec
from wsi_pipeline.workspace.layout import Layout, RunDir


def find_run(layout: Layout, run: str | Path | None) -> RunDir:
    """`run` as a folder or as a run name in the workspace; default: the run whose newest `best.pt` is newest."""
    if run is not None:
        given = Path(run)
        chosen = RunDir(given.resolve()) if given.is_dir() else layout.run(str(run))
        if not chosen.dir.is_dir():
            raise UserError(f"--run {run}: no such run folder or run name in {layout.root / 'runs'}; pass a "
                            "runs/<name> folder of a finished `wsip train`")
        return chosen
    runs = [r for r in layout.runs() if r.trained_folds()]
    if not runs:
        raise UserError(f"{layout.root / 'runs'}: no trained run; run `wsip train --cfg ...` first or pass --run")
    return max(runs, key=lambda r: max(f.best.stat().st_mtime for f in r.trained_folds()))


def load_fold_models(run: RunDir, fold: int | None, device: torch.device) -> list[tuple[torch.nn.Module, dict]]:
    """(model in eval mode, checkpoint meta) of every trained fold, or of fold `fold` only."""
    folds = run.trained_folds()
    if fold is not None:
        folds = [f for f in folds if f.dir == run.fold(fold).dir]
    if not folds:
        which = f"fold_{fold}/best.pt" if fold is not None else "fold_*/best.pt"
        raise UserError(f"{run.dir}: incomplete run (no {which}); finish `wsip train` or pick another --run/--fold")
    models = []
    for f in folds:
        try:
            with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before refusing it
                warnings.simplefilter("ignore", UserWarning)
                checkpoint = torch.load(f.best, map_location="cpu", weights_only=True)
            meta = checkpoint["meta"]
            model = ModelSpec(**{**meta["model"], "classes": tuple(meta["model"]["classes"])}).build()
            model.load_state_dict(checkpoint["model_state"])
        except pickle.UnpicklingError:  # weights_only refused it: code or objects we never save, never run
            raise UserError(f"{f.best}: not a wsip checkpoint (it pickles objects beyond tensors and numbers; "
                            "nothing in it was run); retrain this fold") from None
        except (OSError, KeyError, RuntimeError, TypeError, ValueError, UserError) as exc:
            raise UserError(f"{f.best}: unreadable checkpoint ({one_line(exc)}); retrain this fold") from None
        models.append((model.to(device).eval(), meta))
    return models


def recorded_stage_params(run: RunDir) -> tuple[dict[str, Any], PatchParams, ExtractParams]:
    """(the run's features record, its patch params, its extract params): how to process a new slide."""
    try:
        record = json.loads(run.features_record.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{run.features_record}: missing or unreadable ({one_line(exc)}); retrain the run with "
                        "this version of wsip") from None
    if not record.get("made_by_wsip"):
        raise UserError(f"{run.dir}: trained on features not made by `wsip extract` ({record.get('features')}); "
                        "predict cannot process new slides the same way: encode them with your tool instead")
    known = {f.name for f in fields(ExtractParams)}
    extract_params = ExtractParams(**{k: tuple(v) if k == "formats" else v for k, v in record.items() if k in known})
    return record, PatchParams.from_dict(record["patch_params"]), extract_params


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
