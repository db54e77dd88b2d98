"""CONCH v1.5's vision tower: a timm ViT-L/16 trunk + the CoCa attentional pooler + LayerNorm (768-d).

Written here because neither timm nor the installed packages have CoCa's pooler (timm's `AttentionPoolLatent`
adds a bias, a residual MLP and no key norm); open_clip would be a dependency for 20 lines. Attribute names are
the official ones (``trunk``, ``attn_pool_contrast``, ``ln_contrast``), so the published file loads key for key.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries attend over the (LayerNorm-ed) tokens: multi-head attention without biases."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, context_dim) → (B, n_queries, d_model)."""
        batch = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d_head) v, as CoCa computes it
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """trunk tokens (final norm applied) → pooled query 0 → LayerNorm: CONCH v1.5's 768-d patch embedding."""

    def __init__(self, trunk: nn.Module, dim: int = 768):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(d_model=dim, context_dim=trunk.embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])
