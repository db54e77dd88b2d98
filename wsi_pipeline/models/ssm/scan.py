"""Mamba's selective scan (S6) and its depthwise causal conv: mamba-ssm's signatures, two backends.

`selective_scan` and `causal_conv1d` take mamba-ssm's / causal-conv1d's arguments and semantics. On CUDA
tensors with those packages installed they call the upstream kernels. Everywhere else our own code runs:
on CPU, numba kernels (scan_cpu.py), which exist for speed and memory (SIMD over channels and a hand-derived
backward that recomputes states from checkpoints, so the (L x d x n) state tensor of a PyTorch formulation is
never held); on other devices or without numba, a chunked PyTorch loop with gradient checkpointing.
`WSIP_SCAN=torch|cuda` forces one side; the rule is `backend.plan`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from wsi_pipeline.models.ssm import backend, numba_primitives, scan_cpu

# ---------------------------------------------------------------- backend choice


@functools.cache
def _load_cuda_op(module: str, attr: str) -> tuple[Callable | None, str]:
    """Import an upstream CUDA op lazily (mamba-ssm cannot even be imported without CUDA); cached."""
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception as err:  # any failure (ImportError, missing CUDA libs, ABI mismatch) = unavailable
        return None, f"{type(err).__name__}: {err}"


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def implementation(op: str, t: torch.Tensor) -> tuple[str, Callable | None]:
    """`backend.plan`'s choice for `op` on tensor `t`, with the upstream kernel when that is the choice."""
    module, attr, _ = backend.CUDA_OPS[op]
    fn, why = _load_cuda_op(module, attr)
    device = "cuda" if _is_cuda(t) else t.device.type
    choice = backend.plan(op, device, cuda_op=fn is not None, numba=numba_primitives.AVAILABLE, why=why)
    return choice, fn if choice == backend.CUDA else None


def cuda_kernel_error(op: str) -> str | None:
    """None when `op`'s upstream CUDA kernel imports, else why not (what `wsip doctor --gpu` reports)."""
    module, attr, _ = backend.CUDA_OPS[op]
    fn, why = _load_cuda_op(module, attr)
    return None if fn is not None else why


# ---------------------------------------------------------------- public API


def compute_args(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The scans compute in float32 (float64 when the first tensor is float64: gradchecks), on contiguous
    memory; None stays None."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def selective_scan(
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
    """mamba-ssm's `selective_scan_fn`: y = (scan(u) + D*u) * silu(z).

    Shapes: u, delta, z (b, d, L); A (d, n); B, C (b, n, L), shared by all channels; D, delta_bias (d,).
    Per channel: dt = delta + delta_bias (softplus'd if asked), h_t = exp(dt*A) h_{t-1} + dt u_t B_t,
    y_t = <h_t, C_t>. Returns y (b, d, L) in u's dtype.
    """
    choice, cuda_fn = implementation("selective_scan", u)
    if cuda_fn is not None:
        return cuda_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    args = compute_args(u, delta, A, B, C, D, z, delta_bias)
    if choice == backend.NUMBA:
        y = _NumbaScan.apply(*args, delta_softplus)
    else:
        y = _scan_torch(*args, delta_softplus=delta_softplus)
    return y.to(u.dtype)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """causal-conv1d's `causal_conv1d_fn`: depthwise conv over time, output t sees inputs <= t.

    x (b, d, L), weight (d, k), bias (d,); activation None or "silu"/"swish".
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    choice, cuda_fn = implementation("causal_conv1d", x)
    if cuda_fn is not None:
        return cuda_fn(x, weight, bias, activation=activation)
    if choice == backend.NUMBA:  # torch's depthwise conv1d backward: ~10x slower
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        args = [None if t is None else t.to(dtype).contiguous() for t in (x, weight, bias)]
        return _NumbaCausalConv.apply(*args, activation is not None).to(x.dtype)
    out = F.conv1d(F.pad(x, (weight.shape[1] - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return out if activation is None else F.silu(out)


# ---------------------------------------------------------------- PyTorch fallback (any device)


def _scan_chunk(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain recurrence over one chunk; returns its outputs and the final state."""
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1), h


def _scan_torch(
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
    chunk: int = scan_cpu.CKPT_STEPS,
) -> torch.Tensor:
    """`selective_scan` in plain PyTorch for devices numba cannot serve; memory O(chunk*d*n + L/chunk*d*n).

    Each chunk is checkpointed, so the backward recomputes its states instead of keeping all L of them.
    """
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t0 in range(0, u.shape[-1], chunk):
        part = slice(t0, t0 + chunk)
        y, h = checkpoint(_scan_chunk, u[..., part], dt[..., part], A, B[..., part], C[..., part], h,
                          use_reentrant=False)
        ys.append(y)
    y = torch.cat(ys, dim=-1)
    y = y if D is None else y + D[:, None] * u
    return y if z is None else y * F.silu(z)


