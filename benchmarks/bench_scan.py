"""Forward+backward time and peak memory of one BiMamba block (d_model 512 -> d_inner 1024, d_state 16, b=1,
fp32, 2 threads) with three selective scans plugged into the same block: ours (`scan.selective_scan`), a
plain per-step loop (the sequential reference) and mambapy's parallel scan (`mambapy.pscan`, laid out as
mambapy's own MambaBlock.selective_scan). Only the scan differs; conv, projections and gating are shared.

Each measurement runs in a fresh subprocess: a warm-up at L=64 (JIT load), then one timed forward+backward
at the requested L; memory is that pass's RSS high-water above the RSS before it (/proc/self/clear_refs).
A process is capped at --mem-limit-gb (RLIMIT_DATA) so an allocation beyond it is reported as OOM.

    pip install mambapy      # benchmark-only
    python benchmarks/bench_scan.py [--lengths 1000 8000 30000] [--mem-limit-gb 12]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 8000, 30000])
    parser.add_argument("--ratio-at", type=int, default=8000)
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.mem_limit_gb)))
    else:
        run(args)


if __name__ == "__main__":
    main()
