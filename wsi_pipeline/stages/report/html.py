"""The report page: one HTML file, every image embedded, no script, no network (docs/report.md).

Sections, always present and in this order (an empty one says which command fills it): overview, cohort
(a table per stage output, failures first), QC gallery (failures first), runs (config, split sizes, per-fold
test metrics with mean ± std, learning curves, ROC, confusion matrix), evaluation (metrics with 95% CIs, curves
with bootstrap bands, calibration, comparisons; docs/evaluation.md), predictions (heatmap gallery).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from wsi_pipeline.stages.report import plots
from wsi_pipeline.stages.report.collect import PredictionItem, QCItem, RunRecord, StageTable
from wsi_pipeline.stages.report.media import svg_uri, thumbnail_uri
from wsi_pipeline.workspace.manifest import DONE, FAILED, NO_TISSUE

SECTIONS = ("overview", "cohort", "qc", "runs", "evaluation", "predictions")
_TITLES = {"overview": "Overview", "cohort": "Cohort", "qc": "QC gallery", "runs": "Runs",
           "evaluation": "Evaluation (95% CIs)", "predictions": "Predictions"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header{background:#1d2b3a;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c8d3de;font-size:12px}nav a{color:#fff;margin-right:14px}
main{padding:8px 24px 40px;max-width:1400px}section{margin-top:22px}h2{border-bottom:2px solid #d5dbe1}
table{border-collapse:collapse;background:#fff;font-size:12px}th,td{padding:3px 8px;border-bottom:1px solid #e3e7eb;
text-align:left;vertical-align:top}th{background:#eef1f4;position:sticky;top:0}td.num{text-align:right}
.scroll{max-height:22em;overflow:auto;border:1px solid #d5dbe1;display:inline-block;max-width:100%}
.badge{border-radius:3px;padding:0 5px;font-size:11px;color:#fff;background:#5b6b7a}
.done{background:#2e7d32}.failed{background:#c62828}.no_tissue{background:#ef6c00}
.gallery{display:flex;flex-wrap:wrap;gap:10px;max-height:70em;overflow:auto}
figure{margin:0;background:#fff;border:1px solid #d5dbe1;padding:6px}
figure.bad{border-color:#c62828}figcaption{font-size:11px;word-break:break-word}
.missing{display:flex;align-items:center;justify-content:center;background:#fbe9e7;color:#b71c1c;font-size:11px;
padding:6px;box-sizing:border-box}.err{color:#b71c1c}pre{background:#fff;border:1px solid #d5dbe1;padding:8px;
font-size:12px;overflow:auto;max-height:24em}.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin-top:12px}
.plots img{background:#fff;border:1px solid #d5dbe1}.note{color:#5b6b7a}
"""


def page(*, title: str, meta: str, parts: dict[str, str]) -> str:
    """The whole document; `parts` holds each section's body by id."""
    nav = "".join(f'<a href="#{s}">{_TITLES[s]}</a>' for s in SECTIONS)
    body = "".join(f'<section id="{s}"><h2>{_TITLES[s]}</h2>{parts[s]}</section>' for s in SECTIONS)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>'
            f'<body><header><h1>{escape(title)}</h1><p>{escape(meta)}</p><nav>{nav}</nav></header>'
            f"<main>{body}</main></body></html>\n")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, scroll: bool = False) -> str:
    """Cells are HTML already (escape text with `cell`)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    html = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{html}</div>' if scroll else html


def cell(value: object) -> str:
    return escape(str(value))


def badge(status: str) -> str:
    return f'<span class="badge {escape(status)}">{escape(status)}</span>'


def number(value: object, digits: int = 3) -> str:
    """A metric as text: NaN (e.g. AUC of a one-class test fold) shows as 'n/a'."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return cell(value)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def empty(text: str) -> str:
    return f'<p class="note">{text}</p>'


# ------------------------------------------------------------------------------------------------- sections
def overview(rows: Sequence[tuple[str, str]]) -> str:
    return table(("", ""), ((cell(k), cell(v)) for k, v in rows))


def cohort(tables: Sequence[StageTable]) -> str:
    if not tables:
        return empty("No stage has run yet: <code>wsip patch SLIDES...</code>")
    parts = []
    for t in tables:
        counts = ", ".join(f"{t.count(s)} {s}" for s in (DONE, FAILED, NO_TISSUE) if t.count(s))
        rows = ([_manifest_cell(c, r.get(c, "")) for c in t.columns] for r in t.rows)
        parts.append(f"<h3>{cell(t.name)}</h3><p>{len(t.rows)} slides: {counts or 'none'}</p>"
                     + table(t.columns, rows, scroll=True))
    return "".join(parts)


def _manifest_cell(column: str, value: str) -> str:
    if column == "status":
        return badge(value)
    return f'<span class="err">{cell(value)}</span>' if column == "error" else cell(value)


