"""numba CPU kernels of `scan2d.selective_scan_2d`: forward and a hand-derived backward.

Per batch, channel and state k, over the cells (i, j) of an H x W grid, with a = exp(dt A_k), x = dt u B_k:

    g[i, j] = a[i, j] g[i, j-1] + x[i, j]      horizontal pass along each row, g[i, -1] = 0
    h[i, j] = a[i, j] h[i-1, j] + g[i, j]      vertical pass down each column, h[-1, j] = 0
    s[i, j] = sum_k C_k[i, j] h[i, j] + D u[i, j],   y = s silu(z)

Rows go top to bottom and the forward keeps one row of vertical states, h[i-1, :] (W x n per channel): never the
H x W x n states of a whole grid. The backward needs, for row i, h[i-1, :], h[i, :], g[i, :] and a[i, :]; the
forward saves the state row above every `band`-th row, and the backward recomputes h and g of one band of rows
from it into two band buffers (a is recomputed where used), then walks that band bottom to top. With
band ~ sqrt(H) (scan2d.band_rows) the saved rows and a band's buffers are both O(sqrt(H) W n) per channel.

Backward, with ^ marking d loss / d (total, over every use) and sy = d loss / d s = dy silu(z):
    h[i, j] feeds s[i, j] (times C) and h[i+1, j] (times a[i+1, j]):
        h^[i, j] = sy[i, j] C[i, j] + a[i+1, j] h^[i+1, j]            reverse vertical scan, needs row i+1 first
    g[i, j] feeds h[i, j] (times 1) and g[i, j+1] (times a[i, j+1]):
        g^[i, j] = h^[i, j] + a[i, j+1] g^[i, j+1]                    reverse horizontal scan, needs j+1 first
    a[i, j] multiplies h[i-1, j] in h[i, j] and g[i, j-1] in g[i, j]:   a^ = h^[i, j] h[i-1, j] + g^[i, j] g[i, j-1]
    x[i, j] enters g[i, j] alone:                                       x^ = g^[i, j]
and through a = exp(dt A), x = dt u B to the inputs (sums over k within a channel, over channels for B and C):
    dt^ = sum_k (a^ a A_k + g^ u B_k),  dA_k = sum_cells a^ a dt,  du = sum_k g^ dt B_k + sy D,
    dB_k = sum_channels g^ dt u,  dC_k = sum_channels sy h,  dD = sum_cells sy u,
    dz = dy s silu'(z),  d delta = dt^ softplus'(delta + bias),  d bias = sum_cells d delta.
So rows run bottom to top and cells right to left; the carried adjoints are a[i+1, j] h^[i+1, j] for the whole
row below (W x n per channel) and a[i, j+1] g^[i, j+1] for the cell to the right (n per channel).

Task layout, lanes, tiles and exp follow scan_cpu (SIMD over a block of LANES channels; the shared parts are in
numba_primitives); a tile is one grid row.
"""

from __future__ import annotations

import numpy as np

from wsi_pipeline.models.ssm.numba_primitives import ONE, exp, jit, load_lanes, load_tile, softplus_slope, store_tile


@jit()
def _row(width, lanes, like):
    return np.empty((width, lanes), like.dtype)


@jit()
def _row_states(B, b, t0, a, ut, dtt, hprev, hnew, gs):
    """Both recurrences over one grid row (cells t0 .. t0 + W - 1) for one channel block, for the backward:
    gs[j + 1] = g[i, j] with gs[0] = 0 (so gs[j] is g[i, j-1], what a^ needs), hnew[j] = h[i, j] from
    hprev[j] = h[i-1, j]. a is not kept: recomputing exp where it is used is faster than a third band buffer."""
    n, lanes = a.shape
    gs[0] = 0
    for j in range(ut.shape[0]):
        for k in range(n):
            bk = B[b, t0 + j, k]
            for w in range(lanes):
                e = exp(dtt[j, w] * a[k, w])
                gs[j + 1, k, w] = e * gs[j, k, w] + dtt[j, w] * ut[j, w] * bk
                hnew[j, k, w] = e * hprev[j, k, w] + gs[j + 1, k, w]


