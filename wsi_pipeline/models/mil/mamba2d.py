"""2DMamba (Zhang et al., CVPR 2025, ``AtlasAnalyticsLab/2DMamba``'s MambaMIL_2D), per docs/mamba2d.md.

``Linear(D, 128) + GELU + Dropout(0.25)`` per patch; the patches placed on their slide's grid of cells, every
empty cell holding a pad token; ``n_layers=1`` residual block ``h + Mamba2D(RMSNorm(h))`` whose S6 scans the
grid in 2-D; LayerNorm; non-gated attention pooling (128 -> 128 tanh -> 1) over *all* cells, pad cells
included, as released; ``Linear(128, C)``. Xavier-normal re-init of every Linear afterwards (dt bias -> 0).

``preset``: ``"recommended"`` (the default) adds the instance path below with its own 512-d embedding, measured on
the focal and small-cohort tasks of the quality benchmark (docs/mamba2d.md §6); ``"released"`` is the published
model, parameter for parameter. Options left None take the preset's values.

Options (defaults of the released model):
- ``grid="released"``: each slide on a grid from its origin with the fixed extent ``grid_size=(H, W)`` cells.
  Left unset, `wsip train` fixes it from the cohort (``cohort_options``, the released per-dataset extent) and
  records it with the model; used on its own, the model sizes each slide to its last row and column.
  ``grid="crop"``: each slide's bounding box only (fewer pad cells: cheaper, not equivalent).
- ``cell_size``: level-0 px per cell; unset: each slide's patch step, read from its coords (cellgrid.py).
- ``pad_token="trainable"`` (initialised U[0, 1)); ``"zero"``: a frozen zero vector.
- ``instance_path`` (recommended: True): ABMIL's gated attention pooling of the patches straight to logits, added
  to the grid path's (`pooling.InstancePath`); ``instance_dim`` (recommended: 512) gives it its own
  ``Linear(D, instance_dim) + ReLU`` embedding of the input features, 0 reads the 128-d patch embedding.

The instance "groups" of the model contract are the grid placement, ``[rows, cols]`` (cell per patch), so
the trainer caches them per slide under ``group_cache_key``. Per-patch attention (heatmaps) is the pooling
weight of the patch's cell; it sums to 1 minus the pad cells' share, and pad cells have no patch to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from wsi_pipeline.models.mil.cellgrid import cohort_extent, grid_frame, place_cells
from wsi_pipeline.models.mil.pooling import (
    AttentionScorer,
    attention_pool,
    check_bag,
    instance_embedding,
    make_instance_path,
)
from wsi_pipeline.models.mil.registry import check_choice, register_model
from wsi_pipeline.models.ssm.bimamba import xavier_reinit_
from wsi_pipeline.models.ssm.mamba2d import Mamba2D

PRESETS: dict[str, dict[str, Any]] = {
    "released": {"instance_path": False, "instance_dim": 0},
    "recommended": {"instance_path": True, "instance_dim": 512},
}


@register_model("2dmamba")
class Mamba2DMIL(nn.Module):
    def __init__(
        self, in_dim: int, n_classes: int, *, d_model: int = 128, n_layers: int = 1, dropout: float = 0.25,
        d_state: int = 16, d_conv: int = 4, expand: int = 2, pad_token: Literal["trainable", "zero"] = "trainable",
        grid: Literal["released", "crop"] = "released", grid_size: Sequence[int] | None = None,
        cell_size: int | None = None, preset: str = "recommended", instance_path: bool | None = None,
        instance_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("preset", preset, tuple(PRESETS))
        given = {"instance_path": instance_path, "instance_dim": instance_dim}
        self.preset = preset
        self.options = {k: PRESETS[preset][k] if v is None else v for k, v in given.items()}
        instance_path, instance_dim = self.options["instance_path"], self.options["instance_dim"]
        _check_options(pad_token, grid, grid_size, cell_size)
        self.grid, self.cell_size = grid, cell_size
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
        self.group_cache_key = f"cells_{cell_size}px" if cell_size else "cells_step"
        self.embed = instance_embedding(in_dim, d_model, act="gelu", dropout=dropout)
        trainable = pad_token == "trainable"
        self.pad_token = nn.Parameter(torch.rand(d_model) if trainable else torch.zeros(d_model),
                                      requires_grad=trainable)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
        self.mambas = nn.ModuleList(
            Mamba2D(d_model, d_state=d_state, d_conv=d_conv, expand=expand) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.attention = AttentionScorer(d_model, 128)
        self.classifier = nn.Linear(d_model, n_classes)
        xavier_reinit_(self)
        # made after the re-init: the released parameters' values and RNG use stay as they were
        self.instance_path = make_instance_path(in_dim, d_model, n_classes, instance_dim) if instance_path else None

    def make_groups(self, features: np.ndarray | None, coords: np.ndarray) -> list[np.ndarray]:
        """The grid placement ``[rows, cols]`` of one slide's patches; deterministic, so cached by the trainer."""
        return list(place_cells(coords, self.cell_size))

    def cohort_options(self, coords: Sequence[np.ndarray]) -> dict[str, Any]:
        """The preset's values, and the released grid's extent for a cohort (every slide's cells from the origin)
        unless already set."""
        pinned = {"preset": self.preset, **self.options}  # a later change of a preset leaves this run's model as is
        if self.grid != "released" or self.grid_size is not None:
            return pinned
        return {**pinned, "grid_size": list(cohort_extent([place_cells(c, self.cell_size) for c in coords]))}

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor, groups: Sequence[Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) features, (N, 2) coords -> logits (1, C) and per-patch attention (N,) (module docstring)."""
        check_bag(features)
        if groups is None:
            groups = self.make_groups(None, coords.detach().cpu().numpy())
        rows, cols = (np.asarray(g) for g in groups)
        (top, left), (height, width) = grid_frame(rows, cols, crop=self.grid == "crop", extent=self.grid_size)
        cell = torch.as_tensor((rows - top) * width + (cols - left), dtype=torch.long, device=features.device)
        x = self.embed(features)
        h = self.pad_token.to(x.dtype).expand(height * width, -1).index_copy(0, cell, x)[None]
        for norm, mamba in zip(self.norms, self.mambas, strict=True):
            h = h + mamba(norm(h), (height, width))
        h = self.norm(h[0])
        bag, alpha = attention_pool(h, self.attention(h))
        if self.instance_path is None:
            return self.classifier(bag)[None], alpha[cell]
        instance_logits, beta = self.instance_path(features if self.instance_path.reads_features else x)
        return self.classifier(bag)[None] + instance_logits, (alpha[cell] + beta) / 2


def _check_options(pad_token: str, grid: str, grid_size: Sequence[int] | None, cell_size: int | None) -> None:
    if pad_token not in ("trainable", "zero"):
        raise ValueError(f"pad_token must be 'trainable' or 'zero', got {pad_token!r}")
    if grid not in ("released", "crop"):
        raise ValueError(f"grid must be 'released' or 'crop', got {grid!r}")
    if grid_size is not None and (len(grid_size) != 2 or min(int(v) for v in grid_size) < 1):
        raise ValueError(f"grid_size must be [rows, cols] of positive cell counts, got {grid_size!r}")
    if grid_size is not None and grid == "crop":
        raise ValueError("grid_size is the released grid's extent; grid='crop' sizes each slide to its patches")
    if cell_size is not None and int(cell_size) < 1:
        raise ValueError(f"cell_size must be a positive number of level-0 px, got {cell_size!r}")
