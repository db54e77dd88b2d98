"""`wsip export …`: results written for other tools (QuPath GeoJSON, STAMP features)."""

from __future__ import annotations

from typing import Annotated

import typer

from wsi_pipeline.cli_console import console, out_console, report_written, user_errors
from wsi_pipeline.cli_options import OutOpt

export_app = typer.Typer(no_args_is_help=True, help="Results for other tools: QuPath GeoJSON, STAMP features.")


@export_app.command("geojson")
def export_geojson(
    out: OutOpt = None,
    run: Annotated[str | None, typer.Option("--run", help="A run's predicted slides (tiles with attention).")
                   ] = None,
    patches: Annotated[str | None, typer.Option("--patches", help="Else a cohort patch config.")] = None,
) -> None:
    """Per slide, tissue outlines (with holes) + one tile per patch, level-0 px, as QuPath imports them.

    With --run, tiles carry the measurements `attention` and `attention_rank` and the predicted class
    (→ predictions/<run>/<slide_id>.geojson); else → patches/<config>/geojson/<slide_id>.geojson.
    """
    from wsi_pipeline.stages.export import GeoJSONParams
    from wsi_pipeline.stages.export import export_geojson as export

    with user_errors():
        result = export(GeoJSONParams(run=run, patches=patches), out=out)
    report_written("GeoJSON", result.written, result.failed, result.out_dir)


@export_app.command("stamp")
def export_stamp(
    out: OutOpt = None,
    patches: Annotated[str | None, typer.Option("--patches", help="Patch config (when there are several).")] = None,
    features: Annotated[str | None, typer.Option("--features", help="Feature set, e.g. uni (when several).")] = None,
) -> None:
    """A feature set in STAMP's layout (feats, coords in µm, tile_size_um) → features/<config>/<set>/stamp/."""
    from wsi_pipeline.stages.export_features import ExportFeaturesParams, export_features

    with user_errors():
        result = export_features(ExportFeaturesParams("stamp", patches=patches, features=features), out=out)
    console.print(f"{len(result.written)} STAMP feature files →", highlight=False)
    out_console.print(str(result.out_dir), highlight=False, soft_wrap=True)
