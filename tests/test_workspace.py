"""Workspace rules: atomic writes, locks (incl. stale recovery), manifests, shards, hashes, a run's files, status."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from wsi_pipeline.digests import file_fingerprint, params_hash
from wsi_pipeline.workspace.files import atomic_write
from wsi_pipeline.workspace.layout import Layout, workspace_root
from wsi_pipeline.workspace.locks import OwnerLock
from wsi_pipeline.workspace.manifest import read_manifest, update_manifest
from wsi_pipeline.workspace.run_store import (
    SplitRow,
    Splits,
    read_metrics,
    read_summary,
    split_sizes,
    write_metrics,
    write_splits,
    write_summary,
)
from wsi_pipeline.workspace.shards import parse_shard, take_shard
from wsi_pipeline.workspace.status import OutputStatus, RunStatus, workspace_status


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("finished")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "finished" and list(tmp_path.iterdir()) == [target]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_lock_is_exclusive_and_released(tmp_path):
    a, b = OwnerLock(tmp_path / "s.lock"), OwnerLock(tmp_path / "s.lock")
    assert a.acquire() and not b.acquire()
    a.release()
    assert b.acquire()
    b.release()
    assert not (tmp_path / "s.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "s.lock"
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "time": 0}))
    assert OwnerLock(path).acquire()


def test_live_lock_on_another_host_is_respected_until_it_ages(tmp_path, monkeypatch):
    path = tmp_path / "s.lock"
    path.write_text(json.dumps({"pid": 1, "host": "other-node", "time": 0}))
    assert not OwnerLock(path).acquire()
    os.utime(path, (0, 0))  # not refreshed for decades
    assert OwnerLock(path).acquire()


def test_manifest_upsert_keeps_one_row_per_slide(tmp_path):
    path = tmp_path / "manifest.csv"
    cols = ("slide_id", "status", "error")
    update_manifest(path, {"slide_id": "b", "status": "failed", "error": "x, with comma"}, cols)
    update_manifest(path, {"slide_id": "a", "status": "done"}, cols)
    update_manifest(path, {"slide_id": "b", "status": "done"}, cols)
    assert read_manifest(path) == [{"slide_id": "a", "status": "done", "error": ""},
                                   {"slide_id": "b", "status": "done", "error": ""}]


def test_shards_partition_and_slurm_variables(monkeypatch):
    items = [f"s{i}" for i in range(10)]
    parts = [take_shard(items, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(items) and all(parts)
    assert parse_shard(None) is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard(None) == (2, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert parse_shard(None) == (1, 4)
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_hashes_and_fingerprints(tmp_path, monkeypatch):
    assert params_hash({"a": 1, "b": 2}) == params_hash({"b": 2, "a": 1}) != params_hash({"a": 1, "b": 3})
    f = tmp_path / "s.svs"
    f.write_bytes(b"12345")
    before = file_fingerprint(f)
    os.utime(f, ns=(1, 1))
    assert file_fingerprint(f) != before
    monkeypatch.setenv("WSIP_OUT", str(tmp_path / "ws"))
    assert workspace_root() == tmp_path / "ws" and workspace_root("x").name == "x"


def test_run_files_round_trip_an_undefined_metric_as_null_on_disk_and_nan_in_memory(tmp_path):
    run = Layout(tmp_path).run("r")
    fold = run.fold(0)
    metrics = {"fold": 0, "selection": "best_val", "selected_epoch": 2,
               "val": {"auc": 0.5, "f1": 1.0}, "test": {"auc": math.nan, "f1": 0.25, "confusion_matrix": [[1]]}}
    write_metrics(fold, metrics)
    assert json.loads(fold.metrics.read_text())["test"]["auc"] is None  # strict JSON on disk
    back = read_metrics(fold)
    assert math.isnan(back["test"]["auc"]) and back["test"]["f1"] == 0.25 and back["test"]["confusion_matrix"] == [[1]]
    assert read_summary(run) == {}  # still training
    write_summary(run, [back], {"auc": (math.nan, math.nan), "f1": (0.25, 0.0)}, ("auc", "f1"))
    assert read_summary(run) == {"auc": ("nan", "nan"), "f1": ("0.25", "0.0")}
    write_splits(Splits((SplitRow(1, "train", "a"), SplitRow(0, "test", "b"), SplitRow(1, "val", "c"),
                         SplitRow(1, "train", "d"))), run.splits)
    assert split_sizes(run) == [(0, {"train": 0, "val": 0, "test": 1}), (1, {"train": 2, "val": 1, "test": 0})]
    assert fold.number == 0 and run.fold(12).number == 12


def test_status_counts_each_outputs_manifest_and_each_runs_finished_folds(tmp_path):
    layout = Layout(tmp_path)
    assert workspace_status(layout).empty
    patches = layout.patch_set("20x_256px_0px")
    patches.coords_dir.mkdir(parents=True)
    for slide_id, status in (("a", "done"), ("b", "failed"), ("c", "no_tissue"), ("d", "done"), ("e", "failed")):
        update_manifest(patches.manifest, {"slide_id": slide_id, "status": status}, ["slide_id", "status"])
    run = layout.run("r")
    for k in (0, 1):
        run.fold(k).dir.mkdir(parents=True)
        run.fold(k).best.write_bytes(b"")
    write_metrics(run.fold(1), {"fold": 1})
    state = workspace_status(layout)
    assert state.outputs == [OutputStatus("patches/20x_256px_0px", done=2, failed=2, no_tissue=1,
                                          first_failures=("b", "e", "c"))]
    assert state.runs == [RunStatus("runs/r", finished_folds=1, summarized=False)]
