"""Bag pooling: the attention MLPs shared by the MIL models, and the mean / max pooling baselines.

The 512 -> 128 -> 1 attention MLP appears three times in this package (GMMamba's IMM mask scorer and
pool, docs/gmmamba.md §4; MambaMIL's pool, §13) and its gated form three times (ABMIL, §13; ACMIL and
CLAM-SB, docs/baselines.md); they live here once.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from wsi_pipeline.models.mil.registry import GrouplessMixin, register_model


class AttentionScorer(nn.Module):
    """Non-gated attention logits ``w2ᵀ tanh(W1 h + b1) + b2``, one per instance (Ilse et al. 2018)."""

    def __init__(self, dim: int = 512, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(M, dim) -> (M,) unnormalised scores."""
        return self.net(h).squeeze(-1)


class GatedAttentionScorer(nn.Module):
    """Gated attention logits ``wᵀ [tanh(V h) ⊙ σ(U h)] + b`` (Ilse et al. 2018, ABMIL §13).

    `branches` > 1 gives that many attention maps from one shared V, U (w: hidden -> branches), as ACMIL's
    multi-branch attention does; `dropout` acts on both gate halves, as CLAM's attention net does
    (docs/baselines.md).
    """

    def __init__(self, dim: int = 512, hidden: int = 128, *, branches: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, branches)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(M, dim) -> unnormalised scores, (M,) for one branch, else (M, branches)."""
        gated = self.dropout(torch.tanh(self.V(h))) * self.dropout(torch.sigmoid(self.U(h)))
        scores = self.w(gated)
        return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


class InstancePath(nn.Module):
    """Gated attention pooling of the instances straight to class logits, beside a model's sequence path: a lone
    positive patch reaches the output without being mixed into its neighbours by a scan or diluted in a group
    vector first (docs/gmmamba.md §16). ABMIL's pooling and head; with ``embed_dim`` also ABMIL's own embedding
    (``Linear(in_dim, embed_dim) + ReLU + Dropout(0.25)``) of the model's input features, else it reads the
    model's own ``in_dim``-wide instance embeddings as they are."""

    def __init__(self, in_dim: int, n_classes: int, *, embed_dim: int | None = None, hidden: int = 128) -> None:
        super().__init__()
        self.reads_features = bool(embed_dim)  # its input: the model's input features, else its own embeddings
        self.embed = instance_embedding(in_dim, embed_dim, act="relu", dropout=0.25) if embed_dim else nn.Identity()
        dim = embed_dim or in_dim
        self.scorer = GatedAttentionScorer(dim, hidden)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, in_dim) -> logits (1, C) and attention (M,) summing to 1."""
        h = self.embed(h)
        bag, alpha = attention_pool(h, self.scorer(h))
        return self.head(bag)[None], alpha


def make_instance_path(in_dim: int, model_dim: int, n_classes: int, embed_dim: int) -> InstancePath:
    """A model's instance path: its own ``embed_dim``-wide embedding of the ``in_dim`` input features when
    ``embed_dim`` > 0, else reading the model's ``model_dim``-wide instance embeddings (docs/gmmamba.md §16)."""
    if embed_dim:
        return InstancePath(in_dim, n_classes, embed_dim=embed_dim)
    return InstancePath(model_dim, n_classes)


def attention_pool(h: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax the scores over instances and return (αᵀh of shape (dim,), α of shape (M,), sums to 1)."""
    alpha = torch.softmax(scores, dim=0)
    return alpha @ h, alpha


def instance_embedding(
    in_dim: int, out_dim: int, *, act: Literal["relu", "gelu"], dropout: float
) -> nn.Sequential:
    """Per-instance ``Linear(in_dim, out_dim) + act + Dropout`` in front of every baseline (§1, §13)."""
    activation = nn.ReLU() if act == "relu" else nn.GELU()
    return nn.Sequential(nn.Linear(in_dim, out_dim), activation, nn.Dropout(dropout))


def check_bag(features: torch.Tensor) -> None:
    """Models take one bag as (N, D) with N >= 1; a batched (1, N, D) tensor is a caller bug."""
    if features.ndim != 2 or features.shape[0] == 0:
        shape = tuple(features.shape)
        raise ValueError(f"expected one bag of features shaped (N, D) with N >= 1, got {shape}")


@register_model("mean", mode="mean")
@register_model("max", mode="max")
class InstancePoolMIL(GrouplessMixin, nn.Module):
    """Mean or max pooling of per-instance logits (MambaMIL's MeanMIL / MaxMIL baselines).

    Each instance goes through ``Linear(D, 512) + ReLU + Dropout(0.25) + Linear(512, C)`` and the
    instance logits are averaged (mean) or max-ed per class (max). Mean over logits equals the linear
    head on the mean embedding; max is mi-Net style. No attention to return.
    """

    def __init__(
        self, in_dim: int, n_classes: int, *, mode: Literal["mean", "max"], hidden_dim: int = 512,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if mode not in ("mean", "max"):
            raise ValueError(f"mode must be 'mean' or 'max', got {mode!r}")
        self.mode = mode
        self.embed = instance_embedding(in_dim, hidden_dim, act="relu", dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, groups: object = None
    ) -> tuple[torch.Tensor, None]:
        check_bag(features)
        instance_logits = self.classifier(self.embed(features))
        pooled = instance_logits.mean(0) if self.mode == "mean" else instance_logits.max(0).values
        return pooled[None], None

