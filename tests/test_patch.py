"""`wsip patch` on real sample slides and generated multi-level slides (issue #2 acceptance)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import h5py
import numpy as np
import pytest
from conftest import sample_slide

from wsi_pipeline.slide import Slide
from wsi_pipeline.stages.inputs import SlideSource, resolve_inputs
from wsi_pipeline.stages.patch import PatchParams, patch, plan_read

pytestmark = pytest.mark.e2e

WSIP = [sys.executable, "-m", "wsi_pipeline.cli"]


def coords_of(result, slide_id: str) -> tuple[np.ndarray, dict]:
    with h5py.File(result.out_dir / "coords" / f"{slide_id}.h5", "r") as f:
        return f["coords"][:], dict(f["coords"].attrs)


def saturation_fraction(slide: Slide, xy, size0: int) -> float:
    """Independent "on tissue" check: share of saturated pixels in a low-res read of the patch."""
    level = slide.best_level_for_downsample(4)
    ds = slide.level_downsamples[level]
    n = max(1, round(size0 / ds))
    rgb = slide.read_region(xy, level, (n, n))
    return float((cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 20).mean())


@pytest.mark.parametrize(("mag", "read_size"), [(20, 256), (10, 512)])
def test_cmu_reads_level0_at_the_right_size(tmp_path, mag, read_size):
    path = sample_slide("CMU-1-Small-Region.svs")
    result = patch([SlideSource(path)], PatchParams(magnification_x=mag), out=tmp_path)
    assert [o.status for o in result.outcomes] == ["done"]
    coords, attrs = coords_of(result, path.stem)
    # CLAM reader conventions
    assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) > 5
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == read_size
    assert attrs["patch_size_level0"] == read_size and attrs["target_magnification"] == mag
    with Slide(path) as slide:
        w, h = slide.dimensions
        assert (coords >= 0).all() and (coords[:, 0] + read_size <= w).all() and (coords[:, 1] + read_size <= h).all()
        fractions = [saturation_fraction(slide, xy, read_size) for xy in coords]
    assert np.median(fractions) > 0.5 and min(fractions) > 0.1
    assert (result.out_dir / "qc" / f"{path.stem}.jpg").stat().st_size > 1000


def test_generated_multilevel_slide_levels_and_shared_tissue(tmp_path, make_slide):
    path = make_slide()
    with Slide(path) as slide:
        assert slide.level_downsamples == pytest.approx([1, 4, 16], rel=1e-3)
        assert slide.mpp == pytest.approx(0.25) and slide.objective_power == 40
        assert plan_read(slide, PatchParams(magnification_x=20)).read_level == 0
        assert plan_read(slide, PatchParams(magnification_x=10)).read_level == 1
    r20 = patch([SlideSource(path)], PatchParams(magnification_x=20), out=tmp_path)
    r10 = patch([SlideSource(path)], PatchParams(magnification_x=10), out=tmp_path)
    c20, a20 = coords_of(r20, "gen")
    c10, a10 = coords_of(r10, "gen")
    assert (a20["patch_level"], a20["patch_size"], a20["patch_size_level0"]) == (0, 512, 512)
    assert (a10["patch_level"], a10["patch_size"], a10["patch_size_level0"]) == (1, 256, 1024)
    # both grids are in level-0 px over the same tissue: every 10x patch holds 20x patches
    cells20 = {(x // 1024, y // 1024) for x, y in c20}
    hits = sum((x // 1024, y // 1024) in cells20 for x, y in c10)
    assert hits >= 0.9 * len(c10)
    assert len(c20) > 2 * len(c10)
    assert (r20.out_dir / "qc" / "gen.jpg").exists() and (r10.out_dir / "qc" / "gen.jpg").exists()


def test_missing_mpp_fails_until_given(tmp_path):
    path = sample_slide("TCGA-CR-7395-01A-01-TS1.svs")
    failed = patch([SlideSource(path)], out=tmp_path).outcomes[0]
    assert failed.status == "failed" and "--mpp" in failed.error and path.name in failed.error
    assert patch([SlideSource(path, mpp=0.25)], out=tmp_path).outcomes[0].status == "done"
    csv = tmp_path / "slides.csv"
    csv.write_text(f"slide_path,mpp\n{path},0.25\n")
    sources = resolve_inputs([csv])
    assert sources[0].mpp == 0.25
    assert patch(sources, out=tmp_path / "b").outcomes[0].status == "done"


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*WSIP, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_no_tissue_and_corrupt_slides_fail_alone(tmp_path, make_slide):
    kidney = sample_slide("kidney-48-5.tif")
    cmu = sample_slide("CMU-1-Small-Region.svs")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.svs").write_text("this is not a slide\n")
    data = cmu.read_bytes()
    (bad / "truncated.svs").write_bytes(data[: len(data) // 3])
    csv = tmp_path / "cohort.csv"
    csv.write_text(f"slide_path,mpp\n{kidney},0.5\n{cmu},\n{bad / 'notes.svs'},\n{bad / 'truncated.svs'},\n")
    proc = run_cli("patch", csv, "--out", tmp_path / "ws", "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = {r.split(",")[0]: r for r in
            (tmp_path / "ws/patches/20x_256px_0px/manifest.csv").read_text().splitlines()[1:]}
    assert ",no_tissue," in rows["kidney-48-5"]
    assert ",done," in rows["CMU-1-Small-Region"]
    assert ",failed," in rows["notes"] and "cannot open" in rows["notes"]
    assert ",failed," in rows["truncated"]
    assert not (tmp_path / "ws/patches/20x_256px_0px/coords/kidney-48-5.h5").exists()


def test_resume_cache_and_new_config_folder(tmp_path, make_slide):
    sources = [SlideSource(make_slide())]
    first = patch(sources, out=tmp_path)
    h5 = first.out_dir / "coords" / "gen.h5"
    stamp = h5.stat().st_mtime_ns
    again = patch(sources, out=tmp_path)
    assert [o.status for o in again.outcomes] == ["cached"] and h5.stat().st_mtime_ns == stamp
    changed = patch(sources, PatchParams(min_tissue_fraction=0.9), out=tmp_path)
    assert changed.out_dir != first.out_dir and changed.out_dir.name.startswith("20x_256px_0px_")
    assert coords_of(changed, "gen")[0].shape[0] < coords_of(first, "gen")[0].shape[0]
    forced = patch(sources, out=tmp_path, force=True)
    assert forced.outcomes[0].status == "done" and h5.stat().st_mtime_ns != stamp


def cohort_folder(tmp_path, slide, prefix: str, n: int = 6):
    """A folder of `n` copies of one generated slide, named <prefix>0.svs …, and a workspace path beside it."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(n):
        shutil.copy(slide, folder / f"{prefix}{i}.svs")
    return folder, tmp_path / "ws"


