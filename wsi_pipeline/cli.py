"""`wsip`: the command line. Parses, calls one stage function, renders the result. No logic lives here.

Stage modules (and torch/timm behind them) are imported inside the commands, so `wsip --help`, `wsip info`
and `wsip status` start in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wsi_pipeline.cli_console import (
    console,
    fail,
    metrics_table,
    out_console,
    patch_progress,
    report_findings,
    report_outcomes,
    slide_progress,
    user_errors,
)
from wsi_pipeline.cli_export import export_app
from wsi_pipeline.cli_options import ForceOpt, MppOpt, MppOverrideOpt, OutOpt, QuietOpt, ShardOpt

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="wsip: whole-slide images in, slide-level predictions out.")

app.add_typer(export_app, name="export")


@app.command()
def patch(
    slides: Annotated[list[Path], typer.Argument(help="Slide files, folders, or a CSV with slide_path[,mpp].")],
    out: OutOpt = None,
    mag: Annotated[float, typer.Option("--mag", help="Target magnification (20 → 0.5 µm/px, 10 → 1.0).")] = 20.0,
    patch_size: Annotated[int, typer.Option("--patch-size", help="Patch side in px at --mag.")] = 256,
    overlap: Annotated[int, typer.Option("--overlap", help="Overlap in px at --mag.")] = 0,
    min_tissue: Annotated[float, typer.Option("--min-tissue", help="Min tissue fraction per patch.")] = 0.25,
    mpp: MppOpt = None,
    mpp_override: MppOverrideOpt = None,
    allow_upsample: Annotated[bool, typer.Option("--allow-upsample", help="Allow --mag above the scan.")] = False,
    masks: Annotated[Path | None, typer.Option("--masks", help="Folder of <slide_id>.geojson|.png masks.")] = None,
    tissue: Annotated[str, typer.Option("--tissue", help="auto | brightfield | fluorescence (dark background).")
                      ] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="Slides processed in parallel.")] = 1,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Segment tissue and lay a patch grid at a physical magnification → coords h5 + QC images.

    SLIDES may be DICOM WSI: a series folder (or any .dcm file of it) is one slide, named by the folder.
    """
    from wsi_pipeline.stages import patch as patch_stage
    from wsi_pipeline.stages.inputs import resolve_inputs

    with user_errors():
        sources = resolve_inputs(slides, mpp=mpp, mpp_override=mpp_override)
        params = patch_stage.PatchParams(magnification_x=mag, patch_size_px=patch_size, overlap_px=overlap,
                                         min_tissue_fraction=min_tissue, allow_upsample=allow_upsample,
                                         segment=patch_stage.SegmentParams(tissue=tissue),
                                         masks=masks.resolve() if masks else None)
        with slide_progress(len(sources), "patching", quiet) as on_done:
            result = patch_stage.patch(sources, params, out=out, workers=workers, shard=shard, force=force,
                                       on_done=on_done)
    report_outcomes(result.outcomes, result.out_dir)


