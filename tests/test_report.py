"""What a person looks at (issue #13): `wsip report` (one offline HTML file), the QuPath GeoJSON export and the
zoomable viewer, on a real end-to-end workspace, checked in headless Chromium where it is installed."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from geojson_spec import spec_errors
from support.chromium import Chromium, chromium_executable
from test_cli import PROBE
from typer.testing import CliRunner

from wsi_pipeline.cli import app
from wsi_pipeline.errors import UserError
from wsi_pipeline.stages.export import GeoJSONParams, export_geojson
from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.inputs import SlideSource, resolve_inputs
from wsi_pipeline.stages.patch import PatchParams, patch
from wsi_pipeline.stages.predict import PredictParams, predict
from wsi_pipeline.stages.report import ReportParams, report
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.stages.view import ViewParams, view
from wsi_pipeline.stages.view import openseadragon as osd
from wsi_pipeline.workspace.attention_store import read_attention
from wsi_pipeline.workspace.layout import Layout
from wsi_pipeline.workspace.manifest import read_manifest

SIZE = (1536, 2048)  # slide h, w (level-0 px)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, demo_cohort):
    """12 labelled slides + one unreadable file, patched at 10x, encoded (random weights), ABMIL 3-fold × 3
    epochs, and the held-out slide predicted: every section of the report has something real to show."""
    root = tmp_path_factory.mktemp("report")
    labels = demo_cohort(root)  # 12 slides of SIZE
    (root / "slides" / "broken.svs").write_text("not a slide")
    patch(resolve_inputs([root / "slides"]), PatchParams(magnification_x=10), out=root / "ws")
    features = extract(ExtractParams(weights="random", formats=("h5",)), out=root / "ws")
    config = {"name": "e2e", "data": {"features": str(features.out_dir), "labels": str(labels)},
              "splits": {"folds": 3, "val_fraction": 0.25, "seed": 42}, "model": {"name": "abmil"},
              "optim": {"epochs": 3, "select_after": 0, "patience": 2, "min_epochs": 1},
              "seed": 1, "device": "cpu", "out": str(root / "ws")}
    (root / "e2e.yaml").write_text(yaml.safe_dump(config))
    train(TrainParams(config=root / "e2e.yaml"))
    done = predict([SlideSource(root / "holdout.svs")], PredictParams(run="e2e"), out=root / "ws").predictions
    assert done[0].status == "done", done[0].error
    return Layout(root / "ws")


def sections(html: str) -> list[str]:
    return re.findall(r'<section id="(\w+)">', html)


def section(html: str, name: str) -> str:
    return html.split(f'<section id="{name}">')[1].split("</section>")[0]


@pytest.mark.e2e
def test_report_shows_each_stage_failures_first_and_the_runs_own_numbers(ws):
    result = report(out=ws)
    html = result.path.read_text()
    assert result.path == ws.root / "report.html" and sections(html) == ["overview", "cohort", "qc", "runs",
                                                                         "evaluation", "predictions"]
    cohort = section(html, "cohort")
    rows = read_manifest(ws.patch_sets()[0].manifest)
    encoded = read_manifest(ws.feature_sets()[0].manifest)
    assert cohort.count("<tr>") == (len(rows) + 1) + (len(encoded) + 1)  # a table per stage, with its header
    first_row = cohort.split("<tbody><tr>")[1]
    assert "broken" in first_row and "failed" in first_row and "cannot open as a slide" in first_row
    qc = section(html, "qc")
    figures = re.findall(r"<figure.*?</figure>", qc)
    assert len(figures) == len(rows) and "broken" in figures[0] and "no image" in figures[0]
    sizes = [tuple(map(int, m)) for m in re.findall(r'<img src="data:image/jpeg[^"]*" width="(\d+)" height="(\d+)"',
                                                     qc)]
    assert len(sizes) == len(rows) - 1 and max(max(s) for s in sizes) == ReportParams().thumbnail_px
    runs = section(html, "runs")
    summary = {r["fold"]: r for r in map(dict, _csv(ws.run("e2e").summary))}
    for fold in ws.run("e2e").trained_folds():
        test = json.loads(fold.metrics.read_text())["test"]
        assert f"<td>{test['accuracy']:.3f}</td>" in runs
    assert f"{float(summary['mean']['auc']):.3f} ± {float(summary['std']['auc']):.3f}" in runs
    plots = [base64.b64decode(p).decode() for p in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', runs)]
    assert len(plots) == 3 and "validation score" in plots[0] and "ROC" in plots[1] and "confusion" in plots[2]
    evaluation = section(html, "evaluation")  # the run's pooled out-of-fold figures with CIs, from evaluation.json
    pooled = json.loads(ws.run("e2e").evaluation.read_text())["pooled_out_of_fold"]["slide"]
    auc = pooled["metrics"]["auc"]
    assert "run e2e: pooled out-of-fold" in evaluation
    assert f"{auc['value']:.3f} ({auc['ci'][0]:.3f}–{auc['ci'][1]:.3f})" in evaluation
    curves = [base64.b64decode(p).decode()
              for p in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', evaluation)]
    assert any("95% band" in c for c in curves) and any("ECE" in c for c in curves)
    predicted = json.loads(ws.predictions("e2e").record("holdout").read_text())["predicted"]
    assert f"<b>holdout</b>: {predicted}" in section(html, "predictions")
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html.split("</header>")[1].split('id="predictions"')[0])


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_report_of_one_run_a_run_in_progress_and_errors(ws, tmp_path):
    html = report(ReportParams(run="e2e"), out=ws).path.read_text()
    assert 'id="run-e2e"' in html
    partial = Layout(tmp_path / "ws").run("partial")
    shutil.copytree(ws.run("e2e").dir, partial.dir, ignore=shutil.ignore_patterns("fold_1", "fold_2", "summary.csv"))
    runs = section(report(out=partial.dir.parents[1]).path.read_text(), "runs")
    assert runs.count("<tr>") == (1 + 3) + (1 + 1)  # split sizes: header + 3 folds; metrics: header + fold 0
    assert "Training is not finished" in runs and "<b>mean ± std</b>" not in runs
    with pytest.raises(UserError, match="--run nope: no such run"):
        report(ReportParams(run="nope"), out=ws)
    with pytest.raises(UserError, match="nothing to report yet"):
        report(out=tmp_path / "empty")


@pytest.fixture
def browser(tmp_path):
    if chromium_executable() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser checks need it")
    with Chromium(tmp_path / "profile") as chromium:
        yield chromium


@pytest.mark.e2e
@pytest.mark.browser
def test_report_opens_offline_in_chromium_with_every_image(ws, browser, tmp_path):
    html = report(out=ws).path.read_text()
    browser.load((ws.root / "report.html").as_uri(), width=1280, height=2000)
    images = browser.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth > 0])")
    assert len(images) == html.count("<img ") and all(all(i) for i in images)
    assert browser.evaluate("[...document.querySelectorAll('main > section')].map(s => s.id)") == sections(html)
    assert browser.evaluate("document.querySelectorAll('#qc figure').length") == 13
    assert browser.errors == []
    assert {url.split(":")[0] for url in browser.requests} <= {"file", "data"}  # nothing left the machine
    shot = browser.screenshot(tmp_path / "report.png")
    shutil.copy(shot, "/tmp/wsip_report_screenshot.png")
    import cv2

    pixels = cv2.imread(str(shot))
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 20  # rendered, not a blank page


@pytest.mark.e2e
def test_geojson_of_predictions_has_one_tile_per_patch_with_attention(ws):
    result = export_geojson(GeoJSONParams(run="e2e"), out=ws)
    assert result.failed == {} and result.written == [ws.predictions("e2e").geojson("holdout")]
    data = json.loads(result.written[0].read_text())
    assert spec_errors(data, SIZE[1], SIZE[0]) == []
    tiles = [f for f in data["features"] if f["properties"]["objectType"] == "tile"]
    tissue = [f for f in data["features"] if f["properties"]["objectType"] == "annotation"]
    stored = read_attention(ws.predictions("e2e").attention("holdout"))
    record = json.loads(ws.predictions("e2e").record("holdout").read_text())
    assert len(tiles) == len(stored.coords) == record["n_patches"] and tissue
    assert [t["geometry"]["coordinates"][0][0] for t in tiles] == stored.coords.tolist()
    np.testing.assert_allclose([t["properties"]["measurements"]["attention"] for t in tiles], stored.attention)
    assert {t["properties"]["classification"]["name"] for t in tiles} == {record["predicted"]}
    mask = ws.prediction_slides().patch_sets()[0].mask("holdout")
    assert tissue == json.loads(mask.read_text())["features"]


@pytest.mark.e2e
def test_geojson_of_the_cohort_counts_every_patch(ws):
    result = export_geojson(out=ws)
    rows = {r["slide_id"]: r for r in read_manifest(ws.patch_sets()[0].manifest)}
    assert result.failed == {} and len(result.written) == sum(r["status"] == "done" for r in rows.values())
    for path in result.written:
        data = json.loads(path.read_text())
        assert spec_errors(data, SIZE[1], SIZE[0]) == []
        tiles = [f for f in data["features"] if f["properties"]["objectType"] == "tile"]
        assert len(tiles) == int(rows[path.stem]["n_patches"])
    with pytest.raises(UserError, match="not both"):
        export_geojson(GeoJSONParams(run="e2e", patches="x"), out=ws)


@pytest.fixture
def openseadragon_available():
    if not (shutil.which("npm") or os.environ.get(osd.ENV) or osd.cache_dir().joinpath(osd.SCRIPT).is_file()):
        pytest.skip("npm is not installed: wsip view installs OpenSeadragon with npm on first use")


@pytest.mark.e2e
@pytest.mark.browser
def test_viewer_pans_and_zooms_offline_in_chromium(ws, openseadragon_available, browser, tmp_path):
    result = view(ViewParams(slide="holdout"), out=ws)
    folder = result.index.parent
    assert folder == ws.predictions("e2e").viewer("holdout") and (folder / "openseadragon" / osd.SCRIPT).is_file()
    stored = read_attention(ws.predictions("e2e").attention("holdout"))
    levels = sorted(int(p.name) for p in (folder / "slide_files").iterdir())
    # 2048 px wide: Deep Zoom levels 0..11; patched at 10x on a 20x scan, so tiled one level short of level 0
    assert levels == list(range(11))
    browser.load(result.index.as_uri(), width=1280, height=900)
    loaded = "[0, 1].every(i => wsipViewer.world.getItemAt(i).getFullyLoaded())"
    browser.wait_for(f"window.wsipViewer && wsipViewer.world.getItemCount() === 2 && {loaded}")
    assert browser.evaluate("document.querySelector('#patches path').getAttribute('d').split('M').length - 1"
                            ) == len(stored.coords)
    assert browser.evaluate("wsipViewer.currentOverlays.length") == 1
    shutil.copy(browser.screenshot(tmp_path / "viewer.png"), "/tmp/wsip_view_screenshot.png")
    browser.evaluate("void wsipViewer.viewport.zoomTo(8, null, true)")
    browser.wait_for(loaded)
    assert any(f"/slide_files/{levels[-1]}/" in u for u in browser.requests)  # zoomed in: the finest level came
    browser.evaluate("document.getElementById('show-patches').click()")
    after_redraw = ("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => "
                    "done(getComputedStyle(document.querySelector('#patches path')).display))))")
    assert browser.evaluate(after_redraw) == "none"
    assert browser.errors == [] and {u.split(":")[0] for u in browser.requests} <= {"file", "data"}
    link = 'href="predictions/e2e/viewer/holdout/index.html"'  # relative: the workspace can move
    assert link in section(report(out=ws).path.read_text(), "predictions")


@pytest.mark.e2e
def test_viewer_errors_name_the_fix(ws):
    with pytest.raises(UserError, match="no run has predicted slide 'demo_01'"):
        view(ViewParams(slide="demo_01"), out=ws)
    with pytest.raises(UserError, match="has no prediction of slide 'holdout'"):
        view(ViewParams(slide="holdout", run="other"), out=ws)


def test_openseadragon_from_npm_is_checked_against_its_pinned_integrity(tmp_path, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setattr(osd, "INTEGRITY", "sha512-not-the-real-one")
    with pytest.raises(UserError, match="not the pinned one"):
        osd.install(tmp_path / "osd")
    assert not (tmp_path / "osd").exists()
    monkeypatch.setenv(osd.ENV, str(tmp_path))
    with pytest.raises(UserError, match="no openseadragon.min.js there"):
        osd.openseadragon_dir()


@pytest.mark.e2e
def test_cli_prints_the_report_path_and_one_line_errors(ws):
    runner = CliRunner()
    ok = runner.invoke(app, ["report", "--out", str(ws.root)])
    assert ok.exit_code == 0 and ok.stdout.strip() == str(ws.root / "report.html")
    for args in (["report", "--out", str(ws.root), "--run", "nope"], ["view", "nope", "--out", str(ws.root)],
                 ["export", "geojson", "--out", str(ws.root), "--run", "e2e", "--patches", "x"]):
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output, args
    exported = runner.invoke(app, ["export", "geojson", "--out", str(ws.root), "--run", "e2e"])
    assert exported.exit_code == 0 and "1 GeoJSON file(s)" in exported.output


@pytest.mark.e2e
def test_report_command_does_not_import_torch(ws):
    proc = subprocess.run([sys.executable, "-c", PROBE, "report", "--out", str(ws.root)], capture_output=True,
                          text=True, timeout=120)
    assert "HEAVY: []" in proc.stdout, proc.stdout + proc.stderr
