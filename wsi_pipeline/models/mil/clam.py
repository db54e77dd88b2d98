"""CLAM-SB: clustering-constrained attention MIL, single branch (Lu et al., Nat. Biomed. Eng. 2021).

As the released "small" CLAM-SB (docs/baselines.md): ``Linear(D, 512) + ReLU + Dropout(0.25)``, gated
attention (V, U: 512 -> 256, Dropout(0.25) on both halves, w: 256 -> 1) softmaxed over the bag, a bag
classifier ``Linear(512, C)`` on the attention-pooled vector, and one instance classifier ``Linear(512, 2)``
per class. The attention returned for heatmaps is the softmaxed attention (sums to 1).

Instance-level clustering (`inst_cluster`, on by default as in CLAM's training loop): the k_sample = 8
most- and least-attended instances get pseudo-labels 1 and 0 for the instance classifier of the bag's
class; with `subtyping` (CLAM's flag for subtyping tasks, off by default as in CLAM's code) the other
classes' instance classifiers also learn that the bag's top-8 are NOT of their class, and the instance
loss is averaged over classes. The training loss is ``bag_weight · CE(bag) + (1 − bag_weight) · instance``
with bag_weight = 0.7; the instance loss is cross-entropy (`inst_loss: ce`, the code's default) or the
smooth top-1 SVM of CLAM's documented subtyping command (`inst_loss: svm`, τ = 1, margin α = 1).

`init: default` keeps PyTorch's initialisation, as CLAM since April 2024; `init: xavier` is the earlier
release's (Xavier-normal Linear weights, zero biases), which most published CLAM numbers were trained with.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.models.mil.pooling import GatedAttentionScorer, attention_pool, check_bag, instance_embedding
from wsi_pipeline.models.mil.registry import GrouplessMixin, check_choice, pop_forward_state, register_model


class _Instances(NamedTuple):
    h: torch.Tensor  # (N, hidden) embedded instances
    attention: torch.Tensor  # (N,) softmaxed


@register_model("clam_sb")
class CLAMSB(GrouplessMixin, nn.Module):
    def __init__(
        self, in_dim: int, n_classes: int, *, hidden_dim: int = 512, attn_dim: int = 256, dropout: float = 0.25,
        inst_cluster: bool = True, inst_loss: Literal["svm", "ce"] = "ce", k_sample: int = 8,
        bag_weight: float = 0.7, subtyping: bool = False, init: Literal["default", "xavier"] = "default",
    ) -> None:
        super().__init__()
        if inst_loss not in ("svm", "ce"):
            raise ValueError(f"inst_loss must be 'svm' or 'ce', got {inst_loss!r}")
        if k_sample < 1 or not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"k_sample must be >= 1 and bag_weight in [0, 1], got {k_sample} and {bag_weight}")
        self.inst_cluster, self.inst_loss, self.k_sample = inst_cluster, inst_loss, k_sample
        self.bag_weight, self.subtyping = bag_weight, subtyping
        self.embed = instance_embedding(in_dim, hidden_dim, act="relu", dropout=dropout)
        self.attention = GatedAttentionScorer(hidden_dim, attn_dim, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_classes))
        check_choice("init", init, ("default", "xavier"))
        if init == "xavier":
            _xavier_init_(self)
        self._forward_state: _Instances | None = None

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, groups: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> logits (1, C) and attention (N,) summing to 1; coords and groups are unused."""
        check_bag(features)
        h = self.embed(features)
        bag, alpha = attention_pool(h, self.attention(h))
        self._forward_state = _Instances(h, alpha) if self.training else None
        return self.classifier(bag)[None], alpha

    def training_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """bag_weight · CE(bag) + (1 − bag_weight) · instance-clustering loss (CE alone without clustering)."""
        instances: _Instances = pop_forward_state(self)
        bag = F.cross_entropy(logits, target)
        if not self.inst_cluster:
            return bag
        return self.bag_weight * bag + (1.0 - self.bag_weight) * self.instance_loss(instances, int(target))

    def instance_loss(self, instances: _Instances, label: int) -> torch.Tensor:
        """The clustering loss of one bag of class `label` (zero for a one-instance bag)."""
        h, alpha = instances
        k = min(self.k_sample, len(h) // 2)  # small bags: CLAM itself needs N >= k_sample (docs/baselines.md)
        if k == 0:
            return alpha.sum() * 0.0
        top = h[alpha.topk(k).indices]
        total = torch.zeros((), device=h.device)
        for c, classifier in enumerate(self.instance_classifiers):
            if c == label:  # in the class: its top-k are positives, its bottom-k negatives
                bottom = h[(-alpha).topk(k).indices]
                targets = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                total = total + self._pseudo_label_loss(classifier(torch.cat([top, bottom])), targets)
            elif self.subtyping:  # out of the class: its top-k are not of class c
                targets = torch.zeros(k, dtype=torch.long, device=h.device)
                total = total + self._pseudo_label_loss(classifier(top), targets)
        return total / len(self.instance_classifiers) if self.subtyping else total

    def _pseudo_label_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.inst_loss == "ce":
            return F.cross_entropy(logits, targets)
        return smooth_top1_svm(logits, targets)


def _xavier_init_(module: nn.Module) -> None:
    """CLAM's pre-2024 `initialize_weights`: Xavier-normal Linear weights, zero biases (CLAM-SB has no norms).
    Not GMMamba's `xavier_reinit_`: that lives with the SSM kernels, which CLAM need not import."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


def smooth_top1_svm(
    logits: torch.Tensor, targets: torch.Tensor, *, tau: float = 1.0, alpha: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 SVM loss (Berrada et al. 2018), batch mean: τ·logsumexp((x + α·[j ≠ y] − x_y) / τ).

    That is cross-entropy on the scores with a margin α added to every wrong class; the reference switches
    to the hard max only where scores differ by > 1000·τ, where the two agree to float precision.
    """
    margin = alpha * (1.0 - F.one_hot(targets, logits.shape[1]).to(logits.dtype))
    return tau * F.cross_entropy((logits + margin) / tau, targets)
