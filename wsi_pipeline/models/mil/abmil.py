"""ABMIL: gated-attention MIL (Ilse et al. 2018), as configured in the MambaMIL repo (docs/gmmamba.md §13).

Instances are embedded by ``Linear(D, 512) + ReLU + Dropout(0.25)``; gated attention (V, U: 512 -> 128,
w: 128 -> 1) is softmaxed over the bag; the attention-weighted embedding goes through ``Linear(512, C)``.
The attention returned for heatmaps is that softmax, so it sums to 1.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_pipeline.models.mil.pooling import GatedAttentionScorer, attention_pool, check_bag, instance_embedding
from wsi_pipeline.models.mil.registry import GrouplessMixin, register_model


@register_model("abmil")
class ABMIL(GrouplessMixin, nn.Module):
    def __init__(
        self, in_dim: int, n_classes: int, *, hidden_dim: int = 512, attn_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embed = instance_embedding(in_dim, hidden_dim, act="relu", dropout=dropout)
        self.attention = GatedAttentionScorer(hidden_dim, attn_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, groups: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> logits (1, C) and attention (N,) summing to 1; coords and groups are unused."""
        check_bag(features)
        h = self.embed(features)
        bag, alpha = attention_pool(h, self.attention(h))
        return self.classifier(bag)[None], alpha