def qc_gallery(galleries: Sequence[tuple[str, Sequence[QCItem]]], max_side: int) -> str:
    if not galleries:
        return empty("No QC images yet: <code>wsip patch SLIDES...</code> draws them.")
    parts = []
    for name, items in galleries:
        figures = []
        for item in items:
            caption = f"<b>{cell(item.slide_id)}</b> {badge(item.status)} {cell(item.n_patches or 0)} patches"
            if item.error:
                caption += f'<br><span class="err">{cell(item.error)}</span>'
            figures.append(_figure(item.image, max_side, caption, bad=item.status in (FAILED, NO_TISSUE),
                                   alt=f"QC of {item.slide_id}"))
        parts.append(f"<h3>{cell(name)}</h3><p>{len(items)} slides, failures first. Green: tissue outline, blue: "
                     f'holes, yellow: patches.</p><div class="gallery">{"".join(figures)}</div>')
    return "".join(parts)


def runs(records: Sequence[RunRecord]) -> str:
    if not records:
        return empty("No training run yet: <code>wsip train --cfg CONFIG.yaml</code>")
    return "".join(_run(r) for r in records)


def _run(run: RunRecord) -> str:
    splits = table(("fold", "train", "val", "test"),
                   ((cell(k), *(cell(v.get(s, 0)) for s in ("train", "val", "test"))) for k, v in run.split_sizes))
    parts = [f'<article id="run-{escape(run.name)}"><h3>run {cell(run.name)}</h3>',
             f"<details open><summary>config.yaml</summary><pre>{cell(run.config_yaml)}</pre></details>",
             f"<h4>Split sizes (slides)</h4>{splits}"]
    if not run.folds:
        parts.append(empty("No fold has finished yet."))
        return "".join(parts) + "</article>"
    names = run.metric_names
    rows = [[cell(f.fold), _selected_epoch(f.metrics), *(number(f.metrics["test"].get(m)) for m in names)]
            for f in run.folds]
    if run.summary:
        rows.append(["<b>mean ± std</b>", "",
                     *(f"{number(run.summary[m][0])} ± {number(run.summary[m][1])}" for m in names)])
    parts.append("<h4>Test metrics per fold (selected epoch)</h4>" + table(("fold", "epoch", *names), rows))
    if not run.summary:
        parts.append(empty("Training is not finished: mean ± std appear once <code>summary.csv</code> exists."))
    if any(f.metrics.get("selection") == "last_epoch" for f in run.folds):
        parts.append(empty("* no epoch was eligible for selection: the last epoch was used."))
    images = [(plots.learning_curves(run.folds), "learning curves")]
    if run.classes:
        images += [(plots.roc_curves(run.folds, run.classes), "ROC curves"),
                   (plots.confusion_matrix(run.folds, run.classes), "confusion matrix")]
    plot_html = "".join(f'<img src="{svg_uri(svg)}" alt="{alt}">' for svg, alt in images if svg is not None)
    return "".join(parts) + f'<div class="plots">{plot_html}</div></article>'


def _selected_epoch(metrics: dict) -> str:
    """The selected epoch; `*` when none was eligible and the last one was taken."""
    return cell(metrics.get("selected_epoch", "")) + ("*" if metrics.get("selection") == "last_epoch" else "")


def predictions(sets: Sequence[tuple[str, Sequence[PredictionItem]]], root: Path, max_side: int) -> str:
    if not sets:
        return empty("No predictions yet: <code>wsip predict SLIDES... --run NAME</code>")
    parts = []
    for run_name, items in sets:
        figures = []
        for item in items:
            record = item.record
            probs = " · ".join(f"{cell(c)} {number(p, 2)}" for c, p in record.get("probabilities", {}).items())
            caption = (f"<b>{cell(item.slide_id)}</b>: {cell(record.get('predicted', '?'))}<br>{probs}<br>"
                       f"{cell(record.get('n_patches', '?'))} patches")
            if item.viewer is not None:
                caption += f'<br><a href="{escape(item.viewer.relative_to(root).as_posix())}">zoomable viewer</a>'
            if record.get("note"):
                caption += f'<br><span class="note">{cell(record["note"])}</span>'
            figures.append(_figure(item.heatmap, max_side, caption, bad=False, alt=f"heatmap of {item.slide_id}"))
        parts.append(f"<h3>run {cell(run_name)}</h3><p>{len(items)} slides. Attention heatmaps: per-slide "
                     f'percentile of each patch\'s attention, blue (low) to red (high).</p>'
                     f'<div class="gallery">{"".join(figures)}</div>')
    return "".join(parts)


def _figure(image: Path | None, max_side: int, caption: str, *, bad: bool, alt: str) -> str:
    """A thumbnail with its caption; a placeholder box when there is no (readable) image."""
    picture = None
    if image is not None:
        try:
            uri, (w, h) = thumbnail_uri(image, max_side)
            picture = f'<img src="{uri}" width="{w}" height="{h}" alt="{escape(alt)}">'
        except OSError:
            picture = None
    if picture is None:
        why = "image unreadable" if image is not None else "no image"
        picture = f'<div class="missing" style="width:{max_side}px;height:{max_side * 3 // 4}px">{why}</div>'
    css = ' class="bad"' if bad else ""
    return f'<figure{css} style="width:{max_side}px">{picture}<figcaption>{caption}</figcaption></figure>'
