"""2-D selective scan (2DMamba's S6 over a grid of cells), with `selective_scan`'s conventions and backends.

Per channel, over the cells (i, j) of an H x W grid: dt = delta + delta_bias (softplus'd if asked),
Ā = exp(dt A), B̄x = dt u B; a horizontal pass along each row g[i, j] = Ā[i, j] g[i, j-1] + B̄x[i, j], then a
vertical pass down each column over those row states h[i, j] = Ā[i, j] h[i-1, j] + g[i, j] (the cell's own Ā
again, as 2DMamba's CUDA kernel does); y = (<h, C> + D u) * silu(z). In closed form
h[i, j] = sum_{i'<=i, j'<=j} (prod_{m=i'+1..i} Ā[m, j]) (prod_{k=j'+1..j} Ā[i', k]) B̄x[i', j'].

On CPU with numba the kernels of scan2d_cpu.py run (SIMD over channels, a backward that recomputes row bands
from saved state rows); elsewhere (CUDA, or no numba) a PyTorch loop, checkpointed per band of rows. Neither
holds the H x W x d x n states of a grid, which a PyTorch parallel scan materialises several times over.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from wsi_pipeline.models.ssm import numba_primitives, scan2d_cpu, scan_cpu
from wsi_pipeline.models.ssm.scan import compute_args


def band_rows(height: int) -> int:
    """Rows per checkpoint band, ceil(sqrt(H)): the saved state rows (H / band) and the rows one band recomputes
    (band) then both cost O(sqrt(H) W d n) memory, against O(H W d n) for keeping every state."""
    return math.isqrt(max(height, 1) - 1) + 1


def selective_scan_2d(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The 2-D selective scan of the module docstring with mamba-ssm's argument conventions.

    Shapes: u, delta, z (b, d, H, W); A (d, n); B, C (b, n, H, W), shared by all channels; D, delta_bias (d,).
    Returns y (b, d, H, W) in u's dtype (computed in float32, or float64 for float64 inputs).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    args = compute_args(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type == "cpu" and numba_primitives.AVAILABLE:
        y = _NumbaScan2d.apply(*args, delta_softplus)
    else:
        y = _scan2d_torch(*args, delta_softplus=delta_softplus)
    return y.to(u.dtype)


def _check_shapes(*tensors: torch.Tensor | None) -> None:
    """(u, delta, A, B, C, D, z, delta_bias): fail here, as the numba kernels do not bounds-check and a mismatched
    shape would read garbage."""
    u, delta, A, B, C, D, z, delta_bias = tensors
    if u.dim() != 4 or A.dim() != 2:
        raise ValueError(f"u must be (b, d, H, W) and A (d, n); got u {tuple(u.shape)}, A {tuple(A.shape)}")
    b, d, H, W = u.shape
    n = A.shape[1]
    expected = {"delta": (b, d, H, W), "z": (b, d, H, W), "A": (d, n), "B": (b, n, H, W), "C": (b, n, H, W),
                "D": (d,), "delta_bias": (d,)}
    given = {"delta": delta, "z": z, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}
    for name, t in given.items():
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]} for u {tuple(u.shape)}, A {tuple(A.shape)}; "
                             f"got {tuple(t.shape)}")


# ---------------------------------------------------------------- PyTorch path (any device)


def _band_torch(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One band of R rows: u, dt (b, d, R, W); B, C (b, n, R, W); h (b, d, W, n), the state row above the band.
    The horizontal pass steps along W for all R rows at once, the vertical one steps down the R rows for all W
    columns at once: W + R steps of whole-band tensor ops. Returns <h, C> (b, d, R, W) and the last state row."""
    decay = torch.exp(dt[..., None] * A[:, None, None, :])  # (b, d, R, W, n)
    bx = (dt * u)[..., None] * B.permute(0, 2, 3, 1)[:, None]  # (b, d, R, W, n)
    g = torch.zeros_like(bx[:, :, :, 0])
    gs = []
    for j in range(u.shape[-1]):
        g = decay[:, :, :, j] * g + bx[:, :, :, j]
        gs.append(g)
    g_all, ct = torch.stack(gs, dim=3), C.permute(0, 2, 3, 1)  # (b, d, R, W, n), (b, R, W, n)
    ys = []
    for r in range(u.shape[2]):
        h = decay[:, :, r] * h + g_all[:, :, r]
        ys.append((h * ct[:, None, r]).sum(-1))
    return torch.stack(ys, dim=2), h


