"""Training cost: seconds per epoch per 100 bags of N instances (D = 512), per model, and GMMamba / ABMIL.

One optimiser step per bag (GMMamba's protocol). Each (model, N) is timed on a few bags after a warm-up
step and scaled to 100 bags; K-Means grouping and 2dmamba's cell placement are excluded (cached per slide by
the trainer). A bag's patches are N random cells of a square lattice of 2N cells (512-px patches): a slide's
tissue, which 2dmamba scans as a grid of about 2N cells (its released grid from the origin, sized to the bag).
Run: `.venv/bin/python benchmarks/bench_train.py [--device cuda] [--bags 4] [--sizes 2000,8000]`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import machine

from wsi_pipeline.models.mil import create_model


def lattice_coords(n: int) -> torch.Tensor:
    """Level-0 (x, y) of n distinct random cells of a square lattice of about 2n cells, 512 px apart."""
    side = math.ceil(math.sqrt(2 * n))
    cells = torch.randperm(side * side)[:n]
    return torch.stack([cells % side, cells // side], dim=1) * 512


def seconds_per_100_bags(name: str, n: int, bags: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(name, in_dim=512, n_classes=2).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    data = []
    for _ in range(bags + 1):
        x, coords = torch.randn(n, 512), lattice_coords(n)
        groups = model.make_groups(x.numpy(), coords.numpy())
        data.append((x.to(device), coords.to(device), groups, torch.tensor([n % 2], device=device)))

    def step(x, coords, groups, y):
        optimizer.zero_grad()
        logits, _ = model(x, coords, groups=groups)
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()

    step(*data[0])  # warm-up (JIT, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for bag in data[1:]:
        step(*bag)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / bags * 100


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bags", type=int, default=3, help="bags timed per (model, N); scaled to 100")
    parser.add_argument("--sizes", default="2000,8000")
    parser.add_argument("--models", default="gmmamba,abmil,mambamil,2dmamba")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"training step (fwd + bwd + AdamW), one bag per step — {machine()}")
    print(f"{'model':10s} " + " ".join(f"{'N=' + s:>14s}" for s in args.sizes.split(",")) + "   (s / 100 bags)")
    results = {}
    for name in args.models.split(","):
        results[name] = [seconds_per_100_bags(name, int(n), args.bags, device) for n in args.sizes.split(",")]
        print(f"{name:10s} " + " ".join(f"{v:14.1f}" for v in results[name]), flush=True)
    if "gmmamba" in results and "abmil" in results:
        ratios = [g / a for g, a in zip(results["gmmamba"], results["abmil"], strict=True)]
        print("gmmamba / abmil: " + ", ".join(f"N={n}: {r:.1f}x" for n, r in zip(args.sizes.split(","), ratios,
                                                                                   strict=True)))


if __name__ == "__main__":
    main()
