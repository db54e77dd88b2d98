"""Shared by the benchmarks: generated slides from real tissue (or procedural tissue) and machine info."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from wsi_pipeline.testing.synthetic import he_tissue, tile_tissue, write_aperio_slide

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("WSIP_BENCH_CACHE", "/tmp/wsip_bench"))


def shared_slides() -> Path:
    return Path(os.environ.get("WSIP_TEST_SLIDES") or REPO.parent / "shared" / "slides")


def tissue_source() -> np.ndarray:
    """A tissue-dense crop of CMU-1-Small-Region when present, else procedural H&E."""
    path = shared_slides() / "CMU-1-Small-Region.svs"
    if path.exists():
        from wsi_pipeline.slide import Slide

        with Slide(path) as slide:
            return slide.read_region((768, 1920), 0, (768, 1024))
    return he_tissue((1400, 1000), seed=0)[0][200:1224, 116:884]


def generated_slide(size: tuple[int, int], *, mpp: float = 0.25, mag: float = 40, seed: int = 0) -> Path:
    """A multi-level (1/4/16) Aperio-style slide, cached across benchmark runs."""
    path = CACHE / f"gen_{size[0]}x{size[1]}_{mpp}_{seed}.svs"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        image = tile_tissue(tissue_source(), size, seed=seed)
        write_aperio_slide(path.with_suffix(".tmp"), image, mpp=mpp, app_mag=mag)
        path.with_suffix(".tmp").rename(path)
    return path


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                                                    else ", no GPU"))
