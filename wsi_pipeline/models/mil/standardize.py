"""Per-dimension feature standardisation in front of any MIL model, fitted on a fold's training instances.

Patch encoders differ wildly in scale: ImageNet ResNet18 features vary by ~0.5 per dimension across patches,
a randomly initialised one by ~0.015 around offsets ten times larger. A MIL model trained at lr 1e-4 then
spends its whole budget on the scale instead of the signal (measured: ABMIL on the demo cohort's random-weight
features, balanced accuracy 0.56 raw → 1.00 standardised). z-scoring each dimension with the training
instances' mean and std makes the models see every encoder alike. The statistics are buffers of this module,
so a checkpoint carries them and `wsip predict` applies exactly what training used.

Whether to standardise is part of a model's preset (:func:`preset_standardize`): GMMamba's `preset: released`
reads raw features, as the published pipeline (and every official baseline pipeline) does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


class StandardizedInput(nn.Module):
    """`model((features - mean) / std, coords, groups)`; everything else of the MIL contract (groups, training
    loss, cohort options) is delegated to the wrapped model."""

    def __init__(self, model: nn.Module, in_dim: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @torch.no_grad()
    def fit(self, bags: Iterable[torch.Tensor]) -> None:
        """Mean and std per dimension over every instance of `bags` (float64 sums, one pass)."""
        total, total_sq, count = 0.0, 0.0, 0
        for features in bags:
            x = features.to(torch.float64)
            total, total_sq, count = total + x.sum(0), total_sq + (x * x).sum(0), count + x.shape[0]
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6 * float(std.max()) + 1e-12))

    def forward(self, features: torch.Tensor, coords: torch.Tensor, groups: Any = None) -> Any:
        return self.model((features - self.mean) / self.std, coords, groups=groups)


def preset_standardize(name: str, options: Mapping[str, Any]) -> bool:
    """`data.standardize` when a config leaves it out: what model `name`'s preset says (GMMamba: off for
    `preset: released`, on for `recommended`, docs/gmmamba.md §14); on for every other model (2DMamba: both presets).

    An unknown preset answers True here; building the model then reports it as one line.
    """
    if name != "gmmamba":  # the only model whose presets differ on standardisation
        return True
    import inspect

    from wsi_pipeline.models.mil.gmmamba import PRESETS, GMMamba

    preset = options.get("preset", inspect.signature(GMMamba).parameters["preset"].default)
    return bool(PRESETS[preset]["standardize"]) if preset in PRESETS else True
