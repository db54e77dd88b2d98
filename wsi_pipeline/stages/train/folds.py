"""One cross-validation fold: GMMamba's training protocol (docs/gmmamba.md §8), resumable.

Protocol, as the released code: one AdamW over all parameters (no groups, scheduler, clipping or AMP),
one bag per optimiser step, bag-level cross-entropy (or the model's own `training_loss`, see
`models.mil.registry`), training order reshuffled every epoch. After each
epoch (0-based) val is scored with F1 + AUC; for `epoch > select_after` a score strictly above the best
so far selects the epoch: test is evaluated then, its metrics kept and `best.pt` saved, and the patience
counter resets; any other epoch (the early ones included) increments the counter. Training stops once
`counter >= patience and epoch > min_epochs`, or after `epochs`. The fold's result is the test metrics at
the selected epoch. With a budget too small for any selection (`epochs <= select_after + 1`), the last
epoch is taken instead and `metrics.json` says so (`"selection": "last_epoch"`).

Reproducibility: fold k seeds python, numpy and torch with `seed + k` before building its model, so a
fold's result does not depend on which folds ran before it in the same process. `last.pt`, written
atomically after every epoch, holds everything the remaining epochs depend on (model, optimiser, the
selection state, the log, the RNG states and the shuffle generator), so a resumed fold continues the
exact run an uninterrupted one would have made.

A step whose loss is not finite (a diverging run: too high a learning rate, extreme features), or a model
whose val/test output is not finite, stops the fold with one ConfigError line naming the slide; the epoch is
not saved, so no NaN model is ever selected as `best.pt`. The fold's files (checkpoints, log, preds,
metrics.json) and their formats are `workspace/run_store.py`'s.
"""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipeline import faults
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.models.mil import bag_loss
from wsi_pipeline.models.mil.standardize import StandardizedInput
from wsi_pipeline.stages.train.bags import Bag
from wsi_pipeline.stages.train.config import OptimConfig
from wsi_pipeline.stages.train.metrics import SCALARS, classification_metrics, selection_score
from wsi_pipeline.workspace.layout import FoldDir
from wsi_pipeline.workspace.run_store import (
    ModelSpec,
    read_checkpoint,
    save_checkpoint,
    write_log,
    write_metrics,
    write_preds,
)

_FALLBACK_NOTE = "training ended before any epoch was eligible (epoch > select_after): last epoch used"
EpochHook = Callable[[int, dict[str, Any]], None]  # (epoch, log row) after each finished epoch


class NotFinite(ConfigError):
    """A loss or a model output that is NaN or infinite, naming the slide; `run_fold` adds where and the fix."""


@dataclass(frozen=True)
class FoldData:
    """What a fold trains on: slide ids per partition, labels (class indices) and the loaded bags."""

    train: Sequence[str]
    val: Sequence[str]
    test: Sequence[str]
    labels: dict[str, int]
    bags: dict[str, Bag]


@dataclass
class FoldState:
    """The selection state carried from epoch to epoch (and through `last.pt`)."""

    epoch: int = -1  # last finished epoch
    counter: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    best_val: dict[str, Any] | None = None
    best_test: dict[str, Any] | None = None
    best_test_probs: list[list[float]] | None = None
    best_val_probs: list[list[float]] | None = None  # for the Youden threshold (val_preds.csv)
    log: list[dict[str, Any]] = field(default_factory=list)

    def finished(self, optim: OptimConfig) -> bool:
        early_stop = self.counter >= optim.patience and self.epoch > optim.min_epochs
        return early_stop or self.epoch + 1 >= optim.epochs


