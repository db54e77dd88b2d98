"""Forward+backward time and peak memory of one BiMamba block (d_model 512 -> d_inner 1024, d_state 16, b=1,
fp32, 2 threads) with three selective scans plugged into the same block: ours (`scan.selective_scan`), a
plain per-step loop (the sequential reference) and mambapy's parallel scan (`mambapy.pscan`, laid out as
mambapy's own MambaBlock.selective_scan). Only the scan differs; conv, projections and gating are shared.

Each measurement runs in a fresh subprocess: a warm-up at L=64 (JIT load), then one timed forward+backward
at the requested L; memory is that pass's RSS high-water above the RSS before it (/proc/self/clear_refs).
A process is capped at --mem-limit-gb (RLIMIT_DATA) so an allocation beyond it is reported as OOM.

    pip install mambapy      # benchmark-only
    python benchmarks/bench_scan.py [--lengths 1000 8000 30000] [--mem-limit-gb 12]

--2d times the 2-D selective scan alone (d_inner 256, d_state 16: 2DMamba's d_model 128) on H x W grids, fwd+bwd,
each measurement in a fresh process as above: ours (`ssm.scan2d.selective_scan_2d`) against 2DMamba's PyTorch
parallel scan (PScan_2D's algorithm, rewritten below as `PScan2D`, checked against ours before each run).

    python benchmarks/bench_scan.py --2d [--grids 100 300] [--mem-limit-gb 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_scan import reference_scan  # noqa: E402  (the tests' sequential S6 recurrence: one reference)

IMPLS = ("ours", "sequential", "mambapy")
SEQUENTIAL_BUDGET_S = 60.0  # the sequential loop is skipped where its estimate exceeds this


def mambapy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mambapy's MambaBlock.ssm + selective_scan (pscan over the full (b, L, d, n) tensors)."""
    from mambapy.pscan import pscan

    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = (F.softplus(dt) if delta_softplus else dt).transpose(1, 2)  # (b, L, d)
    x = u.transpose(1, 2)
    delta_a = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, n)
    bx = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(delta_a, bx)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(impl: str, length: int, mem_limit_gb: float) -> dict:
    """One measurement in this (fresh) process."""
    limit = int(mem_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(2)
    from wsi_pipeline.models.ssm import bimamba

    if impl != "ours":
        bimamba.selective_scan = reference_scan if impl == "sequential" else mambapy_scan
    torch.manual_seed(0)
    block = bimamba.BiMamba(512)

    def fwd_bwd(seq_len: int) -> float:
        x = torch.randn(1, seq_len, 512)
        start = time.perf_counter()
        block(x).square().mean().backward()
        return time.perf_counter() - start

    fwd_bwd(64)
    block.zero_grad(set_to_none=True)
    _reset_peak_rss()
    before = _rss_kb("VmRSS")
    try:
        seconds = fwd_bwd(length)
    except (RuntimeError, MemoryError) as err:
        if "alloc" in str(err) or isinstance(err, MemoryError):
            return {"status": f"OOM (> {mem_limit_gb:g} GB)"}
        raise
    return {"status": "ok", "seconds": seconds, "peak_mb": (_rss_kb("VmHWM") - before) / 1024}


def measure(impl: str, length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(length), "--mem-limit-gb", str(args.mem_limit_gb)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"too slow (> {args.timeout} s)"}
    if out.returncode != 0:
        oom = "alloc" in out.stderr or out.returncode in (-9, 137)
        return {"status": f"OOM (> {args.mem_limit_gb:g} GB)" if oom else "failed: " + out.stderr[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> None:
    print("BiMamba block fwd+bwd, d_model 512, d_inner 1024, d_state 16, b=1, fp32, 2 threads; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: numbers are noisy)")
    print(f"{'scan':<11} {'L':>7} {'fwd+bwd s':>10} {'peak MB':>9}")
    results: dict[tuple[str, int], dict] = {}
    for impl in IMPLS:
        for length in args.lengths:
            prev = [(n, r) for (i, n), r in results.items() if i == impl and r["status"] == "ok"]
            estimate = max((r["seconds"] * length / n for n, r in prev), default=0.0)
            if impl == "sequential" and estimate > SEQUENTIAL_BUDGET_S:
                result = {"status": f"skipped (est. {estimate:.0f} s > {SEQUENTIAL_BUDGET_S:.0f} s)"}
            else:
                result = measure(impl, length, args)
            results[impl, length] = result
            ok = result["status"] == "ok"
            cells = f"{result['seconds']:>10.2f} {result['peak_mb']:>9.0f}" if ok else result["status"]
            print(f"{impl:<11} {length:>7} {cells}", flush=True)
    ours, theirs = results.get(("ours", args.ratio_at)), results.get(("mambapy", args.ratio_at))
    if ours and theirs and ours["status"] == theirs["status"] == "ok":
        speed, memory = ours["seconds"] / theirs["seconds"], ours["peak_mb"] / theirs["peak_mb"]
        print(f"\nat L={args.ratio_at}: ours/mambapy time {speed:.3f} ({1 / speed:.1f}x faster), "
              f"memory {memory:.3f} ({1 / memory:.1f}x less)")


# ---------------------------------------------------------------- 2-D (--2d): the scan alone, ours vs a parallel scan

GRID_IMPLS = ("ours", "pscan2d")
GRID_D_INNER, GRID_D_STATE = 256, 16  # 2DMamba's MambaMIL_2D: d_model 128 (expand 2), d_state 16


def _npo2(length: int) -> int:
    return 1 << max(length - 1, 0).bit_length()


def _blelloch_(a: torch.Tensor, x: torch.Tensor) -> None:
    """In place along dim 2 (a power of two long): x[t] = a[t] x[t-1] + x[t]. Up-sweep: each block of 2*step
    folds its left half into its last element; down-sweep: the middle of each block takes its left prefix."""
    length, step = x.shape[2], 1
    while step < length:
        right, left = slice(2 * step - 1, length, 2 * step), slice(step - 1, length, 2 * step)
        x[:, :, right] += a[:, :, right] * x[:, :, left]
        a[:, :, right] *= a[:, :, left]
        step *= 2
    step //= 4
    while step >= 1:
        right, left = slice(3 * step - 1, length, 2 * step), slice(2 * step - 1, length - step, 2 * step)
        x[:, :, right] += a[:, :, right] * x[:, :, left]
        a[:, :, right] *= a[:, :, left]
        step //= 2


def _blelloch_rev_(a: torch.Tensor, x: torch.Tensor) -> None:
    """`_blelloch_` mirrored in place, x[t] = a[t] x[t+1] + x[t]: the adjoint scan of the backward."""
    length, step = x.shape[2], 1
    while step < length:
        right, left = slice(0, length, 2 * step), slice(step, length, 2 * step)
        x[:, :, right] += a[:, :, right] * x[:, :, left]
        a[:, :, right] *= a[:, :, left]
        step *= 2
    step //= 4
    while step >= 1:
        right, left = slice(step, length - 2 * step, 2 * step), slice(2 * step, length, 2 * step)
        x[:, :, right] += a[:, :, right] * x[:, :, left]
        a[:, :, right] *= a[:, :, left]
        step //= 2


class PScan2D(torch.autograd.Function):
    """The algorithm of PScan_2D in AtlasAnalyticsLab/2DMamba (2DMambaMIL/models/pscan.py, after mambapy's pscan),
    rewritten here as the benchmark's reference, not product code: pad H and W to powers of two, Blelloch scan
    along W in place, then along H over those states with the raw decays. Two corrections make it compute what
    `selective_scan_2d` (and their CUDA kernel) does: the vertical down-sweep uses the raw decays (the released
    one uses the row-scanned ones for H >= 4), and the backward is the true adjoint (a reverse scan up the
    columns, then along the rows; the released one shifts the decays diagonally), which keeps g for dA."""

    @staticmethod
    def forward(ctx, a_in, x_in):  # (b, H, W, d, n) -> h (b, H, W, d, n)
        H, W = a_in.shape[1:3]
        pad = (0, 0, 0, 0, 0, _npo2(W) - W, 0, _npo2(H) - H)
        a, x = (F.pad(t, pad).permute(0, 3, 1, 2, 4) for t in (a_in, x_in))  # (b, d, H', W', n) views
        a_raw = a.clone()
        _blelloch_(a.transpose(2, 3), x.transpose(2, 3))  # along W
        g = x.clone()
        _blelloch_(a_raw, x)  # along H
        ctx.save_for_backward(a_in, g, x)
        return x[:, :, :H, :W].permute(0, 2, 3, 1, 4)

    @staticmethod
    def backward(ctx, dh_in):
        a_in, g, h = ctx.saved_tensors
        H, W = a_in.shape[1:3]
        pad = (0, 0, 0, 0, 0, _npo2(W) - W, 0, _npo2(H) - H)
        a, dh = (F.pad(t, pad).permute(0, 3, 1, 2, 4) for t in (a_in, dh_in))
        below = torch.zeros_like(a)
        below[:, :, :-1] = a[:, :, 1:]
        _blelloch_rev_(below, dh)  # dh := d loss / d h, summed down the columns
        right = torch.zeros_like(a)
        right[:, :, :, :-1] = a[:, :, :, 1:]
        dg = dh.clone()
        _blelloch_rev_(right.transpose(2, 3), dg.transpose(2, 3))  # d loss / d g, summed along the rows
        da = torch.zeros_like(a)
        da[:, :, 1:] += dh[:, :, 1:] * h[:, :, :-1]
        da[:, :, :, 1:] += dg[:, :, :, 1:] * g[:, :, :, :-1]
        return tuple(t[:, :, :H, :W].permute(0, 2, 3, 1, 4) for t in (da, dg))


def pscan2d_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """2DMamba's MambaBlock.selective_scan_2D around PScan2D and the silu(z) gate of its forward, taking and
    returning `selective_scan_2d`'s (b, d, H, W) layout."""
    dt = delta if delta_bias is None else delta + delta_bias[:, None, None]
    dt = (F.softplus(dt) if delta_softplus else dt).permute(0, 2, 3, 1)  # (b, H, W, d)
    x = u.permute(0, 2, 3, 1)
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (b, H, W, d, n)
    bx = dt.unsqueeze(-1) * B.permute(0, 2, 3, 1).unsqueeze(3) * x.unsqueeze(-1)
    hs = PScan2D.apply(decay, bx)
    y = (hs @ C.permute(0, 2, 3, 1).unsqueeze(-1)).squeeze(-1) + D * x
    return (y * F.silu(z.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


def _grid_inputs(side: int) -> list[torch.Tensor]:
    """2DMamba's initialisation: A = -(1..n), dt = softplus(delta + bias) log-uniform in [0.001, 0.1]."""
    g = torch.Generator().manual_seed(0)
    d, n = GRID_D_INNER, GRID_D_STATE
    dt0 = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    tensors = [
        torch.randn(1, d, side, side, generator=g),  # u
        torch.randn(1, d, side, side, generator=g) * 0.1,  # delta before its bias
        -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),  # A
        torch.randn(1, n, side, side, generator=g),  # B
        torch.randn(1, n, side, side, generator=g),  # C
        torch.ones(d),  # D
        torch.randn(1, d, side, side, generator=g),  # z
        dt0 + torch.log(-torch.expm1(-dt0)),  # delta_bias: softplus^-1(dt0)
    ]
    return [t.requires_grad_(True) for t in tensors]


def worker_2d(impl: str, side: int, mem_limit_gb: float, threads: int) -> dict:
    """One 2-D measurement in this (fresh) process; the reference is first checked against ours on 8 x 8."""
    limit = int(mem_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(threads)
    from wsi_pipeline.models.ssm.scan2d import selective_scan_2d

    fn = selective_scan_2d if impl == "ours" else pscan2d_scan
    warm, ours = _grid_inputs(8), _grid_inputs(8)
    dy = torch.randn(1, GRID_D_INNER, 8, 8)
    y = fn(*warm, delta_softplus=True)
    y.backward(dy)  # also pays torch's lazy imports of a first backward(grad) outside the measurement
    if impl != "ours":
        y_ours = selective_scan_2d(*ours, delta_softplus=True)
        y_ours.backward(dy)
        for got, want in zip((y, *(t.grad for t in warm)), (y_ours, *(t.grad for t in ours)), strict=True):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), "reference != ours"
    inputs, dy = _grid_inputs(side), torch.randn(1, GRID_D_INNER, side, side)
    _reset_peak_rss()
    before = _rss_kb("VmRSS")
    try:
        start = time.perf_counter()
        fn(*inputs, delta_softplus=True).backward(dy)
        seconds = time.perf_counter() - start
    except (RuntimeError, MemoryError) as err:
        if "alloc" in str(err) or isinstance(err, MemoryError):
            return {"status": f"OOM (> {mem_limit_gb:g} GB)"}
        raise
    return {"status": "ok", "seconds": seconds, "peak_mb": (_rss_kb("VmHWM") - before) / 1024}


def measure_2d(impl: str, side: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker-2d", impl, str(side), "--mem-limit-gb", str(args.mem_limit_gb),
           "--threads", str(args.threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"too slow (> {args.timeout} s)"}
    if out.returncode != 0:
        oom = "alloc" in out.stderr or out.returncode in (-9, 137)
        return {"status": f"OOM (> {args.mem_limit_gb:g} GB)" if oom else "failed: " + out.stderr[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_2d(args: argparse.Namespace) -> None:
    print(f"2-D selective scan fwd+bwd, d_inner {GRID_D_INNER}, d_state {GRID_D_STATE}, b=1, fp32, "
          f"{args.threads} thread{'s' if args.threads > 1 else ''}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: numbers are noisy)")
    print(f"{'scan':<9} {'grid':>9} {'fwd+bwd s':>10} {'peak MB':>9}   one H*W*d*n fp32 tensor")
    results = {}
    for side in args.grids:
        states_mb = side * side * GRID_D_INNER * GRID_D_STATE * 4 / 2**20
        for impl in GRID_IMPLS:
            result = results[impl, side] = measure_2d(impl, side, args)
            ok = result["status"] == "ok"
            cells = f"{result['seconds']:>10.2f} {result['peak_mb']:>9.0f}" if ok else f"{result['status']:>20}"
            print(f"{impl:<9} {f'{side}x{side}':>9} {cells}   {states_mb:.0f} MB", flush=True)
    for side in args.grids:
        ours, theirs = results["ours", side], results["pscan2d", side]
        if ours["status"] == theirs["status"] == "ok":
            speed, memory = ours["seconds"] / theirs["seconds"], ours["peak_mb"] / theirs["peak_mb"]
            print(f"at {side}x{side}: ours/pscan2d time {speed:.3f} ({1 / speed:.1f}x faster), "
                  f"memory {memory:.3f} ({1 / memory:.1f}x less)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 8000, 30000])
    parser.add_argument("--ratio-at", type=int, default=8000)
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    parser.add_argument("--2d", dest="grid", action="store_true", help="the 2-D scan: ours vs a parallel scan")
    parser.add_argument("--grids", type=int, nargs="+", default=[100, 300], help="grid sides for --2d")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for --2d (the 1-D section uses 2)")
    parser.add_argument("--worker-2d", nargs=2, metavar=("IMPL", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.mem_limit_gb)))
    elif args.worker_2d:
        print(json.dumps(worker_2d(args.worker_2d[0], int(args.worker_2d[1]), args.mem_limit_gb, args.threads)))
    elif args.grid:
        run_2d(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
