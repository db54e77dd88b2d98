"""Extraction throughput: full pipeline (read + resize + normalise + forward + write) vs the bare encoder.

(a) bare forward patches/s on random tensors, same batch size and threads; (b) `extract` patches/s on a
generated multi-level slide; prints b/a per encoder. Target on a 2-core CPU: ≥ 0.8 for resnet18.
Any registered encoder (random weights of the real architecture): `--encoder uni`; a smaller slide for the big
ones: `--size 4000x4000`.
Run: `.venv/bin/python benchmarks/bench_extract.py [--encoder NAME] [--device cuda] [--batch-size 32] [--workers 1]`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import generated_slide, machine

from wsi_pipeline.device import resolve_device
from wsi_pipeline.models.encoders import create_encoder
from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.patch import PatchParams, patch


def bare_rate(name: str, device: torch.device, batch: int, n_batches: int, precision: str) -> float:
    encoder = create_encoder(name, "random", device=device)
    encoder.module.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, encoder.preprocess.input_size, encoder.preprocess.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        encoder(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_batches):
            encoder(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * n_batches / (time.perf_counter() - t)


def pipeline_rate(workspace: Path, name: str, args: argparse.Namespace) -> tuple[float, int]:
    """Patches/s of one slide, everything per slide included: reader start, reads, resize, normalise, forward,
    chunk writes, the final h5 (the stage's own per-slide `seconds`); the once-per-run model build is not."""
    params = ExtractParams(encoder=name, weights="random", batch_size=args.batch_size, workers=args.workers,
                           device=args.device, precision=args.precision, formats=("h5",))
    extract(params, out=workspace, slide_ids=["warmup"])  # first-call costs (allocator, kernels)
    outcome = extract(params, out=workspace, slide_ids=["bench"]).outcomes[0]
    return outcome.row["n_patches"] / float(outcome.row["seconds"]), outcome.row["n_patches"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--encoders", "--encoder", default="resnet18,vit_s16_ssl",
                        help="registered names (`wsip encoders`) or timm:<name>, comma-separated")
    parser.add_argument("--size", default="12000x16000", help="generated slide, WxH px at 40x")
    args = parser.parse_args()
    device = resolve_device(args.device)
    workspace = Path(tempfile.mkdtemp())
    folder = workspace / "slides"
    folder.mkdir()
    width, height = (int(v) for v in args.size.split("x"))
    shutil.copy(generated_slide((width, height), seed=1), folder / "bench.svs")
    shutil.copy(generated_slide((2000, 2000), seed=2), folder / "warmup.svs")
    patch([SlideSource(folder / "bench.svs"), SlideSource(folder / "warmup.svs")], PatchParams(magnification_x=20),
          out=workspace)
    print(f"wsip extract, batch {args.batch_size}, {args.workers} reader worker(s), precision {args.precision} — "
          f"{machine()}")
    print(f"{'encoder':14s} {'patches':>8s} {'bare fwd/s':>11s} {'pipeline/s':>11s} {'ratio b/a':>10s}")
    for name in args.encoders.split(","):
        rate, n = pipeline_rate(workspace, name, args)
        bare = bare_rate(name, device, args.batch_size, max(2, min(8, n // args.batch_size)), args.precision)
        print(f"{name:14s} {n:8d} {bare:11.1f} {rate:11.1f} {rate / bare:10.2f}")
    shutil.rmtree(workspace)


if __name__ == "__main__":
    main()
