"""A run's `report.md` (its `summary.csv` is written by `workspace/run_store.py`).

Numbers are test metrics at each fold's selected epoch; mean ± std uses the population std (ddof=0),
see :mod:`wsi_pipeline.stages.train.metrics`. It is rewritten only when its text changes, so training
a finished run again writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsi_pipeline.evaluation.text import NAMES, ordered, pooled_auc_line, value_ci
from wsi_pipeline.stages.train.config import SplitsConfig
from wsi_pipeline.stages.train.metrics import SCALARS
from wsi_pipeline.workspace.files import write_text_if_changed


def write_report(
    path: Path,
    *,
    name: str,
    classes: Sequence[str],
    folds: Sequence[Mapping[str, Any]],
    summary: Mapping[str, tuple[float, float]],
    config_yaml: str,
    splits: str,
    evaluation: Mapping[str, Any] | None = None,
) -> None:
    """`splits` says how the folds were made (:func:`describe_splits`); `evaluation` is the run's
    evaluation.json (pooled out-of-fold metrics with CIs, docs/evaluation.md)."""
    lines = [
        f"# wsip run `{name}`",
        "",
        f"{len(folds)} {splits}.",
        _class_order_line(classes),
        "Test metrics at each fold's selected epoch (best val F1 + AUC); mean ± std over folds, "
        "population std (ddof=0).",
        "",
        "| metric | mean ± std |",
        "|---|---|",
        *(f"| {k} | {summary[k][0]:.3f} ± {summary[k][1]:.3f} |" for k in SCALARS),
        "",
        *(_pooled_section(evaluation) if evaluation else []),
        "## Per fold",
        "",
        "| fold | selected epoch | " + " | ".join(SCALARS) + " |",
        "|---" * (len(SCALARS) + 2) + "|",
        *(
            f"| {m['fold']} | {m['selected_epoch']}{_fallback_mark(m)} | "
            + " | ".join(f"{m['test'][k]:.3f}" for k in SCALARS)
            + " |"
            for m in folds
        ),
        "",
        *(
            [
                "(*) training ended before any epoch was eligible for selection (epoch > select_after): "
                "the last epoch was used.",
                "",
            ]
            if any(_fallback_mark(m) for m in folds)
            else []
        ),
        "## Config",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    write_text_if_changed(path, "\n".join(lines))


def _pooled_section(evaluation: Mapping[str, Any]) -> list[str]:
    """The pooled out-of-fold metrics with their 95% CIs, beside the mean ± std over folds."""
    metrics = evaluation["pooled_out_of_fold"]["slide"]["metrics"]
    return [pooled_auc_line(evaluation), "",
            "| metric (pooled out-of-fold) | value (95% CI) |", "|---|---|",
            *(f"| {NAMES[k]} | {value_ci(v)} |" for k, v in ordered(metrics)), ""]


def _class_order_line(classes: Sequence[str]) -> str:
    """Which class the binary metrics call positive: the second of `data.classes` (docs/gmmamba.md §9)."""
    order = ", ".join(f"`{c}`" for c in classes)
    if len(classes) != 2:
        return (f"Classes (model output order): {order}; F1, precision and recall are macro averages, AUC is "
                "the macro one-vs-rest AUC.")
    return (f"Classes (model output order): {order}. Positive class: **`{classes[1]}`** (the second entry of "
            f"`data.classes`): F1, precision and recall are for `{classes[1]}`, AUC ranks slides by p(`{classes[1]}`).")


def describe_splits(conf: SplitsConfig) -> str:
    """How the folds were made, after their count: "folds (...)" or "Monte-Carlo repeats (...)"."""
    if conf.file is not None:
        return f"folds from the splits file `{conf.file.name}`"
    if conf.mode == "monte_carlo":
        shares = "/".join(f"{100 * f:g}" for f in (conf.train, conf.val, conf.test))
        return f"Monte-Carlo repeats (patient-level, stratified, train/val/test {shares} % of patients)"
    return f"folds (patient-level stratified k-fold, {100 * conf.val_fraction:g} % of the rest for val)"


def _fallback_mark(metrics: Mapping[str, Any]) -> str:
    return " (*)" if metrics["selection"] == "last_epoch" else ""
