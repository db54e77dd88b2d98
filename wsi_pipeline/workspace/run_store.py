"""A training run's files, read and written in one place: what `wsip train` writes and `wsip predict`,
`wsip report` and `wsip status` read back (paths from `layout.RunDir` / `layout.FoldDir`).

- `config.yaml` (the resolved config, text), `features.json` (how the features were made), `splits.csv`
  (`fold,split,slide_id`; for Monte-Carlo splits "fold" is the repeat index);
- per fold: `best.pt` / `last.pt` checkpoints (`torch.load(path, weights_only=True)` reads both): `best.pt` =
  {"model_state": state_dict, "meta": {"model": ModelSpec fields, "fold", "epoch", "val_score", "run",
  "features", "seed"}}; `last.pt` adds "optimizer", "rng" and "fold_state" (see stages/train/folds.py);
  `log.csv`, `preds.csv`, and `metrics.json`, written last (it marks the fold finished). metrics.json is strict
  JSON: an undefined metric (e.g. AUC with one class) is written as null and read back as NaN;
- `summary.csv`: one row per fold, then `mean` and `std` rows.

torch is imported only where a checkpoint is read or built, so `wsip status` stays light.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_pipeline.errors import ConfigError, UserError, one_line
from wsi_pipeline.workspace.csv_text import decoded_lines
from wsi_pipeline.workspace.files import (
    atomic_write,
    save_torch_atomic,
    write_json_atomic,
    write_json_if_changed,
    write_text_if_changed,
)
from wsi_pipeline.workspace.layout import FoldDir, RunDir

if TYPE_CHECKING:
    import torch

SPLIT_COLUMNS = ("fold", "split", "slide_id")
PARTS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model; stored as `meta["model"]` in the checkpoints."""

    name: str
    options: dict[str, Any]
    in_dim: int
    classes: tuple[str, ...]
    standardize: bool = False  # z-score features with the fold's training statistics (data.standardize)

    @classmethod
    def from_meta(cls, model: Mapping[str, Any]) -> ModelSpec:
        return cls(**{**model, "classes": tuple(model["classes"])})

    def build(self) -> torch.nn.Module:
        from wsi_pipeline.models.mil import create_model  # lazy: reading run files needs no torch
        from wsi_pipeline.models.mil.standardize import StandardizedInput

        model = create_model(self.name, in_dim=self.in_dim, n_classes=len(self.classes), **self.options)
        return StandardizedInput(model, self.in_dim) if self.standardize else model


def save_checkpoint(path: Path, model: torch.nn.Module, meta: Mapping[str, Any], **extra: Any) -> None:
    """`best.pt` (model and meta) or, with `extra` (optimizer, rng, fold_state), `last.pt`; atomically."""
    save_torch_atomic(path, {"model_state": model.state_dict(), **extra, "meta": dict(meta)})


def read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before refusing it
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def load_best(fold: FoldDir) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the fold's selected model with its weights, on CPU, in train mode; the checkpoint's meta)."""
    try:
        checkpoint = read_checkpoint(fold.best)
        meta = checkpoint["meta"]
        model = ModelSpec.from_meta(meta["model"]).build()
        model.load_state_dict(checkpoint["model_state"])
    except pickle.UnpicklingError:  # weights_only refused it: code or objects we never save, never run
        raise UserError(f"{fold.best}: not a wsip checkpoint (it pickles objects beyond tensors and numbers; "
                        "nothing in it was run); retrain this fold") from None
    except (OSError, KeyError, RuntimeError, TypeError, ValueError, UserError) as exc:
        raise UserError(f"{fold.best}: unreadable checkpoint ({one_line(exc)}); retrain this fold") from None
    return model, meta


# ------------------------------------------------------------------------------------------ fold files


def write_metrics(fold: FoldDir, metrics: Mapping[str, Any]) -> None:
    write_json_atomic(fold.metrics, metrics)


def read_metrics(fold: FoldDir) -> dict[str, Any]:
    """A finished fold's metrics.json as training returned it: null (an undefined metric) back to NaN."""
    metrics = json.loads(fold.metrics.read_text())
    for part in ("val", "test"):
        for name, value in (metrics.get(part) or {}).items():
            if value is None:
                metrics[part][name] = math.nan
    return metrics


def finished_folds(run: RunDir) -> list[FoldDir]:
    """Trained folds whose metrics.json is written, in fold order."""
    return [f for f in run.trained_folds() if f.metrics.is_file()]