def _scan2d_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    delta_softplus: bool = False,
    band: int | None = None,
) -> torch.Tensor:
    """`selective_scan_2d` in plain PyTorch for devices numba cannot serve. Each band of rows is checkpointed, so
    autograd keeps one state row per band and the backward recomputes one band at a time: memory
    O((H / band + band) W d n), not O(H W d n)."""
    dt = delta if delta_bias is None else delta + delta_bias[:, None, None]
    dt = F.softplus(dt) if delta_softplus else dt  # torch's softplus is the identity above 20, as mamba-ssm's
    band = band or band_rows(u.shape[2])
    h = u.new_zeros(u.shape[0], u.shape[1], u.shape[3], A.shape[1])
    ys = []
    for i0 in range(0, u.shape[2], band):
        rows = slice(i0, i0 + band)
        y, h = checkpoint(_band_torch, u[:, :, rows], dt[:, :, rows], A, B[:, :, rows], C[:, :, rows], h,
                          use_reentrant=False)
        ys.append(y)
    y = torch.cat(ys, dim=2)
    y = y if D is None else y + D[:, None, None] * u
    return y if z is None else y * F.silu(z)


# ---------------------------------------------------------------- CPU: autograd over the numba kernels


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _cells(t: torch.Tensor) -> torch.Tensor:
    """(b, c, H, W) -> (b, c, H*W), the kernels' row-major cell axis."""
    return t.view(t.shape[0], t.shape[1], -1)


def _cells_last(t: torch.Tensor) -> torch.Tensor:
    """B or C (b, n, H, W) -> (b, H*W, n): the kernels read all n states of one cell together."""
    return _cells(t).transpose(1, 2).contiguous()


class _NumbaScan2d(torch.autograd.Function):
    """Saves the inputs, dt, its slope and the state row above every band; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        nb, nd, H, W = u.shape
        n, band = A.shape[1], band_rows(H)
        A_t, Bt, Ct = A.t().contiguous(), _cells_last(B), _cells_last(C)
        Dv = (D if D is not None else u.new_zeros(nd)).view(1, nd)
        bias = (delta_bias if delta_bias is not None else u.new_zeros(nd)).view(1, nd)
        save = any(ctx.needs_input_grad)
        ckpt = u.new_empty(nb, -(-H // band) if save else 0, W, n, nd)
        dt, slope = (_cells(torch.empty_like(u)) if save else u.new_empty(0, 0, 0) for _ in range(2))
        y = torch.empty_like(u)
        inputs = (_cells(u), _cells(delta), A_t, Bt, Ct, Dv, _cells(z if z is not None else u), bias)
        arrays = (*map(_np, inputs), delta_softplus, z is not None, *map(_np, (_cells(y), dt, slope, ckpt)))
        ntasks = nb * -(-nd // scan_cpu.LANES)
        scan_cpu.run_tasks(scan2d_cpu.scan2d_fwd_kernel, ntasks, u.numel(), scan_cpu.LANES, band, W, *arrays)
        ctx.save_for_backward(u, dt, slope, A_t, Bt, Ct, Dv, z, ckpt)
        ctx.has = (D is not None, delta_bias is not None, band)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        u, dt, slope, A_t, Bt, Ct, Dv, z, ckpt = ctx.saved_tensors
        has_D, has_bias, band = ctx.has
        nb, nd, H, W = u.shape
        n = A_t.shape[0]
        groups = min(-(-nd // scan_cpu.LANES), -(-torch.get_num_threads() // nb))  # channel groups per batch
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else None
        dA = u.new_zeros(nb, n, nd, dtype=torch.float64)
        dD, dbias = u.new_zeros(nb, nd, dtype=torch.float64), u.new_zeros(nb, nd, dtype=torch.float64)
        dB, dC = (u.new_zeros(nb, groups, H * W, n, dtype=torch.float64) for _ in range(2))
        inputs = (_cells(u), dt, slope, A_t, Bt, Ct, Dv, _cells(z if z is not None else u))
        dz_cells = _cells(dz) if dz is not None else u.new_empty(0, 0, 0)
        grads = (_cells(du), _cells(ddelta), dz_cells, dA, dD, dbias, dB, dC)
        arrays = (*map(_np, inputs), z is not None, _np(ckpt), _np(_cells(dy.contiguous())), *map(_np, grads))
        scan_cpu.run_tasks(scan2d_cpu.scan2d_bwd_kernel, nb * groups, u.numel(), scan_cpu.LANES, band, W, *arrays)
        dtype = u.dtype

        def grid(d_cells: torch.Tensor) -> torch.Tensor:  # (b, groups, H*W, n) -> (b, n, H, W)
            return d_cells.sum(1).transpose(1, 2).reshape(nb, n, H, W).to(dtype)

        return (
            du,
            ddelta,
            dA.sum(0).t().to(dtype),
            grid(dB),
            grid(dC),
            dD.sum(0).to(dtype) if has_D else None,
            dz,
            dbias.sum(0).to(dtype) if has_bias else None,
            None,
        )
