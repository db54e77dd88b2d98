"""The labelled slides a config describes, checked against the files before any training.

`load_labelled_slides(cfg)` reads the labels CSV, matches every slide to its features h5, reads each h5's
header (shape and attrs, no feature data), checks that features made by `wsip extract` still derive from
the current patching of their slide, and builds the model once, so every problem a config can have with
its data surfaces as one :class:`ConfigError` line naming the file and the fix, instead of an exception in
epoch 3 of fold 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py

from wsi_pipeline.errors import ConfigError, name_some
from wsi_pipeline.models.mil import create_model
from wsi_pipeline.stages.labels_csv import read_labels
from wsi_pipeline.stages.train.config import TrainConfig
from wsi_pipeline.workspace.coords_store import coords_attrs
from wsi_pipeline.workspace.h5_limits import check_declared_size
from wsi_pipeline.workspace.layout import feature_set_at
from wsi_pipeline.workspace.manifest import manifest_rows
from wsi_pipeline.workspace.peer_features import feature_folder, features_key


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    label: int  # index into LabelledSlides.classes
    case_id: str  # the patient; the slide id itself when the CSV has no case_id
    h5_path: Path


@dataclass(frozen=True)
class LabelledSlides:
    slides: tuple[SlideRecord, ...]
    classes: tuple[str, ...]
    in_dim: int


def load_labelled_slides(cfg: TrainConfig) -> LabelledSlides:
    """Everything `train` needs to know about the data, or a :class:`ConfigError`."""
    rows = read_labels(cfg.data.labels)
    classes = _class_order(rows, cfg.data.classes, labels_path=cfg.data.labels, source=cfg.source)
    folder = feature_folder(cfg.data.features)
    h5_dir = folder.h5_dir
    slides = tuple(
        SlideRecord(slide_id=sid, label=classes.index(label), case_id=case, h5_path=folder.h5(sid))
        for sid, label, case in rows
    )
    _check_h5_present(slides, h5_dir=h5_dir, labels_path=cfg.data.labels)
    headers = {s.slide_id: _h5_header(s.h5_path) for s in slides}
    in_dim = _feature_dim(slides, {sid: dim for sid, (dim, _) in headers.items()})
    check_fresh(cfg.data.features, {sid: attrs for sid, (_, attrs) in headers.items()})
    check_model(cfg, in_dim=in_dim, n_classes=len(classes))
    return LabelledSlides(slides=slides, classes=tuple(classes), in_dim=in_dim)


def check_model(cfg: TrainConfig, *, in_dim: int, n_classes: int) -> None:
    """Build the model once so an unknown or bad option fails now, not in the first epoch."""
    try:
        create_model(cfg.model.name, in_dim=in_dim, n_classes=n_classes, **cfg.model.options)
    except ImportError:
        raise  # a broken install, not a config problem
    except Exception as e:  # any failure to build from the user's options is a config problem
        options = ", ".join(cfg.model.options) or "none"
        raise ConfigError(
            f"{cfg.source}: model '{cfg.model.name}' rejected its options ({options}): {e} "
            "(fix the keys under `model:`)"
        ) from None


def _class_order(
    rows: Sequence[tuple[str, str, str]], classes: list[str] | None, *, labels_path: Path, source: str
) -> list[str]:
    found = sorted({label for _, label, _ in rows})
    if len(found) < 2:
        raise ConfigError(f"{labels_path}: every slide is labelled {found[0]!r}; classification needs slides of "
                          "two or more classes")
    if classes is None:
        return found
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{source}: data.classes lists a class twice: {classes} (list each class once)")
    unknown = [label for label in found if label not in classes]
    if unknown:
        raise ConfigError(
            f"{labels_path}: label(s) {name_some(unknown)} not in data.classes {classes} "
            "(add them to data.classes or fix the CSV)"
        )
    return list(classes)


def _check_h5_present(slides: Sequence[SlideRecord], *, h5_dir: Path, labels_path: Path) -> None:
    missing = [s.slide_id for s in slides if not s.h5_path.is_file()]
    if missing:
        raise ConfigError(
            f"{labels_path}: {len(missing)} slide(s) have no features in {h5_dir}: {name_some(missing)} "
            "(run `wsip extract` for them or drop them from the CSV)"
        )


def _feature_dim(slides: Sequence[SlideRecord], dims: dict[str, int]) -> int:
    """The common feature dim D; a mismatch names two slides and their dims."""
    first: tuple[str, int] | None = None
    for slide in slides:
        dim = dims[slide.slide_id]
        if first is None:
            first = (slide.slide_id, dim)
        elif dim != first[1]:
            raise ConfigError(
                f"{slide.h5_path}: feature dim {dim} but slide {first[0]} has {first[1]}; all slides must "
                "come from the same encoder (re-extract or point data.features at one feature set)"
            )
    assert first is not None
    return first[1]


def _h5_header(path: Path) -> tuple[int, dict]:
    """(feature dim, attrs) from an h5's header, checking its datasets' shapes."""
    try:
        with h5py.File(path, "r") as f:
            key = features_key(f)
            if key is None or "coords" not in f:
                raise ConfigError(f"{path}: needs datasets 'features' (or STAMP's 'feats') and 'coords' "
                                  "(re-run `wsip extract`)")
            for name in (key, "coords"):
                check_declared_size(f[name], path)
            features, coords, attrs = f[key].shape, f["coords"].shape, dict(f.attrs)
    except OSError as e:
        raise ConfigError(f"{path}: unreadable h5 ({e}); re-run `wsip extract` for this slide") from None
    if len(features) != 2 or features[0] == 0 or coords != (features[0], 2):
        raise ConfigError(
            f"{path}: features {features} / coords {coords} are not (N>0, D) / (N, 2) (re-run `wsip extract`)"
        )
    return int(features[1]), attrs


def check_fresh(features_dir: Path, attrs: dict[str, dict]) -> None:
    """Features made by `wsip extract` must still derive from the current coords of their slide.

    A slide that failed its latest patching (a truncated or replaced file) has no current coords any more;
    its old features are then stale and training on them is refused. Features from other tools (no
    `params.json` beside them) carry no such record and are taken as they are.
    """
    parsed = feature_set_at(features_dir)
    if parsed is None or not parsed[1].params.is_file():
        return
    layout, feature_set = parsed
    patch_set = layout.patch_set(feature_set.patch_config)
    stale = []
    for slide_id, feature_attrs in attrs.items():
        current = coords_attrs(patch_set.coords(slide_id))
        if current is None or (current.get("cache_key"), current.get("slide_fingerprint")) != (
                feature_attrs.get("coords_cache_key"), feature_attrs.get("slide_fingerprint")):
            stale.append(slide_id)
    if stale:
        rows = manifest_rows(patch_set.manifest)
        why = rows.get(stale[0], {}).get("error") or "its coords changed"
        raise ConfigError(
            f"{feature_set.h5_dir}: features of {len(stale)} slide(s) no longer match their slide's patching: "
            f"{name_some(stale)} ({stale[0]}: {why}); fix or drop these slides, then rerun `wsip patch` and "
            "`wsip extract`")
