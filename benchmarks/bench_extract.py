"""Extraction throughput: the full pipeline against the bare encoder forward, interleaved in one run.

Each round times (a) the bare forward: the encoder on an already normalised channels_last batch, as many
patches as the slide has, in the pipeline's batch sizes; and (b) the full pipeline on a generated 40x slide
patched at 20x: the stage's per-slide function (`extract_slide`), wall clock around all of it — reader start,
reading, resizing, normalising, forward, chunk writes, the h5 and pt files. The ratio b/a is taken per round
and the median printed, so load from other processes on shared cores falls on both sides alike. Both sides use the same
encoder object, batch size, threads and precision (`--precision bf16`: autocast on both). Any registered
encoder (random weights of the real architecture); a smaller slide for the big ones (`--size 2000x2000`).
Run: `python benchmarks/bench_extract.py --encoder resnet18,uni --precision fp32 [--rounds 5] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import generated_slide, machine

from wsi_pipeline.device import resolve_device
from wsi_pipeline.models.encoders import Encoder
from wsi_pipeline.stages.extract import (
    ExtractParams,
    autocast_dtype,
    extract_slide,
    feature_set_name,
    load_encoder,
    slide_jobs,
)
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.patch import PatchParams, patch
from wsi_pipeline.stages.runner import SlideOutcome
from wsi_pipeline.workspace.layout import Layout


def patched_workspace(root: Path, size: str) -> Layout:
    """A bench slide of `size` (WxH px at 40x), patched at 20x."""
    folder = root / "slides"
    folder.mkdir()
    width, height = (int(v) for v in size.split("x"))
    shutil.copy(generated_slide((width, height), seed=1), folder / "bench.svs")
    patch([SlideSource(folder / "bench.svs")], PatchParams(magnification_x=20), out=root)
    return Layout.at(root)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_seconds(encoder: Encoder, batch: torch.Tensor, sizes: list[int], dtype: torch.dtype | None) -> float:
    """The encoder alone on ready batches of `sizes` (the pipeline's own: full ones and the remainder)."""
    autocast = torch.autocast(batch.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        _sync(batch.device)
        start = time.perf_counter()
        for size in sizes:
            encoder(batch[:size]).float()
        _sync(batch.device)
    return time.perf_counter() - start


def pipeline_seconds(run_slide: Callable[[], object], device: torch.device) -> float:
    """One whole slide through the stage."""
    start = time.perf_counter()
    run_slide()
    _sync(device)
    return time.perf_counter() - start


def bench_encoder(layout: Layout, name: str, precision: str, args: argparse.Namespace) -> str:
    params = ExtractParams(encoder=name, weights="random", batch_size=args.batch_size, workers=args.workers,
                           device=args.device, precision=precision)
    device = resolve_device(args.device)
    encoder = load_encoder(params, device)
    patch_set = layout.pick_patch_set(None)
    feature_set = layout.feature_set(patch_set.name, feature_set_name(name, "random", encoder.weights_sha256))
    feature_set.dir.mkdir(parents=True, exist_ok=True)
    jobs = {job.slide_id: job for job in slide_jobs(patch_set)}

    def run(slide_id: str) -> SlideOutcome:
        return extract_slide(jobs[slide_id], encoder=encoder, params=params, feature_set=feature_set, force=True)

    size = encoder.preprocess.input_size
    batch = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(precision, device)
    n_patches = run("bench").row["n_patches"]  # first-call costs (allocator, kernels), on both sides
    full_batches, rest = divmod(n_patches, args.batch_size)
    sizes = [args.batch_size] * full_batches + ([rest] if rest else [])
    bare_seconds(encoder.load(), batch, sorted(set(sizes)), dtype)
    bare, full = [], []
    for _ in range(args.rounds):
        bare.append(n_patches / bare_seconds(encoder.load(), batch, sizes, dtype))
        full.append(n_patches / pipeline_seconds(lambda: run("bench"), device))
    ratios = sorted(f / b for f, b in zip(full, bare, strict=True))
    return (f"{name:14s} {precision:>9s} {n_patches:8d} {statistics.median(bare):11.2f} "
            f"{statistics.median(full):11.2f} {statistics.median(ratios):7.3f}   {ratios[0]:.3f}–{ratios[-1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="auto",
                        help="auto | fp32 | bf16 | fp16 (comma-separated for several), on both sides")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved bare/pipeline pairs")
    parser.add_argument("--encoders", "--encoder", default="resnet18",
                        help="registered names (`wsip encoders`) or timm:<name>, comma-separated")
    parser.add_argument("--size", default="12000x16000", help="generated slide, WxH px at 40x")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    try:
        layout = patched_workspace(root, args.size)
        print(f"wsip extract, batch {args.batch_size}, {args.workers} reader worker(s), {args.rounds} interleaved "
              f"rounds — {machine()}")
        print(f"{'encoder':14s} {'precision':>9s} {'patches':>8s} {'bare fwd/s':>11s} {'pipeline/s':>11s} "
              f"{'ratio':>7s}   (min–max)")
        for name in args.encoders.split(","):
            for precision in args.precision.split(","):
                print(bench_encoder(layout, name, precision, args), flush=True)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
