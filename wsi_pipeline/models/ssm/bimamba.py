"""BiMamba, the bidirectional Mamba block of GMMamba (docs/gmmamba.md §3) and MambaMIL's SRMamba (§13).

The released models import a vendored, CUDA-only fork of mamba-ssm 1.1.2 ("v2" Vim-style BiMamba) whose
non-fused fallback is broken. This is the same block on `scan.selective_scan` / `scan.causal_conv1d`, so it
runs on CPU and calls the upstream CUDA kernels unchanged on a GPU. Parameter names follow mamba-ssm's
(`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`), grouped per direction.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.models.ssm.scan import causal_conv1d, selective_scan
from wsi_pipeline.models.ssm.scan2d import selective_scan_2d

Reverse = Literal["flip", "stride"]


def _channels_first_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(out, in) weight applied to x (B, in, L) -> (B, out, L) contiguous, as one GEMM per batch element.
    The scan wants channels first; nn.Linear on a transposed view (or torch.matmul's 2-D @ 3-D folding) gives
    a transposed result instead, and each such layout change costs a strided copy forward and backward.
    It is one matrix product over all B·L steps: a bmm over an expanded weight would materialise and reduce a
    (B, out, in) weight gradient in backward — for short sequences (GMMamba's groups) the dominant cost. The
    (B, in, L) ↔ (in, B·L) copies it needs instead are activation-sized, and free for B = 1."""
    b, d_in, length = x.shape
    if b == 1:
        return (weight @ x[0])[None]
    y = weight @ x.transpose(0, 1).reshape(d_in, b * length)
    return y.view(-1, b, length).transpose(0, 1).contiguous()


