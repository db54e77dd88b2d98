"""Location-based grouping (LG) of a bag's instances into sub-bags for GMMamba (docs/gmmamba.md §2).

The default is K-Means on the raw level-0 patch coordinates with G = 10 and sklearn's
``KMeans(n_clusters=G, random_state=0, n_init=1)`` (k-means++, one init, Lloyd: what the released code's
``n_init='auto'`` means), so the labels are deterministic and identical to the reference. The other
methods are the Table 6 ablations.

Output convention (the scan order inside GMMamba): group g holds the indices labelled g in ascending
original (h5) order, groups are listed in label order, and empty clusters are dropped.

Small bags (§2 "N < G makes K-Means fail"): the number of groups is clipped to the number of distinct
points being clustered (for the split methods: to N), so N < G gives fewer, non-empty groups and N = 1
gives one group of one instance.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.cluster import KMeans

from wsi_pipeline.models.mil.registry import check_choice

Grouping = Literal["kmeans", "sequential", "random", "feature_kmeans"]
GROUPINGS: tuple[str, ...] = ("kmeans", "sequential", "random", "feature_kmeans")


def group_cache_key(method: Grouping, n_groups: int, seed: int = 0) -> str:
    """Name under which a caller caches a slide's groups, e.g. ``kmeans_G10``.

    The seed is part of the key only for the seeded random split, the one method where it changes the
    result (K-Means always uses random_state 0, as the reference does).
    """
    _check_method(method)
    return f"random_G{n_groups}_s{seed}_unsorted" if method == "random" else f"{method}_G{n_groups}"


def make_groups(
    coords: np.ndarray,
    features: np.ndarray | None = None,
    *,
    method: Grouping = "kmeans",
    n_groups: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split a bag of N instances into at most ``n_groups`` index arrays (int64, ascending inside each).

    ``coords`` is (N, 2) level-0 px; ``features`` (N, D) is needed only for ``feature_kmeans``.
    """
    _check_method(method)
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    n = len(coords)
    if n == 0:
        raise ValueError("cannot group an empty bag (0 instances)")
    if method == "kmeans":
        return groups_from_labels(kmeans_labels(np.asarray(coords, dtype=np.float64), n_groups))
    if method == "feature_kmeans":
        if features is None:
            raise ValueError("grouping='feature_kmeans' needs the bag's features")
        return groups_from_labels(kmeans_labels(np.asarray(features), n_groups))
    if method == "sequential":
        return [g.astype(np.int64) for g in np.array_split(np.arange(n), min(n_groups, n))]
    perm = np.random.default_rng(seed).permutation(n)
    return [g.astype(np.int64) for g in np.array_split(perm, min(n_groups, n))]  # random order inside, as released


def kmeans_labels(points: np.ndarray, n_groups: int) -> np.ndarray:
    """Reference K-Means labels: k-means++ with one init, Lloyd, ``random_state=0`` (§2).

    G is clipped to the number of distinct points so that tiny bags (and bags with duplicated
    coordinates) neither fail nor produce empty clusters.
    """
    n_distinct = len(np.unique(points, axis=0))
    k = min(n_groups, n_distinct)
    if k == 1:
        return np.zeros(len(points), dtype=np.int64)
    km = KMeans(n_clusters=k, random_state=0, n_init=1, algorithm="lloyd")
    return km.fit_predict(points).astype(np.int64)


def groups_from_labels(labels: np.ndarray) -> list[np.ndarray]:
    """Group g = indices with label g in ascending order; groups in label order; empty labels dropped."""
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    return [g.astype(np.int64) for g in np.split(order, starts[1:])]


def _check_method(method: str) -> None:
    check_choice("grouping", method, GROUPINGS)
