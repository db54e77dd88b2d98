"""GMMamba's cross-group super-feature sampling (CSS, docs/gmmamba.md §5) and its ablation variants.

CMax f_max = max over groups (Eq 8); association Q = softmax(F·f_max) (Eq 11); CCA f_ca = Qᵀ F (Eq 9); CMHA
f_mha = MHA(f_ca; F, F) (Eq 10); super-features F_sgr = f_ca + Q_g f_mha (Eq 12). ``variant`` gives the seven
rows of the paper's CSS table (docs/gmmamba.md §15 says which parts the paper defines and which we assumed):
"cmax" one token f_max; "q" the groups weighted by Q (Q_g f_gr^g); "cca" one token f_ca; "cca_q" f_ca weighted
by each Q_g (Q_g f_ca, G tokens); "cmha" one token f_mha; "cmha_q" Q_g f_mha (G tokens); "full" Eq 12.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from wsi_pipeline.models.mil.pooling import AttentionScorer
from wsi_pipeline.models.mil.registry import check_choice

CssAssociation = Literal["dot", "scaled_dot", "attention"]
CssVariant = Literal["full", "cmax", "q", "cca", "cca_q", "cmha", "cmha_q"]
_WITH_MHA = ("full", "cmha", "cmha_q")  # the variants that run CMHA (Eq 10)


class CrossGroupSampling(nn.Module):
    """CSS (§5): CMax, association Q, parameter-free CCA, bias-free MHA; F_sgr = f_ca + Q_g f_mha.

    ``association`` is how Q is computed (module docstring); "dot" is the released, unscaled Eq 11.
    """

    def __init__(
        self, d_model: int, n_heads: int = 8, *, association: CssAssociation = "dot", variant: CssVariant = "full"
    ) -> None:
        super().__init__()
        check_choice("css_association", association, CssAssociation)
        check_choice("css_variant", variant, CssVariant)
        self.association, self.variant = association, variant
        if variant in _WITH_MHA:  # the other variants stop before CMHA and have no MHA parameters
            self.mha = nn.MultiheadAttention(d_model, n_heads, dropout=0.0, bias=False, batch_first=True)
        if association == "attention" and variant != "cmax":  # made last: the others' init is unchanged
            self.scorer = AttentionScorer(d_model, 128)

    def forward(self, f_gr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, d) group vectors -> super-features (G, d) ((1, d) for "cmax", "cca", "cmha") and Q (G,).

        For "cmax", Q is each group's share of the dimensions where it holds the maximum (what f_max takes
        from it), so per-instance attention still means "weight in the slide vector".
        """
        if self.variant == "cmax":
            winners = f_gr.argmax(0)
            return f_gr.max(0).values[None], torch.bincount(winners, minlength=len(f_gr)).to(f_gr) / f_gr.shape[1]
        q = torch.softmax(self._association(f_gr), dim=0)  # Eq 11
        if self.variant == "q":
            return q[:, None] * f_gr, q
        f_ca = q @ f_gr  # Eq 9
        if self.variant in ("cca", "cca_q"):
            return (f_ca[None] if self.variant == "cca" else q[:, None] * f_ca), q
        f_mha = self.mha(f_ca[None, None], f_gr[None], f_gr[None], need_weights=False)[0][0, 0]  # Eq 10
        if self.variant in ("cmha", "cmha_q"):
            return (f_mha[None] if self.variant == "cmha" else q[:, None] * f_mha), q
        return f_ca + q[:, None] * f_mha, q  # Eq 12

    def _association(self, f_gr: torch.Tensor) -> torch.Tensor:
        if self.association == "attention":
            return self.scorer(f_gr)
        logits = f_gr @ f_gr.max(0).values  # Eq 8 (CMax), then the dot product of Eq 11
        return logits if self.association == "dot" else logits * f_gr.shape[1] ** -0.5
