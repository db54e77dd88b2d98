"""Features in and out, the peers' way: `wsip export stamp`, and `data.features` reading folders written by CLAM,
TRIDENT and STAMP as they are (files built here in each tool's documented layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from wsi_pipeline.errors import UserError
from wsi_pipeline.stages.export_features import ExportFeaturesParams, export_features
from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.patch import PatchParams, patch
from wsi_pipeline.stages.train.bags import load_bags
from wsi_pipeline.stages.train.config import load_config
from wsi_pipeline.stages.train.labels import load_labelled_slides
from wsi_pipeline.stages.train.rundir import features_record
from wsi_pipeline.workspace.peer_features import read_bag

SLIDES = [f"S{i}" for i in range(4)]
STEP_PX, MPP = 512, 0.25  # a 256 px patch at 20x on a 40x scan: 512 level-0 px = 128 µm


def _grid(n: int) -> np.ndarray:
    return np.array([[(i % 3) * STEP_PX, (i // 3) * STEP_PX] for i in range(n)], dtype=np.int64)


def _feats(i: int, n: int = 5, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(i).normal(size=(n, dim)).astype(np.float32)


def write_clam(folder: Path) -> None:
    """CLAM's extract_features_fp: h5_files/<slide>.h5 with root datasets `features` and `coords` (level-0 px)."""
    for i, sid in enumerate(SLIDES):
        (folder / "h5_files").mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / "h5_files" / f"{sid}.h5", "w") as f:
            f["features"], f["coords"] = _feats(i), _grid(5)


def write_trident(folder: Path) -> None:
    """TRIDENT's features_<encoder>/<slide>.h5: `features` and `coords`, attrs on the datasets."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(SLIDES):
        with h5py.File(folder / f"{sid}.h5", "w") as f:
            f["features"], f["coords"] = _feats(i), _grid(5)
            f["features"].attrs.update({"name": sid, "encoder": "uni_v1"})
            f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": STEP_PX, "level0_magnification": 40,
                                      "target_magnification": 20, "overlap": 0, "name": sid})


def write_stamp(folder: Path) -> None:
    """STAMP's preprocessing: `feats` (fp16), `coords` in µm, attrs unit/tile_size_um/tile_size_px/extractor."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(SLIDES):
        with h5py.File(folder / f"{sid}.h5", "w") as f:
            f["feats"] = _feats(i).astype(np.float16)
            f["coords"] = (_grid(5) * MPP).astype(np.float32)
            f.attrs.update({"extractor": "uni", "unit": "um", "tile_size_um": STEP_PX * MPP, "tile_size_px": 224,
                            "feat_type": "tile", "stamp_version": "2.3.0"})


def _config(tmp_path: Path, features: Path) -> Path:
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"{s},{'ab'[i % 2]}\n"
                                                                      for i, s in enumerate(SLIDES)))
    cfg = {"name": "t", "data": {"features": str(features), "labels": "labels.csv"}, "splits": {"folds": 2},
           "model": {"name": "mean", "hidden_dim": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


@pytest.mark.parametrize(("tool", "writer", "sub", "layout"), [
    ("clam", write_clam, "clam_out", "wsip/CLAM"),
    ("trident", write_trident, "trident/20x_256px_0px_overlap/features_uni_v1", "TRIDENT"),
    ("stamp", write_stamp, "stamp_features", "STAMP"),
])
def test_training_reads_peer_feature_folders_as_they_are(tmp_path: Path, tool, writer, sub, layout) -> None:
    folder = tmp_path / sub
    writer(folder)
    cfg = load_config(_config(tmp_path, folder))
    data = load_labelled_slides(cfg)
    assert data.in_dim == 8 and len(data.slides) == 4
    bags = load_bags({s.slide_id: s.h5_path for s in data.slides}, make_groups=lambda f, c: None, cache_path=None)
    features, coords = bags["S1"].features.numpy(), bags["S1"].coords.numpy()
    np.testing.assert_allclose(features, _feats(1), atol=1e-2 if tool == "stamp" else 0)  # STAMP stores fp16
    expected = _grid(5) if tool != "stamp" else _grid(5) // STEP_PX * 224  # STAMP: px on its 224-px tile grid
    np.testing.assert_array_equal(coords, expected)
    record = features_record(cfg)
    assert record["made_by_wsip"] is False and record["layout"].startswith(layout)


def test_empty_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no h5_files/ folder and no .h5 files here.*CLAM, TRIDENT or STAMP"):
        load_labelled_slides(load_config(_config(tmp_path, tmp_path / "empty")))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, make_slide) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for i, sid in enumerate(SLIDES):
        shutil.copy(make_slide(seed=i, size=(1536, 2048), mpp=MPP, mag=40), folder / f"{sid}.svs")
    out = tmp_path_factory.mktemp("ws")
    patch([SlideSource(folder / f"{s}.svs") for s in SLIDES], PatchParams(magnification_x=20), out=out)
    extract(ExtractParams(weights="random", formats=("h5",), workers=0), out=out)
    return out


def test_export_stamp_writes_stamps_documented_layout(extracted: Path) -> None:
    result = export_features(ExportFeaturesParams("stamp"), out=extracted)
    assert len(result.written) == 4 and result.out_dir.name == "stamp"
    source = result.out_dir.parent / "h5_files" / "S2.h5"
    with h5py.File(source, "r") as f, h5py.File(result.out_dir / "S2.h5", "r") as g:
        np.testing.assert_array_equal(g["feats"][:], f["features"][:])
        np.testing.assert_allclose(g["coords"][:], f["coords"][:] * MPP)  # top-left corners in µm
        assert g.attrs["unit"] == "um" and g.attrs["tile_size_um"] == pytest.approx(512 * MPP)
        assert g.attrs["tile_size_px"] == 256 and g.attrs["feat_type"] == "tile"
        assert g.attrs["extractor"] == "wsip-resnet18" and "stamp_version" not in g.attrs  # theirs refuses newer
        assert g.attrs["wsip_weights_sha256"] == f.attrs["weights_sha256"]
        assert "features" not in g and "coords" in g
    # and back: the exported folder is a STAMP feature folder for `wsip train`
    features, coords = read_bag(result.out_dir / "S2.h5")
    with h5py.File(source, "r") as f:
        np.testing.assert_array_equal(coords, f["coords"][:] // 512 * 256)


def test_export_needs_features(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no patches yet"):
        export_features(ExportFeaturesParams("stamp"), out=tmp_path)
    with pytest.raises(UserError, match="choose stamp"):
        export_features(ExportFeaturesParams("qupath"), out=tmp_path)


def test_cli_export_stamp(extracted: Path) -> None:
    from typer.testing import CliRunner

    from wsi_pipeline.cli import app

    result = CliRunner().invoke(app, ["export", "stamp", "--out", str(extracted), "--features", "resnet18_random"])
    assert result.exit_code == 0, result.output
    assert "4 STAMP feature files" in result.output
    bad = CliRunner().invoke(app, ["export", "stamp", "--out", str(extracted), "--features", "uni"])
    assert bad.exit_code == 2 and "no such feature set" in bad.output and json.dumps("resnet18_random")[1:-1] in \
        bad.output
