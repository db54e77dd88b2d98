"""The train stage end to end on small synthetic feature cohorts: outputs, protocol, determinism, resume."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.stages.train import TrainParams, TrainResult, train
from wsi_pipeline.stages.train.bags import load_bags, slide_groups
from wsi_pipeline.stages.train.metrics import SCALARS, classification_metrics

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("neg", "pos")
GRID = 10  # instances on a GRID x GRID lattice of 256 px patches


def write_cohort(
    root: Path, *, n_slides: int = 14, dim: int = 8, signal: float = 1.5, hotspot: int = 6, seed: int = 0
) -> None:
    """A feature-level cohort: `pos` slides carry a small spatially clustered hotspot of shifted instances.

    Background instances are N(0, 1) in `dim` dims; a positive slide shifts `hotspot`² neighbouring
    instances (a square block of the lattice, random position) by `signal` in dim // 4 features, so the label
    lives in a few clustered instances. Slides 0-3 come in pairs sharing a patient (case_id).
    """
    rng = np.random.default_rng(seed)
    h5_dir = root / "features" / "h5_files"
    h5_dir.mkdir(parents=True)
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * 256
    rows = ["slide_id,label,case_id"]
    for i in range(n_slides):
        label = i % 2 if i >= 4 else i // 2 % 2  # pairs (0,1) neg and (2,3) pos share a patient
        features = rng.normal(size=(GRID * GRID, dim)).astype(np.float32)
        if label:
            x0, y0 = rng.integers(0, GRID - hotspot + 1, size=2)
            block = (np.abs(coords[:, 0] // 256 - x0 - hotspot / 2 + 0.5) < hotspot / 2) & (
                np.abs(coords[:, 1] // 256 - y0 - hotspot / 2 + 0.5) < hotspot / 2
            )
            features[block, : dim // 4] += signal
        with h5py.File(h5_dir / f"slide-{i:02d}.h5", "w") as f:
            f["features"], f["coords"] = features, coords
        case = f"patient-{i // 2}" if i < 4 else ""
        rows.append(f"slide-{i:02d},{CLASSES[label]},{case}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def write_cfg(root: Path, *, name: str = "run", out: str = "ws", **sections: dict) -> Path:
    cfg = {
        "name": name,
        "data": {"features": "features", "labels": "labels.csv"},
        "splits": {"folds": 3, "val_fraction": 0.25},
        "model": {"name": "mean", "hidden_dim": 16},
        "optim": {"epochs": 5, "select_after": 0, "patience": 2, "min_epochs": 2, "lr": 1e-2},
        "seed": 7,
        "device": "cpu",
        "out": out,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key != "model" else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box run several times faster on one thread (the killed subprocess
    below uses one too: resumed and uninterrupted runs are compared bit for bit, on the same thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root)
    return root


@pytest.fixture(scope="module")
def reference(cohort_dir) -> TrainResult:
    """One uninterrupted run, shared by the tests that compare against it."""
    return train(TrainParams(write_cfg(cohort_dir, out="ref")))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_and_metrics_consistent_with_preds(reference, cohort_dir):
    run = reference.run_dir
    assert run == cohort_dir / "ref" / "runs" / "run"
    assert reference.classes == CLASSES
    assert [f.fold for f in reference.folds] == [0, 1, 2] and {f.status for f in reference.folds} == {"trained"}
    for name in ("config.yaml", "splits.csv", "summary.csv", "report.md"):
        assert (run / name).is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["features"] == str(cohort_dir / "features")
    test_ids: dict[int, list[str]] = {}
    for row in read_csv(run / "splits.csv"):
        if row["split"] == "test":
            test_ids.setdefault(int(row["fold"]), []).append(row["slide_id"])
    labels = {r["slide_id"]: r["label"] for r in read_csv(cohort_dir / "labels.csv")}

    for fold in reference.folds:
        fold_dir = run / f"fold_{fold.fold}"
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        assert metrics == fold.metrics
        preds = read_csv(fold_dir / "preds.csv")
        assert [p["slide_id"] for p in preds] == test_ids[fold.fold]
        assert all(p["label"] == labels[p["slide_id"]] for p in preds)
        probs = np.array([[float(p["prob_neg"]), float(p["prob_pos"])] for p in preds])
        recomputed = classification_metrics([CLASSES.index(p["label"]) for p in preds], probs)
        for key in SCALARS:
            assert 0.0 <= metrics["test"][key] <= 1.0
            assert metrics["test"][key] == pytest.approx(recomputed[key])
        assert metrics["test"]["confusion_matrix"] == recomputed["confusion_matrix"]

        log = read_csv(fold_dir / "log.csv")
        assert len(log) == metrics["epochs_run"]
        assert [int(r["epoch"]) for r in log if r["selected"] == "1"][-1] == metrics["selected_epoch"]
        best = torch.load(fold_dir / "best.pt", weights_only=True)
        assert best["meta"]["epoch"] == metrics["selected_epoch"]
        assert best["meta"]["model"] == {"name": "mean", "options": {"hidden_dim": 16}, "in_dim": 8, "classes": CLASSES,
                                         "standardize": True}
        assert (fold_dir / "last.pt").is_file()

    summary = read_csv(run / "summary.csv")
    assert [r["fold"] for r in summary] == ["0", "1", "2", "mean", "std"]
    accs = [f.metrics["test"]["accuracy"] for f in reference.folds]
    assert float(summary[3]["accuracy"]) == pytest.approx(np.mean(accs))
    assert float(summary[4]["accuracy"]) == pytest.approx(np.std(accs, ddof=0))
    assert reference.summary["accuracy"] == pytest.approx((np.mean(accs), np.std(accs)))
    report = (run / "report.md").read_text()
    assert f"| accuracy | {np.mean(accs):.3f} ± {np.std(accs):.3f} |" in report
    assert "name: run" in report
    assert "3 folds (patient-level stratified k-fold, 25 % of the rest for val)." in report
    assert "Positive class: **`pos`** (the second entry of `data.classes`)" in report


def test_selection_and_early_stopping_follow_the_protocol(reference):
    """Replay every log: selection only past select_after on a strict improvement; stop on the §8 rule."""
    select_after, patience, min_epochs, epochs = 0, 2, 2, 5
    for fold in reference.folds:
        log = read_csv(reference.run_dir / f"fold_{fold.fold}" / "log.csv")
        best, counter, stop_epoch = -np.inf, 0, epochs - 1
        for row in log:
            epoch, score = int(row["epoch"]), float(row["val_score"])
            selected = epoch > select_after and score > best
            assert row["selected"] == str(int(selected)), (fold.fold, epoch)
            best, counter = (score, 0) if selected else (best, counter + 1)
            if counter >= patience and epoch > min_epochs:
                stop_epoch = epoch
                break
        assert [int(r["epoch"]) for r in log] == list(range(stop_epoch + 1))
        assert fold.metrics["val_score"] == best


def test_same_config_and_seed_give_identical_metrics(reference, cohort_dir):
    again = train(TrainParams(write_cfg(cohort_dir, out="again")))
    assert [f.metrics for f in again.folds] == [f.metrics for f in reference.folds]
    assert (again.run_dir / "summary.csv").read_bytes() == (reference.run_dir / "summary.csv").read_bytes()
    other_seed = train(TrainParams(write_cfg(cohort_dir, out="seed8", seed=8)))
    preds = [(r.run_dir / "fold_0" / "preds.csv").read_text() for r in (reference, other_seed)]
    assert preds[0] != preds[1]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from wsi_pipeline.stages.train import TrainParams, train

    torch.set_num_threads(1)

    class KillMidFold:
        '''Progress stand-in that SIGKILLs this process once fold 1 has finished epoch 1.'''
        def add_task(self, description, **kwargs):
            return description
        def update(self, task, **kwargs):
            if task == "fold 1" and kwargs.get("completed") == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    train(TrainParams(sys.argv[1]), progress=KillMidFold())
    """
)


