"""Metrics with CIs as people read them, the same in the terminal, `report.md` and the HTML report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "f1": "F1",
         "sensitivity": "sensitivity", "specificity": "specificity", "average_precision": "average precision"}


def ordered(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The metrics in reading order (AUC first), whatever order a JSON file stored them in."""
    return [(k, metrics[k]) for k in NAMES if k in metrics]


def value_ci(entry: Mapping[str, Any] | None, *, reason: bool = True) -> str:
    """"0.812 (0.750–0.870)", or the plain reason a value is undefined (`reason=False`: "undefined")."""
    if not entry or entry.get("value") is None:
        return (entry or {}).get("reason", "undefined") if reason else "undefined"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def pooled_auc_line(evaluation: Mapping[str, Any]) -> str:
    """One sentence: the pooled out-of-fold AUC with its CI (and the Youden threshold when recorded)."""
    slide = evaluation["pooled_out_of_fold"]["slide"]
    text = (f"Pooled out-of-fold AUC {value_ci(slide['metrics']['auc'])} over {slide['n']} slides of "
            f"{slide['n_patients']} patients (95% CI, patient-stratified bootstrap)")
    youden = evaluation.get("youden", {}).get("threshold")
    return text + (f"; Youden threshold {youden:.3f} (picked on the validation folds)." if youden is not None
                   else ".")


def undefined_notes(level: Mapping[str, Any]) -> list[str]:
    """"AUC, average precision: undefined: <why>", one line per distinct reason, and the few-patients caution:
    a table's footnotes."""
    by_reason: dict[str, list[str]] = {}
    for name, entry in ordered(level["metrics"]):
        if entry.get("value") is None:
            by_reason.setdefault(entry.get("reason", "undefined"), []).append(NAMES[name])
    return [f"{', '.join(names)}: {why}" for why, names in by_reason.items()] + (
        [f"caution: {level['caution']}"] if level.get("caution") else [])
