"""The workspace layout owner (issue "The house in one step"): predictions never touch the cohort, --out is
honoured, workspaces work from any folder, stale features are refused, and the run's own feature set is used."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.inputs import SlideSource, resolve_inputs
from wsi_pipeline.stages.patch import PatchParams, patch
from wsi_pipeline.stages.predict import PredictParams, predict
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.testing.synthetic import make_demo_cohort
from wsi_pipeline.workspace import locks
from wsi_pipeline.workspace.layout import Layout
from wsi_pipeline.workspace.locks import OwnerLock


def tree_digest(root: Path, skip: str = "predictions") -> dict[str, str]:
    """sha256 of every file below `root` except under `skip/` (lock sidecars excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != skip and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_cohort):
    """The shared small cohort (conftest: 10 slides, patched, encoded with random weights) beside a copy of its
    workspace, and an ABMIL run of 2 folds × 2 epochs there."""
    root = tmp_path_factory.mktemp("layout")
    for name in ("slides", "holdout.svs"):
        (root / name).symlink_to(small_cohort / name)
    ws = root / "ws"
    shutil.copytree(small_cohort / "ws", ws)
    [features] = Layout(ws).feature_sets()
    cfg = {"name": "r", "data": {"features": str(features.dir), "labels": str(small_cohort / "labels.csv")},
           "splits": {"folds": 2, "val_fraction": 0.5}, "model": {"name": "abmil"},
           "optim": {"epochs": 2, "select_after": 0, "min_epochs": 0}, "device": "cpu", "out": str(ws)}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root, ws, train(TrainParams(root / "cfg.yaml"))


@pytest.mark.e2e
def test_a_predicted_slide_named_like_a_cohort_slide_leaves_training_files_identical(trained, tmp_path):
    root, ws, result = trained
    before = tree_digest(ws)
    impostor = tmp_path / "demo_03.svs"  # same name as a cohort slide, another file
    shutil.copy(root / "holdout.svs", impostor)
    outcome = predict([SlideSource(impostor)], PredictParams(run=result.run_dir), out=ws).predictions[0]
    assert outcome.status == "done", outcome.error
    assert tree_digest(ws) == before
    assert "demo_03" in outcome.note and "untouched" in outcome.note
    assert outcome.json_path == ws / "predictions" / "r" / "demo_03.json"


@pytest.mark.e2e
def test_predict_honours_out_for_a_copied_workspace(trained, tmp_path):
    _, ws, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(ws, copy)
    before = tree_digest(ws, skip="")
    result = predict([SlideSource(ws.parent / "holdout.svs")], PredictParams(run="r"), out=copy)
    assert result.predictions[0].status == "done", result.predictions[0].error
    assert result.run_dir == copy / "runs" / "r"
    assert result.predictions[0].json_path.is_relative_to(copy)
    assert Path(result.predictions[0].qc_path).is_relative_to(copy)
    assert tree_digest(ws, skip="") == before  # the original workspace got nothing


@pytest.mark.e2e
def test_predict_uses_the_runs_own_patch_config_and_feature_set(trained):
    root, ws, result = trained
    ten_x = patch(resolve_inputs([root / "slides"]), PatchParams(magnification_x=10), out=ws)
    extract(ExtractParams(weights="random", formats=("h5",), patches=ten_x.patch_set.name), out=ws)
    assert len(Layout(ws).patch_sets()) == 2 and len(Layout(ws).feature_sets()) == 2
    outcome = predict([SlideSource(root / "holdout.svs")], PredictParams(run=result.run_dir), out=ws).predictions[0]
    assert outcome.status == "done", outcome.error
    features_used = Path(yaml.safe_load(outcome.json_path.read_text())["features"])
    assert features_used.parts[-2:] == ("20x_256px_0px", "resnet18_random")


@pytest.mark.e2e
def test_a_workspace_used_from_another_folder(tmp_path, wsip):
    make_demo_cohort(tmp_path / "a" / "slides", n_slides=2, size=(768, 1024), hotspots=0, seed=9)
    (tmp_path / "b").mkdir()
    first = wsip(["patch", "slides", "--out", "ws", "--quiet"], tmp_path / "a")
    assert first.returncode == 0, first.stderr
    second = wsip(["extract", "--weights", "random", "--out", "../a/ws", "--quiet"], tmp_path / "b")
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    assert len(list((tmp_path / "a/ws/features/20x_256px_0px/resnet18_random/h5_files").glob("*.h5"))) == 2


