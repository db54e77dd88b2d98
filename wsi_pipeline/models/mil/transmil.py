"""TransMIL (Shao et al. 2021) with a compact in-house Nyström attention (docs/gmmamba.md §13).

Nyström attention is written here (~50 lines) rather than taken from the ``nystrom-attention`` package:
that package is a tiny, unmaintained repository that would add itself and einops as dependencies for one
layer. This version follows it: 8 heads × 64, 256 landmarks (segment means of the zero-front-padded
sequence), 6 Moore-Penrose iterations, a residual depthwise conv (kernel 33) on the values, dropout 0.1.

Model (official ``szc19990412/TransMIL``, input dim configurable): ``Linear(D, 512) + ReLU``; pad the
sequence to ⌈√N⌉² by repeating its first tokens; prepend a N(0, 1) class token; TransLayer; PPEG (depthwise
7/5/3 convs + identity on the H×W grid); TransLayer; LayerNorm; class token -> ``Linear(512, C)``.

Attention for heatmaps: the class token's row of the second layer's Nyström attention matrix
(``softmax(QK̃ᵀ) pinv(softmax(Q̃K̃ᵀ)) softmax(Q̃Kᵀ)``, one row: cheap), averaged over heads, with the
padding copies folded back onto the instances they repeat. Nyström rows only approximately sum to 1 and
can dip below 0, so the row is clipped at 0 and renormalised to sum to 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.models.mil.pooling import check_bag
from wsi_pipeline.models.mil.registry import GrouplessMixin, register_model


def moore_penrose_pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Iterative pseudo-inverse of a batch of (m, m) matrices (Razavi et al. 2019, as in Nyströmformer)."""
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).max() * abs_x.sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(
        self, dim: int, *, heads: int = 8, landmarks: int = 256, pinv_iters: int = 6,
        conv_kernel: int = 33, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.heads, self.landmarks, self.pinv_iters = heads, landmarks, pinv_iters
        self.dim_head = dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(
            heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: torch.Tensor, *, cls_row: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, dim) -> (n, dim), plus token 0's head-averaged attention row (n,) when ``cls_row``."""
        n, dim = x.shape
        pad = -n % self.landmarks
        x = F.pad(x, (0, 0, pad, 0))  # zeros in front, as the reference does
        q, k, v = self.to_qkv(x).view(n + pad, 3, self.heads, self.dim_head).permute(1, 2, 0, 3)
        q = q * self.dim_head**-0.5
        seg = (n + pad) // self.landmarks
        q_l = q.reshape(self.heads, self.landmarks, seg, self.dim_head).mean(2)
        k_l = k.reshape(self.heads, self.landmarks, seg, self.dim_head).mean(2)
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        attn2_inv = moore_penrose_pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1), self.pinv_iters)
        attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
        out = (attn1 @ attn2_inv) @ (attn3 @ v) + self.res_conv(v[None])[0]
        out = self.to_out(out.transpose(0, 1).reshape(n + pad, dim))[pad:]
        row = (attn1[:, pad : pad + 1] @ attn2_inv @ attn3)[:, 0, pad:].mean(0) if cls_row else None
        return out, row


class TransLayer(nn.Module):
    """Pre-LN residual Nyström attention block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, landmarks=dim // 2)

    def forward(self, x: torch.Tensor, *, cls_row: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, row = self.attn(self.norm(x), cls_row=cls_row)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7/5/3 convs plus identity on the H×W token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, grid = x[:1], x[1:].T.reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2)[0].T])


@register_model("transmil")
class TransMIL(GrouplessMixin, nn.Module):
    def __init__(self, in_dim: int, n_classes: int, *, dim: int = 512) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, dim))
        self.layer1 = TransLayer(dim)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, groups: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> logits (1, C) and the class token's attention over the N instances (sums to 1)."""
        check_bag(features)
        n = features.shape[0]
        side = math.ceil(math.sqrt(n))
        h = self.embed(features)
        h = torch.cat([self.cls_token, h, h[: side * side - n]])
        h, _ = self.layer1(h)
        h, row = self.layer2(self.ppeg(h, side), cls_row=True)
        logits = self.classifier(self.norm(h[0]))[None]
        return logits, _fold_padding(row[1:], n)


def _fold_padding(row: torch.Tensor, n: int) -> torch.Tensor:
    """Add the weights of the padding copies onto instances 0.., clip at 0, renormalise to sum to 1."""
    attn = row[:n].clone()
    attn[: row.shape[0] - n] += row[n:]
    attn = attn.clamp_min(0)
    return attn / attn.sum().clamp_min(torch.finfo(attn.dtype).tiny)

