"""Faults as a test suite (docs/reliability.md): kill -9 anywhere, full disks, read-only workspaces and concurrent
runs, on the real `wsip` CLI and a small generated cohort.

The fast subset here (`make test`) kills every stage 3 times (early, middle, late: different kinds of event);
the full sweep (≥ 20 kills per stage) is marked `faults` and deselected by default: `make faults`, or
`pytest -m faults tests/test_faults.py -s` to see the counts. Storage faults are real: a workspace bind-mounted
read-only, a tmpfs that fills up, each in a private mount namespace (root); elsewhere a non-root user gets a
`chmod -R a-w` workspace and the full-disk tests skip.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from support.checks import differences, workspace_files, workspace_problems
from support.launch import (
    can_make_read_only,
    namespaces_available,
    read_only_workspace,
    tmpfs,
)
from support.sweep import STAGES, Sweep, stage_args

from wsi_pipeline.errors import ConfigError, StorageError
from wsi_pipeline.stages.inputs import resolve_inputs
from wsi_pipeline.stages.patch import patch
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.workspace.layout import Layout, RunDir

pytestmark = pytest.mark.e2e

FULL_POINTS = int(os.environ.get("WSIP_FAULT_POINTS", "24"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, wsip) -> Sweep:
    """The cohort, and every stage run once uninterrupted (the references), with the CLI."""
    return Sweep.prepare(tmp_path_factory.mktemp("sweep"), wsip)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in workspace_files(root)}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_recovers_from_kills_early_mid_and_late(sweep, stage):
    counts = sweep.run(stage, points=3)
    print(counts.line())
    assert counts.kills == 3, [t.point for t in counts.trials if not t.killed]
    assert counts.recovered == 3, counts.failures()
    assert len({t.point.split(":")[0] for t in counts.trials}) >= 2  # not three kills of one kind


@pytest.mark.faults
@pytest.mark.parametrize("stage", STAGES)
def test_full_kill_sweep(sweep, stage):
    counts = sweep.run(stage, points=FULL_POINTS)
    print(counts.line())
    assert counts.kills >= 20 and counts.recovered == counts.kills, counts.failures()


# -------------------------------------------------------------------------------------- read-only


@pytest.fixture(scope="module")
def finished(sweep, wsip) -> Path:
    """A trial folder where every stage ran in place (so its recorded paths are its own): all cached."""
    folder = sweep.root / "finished"
    shutil.copytree(sweep.before("train"), folder)
    for stage in ("train", "predict"):
        assert wsip(stage_args(stage, sweep.cohort), folder).returncode == 0
    return folder


def test_cached_stages_succeed_on_a_read_only_workspace_and_writes_fail_in_one_line(finished, sweep, wsip):
    if not can_make_read_only():
        pytest.skip("root without mount namespaces: nothing makes a folder read-only for root")
    ws = finished / "ws"
    before = digest(ws)
    with read_only_workspace(wsip, ws):
        assert wsip.shell("touch ws/probe", finished).returncode != 0, "the workspace should be read-only"
        for stage in STAGES:
            proc = wsip(stage_args(stage, sweep.cohort), finished)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (stage, proc.stderr)
        needs_writing = [["patch", sweep.cohort / "slides", "--mag", "10", "--out", "ws", "--quiet"],
                         ["extract", "--weights", "random", "--force", "--out", "ws", "--quiet"],
                         ["train", "--cfg", "cfg.yaml", "--force", "--quiet"],
                         ["predict", sweep.cohort / "slides" / "demo_02.svs", "--run", "r", "--out", "ws"]]
        for args in needs_writing:
            proc = wsip(args, finished)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args[0], proc.stderr)
            assert len(error_lines(proc.stderr)) == 1 and "read-only" in proc.stderr and str(ws) in proc.stderr
    assert digest(ws) == before


# ------------------------------------------------------------------------------------------ full disk


@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_stops_in_one_line_and_the_rerun_completes(sweep, wsip, stage, tmp_path):
    """The disk has room for about half of what the stage writes; then the space is freed and it reruns."""
    if not namespaces_available():
        pytest.skip("needs a private mount namespace (root) for a small tmpfs")
    disk, stopped, rerun = tmp_path / "disk", tmp_path / "stopped", tmp_path / "rerun"
    disk.mkdir()
    needed = sum(p.stat().st_size for p in workspace_files(sweep.reference(stage))) - sum(
        p.stat().st_size for p in workspace_files(sweep.before(stage) / "ws"))
    with wsip.mounted(tmpfs(disk, 256 * 1024), disk):
        assert wsip.shell(f"cp -a {sweep.before(stage)}/. . && avail=$(( $(stat -f -c '%a * %S' .) )) && "
                          f"head -c $(( avail - {needed // 2} )) /dev/zero > filler", disk).returncode == 0
        first = wsip(stage_args(stage, sweep.cohort), disk)
        wsip.shell(f"cp -a ws {stopped} && rm filler", disk)
        second = wsip(stage_args(stage, sweep.cohort), disk)
        wsip.shell(f"cp -a ws {rerun}", disk)
    assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr
    assert len(error_lines(first.stderr)) == 1 and "no space left" in first.stderr, first.stderr
    assert workspace_problems(stopped, stopped=True) == []
    assert second.returncode == 0, second.stderr
    assert workspace_problems(rerun) == [] and differences(sweep.reference(stage), rerun, home=disk) == []


def test_a_failed_write_leaves_no_half_file_without_root_either(sweep, tmp_path, monkeypatch):
    """The same contract where no tmpfs can be mounted: from the 4th file on, every write stores half its
    bytes and fails with ENOSPC, as a full disk does (in-process, on the patch stage)."""
    write_bytes, writes = Path.write_bytes, []

    def full_disk(self: Path, data: bytes) -> int:
        writes.append(self)
        if len(writes) <= 3:
            return write_bytes(self, data)
        write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    ws = tmp_path / "ws"
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(StorageError, match="no space left") as err:
        patch(resolve_inputs([sweep.cohort / "slides"]), out=ws)
    monkeypatch.undo()
    assert str(ws) in str(err.value) and workspace_problems(ws, stopped=True) == []
    rerun = patch(resolve_inputs([sweep.cohort / "slides"]), out=ws).outcomes
    assert {o.status for o in rerun} == {"cached", "done"}  # what the full disk stopped, and what it had kept
    assert differences(sweep.reference("patch"), ws) == []


# ---------------------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("stage", ["patch", "extract"])
def test_two_processes_on_one_cohort_do_each_slide_once(sweep, wsip, stage):
    folder = sweep.root / f"twice_{stage}"
    shutil.copytree(sweep.before(stage), folder)
    runs = [wsip.start(stage_args(stage, sweep.cohort), folder) for _ in range(2)]
    procs = [run.wait() for run in runs]
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    done = sorted(line.split(":")[0] for p in procs for line in p.stderr.splitlines() if line.endswith(": done"))
    assert done == [f"demo_{i:02d}" for i in range(10)]  # every slide made exactly once, by one of them
    assert workspace_problems(folder / "ws") == [] and differences(sweep.reference(stage), folder / "ws") == []


def test_a_second_train_of_a_run_in_progress_is_refused_in_one_line(sweep, wsip):
    folder = sweep.root / "two_trains"
    shutil.copytree(sweep.before("train"), folder)
    config = (folder / "cfg.yaml").read_text()
    (folder / "long.yaml").write_text(config.replace("epochs: 3", "epochs: 60").replace("patience: 5", "patience: 60"))
    (folder / "other.yaml").write_text(config.replace("seed: 3", "seed: 4"))  # the same run name, another config
    first = wsip.start(["train", "--cfg", "long.yaml", "--quiet"], folder)
    lock = Layout(folder / "ws").run("r").lock
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    seconds = [wsip(["train", "--cfg", cfg, *force, "--quiet"], folder)
               for cfg in ("cfg.yaml", "other.yaml") for force in ([], ["--force"])]
    assert lock.exists(), "the first training should still be running"
    assert first.wait().returncode == 0
    for proc in seconds:
        assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
        assert "being trained by another process" in proc.stderr and "Traceback" not in proc.stderr
    assert workspace_problems(folder / "ws") == []


def test_predict_while_extract_rewrites_the_cohort_features(sweep, wsip):
    folder = sweep.root / "predict_and_extract"
    shutil.copytree(sweep.before("predict"), folder)
    extracting = wsip.start(["extract", "--weights", "random", "--workers", "0", "--force", "--out", "ws",
                             "--quiet"], folder)
    predicting = wsip(stage_args("predict", sweep.cohort), folder)
    assert extracting.wait().returncode == 0 and predicting.returncode == 0, predicting.stderr
    assert workspace_problems(folder / "ws") == [] and differences(sweep.reference("predict"), folder / "ws") == []


# ------------------------------------------------------------------------------ training's own guards


def train_in(folder: Path, sweep: Sweep, **changes) -> TrainParams:
    """A copy of the workspace before training, with a config changed per section."""
    shutil.copytree(sweep.before("train"), folder)
    cfg = yaml.safe_load((folder / "cfg.yaml").read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return TrainParams(folder / "cfg.yaml")


def test_a_diverging_fold_stops_in_one_line_naming_the_slide_and_selects_no_nan_model(sweep, tmp_path):
    params = train_in(tmp_path / "t", sweep, optim={"lr": 1e30})
    with pytest.raises(ConfigError, match=r"fold 0, epoch 0: the training loss on slide demo_\d\d is nan") as err:
        train(params)
    assert "\n" not in str(err.value) and "lower optim.lr" in str(err.value)
    fold = Layout(tmp_path / "t" / "ws").run("r").fold(0)
    assert not fold.best.exists() and not fold.metrics.exists()


def test_undefined_metrics_are_json_null_on_disk_nan_in_memory_and_a_finished_run_writes_nothing(sweep, tmp_path):
    """A test set of one class has no AUC: metrics.json must still be JSON that any reader accepts."""
    (tmp_path / "splits.csv").write_text("fold,split,slide_id\n" + "".join(
        f"0,{part},demo_{i:02d}\n" for part, ids in (("train", (1, 3, 4, 5, 6, 7)), ("val", (8, 9)),
                                                      ("test", (0, 2))) for i in ids))
    params = train_in(tmp_path / "t", sweep, splits={"file": str(tmp_path / "splits.csv")})
    first = train(params)
    run = first.run_dir
    stored = json.loads(RunDir(run).fold(0).metrics.read_text(),
                        parse_constant=lambda name: pytest.fail(f"metrics.json holds a bare {name}"))
    assert stored["test"]["auc"] is None and math.isnan(first.folds[0].metrics["test"]["auc"])
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    again = train(params)  # every fold done: read back from disk
    assert math.isnan(again.folds[0].metrics["test"]["auc"]) and str(again.summary) == str(first.summary)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    assert "nan" in (run / "summary.csv").read_text() and "nan" in (run / "report.md").read_text()
