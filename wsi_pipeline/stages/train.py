"""`wsip train`: patient-level cross-validation of a MIL model on extracted features.

`train(TrainParams(config="esca.yaml"))` does from Python exactly what `wsip train --cfg esca.yaml` does.
Everything about the config and the data is checked first (one :class:`ConfigError` line naming the file
and the fix); only then are bags loaded and folds trained, each by :func:`wsi_pipeline.trainer.run_fold`.

Outputs, in `<out>/runs/<name>/`: `config.yaml` (resolved), `splits.csv`, `groups/` (cached instance
groups), `fold_<k>/{log.csv,preds.csv,best.pt,last.pt,metrics.json}`, `summary.csv`, `report.md`.

Resume: running the same config again skips folds that have `metrics.json` and continues an interrupted
fold from its `last.pt`; the result equals an uninterrupted run. A run folder whose `config.yaml` or
`splits.csv` differs from the current config (other than `device` and `out`, which do not define the
experiment) is refused with a ConfigError naming the changed keys; `force=True` deletes it and starts over.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from wsi_pipeline.bags import Bag, load_bags
from wsi_pipeline.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from wsi_pipeline.dataset import Cohort, load_cohort
from wsi_pipeline.device import resolve_device
from wsi_pipeline.metrics import summarize
from wsi_pipeline.report import write_report, write_summary_csv
from wsi_pipeline.splits import Splits, make_splits, parse_splits_csv, read_splits, write_splits
from wsi_pipeline.trainer import EpochHook, FoldData, ModelSpec, run_fold
from wsi_pipeline.workspace import write_text_atomic

log = logging.getLogger(__name__)
_NOT_EXPERIMENT = ("device", "out")  # keys that may change between a run and its resume


class ProgressLike(Protocol):
    """The part of `rich.progress.Progress` the stage uses (one task per fold, advanced per epoch).

    Tasks carry a `status` field, so a `TextColumn("{task.fields[status]}")` can show it.
    """

    def add_task(self, description: str, *, total: float | None = ..., **fields: Any) -> Any: ...

    def update(self, task_id: Any, **kwargs: Any) -> None: ...


@dataclass
class TrainParams:
    config: str | Path | TrainConfig  # YAML path, or an already loaded config
    out: str | Path | None = None  # overrides the config's workspace root (CLI --out)
    device: str | None = None  # overrides the config's device: auto | cpu | cuda[:i]
    force: bool = False  # delete an existing run with this name and start over


@dataclass(frozen=True)
class FoldResult:
    fold: int
    status: str  # "trained" (this call finished it) or "done" (finished by an earlier call)
    metrics: dict[str, Any]  # the fold's metrics.json: selection, selected_epoch, val, test


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    classes: tuple[str, ...]
    folds: list[FoldResult]
    summary: dict[str, tuple[float, float]]  # metric -> (mean, std with ddof=0) of the folds' test metrics


def train(params: TrainParams, *, progress: ProgressLike | None = None) -> TrainResult:
    """Cross-validate the configured model; resumable (see module docstring)."""
    cfg = resolve_config(params)
    device = resolve_device(cfg.device, error=ConfigError)
    cohort = load_cohort(cfg)
    splits = cohort_splits(cfg, cohort)
    run_dir = cfg.run_dir
    prepare_run_dir(cfg, splits, force=params.force)

    spec = ModelSpec(cfg.model.name, cfg.model.options, cohort.in_dim, cohort.classes)
    meta = {"run": cfg.name, "features": str(cfg.data.features), "seed": cfg.seed}
    todo = [k for k in splits.folds if not (run_dir / f"fold_{k}" / "metrics.json").is_file()]
    bags = _load_bags(cohort, splits, spec=spec, run_dir=run_dir) if todo else {}
    labels = {s.slide_id: s.label for s in cohort.slides}

    results, bar = [], _FoldProgress(progress)
    for fold in splits.folds:
        fold_dir = run_dir / f"fold_{fold}"
        if fold not in todo:
            results.append(FoldResult(fold, "done", json.loads((fold_dir / "metrics.json").read_text())))
            bar.skipped(fold)
            continue
        log.info("fold %d: training on %s", fold, device)
        data = FoldData(
            train=splits.ids(fold, "train"),
            val=splits.ids(fold, "val"),
            test=splits.ids(fold, "test"),
            labels=labels,
            bags=bags,
        )
        on_epoch = bar.started(fold, total=cfg.optim.epochs)
        metrics = run_fold(
            fold,
            data,
            spec=spec,
            optim=cfg.optim,
            seed=cfg.seed,
            device=device,
            out_dir=fold_dir,
            meta=meta,
            on_epoch=on_epoch,
        )
        bar.finished(metrics)
        results.append(FoldResult(fold, "trained", metrics))
        log.info("fold %d: test %s", fold, {k: metrics["test"][k] for k in ("accuracy", "auc", "f1")})

    fold_metrics = [r.metrics for r in results]
    summary = summarize([m["test"] for m in fold_metrics])
    write_summary_csv(run_dir / "summary.csv", fold_metrics, summary)
    write_report(
        run_dir / "report.md",
        name=cfg.name,
        classes=cohort.classes,
        folds=fold_metrics,
        summary=summary,
        config_yaml=dump_config(cfg),
    )
    return TrainResult(run_dir, cohort.classes, results, summary)


def resolve_config(params: TrainParams) -> TrainConfig:
    """The config with the params' overrides applied (and validated)."""
    cfg = params.config if isinstance(params.config, TrainConfig) else load_config(params.config)
    overrides: dict[str, Any] = {}
    if params.out is not None:
        overrides["out"] = Path(params.out).absolute()
    if params.device is not None:
        overrides["device"] = params.device
    if not overrides:
        return cfg
    return config_from_dict({**config_to_dict(cfg), **overrides}, source=cfg.source)


