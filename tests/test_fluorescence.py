"""Dark-background (fluorescence) tissue detection (issue 15): found where the brightfield detector finds none or
a patchwork, chosen automatically, shown in the QC image; brightfield behaviour and config names unchanged."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
from test_patch import run_cli

from wsi_pipeline.slide import Slide
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.patch import PatchParams, SegmentParams, patch
from wsi_pipeline.stages.patch.qc import stretch_contrast
from wsi_pipeline.stages.patch.segment import tissue_mode
from wsi_pipeline.testing.synthetic import fluorescence_tissue, write_aperio_slide

BACKGROUND_MAX = 10  # the generator's background is 4 ± 1.5 per channel; its tissue is brighter than this


@pytest.fixture(scope="module")
def fluo(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("fluo")
    slides = {}
    for seed, stain in enumerate(("tritc", "dapi")):
        image = fluorescence_tissue((2400, 3200), stain=stain, seed=seed)
        slides[stain] = write_aperio_slide(folder / f"{stain}.svs", image, mpp=0.5, app_mag=20, downsamples=(4,))
    dark = np.random.default_rng(9).normal(4, 1.5, (1600, 2000, 3)).clip(0, 255).astype(np.uint8)
    slides["empty"] = write_aperio_slide(folder / "empty.svs", dark, mpp=0.5, app_mag=20, downsamples=(4,))
    return slides


def run(path, tmp_path, tissue: str):
    result = patch([SlideSource(path)], PatchParams(segment=SegmentParams(tissue=tissue)), out=tmp_path / tissue)
    outcome = result.outcomes[0]
    coords = np.zeros((0, 2), np.int64)
    if outcome.status == "done":
        with h5py.File(result.out_dir / "coords" / f"{path.stem}.h5", "r") as f:
            coords = f["coords"][:]
    return result, outcome, coords


def signal_fraction(slide: Slide, xy, size0: int) -> float:
    """Independent "on tissue" check: share of pixels brighter than the generator's background."""
    rgb = slide.read_region(xy, 1, (size0 // 4, size0 // 4))
    return float((rgb.max(axis=2) > BACKGROUND_MAX).mean())


@pytest.mark.e2e
@pytest.mark.parametrize("stain", ["tritc", "dapi"])
def test_fluorescence_finds_the_tissue_brightfield_misses(fluo, tmp_path, stain):
    path = fluo[stain]
    _, bright, bright_coords = run(path, tmp_path, "brightfield")
    auto_result, auto, auto_coords = run(path, tmp_path, "auto")
    _, forced, forced_coords = run(path, tmp_path, "fluorescence")
    assert auto.status == forced.status == "done" and auto.row["tissue"] == forced.row["tissue"] == "fluorescence"
    assert np.array_equal(auto_coords, forced_coords)
    cells = (2400 // 256) * (3200 // 256)
    assert len(auto_coords) > 0.6 * cells  # tissue fills ~85% of the frame
    assert len(bright_coords) < 0.2 * len(auto_coords)  # none (TRITC) or a patchwork (DAPI)
    if stain == "tritc":
        assert bright.status == "no_tissue"
    with Slide(path) as slide:
        fractions = [signal_fraction(slide, xy, 256) for xy in auto_coords]
        raw = slide.thumbnail(1024)
    assert np.median(fractions) > 0.9 and min(fractions) > 0.25
    # the QC image shows the dim slide stretched to the full range, with the contours drawn on it
    qc = cv2.imread(str(auto_result.patch_set.qc(path.stem)))
    assert np.percentile(raw.max(axis=2), 99) < 100 < 200 < np.percentile(qc.max(axis=2), 99)
    assert (np.abs(qc.astype(int) - (0, 160, 0)).max(axis=2) < 40).sum() > 500  # green contour pixels


@pytest.mark.e2e
def test_an_empty_dark_slide_stays_empty(fluo, tmp_path):
    _, outcome, _ = run(fluo["empty"], tmp_path, "auto")
    assert outcome.status == "no_tissue" and outcome.row["tissue"] == "fluorescence"


@pytest.mark.e2e
def test_brightfield_slides_stay_brightfield_with_the_default_config_name(make_slide, tmp_path):
    path = make_slide(size=(3000, 4000))
    with Slide(path) as slide:
        assert tissue_mode(slide.thumbnail(512)) == "brightfield"
    auto = patch([SlideSource(path)], out=tmp_path)
    forced = patch([SlideSource(path)], PatchParams(segment=SegmentParams(tissue="brightfield")), out=tmp_path)
    assert auto.out_dir.name == "20x_256px_0px" and forced.out_dir.name.startswith("20x_256px_0px_")
    assert auto.outcomes[0].row["tissue"] == "brightfield"
    with h5py.File(auto.out_dir / "coords" / "gen.h5") as a, h5py.File(forced.out_dir / "coords" / "gen.h5") as f:
        assert np.array_equal(a["coords"][:], f["coords"][:]) and len(a["coords"]) > 10


def test_stretch_contrast_maps_percentiles_to_the_full_range():
    rgb = np.zeros((10, 100, 3), np.uint8)
    rgb[:, :, 0] = np.arange(100)[None] // 4  # 0..24
    out = stretch_contrast(rgb, 0, 100)
    assert out.max() == 255 and out.min() == 0 and np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


@pytest.mark.e2e
def test_cli_tissue_option(fluo, tmp_path):
    proc = run_cli("patch", fluo["tritc"], "--tissue", "darkfield", "--out", tmp_path)
    assert proc.returncode == 2 and "--tissue darkfield" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("patch", fluo["tritc"], "--tissue", "fluorescence", "--out", tmp_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert ",fluorescence," in next((tmp_path / "patches").glob("*/manifest.csv")).read_text()
