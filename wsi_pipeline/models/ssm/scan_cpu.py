"""numba CPU kernels of `scan.selective_scan` and `scan.causal_conv1d` (forward and backward) and their runner.

They exist because a PyTorch scan is slower and holds all L x d x n states for its backward (benchmarks/bench_scan.py).

A task owns a block of `lanes` channels and the innermost loops run over that block, so LLVM turns them into SIMD
(time is sequential, and a sum over the n states would not vectorise in exact math). `lanes` comes in at run time:
with a constant trip count LLVM unrolls those loops into scalar code instead. Time goes in chunks of CKPT_STEPS:
inputs are copied into (CKPT_STEPS, lanes) tiles, and the state at each chunk start is the checkpoint the backward
recomputes that chunk from. exp and log1p are written out in float32 arithmetic (Cephes' polynomials): libm's
scalar calls block vectorisation (~10x slower kernel); they and the tile copies live in `numba_primitives`, shared
with scan2d_cpu. `run_tasks` runs a kernel over task ranges on threads.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from wsi_pipeline.models.ssm.numba_primitives import (
    ONE,
    exp,
    jit,
    load_lanes,
    load_tile,
    softplus_slope,
    store_tile,
)

CKPT_STEPS = 64  # a state is kept every CKPT_STEPS steps; the backward recomputes one such chunk at a time
LANES = 16
_MIN_PARALLEL_SIZE = 1 << 16


@jit()
def _tile(lanes, like):
    return np.zeros((CKPT_STEPS, lanes), like.dtype)


@jit()
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
        load_lanes(A_t, c0, a)
        load_lanes(D, c0, d_l)
        load_lanes(bias, c0, bias_l)
        for t0 in range(0, L, CKPT_STEPS):
            tl = min(CKPT_STEPS, L - t0)
            if save:
                for k in range(n):
                    for w in range(min(lanes, nd - c0)):
                        ckpt[b, t0 // CKPT_STEPS, k, c0 + w] = h[k, w]
            load_tile(u, b, c0, t0, ut)
            load_tile(delta, b, c0, t0, dtt)
            for j in range(tl):
                for w in range(lanes):
                    x = dtt[j, w] + bias_l[0, w]
                    dtt[j, w], st[j, w] = softplus_slope(x) if softplus else (x, ONE)
            if save:
                store_tile(dtt, b, c0, t0, dt_out)
                store_tile(st, b, c0, t0, slope_out)
            for j in range(tl):
                for w in range(lanes):
                    yt[j, w] = d_l[0, w] * ut[j, w]
                for k in range(n):
                    bk, ck = B[b, t0 + j, k], C[b, t0 + j, k]
                    for w in range(lanes):
                        h[k, w] = exp(dtt[j, w] * a[k, w]) * h[k, w] + dtt[j, w] * ut[j, w] * bk
                        yt[j, w] += h[k, w] * ck
            if has_z:
                load_tile(z, b, c0, t0, zt)
                for j in range(tl):
                    for w in range(lanes):
                        yt[j, w] *= zt[j, w] / (ONE + exp(-zt[j, w]))
            store_tile(yt, b, c0, t0, y)


@jit()
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
                load_lanes(A_t, c0, a)
                load_lanes(D, c0, d_l)
                load_lanes(ckpt[b, chunk], c0, hs[0])
                load_tile(u, b, c0, t0, ut)
                load_tile(dt, b, c0, t0, dtt)
                load_tile(slope, b, c0, t0, st)
                load_tile(dy, b, c0, t0, dyt)
                if has_z:
                    load_tile(z, b, c0, t0, zt)
                for j in range(tl):  # recompute the chunk's states
                    for k in range(n):
                        bk = B[b, t0 + j, k]
                        for w in range(lanes):
                            decay[j, k, w] = exp(dtt[j, w] * a[k, w])
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
                            sig = ONE / (ONE + exp(-zt[j, w]))
                            dyt[j, w] = dsy[w] * ddt[w] * sig * (ONE + zt[j, w] * (ONE - sig))
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
                store_tile(ut, b, c0, t0, du)
                store_tile(dtt, b, c0, t0, ddelta)
                if has_z:
                    store_tile(dyt, b, c0, t0, dz)
            for j in range(tl):
                for k in range(n):
                    sum_b, sum_c = 0.0, 0.0
                    for w in range(lanes):
                        sum_b += acc_b[j, k, w]
                        sum_c += acc_c[j, k, w]
                    dB[b, g, t0 + j, k] = sum_b
                    dC[b, g, t0 + j, k] = sum_c


@jit()
def _conv_row(xr, wr, bias, out):
    """out = bias + sum_j wr[j] xr[t - (k - 1 - j)]: one channel's causal conv, before the activation."""
    k, L = wr.shape[0], xr.shape[0]
    out[:] = bias
    for j in range(k):
        for t in range(k - 1 - j, L):
            out[t] += wr[j] * xr[t - (k - 1 - j)]


@jit()
def conv_rows(row0, row1, x, w, bias, silu, out):
    """`_conv_row` (then silu) for rows = (batch, channel) in [row0, row1)."""
    nd = x.shape[1]
    for row in range(row0, row1):
        b, c = row // nd, row % nd
        o = out[b, c]
        _conv_row(x[b, c], w[c], bias[c], o)
        if silu:
            for t in range(o.shape[0]):
                o[t] = o[t] / (ONE + exp(-o[t]))


@jit()
def conv_rows_bwd(row0, row1, x, w, bias, silu, dy, dx, dw, dbias):
    """Gradients of `conv_rows` for rows [row0, row1); dw (b, d, k) and dbias (b, d) are per batch."""
    nd, L, k = x.shape[1], x.shape[2], w.shape[1]
    g = np.empty(L, x.dtype)  # d loss / d pre-activation of one row
    for row in range(row0, row1):
        b, c = row // nd, row % nd
        xr, dxr = x[b, c], dx[b, c]
        _conv_row(xr, w[c], bias[c], g)
        for t in range(L):
            sig = ONE / (ONE + exp(-g[t]))
            g[t] = dy[b, c, t] * sig * (ONE + g[t] * (ONE - sig)) if silu else dy[b, c, t]
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
