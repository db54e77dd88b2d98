"""Shared fixtures: the real sample slides (skip when absent) and generated multi-level Aperio slides."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.testing.synthetic import he_tissue, make_demo_cohort, tile_tissue, write_aperio_slide

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`, `make check`: `-n 2`) each worker gets its share of the cores for torch
    and for the `wsip` processes its tests start: on 2 cores two workers of 2 OpenMP threads each only spin."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


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


@pytest.fixture(scope="session")
def build_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """Factory: `build_once(name, build)` runs `build(folder)` once per test run and returns the folder, which
    tests only read (or copy). Under pytest-xdist the workers share the folder: they share the parent of their
    own temp roots, and a file lock makes the first one build while the others wait."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent

    def build(name: str, make: Callable[[Path], None]) -> Path:
        folder = root / "shared" / name
        folder.parent.mkdir(exist_ok=True)
        done = folder.with_suffix(".done")  # built in place: workspaces record absolute paths
        with FileLock(folder.with_suffix(".lock")):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                make(folder)
                done.touch()
        return folder

    return build


@pytest.fixture(scope="session")
def demo_cohort(build_once) -> Callable[[Path], Path]:
    """Factory: the 12-slide generated cohort (two classes, 4 slides sharing patients, `holdout.svs` beside
    `slides/`) linked into a folder, one symlink per file; returns its labels.csv. Generated once per run
    (~10 s) for the end-to-end tests that build workspaces from it (test_report); each gets its own folder,
    so adding a file there never touches another's."""
    source = build_once("demo_cohort", lambda folder: make_demo_cohort(
        folder / "slides", n_slides=12, size=(1536, 2048), hotspots=3, seed=5))
    labels = source / "labels.csv"

    def link(root: Path) -> Path:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                target = root / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
        return root / labels.relative_to(source)

    return link


@pytest.fixture(scope="session")
def small_cohort(build_once) -> Path:
    """10 small labelled slides (1024 × 1536, `holdout.svs` beside `slides/`, labels.csv) patched at 20x and
    encoded (ResNet18, random weights) in `ws/`: built once per run for the tests that train and predict on it
    (test_pipeline, test_layout, test_external_validation). Tests write to a copy of `ws`."""
    def make(folder: Path) -> None:
        from wsi_pipeline.stages.extract import ExtractParams, extract
        from wsi_pipeline.stages.inputs import resolve_inputs
        from wsi_pipeline.stages.patch import patch

        make_demo_cohort(folder / "slides", n_slides=10, size=(1024, 1536), hotspots=2, seed=3)
        assert all(o.status == "done" for o in patch(resolve_inputs([folder / "slides"]), out=folder / "ws").outcomes)
        assert all(o.status == "done" for o in extract(ExtractParams(weights="random", formats=("h5",)),
                                                       out=folder / "ws").outcomes)

    return build_once("small_cohort", make)


@pytest.fixture(scope="session")
def wsip() -> Iterator:
    """One fork server for the tests that run the real CLI (test_faults, test_bad_inputs, test_layout, …): torch
    and the stages are imported once per session, not once per run (in a private mount namespace where
    permitted). Its runs report stdout and stderr together, in `.stderr`."""
    from support.launch import ForkedWsip, namespaces_available

    with ForkedWsip(private_mounts=namespaces_available()) as server:
        yield server


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
