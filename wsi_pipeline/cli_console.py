"""What the CLI shows: one console, one-line errors, progress bars and outcome summaries.

Kept apart from `cli.py` so the command functions read as parse → stage → render.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    """One line, no traceback: the file and what to do are in `message` (printed as is: a `[...]` in it is
    text, not console markup)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one-line messages with exit code 2."""
    from wsi_pipeline.errors import UserError, one_line

    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        fail(one_line(exc))


@contextmanager
def slide_progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[Any], None]]:
    """An overall slides bar; yields the per-slide callback the stages call when a slide finishes."""
    if quiet:
        def log(outcome: Any) -> None:
            console.print(escape(f"{outcome.slide_id}: {outcome.status} {outcome.error}".rstrip()), highlight=False)
        yield log
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task(label, total=total)

    def advance(outcome: Any) -> None:  # the bar appears with the first slide, so an early error prints alone
        if not progress.live.is_started:
            progress.start()
        if outcome.error:
            progress.console.print(f"[red]{escape(outcome.slide_id)}[/]: {escape(outcome.error)}", highlight=False)
        progress.advance(task)

    try:
        yield advance
    finally:
        progress.stop()


@contextmanager
def patch_progress(quiet: bool) -> Iterator[tuple[Callable[[Any], None], Callable[[str, int, int], None]]]:
    """Slides done + a per-slide patches bar with patches/s (extraction is where time goes)."""
    if quiet:
        with slide_progress(0, "", True) as log:
            yield log, lambda slide_id, done, total: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        current: dict[str, Any] = {}

        def slides() -> Any:  # created on the first event, so an early error prints no empty bar
            if "slides" not in current:
                current["slides"] = progress.add_task("slides", total=None, rate="")
            return current["slides"]

        def on_patches(slide_id: str, done: int, total: int) -> None:
            slides()
            if current.get("id") != slide_id:
                if "task" in current:
                    progress.remove_task(current["task"])
                current.update(id=slide_id, task=progress.add_task(slide_id, total=total, rate=""),
                               start=time.perf_counter())
            rate = done / max(time.perf_counter() - current["start"], 1e-9)
            progress.update(current["task"], completed=done, rate=f"{rate:6.1f} patches/s")

        def on_done(outcome: Any) -> None:
            if outcome.error:
                progress.console.print(f"[red]{escape(outcome.slide_id)}[/]: {escape(outcome.error)}",
                                       highlight=False)
            progress.advance(slides())
        yield on_done, on_patches


def report_outcomes(outcomes: list[Any], out_dir: Path) -> None:
    """Summary line per status; exit 1 when any slide failed (docs/design.md §1)."""
    from wsi_pipeline.workspace.layout import MANIFEST
    from wsi_pipeline.workspace.manifest import FAILURES

    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    console.print(escape(f"{summary} → {out_dir}"), highlight=False)
    failed = [o for o in outcomes if o.status in FAILURES]
    if failed:  # names and paths printed as text: a `[...]` in them is not console markup
        console.print(f"[red]{len(failed)} slide(s) failed[/]: " + escape(", ".join(o.slide_id for o in failed) +
                      f" (reasons in {out_dir / MANIFEST})"), highlight=False)
        raise typer.Exit(1)




def report_findings(findings: list[Any]) -> None:
    """`wsip doctor`'s findings as one table (stdout); exit 1 when any failed."""
    from rich.table import Table

    colours = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}
    table = Table(title="wsip doctor", show_lines=False)
    for col in ("", "check", "result", "status"):
        table.add_column(col)
    section = None
    for f in findings:
        table.add_row(f.section if f.section != section else "", f.name, f.value,
                      f"[{colours.get(f.status, 'white')}]{f.status}[/]")
        section = f.section
    out_console.print(table)
    failed = [f for f in findings if f.status == "fail"]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/]: " + ", ".join(f.name for f in failed), highlight=False)
        raise typer.Exit(1)


def report_written(kind: str, written: list[Path], failed: dict[str, str], out_dir: Path) -> None:
    """`N <kind> files → folder`, then one line per slide that could not be written (exit 1)."""
    console.print(escape(f"{len(written)} {kind} file(s) → {out_dir}"), highlight=False)
    for slide_id, reason in failed.items():
        console.print(f"[red]{escape(slide_id)}[/]: {escape(reason)}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def metrics_table(title: str, evaluation: dict[str, Any]) -> Any:
    """A cohort's metrics with 95% CIs (docs/evaluation.md), slides and patients side by side."""
    from rich.table import Table

    from wsi_pipeline.evaluation.text import NAMES, ordered, value_ci

    slide, patient = evaluation["slide"], evaluation["patient"]
    table = Table(title=title)
    table.add_column("metric")
    table.add_column(f"slides (n={slide['n']}) · 95% CI")
    by_patient = "metrics" in patient
    if by_patient:
        table.add_column(f"patients (n={patient['n']}) · 95% CI")
    for name, entry in ordered(slide["metrics"]):
        table.add_row(NAMES[name], value_ci(entry, reason=False),
                      *([value_ci(patient["metrics"][name], reason=False)] if by_patient else []))
    if "auc_delong" in slide:
        table.add_row("AUC, DeLong CI", value_ci(slide["auc_delong"]),
                      *([value_ci(patient.get("auc_delong"))] if by_patient else []))
    table.add_row("calibration (ECE)", f"{slide['calibration']['ece']:.3f}",
                  *([f"{patient['calibration']['ece']:.3f}"] if by_patient else []))
    return table
