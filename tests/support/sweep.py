"""The kill-anywhere sweep (docs/reliability.md): the real `wsip` CLI, SIGKILLed at chosen progress events,
then rerun without `--force` and checked against an uninterrupted reference run.

A small generated cohort (10 slides + 2 to predict) goes through patch → extract → train → predict once,
uninterrupted, with `WSIP_FAULT_LOG` recording each stage's events (`wsi_pipeline.faults`). A stage's kill
points are spread over its own event list, so early, middle and late all get hit and each kind of event
(a slide's lock taken, a write before its rename, a feature chunk before its marker, a training step) is
represented. Each trial copies the workspace as it was before the stage, runs the stage with
`WSIP_FAULT_AT=<event>:<n>` (the process SIGKILLs itself there), reruns it plainly and requires: exit 0, no
traceback, a whole workspace (`checks.workspace_problems`) equal to the reference (`checks.differences`:
features and checkpoints bit for bit, coords equal, the training summary byte-identical).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from support.checks import differences, workspace_problems
from support.launch import run_wsip
from wsi_pipeline.faults import EVENTS, FAULT_AT_ENV, FAULT_LOG_ENV
from wsi_pipeline.stages.patch.params import PatchParams
from wsi_pipeline.testing.synthetic import make_demo_cohort
from wsi_pipeline.workspace.layout import Layout

STAGES = ("patch", "extract", "train", "predict")
# The feature set the sweep's extract makes, relative to a trial folder
FEATURES = Layout(Path("ws")).feature_set(PatchParams().config_name(), "resnet18_random").dir
Launcher = Callable[..., subprocess.CompletedProcess]  # run_wsip or a ForkedWsip


def make_cohort(cohort: Path, trial: Path) -> None:
    """10 labelled slides (tiny: a few patches each) in `cohort/slides` and `cohort/holdout.svs`; an empty
    workspace `trial/ws` and `trial/cfg.yaml`, a 2-fold × 3-epoch ABMIL run on its features."""
    labels = make_demo_cohort(cohort / "slides", n_slides=10, size=(640, 896), hotspots=1, hotspot_radius=60, seed=11)
    config = {"name": "r", "data": {"features": str(FEATURES), "labels": str(labels)},
              "splits": {"folds": 2, "val_fraction": 0.5}, "model": {"name": "abmil"},
              "optim": {"epochs": 3, "select_after": 0, "min_epochs": 0, "patience": 5}, "seed": 3,
              "device": "cpu", "out": "ws"}
    (trial / "ws").mkdir(parents=True)
    (trial / "cfg.yaml").write_text(yaml.safe_dump(config))


def stage_args(stage: str, cohort: Path) -> list[str]:
    """The stage's command line, run in a trial folder holding the workspace `ws` and `cfg.yaml`."""
    return {
        "patch": ["patch", str(cohort / "slides"), "--out", "ws", "--quiet"],
        "extract": ["extract", "--weights", "random", "--workers", "0", "--out", "ws", "--quiet"],
        "train": ["train", "--cfg", "cfg.yaml", "--quiet"],
        "predict": ["predict", str(cohort / "holdout.svs"), str(cohort / "slides" / "demo_01.svs"), "--run", "r",
                    "--out", "ws"],
    }[stage]


def kill_points(trace: list[str], n: int) -> list[str]:
    """`n` kill points `<event>:<k>` spread over a run's events: the run is cut into `n` equal segments and
    segment j takes the event nearest its middle of kind j (cycling through the kinds the run has)."""
    kinds, n = [e for e in EVENTS if e in trace], min(n, len(trace))
    points = []
    for j in range(n):
        lo, hi = j * len(trace) // n, max((j + 1) * len(trace) // n, j * len(trace) // n + 1)
        middle = (lo + hi) / 2
        wanted = [i for i in range(lo, hi) if trace[i] == kinds[j % len(kinds)]] or list(range(lo, hi))
        i = min(wanted, key=lambda i: abs(i + 0.5 - middle))
        points.append(f"{trace[i]}:{trace[:i + 1].count(trace[i])}")
    return list(dict.fromkeys(points))


