"""`wsip extract` (issue #3 acceptance): exact features, formats, weights, resume inside a slide, caching."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from wsi_pipeline.errors import UserError
from wsi_pipeline.models.encoders import create_encoder
from wsi_pipeline.slide import Slide
from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.patch import PatchParams, patch

pytestmark = pytest.mark.e2e

SMALL = {"size": (1536, 2048), "mpp": 0.5, "mag": 20}


@pytest.fixture(scope="module")
def patched_once(tmp_path_factory, make_slide):
    """Two small slides and their patched workspace (20x, level 0, 256 px), made once per module."""
    root = tmp_path_factory.mktemp("patched")
    folder = root / "slides"
    folder.mkdir()
    for name, seed in (("a", 0), ("b", 1)):
        shutil.copy(make_slide(seed=seed, **SMALL), folder / f"{name}.svs")
    result = patch([SlideSource(folder / "a.svs"), SlideSource(folder / "b.svs")], out=root / "ws")
    assert [o.status for o in result.outcomes] == ["done", "done"]
    return root


@pytest.fixture()
def patched(tmp_path, patched_once):
    """A workspace with two small patched slides: each test's own copy of `patched_once` (a workspace is found
    from its root, so a copy works as the original), the slides linked beside it."""
    shutil.copytree(patched_once / "ws", tmp_path / "ws")
    (tmp_path / "slides").symlink_to(patched_once / "slides")
    return tmp_path / "ws"


def direct_features(slide_path, coords, attrs, encoder, rows):
    """The reference: read each sampled patch as the coords h5 says, resize, normalise, encoder alone."""
    pre = encoder.preprocess
    with Slide(slide_path) as slide:
        patches = [
            pre.resize_crop(
                slide.read_region(tuple(coords[i]), int(attrs["read_level"]), (int(attrs["read_size"]),) * 2))
            for i in rows
        ]
    batch = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2)
    return encoder(pre.normalize(batch)).numpy()


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("vit_s16_ssl", 384)])
def test_features_equal_a_direct_computation(patched, name, dim):
    result = extract(ExtractParams(encoder=name, weights="random", workers=1), out=patched)
    assert [o.status for o in result.outcomes] == ["done", "done"]
    h5 = result.out_dir / "h5_files" / "a.h5"
    with h5py.File(h5, "r") as f:
        features, coords, attrs = f["features"][:], f["coords"][:], dict(f.attrs)
    assert features.dtype == np.float32 and features.shape == (len(coords), dim) and coords.dtype == np.int64
    assert attrs["encoder"] == name and attrs["weights_sha256"] == "random:0" and attrs["patch_level"] == 0
    pt = torch.load(result.out_dir / "pt_files" / "a.pt")
    assert isinstance(pt, torch.Tensor) and torch.equal(pt, torch.from_numpy(features))
    rows = np.random.default_rng(0).choice(len(coords), size=min(6, len(coords)), replace=False)
    reference = direct_features(patched.parent / "slides/a.svs", coords, attrs, create_encoder(name, "random"), rows)
    np.testing.assert_allclose(features[rows], reference, atol=1e-4, rtol=1e-4)


def _no_build(*args, **kwargs):
    raise AssertionError("the encoder was built for a cohort whose features are all current")


def test_weights_file_cache_and_separate_feature_sets(patched, tmp_path, monkeypatch):
    random_run = extract(ExtractParams(weights="random", formats=("h5",)), out=patched)
    with monkeypatch.context() as m:  # all current: found from the weights' identity alone, no module built
        m.setattr("wsi_pipeline.stages.extract.build_encoder", _no_build)
        again = extract(ExtractParams(weights="random", formats=("h5",)), out=patched)
    assert [o.status for o in again.outcomes] == ["cached", "cached"]
    weights = tmp_path / "my_resnet18.pth"
    model = create_encoder("resnet18", "random", seed=7).module
    torch.save(model.state_dict(), weights)
    file_run = extract(ExtractParams(weights=str(weights), formats=("h5",)), out=patched)
    assert file_run.out_dir != random_run.out_dir  # different weights never share a folder
    with (
        h5py.File(file_run.out_dir / "h5_files/a.h5", "r") as f,
        h5py.File(random_run.out_dir / "h5_files/a.h5", "r") as g,
    ):
        import hashlib

        assert f.attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert not np.allclose(f["features"][:], g["features"][:])
        coords, attrs, feats = f["coords"][:], dict(f.attrs), f["features"][:]
    encoder = create_encoder("resnet18", str(weights))
    reference = direct_features(patched.parent / "slides/a.svs", coords, attrs, encoder, [0, 1])
    np.testing.assert_allclose(feats[[0, 1]], reference, atol=1e-4, rtol=1e-4)


def test_missing_and_corrupt_coords_are_recorded_failures(patched):
    coords_dir = patched / "patches/20x_256px_0px/coords"
    (coords_dir / "a.h5").write_bytes(b"not an h5 file")
    result = extract(ExtractParams(weights="random", formats=("h5",)), out=patched)
    status = {o.slide_id: (o.status, o.error) for o in result.outcomes}
    assert status["b"][0] == "done"
    assert status["a"][0] == "failed" and "a.h5" in status["a"][1] and "wsip patch" in status["a"][1]
    (coords_dir / "a.h5").unlink()
    result = extract(ExtractParams(weights="random", formats=("h5",)), out=patched)
    assert {o.slide_id: o.status for o in result.outcomes} == {"a": "failed", "b": "cached"}


def test_unreachable_weights_are_a_clear_error_not_random_init(patched, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="--weights"):
        extract(ExtractParams(encoder="vit_s16_ssl"), out=patched)
    assert not (patched / "features/20x_256px_0px/vit_s16_ssl/h5_files").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_pipeline.cli", "extract", "--out", str(patched)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "--weights" in proc.stderr and "Traceback" not in proc.stderr


KILLABLE = """
import sys
from wsi_pipeline.stages.extract import ExtractParams, extract
extract(ExtractParams(weights="random", chunk_rows=8, batch_size=8, workers=0, formats=("h5",)), out=sys.argv[1],
        slide_ids=["a"])
