"""Fuzzing the real commands with generated bad input (docs/reliability.md, "Fuzzing").

Four generators — labels CSVs, YAML training configs, slide file names, patching numbers — each run through
the real `wsip` command in-process on a tiny workspace inside a sandbox folder. Every example must keep three
invariants:

(a) the exit code is 0, 1 or 2, never a traceback;
(b) nothing in the sandbox outside the workspace (where the inputs and decoy targets of `../` names lie) is
    created, changed or deleted;
(c) the workspace's finished outputs are untouched (same inode, size and mtime: a rewrite is a new inode)
    unless the command succeeded, and no finished manifest row is lost.

The normal test run uses a few derandomized examples per generator (the fast profile); `make fuzz` sets
`WSIP_FUZZ_EXAMPLES` (examples per generator) and prints what ran.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from wsi_pipeline.cli import app
from wsi_pipeline.workspace.manifest import DONE, read_manifest

FULL = int(os.environ.get("WSIP_FUZZ_EXAMPLES", "0"))
FAST = 6  # examples per generator in the normal test run
SETTINGS = settings(max_examples=FULL or FAST, deadline=None, derandomize=not FULL, database=None,
                    suppress_health_check=list(HealthCheck))
HOSTILE_IDS = ["../../outside/evil", "../../../outside/evil", "../../../../outside/victim", "/outside/abs", "..",
               ".", ".hidden", "a/b", "a\\b", "a\x00b", "tab\there", "s" * 230, "é" * 120, "[red]x[/]", "-rf", "~",
               "demo_00/../demo_01", "CON", "*", "demo_0?", "caf\udce9"]
TIMINGS = ("seconds", "segment_s", "grid_s", "write_s", "patches_per_s")


@dataclass
class Sandbox:
    """`root/ws` the workspace, `root/in` the inputs, `root/outside` decoys where `../` names would land."""

    root: Path
    slide: Path
    features: Path
    runner: CliRunner = field(default_factory=CliRunner)
    codes: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)  # (generator, exit code) -> the first example's last line

    @property
    def ws(self) -> Path:
        return self.root / "ws"

    def run(self, kind: str, args: list[str]) -> None:
        """Run `wsip ARGS` in-process and check the three invariants."""
        outside, finished = self._outside(), self._finished()
        result = self.runner.invoke(app, args, catch_exceptions=True)
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        assert not crashed and result.exit_code in (0, 1, 2), (args, result.output, repr(result.exception))
        assert "Traceback" not in result.output, (args, result.output)
        assert self._outside() == outside, f"{args}: changed outside the workspace"
        if result.exit_code != 0:
            after = self._finished()
            assert {k: after.get(k) for k in finished} == finished, f"{args}: finished outputs changed"
        self.codes[(kind, result.exit_code)] += 1
        self.samples.setdefault((kind, result.exit_code), (args, result.output.strip().splitlines()[-1:]))

    def _outside(self) -> dict[str, tuple[int, int, int]]:
        return {str(p.relative_to(self.root)): _signature(p) for p in _walk(self.root) if not p.is_relative_to(self.ws)}

    def _finished(self) -> dict[str, object]:
        state: dict[str, object] = {}
        for path in _walk(self.ws):
            rel = str(path.relative_to(self.ws))
            if path.name == "manifest.csv":
                for row in read_manifest(path):
                    if row.get("status") == DONE:
                        state[f"{rel}:{row['slide_id']}"] = {k: v for k, v in row.items() if k not in TIMINGS}
            elif path.is_file() and not (path.suffix == ".lock" or {".partial", ".locks", "qc"} & set(path.parts)
                                         or ".tmp-" in path.name):  # QC images show the latest attempt
                state[rel] = _signature(path)
        return state


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        yield from (Path(dirpath, n) for n in dirnames + filenames)


def _signature(path: Path) -> tuple[int, int, int]:
    st_ = path.lstat()
    return st_.st_ino, st_.st_size, st_.st_mtime_ns


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, make_slide) -> Iterator[Sandbox]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "in").mkdir()
    (root / "outside" / "victim").mkdir(parents=True)
    (root / "outside" / "victim" / "data.txt").write_text("precious\n")
    features = root / "in" / "feats"
    (features / "h5_files").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        with h5py.File(features / "h5_files" / f"demo_{i:02d}.h5", "w") as f:
            f["features"] = rng.normal(size=(6, 8)).astype(np.float32) + (i % 2)
            f["coords"] = np.arange(12, dtype=np.int64).reshape(6, 2) * 256
    shutil.copy(features / "h5_files" / "demo_00.h5", root / "outside" / "evil.h5")
    slide = root / "in" / "tiny.svs"
    shutil.copy(make_slide(size=(1200, 1600)), slide)
    box = Sandbox(root, slide, features)
    box.run("setup", ["patch", str(slide), "--out", str(box.ws), "--quiet"])  # something finished to protect
    yield box
    if FULL:
        print("\nfuzz examples by generator and exit code:", dict(sorted(box.codes.items())))
        for key, sample in sorted(box.samples.items()):
            print(key, sample)


def _config(box: Sandbox, labels: Path, **changes: object) -> dict:
    return {"name": "fz", "data": {"features": str(box.features), "labels": str(labels)},
            "splits": {"folds": 2, "val_fraction": 0.5}, "model": {"name": "abmil"},
            "optim": {"epochs": 1, "select_after": 0, "min_epochs": 0, "patience": 1}, "seed": 1, "device": "cpu",
            "out": str(box.ws), **changes}


# ------------------------------------------------------------------------------------------ labels CSVs

ids = st.one_of(st.sampled_from([f"demo_{i:02d}" for i in range(10)]), st.sampled_from(HOSTILE_IDS),
                st.text(max_size=20))
labels = st.one_of(st.sampled_from(["normal", "tumour", "Tumour", " normal ", "NORMAL", ""]), st.text(max_size=8))
cohort = st.just([(f"demo_{i:02d}", ("normal", "tumour")[i % 2], None) for i in range(10)])
rows = st.one_of(cohort, st.lists(st.tuples(ids, labels, st.one_of(st.none(), st.text(max_size=6))), max_size=12))


@SETTINGS
@given(header=st.sampled_from(["slide_id,label,case_id", "slide_id,label", "label,slide_id", "slide_id;label",
                               "Slide_ID,label", " slide_id , label ", ""]),
       rows=rows, encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"]),
       newline=st.sampled_from(["\n", "\r\n", "\r"]), quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
       garbage=st.binary(max_size=8))
def test_fuzz_labels_csv(sandbox, header, rows, encoding, newline, quoting, garbage):
    text = io.StringIO()
    writer = csv.writer(text, quoting=quoting, lineterminator=newline)
    text.write(header + newline if header else "")
    for sid, label, case in rows:
        writer.writerow([sid, label] if case is None else [sid, label, case])
    path = sandbox.root / "in" / "labels.csv"
    path.write_bytes(text.getvalue().encode(encoding, errors="surrogateescape" if "utf-8" in encoding else "replace")
                     + garbage)
    cfg = sandbox.root / "in" / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(sandbox, path)))
    sandbox.run("labels", ["train", "--cfg", str(cfg), "--quiet"])


# ---------------------------------------------------------------------------------------- YAML configs

numbers = st.one_of(st.integers(-3, 4), st.sampled_from([0, -1, 2**63, -(2**70), 10**30]),
                    st.floats(max_value=4.0), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324]))
values = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), st.sampled_from(HOSTILE_IDS))
keys = st.sampled_from(["name", "seed", "device", "unknown", "data.classes", "data.standardize", "data.extra",
                        "data.labels", "data.features", "splits.mode", "splits.folds", "splits.val_fraction",
                        "splits.train", "splits.repeats", "splits.seed", "splits.file", "model.name",
                        "model.dropout", "model.mask_ratio", "optim.lr", "optim.weight_decay", "optim.epochs",
                        "optim.patience", "optim.min_epochs", "optim.select_after", "optim.nope"])
_LONG_RUNS = ("optim.epochs", "optim.patience", "optim.min_epochs", "splits.folds", "splits.repeats")


def _set(cfg: dict, key: str, value: object) -> None:
    section, _, leaf = key.rpartition(".")
    target = cfg.setdefault(section, {}) if section else cfg
    if isinstance(target, dict):
        target[leaf] = value


@SETTINGS
@given(changes=st.lists(st.tuples(keys, values), max_size=4), raw=st.one_of(st.none(), st.text(max_size=60)))
def test_fuzz_yaml_config(sandbox, changes, raw):
    labels = sandbox.root / "in" / "cohort.csv"
    labels.write_text("slide_id,label\n" + "".join(f"demo_{i:02d},{('normal', 'tumour')[i % 2]}\n" for i in range(10)))
    cfg = _config(sandbox, labels, name="fy")
    for key, value in changes:
        if key in _LONG_RUNS and isinstance(value, int | float) and value > 4:
            value = -value  # a valid huge epoch count would only train for long: its negative is the bad input
        _set(cfg, key, value)
    path = sandbox.root / "in" / "fuzz.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(cfg, allow_unicode=True))
    sandbox.run("yaml", ["train", "--cfg", str(path), "--quiet"])


# ------------------------------------------------------------------------------------ slide file names

_names = st.one_of(st.text(min_size=1, max_size=60), st.sampled_from(HOSTILE_IDS),
                   st.binary(min_size=1, max_size=40).map(os.fsdecode),
                   st.integers(190, 250).map(lambda n: "s" * n), st.text(alphabet="\x01\x1b\n\r\t a", max_size=6))
_counter = iter(range(10**9))


def _valid_file_name(name: str) -> bool:
    data = os.fsencode(name + ".svs")
    return b"/" not in data and b"\x00" not in data and len(data) <= 255


@SETTINGS
@given(name=_names.filter(_valid_file_name))
def test_fuzz_slide_file_names(sandbox, name):
    folder = sandbox.root / "in" / "names" / str(next(_counter))
    folder.mkdir(parents=True)
    os.link(sandbox.slide, os.path.join(os.fsencode(folder), os.fsencode(name + ".svs")))
    sandbox.run("names", ["patch", str(folder), "--out", str(sandbox.ws), "--quiet"])
    shutil.rmtree(folder)


# -------------------------------------------------------------------------------------- CLI numbers

_floats = st.one_of(st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e308", "5e-324", "abc", ""]),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr))
_ints = st.one_of(st.sampled_from(["0", "-1", "16385", "1000000000", str(2**63), "1.5", "x"]),
                  st.integers(-10, 600).map(str))


_GOOD = {"--mag": st.sampled_from(["20", "10", "5", "2.5", "40"]), "--patch-size": st.integers(64, 512).map(str),
         "--overlap": st.integers(0, 63).map(str), "--min-tissue": st.sampled_from(["0", "0.25", "0.5", "1"]),
         "--mpp": st.sampled_from(["0.25", "0.5", "50", "0.05"]), "--mpp-override": st.sampled_from(["0.25", "0.5"])}
_BAD = {"--mag": st.one_of(_floats, st.sampled_from(["0.1", "1000", "1000.1", "0.099"])), "--patch-size": _ints,
        "--overlap": _ints, "--min-tissue": _floats, "--mpp": st.one_of(_floats, st.just("0.049")),
        "--mpp-override": _floats}


@SETTINGS
@given(good=st.fixed_dictionaries({}, optional=_GOOD), bad=st.dictionaries(st.sampled_from(sorted(_BAD)), st.none(),
                                                                          max_size=2), data=st.data())
def test_fuzz_patch_numbers(sandbox, good, bad, data):
    """Mostly valid flags (each present or not), with zero to two bad ones."""
    flags = {**good, **{flag: data.draw(_BAD[flag], label=flag) for flag in bad}}
    args = ["patch", str(sandbox.slide), "--out", str(sandbox.ws), "--quiet"]
    sandbox.run("numbers", args + [f"{flag}={value}" for flag, value in sorted(flags.items())])


def test_the_generators_reach_every_exit_code(sandbox):
    """Not a fuzz target: the fast profile must exercise refusals and successes both (runs last)."""
    codes = {code for (kind, code) in sandbox.codes if kind != "setup"}
    assert {0, 2} <= codes, sandbox.codes

