"""GMMamba: location-grouped, intra-group masked BiMamba MIL (ICCV 2025), per docs/gmmamba.md §1–§7.

Forward pass for one bag (§10): LG groups (K-Means on coords, §2) -> IMM on each group at its own length
(never padded together: padding would change the reverse scan, §8) -> CSS across the group vectors (§5)
-> class-token MHSA and a Linear head (§6).

Every option below is taken from ``preset`` unless passed (docs/gmmamba.md §14): ``"recommended"`` (the
default, chosen on the quality benchmark) or ``"released"`` (the published code, reproduced bit for bit).
A preset also says whether the trainer z-scores the features in front of the model (``standardize``, the
default of the config's ``data.standardize``): off for released, which like the published pipeline reads the
raw features; on for recommended.

Architecture options and the quirks they keep (values of the released preset, resolved as in §12):
- ``mask_ratio=0.2``; ``min_one_masked=True`` drops at least one instance per group even at ratio 0
  (§12.2); at least one instance is always kept.
- ``learnable_mask=False``: the mask scorer is never trained (§4); True gives it a gradient (see IMM).
- ``cls_layers=1``: class-token layers; > 1 works (the released code crashes, §12.15).
- ``mamba_native_init=False``: Xavier re-init of every IMM Linear incl. inside the BiMambas, dt bias -> 0
  (§7, §12.11); True keeps Mamba's own init inside the BiMambas.
- ``grouping="kmeans"``, ``n_groups=10``: the LG grouping and its Table 6 ablations (grouping.py).
- ``d_model=512``: width of everything after the input projection (Linear + GELU + Dropout(0.25), present
  whenever D != d_model). The recommended preset narrows it to 128: a quarter of the parameters in the
  BiMambas, dropout on the way in, and no memorising of a small cohort within a few epochs (§14).
- ``css_association="dot"``: CSS's group weights Q (Eq 11). ``"dot"``: ``softmax(F·f_max)``, unscaled; with
  LayerNorm-scale 512-d group vectors the logits differ by tens, so Q is one-hot on one group, chosen before
  any training by whatever dominates the dot product. ``"scaled_dot"``: ``softmax(F·f_max/√d)``, the scaling
  of every other dot-product attention, but with no parameter Q stays near uniform and cannot single a group
  out. ``"attention"`` (recommended): a learned attention MLP over the group vectors (d -> 128 -> 1, as IMM's
  pooling), so a group's weight follows its relevance to the label.
- ``mask_mode="scores"``: which instances IMM drops: ``"scores"`` the k lowest mask-scorer scores, in training
  and inference; ``"scores_train"`` the same but only in training; ``"random_train"`` k random ones, only in
  training (instance dropout).
- ``feature_dropout=0.0``: dropout on IMM's input, the regulariser the D = 512 path lacks.
- Ablations (the paper's Table 4 and CSS table, docs/gmmamba.md §15): ``use_imm=False`` replaces IMM by BMP
  (residual BiMamba + max pooling per group); ``use_css=False`` feeds the group vectors to the class token
  without CSS; ``css_variant`` "cmax" / "q" / "cca" / "cca_q" / "cmha" / "cmha_q" give the CSS table's rows
  (css.py; "full": Eq 12).
- ``instance_path=False`` (recommended: True): gated attention pooling of the instances straight to logits
  (`pooling.InstancePath`), added to the class token's logits; the per-instance attention is then the mean of both
  paths' weights. A lone positive patch reaches the output without first being pooled into a group vector through
  two attention stages, which the group path does not learn on focal signals (docs/gmmamba.md §16).
- ``instance_dim=0`` (recommended: 512): the instance path's own ``Linear(D, instance_dim) + ReLU + Dropout``
  embedding of the input features, as ABMIL's; 0 reads the shared 128-d projection, which learns a lone positive
  too slowly to be found within a small cohort's training (§16).
- ``instance_loss_weight=0.0``: deep supervision of the instance path: in training the loss is
  CE(output logits) + weight · CE(instance-path logits) (`training_loss`). 0 without ``instance_path``;
  inference is unchanged. Measured, not in a preset (§16).
- ``instance_fusion="sum"``: how the two paths' logits make the output: ``"sum"`` or ``"mean"`` (measured, §16).
- ``batch_groups=True``: run IMM on all groups as one padded batch (`IMM.forward_batch`; the same outputs as
  the released per-group loop up to float rounding, ~1e-7, and 1.5–2× faster for small groups); False loops.

Per-instance attention (heatmaps): instance i of group g gets ``Q_g · α_gi``: its weight in the
cross-group context vector ``f_ca = Σ_g Q_g f_gr^g = Σ_g Σ_i Q_g α_gi v_gi`` (Eq 9), which every row of
F_sgr carries. It sums to 1 over the bag; masked instances get exactly 0.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from wsi_pipeline.models.mil.css import CrossGroupSampling, CssAssociation, CssVariant
from wsi_pipeline.models.mil.grouping import Grouping, group_cache_key, make_groups
from wsi_pipeline.models.mil.pooling import AttentionScorer, attention_pool, check_bag, make_instance_path
from wsi_pipeline.models.mil.registry import check_choice, pop_forward_state, register_model
from wsi_pipeline.models.ssm.bimamba import BiMamba, xavier_reinit_

MaskMode = Literal["scores", "scores_train", "random_train"]
Fusion = Literal["sum", "mean"]

# What each preset sets; an option passed explicitly (not None) overrides it. The evidence for the
# recommended values is in docs/gmmamba.md §14 and benchmarks/bench_quality.py.
PRESETS: dict[str, dict[str, Any]] = {
    "released": {"d_model": 512, "mask_ratio": 0.2, "min_one_masked": True, "learnable_mask": False,
                 "mask_mode": "scores", "mamba_native_init": False, "css_association": "dot",
                 "feature_dropout": 0.0, "instance_path": False, "instance_dim": 0,
                 "instance_loss_weight": 0.0, "instance_fusion": "sum", "standardize": False},
}
PRESETS["recommended"] = {**PRESETS["released"], "d_model": 128, "css_association": "attention",
                          "instance_path": True, "instance_dim": 512, "standardize": True}


def mask_count(m: int, mask_ratio: float, *, min_one_masked: bool = True) -> int:
    """Instances to drop from a group of ``m`` (§4.3, §12.2): ⌊ratio·m⌋, ≥ 1 if asked, always ≤ m − 1."""
    k = math.floor(mask_ratio * m)
    if min_one_masked:
        k = max(1, k)
    return min(k, m - 1)


class IMM(nn.Module):
    """Intra-group masking Mamba (§4), applied to one group X of shape (M, d).

    r1 = X + BiMamba1(LN_a(X)); score r1 with an attention MLP on LN_s(r1); drop the k lowest (hard
    sort); keep the survivors of the un-normalised r1 in original order; r2 = r1' + BiMamba2(LN_b(r1'));
    v = LN_s(r2) (the same LN_s); attention-pool v.

    The released code's selection carries no gradient, so the mask scorer stays at its init; by default
    the scores are computed under ``no_grad`` to make that explicit. With ``learnable_mask=True`` the
    survivors are multiplied by a straight-through gate ``exp(log p_i − stopgrad(log p_i))``,
    p = softmax(scores): exactly 1 in the forward pass (outputs are unchanged), while the backward pass
    gives the scores the gradient of a soft, score-weighted selection (∂gate_i/∂s_j = δ_ij − p_j).

    ``mask_mode`` "scores_train" / "random_train" mask only in training mode: by score, or k random instances.
    """

    def __init__(
        self, d_model: int, *, mask_ratio: float, min_one_masked: bool, learnable_mask: bool,
        d_state: int, d_conv: int, expand: int, mask_mode: MaskMode = "scores",
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        check_choice("mask_mode", mask_mode, MaskMode)
        self.mask_ratio, self.min_one_masked, self.learnable_mask = mask_ratio, min_one_masked, learnable_mask
        self.mask_mode = mask_mode
        mamba = {"d_model": d_model, "d_state": d_state, "d_conv": d_conv, "expand": expand}
        self.ln_a, self.ln_b, self.ln_s = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mamba1, self.mamba2 = BiMamba(**mamba), BiMamba(**mamba)
        self.mask_scorer = AttentionScorer(d_model, 128)
        self.pool_scorer = AttentionScorer(d_model, 128)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, d) -> group vector f_gr (d,) and attention (M,): α on survivors, exactly 0 on dropped."""
        r1 = x[None] + self.mamba1(self.ln_a(x[None]))
        keep, gate = self._survivors(r1[0])
        kept = r1[:, keep] if gate is None else r1[:, keep] * gate[keep, None]
        r2 = kept + self.mamba2(self.ln_b(kept))
        v = self.ln_s(r2[0])
        f, alpha = attention_pool(v, self.pool_scorer(v))
        return f, alpha.new_zeros(x.shape[0]).index_copy(0, keep, alpha)

    def forward_batch(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` of every group at once: groups right-padded to the longest, each reversed within its own
        length for the backward scan (BiMamba `lengths`), masked top-k and masked softmax per group. The same
        computation as the per-group loop up to float rounding, in a few large ops instead of G × many small
        ones. Returns the group vectors (G, d) and each group's attention (M_g,)."""
        lengths = torch.tensor([len(x) for x in xs], device=xs[0].device)
        x = pad_sequence(xs, batch_first=True)
        r1 = x + self.mamba1(self.ln_a(x), lengths)
        keep, gate = self._survivors_batch(r1, lengths)
        counts = keep.sum(1)
        rows = r1[keep] if gate is None else r1[keep] * gate[keep, None]
        kept = pad_sequence(list(rows.split(counts.tolist())), batch_first=True)
        r2 = kept + self.mamba2(self.ln_b(kept), counts)
        v = self.ln_s(r2)
        valid = torch.arange(v.shape[1], device=v.device)[None] < counts[:, None]
        alpha = torch.softmax(self.pool_scorer(v).masked_fill(~valid, float("-inf")), dim=1)
        f = (alpha[..., None] * v).sum(1)
        full = alpha.new_zeros(keep.shape).masked_scatter(keep, alpha[valid])
        return f, [full[g, :m] for g, m in enumerate(lengths.tolist())]

    def _survivors_batch(self, r1: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(G, L) mask of the kept instances (the k lowest scores of each group dropped), and the
        straight-through gate when learnable."""
        valid = torch.arange(r1.shape[1], device=r1.device)[None] < lengths[:, None]
        if not self._masking:
            return valid, None
        scores = self._mask_scores(r1)
        ranked = torch.sort(scores.detach().masked_fill(~valid, float("inf")), dim=1, stable=True).indices
        rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(r1.shape[1], device=r1.device)
                                                 .expand_as(ranked).contiguous())
        k = torch.tensor([mask_count(int(m), self.mask_ratio, min_one_masked=self.min_one_masked)
                          for m in lengths.tolist()], device=r1.device)
        keep = valid & (rank >= k[:, None])
        if not self.learnable_mask:
            return keep, None
        log_p = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), dim=1).masked_fill(~valid, 0.0)
        return keep, torch.exp(log_p - log_p.detach())

    def _survivors(self, r1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ascending indices of the kept instances, and the straight-through gate when learnable."""
        m = r1.shape[0]
        if not self._masking:
            return torch.arange(m, device=r1.device), None
        k = mask_count(m, self.mask_ratio, min_one_masked=self.min_one_masked)
        scores = self._mask_scores(r1)
        ascending = torch.sort(scores.detach(), stable=True).indices
        keep = torch.sort(ascending[k:]).values
        if not self.learnable_mask:
            return keep, None
        log_p = torch.log_softmax(scores, dim=0)
        return keep, torch.exp(log_p - log_p.detach())

    @property
    def _masking(self) -> bool:
        """Whether instances are dropped now: always for "scores", only in training for the other modes."""
        return self.mask_mode == "scores" or self.training

    def _mask_scores(self, r1: torch.Tensor) -> torch.Tensor:
        """What the k lowest are dropped by: the mask scorer's scores, or uniform noise ("random_train")."""
        if self.mask_mode == "random_train":
            return torch.rand(r1.shape[:-1], device=r1.device)
        with torch.set_grad_enabled(self.learnable_mask and torch.is_grad_enabled()):
            return self.mask_scorer(self.ln_s(r1))


class BMP(nn.Module):
    """BiMamba with max pooling, the ablation in place of IMM: r = X + BiMamba(LN(X)); f = max over instances.

    Attention: an instance's share of the dimensions where it holds the maximum (what f takes from it).
    """

    def __init__(self, d_model: int, *, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.mamba = BiMamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = (x[None] + self.mamba(self.ln(x[None])))[0]
        f, winners = r.max(0)
        return f, torch.bincount(winners, minlength=len(x)).to(r) / r.shape[1]


class ClassTokenLayer(nn.Module):
    """T' = T + Dropout(proj(MHSA(T))), 8 heads, qkv without bias, dropout 0.1 on the attention (§6)."""

    def __init__(self, d_model: int, n_heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, d_model)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        n, d = t.shape
        q, k, v = self.qkv(t).view(n, 3, self.n_heads, d // self.n_heads).permute(1, 2, 0, 3)
        attn = self.attn_drop(torch.softmax(q @ k.transpose(-1, -2) * (d // self.n_heads) ** -0.5, dim=-1))
        out = (attn @ v).transpose(0, 1).reshape(n, d)
        return t + self.proj_drop(self.proj(out))


class ClassTokenAggregator(nn.Module):
    """Prepend a N(0, 1) class token to F_sgr, run ``n_layers`` residual MHSA layers, return the token."""

    def __init__(self, d_model: int, n_layers: int = 1) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"cls_layers must be >= 1, got {n_layers}")
        self.cls_token = nn.Parameter(torch.randn(1, d_model))
        self.layers = nn.ModuleList(ClassTokenLayer(d_model) for _ in range(n_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.cls_token, tokens])
        for layer in self.layers:
            t = layer(t)
        return t[0]


@register_model("gmmamba")
class GMMamba(nn.Module):
    """GMMamba with the options of the module docstring; those left None take ``PRESETS[preset]``."""

    def __init__(
        self, in_dim: int, n_classes: int, *, preset: str = "recommended", d_model: int | None = None,
        n_groups: int = 10, grouping: Grouping = "kmeans", grouping_seed: int = 0,
        mask_ratio: float | None = None, min_one_masked: bool | None = None, learnable_mask: bool | None = None,
        mask_mode: MaskMode | None = None, mamba_native_init: bool | None = None,
        css_association: CssAssociation | None = None, feature_dropout: float | None = None,
        instance_path: bool | None = None, instance_dim: int | None = None, instance_loss_weight: float | None = None,
        instance_fusion: Fusion | None = None, use_imm: bool = True, use_css: bool = True,
        css_variant: CssVariant = "full", cls_layers: int = 1,
        d_state: int = 16, d_conv: int = 4, expand: int = 2, batch_groups: bool = True,
    ) -> None:
        super().__init__()
        check_choice("preset", preset, tuple(PRESETS))
        given = {"d_model": d_model, "mask_ratio": mask_ratio, "min_one_masked": min_one_masked,
                 "learnable_mask": learnable_mask, "mask_mode": mask_mode, "mamba_native_init": mamba_native_init,
                 "css_association": css_association, "feature_dropout": feature_dropout,
                 "instance_path": instance_path, "instance_dim": instance_dim,
                 "instance_loss_weight": instance_loss_weight,
                 "instance_fusion": instance_fusion}
        self.preset = preset
        self.options = opt = {k: PRESETS[preset][k] if v is None else v for k, v in given.items()}
        d_model = opt["d_model"]
        check_choice("instance_fusion", opt["instance_fusion"], Fusion)
        if not opt["instance_path"]:  # nothing to supervise: `instance_path: false` stays the plain group path
            opt["instance_loss_weight"] = 0.0
        self.batch_groups = batch_groups
        self.grouping, self.n_groups, self.grouping_seed = grouping, n_groups, grouping_seed
        self.group_cache_key = group_cache_key(grouping, n_groups, grouping_seed)
        self.proj = _input_projection(in_dim, d_model)
        mamba = {"d_state": d_state, "d_conv": d_conv, "expand": expand}
        self.imm = IMM(
            d_model, mask_ratio=opt["mask_ratio"], min_one_masked=opt["min_one_masked"],
            learnable_mask=opt["learnable_mask"], mask_mode=opt["mask_mode"], **mamba,
        ) if use_imm else BMP(d_model, **mamba)
        self._init_imm(opt["mamba_native_init"])
        self.css = CrossGroupSampling(d_model, association=opt["css_association"], variant=css_variant) \
            if use_css else None
        self.aggregator = ClassTokenAggregator(d_model, cls_layers)
        self.head = nn.Linear(d_model, n_classes)
        # a module only when asked: the released model's parameters and init RNG use stay as they were
        self.feature_dropout = nn.Dropout(opt["feature_dropout"]) if opt["feature_dropout"] > 0 else None
        self.instance_path = (make_instance_path(in_dim, d_model, n_classes, opt["instance_dim"])
                              if opt["instance_path"] else None)
        self._forward_state: torch.Tensor | None = None  # train-mode instance-path logits, for training_loss

    def _init_imm(self, mamba_native_init: bool) -> None:
        """§7: the reference re-inits all of IMM (its unused ``_fc1``, our projection, included)."""
        imm = self.imm
        if mamba_native_init:
            parts = [imm.ln] if isinstance(imm, BMP) else [imm.ln_a, imm.ln_b, imm.ln_s, imm.mask_scorer,
                                                            imm.pool_scorer]
        else:
            parts = [imm]
        for part in [*parts, self.proj]:
            xavier_reinit_(part)

    def cohort_options(self, coords: list[np.ndarray]) -> dict[str, Any]:
        """The preset's resolved values, pinned into the run's options (and so its checkpoints): a later change
        of what a preset means (§14, §16) leaves a trained run's model as it was built."""
        return {"preset": self.preset, **self.options}

    def make_groups(self, features: np.ndarray | None, coords: np.ndarray) -> list[np.ndarray]:
        """LG groups for one slide (§2); deterministic, so callers cache them under ``group_cache_key``.

        ``features`` is read only by ``grouping="feature_kmeans"`` and may be None otherwise.
        """
        return make_groups(
            coords, features, method=self.grouping, n_groups=self.n_groups, seed=self.grouping_seed
        )

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor, groups: list[Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) features, (N, 2) coords -> logits (1, C) and attention (N,) (module docstring)."""
        check_bag(features)
        if groups is None:
            feats = features.detach().cpu().numpy() if self.grouping == "feature_kmeans" else None
            groups = self.make_groups(feats, coords.detach().cpu().numpy())
        x = self.proj(features)
        if self.feature_dropout is not None:
            x = self.feature_dropout(x)
        index = [torch.as_tensor(g, dtype=torch.long, device=x.device) for g in groups]
        if any(len(g) == 0 for g in index):
            raise ValueError("every group must hold at least one instance")
        groups_x = [x.index_select(0, idx) for idx in index]
        if self.batch_groups and isinstance(self.imm, IMM):
            group_vectors, alphas = self.imm.forward_batch(groups_x)
            pooled = list(zip(group_vectors, alphas, strict=True))
        else:  # each group alone, as released
            pooled = [self.imm(g) for g in groups_x]
            group_vectors = torch.stack([f for f, _ in pooled])
        if self.css is None:  # ablation: every group vector is a token, equally weighted for the attention
            sampled, q = group_vectors, group_vectors.new_full((len(group_vectors),), 1 / len(group_vectors))
        else:
            sampled, q = self.css(group_vectors)
        weights = torch.cat([q[g] * alpha for g, (_, alpha) in enumerate(pooled)])
        attn = weights.new_zeros(features.shape[0]).index_copy(0, torch.cat(index), weights)
        if self.instance_path is None:
            return self.head(self.aggregator(sampled))[None], attn
        instance_logits, beta = self.instance_path(features if self.instance_path.reads_features else x)
        supervised = self.training and self.options["instance_loss_weight"] > 0
        self._forward_state = instance_logits if supervised else None
        return self._fuse(self.head(self.aggregator(sampled))[None], instance_logits), (attn + beta) / 2

    def _fuse(self, group_logits: torch.Tensor, instance_logits: torch.Tensor) -> torch.Tensor:
        """The output logits from both paths' (``instance_fusion``, §16)."""
        logits = group_logits + instance_logits
        return logits / 2 if self.options["instance_fusion"] == "mean" else logits

    def training_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Bag cross-entropy, plus the instance path's own (deep supervision, §16) when its weight is > 0:
        the released model's loss is exactly ``F.cross_entropy(logits, target)``."""
        loss = F.cross_entropy(logits, target)
        if self.options["instance_loss_weight"] > 0:
            loss = loss + self.options["instance_loss_weight"] * F.cross_entropy(pop_forward_state(self), target)
        return loss


def _input_projection(in_dim: int, d_model: int) -> nn.Module:
    """§1: identity when D == d_model, else the reference's (unused) ``_fc1``: Linear + GELU + Dropout."""
    if in_dim == d_model:
        return nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(0.25))


