"""Shared fixtures: the real sample slides (skip when absent) and generated multi-level Aperio slides."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.testing.synthetic import he_tissue, tile_tissue, write_aperio_slide

REPO = Path(__file__).resolve().parents[1]


def shared_slides_dir() -> Path:
    return Path(os.environ.get("WSIP_TEST_SLIDES") or REPO.parent / "shared" / "slides")


def sample_slide(name: str) -> Path:
    """A real sample slide from ../shared/slides (or $WSIP_TEST_SLIDES); skip the test when absent."""
    path = shared_slides_dir() / name
    if not path.exists():
        pytest.skip(f"sample slide {name} not found in {shared_slides_dir()} (set WSIP_TEST_SLIDES)")
    return path


@pytest.fixture(scope="session")
def tissue_source() -> np.ndarray:
    """Real H&E (a tissue-dense 768×1024 crop of CMU-1-Small-Region) when present, else procedural tissue."""
    path = shared_slides_dir() / "CMU-1-Small-Region.svs"
    if path.exists():
        from wsi_pipeline.slide import Slide

        with Slide(path) as slide:
            return slide.read_region((768, 1920), 0, (768, 1024))
    image, _ = he_tissue((1400, 1000), seed=0)
    return image[200:1224, 116:884]


@pytest.fixture(scope="session")
def make_slide(tmp_path_factory, tissue_source):
    """Factory: a multi-level Aperio-style slide (levels 1/4/16) of tiled tissue; cached per arguments."""
    cache: dict[tuple, Path] = {}
    folder = tmp_path_factory.mktemp("slides")

    def make(name: str = "gen", size: tuple[int, int] = (6000, 8000), mpp: float = 0.25, mag: float = 40,
             seed: int = 0) -> Path:
        key = (name, size, mpp, mag, seed)
        if key not in cache:
            image = tile_tissue(tissue_source, size, seed=seed)
            sub = folder / f"{size[0]}x{size[1]}_{mpp}_{mag}_{seed}"  # same slide id, distinct files
            sub.mkdir(exist_ok=True)
            cache[key] = write_aperio_slide(sub / f"{name}.svs", image, mpp=mpp, app_mag=mag)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Models' tiny per-group ops: on a shared 2-core box extra torch (OpenMP) threads only spin and contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHALLOW_DEPTH = 1  # reduced encoder copies: one transformer block, every width and token count as published


@pytest.fixture
def shallow(monkeypatch: pytest.MonkeyPatch):
    """Registers a reduced-depth copy of a registered encoder (the timm `depth` option; all else as on its card),
    so official-layout files load and run in a second instead of building a 0.3-1.1 B-parameter ViT."""
    from dataclasses import replace
    from functools import partial

    from wsi_pipeline.models.encoders import zoo

    def use(name: str):
        spec = zoo.get_spec(name)
        if spec.card is not None and spec.card.arch.startswith("vit"):
            monkeypatch.setitem(zoo._REGISTRY, name, replace(spec, builder=partial(spec.builder, depth=SHALLOW_DEPTH)))
        return zoo.get_spec(name)

    return use