def test_resume_after_kill_equals_uninterrupted_run(reference, cohort_dir):
    cfg = write_cfg(cohort_dir, out="killed")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(cfg)], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    run = cohort_dir / "killed" / "runs" / "run"
    assert (run / "fold_0" / "metrics.json").is_file()
    assert (run / "fold_1" / "last.pt").is_file() and not (run / "fold_1" / "metrics.json").exists()
    assert len(read_csv(run / "fold_1" / "log.csv")) == 2 and not (run / "fold_2").exists()
    fold0 = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "fold_0").iterdir()}

    updates = []

    class Recorder:
        def add_task(self, description, **kwargs):
            updates.append((description, kwargs))
            return description

        def update(self, task, **kwargs):
            updates.append((task, kwargs))

    resumed = train(TrainParams(cfg), progress=Recorder())
    assert [f.status for f in resumed.folds] == ["done", "trained", "trained"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "fold_0").iterdir()} == fold0
    assert updates[0] == ("fold 0", {"total": 1, "completed": 1, "status": "done earlier"})
    assert [kw["completed"] for task, kw in updates if task == "fold 1" and "completed" in kw][0] == 3
    for fold in ("fold_1", "fold_2"):
        for name in ("log.csv", "preds.csv", "metrics.json"):
            assert (run / fold / name).read_bytes() == (reference.run_dir / fold / name).read_bytes(), (fold, name)
    assert (run / "summary.csv").read_bytes() == (reference.run_dir / "summary.csv").read_bytes()
    assert resumed.summary == reference.summary