@dataclass
class Trial:
    stage: str
    point: str
    killed: bool  # the run died by SIGKILL at the point
    rerun_rc: int
    problems: list[str] = field(default_factory=list)

    @property
    def recovered(self) -> bool:
        return self.killed and self.rerun_rc == 0 and not self.problems


@dataclass
class Counts:
    stage: str
    trials: list[Trial]

    @property
    def kills(self) -> int:
        return sum(t.killed for t in self.trials)

    @property
    def recovered(self) -> int:
        return sum(t.recovered for t in self.trials)

    @property
    def divergent(self) -> int:
        return sum(t.killed and not t.recovered for t in self.trials)

    def line(self) -> str:
        kinds = {e: sum(t.point.startswith(e + ":") for t in self.trials) for e in EVENTS}
        spread = ", ".join(f"{n} {e}" for e, n in kinds.items() if n)
        return (f"{self.stage:8s} kills {self.kills:3d} ({spread}), clean recoveries {self.recovered:3d}, "
                f"divergent {self.divergent}")

    def failures(self) -> list[str]:
        return [f"{t.stage} killed at {t.point}: rerun exit {t.rerun_rc}; {'; '.join(t.problems[:5])}"
                for t in self.trials if not t.recovered]


class Sweep:
    """A cohort, the workspace before each stage, each stage's reference outputs and event trace."""

    def __init__(self, root: Path, wsip: Launcher) -> None:
        self.root, self.wsip = root, wsip
        self.cohort = root / "cohort"
        self.traces: dict[str, list[str]] = {}

    def before(self, stage: str) -> Path:
        return self.root / f"before_{stage}"

    def reference(self, stage: str) -> Path:
        return self.root / f"ref_{stage}" / "ws"

    @classmethod
    def prepare(cls, root: Path, wsip: Launcher = run_wsip) -> Sweep:
        """Make the cohort, then run every stage once, uninterrupted and traced: the references."""
        sweep = cls(root, wsip)
        make_cohort(sweep.cohort, sweep.before("patch"))
        for stage, following in zip(STAGES, (*STAGES[1:], None), strict=True):
            ref = sweep.reference(stage).parent
            shutil.copytree(sweep.before(stage), ref)
            trace = root / f"trace_{stage}.txt"
            proc = wsip(stage_args(stage, sweep.cohort), ref, **{FAULT_LOG_ENV: str(trace)})
            if proc.returncode != 0:
                raise RuntimeError(f"reference {stage} failed: {proc.stderr[-2000:]}")
            sweep.traces[stage] = trace.read_text().split()
            if following:
                shutil.copytree(ref, sweep.before(following))
        return sweep

    def run(self, stage: str, points: int) -> Counts:
        """Kill `stage` at `points` points spread over its events; rerun and check each."""
        return Counts(stage, [self.trial(stage, point) for point in kill_points(self.traces[stage], points)])

    def trial(self, stage: str, point: str) -> Trial:
        folder = self.root / "trials" / stage / point.replace(":", "_")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(self.before(stage), folder)
        args = stage_args(stage, self.cohort)
        killed = self.wsip(args, folder, **{FAULT_AT_ENV: point}).returncode == -signal.SIGKILL
        rerun = self.wsip(args, folder)
        problems = [line for line in rerun.stderr.splitlines() if "Traceback" in line][:1]
        if rerun.returncode == 0:
            problems += workspace_problems(folder / "ws") + differences(self.reference(stage), folder / "ws")
        else:
            problems.append(rerun.stderr.strip().splitlines()[-1] if rerun.stderr.strip() else "no output")
        shutil.rmtree(folder)
        return Trial(stage, point, killed, rerun.returncode, problems)