@jit()
def scan2d_fwd_kernel(task0, task1, lanes, band, width, u, delta, A_t, B, C, D, z, bias, softplus, has_z,
                      y, dt_out, slope_out, ckpt):
    """y = (sum_k h_k C_k + D u) * silu(z) for tasks = (batch, channel block) in [task0, task1). Cells are
    row-major: u, delta, z, y (b, d, H*W); B, C (b, H*W, n); A_t (n, d); D, bias (1, d). If ckpt
    (b, bands, W, n, d) has bands, it gets h[i-1, :] for every i that is a multiple of `band`, and dt_out,
    slope_out (b, d, H*W) get dt and d dt / d delta for the backward."""
    nb, nd, cells = u.shape
    n, nblk, save = A_t.shape[0], -(-nd // lanes), ckpt.shape[1] > 0
    for task in range(task0, task1):
        b, c0 = task // nblk, (task % nblk) * lanes
        nw = min(lanes, nd - c0)
        a, d_l, bias_l = np.empty((n, lanes), u.dtype), np.empty((1, lanes), u.dtype), np.empty((1, lanes), u.dtype)
        load_lanes(A_t, c0, a)
        load_lanes(D, c0, d_l)
        load_lanes(bias, c0, bias_l)
        hrow = np.zeros((width, n, lanes), u.dtype)  # h[i-1, :] going into row i, h[i, :] after it
        g_row = np.empty((n, lanes), u.dtype)  # g[i, j] along the row
        ut, dtt, st, zt, yt = (_row(width, lanes, u), _row(width, lanes, u), _row(width, lanes, u),
                               _row(width, lanes, u), _row(width, lanes, u))
        for i in range(cells // width):
            t0 = i * width
            if save and i % band == 0:
                for j in range(width):
                    for k in range(n):
                        for w in range(nw):
                            ckpt[b, i // band, j, k, c0 + w] = hrow[j, k, w]
            load_tile(u, b, c0, t0, ut)
            load_tile(delta, b, c0, t0, dtt)
            for j in range(width):
                for w in range(lanes):
                    x = dtt[j, w] + bias_l[0, w]
                    dtt[j, w], st[j, w] = softplus_slope(x) if softplus else (x, ONE)
            if save:
                store_tile(dtt, b, c0, t0, dt_out)
                store_tile(st, b, c0, t0, slope_out)
            g_row[:] = 0
            for j in range(width):  # _row_states fused with the output, without storing a and g
                for w in range(lanes):
                    yt[j, w] = d_l[0, w] * ut[j, w]
                for k in range(n):
                    bk, ck = B[b, t0 + j, k], C[b, t0 + j, k]
                    for w in range(lanes):
                        e = exp(dtt[j, w] * a[k, w])
                        g_row[k, w] = e * g_row[k, w] + dtt[j, w] * ut[j, w] * bk
                        hrow[j, k, w] = e * hrow[j, k, w] + g_row[k, w]
                        yt[j, w] += hrow[j, k, w] * ck
            if has_z:
                load_tile(z, b, c0, t0, zt)
                for j in range(width):
                    for w in range(lanes):
                        yt[j, w] *= zt[j, w] / (ONE + exp(-zt[j, w]))
            store_tile(yt, b, c0, t0, y)


@jit()
def scan2d_bwd_kernel(task0, task1, lanes, band, width, u, dt, slope, A_t, B, C, D, z, has_z, ckpt, dy,
                      du, ddelta, dz, dA, dD, dbias, dB, dC):
    """The module docstring's adjoint recurrences. A task = (batch, group of channel blocks) owns dB[b, group],
    dC[b, group] (b, groups, H*W, n), which every channel adds to; dA (b, n, d), dD, dbias (b, d) are float64.
    Per block, bands run last to first: recompute the band's g and h from its saved row, then walk its rows
    bottom to top and each row right to left, carrying the adjoint row below into the next band."""
    nb, nd, cells = u.shape
    n, nblk, ngroups, height = A_t.shape[0], -(-nd // lanes), dB.shape[1], cells // width
    for task in range(task0, task1):
        b, g = task // ngroups, task % ngroups
        hs = np.empty((band + 1, width, n, lanes), u.dtype)  # hs[r + 1] = h of the band's row r, hs[0] saved
        gs = np.empty((band, width + 1, n, lanes), u.dtype)  # gs[r, j] = g[row r, j - 1]
        below = np.empty((width, n, lanes), u.dtype)  # a[i+1, j] h^[i+1, j]
        right = np.empty((n, lanes), u.dtype)  # a[i, j+1] g^[i, j+1]
        acc_b, acc_c = np.empty((n, lanes), u.dtype), np.empty((n, lanes), u.dtype)  # one cell's dB, dC per lane
        a, da_acc, d_l = np.empty((n, lanes), u.dtype), np.empty((n, lanes), u.dtype), np.empty((1, lanes), u.dtype)
        ut, dtt, st, zt, dyt = (_row(width, lanes, u), _row(width, lanes, u), _row(width, lanes, u),
                                _row(width, lanes, u), _row(width, lanes, u))
        ddt, adj_b, dsy = np.empty(lanes, u.dtype), np.empty(lanes, u.dtype), np.empty(lanes, u.dtype)
        dd_acc, dbias_acc = np.empty(lanes, np.float64), np.empty(lanes, np.float64)
        for blk in range(g * nblk // ngroups, (g + 1) * nblk // ngroups):
            c0 = blk * lanes
            nw = min(lanes, nd - c0)
            load_lanes(A_t, c0, a)
            load_lanes(D, c0, d_l)
            below[:] = 0
            dd_acc[:] = 0
            dbias_acc[:] = 0
            for bi in range(ckpt.shape[1] - 1, -1, -1):
                i0 = bi * band
                rows = min(band, height - i0)
                for j in range(width):
                    load_lanes(ckpt[b, bi, j], c0, hs[0, j])
                for r in range(rows):
                    load_tile(u, b, c0, (i0 + r) * width, ut)
                    load_tile(dt, b, c0, (i0 + r) * width, dtt)
                    _row_states(B, b, (i0 + r) * width, a, ut, dtt, hs[r], hs[r + 1], gs[r])
                for r in range(rows - 1, -1, -1):
                    t0 = (i0 + r) * width
                    load_tile(u, b, c0, t0, ut)
                    load_tile(dt, b, c0, t0, dtt)
                    load_tile(slope, b, c0, t0, st)
                    load_tile(dy, b, c0, t0, dyt)
                    if has_z:
                        load_tile(z, b, c0, t0, zt)
                    hrow, hup, grow = hs[r + 1], hs[r], gs[r]
                    right[:] = 0
                    da_acc[:] = 0
                    for j in range(width - 1, -1, -1):
                        t = t0 + j
                        for w in range(lanes):
                            dsy[w] = dyt[j, w]
                        if has_z:  # y = s silu(z): recompute s (in ddt), dz goes to dyt, dsy becomes sy
                            for w in range(lanes):
                                ddt[w] = d_l[0, w] * ut[j, w]
                            for k in range(n):
                                for w in range(lanes):
                                    ddt[w] += hrow[j, k, w] * C[b, t, k]
                            for w in range(lanes):
                                sig = ONE / (ONE + exp(-zt[j, w]))
                                dyt[j, w] = dsy[w] * ddt[w] * sig * (ONE + zt[j, w] * (ONE - sig))
                                dsy[w] *= zt[j, w] * sig
                        ddt[:] = 0
                        adj_b[:] = 0
                        for k in range(n):
                            bk, ck = B[b, t, k], C[b, t, k]
                            for w in range(lanes):
                                acc_c[k, w] = dsy[w] * hrow[j, k, w]
                                h_adj = dsy[w] * ck + below[j, k, w]
                                g_adj = h_adj + right[k, w]
                                e = exp(dtt[j, w] * a[k, w])
                                a_adj_e = (h_adj * hup[j, k, w] + g_adj * grow[j, k, w]) * e  # a^ a
                                ddt[w] += a_adj_e * a[k, w]
                                da_acc[k, w] += a_adj_e * dtt[j, w]
                                adj_b[w] += g_adj * bk
                                acc_b[k, w] = g_adj * dtt[j, w] * ut[j, w]
                                below[j, k, w] = h_adj * e
                                right[k, w] = g_adj * e
                        for k in range(n):
                            sum_b, sum_c = 0.0, 0.0
                            for w in range(lanes):
                                sum_b += acc_b[k, w]
                                sum_c += acc_c[k, w]
                            dB[b, g, t, k] += sum_b
                            dC[b, g, t, k] += sum_c
                        for w in range(lanes):
                            ddt[w] = (ddt[w] + adj_b[w] * ut[j, w]) * st[j, w]
                            dd_acc[w] += dsy[w] * ut[j, w]
                            dbias_acc[w] += ddt[w]
                            ut[j, w] = dsy[w] * d_l[0, w] + adj_b[w] * dtt[j, w]  # now du
                            dtt[j, w] = ddt[w]  # now d delta
                    store_tile(ut, b, c0, t0, du)
                    store_tile(dtt, b, c0, t0, ddelta)
                    if has_z:
                        store_tile(dyt, b, c0, t0, dz)
                    for w in range(nw):  # a row's worth of float32 sums, then into float64
                        for k in range(n):
                            dA[b, k, c0 + w] += da_acc[k, w]
            for w in range(nw):
                dD[b, c0 + w] += dd_acc[w]
                dbias[b, c0 + w] += dbias_acc[w]
