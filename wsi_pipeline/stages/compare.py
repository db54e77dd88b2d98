"""`wsip compare RUN_A RUN_B`: two models paired on the same slides (docs/evaluation.md §6).

`on="predictions"`: both runs' latest labelled `wsip predict` cohort (`predictions/<run>/predictions.csv`);
`on="cv"`: both runs' pooled out-of-fold test predictions (`runs/<run>/oof_predictions.csv`), which pair only
when the two runs were trained on the same splits. Runs that did not see the same slides with the same labels
(or, for CV, the same splits) are refused with one line: an unpaired difference is not what this command
reports. Result: ΔAUC (B − A) with DeLong's paired test and a paired bootstrap CI, Δ balanced accuracy with
McNemar's exact test → `comparisons/<a>__vs__<b>_<on>.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import InputError, UserError, name_some
from wsi_pipeline.evaluation import Cohort, compare_paired
from wsi_pipeline.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from wsi_pipeline.stages.cohort_table import read_cohort
from wsi_pipeline.workspace.files import storage_errors, write_json_if_changed
from wsi_pipeline.workspace.layout import Layout

__all__ = ["CompareParams", "CompareResult", "compare"]
ON = ("predictions", "cv")


@dataclass(frozen=True)
class CompareParams:
    run_a: str
    run_b: str
    on: str = "predictions"  # predictions (the latest labelled `wsip predict` cohort) | cv (pooled out-of-fold)
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED


@dataclass(frozen=True)
class CompareResult:
    path: Path  # comparisons/<a>__vs__<b>_<on>.json
    comparison: dict[str, Any]


def compare(params: CompareParams, *, out: str | Path | None = None) -> CompareResult:
    """Compare two runs on the same slides; callable from Python exactly as `wsip compare`."""
    if params.on not in ON:
        raise InputError(f"--on {params.on}: choose predictions or cv")
    if params.run_a == params.run_b:
        raise InputError(f"{params.run_a}: compare two different runs")
    layout = Layout.at(out)
    (a, threshold_a, source_a), (b, threshold_b, source_b) = (_cohort(layout, r, params.on)
                                                            for r in (params.run_a, params.run_b))
    if params.on == "cv":
        _check_same_splits(layout, params.run_a, params.run_b)
    b = _paired(a, b, params.run_a, params.run_b)
    result = compare_paired(a.y, a.probs, b.probs, a.case_ids, a.classes, thresholds=(threshold_a, threshold_b),
                            n_resamples=params.n_resamples, seed=params.seed)
    record = {"run_a": params.run_a, "run_b": params.run_b, "on": params.on, "delta": "B − A",
              "thresholds": [threshold_a, threshold_b], "sources": [source_a, source_b], **result}
    path = layout.comparison(params.run_a, params.run_b, params.on)
    with storage_errors(layout.root):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_if_changed(path, record)
    return CompareResult(path, record)


def _cohort(layout: Layout, run: str, on: str) -> tuple[Cohort, float, str]:
    """(the run's labelled cohort, its decision threshold, the file it came from)."""
    if on == "cv":
        path = layout.run(run).oof_predictions
        if not path.is_file():
            raise UserError(f"{path}: no pooled out-of-fold predictions for run {run!r}; train it with "
                            "`wsip train` (this version) first")
        return read_cohort(path), 0.5, str(path)
    predictions = layout.predictions(run)
    if not predictions.table.is_file() or not predictions.metrics.is_file():
        raise UserError(f"{predictions.dir}: run {run!r} has no labelled predictions; run `wsip predict SLIDES "
                        f"--run {run} --labels labels.csv` first")
    threshold = json.loads(predictions.metrics.read_text()).get("threshold", {}).get("value")
    return read_cohort(predictions.table), 0.5 if threshold is None else float(threshold), str(predictions.table)


def _paired(a: Cohort, b: Cohort, name_a: str, name_b: str) -> Cohort:
    """`b` in `a`'s slide order, after checking both hold the same slides, labels and classes."""
    if a.classes != b.classes:
        raise UserError(f"runs {name_a} and {name_b} have different classes ({', '.join(a.classes)} vs "
                        f"{', '.join(b.classes)}); compare runs of one task")
    only = sorted(set(a.slide_ids) ^ set(b.slide_ids))
    if only:
        raise UserError(f"runs {name_a} and {name_b} did not see the same slides ({len(only)} differ: "
                        f"{name_some(only)}); a paired comparison needs both to predict the same labelled slides")
    order = {sid: i for i, sid in enumerate(b.slide_ids)}
    index = np.array([order[sid] for sid in a.slide_ids])
    relabelled = [sid for sid, i, y in zip(a.slide_ids, index, a.y, strict=True) if b.y[i] != y]
    if relabelled:
        raise UserError(f"runs {name_a} and {name_b} label some slides differently: {name_some(relabelled)}; "
                        "predict both with the same labels")
    return Cohort(a.slide_ids, a.case_ids, a.y, b.probs[index], a.classes)


def _check_same_splits(layout: Layout, name_a: str, name_b: str) -> None:
    paths = [layout.run(n).splits for n in (name_a, name_b)]
    texts = [p.read_text() if p.is_file() else None for p in paths]
    if texts[0] is None or texts[0] != texts[1]:
        raise UserError(f"{paths[1]}: runs {name_a} and {name_b} were not trained on the same splits; compare "
                        "them with --on predictions on one labelled cohort, or train both on one splits file")