@pytest.mark.e2e
def test_a_truncated_slide_makes_its_features_unusable_for_training(tmp_path, wsip):
    labels = make_demo_cohort(tmp_path / "slides", n_slides=4, size=(768, 1024), hotspots=1, seed=4)
    ws = tmp_path / "ws"
    sources = resolve_inputs([tmp_path / "slides"])
    patch(sources, out=ws)
    features = extract(ExtractParams(weights="random", formats=("h5",)), out=ws)
    slide = tmp_path / "slides" / "demo_01.svs"
    slide.write_bytes(slide.read_bytes()[: slide.stat().st_size // 3])
    rerun = {o.slide_id: o for o in patch(sources, out=ws).outcomes}
    assert rerun["demo_01"].status == "failed"
    cfg = {"name": "t", "data": {"features": str(features.out_dir), "labels": str(labels)},
           "splits": {"folds": 2, "val_fraction": 0.5}, "model": {"name": "mean"}, "out": str(ws)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="demo_01") as err:
        train(TrainParams(tmp_path / "cfg.yaml"))
    assert "no longer match" in str(err.value) and "\n" not in str(err.value)
    proc = wsip(["train", "--cfg", tmp_path / "cfg.yaml", "--quiet"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "demo_01" in proc.stderr


@pytest.mark.e2e
def test_the_slide_lock_is_refreshed_during_a_long_extraction(tmp_path, monkeypatch):
    """With a 0.4 s stale time, a lock would look abandoned to another host within a slow slide's
    extraction, unless its holder keeps touching it."""
    make_demo_cohort(tmp_path / "slides", n_slides=1, size=(1024, 1536), hotspots=0, seed=2)
    ws = tmp_path / "ws"
    patch(resolve_inputs([tmp_path / "slides"]), out=ws)
    monkeypatch.setenv(locks.LOCK_STALE_ENV, "0.4")
    from wsi_pipeline.workspace import feature_store

    write_chunk = feature_store.PartialFeatures.write_chunk

    def slow_write(self, chunk, features):
        time.sleep(0.3)
        write_chunk(self, chunk, features)

    monkeypatch.setattr(feature_store.PartialFeatures, "write_chunk", slow_write)
    worker = threading.Thread(target=extract, args=(ExtractParams(weights="random", chunk_rows=4, batch_size=4,
                                                                  workers=0),), kwargs={"out": ws})
    worker.start()
    lock = ws / "features/20x_256px_0px/resnet18_random/.locks/demo_00.lock"
    for _ in range(200):
        if lock.exists():
            break
        time.sleep(0.05)
    assert lock.exists(), "extraction never took its lock"
    time.sleep(1.0)  # well past the stale time
    assert time.time() - lock.stat().st_mtime < 0.4
    monkeypatch.setattr(locks.socket, "gethostname", lambda: "another-host")
    assert not OwnerLock(lock).acquire()  # a worker elsewhere sees a live lock
    monkeypatch.undo()
    worker.join(timeout=120)
    assert not lock.exists()


@pytest.mark.parametrize("args", [
    ["extract", "--encoder", "resnet19"],
    ["extract", "--encoder", "timm:nonexistent_net"],
    ["extract", "--precision", "fp8"],
    ["extract", "--format", "npy"],
    ["extract", "--patches", "40x_nothing"],
    ["patch", "no/such/folder"],
    ["patch", "SLIDE", "--shard", "x"],
    ["predict", "SLIDE", "--run", "no_such_run"],
    ["info", "no_such_slide.svs"],
    ["train", "--cfg", "BADMODEL"],
    ["train", "--cfg", "BADOPTION"],
    ["train", "--cfg", "no_such.yaml"],
])
@pytest.mark.e2e
def test_every_command_reports_a_bad_name_in_one_line(args, trained, wsip, tmp_path):
    root, ws, _ = trained
    configs = {}
    for key, model in (("BADMODEL", {"name": "gmamba"}), ("BADOPTION", {"name": "abmil", "mask_ratio": 0.2})):
        cfg = yaml.safe_load((root / "cfg.yaml").read_text()) | {"model": model, "name": key.lower()}
        configs[key] = tmp_path / f"{key}.yaml"
        configs[key].write_text(yaml.safe_dump(cfg))
    args = [str(configs.get(a, root / "holdout.svs" if a == "SLIDE" else a)) for a in args]
    proc = wsip([*args, *(["--out", ws] if args[0] != "info" else [])], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_workspace_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Layout.at("ws").root == tmp_path.resolve() / "ws"
    monkeypatch.setenv("WSIP_OUT", "elsewhere")
    assert Layout.at().root == tmp_path.resolve() / "elsewhere"
    assert SlideSource(Path("x.svs")).path == tmp_path / "x.svs"
    assert os.path.isabs(Layout.at().prediction_slides().root)


# ------------------------------------------------------------------------------- the house rules, checked
PACKAGE = Path(__file__).resolve().parents[1] / "wsi_pipeline"
SUPPORT = Path(__file__).resolve().parent / "support"
# names of folders and files inside a workspace (docs/design.md §2): joined only by workspace/
WORKSPACE_NAMES = ("patches", "features", "runs", "predictions", "_slides", "coords", "qc", "masks", "geojson",
                   "h5_files", "pt_files", ".partial", ".locks", "viewer", "groups", "fold_", "best.pt", "last.pt",
                   "log.csv", "preds.csv", "metrics.json", "summary.csv", "splits.csv", "config.yaml",
                   "features.json", "manifest.csv", "params.json", "report.html", "report.md", "index.html")


def _sources(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (top level or inside functions), absolute names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def _joined_name(node: ast.AST) -> str | None:
    """The literal text a path is joined with (`x / "runs"`, `x / f"fold_{k}"`, `x.joinpath("qc")`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def workspace_joins(path: Path) -> list[str]:
    """`file:line name` for each path join to a workspace folder or file name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        parts = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.right]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "joinpath":
            parts = node.args
        for part in parts:
            name = _joined_name(part)
            if name is not None and any(name.split("/")[0] == w or (w.endswith("_") and name.startswith(w))
                                        for w in WORKSPACE_NAMES):
                found.append(f"{path.name}:{node.lineno} {name}")
    return sorted(found, key=lambda j: int(j.split(":")[1].split()[0]))


def test_workspace_paths_are_joined_in_workspace_only():
    outside = [p for p in _sources(PACKAGE, SUPPORT) if PACKAGE / "workspace" not in p.parents]
    assert [j for p in outside for j in workspace_joins(p)] == []


def test_the_path_rule_sees_every_kind_of_join(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('root = Path(".")\na = root / "runs" / name\nb = d / f"fold_{k}"\nc = root.joinpath("coords")\n'
                     'd = root / "slide_files"\ne = d / "qc/x.jpg"\n')
    assert workspace_joins(probe) == ["probe.py:2 runs", "probe.py:3 fold_", "probe.py:4 coords", "probe.py:6 qc/x.jpg"]


def test_predict_and_report_never_import_training():
    readers = [p for sub in ("predict", "report", "view") for p in _sources(PACKAGE / "stages" / sub)]
    readers.append(PACKAGE / "stages" / "export.py")
    assert {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith("wsi_pipeline.stages.train"))
            for p in readers} == {str(p.relative_to(PACKAGE)): [] for p in readers}


def test_models_import_neither_workspace_nor_stages():
    leaks = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith(
        ("wsi_pipeline.workspace", "wsi_pipeline.stages", "wsi_pipeline.cli"))) for p in _sources(PACKAGE / "models")}
    assert {k: v for k, v in leaks.items() if v} == {}


def _code_map(text: str, heading: str) -> str:
    """The fenced code block that follows `heading` (the code map)."""
    section = text[text.index(heading):]
    start = section.index("```\nwsi_pipeline/")
    return section[start:section.index("```\n", start + 4)]


@pytest.mark.parametrize("doc,heading", [("README.md", "## Development"), ("docs/design.md", "## 3. Code layout")])
def test_every_package_and_module_is_in_the_code_maps(doc, heading):
    """Packages by `name/`, modules by name; a MIL model's own module is covered by "one module per model"."""
    code_map = _code_map((PACKAGE.parent / doc).read_text(), heading)
    missing = []
    for path in _sources(PACKAGE):
        registers_a_model = "@register_model(" in path.read_text() and path.parent.name == "mil"
        if path.name == "__init__.py":
            if path.parent != PACKAGE and f"{path.parent.name}/" not in code_map:
                missing.append(f"{_module_name(path)} (package)")
        elif not registers_a_model and not re.search(rf"\b{re.escape(path.stem)}\b", code_map):
            missing.append(_module_name(path))
    assert missing == [], f"add these to the code map in {doc}"
