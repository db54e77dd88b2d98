"""`make demo`: the whole pipeline on a generated cohort, as a user would run it, timed.

1. generate ~16 procedural H&E slides in two classes (+ labels.csv, + a held-out slide);
2. `wsip patch` → `wsip extract --encoder resnet18` (pretrained weights when they can be had, else
   `--weights random`, said plainly) → `wsip train --cfg` (GMMamba, small budget) → `wsip predict`.

`--small` runs a 10-slide, 2-fold, 3-epoch version (the test suite runs it so the demo cannot rot).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from wsi_pipeline.testing.synthetic import make_demo_cohort

HERE = Path(__file__).resolve().parent


def wsip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a wsip command exactly as a user would type it (echoed first)."""
    print(f"\n$ wsip {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", *args], stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        sys.exit(f"demo failed at `wsip {' '.join(args)}` (exit {proc.returncode})")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="demo workspace (default ./demo_out)")
    parser.add_argument("--small", action="store_true", help="a tiny cohort and budget (tests)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out).resolve()
    n, size = (10, (2048, 3072)) if args.small else (16, (4096, 6144))
    print(f"generating {n} demo slides + 1 held-out slide in {out / 'slides'} …", flush=True)
    make_demo_cohort(out / "slides", n_slides=n, size=size, hotspots=3 if args.small else 5,
                     workers=os.cpu_count() or 1)
    quiet = ["--quiet"] if args.small else []
    wsip("patch", str(out / "slides"), "--out", str(out), *quiet)
    extract = wsip("extract", "--encoder", "resnet18", "--out", str(out), *quiet, check=False)
    feature_set = "resnet18"
    if extract.returncode == 2 and "--weights" in extract.stderr:
        print("\n>>> ImageNet ResNet18 weights cannot be downloaded here (no internet): the demo continues with\n"
              ">>> RANDOM encoder weights (`--weights random`). Features are then random projections of the\n"
              ">>> pixels; with real weights (pass --weights PATH or run online) they are the paper's.", flush=True)
        wsip("extract", "--encoder", "resnet18", "--weights", "random", "--out", str(out), *quiet)
        feature_set = "resnet18_random"
    elif extract.returncode != 0:
        sys.exit(f"demo failed at `wsip extract` (exit {extract.returncode})")
    config = yaml.safe_load((HERE / "demo.yaml").read_text())
    config["data"]["features"] = str(out / "features" / "20x_256px_0px" / feature_set)
    config["data"]["labels"] = str(out / "labels.csv")
    if args.small:
        config["splits"].update(folds=2, val_fraction=0.5)  # 8 patients: 2 test, 1 val, 1 train per class
        config["optim"].update(epochs=3, select_after=0, min_epochs=1)
    config["out"] = str(out)
    cfg_path = out / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    wsip("train", "--cfg", str(cfg_path), *quiet)
    wsip("predict", str(out / "holdout.svs"), "--out", str(out))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s (workspace: {out})")


if __name__ == "__main__":
    main()
