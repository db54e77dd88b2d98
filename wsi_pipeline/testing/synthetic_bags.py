"""Generated MIL feature cohorts with a known, sparse instance-level signal (the quality benchmark's tasks).

Each bag imitates what `wsip patch` + `wsip extract` write for one slide:

- **coords**: level-0 top-left corners of 256 px patches on a grid, covering one random tissue blob (the
  ``n`` top cells of a smooth random score minus a radial falloff, so shapes are irregular and sometimes
  fragmented), listed in RASTER order (sorted by y, then x), the h5 row order of real patching;
- **features**: non-negative and spatially smooth, like ReLU/avg-pooled CNN features, where neighbouring
  patches resemble each other: ``relu(mu + bag offset + W·L(p) + S_d(p) + noise)`` with ``L`` a few shared
  smooth latent "tissue" fields (mixed into all dims by a cohort-wide ``W``), ``S_d`` an independent
  smooth field per dim, and i.i.d. noise;
- **signal**: a positive bag has a few "positive" instances whose pre-ReLU features are shifted by
  ``shift`` on a cohort-wide set of ``signal_dims`` of the ``dim`` dims; negatives have none.

Tasks (``TASKS``), all with ``label = 1`` iff the bag holds positive instances:

- ``"a"`` sparse spatial clusters: 2 compact clusters (nearest cells around random centres) holding 1–3%
  of the bag's instances;
- ``"b"`` dispersed: the same 1–3% as single instances scattered at random over the tissue;
- ``"c"`` regions of different sizes: 3–5 compact regions, sizes from a Dirichlet(0.7) split of 2–6%.

Everything is a pure function of ``(task, n_bags, seed)`` and the :class:`CohortParams`; bags alternate
labels (even index negative, odd positive) so every cohort is balanced. ``make_cohort`` is the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

PATCH_PX = 256
TASKS: dict[str, str] = {
    "a": "sparse spatial clusters (2 clusters, 1-3% of instances)",
    "b": "dispersed single positive instances (1-3%)",
    "c": "several positive regions of different sizes (3-5 regions, 2-6%)",
}


@dataclass(frozen=True)
class CohortParams:
    """Knobs of the generator; the defaults are the benchmark's cohorts."""

    dim: int = 512
    signal_dims: int = 32
    shift: float = 2.0  # added to the pre-ReLU value of each signal dim of a positive instance
    min_instances: int = 200
    max_instances: int = 1000
    latent_fields: int = 8  # shared smooth "tissue" fields mixed into every dim
    latent_scale: float = 0.8
    field_scale: float = 0.6  # per-dim smooth field
    noise_scale: float = 0.5  # per-instance i.i.d. noise
    bag_offset_scale: float = 0.3  # per-bag, per-dim offset (stain / scanner batch effect)
    smooth_cells: tuple[float, float] = (1.5, 4.0)  # Gaussian sigma of the smooth fields, in grid cells


@dataclass(frozen=True)
class SyntheticBag:
    bag_id: str
    features: np.ndarray  # (N, dim) float32, >= 0
    coords: np.ndarray  # (N, 2) int64 (x, y) level-0 px, raster order
    label: int
    positive: np.ndarray = field(repr=False)  # (N,) bool: instances carrying the signal


@dataclass(frozen=True)
class _CohortConstants:
    mu: np.ndarray  # (dim,)
    mixing: np.ndarray  # (dim, latent_fields)
    signal: np.ndarray  # (dim,) 0/1: the shifted dims


