"""`Slide`: backends, MPP source order, reads composited to RGB, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sample_slide

from wsi_pipeline.slide import Slide, SlideError, _mpp_from_properties, _to_rgb


def test_mpp_source_order():
    assert _mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25", "aperio.MPP": "0.5"}).source \
        == "openslide.mpp"
    assert _mpp_from_properties({"aperio.MPP": "0.5"}).mpp == 0.5
    tiff = _mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"})
    assert tiff.source == "tiff.resolution" and tiff.mpp == pytest.approx(0.25)
    # a 72-dpi placeholder is not a scan resolution; objective power is the (warned) last resort
    power = _mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch",
                                  "openslide.objective-power": "40"})
    assert power.mpp == pytest.approx(0.25) and "approximate" in power.source
    assert _mpp_from_properties({}) is None


def test_override_wins_and_missing_mpp_says_pass_mpp():
    path = sample_slide("TCGA-CR-7395-01A-01-TS1.svs")
    with Slide(path) as slide, pytest.raises(SlideError, match="--mpp"):
        _ = slide.mpp
    with Slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_info.source == "override"
    with Slide(sample_slide("CMU-1-Small-Region.svs"), mpp=0.3) as slide:
        assert slide.mpp == 0.3


def test_read_region_rgb_and_outside_is_white():
    with Slide(sample_slide("CMU-1-Small-Region.svs")) as slide:
        assert slide.vendor == "aperio" and slide.objective_power == 20 and slide.backend == "openslide"
        patch = slide.read_region((100, 100), 0, (64, 32))
        assert patch.shape == (32, 64, 3) and patch.dtype == np.uint8
        w, h = slide.dimensions
        outside = slide.read_region((w - 8, h - 8), 0, (16, 16))
        assert (outside[8:, 8:] == 255).all()
        assert slide.thumbnail(256).shape[0] == 256


def test_plain_tiff_opens_with_the_image_backend():
    with Slide(sample_slide("kidney-48-5.tif")) as slide:
        assert slide.backend == "image" and slide.dimensions == (1493, 901) and slide.mpp_info is None


def test_alpha_is_composited_on_white():
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 0, 255)
    rgba[0, 1] = (0, 0, 0, 0)
    assert _to_rgb(rgba).tolist() == [[[200, 100, 0], [255, 255, 255]]]


def test_unopenable_files_raise_one_error_type(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("hello")
    with pytest.raises(SlideError, match="notes.svs"):
        Slide(text)
    with pytest.raises(SlideError, match="no such file"):
        Slide(tmp_path / "missing.svs")


def test_tiatoolbox_backend_when_installed(monkeypatch):
    pytest.importorskip("tiatoolbox", reason="tiatoolbox is not installed (optional; see README)")
    import openslide

    from wsi_pipeline import slide as slide_module

    def refuse(*args, **kwargs):
        raise openslide.OpenSlideUnsupportedFormatError("refused for this test")

    # refuse only our own OpenSlide attempt: tiatoolbox's reader itself opens .svs through openslide.OpenSlide
    monkeypatch.setattr(slide_module, "_openslide_open", refuse)
    with Slide(sample_slide("CMU-1-Small-Region.svs")) as slide:
        assert slide.backend == "tiatoolbox" and slide.mpp == pytest.approx(0.499, rel=1e-3)
        assert slide.vendor == "aperio" and slide.objective_power == 20
        assert slide.read_region((0, 0), 0, (32, 32)).shape == (32, 32, 3)
        w, h = slide.dimensions
        assert (slide.read_region((w - 8, h - 8), 0, (16, 16))[8:, 8:] == 255).all()


def test_tiatoolbox_reads_a_tiff_openslide_refuses(tmp_path):
    pytest.importorskip("tiatoolbox", reason="tiatoolbox is not installed (optional; see README)")
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("imagecodecs")
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 255, (512 // 2**i, 512 // 2**i, 3), dtype=np.uint8) for i in range(2)]
    path = tmp_path / "webp.tif"  # WebP tiles: valid tiled TIFF, unsupported compression for OpenSlide
    with tifffile.TiffWriter(path, bigtiff=True) as tif:  # tiatoolbox reads multi-page TIFFs only as BigTIFF/OME/SVS
        for i, level in enumerate(levels):
            tif.write(level, tile=(256, 256), compression="webp", compressionargs={"level": 100, "lossless": True},
                      photometric="rgb", subfiletype=int(i > 0),
                      resolution=(1e4 / (0.5 * 2**i),) * 2, resolutionunit="CENTIMETER")
    with Slide(path) as slide:
        assert slide.backend == "tiatoolbox" and slide.level_downsamples == [1.0, 2.0]
        assert slide.mpp == pytest.approx(0.5)
        # location is level-0 px at every level, as with OpenSlide
        assert (slide.read_region((200, 100), 1, (32, 32)) == levels[1][50:82, 100:132]).all()
