"""`wsip train`: patient-level cross-validation (k-fold or Monte-Carlo) of a MIL model on extracted features.

`train(TrainParams(config="esca.yaml"))` does from Python exactly what `wsip train --cfg esca.yaml` does.
Everything about the config and the data is checked first (one :class:`ConfigError` line naming the file
and the fix); only then are bags loaded and folds trained, each by :func:`wsi_pipeline.stages.train.folds.run_fold`.

Outputs, in `<out>/runs/<name>/` (`workspace.layout.RunDir`): `config.yaml` (resolved), `features.json` (what
the features were made with, for `wsip predict`), `splits.csv`, `groups/` (cached instance groups),
`fold_<k>/{log.csv,preds.csv,val_preds.csv,best.pt,last.pt,metrics.json}`, `summary.csv`, `report.md`,
`evaluation.json` + `oof_predictions.csv` (pooled out-of-fold statistics with CIs, Youden threshold). One `wsip train`
writes a run at a time (a lock beside the run folder).

A model may fix options from the cohort before any fold (2dmamba's grid extent, `cohort_options`); they are
recorded with the model in the checkpoints, not in `config.yaml`.

Resume: running the same config again skips folds that have `metrics.json` and continues an interrupted
fold from its `last.pt`; the result equals an uninterrupted run. A run folder whose `config.yaml` or
`splits.csv` differs from the current config (other than `device` and `out`, which do not define the
experiment) is refused with a ConfigError naming the changed keys; `force=True` deletes it and starts over.
A finished run writes nothing when trained again (it works on a read-only workspace); a workspace that
cannot take a write it needs is one StorageError line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from wsi_pipeline.device import resolve_device
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.stages.train.bags import Bag, load_bags
from wsi_pipeline.stages.train.config import TrainConfig, config_from_dict, config_to_dict, dump_config, load_config
from wsi_pipeline.stages.train.evaluation import write_run_evaluation
from wsi_pipeline.stages.train.folds import FoldData, run_fold
from wsi_pipeline.stages.train.labels import LabelledSlides, load_labelled_slides
from wsi_pipeline.stages.train.metrics import SCALARS, summarize
from wsi_pipeline.stages.train.progress import FoldProgress, ProgressLike
from wsi_pipeline.stages.train.report import describe_splits, write_report
from wsi_pipeline.stages.train.rundir import open_run
from wsi_pipeline.stages.train.splits import make_monte_carlo_splits, make_splits, read_splits
from wsi_pipeline.workspace.files import storage_errors
from wsi_pipeline.workspace.layout import RunDir
from wsi_pipeline.workspace.run_store import ModelSpec, Splits, read_metrics, write_summary

__all__ = ["TrainParams", "TrainResult", "train"]
log = logging.getLogger(__name__)


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
    evaluation: dict[str, Any] | None = None  # evaluation.json: pooled out-of-fold metrics with CIs, Youden


def train(params: TrainParams, *, progress: ProgressLike | None = None) -> TrainResult:
    """Cross-validate the configured model; resumable (see module docstring)."""
    cfg = resolve_config(params)
    device = resolve_device(cfg.device, error=ConfigError)
    slides = load_labelled_slides(cfg)
    splits = splits_for(cfg, slides)
    with storage_errors(cfg.out), open_run(cfg, splits, force=params.force) as run:
        spec = ModelSpec(cfg.model.name, cfg.model.options, slides.in_dim, slides.classes, cfg.data.standardize)
        meta = {"run": cfg.name, "features": str(cfg.data.features), "seed": cfg.seed}
        todo = [k for k in splits.folds if not run.fold(k).metrics.is_file()]
        bags, spec = _load_bags(slides, splits, spec=spec, run=run) if todo else ({}, spec)
        labels = {s.slide_id: s.label for s in slides.slides}
        results, bar = [], FoldProgress(progress)
        for fold in splits.folds:
            if fold not in todo:
                results.append(FoldResult(fold, "done", read_metrics(run.fold(fold))))
                bar.skipped(fold)
                continue
            log.info("fold %d: training on %s", fold, device)
            data = FoldData(train=splits.ids(fold, "train"), val=splits.ids(fold, "val"),
                            test=splits.ids(fold, "test"), labels=labels, bags=bags)
            metrics = run_fold(fold, data, spec=spec, optim=cfg.optim, seed=cfg.seed, device=device,
                               out=run.fold(fold), meta=meta, on_epoch=bar.started(fold, total=cfg.optim.epochs))
            bar.finished(metrics)
            results.append(FoldResult(fold, "trained", metrics))
            log.info("fold %d: test %s", fold, {k: metrics["test"][k] for k in ("accuracy", "auc", "f1")})
        fold_metrics = [r.metrics for r in results]
        summary = summarize([m["test"] for m in fold_metrics])
        write_summary(run, fold_metrics, summary, SCALARS)
        evaluation = write_run_evaluation(run, slides, splits.folds)
        write_report(run.report, name=cfg.name, classes=slides.classes, folds=fold_metrics, summary=summary,
                     config_yaml=dump_config(cfg), splits=describe_splits(cfg.splits), evaluation=evaluation)
    return TrainResult(run.dir, slides.classes, results, summary, evaluation)


def resolve_config(params: TrainParams) -> TrainConfig:
    """The config with the params' overrides applied (and validated)."""
    cfg = params.config if isinstance(params.config, TrainConfig) else load_config(params.config)
    overrides: dict[str, Any] = {}
    if params.out is not None:
        overrides["out"] = Path(params.out).expanduser().resolve()
    if params.device is not None:
        overrides["device"] = params.device
    if not overrides:
        return cfg
    return config_from_dict({**config_to_dict(cfg), **overrides}, source=cfg.source)


def splits_for(cfg: TrainConfig, slides: LabelledSlides) -> Splits:
    """The config's splits file, or patient-level k-fold / Monte-Carlo splits of the labelled slides."""
    conf = cfg.splits
    if conf.file is not None:
        return read_splits(conf.file, known={s.slide_id: s.case_id for s in slides.slides})
    triples = [(s.slide_id, slides.classes[s.label], s.case_id) for s in slides.slides]
    if conf.mode == "monte_carlo":
        return make_monte_carlo_splits(triples, fractions=(conf.train, conf.val, conf.test), repeats=conf.repeats,
                                       seed=conf.seed, source=cfg.source)
    return make_splits(triples, folds=conf.folds, val_fraction=conf.val_fraction, seed=conf.seed, source=cfg.source)


def _load_bags(
    slides: LabelledSlides, splits: Splits, *, spec: ModelSpec, run: RunDir
) -> tuple[dict[str, Bag], ModelSpec]:
    """Bags of every slide in the splits, with groups cached under the model's group key, and the spec with
    the options the model fixes from this cohort (`cohort_options`, models/mil/registry.py) added."""
    used = {r.slide_id for r in splits.rows}
    h5_paths = {s.slide_id: s.h5_path for s in slides.slides if s.slide_id in used}
    probe = spec.build()
    key = probe.group_cache_key
    log.info("loading %d bags%s", len(h5_paths), f" (groups: {key})" if key else "")
    bags = load_bags(h5_paths, make_groups=probe.make_groups, cache_path=partial(run.group_cache, key) if key else None)
    fit = getattr(probe, "cohort_options", None)
    if fit is None:
        return bags, spec
    fixed = fit([b.coords.numpy() for b in bags.values()])
    if fixed:
        log.info("model options fixed from the cohort: %s", fixed)
    return bags, replace(spec, options={**spec.options, **fixed})