def run_fold(
    fold: int,
    data: FoldData,
    *,
    spec: ModelSpec,
    optim: OptimConfig,
    seed: int,
    device: torch.device,
    out: FoldDir,
    meta: dict[str, Any],
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Train fold `fold` to completion (resuming from `out.last` if present); return metrics.json.

    `meta` (run name, features, seed, ...) is stored in the checkpoints next to the model spec.
    """
    seed_everything(seed + fold)
    model = spec.build().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    shuffle = torch.Generator().manual_seed(seed + fold)
    state = FoldState()
    last_path = out.last
    if last_path.is_file():
        state = _restore(last_path, model, optimizer, shuffle)
    elif isinstance(model, StandardizedInput):
        model.fit(data.bags[s].features for s in data.train)
    meta = {**meta, "fold": fold, "model": asdict(spec)}

    while not state.finished(optim):
        epoch = state.epoch + 1
        try:
            train_loss = train_epoch(model, optimizer, data, generator=shuffle, device=device)
            val_probs = predict_probs(model, data, data.val, device)
            val = classification_metrics([data.labels[s] for s in data.val], val_probs)
            score = selection_score(val)
            selected = epoch > optim.select_after and score > state.best_score
            if selected:
                _select(state, model, data, epoch=epoch, score=score, val=val, val_probs=val_probs, device=device)
        except NotFinite as exc:
            raise ConfigError(f"{out.dir}: fold {fold}, epoch {epoch}: {exc}; training diverged and this epoch "
                              f"was not saved: lower optim.lr (now {optim.lr:g}) or check that slide's features"
                              ) from None
        if selected:
            save_checkpoint(out.best, model, {**meta, "epoch": epoch, "val_score": score})
            state.counter = 0
        else:
            state.counter += 1
        state.epoch = epoch
        row = {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": val[k] for k in SCALARS}}
        state.log.append({**row, "val_score": score, "selected": int(selected)})
        _save_last(last_path, model, optimizer, shuffle, state, meta)
        write_log(out, state.log)
        if on_epoch is not None:
            on_epoch(epoch, state.log[-1])
    return _finish(state, model, data, spec=spec, device=device, out=out, meta=meta)


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: FoldData,
    *,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """One pass over the training bags in a freshly shuffled order; returns the mean loss.

    The loss is the model's own `training_loss` where it defines one (ACMIL, CLAM, DSMIL: the registry's
    contract), else bag cross-entropy. A loss that is not finite raises `NotFinite` before the step that
    would spread it into the weights.
    """
    model.train()
    total = 0.0
    for i in torch.randperm(len(data.train), generator=generator).tolist():
        slide_id = data.train[i]
        bag = data.bags[slide_id]
        logits, _ = model(bag.features.to(device), bag.coords.to(device), groups=bag.groups)
        loss = bag_loss(model, logits, torch.tensor([data.labels[slide_id]], device=device))
        value = loss.item()
        if not math.isfinite(value):
            raise NotFinite(f"the training loss on slide {slide_id} is {value}")
        optimizer.zero_grad(set_to_none=True)  # None, not 0: AdamW then skips never-used params (docs/gmmamba.md §4)
        loss.backward()
        optimizer.step()
        total += value
        faults.point("step")
    return total / len(data.train)


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, data: FoldData, ids: Sequence[str], device: torch.device) -> np.ndarray:
    """Class probabilities (len(ids), C) in eval mode."""
    model.eval()
    probs = []
    for slide_id in ids:
        bag = data.bags[slide_id]
        logits, _ = model(bag.features.to(device), bag.coords.to(device), groups=bag.groups)
        probs.append(torch.softmax(logits.float(), dim=-1)[0].cpu().numpy())
        if not np.isfinite(probs[-1]).all():
            raise NotFinite(f"the model's output on slide {slide_id} is {probs[-1].tolist()} (not finite)")
    return np.stack(probs).astype(np.float64)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _select(
    state: FoldState,
    model: torch.nn.Module,
    data: FoldData,
    *,
    epoch: int,
    score: float,
    val: dict[str, Any],
    val_probs: np.ndarray,
    device: torch.device,
) -> None:
    probs = predict_probs(model, data, data.test, device)
    state.best_score, state.best_epoch, state.best_val = score, epoch, val
    state.best_val_probs = val_probs.tolist()
    state.best_test = classification_metrics([data.labels[s] for s in data.test], probs)
    state.best_test_probs = probs.tolist()


def _finish(
    state: FoldState,
    model: torch.nn.Module,
    data: FoldData,
    *,
    spec: ModelSpec,
    device: torch.device,
    out: FoldDir,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write preds.csv and val_preds.csv, the log (a run killed between `last.pt` and `log.csv` of its final
    epoch resumes straight here) and, last (it marks the fold done), metrics.json."""
    write_log(out, state.log)
    selection = "best_val"
    if state.best_epoch < 0:  # no epoch was eligible: fall back to the last one
        selection = "last_epoch"
        val_probs = predict_probs(model, data, data.val, device)
        val = classification_metrics([data.labels[s] for s in data.val], val_probs)
        _select(state, model, data, epoch=state.epoch, score=selection_score(val), val=val, val_probs=val_probs,
                device=device)
        save_checkpoint(out.best, model, {**meta, "epoch": state.epoch, "val_score": state.best_score})
    write_preds(out, spec.classes, _pred_rows(spec, data, data.test, state.best_test_probs or []))
    if state.best_val_probs is not None:  # None only in a fold resumed from a checkpoint of an older wsip
        write_preds(out, spec.classes, _pred_rows(spec, data, data.val, state.best_val_probs), part="val")
    metrics = {
        "fold": meta["fold"],
        "selection": selection,
        **({"note": _FALLBACK_NOTE} if selection == "last_epoch" else {}),
        "selected_epoch": state.best_epoch,
        "epochs_run": state.epoch + 1,
        "val_score": state.best_score,
        "val": state.best_val,
        "test": state.best_test,
    }
    write_metrics(out, metrics)
    return metrics


def _save_last(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    shuffle: torch.Generator,
    state: FoldState,
    meta: dict[str, Any],
) -> None:
    rng = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": shuffle.get_state(),
    }
    save_checkpoint(path, model, meta, optimizer=optimizer.state_dict(), rng=rng, fold_state=asdict(state))


def _restore(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, shuffle: torch.Generator
) -> FoldState:
    try:
        ckpt = read_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError):  # never unpickled beyond tensors
        raise ConfigError(f"{path}: not a wsip checkpoint or unreadable; delete it to restart this fold from "
                          "its beginning, or pass --force") from None
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    kind, key, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    shuffle.set_state(rng["shuffle"])
    return FoldState(**ckpt["fold_state"])


def _numpy_state() -> tuple[Any, ...]:
    """numpy's global state with the key as a list, so the checkpoint loads with weights_only=True."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return kind, key.tolist(), pos, has_gauss, gauss


def _pred_rows(spec: ModelSpec, data: FoldData, ids: Sequence[str],
               probs: Sequence[Sequence[float]]) -> list[tuple[str, str, Sequence[float]]]:
    """(slide_id, true class, probabilities) rows of one partition, as `run_store.write_preds` takes them."""
    return [(s, spec.classes[data.labels[s]], p) for s, p in zip(ids, probs, strict=True)]
