"""MambaMIL (Yang et al. 2024, ``isyangshu/MambaMIL``) as described in docs/gmmamba.md §13.

``Linear(D, 512) + GELU + Dropout(0.25)``; ``n_layers=2`` residual blocks ``h + SRMamba(LN(h))`` whose second
branch reads the sequence with stride ``rate=10`` (the paper's default; its scripts use 5); LayerNorm;
non-gated attention pooling (512 -> 128 tanh -> 1); ``Linear(512, C)``. Like the reference, the whole model
gets the Xavier-normal re-init of §7 after construction.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_pipeline.models.mil.pooling import AttentionScorer, attention_pool, check_bag, instance_embedding
from wsi_pipeline.models.mil.registry import GrouplessMixin, register_model
from wsi_pipeline.models.ssm.bimamba import SRMamba, xavier_reinit_


@register_model("mambamil")
class MambaMIL(GrouplessMixin, nn.Module):
    def __init__(
        self, in_dim: int, n_classes: int, *, d_model: int = 512, n_layers: int = 2, rate: int = 10,
        dropout: float = 0.25, d_state: int = 16, d_conv: int = 4, expand: int = 2,
    ) -> None:
        super().__init__()
        self.embed = instance_embedding(in_dim, d_model, act="gelu", dropout=dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.mambas = nn.ModuleList(
            SRMamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, rate=rate)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.attention = AttentionScorer(d_model, 128)
        self.classifier = nn.Linear(d_model, n_classes)
        xavier_reinit_(self)

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, groups: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) in h5 order -> logits (1, C) and attention (N,) summing to 1; coords/groups unused."""
        check_bag(features)
        h = self.embed(features)[None]
        for norm, mamba in zip(self.norms, self.mambas, strict=True):
            h = h + mamba(norm(h))
        h = self.norm(h[0])
        bag, alpha = attention_pool(h, self.attention(h))
        return self.classifier(bag)[None], alpha

