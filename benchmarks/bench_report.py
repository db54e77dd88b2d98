"""`wsip report` on a generated 1,000-slide workspace: time and file size against the targets (docs/report.md).

The workspace is what the stages leave behind, written directly: patch + feature manifests (2% failed, 3% no
tissue), a ~1,024 px QC jpg per slide, a 5-fold run (config, splits, per-fold log/preds/metrics, summary) and
50 predicted slides with heatmaps. Run: `.venv/bin/python benchmarks/bench_report.py [--slides N]`.
Targets: under 30 s and under 50 MB for 1,000 slides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from wsi_pipeline.stages.report import report
from wsi_pipeline.testing.synthetic import he_tissue
from wsi_pipeline.workspace.layout import Layout

TARGET_S, TARGET_MB = 30.0, 50.0
CLASSES = ("normal", "tumour")


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(v) for v in row) for row in [header, *rows]) + "\n")


def qc_pictures(n: int, rng: np.random.Generator) -> list[bytes]:
    """`n` distinct QC-like JPEGs (~1,024 px): procedural tissue with a green outline and yellow patch boxes."""
    pictures = []
    for i in range(n):
        image, _ = he_tissue((768, 1024), seed=i, nuclei_per_mpx=800)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        mask = (cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1] > 30).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, (0, 160, 0), 2)
        for x, y in rng.integers(0, 960, (40, 2)):
            cv2.rectangle(bgr, (int(x), int(y) % 700), (int(x) + 32, int(y) % 700 + 32), (0, 200, 230), 1)
        pictures.append(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    return pictures


def make_workspace(root: Path, n_slides: int, *, folds: int = 5, epochs: int = 50, predicted: int = 50) -> Layout:
    rng = np.random.default_rng(0)
    layout = Layout(root)
    ids = [f"slide_{i:05d}" for i in range(n_slides)]
    status = rng.choice(["done", "failed", "no_tissue"], n_slides, p=[0.95, 0.02, 0.03])
    patch_set = layout.patch_set("20x_256px_0px")
    pictures = qc_pictures(20, rng)
    (patch_set.dir / "coords").mkdir(parents=True)
    (patch_set.dir / "qc").mkdir()
    patch_rows = []
    for i, (sid, st) in enumerate(zip(ids, status, strict=True)):
        error = {"failed": f"/data/{sid}.svs: cannot open as a slide (OpenSlide: Unsupported or missing image file)",
                 "no_tissue": "no tissue found (0.012 mm² detected); check the QC image"}.get(st, "")
        if st != "failed":
            patch_set.qc(sid).write_bytes(pictures[i % len(pictures)])
        patch_rows.append([sid, f"/data/{sid}.svs", st, 0 if st != "done" else rng.integers(2000, 30000),
                           "0.2500", "openslide.mpp", 1, 512, f"{rng.uniform(1, 9):.3f}", error, "", "", ""])
    write_csv(patch_set.manifest, ["slide_id", "slide_path", "status", "n_patches", "mpp", "mpp_source", "read_level",
                                   "read_size", "seconds", "error", "segment_s", "grid_s", "write_s"], patch_rows)
    done = [r for r in patch_rows if r[2] == "done"]
    write_csv(layout.feature_set("20x_256px_0px", "resnet18").manifest,
              ["slide_id", "slide_path", "status", "n_patches", "dim", "seconds", "patches_per_s", "error"],
              [[r[0], r[1], "done", r[3], 512, "30.0", "500.0", ""] for r in done])
    run = layout.run("bench")
    run.dir.mkdir(parents=True)
    run.config.write_text("name: bench\nmodel:\n  name: gmmamba\noptim:\n  epochs: 50\n")
    fold_of = {r[0]: i % folds for i, r in enumerate(done)}
    write_csv(run.splits, ["fold", "split", "slide_id"],
              [[k, "test" if fold_of[sid] == k else "train", sid] for k in range(folds) for sid in fold_of])
    summary = []
    for k in range(folds):
        fold = run.fold(k)
        fold.dir.mkdir()
        fold.best.touch()
        log = [[e, 0.7 * np.exp(-e / 15) + rng.uniform(0, 0.05), *[rng.uniform(0.5, 1)] * 6,
                rng.uniform(1, 2), int(e == 30)] for e in range(epochs)]
        write_csv(fold.log, ["epoch", "train_loss", "val_accuracy", "val_auc", "val_f1", "val_precision", "val_recall",
                             "val_balanced_accuracy", "val_score", "selected"], log)
        test_ids = [sid for sid, f in fold_of.items() if f == k]
        labels = rng.integers(0, 2, len(test_ids))
        p1 = np.clip(labels * 0.4 + rng.uniform(0, 0.6, len(test_ids)), 0, 1)
        write_csv(fold.preds, ["slide_id", "label", *(f"prob_{c}" for c in CLASSES)],
                  [[sid, CLASSES[y], 1 - p, p] for sid, y, p in zip(test_ids, labels, p1, strict=True)])
        predicted_labels = (p1 >= 0.5).astype(int)
        matrix = [[int(((labels == t) & (predicted_labels == p)).sum()) for p in (0, 1)] for t in (0, 1)]
        scores = {m: float(rng.uniform(0.6, 0.9)) for m in ("accuracy", "auc", "f1", "precision", "recall",
                                                             "balanced_accuracy")}
        summary.append(scores)
        fold.metrics.write_text(json.dumps({"fold": k, "selection": "best_val", "selected_epoch": 30,
                                            "test": {**scores, "confusion_matrix": matrix, "n": len(test_ids)}}))
    names = list(summary[0])
    write_csv(run.summary, ["fold", "selection", "selected_epoch", *names],
              [*([k, "best_val", 30, *s.values()] for k, s in enumerate(summary)),
               ["mean", "", "", *(np.mean([s[m] for s in summary]) for m in names)],
               ["std", "", "", *(np.std([s[m] for s in summary]) for m in names)]])
    predictions = layout.predictions("bench")
    predictions.dir.mkdir(parents=True)
    for i in range(predicted):
        sid = f"new_{i:03d}"
        predictions.record(sid).write_text(json.dumps({"slide_id": sid, "predicted": "tumour", "n_patches": 9000,
                                                       "probabilities": {"normal": 0.3, "tumour": 0.7}}))
        heat = cv2.applyColorMap(cv2.imdecode(np.frombuffer(pictures[i % 20], np.uint8), cv2.IMREAD_GRAYSCALE),
                                 cv2.COLORMAP_JET)
        predictions.heatmap(sid).write_bytes(cv2.imencode(".png", heat)[1].tobytes())
    return layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wsip_bench_report_"))
    try:
        t = time.perf_counter()
        layout = make_workspace(root / "ws", args.slides)
        print(f"generated a {args.slides}-slide workspace in {time.perf_counter() - t:.1f} s")
        result = report(out=layout)
        mb, n = result.size_bytes / 1e6, args.slides
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores: report of {result.slides} "
              f"slides in {result.seconds:.1f} s ({result.seconds / TARGET_S:.0%} of the {TARGET_S:.0f} s target, "
              f"{result.seconds / n * 1e3:.1f} ms/slide), {mb:.1f} MB ({mb / TARGET_MB:.0%} of {TARGET_MB:.0f} MB, "
              f"{result.size_bytes / n / 1e3:.1f} kB/slide)")
        if args.slides >= 1000 and (result.seconds > TARGET_S or mb > TARGET_MB):
            raise SystemExit("over target")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
