"""What `wsip status` shows, computed from the workspace's own files (callable from Python):
per stage output, how many slides are done, failed or without tissue; per run, its finished folds."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_pipeline.workspace.layout import Layout
from wsi_pipeline.workspace.manifest import DONE, FAILED, NO_TISSUE, read_manifest
from wsi_pipeline.workspace.run_store import finished_folds


@dataclass(frozen=True)
class OutputStatus:
    """One stage output (`patches/<config>` or `features/<config>/<set>`), relative to the workspace."""

    name: str
    done: int
    failed: int
    no_tissue: int
    first_failures: tuple[str, ...]  # slide ids, failed first, then no tissue; at most 3


@dataclass(frozen=True)
class RunStatus:
    name: str  # `runs/<name>`, relative to the workspace
    finished_folds: int
    summarized: bool  # summary.csv written: every fold finished


@dataclass(frozen=True)
class WorkspaceStatus:
    root: str
    outputs: list[OutputStatus]
    runs: list[RunStatus]

    @property
    def empty(self) -> bool:
        return not self.outputs and not self.runs


def workspace_status(layout: Layout) -> WorkspaceStatus:
    """Counts from each stage output's manifest and each run's folder; nothing is written."""
    outputs = []
    for output in (*layout.patch_sets(), *layout.feature_sets()):
        rows = read_manifest(output.manifest)
        by = {s: [r["slide_id"] for r in rows if r["status"] == s] for s in (DONE, FAILED, NO_TISSUE)}
        outputs.append(OutputStatus(str(output.dir.relative_to(layout.root)), len(by[DONE]), len(by[FAILED]),
                                    len(by[NO_TISSUE]), tuple((by[FAILED] + by[NO_TISSUE])[:3])))
    runs = [RunStatus(str(run.dir.relative_to(layout.root)), len(finished_folds(run)), run.summary.is_file())
            for run in layout.runs()]
    return WorkspaceStatus(str(layout.root), outputs, runs)