def _mamba_dt_init_(
    dt_proj: nn.Linear, *, dt_scale: float, dt_min: float, dt_max: float, dt_init_floor: float
) -> None:
    """mamba-ssm's dt init: weight U(+-dt_rank^-0.5 * dt_scale), bias = softplus^-1 of a log-uniform dt."""
    std = dt_proj.in_features**-0.5 * dt_scale
    nn.init.uniform_(dt_proj.weight, -std, std)
    log_dt = torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class SSMDirection(nn.Module):
    """One scan direction's own parameters and computation: causal conv, x_proj, dt_proj, A, D.

    The scan runs along the sequence, or, given `grid=(H, W)`, over the cells of a raster-flattened H x W grid
    (2DMamba, docs/mamba2d.md): the causal conv still reads the flattened sequence, as 2DMamba's does.
    The dt defaults are mamba-ssm's.
    """

    def __init__(
        self,
        d_inner: int,
        *,
        d_state: int,
        d_conv: int,
        dt_rank: int,
        dt_scale: float = 1.0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        _mamba_dt_init_(self.dt_proj, dt_scale=dt_scale, dt_min=dt_min, dt_max=dt_max,
                        dt_init_floor=dt_init_floor)
        a_init = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # A = -(1..n)
        self.A_log = nn.Parameter(torch.log(a_init))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: torch.Tensor, z: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x, z (b, d_inner, L) -> gated scan output (b, d_inner, L); dt's bias is applied inside the scan.
        With `grid=(H, W)`, L = H * W cells in row-major order and the scan is `selective_scan_2d`."""
        u = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x_dbl = _channels_first_linear(self.x_proj.weight, u)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = _channels_first_linear(self.dt_proj.weight, dt)
        A, bias = -torch.exp(self.A_log), self.dt_proj.bias
        if grid is None:
            return selective_scan(u, delta, A, B, C, self.D, z, delta_bias=bias, delta_softplus=True)
        u, delta, B, C, z = (t.unflatten(-1, grid) for t in (u, delta, B, C, z))
        return selective_scan_2d(u, delta, A, B, C, self.D, z, delta_bias=bias, delta_softplus=True).flatten(-2)


def stride_order(x: torch.Tensor, rate: int) -> torch.Tensor:
    """SRMamba's reading order: zero-pad time to a multiple of `rate`, then x0, xR, x2R, ..., x1, xR+1, ..."""
    x = F.pad(x, (0, -x.shape[-1] % rate))
    b, d, length = x.shape
    return x.view(b, d, length // rate, rate).transpose(-1, -2).reshape(b, d, length)


def stride_restore(y: torch.Tensor, rate: int, length: int) -> torch.Tensor:
    """Inverse of `stride_order`, dropping the padding: back to time order, first `length` steps."""
    b, d, padded = y.shape
    return y.view(b, d, rate, padded // rate).transpose(-1, -2).reshape(b, d, padded)[..., :length]


def reversal_index(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) gather index reversing each row's first `lengths[b]` steps and keeping the padding after
    them in place; it is its own inverse."""
    t = torch.arange(length, device=lengths.device)[None]
    m = lengths[:, None]
    return torch.where(t < m, m - 1 - t, t)


class BiMamba(nn.Module):
    """Shared in_proj -> forward scan + second scan over a reordered sequence -> sum -> shared out_proj.

    `reverse="flip"` is GMMamba's BiMamba: the second direction reads x and z backwards in time and its
    output is flipped back. `reverse="stride"` is MambaMIL's SRMamba: it reads them in `stride_order`.
    The directions are summed, not averaged. Input and output are (B, L, d_model).
    """

    def __init__(
        self,
        d_model: int = 512,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_scale: float = 1.0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        reverse: Reverse = "flip",
        rate: int = 10,
    ) -> None:
        super().__init__()
        if reverse not in ("flip", "stride"):
            raise ValueError(f"reverse must be 'flip' or 'stride', got {reverse!r}")
        if reverse == "stride" and rate < 1:
            raise ValueError(f"rate must be >= 1, got {rate}")
        self.reverse, self.rate = reverse, rate
        d_inner = expand * d_model
        direction = {
            "d_state": d_state,
            "d_conv": d_conv,
            "dt_rank": dt_rank if dt_rank is not None else math.ceil(d_model / 16),
            "dt_scale": dt_scale,
            "dt_min": dt_min,
            "dt_max": dt_max,
            "dt_init_floor": dt_init_floor,
        }
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.fwd = SSMDirection(d_inner, **direction)
        self.bwd = SSMDirection(d_inner, **direction)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _second_direction(self, xz: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        length = xz.shape[-1]
        if self.reverse == "flip" and lengths is not None:
            index = reversal_index(lengths, length)[:, None, :].expand_as(xz)
            return self.bwd(*xz.gather(-1, index).chunk(2, dim=1)).gather(-1, index[:, : xz.shape[1] // 2])
        if self.reverse == "flip":
            return self.bwd(*xz.flip(-1).chunk(2, dim=1)).flip(-1)
        if lengths is not None:
            raise ValueError("padded batches (lengths) need reverse='flip'")
        return stride_restore(self.bwd(*stride_order(xz, self.rate).chunk(2, dim=1)), self.rate, length)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model). `lengths` (B,): sequences right-padded to L; the second
        direction then reverses each sequence's first `lengths[b]` steps only, so in both directions padding
        follows every real step and (causal conv and scan) never changes a real step's output."""
        xz = _channels_first_linear(self.in_proj.weight, hidden.transpose(1, 2))
        y = self.fwd(*xz.chunk(2, dim=1)) + self._second_direction(xz, lengths)
        # transposing the (B, d_model, L) result is the cheapest layout change left (d_model < d_inner)
        return _channels_first_linear(self.out_proj.weight, y).transpose(1, 2).contiguous()


class SRMamba(BiMamba):
    """MambaMIL's SRMamba: BiMamba whose second direction reads the sequence with stride `rate`."""

    def __init__(self, d_model: int = 512, *, rate: int = 10, **kwargs: object) -> None:
        super().__init__(d_model, reverse="stride", rate=rate, **kwargs)


def xavier_reinit_(module: nn.Module) -> nn.Module:
    """GMMamba/MambaMIL's re-init (docs/gmmamba.md §7), run by the model after construction: every nn.Linear
    (inside BiMambas too, so dt_proj's bias becomes 0) gets Xavier-normal weights and zero bias, every
    LayerNorm weight 1 / bias 0; convs, A_log and D keep their values. Returns `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module