def test_changed_config_same_name_is_refused(reference, cohort_dir):
    with pytest.raises(ConfigError, match=r"run 'run' was started with a different config \(changed: optim.lr, seed\)"):
        train(TrainParams(write_cfg(cohort_dir, out="ref", seed=3, optim={"lr": 0.5})))
    # device is not part of the experiment: a finished run is simply reported again
    same = train(TrainParams(write_cfg(cohort_dir, out="ref"), device="auto"))
    assert [f.status for f in same.folds] == ["done"] * 3 and same.summary == reference.summary


def test_run_started_before_splits_mode_existed_still_resumes(cohort_dir):
    """A run folder whose config.yaml predates a key with a default (here `splits.mode`) is the same experiment."""
    cfg = write_cfg(cohort_dir, name="older", out="older", optim={"epochs": 1}, splits={"folds": 2})
    first = train(TrainParams(cfg))
    stored = first.run_dir / "config.yaml"
    old = yaml.safe_load(stored.read_text())
    del old["splits"]["mode"]
    stored.write_text(yaml.safe_dump(old))
    again = train(TrainParams(cfg))
    assert [f.status for f in again.folds] == ["done", "done"]
    assert yaml.safe_load(stored.read_text())["splits"]["mode"] == "kfold"


def test_monte_carlo_splits_end_to_end(cohort_dir):
    path = write_cfg(cohort_dir, name="mc", out="mc", optim={"epochs": 2, "select_after": 0})
    cfg = yaml.safe_load(path.read_text())
    cfg["splits"] = {"mode": "monte_carlo", "train": 0.5, "val": 0.25, "test": 0.25, "repeats": 2, "seed": 1}
    path.write_text(yaml.safe_dump(cfg))
    result = train(TrainParams(path))
    assert [f.fold for f in result.folds] == [0, 1] and result.classes == CLASSES
    case_of = {r["slide_id"]: r["case_id"] or r["slide_id"] for r in read_csv(cohort_dir / "labels.csv")}
    rows = read_csv(result.run_dir / "splits.csv")
    for fold in ("0", "1"):  # 12 patients -> 6 / 3 / 3, every slide once
        patients = {p: {case_of[r["slide_id"]] for r in rows if r["fold"] == fold and r["split"] == p}
                    for p in ("train", "val", "test")}
        assert [len(patients[p]) for p in ("train", "val", "test")] == [6, 3, 3]
        assert len({r["slide_id"] for r in rows if r["fold"] == fold}) == 14
    assert {r["slide_id"] for r in rows if r["split"] == "test" and r["fold"] == "0"} != {
        r["slide_id"] for r in rows if r["split"] == "test" and r["fold"] == "1"}
    report = (result.run_dir / "report.md").read_text()
    assert "2 Monte-Carlo repeats (patient-level, stratified, train/val/test 50/25/25 % of patients)." in report
    assert "Positive class: **`pos`** (the second entry of `data.classes`)" in report
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["splits"] == cfg["splits"] | {"file": None}


def test_force_starts_over(cohort_dir):
    cfg = write_cfg(cohort_dir, name="forced", out="forced", optim={"epochs": 1}, splits={"folds": 2})
    train(TrainParams(cfg))
    cfg = write_cfg(cohort_dir, name="forced", out="forced", optim={"epochs": 2}, splits={"folds": 2})
    result = train(TrainParams(cfg, force=True))
    assert [f.status for f in result.folds] == ["trained", "trained"]
    assert result.folds[0].metrics["epochs_run"] == 2


