"""A training run's folder: one writer at a time, and only for the experiment it was started with.

`open_run` takes the run's lock (a second `wsip train` of the same run, or a `--force` against a run in
progress, is refused with one line), then creates the folder or checks that the one there belongs to this
very experiment: a changed config (other than `device` and `out`, which do not define the experiment) or
changed splits are refused, naming what changed; `force` deletes the run and starts over. A run already
finished with exactly this config, and no lock beside it (not even a dead writer's), is opened without
taking the lock: nothing will be written (a read-only workspace works), and reading finished files needs
no exclusion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.stages.train.config import TrainConfig, config_from_dict, config_to_dict, dump_config
from wsi_pipeline.workspace.files import json_text, remove_stale_temps
from wsi_pipeline.workspace.layout import Layout, RunDir, feature_set_at
from wsi_pipeline.workspace.locks import OwnerLock
from wsi_pipeline.workspace.peer_features import feature_folder
from wsi_pipeline.workspace.run_store import (
    Splits,
    parse_splits_csv,
    read_config_text,
    write_config,
    write_features_record,
    write_splits,
)

log = logging.getLogger(__name__)
_NOT_EXPERIMENT = ("device", "out")  # keys that may change between a run and its resume


@contextlib.contextmanager
def open_run(cfg: TrainConfig, splits: Splits, *, force: bool) -> Iterator[RunDir]:
    """The prepared run folder, held exclusively for the duration of the block (unless finished as is)."""
    run = cfg.run
    if not force and not run.lock.exists() and _finished_as_is(cfg, splits, run):
        remove_stale_temps(*run.output_dirs())
        yield run
        return
    lock = OwnerLock(run.lock)
    if not lock.acquire():
        holder = lock.holder() or {}
        raise ConfigError(
            f"{run.dir}: run '{cfg.name}' is being trained by another process (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}); wait for it to finish, or use another `name`")
    with lock:
        _prepare(cfg, splits, run, force=force)
        yield run


def _prepare(cfg: TrainConfig, splits: Splits, run: RunDir, *, force: bool) -> None:
    if force and run.dir.exists():
        log.warning("removing existing run %s (force)", run.dir)
        shutil.rmtree(run.dir)
    if run.config.is_file():
        changed = _changed_keys(_as_resolved_now(yaml.safe_load(read_config_text(run)) or {}), config_to_dict(cfg))
        if changed:
            raise ConfigError(
                f"{run.config}: run '{cfg.name}' was started with a different config (changed: "
                f"{', '.join(changed)}); use a new `name`, or --force (force=True) to discard that run"
            )
    if run.splits.is_file() and parse_splits_csv(run.splits).rows != splits.rows:
        raise ConfigError(
            f"{run.splits}: the splits changed since run '{cfg.name}' started (labels CSV or splits file "
            "edited); use a new `name`, or --force (force=True) to discard that run"
        )
    run.dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(*run.output_dirs(), *Layout(cfg.out).staging_dirs())
    write_config(run, dump_config(cfg))
    if not run.splits.is_file():  # else equal to `splits` (checked above)
        write_splits(splits, run.splits)
    write_features_record(run, features_record(cfg))


def _finished_as_is(cfg: TrainConfig, splits: Splits, run: RunDir) -> bool:
    """Every fold finished, and `_prepare` would write nothing: same config text, splits and features record."""
    def same(path: Path, text: str) -> bool:
        return path.is_file() and path.read_text() == text

    return (all(run.fold(k).metrics.is_file() for k in splits.folds) and same(run.config, dump_config(cfg))
            and same(run.features_record, json_text(features_record(cfg))) and run.splits.is_file()
            and parse_splits_csv(run.splits).rows == splits.rows)


def features_record(cfg: TrainConfig) -> dict[str, Any]:
    """What the run's features were made with (the feature set's own params.json: patch + extract params,
    weights sha256), so `wsip predict` can process a new slide the same way from the run alone."""
    parsed = feature_set_at(cfg.data.features)
    if parsed is None or not parsed[1].params.is_file():
        layout = feature_folder(cfg.data.features).describe()
        return {"features": str(cfg.data.features), "made_by_wsip": False, "layout": layout}
    _, feature_set = parsed
    return {"features": str(cfg.data.features), "made_by_wsip": True, "feature_set": feature_set.name,
            **json.loads(feature_set.params.read_text())}


def _as_resolved_now(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config as the current schema resolves it, so a key added since (with its default,
    e.g. `splits.mode: kfold`) does not read as a changed experiment; as stored if it no longer validates."""
    try:
        return config_to_dict(config_from_dict(stored))
    except ConfigError:
        return stored


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
