"""The report's evaluation section (docs/evaluation.md): per run its pooled out-of-fold statistics, per predicted
labelled cohort its statistics, each with 95% CIs, ROC + PR curves with bootstrap bands, the reliability diagram
and the confusion matrix; then the comparisons `wsip compare` wrote. Read from evaluation.json, metrics.json
and comparisons/*.json: nothing is recomputed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsi_pipeline.evaluation.text import NAMES, ordered, undefined_notes, value_ci
from wsi_pipeline.stages.report import plots
from wsi_pipeline.stages.report.html import cell, empty, table
from wsi_pipeline.stages.report.media import svg_uri
from wsi_pipeline.workspace.layout import PredictionSet, RunDir

EMPTY = ("No statistics yet: <code>wsip train</code> records pooled out-of-fold figures, <code>wsip predict SLIDES "
         "--labels labels.csv</code> scores a labelled cohort, <code>wsip compare RUN_A RUN_B</code> pairs two runs.")


def section(runs: Sequence[RunDir], predictions: Sequence[PredictionSet], comparisons: Sequence[Path]) -> str:
    parts = [_cohort(f"run {run.name}: pooled out-of-fold (test folds)", record["pooled_out_of_fold"])
             for run in runs if (record := _read(run.evaluation)) and "pooled_out_of_fold" in record]
    parts += [_cohort(f"run {p.run_name}: labelled cohort ({record.get('labels', '')})", record)
              for p in predictions if (record := _read(p.metrics))]
    compared = [c for path in comparisons if (c := _read(path))]
    if compared:
        parts.append("<h3>Comparisons (paired, same slides)</h3>" + _comparisons(compared))
    return "".join(parts) or empty(EMPTY)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cohort(title: str, evaluation: Mapping[str, Any]) -> str:
    slide, patient = evaluation["slide"], evaluation["patient"]
    by_patient = "metrics" in patient
    header = ["metric", f"slides (n={slide['n']})", *([f"patients (n={patient['n']}, mean probability)"]
                                                       if by_patient else [])]
    rows = [[cell(NAMES[k]), cell(value_ci(v, reason=False)),
             *([cell(value_ci(patient["metrics"][k], reason=False))] if by_patient else [])]
            for k, v in ordered(slide["metrics"])]
    if "auc_delong" in slide:
        rows.append(["AUC, DeLong CI", cell(value_ci(slide["auc_delong"])),
                     *([cell(value_ci(patient.get("auc_delong")))] if by_patient else [])])
    cut = evaluation["threshold"]
    decision = (f"threshold {cut['value']:.3f} ({cut['source']})" if cut.get("value") is not None
                else cut.get("source", ""))
    boot = evaluation["bootstrap"]
    notes = [f"95% CIs: {boot['resamples']} bootstrap resamples of patients, stratified by class (seed "
             f"{boot['seed']}); decisions at {decision}.", *undefined_notes(slide)]
    if not by_patient:
        notes.append(f"patient level {patient.get('undefined', '')}")
    classes = evaluation["classes"]
    images = [(plots.confusion_counts(slide["confusion_matrix"], classes, "confusion (slides)"), "confusion matrix"),
              (plots.reliability_diagram(slide["calibration"], "reliability (slides)"), "reliability diagram")]
    if "curves" in slide:
        images.insert(0, (plots.curves_with_bands(slide["curves"], evaluation.get("positive_class", ""),
                                                  "slides, 95% bootstrap bands"), "ROC and PR curves"))
    plot_html = "".join(f'<img src="{svg_uri(svg)}" alt="{alt}">' for svg, alt in images)
    return (f"<h3>{cell(title)}</h3>{table(header, rows)}" + "".join(empty(cell(n)) for n in notes)
            + f'<div class="plots">{plot_html}</div>')


def _comparisons(records: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for c in records:
        for name in ("auc", "balanced_accuracy"):
            m = c[name]
            if m.get("delta") is None:
                rows.append([cell(f"{c['run_b']} − {c['run_a']}"), cell(c["on"]), cell(NAMES[name]), "", "",
                             cell(m.get("reason", "undefined")), "", ""])
                continue
            p = "–" if m.get("p_value") is None else f"{m['p_value']:.4f}"
            rows.append([cell(f"{c['run_b']} − {c['run_a']}"), cell(c["on"]), cell(NAMES[name]), f"{m['a']:.3f}",
                         f"{m['b']:.3f}", f"{m['delta']:+.3f} ({m['ci'][0]:+.3f} to {m['ci'][1]:+.3f})",
                         cell(m.get("test") or "–"), p])
    return table(("B − A", "on", "metric", "A", "B", "Δ (95% CI)", "test", "p"), rows)
