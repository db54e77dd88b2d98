"""Options several `wsip` commands share, declared once (typer reads their help from here)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

OutOpt = Annotated[Path | None, typer.Option("--out", help="Workspace folder (default $WSIP_OUT or ./wsip_out).")]
ShardOpt = Annotated[str | None, typer.Option("--shard", help="Process part i of N: 'i/N' (or Slurm array vars).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even when a finished output matches.")]
MppOpt = Annotated[float | None, typer.Option("--mpp", help="µm/px for slides that record none.")]
MppOverrideOpt = Annotated[float | None, typer.Option(
    "--mpp-override", help="µm/px replacing what every slide records (a CSV `mpp` column: per slide).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (logs, CI).")]