def make_cohort(
    task: str, n_bags: int, *, seed: int = 0, params: CohortParams | None = None
) -> list[SyntheticBag]:
    """``n_bags`` bags of task ``task`` (a key of ``TASKS``); reproducible from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    p = params or CohortParams()
    root = np.random.SeedSequence([seed, ord(task)])
    const_seq, *bag_seqs = root.spawn(n_bags + 1)
    const = _constants(np.random.default_rng(const_seq), p)
    return [
        _make_bag(task, f"{task}{seed}_{i:04d}", i % 2, np.random.default_rng(s), const, p)
        for i, s in enumerate(bag_seqs)
    ]


def _constants(rng: np.random.Generator, p: CohortParams) -> _CohortConstants:
    mu = rng.uniform(0.0, 1.0, p.dim)
    mixing = rng.normal(size=(p.dim, p.latent_fields)) / np.sqrt(p.latent_fields)
    signal = np.zeros(p.dim)
    signal[rng.choice(p.dim, p.signal_dims, replace=False)] = 1.0
    return _CohortConstants(mu, mixing, signal)


def tissue_cells(rng: np.random.Generator, n: int) -> tuple[np.ndarray, int]:
    """``n`` distinct grid cells forming a random blob, as (y, x) rows sorted by y then x; and the width."""
    fill = rng.uniform(0.45, 0.7)
    side = int(np.ceil(np.sqrt(n / fill))) + 2
    yy, xx = np.mgrid[:side, :side]
    centre = (side - 1) / 2
    radial = ((yy - centre) ** 2 + (xx - centre) ** 2) / (side / 2) ** 2
    score = _smooth(rng.normal(size=(side, side)), side / 6) - 1.5 * radial
    cells = np.argsort(-score.ravel(), kind="stable")[:n]
    return np.sort(cells), side  # flat index y * side + x: sorting = raster order


def _smooth(noise: np.ndarray, sigma: float) -> np.ndarray:
    """A unit-variance smooth random field from white noise (Gaussian filter on the last two axes)."""
    axes_sigma = (0,) * (noise.ndim - 2) + (sigma, sigma)
    field_ = gaussian_filter(noise, axes_sigma, mode="reflect")
    std = field_.std(axis=(-2, -1), keepdims=True)
    return field_ / np.maximum(std, 1e-8)


def _make_bag(
    task: str, bag_id: str, label: int, rng: np.random.Generator, const: _CohortConstants, p: CohortParams
) -> SyntheticBag:
    n = int(rng.integers(p.min_instances, p.max_instances + 1))
    cells, side = tissue_cells(rng, n)
    y, x = cells // side, cells % side
    coords = np.stack([x, y], axis=1).astype(np.int64) * PATCH_PX + rng.integers(0, 50, 2) * PATCH_PX

    sigma = rng.uniform(*p.smooth_cells)
    latent = _smooth(rng.normal(size=(p.latent_fields, side, side)), sigma)[:, y, x]  # (K, N)
    per_dim = _smooth(rng.normal(size=(p.dim, side, side)).astype(np.float32), sigma)[:, y, x]  # (dim, N)
    z = (
        const.mu[:, None]
        + p.bag_offset_scale * rng.normal(size=(p.dim, 1))
        + p.latent_scale * (const.mixing @ latent)
        + p.field_scale * per_dim
        + p.noise_scale * rng.normal(size=(p.dim, n))
    )
    positive = positive_instances(task, rng, np.stack([x, y], axis=1)) if label else np.zeros(n, bool)
    z[:, positive] += p.shift * const.signal[:, None]
    features = np.maximum(z, 0.0).T.astype(np.float32)
    return SyntheticBag(bag_id, np.ascontiguousarray(features), coords, label, positive)


def positive_instances(task: str, rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
    """The (N,) mask of positive instances of a positive bag, given its grid cells (N, 2)."""
    n = len(cells)
    mask = np.zeros(n, bool)
    if task == "b":
        count = max(1, round(rng.uniform(0.01, 0.03) * n))
        mask[rng.choice(n, count, replace=False)] = True
        return mask
    if task == "a":
        total, sizes = rng.uniform(0.01, 0.03) * n, np.full(2, 0.5)
    else:
        regions = int(rng.integers(3, 6))
        total, sizes = rng.uniform(0.02, 0.06) * n, rng.dirichlet(np.full(regions, 0.7))
    for share in sizes:
        size = max(1, round(share * total))
        centre = cells[rng.integers(n)]
        dist = ((cells - centre) ** 2).sum(axis=1) + rng.uniform(0, 0.5, n)  # random tie-break: round blobs
        free = np.flatnonzero(~mask)
        mask[free[np.argsort(dist[free], kind="stable")[:size]]] = True
    return mask
