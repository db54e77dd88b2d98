"""2DMamba's Mamba block (docs/mamba2d.md): Mamba's in_proj → conv → S6 → gate → out_proj, with a 2-D scan.

The same parts as one BiMamba direction (`SSMDirection`: depthwise causal conv, x_proj, dt_proj, A_log, D),
but the selective scan runs over the H x W grid of cells (`scan2d.selective_scan_2d`) instead of along the
sequence. As in 2DMamba, the causal conv still reads the raster-flattened grid: a cell sees the three cells
before it in row-major order, the end of the previous row included. Parameter names follow mamba-ssm's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsi_pipeline.models.ssm.bimamba import SSMDirection, _channels_first_linear


class Mamba2D(nn.Module):
    """(B, H*W, d_model) row-major cells -> (B, H*W, d_model); no biases in the projections, as mamba-ssm."""

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.ssm = SSMDirection(d_inner, d_state=d_state, d_conv=d_conv, dt_rank=math.ceil(d_model / 16))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`hidden` holds the cells of a `grid = (H, W)` in row-major order."""
        if hidden.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"expected {grid[0]} x {grid[1]} cells, got {hidden.shape[1]}")
        xz = _channels_first_linear(self.in_proj.weight, hidden.transpose(1, 2))
        y = self.ssm(*xz.chunk(2, dim=1), grid=grid)
        return _channels_first_linear(self.out_proj.weight, y).transpose(1, 2).contiguous()
