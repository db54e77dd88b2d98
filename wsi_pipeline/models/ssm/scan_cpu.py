"""numba CPU kernels of `scan.selective_scan` and `scan.causal_conv1d` (forward and backward) and their runner.

They exist because a PyTorch scan is slower and holds all L x d x n states for its backward (benchmarks/bench_scan.py).

A task owns a block of `lanes` channels and the innermost loops run over that block, so LLVM turns them into SIMD
(time is sequential, and a sum over the n states would not vectorise in exact math). `lanes` comes in at run time:
with a constant trip count LLVM unrolls those loops into scalar code instead. Time goes in chunks of CKPT_STEPS:
inputs are copied into (CKPT_STEPS, lanes) tiles, and the state at each chunk start is the checkpoint the backward
recomputes that chunk from. exp and log1p are written out in float32 arithmetic (Cephes' polynomials): libm's
scalar calls block vectorisation (~10x slower kernel). `run_tasks` runs a kernel over task ranges on threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    import llvmlite.ir as llvm_ir
    import numba
    import numba.extending
except ImportError:  # numba is a core dependency; this only keeps a broken install usable
    numba = None

AVAILABLE = numba is not None

CKPT_STEPS = 64  # a state is kept every CKPT_STEPS steps; the backward recomputes one such chunk at a time
LANES = 16
_MIN_PARALLEL_SIZE = 1 << 16
_ZERO, _HALF, _ONE = np.float32(0.0), np.float32(0.5), np.float32(1.0)
_SOFTPLUS_LINEAR = np.float32(20.0)  # mamba-ssm's softplus is the identity above this
_EXP_LO, _EXP_HI = np.float32(-88.0), np.float32(88.0)
_LOG2E, _LN2, _SQRT2 = np.float32(1.4426950408889634), np.float32(0.6931471805599453), np.float32(2**0.5)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_E0, _E1, _E2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_E3, _E4, _E5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_L0, _L1, _L2 = np.float32(7.0376836292e-2), np.float32(-1.1514610310e-1), np.float32(1.1676998740e-1)
_L3, _L4, _L5 = np.float32(-1.2420140846e-1), np.float32(1.4249322787e-1), np.float32(-1.6668057665e-1)
_L6, _L7, _L8 = np.float32(2.0000714765e-1), np.float32(-2.4999993993e-1), np.float32(3.3333331174e-1)


def _jit(inline: bool = False) -> Callable[[Callable], Callable]:
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
    p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * r * r + r + _ONE
    return p * _pow2(np.int32(m))


def _log1pf(y):
    """log(1 + y) for y in [0, 1] (all softplus needs): Cephes logf + a rounding correction (<= 2 ulp)."""
    m = _ONE + y
    big = m > _SQRT2
    f = m * _HALF - _ONE if big else m - _ONE
    z = f * f
    p = (((((((_L0 * f + _L1) * f + _L2) * f + _L3) * f + _L4) * f + _L5) * f + _L6) * f + _L7) * f + _L8
    log_m = f + (p * f * z - _HALF * z) + (_LN2 if big else _ZERO)
    return log_m + (y - (m - _ONE)) / m


def _exp(x):
    """exp inside the kernels: `_expf` for float32, libm for float64 (tests, gradcheck)."""
    return math.exp(x)


def _log1p(y):
    """log1p inside the kernels: `_log1pf` for float32, libm for float64."""
    return math.log1p(y)


def _exp_typed(x):
    return _expf if x == numba.float32 else (lambda x: math.exp(x))


def _log1p_typed(y):
    return _log1pf if y == numba.float32 else (lambda y: math.log1p(y))


if numba is not None:
    numba.extending.overload(_exp, inline="always")(_exp_typed)
    numba.extending.overload(_log1p, inline="always")(_log1p_typed)


@_jit(inline=True)
def _softplus_slope(x):
    """(softplus(x), sigmoid(x)); softplus is the identity above 20, as in mamba-ssm."""
    y = _exp(-abs(x))
    r = _ONE / (_ONE + y)
    if x > _SOFTPLUS_LINEAR:
        return x, _ONE
    return max(x, _ZERO) + _log1p(y), r if x >= _ZERO else y * r


@_jit()
def _load_tile(src, b, c0, t0, tile):
    """tile[j, w] = src[b, c0 + w, t0 + j]; zero where the block or the chunk runs past the array."""
    nw, tl = min(tile.shape[1], src.shape[1] - c0), min(tile.shape[0], src.shape[2] - t0)
    if nw < tile.shape[1] or tl < tile.shape[0]:
        tile[:] = 0
    for w in range(nw):
        for j in range(tl):
            tile[j, w] = src[b, c0 + w, t0 + j]


@_jit()
def _store_tile(tile, b, c0, t0, dst):
    for w in range(min(tile.shape[1], dst.shape[1] - c0)):
        for j in range(min(tile.shape[0], dst.shape[2] - t0)):
            dst[b, c0 + w, t0 + j] = tile[j, w]


@_jit()
def _load_lanes(src, c0, out):
    """out[:, w] = src[:, c0 + w] for per-channel data (r, d); zero past the last channel."""
    out[:] = 0
    for r in range(out.shape[0]):
        for w in range(min(out.shape[1], src.shape[1] - c0)):
            out[r, w] = src[r, c0 + w]


@_jit()
def _tile(lanes, like):
    return np.zeros((CKPT_STEPS, lanes), like.dtype)


@_jit()
def scan_fwd_kernel(task0, task1, lanes, u, delta, A_t, B, C, D, z, bias, softplus, has_z,
                     y, dt_out, slope_out, ckpt):
    """y = (sum_k h_k C_k + D u) * silu(z). A_t is (n, d); B, C are time-major (b, L, n); D, bias (1, d).
    If ckpt (b, chunks, n, d) has chunks, it gets the state at each chunk start, and dt_out, slope_out
    (b, d, L) get dt and d dt / d delta for the backward."""
    nb, nd, L = u.shape
    n, nblk, save = A_t.shape[0], -(-nd // lanes), ckpt.shape[1] > 0
    for task in range(task0, task1):  # task = (batch, block) in [0, nb * nblk)
        b, c0 = task // nblk, (task % nblk) * lanes
        a, h = np.empty((n, lanes), u.dtype), np.zeros((n, lanes), u.dtype)
        d_l, bias_l = np.empty((1, lanes), u.dtype), np.empty((1, lanes), u.dtype)
        ut, dtt, st, zt, yt = (_tile(lanes, u), _tile(lanes, u), _tile(lanes, u), _tile(lanes, u),
                               _tile(lanes, u))
        _load_lanes(A_t, c0, a)
        _load_lanes(D, c0, d_l)
        _load_lanes(bias, c0, bias_l)
        for t0 in range(0, L, CKPT_STEPS):
            tl = min(CKPT_STEPS, L - t0)
            if save:
                for k in range(n):
                    for w in range(min(lanes, nd - c0)):
                        ckpt[b, t0 // CKPT_STEPS, k, c0 + w] = h[k, w]
            _load_tile(u, b, c0, t0, ut)
            _load_tile(delta, b, c0, t0, dtt)
            for j in range(tl):
                for w in range(lanes):
                    x = dtt[j, w] + bias_l[0, w]
                    dtt[j, w], st[j, w] = _softplus_slope(x) if softplus else (x, _ONE)
            if save:
                _store_tile(dtt, b, c0, t0, dt_out)
                _store_tile(st, b, c0, t0, slope_out)
            for j in range(tl):
                for w in range(lanes):
                    yt[j, w] = d_l[0, w] * ut[j, w]
                for k in range(n):
                    bk, ck = B[b, t0 + j, k], C[b, t0 + j, k]
                    for w in range(lanes):
                        h[k, w] = _exp(dtt[j, w] * a[k, w]) * h[k, w] + dtt[j, w] * ut[j, w] * bk
                        yt[j, w] += h[k, w] * ck
            if has_z:
                _load_tile(z, b, c0, t0, zt)
                for j in range(tl):
                    for w in range(lanes):
                        yt[j, w] *= zt[j, w] / (_ONE + _exp(-zt[j, w]))
            _store_tile(yt, b, c0, t0, y)


@_jit()
def scan_bwd_kernel(task0, task1, lanes, u, dt, slope, A_t, B, C, D, z, has_z, ckpt, dy,
                     du, ddelta, dz, dA, dD, dbias, dB, dC):
    """Reverse-time adjoint. A task = (batch, group of channel blocks) and owns dB[b, group], dC[b, group]
    (every channel adds to them). Chunks run last to first; per chunk each block recomputes its states from
    the checkpoint into a small buffer, then walks them backward, carrying its adjoint to the next chunk.
    Per-lane sums over the group's blocks are folded into dB, dC once per chunk. dA is (b, n, d)."""
    nb, nd, L = u.shape
    n, nblk, ngroups = A_t.shape[0], -(-nd // lanes), dB.shape[1]
    for task in range(task0, task1):  # task = (batch, group) in [0, nb * ngroups)
        b, g = task // ngroups, task % ngroups
        blk0, blk1 = g * nblk // ngroups, (g + 1) * nblk // ngroups
        adj_all = np.zeros((blk1 - blk0, n, lanes), u.dtype)  # d loss / d h, carried backward in time
        hs = np.zeros((CKPT_STEPS + 1, n, lanes), u.dtype)  # the chunk's states, hs[0] from the checkpoint
        decay = np.empty((CKPT_STEPS, n, lanes), u.dtype)
        acc_b, acc_c = np.empty_like(decay), np.empty_like(decay)  # per-lane dB, dC of this chunk
        a, da_acc = np.empty((n, lanes), u.dtype), np.empty((n, lanes), u.dtype)
        d_l = np.empty((1, lanes), u.dtype)
        ut, dtt, st, zt, dyt = (_tile(lanes, u), _tile(lanes, u), _tile(lanes, u), _tile(lanes, u),
                                _tile(lanes, u))
        ddt, adj_b, dsy = np.empty(lanes, u.dtype), np.empty(lanes, u.dtype), np.empty(lanes, u.dtype)
        dd_acc, dbias_acc = np.empty(lanes, np.float64), np.empty(lanes, np.float64)
        for chunk in range(ckpt.shape[1] - 1, -1, -1):
            t0 = chunk * CKPT_STEPS
            tl = min(CKPT_STEPS, L - t0)
            acc_b[:] = 0
            acc_c[:] = 0
            for blk in range(blk0, blk1):
                c0 = blk * lanes
                _load_lanes(A_t, c0, a)
                _load_lanes(D, c0, d_l)
                _load_lanes(ckpt[b, chunk], c0, hs[0])
                _load_tile(u, b, c0, t0, ut)
                _load_tile(dt, b, c0, t0, dtt)
                _load_tile(slope, b, c0, t0, st)
                _load_tile(dy, b, c0, t0, dyt)
                if has_z:
                    _load_tile(z, b, c0, t0, zt)
                for j in range(tl):  # recompute the chunk's states
                    for k in range(n):
                        bk = B[b, t0 + j, k]
                        for w in range(lanes):
                            decay[j, k, w] = _exp(dtt[j, w] * a[k, w])
                            hs[j + 1, k, w] = decay[j, k, w] * hs[j, k, w] + dtt[j, w] * ut[j, w] * bk
                adj = adj_all[blk - blk0]
                da_acc[:] = 0
                dd_acc[:] = 0
                dbias_acc[:] = 0
                for j in range(tl - 1, -1, -1):
                    t = t0 + j
                    for w in range(lanes):
                        dsy[w] = dyt[j, w]  # d loss / d (scan output + D u)
                    if has_z:  # y = s silu(z), s = scan output + D u (held in ddt); dz goes to dyt
                        for w in range(lanes):
                            ddt[w] = d_l[0, w] * ut[j, w]
                        for k in range(n):
                            for w in range(lanes):
                                ddt[w] += hs[j + 1, k, w] * C[b, t, k]
                        for w in range(lanes):
                            sig = _ONE / (_ONE + _exp(-zt[j, w]))
                            dyt[j, w] = dsy[w] * ddt[w] * sig * (_ONE + zt[j, w] * (_ONE - sig))
                            dsy[w] *= zt[j, w] * sig
                    ddt[:] = 0
                    adj_b[:] = 0
                    for k in range(n):
                        bk, ck = B[b, t, k], C[b, t, k]
                        for w in range(lanes):
                            acc_c[j, k, w] += dsy[w] * hs[j + 1, k, w]
                            gk = adj[k, w] + dsy[w] * ck
                            acc_b[j, k, w] += gk * dtt[j, w] * ut[j, w]
                            adj_b[w] += gk * bk
                            g_log_decay = gk * hs[j, k, w] * decay[j, k, w]
                            ddt[w] += g_log_decay * a[k, w]
                            da_acc[k, w] += g_log_decay * dtt[j, w]
                            adj[k, w] = gk * decay[j, k, w]
                    for w in range(lanes):
                        ddt[w] = (ddt[w] + adj_b[w] * ut[j, w]) * st[j, w]
                        dd_acc[w] += dsy[w] * ut[j, w]
                        dbias_acc[w] += ddt[w]
                        ut[j, w] = dsy[w] * d_l[0, w] + adj_b[w] * dtt[j, w]  # now du
                        dtt[j, w] = ddt[w]  # now d delta
                for w in range(min(lanes, nd - c0)):
                    for k in range(n):
                        dA[b, k, c0 + w] += da_acc[k, w]
                    dD[b, c0 + w] += dd_acc[w]
                    dbias[b, c0 + w] += dbias_acc[w]
                _store_tile(ut, b, c0, t0, du)
                _store_tile(dtt, b, c0, t0, ddelta)
                if has_z:
                    _store_tile(dyt, b, c0, t0, dz)
            for j in range(tl):
                for k in range(n):
                    sum_b, sum_c = 0.0, 0.0
                    for w in range(lanes):
                        sum_b += acc_b[j, k, w]
                        sum_c += acc_c[j, k, w]
                    dB[b, g, t0 + j, k] = sum_b
                    dC[b, g, t0 + j, k] = sum_c


@_jit()
def _conv_row(xr, wr, bias, out):
    """out = bias + sum_j wr[j] xr[t - (k - 1 - j)]: one channel's causal conv, before the activation."""
    k, L = wr.shape[0], xr.shape[0]
    out[:] = bias
    for j in range(k):
        for t in range(k - 1 - j, L):
            out[t] += wr[j] * xr[t - (k - 1 - j)]


@_jit()
def conv_rows(row0, row1, x, w, bias, silu, out):
    """`_conv_row` (then silu) for rows = (batch, channel) in [row0, row1)."""
    nd = x.shape[1]
    for row in range(row0, row1):
        b, c = row // nd, row % nd
        o = out[b, c]
        _conv_row(x[b, c], w[c], bias[c], o)
        if silu:
            for t in range(o.shape[0]):
                o[t] = o[t] / (_ONE + _exp(-o[t]))


@_jit()
def conv_rows_bwd(row0, row1, x, w, bias, silu, dy, dx, dw, dbias):
    """Gradients of `conv_rows` for rows [row0, row1); dw (b, d, k) and dbias (b, d) are per batch."""
    nd, L, k = x.shape[1], x.shape[2], w.shape[1]
    g = np.empty(L, x.dtype)  # d loss / d pre-activation of one row
    for row in range(row0, row1):
        b, c = row // nd, row % nd
        xr, dxr = x[b, c], dx[b, c]
        _conv_row(xr, w[c], bias[c], g)
        for t in range(L):
            sig = _ONE / (_ONE + _exp(-g[t]))
            g[t] = dy[b, c, t] * sig * (_ONE + g[t] * (_ONE - sig)) if silu else dy[b, c, t]
        acc = 0.0
        for t in range(L):
            acc += g[t]
        dbias[b, c] = acc
        dxr[:] = 0
        for j in range(k):
            shift, acc = k - 1 - j, 0.0
            for t in range(shift, L):
                acc += g[t] * xr[t - shift]
            dw[b, c, j] = acc
            for t in range(shift, L):  # a loop of its own so that it vectorises (the sum above cannot)
                dxr[t - shift] += w[c, j] * g[t]


def run_tasks(kernel: Callable, ntasks: int, size: int, *args) -> None:
    """kernel(lo, hi, *args) over one contiguous range [lo, hi) of [0, ntasks) per thread (torch's thread setting
    sets the count), side by side on plain threads (the kernels release the GIL). Inputs of fewer than
    _MIN_PARALLEL_SIZE elements run as a single call: threads would cost more than they save."""
    threads = max(1, min(torch.get_num_threads(), ntasks)) if size >= _MIN_PARALLEL_SIZE else 1
    if threads == 1:
        kernel(0, ntasks, *args)
        return
    with ThreadPoolExecutor(threads) as pool:
        ranges = [(ntasks * i // threads, ntasks * (i + 1) // threads) for i in range(threads)]
        for done in [pool.submit(kernel, lo, hi, *args) for lo, hi in ranges]:
            done.result()
