"""Bags for training: each slide's features + coords from its h5, and its cached instance groups.

A cohort's features fit in memory (156 ESCA slides × ~10k patches × 512 floats ≈ 3 GB at most, usually
far less), so every bag is read once per run and kept; epochs then cost no I/O.

Groups (GMMamba's location-based sub-bags, docs/gmmamba.md §2; 2dmamba's cell per patch, docs/mamba2d.md §2)
depend only on a slide's h5 and the model's grouping options, and K-Means per slide is the slow part of
loading, so they are cached on disk in the run folder:
`runs/<name>/groups/<group_cache_key>/<slide_id>.npz`. The run folder rather than the shared feature
set keeps `wsip train` from writing into another stage's outputs. Each file records the h5's size and
mtime; a rewritten h5 (re-extraction) no longer matches and its groups are recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.digests import file_fingerprint
from wsi_pipeline.errors import ConfigError, UserError
from wsi_pipeline.workspace.files import atomic_write
from wsi_pipeline.workspace.peer_features import read_bag

GroupFn = Callable[[np.ndarray, np.ndarray], "list[np.ndarray] | None"]


@dataclass(frozen=True)
class Bag:
    slide_id: str
    features: torch.Tensor  # (N, D) float32
    coords: torch.Tensor  # (N, 2) int64, level-0 top-left (x, y)
    groups: list[np.ndarray] | None  # instance indices per group, or None for models without groups


def load_bags(h5_paths: dict[str, Path], *, make_groups: GroupFn,
              cache_path: Callable[[str], Path] | None) -> dict[str, Bag]:
    """Read every slide once, with its groups (see `slide_groups`); `cache_path(slide_id)`: where its groups
    are cached (`RunDir.group_cache`), None: no disk cache."""
    bags = {}
    for slide_id, path in h5_paths.items():
        features, coords = read_bag(path)
        if not np.isfinite(features).all():
            bad = int((~np.isfinite(features)).any(axis=1).sum())
            raise ConfigError(f"{path}: {bad} patch(es) have NaN/inf features; re-extract this slide "
                              "(`wsip extract --force`) or drop it from the labels CSV")
        try:
            groups = slide_groups(path, features, coords, make_groups=make_groups,
                                  cache_path=None if cache_path is None else cache_path(slide_id))
        except UserError as exc:  # e.g. coords that do not fit the model's grid: name the slide
            raise type(exc)(f"{path}: {exc}") from None
        bags[slide_id] = Bag(slide_id, torch.from_numpy(features), torch.from_numpy(coords), groups)
    return bags


def slide_groups(
    h5_path: Path, features: np.ndarray, coords: np.ndarray, *, make_groups: GroupFn, cache_path: Path | None
) -> list[np.ndarray] | None:
    """The groups stored at `cache_path` if computed from this very h5, else computed (and stored)."""
    if cache_path is None:
        return make_groups(features, coords)
    fingerprint = file_fingerprint(h5_path)
    if cache_path.is_file():
        with np.load(cache_path) as stored:
            if str(stored["fingerprint"]) == fingerprint:
                return _unpack(stored["indices"], stored["offsets"])
    groups = make_groups(features, coords)
    if groups is not None:
        indices, offsets = _pack(groups)
        with atomic_write(cache_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, indices=indices, offsets=offsets, fingerprint=np.array(fingerprint))
    return groups


def _pack(groups: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged groups as one index array + start offsets (npz holds no ragged arrays)."""
    groups = [np.asarray(g, dtype=np.int64) for g in groups]
    offsets = np.cumsum([0] + [len(g) for g in groups], dtype=np.int64)
    return (np.concatenate(groups) if groups else np.zeros(0, np.int64)), offsets


def _unpack(indices: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [indices[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
