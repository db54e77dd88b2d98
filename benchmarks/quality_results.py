"""`bench_quality.py`'s results: the per-run CSV that makes a benchmark resumable, the text table, and the
paired comparison with a reference model on the same (seed, fold)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

CSV_FIELDS = ["key", "task", "spec", "seed", "fold", "auc", "balanced_accuracy", "seconds", "epochs_run",
              "selected_epoch", "n_train", "n_val", "n_test", "train_loss", "val_auc"]


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def print_table(
    records: list[dict[str, Any]], tasks: list[str], specs: list[str], header: str, described: dict[str, str]
) -> None:
    """Per task and model: test AUC and balanced accuracy (mean ± sd), seconds per run, epochs, training loss."""
    print(header)
    for task in tasks:
        print(f"  task {task}: {described.get(task, 'real slides (features + labels)')}")
    width = max(12, *(len(s) for s in specs))
    print(f"{'task':4s}  {'model':{width}s}  {'test AUC':>15s}  {'bal. accuracy':>15s}  {'s/run':>7s}  runs  "
          f"{'ep':>4s}  train loss (first -> last epoch, mean)")
    for task in tasks:
        for spec in specs:
            rows = [r for r in records if r["task"] == task and r["spec"] == spec]
            if not rows:
                continue
            aucs = [r["auc"] for r in rows]
            bas = [r["balanced_accuracy"] for r in rows]
            secs = float(np.mean([r["seconds"] for r in rows]))
            first = np.mean([r["train_loss"][0] for r in rows])
            last = np.mean([r["train_loss"][-1] for r in rows])
            epochs = np.mean([r["epochs_run"] for r in rows])
            print(f"{task:4s}  {spec:{width}s}  {fmt(aucs):>15s}  {fmt(bas):>15s}  {secs:7.0f}  {len(rows):4d}  "
                  f"{epochs:4.1f}  {first:.3g} -> {last:.3g}")


def paired_table(records: list[dict[str, Any]], tasks: list[str], specs: list[str], reference: str) -> None:
    """Each model's test AUC minus the reference's on the same (seed, fold): mean, std and the 95% t-interval
    of the paired differences (a run's split and seed are shared, so the split's difficulty cancels)."""
    from scipy import stats

    print(f"paired AUC difference to {reference} (same seed and fold): mean [95% CI], runs")
    for task in tasks:
        ref = {(r["seed"], r["fold"]): r["auc"] for r in records if r["task"] == task and r["spec"] == reference}
        for spec in specs:
            if spec == reference:
                continue
            diffs = [r["auc"] - ref[(r["seed"], r["fold"])] for r in records
                     if r["task"] == task and r["spec"] == spec and (r["seed"], r["fold"]) in ref]
            if not diffs:
                continue
            mean = float(np.mean(diffs))
            half = float(stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(diffs))) \
                if len(diffs) > 1 else float("nan")
            verdict = "within 0.03" if mean + half >= -0.03 else "below"
            print(f"{task:4s}  {spec:28s}  {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]  "
                  f"sd {np.std(diffs, ddof=1) if len(diffs) > 1 else 0:.3f}  {len(diffs):2d}  {verdict}")


def load_csv(path: Path) -> dict[str, dict[str, Any]]:
    """Finished runs of a `--resume` CSV by key (list columns are JSON)."""
    import csv

    if not path.is_file():
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            record: dict[str, Any] = {**json.loads(row["key"]), **row}
            for name in ("auc", "balanced_accuracy", "seconds"):
                record[name] = float(row[name])
            for name in ("epochs_run", "selected_epoch", "n_train", "n_val", "n_test"):
                record[name] = int(row[name])
            record["train_loss"], record["val_auc"] = json.loads(row["train_loss"]), json.loads(row["val_auc"])
            out[row["key"]] = record
    return out


def append_csv(path: Path, record: dict[str, Any]) -> None:
    """One finished run appended as one CSV row (header written with the first)."""
    import csv

    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: json.dumps(record[k]) if k in ("train_loss", "val_auc") else record[k]
                         for k in CSV_FIELDS})
