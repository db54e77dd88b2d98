"""ACMIL: attention-challenging MIL (Zhang et al., ECCV 2024), its gated-attention variant (docs/baselines.md).

Instances are embedded by ``Linear(D, hidden, bias=False) + ReLU``; hidden defaults to the release's per-encoder
`D_inner` (`OFFICIAL_HIDDEN`: 128 for 384-d ViT-S features, 256 for 512-d ResNet18, D/2 for 768, 1024, 1536),
D/2 for other sizes. One gated attention net (shared V, U: hidden -> 128) scores every instance for M = 5
branches (multiple-branch attention, MBA); each branch pools the bag with its own softmax and has its own
classifier. The slide prediction is a separate classifier on the bag pooled with the MEAN of the branch
attention maps; that mean is also the attention returned for heatmaps (it sums to 1).

Stochastic top-K instance masking (STKIM), in train mode only: per branch, ⌊K·mask_drop⌋ of the K = 10
highest attention logits, chosen at random, are set to -1e9 before the softmax, so a branch cannot lean on
its few most salient instances. Eval is deterministic (no masking, no dropout anywhere).

Training loss (`training_loss`): cross-entropy of the slide classifier + mean cross-entropy of the branch
classifiers + the mean pairwise cosine similarity of the branches' attention maps (the diversity term that
pushes branches to different instances); branch terms need M > 1, as in the released code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.models.mil.pooling import GatedAttentionScorer, check_bag
from wsi_pipeline.models.mil.registry import GrouplessMixin, pop_forward_state, register_model

MASKED = -1e9  # the released code's fill value for masked attention logits
# The release's D_feat -> D_inner (Step3_WSI_classification_ACMIL.py); D/2 everywhere but ViT-S's 384.
OFFICIAL_HIDDEN = {384: 128, 512: 256, 768: 384, 1024: 512, 1536: 768}


class _Branches(NamedTuple):
    logits: torch.Tensor  # (M, C)
    attention: torch.Tensor  # (M, N), softmaxed


@register_model("acmil")
class ACMIL(GrouplessMixin, nn.Module):
    def __init__(
        self, in_dim: int, n_classes: int, *, hidden_dim: int | None = None, attn_dim: int = 128,
        branches: int = 5, mask_top_k: int = 10, mask_drop: float = 0.6,
    ) -> None:
        super().__init__()
        if branches < 1 or mask_top_k < 0:
            raise ValueError(f"branches must be >= 1 and mask_top_k >= 0, got {branches} and {mask_top_k}")
        if not 0.0 <= mask_drop < 1.0:
            raise ValueError(f"mask_drop must be in [0, 1), got {mask_drop}")
        hidden = hidden_dim or OFFICIAL_HIDDEN.get(in_dim, in_dim // 2)
        self.mask_top_k, self.mask_drop = mask_top_k, mask_drop
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.ReLU())
        self.attention = GatedAttentionScorer(hidden, attn_dim, branches=branches)
        self.branch_classifiers = nn.ModuleList(nn.Linear(hidden, n_classes) for _ in range(branches))
        self.classifier = nn.Linear(hidden, n_classes)
        self._forward_state: _Branches | None = None

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, groups: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> slide logits (1, C) and the mean branch attention (N,); coords and groups are unused."""
        check_bag(features)
        h = self.embed(features)
        scores = self.attention(h).reshape(len(h), -1).T  # (M, N)
        if self.training:
            scores = top_k_mask(scores, self.mask_top_k, self.mask_drop)
        alpha = torch.softmax(scores, dim=1)
        pooled = alpha @ h  # (M, hidden): one bag vector per branch
        branch_logits = torch.stack([clf(v) for clf, v in zip(self.branch_classifiers, pooled, strict=True)])
        bag_alpha = alpha.mean(0)
        self._forward_state = _Branches(branch_logits, alpha) if self.training else None
        return self.classifier(bag_alpha @ h)[None], bag_alpha

    def training_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE(slide) + mean CE(branches) + mean pairwise cosine similarity of the branch attentions."""
        branches: _Branches = pop_forward_state(self)
        loss = F.cross_entropy(logits, target)
        m = len(branches.logits)
        if m > 1:
            loss = loss + F.cross_entropy(branches.logits, target.expand(m))
            loss = loss + mean_pairwise_cosine(branches.attention)
        return loss


def top_k_mask(scores: torch.Tensor, top_k: int, drop: float) -> torch.Tensor:
    """STKIM: per row of `scores` (M, N), ⌊k·drop⌋ random ones of its k = min(top_k, N) largest entries
    become -1e9 (fewer than k, so a row never loses every instance)."""
    k = min(top_k, scores.shape[1])
    n_masked = int(k * drop)
    if n_masked == 0:
        return scores
    top = scores.topk(k, dim=1).indices
    chosen = torch.rand(top.shape, device=scores.device).argsort(dim=1)[:, :n_masked]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top.gather(1, chosen), True)
    return scores.masked_fill(mask, MASKED)


def mean_pairwise_cosine(maps: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the M·(M-1)/2 pairs of rows of `maps` (M, N), M >= 2."""
    unit = F.normalize(maps, dim=1, eps=1e-8)
    pairs = torch.triu_indices(len(maps), len(maps), offset=1, device=maps.device)
    return (unit @ unit.T)[pairs[0], pairs[1]].mean()