@app.command()
def extract(
    encoder: Annotated[str, typer.Option("--encoder", help="See `wsip encoders`, or timm:<name>.")] = "resnet18",
    weights: Annotated[str, typer.Option("--weights", help="pretrained | random | PATH.")] = "pretrained",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Patches per forward pass.")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="Patch-reading processes (0: main process).")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:i.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto | fp32 | fp16 | bf16.")] = "auto",
    formats: Annotated[str, typer.Option("--format", help="h5, pt or h5,pt.")] = "h5,pt",
    patches: Annotated[str | None, typer.Option("--patches", help="Patch config (e.g. 20x_256px_0px).")] = None,
    out: OutOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode every patched slide → features/<patch config>/<encoder>/{h5_files,pt_files}."""
    from wsi_pipeline.stages import extract as extract_stage

    weights_spec = weights if weights in ("pretrained", "random") else str(Path(weights).expanduser().resolve())
    params = extract_stage.ExtractParams(
        encoder=encoder, weights=weights_spec, batch_size=batch_size, workers=workers, device=device,
        precision=precision, formats=tuple(f.strip() for f in formats.split(",") if f.strip()), patches=patches)
    with user_errors(), patch_progress(quiet) as (on_done, on_patches):
        result = extract_stage.extract(params, out=out, shard=shard, force=force, on_done=on_done,
                                       on_patches=on_patches)
    report_outcomes(result.outcomes, result.out_dir)


@app.command()
def train(
    cfg: Annotated[Path, typer.Option("--cfg", help="Training config YAML (see examples/esca.yaml).")],
    out: OutOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="Override the config: auto | cpu | cuda[:i].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Delete this run's folder and start over.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Patient-level k-fold training of GMMamba (or a baseline); resumes where it stopped."""
    from wsi_pipeline.stages import train as train_stage

    params = train_stage.TrainParams(config=cfg, out=out, device=device, force=force)
    with user_errors():
        if quiet:
            result = train_stage.train(params)
        else:
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                result = train_stage.train(params, progress=progress)
    table = Table(title=f"{result.run_dir.name}: test metrics per fold (selected epoch)")
    metrics = list(result.summary)
    for col in ("fold", *metrics):
        table.add_column(col, justify="right")
    for fold in result.folds:
        test = fold.metrics.get("test") or {}
        table.add_row(str(fold.fold), *(_fmt(test.get(m)) for m in metrics))
    table.add_row("[bold]mean ± std", *(f"{m:.3f} ± {s:.3f}" for m, s in result.summary.values()))
    out_console.print(table)
    if result.evaluation:
        from wsi_pipeline.evaluation.text import pooled_auc_line

        out_console.print(pooled_auc_line(result.evaluation), highlight=False)
    console.print(escape(f"run → {result.run_dir} (report.md, summary.csv, evaluation.json)"), highlight=False)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@app.command()