def cohort_splits(cfg: TrainConfig, cohort: Cohort) -> Splits:
    if cfg.splits.file is not None:
        return read_splits(cfg.splits.file, known={s.slide_id: s.case_id for s in cohort.slides})
    triples = [(s.slide_id, cohort.classes[s.label], s.case_id) for s in cohort.slides]
    return make_splits(
        triples,
        folds=cfg.splits.folds,
        val_fraction=cfg.splits.val_fraction,
        seed=cfg.splits.seed,
        source=cfg.source,
    )


def prepare_run_dir(cfg: TrainConfig, splits: Splits, *, force: bool) -> None:
    """Create the run folder, or check that the one there belongs to this very experiment."""
    run_dir = cfg.run_dir
    if force and run_dir.exists():
        log.warning("removing existing run %s (force)", run_dir)
        shutil.rmtree(run_dir)
    config_path, splits_path = run_dir / "config.yaml", run_dir / "splits.csv"
    if config_path.is_file():
        changed = _changed_keys(yaml.safe_load(config_path.read_text()) or {}, config_to_dict(cfg))
        if changed:
            raise ConfigError(
                f"{config_path}: run '{cfg.name}' was started with a different config (changed: "
                f"{', '.join(changed)}); use a new `name`, or --force (force=True) to discard that run"
            )
    if splits_path.is_file() and parse_splits_csv(splits_path).rows != splits.rows:
        raise ConfigError(
            f"{splits_path}: the splits changed since run '{cfg.name}' started (labels CSV or splits file "
            "edited); use a new `name`, or --force (force=True) to discard that run"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path, dump_config(cfg))
    write_splits(splits, splits_path)


def _changed_keys(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    flat_prev, flat_cur = _flatten(previous), _flatten(current)
    keys = sorted(set(flat_prev) | set(flat_cur))
    return [k for k in keys if k.split(".")[0] not in _NOT_EXPERIMENT and flat_prev.get(k) != flat_cur.get(k)]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _load_bags(cohort: Cohort, splits: Splits, *, spec: ModelSpec, run_dir: Path) -> dict[str, Bag]:
    """Bags of every slide in the splits, with groups cached under the model's group key."""
    used = {r.slide_id for r in splits.rows}
    h5_paths = {s.slide_id: s.h5_path for s in cohort.slides if s.slide_id in used}
    probe = spec.build()
    key = probe.group_cache_key
    log.info("loading %d bags%s", len(h5_paths), f" (groups: {key})" if key else "")
    return load_bags(h5_paths, make_groups=probe.make_groups, cache_dir=run_dir / "groups" / key if key else None)


class _FoldProgress:
    """The stage's events on a rich-like progress: a task "fold k" per fold, advanced per epoch, with a
    `status` field (loss and val score while training, the outcome at the end); a no-op without one."""

    def __init__(self, progress: ProgressLike | None) -> None:
        self.progress = progress
        self.task: Any = None

    def skipped(self, fold: int) -> None:
        if self.progress is not None:
            self.progress.add_task(f"fold {fold}", total=1, completed=1, status="done earlier")

    def started(self, fold: int, *, total: int) -> EpochHook | None:
        if self.progress is None:
            return None
        progress = self.progress
        task = self.task = progress.add_task(f"fold {fold}", total=total, status="")

        def on_epoch(epoch: int, row: dict[str, Any]) -> None:
            status = f"loss {row['train_loss']:.3f} · val F1+AUC {row['val_score']:.3f}"
            progress.update(task, completed=epoch + 1, status=status)

        return on_epoch

    def finished(self, metrics: dict[str, Any]) -> None:
        """An early stop ends the bar where training ended, rather than leaving it part-filled."""
        if self.progress is not None:
            epochs = metrics["epochs_run"]
            status = f"selected epoch {metrics['selected_epoch']} · test AUC {metrics['test']['auc']:.3f}"
            self.progress.update(self.task, total=epochs, completed=epochs, status=status)