"""


def test_killed_mid_slide_resumes_without_recomputing_done_chunks(patched, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(patched)])
    markers = patched / "features/20x_256px_0px/resnet18_random/.partial/a.zarr/done"
    deadline = time.time() + 240
    while time.time() < deadline and not (markers.exists() and len(list(markers.iterdir())) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(markers.iterdir()))
    out_dir = patched / "features/20x_256px_0px/resnet18_random"
    assert not (out_dir / "h5_files/a.h5").exists(), "the kill should land mid-slide"
    with h5py.File(patched / "patches/20x_256px_0px/coords/a.h5", "r") as f:
        n = len(f["coords"])
    assert done_before * 8 < n
    seen: list[int] = []
    params = ExtractParams(weights="random", chunk_rows=8, batch_size=8, workers=0, formats=("h5",))
    extract(params, out=patched, slide_ids=["a"], on_patches=lambda s, done, total: seen.append(total))
    assert seen and seen[-1] <= n - done_before * 8  # the chunks done before the kill were not recomputed
    assert not (out_dir / ".partial/a.zarr").exists()
    with h5py.File(out_dir / "h5_files/a.h5", "r") as f:
        resumed = f["features"][:]
    shutil.rmtree(out_dir)
    extract(params, out=patched, slide_ids=["a"])
    with h5py.File(out_dir / "h5_files/a.h5", "r") as f:
        np.testing.assert_array_equal(resumed, f["features"][:])


def test_several_patch_configs_need_patches_name(patched):
    patch([SlideSource(patched.parent / "slides/a.svs")], PatchParams(magnification_x=10), out=patched)
    with pytest.raises(UserError, match="--patches"):
        extract(ExtractParams(weights="random"), out=patched)
    result = extract(ExtractParams(weights="random", patches="10x_256px_0px", formats=("h5",)), out=patched)
    assert [o.status for o in result.outcomes] == ["done"] and result.out_dir.parent.name == "10x_256px_0px"