def predict(
    slides: Annotated[list[Path], typer.Argument(help="Slide files, folders, or a CSV with slide_path[,mpp].")],
    run: Annotated[str | None, typer.Option("--run", help="A run name or runs/<name> folder (default: newest).")
                   ] = None,
    fold: Annotated[int | None, typer.Option("--fold", help="Use one fold's model instead of all.")] = None,
    mpp: MppOpt = None,
    mpp_override: MppOverrideOpt = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:i.")] = "auto",
    heatmap: Annotated[bool, typer.Option("--heatmap/--no-heatmap", help="Write an attention heatmap PNG.")] = True,
    annotations: Annotated[Path | None, typer.Option(
        "--annotations", help="Folder of <slide_id>.geojson regions: outlined, and attention on them scored.")] = None,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="CSV slide_id,label[,case_id]: score the cohort with 95% CIs → metrics.json.")] = None,
    threshold: Annotated[str, typer.Option(
        "--threshold", help="p(positive) cut for binary decisions, or 'youden' (the run's, from val folds).")] = "0.5",
    out: OutOpt = None,
) -> None:
    """Predict new slides end to end with a trained run → <out>/predictions/<run name>/<slide_id>.json + heatmap.

    New slides are patched and encoded like the run's training slides, in <out>/predictions/_slides/ (cached;
    the training cohort's files are never touched). With --labels (or label/case_id columns in a slides CSV),
    the cohort is scored: predictions.csv + metrics.json (metrics with 95% CIs, calibration).
    """
    from wsi_pipeline.stages import predict as predict_stage
    from wsi_pipeline.stages.inputs import resolve_inputs
    from wsi_pipeline.workspace.manifest import DONE

    with user_errors():
        sources = resolve_inputs(slides, mpp=mpp, mpp_override=mpp_override)
        params = predict_stage.PredictParams(run=run, fold=fold, device=device, heatmap=heatmap,
                                             annotations=annotations.resolve() if annotations else None,
                                             labels=labels.resolve() if labels else None,
                                             threshold=threshold if threshold == "youden" else _number(threshold))
        with console.status("patching, extracting and predicting…"):
            result = predict_stage.predict(sources, params, out=out)
    table = Table(title=f"predictions ({result.run_dir.name})")
    for col in ("slide", *result.classes, "predicted"):
        table.add_column(col)
    for p in result.predictions:
        if p.status == DONE:
            table.add_row(escape(p.slide_id), *(f"{p.probabilities[c]:.3f}" for c in result.classes),
                          escape(p.predicted))
        else:
            table.add_row(escape(p.slide_id), *("–" for _ in result.classes), f"[red]failed: {escape(p.error)}")
    out_console.print(table)
    for p in result.predictions:
        if p.status == DONE:
            console.print(escape(f"{p.slide_id}: {p.json_path}, heatmap {p.heatmap_path}, QC {p.qc_path}"),
                          highlight=False)
        if p.note:
            console.print(f"[yellow]note[/]: {escape(p.note)}", highlight=False)
    if result.cohort is not None:
        from wsi_pipeline.evaluation.text import undefined_notes

        evaluation = result.cohort.evaluation
        cut = evaluation["threshold"]
        where = f"threshold {cut['value']:.3f} ({cut['source']})" if cut["value"] is not None else cut["source"]
        out_console.print(metrics_table(f"{result.run_dir.name} on the labelled slides · {where}", evaluation))
        for note in undefined_notes(evaluation["slide"]):
            out_console.print(note, highlight=False, soft_wrap=True)
        for note in result.cohort.notes:
            console.print(f"[yellow]note[/]: {escape(note)}", highlight=False)
        console.print(escape(f"metrics → {result.cohort.metrics_path}, {result.cohort.table_path}"), highlight=False)
    if any(p.status != DONE for p in result.predictions):
        raise typer.Exit(1)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        fail(f"--threshold {text}: give a probability in (0, 1) or `youden`")


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="The first run (A).")],
    run_b: Annotated[str, typer.Argument(help="The second run (B); differences are B − A.")],
    on: Annotated[str, typer.Option("--on", help="predictions (latest labelled `wsip predict`) | cv (pooled "
                                    "out-of-fold, same splits).")] = "predictions",
    resamples: Annotated[int, typer.Option("--resamples", help="Bootstrap resamples (paired).")] = 1000,
    out: OutOpt = None,
) -> None:
    """Two runs paired on the same slides: ΔAUC (DeLong, paired bootstrap CI), Δ balanced accuracy (McNemar)."""
    from wsi_pipeline.stages.compare import CompareParams
    from wsi_pipeline.stages.compare import compare as compare_runs

    with user_errors():
        result = compare_runs(CompareParams(run_a, run_b, on=on, n_resamples=resamples), out=out)
    c = result.comparison
    table = Table(title=f"{run_b} − {run_a} on {c['n']} slides ({c['n_patients']} patients), {on}")
    for col in ("metric", run_a, run_b, "Δ (B − A) · 95% CI", "test", "p"):
        table.add_column(col)
    for name, label in (("auc", "AUC"), ("balanced_accuracy", "balanced accuracy")):
        m = c[name]
        if m.get("delta") is None:
            table.add_row(label, "", "", m.get("reason", "undefined"), "", "")
            continue
        p = "–" if m.get("p_value") is None else f"{m['p_value']:.4f}"
        table.add_row(label, f"{m['a']:.3f}", f"{m['b']:.3f}", f"{m['delta']:+.3f} ({m['ci'][0]:+.3f} to "
                      f"{m['ci'][1]:+.3f})", m.get("test") or "–", p)
    out_console.print(table)
    console.print(f"comparison → {result.path}", highlight=False)


@app.command()
def report(
    out: OutOpt = None,
    run: Annotated[str | None, typer.Option("--run", help="Only this run and its predictions.")] = None,
    thumbnail_px: Annotated[int, typer.Option("--thumbnail-px", help="Longer side of QC thumbnails.")] = 256,
) -> None:
    """One self-contained HTML page (opens offline): cohort per stage, QC gallery, runs, predictions → report.html."""
    from wsi_pipeline.stages.report import ReportParams
    from wsi_pipeline.stages.report import report as write_report

    with user_errors(), console.status("writing the report…"):
        result = write_report(ReportParams(run=run, thumbnail_px=thumbnail_px), out=out)
    console.print(f"report of {result.slides} slides ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s):",
                  highlight=False)
    out_console.print(escape(str(result.path)), highlight=False, soft_wrap=True)