# ---------------------------------------------------------------- CPU: autograd over the numba kernels (scan_cpu.py)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class _NumbaScan(torch.autograd.Function):
    """Saves the inputs, dt, its slope and one state per scan_cpu.CKPT_STEPS steps; the backward recomputes the
    rest, chunk by chunk."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        nb, nd, L = u.shape
        A_t, Bt, Ct = A.t().contiguous(), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        Dv = (D if D is not None else u.new_zeros(nd)).view(1, nd)
        bias = (delta_bias if delta_bias is not None else u.new_zeros(nd)).view(1, nd)
        save = any(ctx.needs_input_grad)
        ckpt = u.new_empty(nb, -(-L // scan_cpu.CKPT_STEPS) if save else 0, A.shape[1], nd)
        dt, slope = (torch.empty_like(u) if save else u.new_empty(0, 0, 0) for _ in range(2))
        y = torch.empty_like(u)
        inputs = (u, delta, A_t, Bt, Ct, Dv, z if z is not None else u, bias)
        arrays = (*map(_np, inputs), delta_softplus, z is not None, *map(_np, (y, dt, slope, ckpt)))
        ntasks = nb * -(-nd // scan_cpu.LANES)
        scan_cpu.run_tasks(scan_cpu.scan_fwd_kernel, ntasks, u.numel(), scan_cpu.LANES, *arrays)
        ctx.save_for_backward(u, dt, slope, A_t, Bt, Ct, Dv, z, ckpt)
        ctx.has = (D is not None, delta_bias is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        u, dt, slope, A_t, Bt, Ct, Dv, z, ckpt = ctx.saved_tensors
        has_D, has_bias = ctx.has
        nb, nd, L = u.shape
        n = A_t.shape[0]
        groups = min(-(-nd // scan_cpu.LANES), -(-torch.get_num_threads() // nb))  # channel groups per batch
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else u.new_empty(0, 0, 0)
        dA = u.new_zeros(nb, n, nd, dtype=torch.float64)
        dD, dbias = u.new_zeros(nb, nd, dtype=torch.float64), u.new_zeros(nb, nd, dtype=torch.float64)
        dB, dC = (u.new_empty(nb, groups, L, n, dtype=torch.float64) for _ in range(2))
        inputs = (u, dt, slope, A_t, Bt, Ct, Dv, z if z is not None else u)
        grads = (du, ddelta, dz, dA, dD, dbias, dB, dC)
        arrays = (*map(_np, inputs), z is not None, *map(_np, (ckpt, dy.contiguous(), *grads)))
        scan_cpu.run_tasks(scan_cpu.scan_bwd_kernel, nb * groups, u.numel(), scan_cpu.LANES, *arrays)
        dtype = u.dtype
        return (
            du,
            ddelta,
            dA.sum(0).t().to(dtype),
            dB.sum(1).transpose(1, 2).to(dtype),
            dC.sum(1).transpose(1, 2).to(dtype),
            dD.sum(0).to(dtype) if has_D else None,
            dz if z is not None else None,
            dbias.sum(0).to(dtype) if has_bias else None,
            None,
        )


class _NumbaCausalConv(torch.autograd.Function):
    """Saves only the inputs; the backward recomputes the pre-activation row by row."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        bias_v = bias if bias is not None else x.new_zeros(x.shape[1])
        out = torch.empty_like(x)
        arrays = (*map(_np, (x, weight, bias_v)), silu, _np(out))
        scan_cpu.run_tasks(scan_cpu.conv_rows, x.shape[0] * x.shape[1], x.numel(), *arrays)
        ctx.save_for_backward(x, weight, bias_v)
        ctx.flags = (bias is not None, silu)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias_v = ctx.saved_tensors
        has_bias, silu = ctx.flags
        dx = torch.empty_like(x)
        dw = x.new_empty(x.shape[0], *weight.shape, dtype=torch.float64)
        dbias = x.new_empty(x.shape[:2], dtype=torch.float64)
        arrays = (*map(_np, (x, weight, bias_v)), silu, *map(_np, (dy.contiguous(), dx, dw, dbias)))
        scan_cpu.run_tasks(scan_cpu.conv_rows_bwd, x.shape[0] * x.shape[1], x.numel(), *arrays)
        return dx, dw.sum(0).to(x.dtype), dbias.sum(0).to(x.dtype) if has_bias else None, None