def write_log(fold: FoldDir, rows: Sequence[Mapping[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_if_changed(fold.log, text.getvalue())


def write_preds(fold: FoldDir, classes: Sequence[str], rows: Sequence[tuple[str, str, Sequence[float]]],
                part: str = "test") -> None:
    """`rows`: (slide_id, true class, class probabilities) of the fold's `part` ("test": preds.csv, "val":
    val_preds.csv, what a validation-picked threshold reads); probabilities written with `repr` (exact)."""
    with atomic_write(fold.preds if part == "test" else fold.val_preds) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", *(f"prob_{c}" for c in classes)])
        for slide_id, label, probs in rows:
            writer.writerow([slide_id, label, *(repr(p) for p in probs)])


def read_log(fold: FoldDir) -> list[dict[str, str]]:
    return read_csv(fold.log)


def read_preds(fold: FoldDir) -> list[dict[str, str]]:
    return read_csv(fold.preds)


# ------------------------------------------------------------------------------------------- run files


def write_config(run: RunDir, text: str) -> None:
    write_text_if_changed(run.config, text)


def read_config_text(run: RunDir) -> str:
    """The resolved config.yaml as written, or "" before training wrote one."""
    return run.config.read_text() if run.config.is_file() else ""


def write_features_record(run: RunDir, record: Mapping[str, Any]) -> None:
    write_json_if_changed(run.features_record, record)


def read_features_record(run: RunDir) -> dict[str, Any]:
    try:
        return json.loads(run.features_record.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{run.features_record}: missing or unreadable ({one_line(exc)}); retrain the run with "
                        "this version of wsip") from None


def write_summary(run: RunDir, folds: Sequence[Mapping[str, Any]], summary: Mapping[str, tuple[float, float]],
                  scalars: Sequence[str]) -> None:
    """One row per fold (its metrics.json: selection and the test `scalars`), then the mean and std rows."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(("fold", "selection", "selected_epoch", *scalars))
    for m in folds:
        writer.writerow([m["fold"], m["selection"], m["selected_epoch"], *(m["test"][k] for k in scalars)])
    for i, row_name in enumerate(("mean", "std")):
        writer.writerow([row_name, "", "", *(summary[k][i] for k in scalars)])
    write_text_if_changed(run.summary, text.getvalue())


def read_summary(run: RunDir) -> dict[str, tuple[str, str]]:
    """metric -> (mean, std) as written in summary.csv; empty while the run is still training."""
    rows = {r["fold"]: r for r in read_csv(run.summary)}
    if "mean" not in rows or "std" not in rows:
        return {}
    return {k: (rows["mean"][k], rows["std"][k]) for k in rows["mean"]
            if k not in ("fold", "selection", "selected_epoch")}


# ---------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitRow:
    fold: int
    split: str  # train | val | test
    slide_id: str


@dataclass(frozen=True)
class Splits:
    rows: tuple[SplitRow, ...]

    @property
    def folds(self) -> list[int]:
        return sorted({r.fold for r in self.rows})

    def ids(self, fold: int, split: str) -> list[str]:
        return [r.slide_id for r in self.rows if r.fold == fold and r.split == split]


def parse_splits_csv(path: Path) -> Splits:
    """The rows of a `fold,split,slide_id` CSV (a run's splits.csv or a user's splits file), format-checked."""
    if not path.is_file():
        raise ConfigError(f"{path}: splits file not found (fix splits.file)")
    reader = csv.DictReader(decoded_lines(path))
    reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    if not set(SPLIT_COLUMNS) <= set(reader.fieldnames):
        raise ConfigError(f"{path}: needs columns fold,split,slide_id (found: {', '.join(reader.fieldnames)})")
    return Splits(
        tuple(
            _parse_row(path, reader.line_num, *((r.get(k) or "").strip() for k in SPLIT_COLUMNS))
            for r in reader
            if any(v.strip() for v in r.values() if isinstance(v, str))
        )
    )


def write_splits(splits: Splits, path: Path) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows((r.fold, r.split, r.slide_id) for r in splits.rows)


def split_sizes(run: RunDir) -> list[tuple[int, dict[str, int]]]:
    """(fold, {split: slides}) from the run's splits.csv, in fold order; [] before training wrote it."""
    sizes: dict[int, dict[str, int]] = {}
    for row in parse_splits_csv(run.splits).rows if run.splits.is_file() else ():
        split = sizes.setdefault(row.fold, dict.fromkeys(PARTS, 0))
        split[row.split] = split.get(row.split, 0) + 1
    return sorted(sizes.items())


def _parse_row(path: Path, line: int, fold: str, split: str, slide_id: str) -> SplitRow:
    if split not in PARTS or not slide_id or not fold.lstrip("-").isdigit():
        raise ConfigError(
            f"{path}: line {line} ({fold},{split},{slide_id}) is not <int fold>,<train|val|test>,<slide_id>"
        )
    return SplitRow(int(fold), split, slide_id)


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV the run wrote, or [] when it is not there (yet)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def recorded_youden(run: RunDir) -> float:
    """The run's Youden threshold, or a UserError saying why there is none."""
    try:
        youden = json.loads(run.evaluation.read_text())["youden"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise UserError(f"{run.evaluation}: no recorded Youden threshold (a run trained by an older wsip); run "
                        "`wsip train` on its config again to record it, or pass --threshold NUMBER") from None
    if youden.get("threshold") is None:
        raise UserError(f"{run.evaluation}: no Youden threshold: {youden.get('reason')}; pass --threshold NUMBER")
    return float(youden["threshold"])