@app.command()
def view(
    slide: Annotated[str, typer.Argument(help="A predicted slide: its id (file name without extension) or file.")],
    run: Annotated[str | None, typer.Option("--run", help="The run that predicted it (default: the only one).")
                   ] = None,
    full_resolution: Annotated[bool, typer.Option("--full-resolution", help="Tile down to level 0, not to the "
                                                  "patches' resolution (more tiles).")] = False,
    out: OutOpt = None,
) -> None:
    """Zoomable page of a predicted slide: Deep Zoom tiles, attention layer, patch boxes; opens from disk."""
    from wsi_pipeline.slide import is_slide_file
    from wsi_pipeline.stages.view import ViewParams
    from wsi_pipeline.stages.view import view as write_view

    slide_id = Path(slide).stem if is_slide_file(Path(slide)) else slide
    with user_errors(), console.status("tiling the slide…"):
        result = write_view(ViewParams(slide=slide_id, run=run, full_resolution=full_resolution), out=out)
    console.print(f"{result.tiles} tiles in {result.seconds:.1f} s; open in a browser:", highlight=False)
    out_console.print(result.index.as_uri(), highlight=False, soft_wrap=True)


@app.command()
def info(
    slide: Annotated[Path, typer.Argument(help="A slide file, or a DICOM WSI series folder.")],
    mpp: Annotated[float | None, typer.Option("--mpp", help="Override the slide's µm/px.")] = None,
) -> None:
    """Levels, MPP (and where it came from), magnification and vendor of a slide."""
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.units import magnification_for_mpp

    with user_errors(), Slide(slide, mpp=mpp) as s:
        mpp_info = s.mpp_info
        table = Table(title=str(slide), show_header=False)
        table.add_row("backend / vendor", f"{s.backend} / {s.vendor}")
        table.add_row("dimensions (level 0)", f"{s.dimensions[0]} × {s.dimensions[1]} px")
        table.add_row("MPP", f"{mpp_info.mpp:.4f} µm/px ({mpp_info.source})" if mpp_info else
                      "[red]not recorded[/]: pass --mpp")
        if mpp_info:
            table.add_row("magnification", f"{magnification_for_mpp(mpp_info.mpp):.1f}x")
        table.add_row("objective power", str(s.objective_power or "not recorded"))
        for i, ((w, h), ds) in enumerate(zip(s.level_dimensions, s.level_downsamples, strict=True)):
            table.add_row(f"level {i}", f"{w} × {h} px, downsample {ds:.3f}")
        out_console.print(table)


@app.command()
def status(out: OutOpt = None) -> None:
    """What is done / failed per stage in the workspace."""
    from wsi_pipeline.workspace.layout import Layout
    from wsi_pipeline.workspace.status import workspace_status

    state = workspace_status(Layout.at(out))
    if state.empty:
        console.print(f"nothing in {state.root} yet: start with `wsip patch SLIDES...`")
        return
    table = Table(title=f"workspace {state.root}")
    for col in ("stage output", "done", "failed", "no tissue", "failures (first 3)"):
        table.add_column(col)
    for output in state.outputs:
        table.add_row(escape(output.name), str(output.done), str(output.failed), str(output.no_tissue),
                      escape(", ".join(output.first_failures)))
    for run in state.runs:
        table.add_row(escape(run.name), f"{run.finished_folds} folds", "", "",
                      "summary.csv" if run.summarized else "in progress")
    out_console.print(table)


@app.command()
def encoders(
    name: Annotated[str | None, typer.Argument(help="An encoder: its full card and how to get its weights.")] = None,
) -> None:
    """Registered patch encoders: dim, parameters, input, magnification, licence, weights on this machine."""
    from wsi_pipeline.cli_encoders import card_table, encoders_table

    with user_errors():
        out_console.print(card_table(name) if name else encoders_table())


@app.command()
def doctor(
    gpu: Annotated[bool, typer.Option("--gpu", help="Also run the GPU self-check (< 60 s): CUDA vs CPU.")] = False,
) -> None:
    """Versions, devices, scan backends and cached weights; --gpu: GPU vs CPU self-check. Exit 1 on a failure."""
    from wsi_pipeline.doctor import environment_report

    findings = environment_report()
    if gpu:
        from wsi_pipeline.doctor.gpu import gpu_report

        findings += gpu_report()
    report_findings(findings)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