def test_tiny_budget_selects_last_epoch_and_says_so(cohort_dir):
    cfg = write_cfg(cohort_dir, name="tiny", out="tiny", optim={"epochs": 2, "select_after": 5}, splits={"folds": 2})
    result = train(TrainParams(cfg))
    for fold in result.folds:
        assert fold.metrics["selection"] == "last_epoch" and fold.metrics["selected_epoch"] == 1
        assert "last epoch used" in fold.metrics["note"]
    assert "(*) training ended before any epoch was eligible" in (result.run_dir / "report.md").read_text()


def test_three_classes_with_a_rich_progress(tmp_path):
    write_cohort(tmp_path, n_slides=18)
    labels = (tmp_path / "labels.csv").read_text().splitlines()
    relabelled = [labels[0]] + [f"{r.rsplit(',', 2)[0]},{'abc'[i % 3]}," for i, r in enumerate(labels[1:])]
    (tmp_path / "labels.csv").write_text("\n".join(relabelled) + "\n")
    cfg = write_cfg(
        tmp_path, name="three", optim={"epochs": 3, "patience": 5}, splits={"folds": 2, "val_fraction": 0.4}
    )
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"))  # as the CLI
    with Progress(*columns, console=Console(file=io.StringIO()), auto_refresh=False) as progress:
        result = train(TrainParams(cfg), progress=progress)
        progress.refresh()  # renders every task's columns: a missing field would raise here
    assert result.classes == ("a", "b", "c")
    assert progress.tasks[0].fields["status"].startswith("selected epoch ")
    assert [(t.description, t.completed, t.total) for t in progress.tasks] == [
        ("fold 0", 3, 3), ("fold 1", 3, 3),
    ]  # fmt: skip
    preds = read_csv(result.run_dir / "fold_0" / "preds.csv")
    assert list(preds[0]) == ["slide_id", "label", "prob_a", "prob_b", "prob_c"]
    probs = np.array([[float(p[f"prob_{c}"]) for c in "abc"] for p in preds])
    recomputed = classification_metrics(["abc".index(p["label"]) for p in preds], probs)
    assert result.folds[0].metrics["test"]["f1"] == pytest.approx(recomputed["f1"])  # macro F1
    assert np.array(result.folds[0].metrics["test"]["confusion_matrix"]).shape == (3, 3)


def test_group_cache_reused_and_invalidated(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f["features"], f["coords"] = np.zeros((5, 2), np.float32), np.arange(10).reshape(5, 2)
    calls = []

    def make_groups(features, coords):
        calls.append(len(coords))
        return [np.array([0, 2, 4]), np.array([1, 3])]

    cache = tmp_path / "groups" / "key"
    bags = load_bags({"a": path}, make_groups=make_groups, cache_path=lambda sid: cache / f"{sid}.npz")
    again = load_bags({"a": path}, make_groups=make_groups, cache_path=lambda sid: cache / f"{sid}.npz")
    assert calls == [5] and (cache / "a.npz").is_file()
    assert [g.tolist() for g in again["a"].groups] == [[0, 2, 4], [1, 3]] == [g.tolist() for g in bags["a"].groups]
    assert bags["a"].features.dtype == torch.float32 and bags["a"].coords.shape == (5, 2)
    os.utime(path, ns=(0, 123456789))  # a rewritten h5 has another mtime
    slide_groups(path, np.zeros((5, 2)), np.zeros((5, 2)), make_groups=make_groups, cache_path=cache / "a.npz")
    assert calls == [5, 5]
    assert slide_groups(path, None, None, make_groups=lambda f, c: None, cache_path=None) is None


def test_gmmamba_learns_a_clustered_signal(tmp_path):
    """16 of 100 instances, one spatial cluster, carry the label; GMMamba (shrunk for CPU) must find them.

    Without the signal (signal=0.0) the same budget gives a test AUC of about 0.68, so 0.9 means learning.
    """
    write_cohort(tmp_path, n_slides=32, dim=16, signal=2.0, hotspot=4, seed=1)
    cfg = write_cfg(
        tmp_path,
        name="gm",
        model={"name": "gmmamba", "d_model": 32, "n_groups": 4, "d_state": 4},
        optim={"epochs": 6, "select_after": 1, "patience": 100, "min_epochs": 0, "lr": 2e-3},
        splits={"folds": 2, "val_fraction": 0.3},
    )
    result = train(TrainParams(cfg))
    assert result.summary["auc"][0] >= 0.9, result.summary
    assert len(list((result.run_dir / "groups" / "kmeans_G4").glob("*.npz"))) == 32
