"""The numba building blocks both CPU scans' kernels share (`scan_cpu`, `scan2d_cpu`): the jit settings, exp and
log1p written out in float32 arithmetic, softplus with its slope, and the copies between arrays and the
(steps, lanes) tiles the kernels vectorise over. Why they look the way they do: see `scan_cpu`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

try:
    import llvmlite.ir as llvm_ir
    import numba
    import numba.extending
except ImportError:  # numba is a core dependency; this only keeps a broken install usable
    numba = None

AVAILABLE = numba is not None

_ZERO, _HALF, ONE = np.float32(0.0), np.float32(0.5), np.float32(1.0)
_SOFTPLUS_LINEAR = np.float32(20.0)  # mamba-ssm's softplus is the identity above this
_EXP_LO, _EXP_HI = np.float32(-88.0), np.float32(88.0)
_LOG2E, _LN2, _SQRT2 = np.float32(1.4426950408889634), np.float32(0.6931471805599453), np.float32(2**0.5)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_E0, _E1, _E2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_E3, _E4, _E5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_L0, _L1, _L2 = np.float32(7.0376836292e-2), np.float32(-1.1514610310e-1), np.float32(1.1676998740e-1)
_L3, _L4, _L5 = np.float32(-1.2420140846e-1), np.float32(1.4249322787e-1), np.float32(-1.6668057665e-1)
_L6, _L7, _L8 = np.float32(2.0000714765e-1), np.float32(-2.4999993993e-1), np.float32(3.3333331174e-1)


def jit(inline: bool = False) -> Callable[[Callable], Callable]:
    """numba.njit with the kernels' settings: exact math; numpy's error model (a Python-style
    ZeroDivisionError check would block vectorisation); on-disk cache; GIL released, so plain Python
    threads run kernels side by side (half the compile time of parallel=True). Identity without numba."""

    def wrap(fn: Callable) -> Callable:
        if numba is None:
            return fn
        return numba.njit(fastmath=False, error_model="numpy", cache=True, nogil=True,
                          inline="always" if inline else "never")(fn)

    return wrap


def _pow2_typer(typingctx, m):
    """2**m for an int32 m in [-127, 128] (0 and inf at the ends), written into the exponent bits."""

    def codegen(context, builder, signature, args):
        i32 = llvm_ir.IntType(32)
        return builder.bitcast(builder.shl(builder.add(args[0], i32(127)), i32(23)), llvm_ir.FloatType())

    return numba.float32(numba.int32), codegen


_pow2 = numba.extending.intrinsic(_pow2_typer) if numba is not None else None


def _expf(x):
    """Cephes expf (<= 2 ulp); underflows to 0 below about -87.5."""
    x = min(max(x, _EXP_LO), _EXP_HI)
    m = np.floor(x * _LOG2E + _HALF)
    r = x - m * _LN2_HI - m * _LN2_LO
    p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * r * r + r + ONE
    return p * _pow2(np.int32(m))


def _log1pf(y):
    """log(1 + y) for y in [0, 1] (all softplus needs): Cephes logf + a rounding correction (<= 2 ulp)."""
    m = ONE + y
    big = m > _SQRT2
    f = m * _HALF - ONE if big else m - ONE
    z = f * f
    p = (((((((_L0 * f + _L1) * f + _L2) * f + _L3) * f + _L4) * f + _L5) * f + _L6) * f + _L7) * f + _L8
    log_m = f + (p * f * z - _HALF * z) + (_LN2 if big else _ZERO)
    return log_m + (y - (m - ONE)) / m


def exp(x):
    """exp inside the kernels: `_expf` for float32, libm for float64 (tests, gradcheck)."""
    return math.exp(x)


def log1p(y):
    """log1p inside the kernels: `_log1pf` for float32, libm for float64."""
    return math.log1p(y)


def _exp_typed(x):
    return _expf if x == numba.float32 else (lambda x: math.exp(x))


def _log1p_typed(y):
    return _log1pf if y == numba.float32 else (lambda y: math.log1p(y))


if numba is not None:
    numba.extending.overload(exp, inline="always")(_exp_typed)
    numba.extending.overload(log1p, inline="always")(_log1p_typed)


@jit(inline=True)
def softplus_slope(x):
    """(softplus(x), sigmoid(x)); softplus is the identity above 20, as in mamba-ssm."""
    y = exp(-abs(x))
    r = ONE / (ONE + y)
    if x > _SOFTPLUS_LINEAR:
        return x, ONE
    return max(x, _ZERO) + log1p(y), r if x >= _ZERO else y * r


@jit()
def load_tile(src, b, c0, t0, tile):
    """tile[j, w] = src[b, c0 + w, t0 + j]; zero where the block or the chunk runs past the array."""
    nw, tl = min(tile.shape[1], src.shape[1] - c0), min(tile.shape[0], src.shape[2] - t0)
    if nw < tile.shape[1] or tl < tile.shape[0]:
        tile[:] = 0
    for w in range(nw):
        for j in range(tl):
            tile[j, w] = src[b, c0 + w, t0 + j]


@jit()
def store_tile(tile, b, c0, t0, dst):
    for w in range(min(tile.shape[1], dst.shape[1] - c0)):
        for j in range(min(tile.shape[0], dst.shape[2] - t0)):
            dst[b, c0 + w, t0 + j] = tile[j, w]


@jit()
def load_lanes(src, c0, out):
    """out[:, w] = src[:, c0 + w] for per-channel data (r, d); zero past the last channel."""
    out[:] = 0
    for r in range(out.shape[0]):
        for w in range(min(out.shape[1], src.shape[1] - c0)):
            out[r, w] = src[r, c0 + w]
