"""DSMIL: dual-stream MIL (Li et al., CVPR 2021), as in its released `dsmil.py` (docs/baselines.md).

Stream 1, instance classifier: ``Linear(D, C)`` scores every instance; per class, the highest-scoring
instance is the critical instance, and the max score itself is the stream's bag prediction. Stream 2, bag
classifier: queries ``q = tanh(W2 relu(W1 x))`` (D -> 128 -> 128) for every instance; class c's attention is
``softmax_n(q_n · q_crit(c) / √128)``, the distance of each instance to class c's critical instance; the C
attention-pooled bag embeddings (C, D) go through ``Conv1d(C, C, kernel=D)`` to the bag logits. Values are
the features themselves (the released default, no value network). Weights are orthogonal-initialised and
biases zero, as the released training script does.

Training loss, as the released script: ``0.5 · BCE(bag logits, one-hot) + 0.5 · BCE(max instance logits,
one-hot)`` (`loss: bce`); `loss: ce` uses cross-entropy for both terms instead. Predictions are the
softmax over the C bag logits, as for every wsip model (the released code thresholds each sigmoid).

Two classes (`binary_single_output`, default on): as the release runs a binary task (`--num_classes=1`), one
output z for the second (positive) class: one instance score, one critical instance, one attention column,
BCE on the 0/1 label. The model still returns two logits, ``[0, z]``, whose softmax is ``[1 − σ(z), σ(z)]``
(so cross-entropy on them is BCE on z). Off: two one-hot outputs, as the release's two-class TCGA lung setting.

Attention returned for heatmaps: the attention column of the predicted class (argmax of the bag logits),
which sums to 1; the released attention maps likewise colour each detected class's column.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.models.mil.pooling import check_bag
from wsi_pipeline.models.mil.registry import GrouplessMixin, pop_forward_state, register_model


@register_model("dsmil")
class DSMIL(GrouplessMixin, nn.Module):
    def __init__(
        self, in_dim: int, n_classes: int, *, query_dim: int = 128, loss: Literal["bce", "ce"] = "bce",
        binary_single_output: bool = True,
    ) -> None:
        super().__init__()
        if loss not in ("bce", "ce"):
            raise ValueError(f"loss must be 'bce' or 'ce', got {loss!r}")
        self.loss = loss
        self.single = binary_single_output and n_classes == 2
        outputs = 1 if self.single else n_classes
        self.instance_classifier = nn.Linear(in_dim, outputs)
        self.query = nn.Sequential(
            nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.bag_classifier = nn.Conv1d(outputs, outputs, kernel_size=in_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv1d):
                nn.init.orthogonal_(module.weight)
                nn.init.zeros_(module.bias)
        self._forward_state: torch.Tensor | None = None

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, groups: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> bag logits (1, C) and the predicted class's attention (N,); coords, groups unused."""
        check_bag(features)
        instance_logits = self.instance_classifier(features)  # (N, C), C = 1 for a single binary output
        q = self.query(features)  # (N, Q)
        critical = q[instance_logits.argmax(dim=0)]  # (C, Q): the query of each class's top instance
        attention = torch.softmax(q @ critical.T / q.shape[1] ** 0.5, dim=0)  # (N, C), columns sum to 1
        bag = attention.T @ features  # (C, D)
        logits = self.bag_classifier(bag[None]).view(1, -1)
        self._forward_state = instance_logits if self.training else None
        if self.single:
            return _binary_logits(logits), attention[:, 0]
        return logits, attention[:, int(logits.argmax())]

    def training_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """0.5 · bag loss + 0.5 · max-instance loss, both BCE on the one-hot (single output: 0/1) label, or CE."""
        instance_logits: torch.Tensor = pop_forward_state(self)
        max_logits = instance_logits.max(dim=0).values[None]  # (1, C)
        if self.single:  # [0, z]: cross-entropy on these is BCE on z with the 0/1 label (bce and ce coincide)
            max_logits = _binary_logits(max_logits)
        if self.loss == "ce" or self.single:
            return 0.5 * F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(max_logits, target)
        one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits
        return 0.5 * bce(logits, one_hot) + 0.5 * bce(max_logits, one_hot)


def _binary_logits(z: torch.Tensor) -> torch.Tensor:
    """(1, 1) positive-class logit -> (1, 2) logits [0, z]: softmax gives [1 − σ(z), σ(z)]."""
    return torch.cat([torch.zeros_like(z), z], dim=1)