def test_killed_run_leaves_no_corrupt_output_and_resumes(tmp_path, make_slide):
    folder, out = cohort_folder(tmp_path, make_slide(size=(4000, 5000)), "s")
    proc = subprocess.Popen([*WSIP, "patch", str(folder), "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    coords_dir = out / "patches/20x_256px_0px/coords"
    deadline = time.time() + 120
    while time.time() < deadline and not (coords_dir.exists() and any(coords_dir.glob("*.h5"))):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(coords_dir.glob("*.h5"))
    assert 1 <= len(finished) < 6, "the kill should land mid-cohort"
    for h5 in finished:
        with h5py.File(h5, "r") as f:
            assert len(f["coords"]) > 0
    before = {p.name: p.stat().st_mtime_ns for p in finished}
    rerun = run_cli("patch", folder, "--out", out, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(coords_dir.glob("*.h5"))) == 6
    assert all((coords_dir / n).stat().st_mtime_ns == t for n, t in before.items())


def test_concurrent_workers_do_each_slide_once_and_shards_partition(tmp_path, make_slide):
    folder, out = cohort_folder(tmp_path, make_slide(size=(3000, 4000)), "c")
    procs = [subprocess.Popen([*WSIP, "patch", str(folder), "--out", str(out), "--quiet"],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    done = [line.split(":")[0] for log in logs for line in log.splitlines() if line.endswith(": done")]
    assert sorted(done) == [f"c{i}" for i in range(6)]  # each slide produced exactly once
    sources = resolve_inputs([folder])
    shard0 = patch(sources, out=tmp_path / "s", shard="0/2").outcomes
    shard1 = patch(sources, out=tmp_path / "s", shard="1/2").outcomes
    ids0, ids1 = {o.slide_id for o in shard0}, {o.slide_id for o in shard1}
    assert ids0.isdisjoint(ids1) and ids0 | ids1 == {f"c{i}" for i in range(6)} and len(ids0) == 3


def test_geojson_mask_restricts_patches(tmp_path, make_slide):
    path = make_slide()
    full = patch([SlideSource(path)], out=tmp_path / "a")
    coords_full = coords_of(full, "gen")[0]
    masks = tmp_path / "masks"
    masks.mkdir()
    polygon = [[0, 0], [4000, 0], [4000, 6000], [0, 6000], [0, 0]]  # the left half, level-0 px (QuPath)
    (masks / "gen.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [polygon]}, "properties": {}}]}))
    masked = patch([SlideSource(path)], PatchParams(masks=masks), out=tmp_path / "b")
    coords_masked = coords_of(masked, "gen")[0]
    assert 0 < len(coords_masked) < len(coords_full)
    # kept patches have ≥ 25% of their width inside the mask (± one 32-px mask pixel)
    assert (coords_masked[:, 0] + 0.25 * 512 <= 4000 + 32).all()


def test_cli_usage_errors_exit_2_without_traceback(tmp_path, make_slide):
    proc = run_cli("patch", tmp_path / "missing_folder", "--out", tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("patch", make_slide(), "--overlap", "300", "--out", tmp_path)
    assert proc.returncode == 2 and "--overlap" in proc.stderr and "Traceback" not in proc.stderr
