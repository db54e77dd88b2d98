"""`make demo`: the whole pipeline on a generated cohort, as a user would run it, timed.

1. generate 40 procedural H&E slides in two classes (tumour slides carry three small lesions of dense,
   enlarged nuclei, written as GeoJSON ground truth) + labels.csv + a held-out tumour slide;
2. `wsip patch` → `wsip extract --encoder resnet18` (pretrained weights when they can be had, else
   `--weights random`, said plainly) → `wsip train` twice on the same splits: GMMamba (examples/demo.yaml) and
   ABMIL → `wsip predict` of the held-out slide with both runs, scoring attention on its lesions →
   `wsip predict --labels` of a small external cohort (8 more labelled slides, another seed) with both runs →
   `wsip compare` of the two runs on it → `wsip report`;
3. a final table: held-out folds' balanced accuracy and AUC, the held-out slide's prediction, the share
   of its 10 most-attended patches that lie on a lesion, and the external cohort's AUC and balanced accuracy
   with 95% CIs, GMMamba next to ABMIL.

`--small` runs a 10-slide, 2-fold, 3-epoch version (the test suite runs it so the demo cannot rot).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from wsi_pipeline.evaluation.text import value_ci
from wsi_pipeline.testing.synthetic import make_demo_cohort

HERE = Path(__file__).resolve().parent
FULL = {"n_slides": 40, "size": (2560, 3584), "hotspots": 3, "hotspot_radius": 220}
SMALL = {"n_slides": 10, "size": (1024, 1536), "hotspots": 3, "hotspot_radius": 160}
EXTERNAL = {"full": 8, "small": 4}  # labelled slides of the external cohort (docs/evaluation.md)


def wsip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a wsip command exactly as a user would type it (echoed first)."""
    print(f"\n$ wsip {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", *args], stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        sys.exit(f"demo failed at `wsip {' '.join(args)}` (exit {proc.returncode})")
    return proc


def extract_features(out: Path, quiet: list[str]) -> str:
    """The feature set's name: pretrained ResNet18 when its weights can be had, else random weights."""
    extract = wsip("extract", "--encoder", "resnet18", "--out", str(out), *quiet, check=False)
    if extract.returncode == 2 and "--weights" in extract.stderr:
        print("\n>>> ImageNet ResNet18 weights cannot be downloaded here (no internet): the demo continues with\n"
              ">>> RANDOM encoder weights (`--weights random`). Features are then random projections of the\n"
              ">>> pixels; with real weights (pass --weights PATH or run online) they are the paper's.", flush=True)
        wsip("extract", "--encoder", "resnet18", "--weights", "random", "--out", str(out), *quiet)
        return "resnet18_random"
    if extract.returncode != 0:
        sys.exit(f"demo failed at `wsip extract` (exit {extract.returncode})")
    return "resnet18"


def write_configs(out: Path, feature_set: str, small: bool) -> dict[str, Path]:
    """examples/demo.yaml for GMMamba, and the same experiment with ABMIL (same splits, budget and seed)."""
    config = yaml.safe_load((HERE / "demo.yaml").read_text())
    config["data"]["features"] = str(out / "features" / "20x_256px_0px" / feature_set)
    config["data"]["labels"] = str(out / "labels.csv")
    config["out"] = str(out)
    if small:
        config["splits"].update(folds=2, val_fraction=0.5)  # 8 patients: 2 test, 1 val, 1 train per class
        config["optim"].update(epochs=3, select_after=0, min_epochs=1)
    paths = {}
    for name, model in (("demo_gmmamba", config["model"]), ("demo_abmil", {"name": "abmil"})):
        paths[name] = out / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**config, "name": name, "model": model}, sort_keys=False))
    return paths


def summary_row(out: Path, run: str) -> list[str]:
    """The run's held-out folds (mean ± std), its prediction of the held-out slide, its external AUC (95% CI)."""
    lines = (out / "runs" / run / "summary.csv").read_text().splitlines()
    summary = {r["fold"]: r for r in csv.DictReader(lines)}
    record = json.loads((out / "predictions" / run / "holdout.json").read_text())
    cell = "{:.2f} ± {:.2f}".format
    metric = {k: cell(float(summary["mean"][k]), float(summary["std"][k])) for k in ("balanced_accuracy", "auc")}
    p = record["probabilities"]["tumour"]
    on_lesion = record.get("top10_on_annotation")
    external = json.loads((out / "predictions" / run / "metrics.json").read_text())["slide"]["metrics"]
    return [run.removeprefix("demo_"), metric["balanced_accuracy"], metric["auc"],
            f"{record['predicted']} (p={p:.2f})", "–" if on_lesion is None else f"{on_lesion:.0%}",
            value_ci(external["auc"]), value_ci(external["balanced_accuracy"])]


def print_table(rows: list[list[str]]) -> None:
    header = ["model", "held-out folds: bal. acc.", "AUC", "held-out slide (a tumour)", "top-10 attention on lesions",
              "external: AUC (95% CI)", "bal. acc. (95% CI)"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="demo workspace (default ./demo_out)")
    parser.add_argument("--small", action="store_true", help="a tiny cohort and budget (tests)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out).resolve()
    cohort = SMALL if args.small else FULL
    print(f"generating {cohort['n_slides']} demo slides + 1 held-out slide in {out / 'slides'} …", flush=True)
    make_demo_cohort(out / "slides", **cohort, workers=os.cpu_count() or 1)
    n_external = EXTERNAL["small" if args.small else "full"]
    print(f"generating an external cohort of {n_external} labelled slides in {out / 'external' / 'slides'} …",
          flush=True)
    external = make_demo_cohort(out / "external" / "slides", **{**cohort, "n_slides": n_external}, seed=1,
                                prefix="ext", workers=os.cpu_count() or 1)
    quiet = ["--quiet"] if args.small else []
    wsip("patch", str(out / "slides"), "--out", str(out), "--workers", "2", *quiet)
    configs = write_configs(out, extract_features(out, quiet), args.small)
    rows = []
    for name, cfg in configs.items():
        wsip("train", "--cfg", str(cfg), *quiet)
        wsip("predict", str(out / "holdout.svs"), "--run", name, "--annotations", str(out / "annotations"),
             "--out", str(out))
        wsip("predict", str(out / "external" / "slides"), "--run", name, "--labels", str(external), "--no-heatmap",
             "--out", str(out))
        rows.append(summary_row(out, name))
    wsip("compare", "demo_abmil", "demo_gmmamba", "--on", "predictions", "--out", str(out))  # Δ = GMMamba − ABMIL
    wsip("report", "--out", str(out))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s (workspace: {out})\n")
    print_table(rows)
    print(f"\nreport: {out / 'report.html'} · heatmaps: {out / 'predictions'}/<run>/holdout_heatmap.png")


if __name__ == "__main__":
    main()
