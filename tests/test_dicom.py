"""DICOM WSI (issue 15): a generated series opens through OpenSlide with MPP and levels, is one slide per folder,
and patches to exactly the coords of its lossless TIFF twin."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from wsi_pipeline.digests import file_fingerprint
from wsi_pipeline.slide import Slide, SlideError
from wsi_pipeline.stages.inputs import SlideSource, resolve_inputs
from wsi_pipeline.stages.patch import PatchParams, patch
from wsi_pipeline.testing.synthetic import tile_tissue, write_aperio_slide, write_dicom_slide

pytest.importorskip("pydicom", reason="pydicom (extra `dev`) writes the test DICOM WSI; pip install pydicom")


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tissue_source):
    """The same pixels as a DICOM series folder `case01/` and as a lossless Aperio TIFF `case01.svs`."""
    folder = tmp_path_factory.mktemp("dicom")
    image = tile_tissue(tissue_source, (3000, 4000), seed=2)
    (folder / "tif").mkdir()
    dicom = write_dicom_slide(folder / "dcm" / "case01", image, mpp=0.25, app_mag=40, downsamples=(4, 16))
    tiff = write_aperio_slide(folder / "tif" / "case01.svs", image, mpp=0.25, app_mag=40, downsamples=(4, 16),
                              compression="zlib")
    return dicom, tiff


def test_series_opens_with_mpp_levels_and_the_twins_pixels(twins):
    dicom, tiff = twins
    with Slide(dicom) as d, Slide(tiff) as t:
        assert (d.backend, d.vendor, d.slide_id) == ("openslide", "dicom", "case01")
        assert d.mpp == pytest.approx(0.25) and d.mpp_info.source == "openslide.mpp" and d.objective_power == 40
        assert d.level_dimensions == t.level_dimensions == [(4000, 3000), (1000, 750), (250, 187)]
        assert d.level_downsamples == pytest.approx(t.level_downsamples)
        for level in range(d.level_count):
            assert np.array_equal(d.read_region((1000, 700), level, (300, 200)),
                                  t.read_region((1000, 700), level, (300, 200)))
        w, h = d.dimensions
        assert (d.read_region((w - 8, h - 8), 0, (16, 16))[8:, 8:] == 255).all()  # outside is white, as for TIFF
    with Slide(dicom / "level-2.dcm") as one:  # any file of the series opens the whole series
        assert one.level_count == 3 and one.slide_id == "case01" and one.dimensions == (4000, 3000)


@pytest.mark.e2e
@pytest.mark.parametrize("mag", [20, 10])
def test_dicom_patches_to_the_tiff_twins_coords(twins, tmp_path, mag):
    dicom, tiff = twins
    coords, attrs = [], []
    for name, path in (("d", dicom), ("t", tiff)):
        result = patch([SlideSource(path)], PatchParams(magnification_x=mag), out=tmp_path / name)
        assert [o.status for o in result.outcomes] == ["done"]
        with h5py.File(result.out_dir / "coords" / "case01.h5", "r") as f:
            coords.append(f["coords"][:])
            attrs.append(dict(f["coords"].attrs))
    assert len(coords[0]) >= {20: 15, 10: 4}[mag] and np.array_equal(coords[0], coords[1])
    for key in ("patch_level", "patch_size", "patch_size_level0", "slide_mpp", "tissue_mode"):
        assert attrs[0][key] == attrs[1][key], key


@pytest.mark.e2e
def test_a_series_folder_is_one_slide_named_by_the_folder(twins, tmp_path):
    dicom, tiff = twins
    cohort = tmp_path / "cohort"
    shutil.copytree(dicom, cohort / "site" / "case01")
    shutil.copy(tiff, cohort / "case02.svs")
    sources = resolve_inputs([cohort])
    assert {s.slide_id: s.path for s in sources} == {"case01": cohort / "site" / "case01",
                                                     "case02": cohort / "case02.svs"}
    # a .dcm file given on its own (or twice, or with its folder) stands for its series
    series = cohort / "site" / "case01"
    assert resolve_inputs([series / "level-2.dcm", series / "level-0.dcm", series]) == [SlideSource(series)]
    before = file_fingerprint(series)
    (series / "level-2.dcm").unlink()
    assert file_fingerprint(series) != before


def test_folders_that_are_no_dicom_series_fail_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="no DICOM WSI series"):
        Slide(tmp_path / "empty")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "a.dcm").write_text("not dicom\n")
    with pytest.raises(SlideError, match="no DICOM WSI file") as err:
        Slide(tmp_path / "fake")
    assert "\n" not in str(err.value)
