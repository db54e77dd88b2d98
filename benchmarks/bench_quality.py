"""MIL quality benchmark: test AUC and balanced accuracy of every model on generated cohorts with a known signal.

Tasks (`wsi_pipeline.testing.synthetic_bags`): (a) sparse spatial clusters, (b) dispersed single instances,
(c) several regions of different sizes, all on raster-ordered coords with spatially smooth, non-negative
background features. (d) slides through the real pipeline: `--slides N` procedural H&E slides of the demo's
kind (`make_demo_cohort`: tumour slides carry three small lesions) go through `patch` -> `extract` (ResNet18,
random weights: nothing can be downloaded here) once, cached under $WSIP_BENCH_CACHE; or
`--features DIR --labels CSV` reads any `wsip extract` feature set (DIR/h5_files/<slide_id>.h5) and its labels
(slide_id,label[,case_id]). (e) focal slides: the same generator with ONE small lesion per tumour slide
(`FOCAL`, `--focal-slides N`, cached like (d)). (f) a small cohort: `--small-bags` (default 40) bags of task (a).

Training is the product's own fold loop (`wsi_pipeline.stages.train.folds.run_fold`: AdamW, one bag per step,
val F1+AUC selection, early stop, features z-scored with the fold's training bags as `data.standardize` does
when the model's preset asks for it: not for GMMamba's `preset: released`) in
a temporary folder, on patient-level splits from `wsi_pipeline.stages.train.splits.make_splits` (patient =
bag), identical for every model. A run is one (seed, fold):
seed s re-splits the cohort with split seed 42 + s and trains with seed 2021 + s; `--runs R` takes the first R
(seed, fold) pairs, seed-major. The cohort itself is fixed by `--data-seed`.

`--models ablations` runs the paper's ablation rows and CSS variants (docs/gmmamba.md §15); `--preset P` adds
`preset=P` to every gmmamba spec that sets none (`--preset released`: the paper's model). After the text table
a markdown table of the same numbers is printed, for the README.
A model is `name[:option=value...]`, e.g. `gmmamba:preset=released` or `gmmamba:mask_ratio=0:lr=3e-4`;
values are parsed as YAML scalars; `lr` and `wd` set the optimiser instead of a model option.

Run: `python benchmarks/bench_quality.py --task a --models gmmamba,abmil,mean --bags 200 --runs 3`
(default: all tasks, every registered model). `--results FILE.jsonl` keeps one line per finished run and skips
runs already there, so an interrupted benchmark resumes; `--resume FILE.csv` does the same with a CSV (one row
per finished run, appended as it finishes). `--jobs 2` trains two runs at once (one thread each).

After the table, every model is compared with `--reference` (default abmil) run by run on the same
(seed, fold): the mean paired AUC difference and its 95% t-interval over the runs (`paired_table`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from quality_results import append_csv, fmt, load_csv, paired_table, print_table

DEFAULT_TASKS = "a,b,c"
# `--models ablations`: the paper's ablation rows (docs/gmmamba.md §15), then its CSS table's seven rows; the
# last is the full model (both tables' bottom row). Keys are the rows' names in the printed markdown table.
ABLATIONS = {
    "w BMP": "gmmamba:n_groups=1:use_imm=false:use_css=false",
    "w LG-BMP": "gmmamba:use_imm=false:use_css=false",
    "w/o Masking": "gmmamba:use_css=false:mask_ratio=0:min_one_masked=false",
    "w IMM": "gmmamba:use_css=false",
    "w CSS": "gmmamba:use_imm=false",
    "CSS: CMax": "gmmamba:css_variant=cmax",
    "CSS: ×Q": "gmmamba:css_variant=q",
    "CSS: CCA": "gmmamba:css_variant=cca",
    "CSS: CCA×Q": "gmmamba:css_variant=cca_q",
    "CSS: CMHA": "gmmamba:css_variant=cmha",
    "CSS: CMHA×Q": "gmmamba:css_variant=cmha_q",
    "GMMamba (full CSS, Eq 12)": "gmmamba",
}
# Task (e): demo slides with ONE small lesion per tumour slide (~2-3% of its patches), through patch -> extract.
FOCAL = {"size": (3584, 4608), "hotspots": 1, "hotspot_radius": 180}
# Task (f): a small cohort (`--small-bags`, default 40) of task (a)'s generator.
GENERATED_AS = {"f": "a"}
EXTRA_TASKS = {"e": "focal slides: one small lesion per tumour slide, through patch -> extract",
               "f": "small cohort of task (a): sparse spatial clusters"}


@dataclass(frozen=True)
class Job:
    task: str
    spec: str
    seed: int
    fold: int
    folds: int
    bags: int
    data_seed: int
    min_n: int
    max_n: int
    epochs: int
    select_after: int
    patience: int
    min_epochs: int
    val_fraction: float
    shift: float | None = None
    slides: int = 0
    features: str | None = None
    labels: str | None = None

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def parse_spec(spec: str) -> tuple[str, dict[str, Any], dict[str, float]]:
    """`name:k=v:k=v` -> (model name, model options, optimiser overrides {lr, weight_decay})."""
    import yaml

    name, *parts = spec.split(":")
    options: dict[str, Any] = {}
    optim: dict[str, float] = {}
    for part in parts:
        key, _, value = part.partition("=")
        parsed = yaml.safe_load(value)
        if key in ("lr", "wd", "weight_decay"):
            optim["lr" if key == "lr" else "weight_decay"] = float(parsed)
        else:
            options[key] = parsed
    return name, options, optim


# ---------------------------------------------------------------- cohorts (cached per worker process)

_COHORTS: dict[tuple, tuple[list[tuple[str, Any, Any, int]], int]] = {}


def cohort(job: Job) -> tuple[list[tuple[str, Any, Any, int]], int]:
    """[(bag_id, features (N, D) float32, coords (N, 2) int64, label)] and the feature dim."""
    key = (job.task, job.bags, job.data_seed, job.min_n, job.max_n, job.shift, job.slides, job.features, job.labels)
    if key not in _COHORTS:
        if job.task == "d":
            features, labels = (job.features, job.labels) if job.features else demo_features(job.slides)
            _COHORTS[key] = real_cohort(Path(features or ""), Path(labels or ""))
        elif job.task == "e":
            _COHORTS[key] = real_cohort(*(Path(p) for p in demo_features(job.slides, tag="e", **FOCAL)))
        else:
            from wsi_pipeline.testing.synthetic_bags import CohortParams, make_cohort

            params = CohortParams(min_instances=job.min_n, max_instances=job.max_n)
            if job.shift is not None:
                params = replace(params, shift=job.shift)
            bags = make_cohort(GENERATED_AS.get(job.task, job.task), job.bags, seed=job.data_seed, params=params)
            _COHORTS[key] = ([(b.bag_id, b.features, b.coords, b.label) for b in bags], params.dim)
    return _COHORTS[key]


def demo_features(n_slides: int, *, tag: str = "d", size: tuple[int, int] = (2560, 3584), hotspots: int = 3,
                  hotspot_radius: int = 220) -> tuple[str, str]:
    """Task (d)'s default cohort (task (e)'s with FOCAL): `n_slides` demo slides, patched and extracted once
    (cached); returns the feature-set folder and labels CSV."""
    from common import CACHE
    from filelock import FileLock

    from wsi_pipeline.stages.extract import ExtractParams, extract
    from wsi_pipeline.stages.inputs import resolve_inputs
    from wsi_pipeline.stages.patch import patch
    from wsi_pipeline.testing.synthetic import make_demo_cohort

    root = CACHE / f"quality_{tag}_{n_slides}"
    done = root / "features.done"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / "build.lock"):  # `--jobs 2`: one worker builds, the other waits for the whole cohort
        if not done.is_file():
            make_demo_cohort(root / "slides", n_slides=n_slides, size=size, hotspots=hotspots,
                             hotspot_radius=hotspot_radius)
            patch(resolve_inputs([root / "slides"]), out=root / "ws", workers=2)
            result = extract(ExtractParams(weights="random", formats=("h5",)), out=root / "ws")
            done.write_text(str(result.out_dir))
    return done.read_text(), str(root / "labels.csv")


def real_cohort(features: Path, labels: Path) -> tuple[list[tuple[str, Any, Any, int]], int]:
    """Task (d) hook: a real feature set from `wsip extract` and its labels CSV (classes: sorted labels).

    One bag per slide; the benchmark's patient is the slide (case ids are ignored here).
    """
    from wsi_pipeline.stages.train.labels import read_labels
    from wsi_pipeline.workspace.peer_features import read_bag

    rows = read_labels(labels)
    classes = sorted({label for _, label, _ in rows})
    if len(classes) != 2:
        raise SystemExit(f"task d: the benchmark reports binary AUC; {labels} has classes {classes}")
    out = []
    for slide_id, label, _ in rows:
        feats, coords = read_bag(features / "h5_files" / f"{slide_id}.h5")
        out.append((slide_id, feats, coords, classes.index(label)))
    return out, out[0][1].shape[1]


# ---------------------------------------------------------------- one run


def run_job(job: Job) -> dict[str, Any]:
    """Train one model on one (seed, fold) through `run_fold`; return its record."""
    import torch

    from wsi_pipeline.models.mil.standardize import preset_standardize
    from wsi_pipeline.stages.train.bags import Bag
    from wsi_pipeline.stages.train.config import OptimConfig
    from wsi_pipeline.stages.train.folds import FoldData, ModelSpec, run_fold
    from wsi_pipeline.stages.train.splits import make_splits
    from wsi_pipeline.workspace.layout import FoldDir

    torch.set_num_threads(1)
    bags, in_dim = cohort(job)
    name, options, optim_overrides = parse_spec(job.spec)
    spec = ModelSpec(name=name, options=options, in_dim=in_dim, classes=("neg", "pos"),
                     standardize=preset_standardize(name, options))
    slides = [(bag_id, str(label), bag_id) for bag_id, _, _, label in bags]
    splits = make_splits(slides, folds=job.folds, val_fraction=job.val_fraction, seed=42 + job.seed)
    probe = spec.build()
    t0 = time.perf_counter()
    loaded = {}
    for bag_id, feats, coords, _ in bags:
        groups = _groups(probe, job, bag_id, feats, coords)
        loaded[bag_id] = Bag(bag_id, torch.from_numpy(feats), torch.from_numpy(coords), groups)
    group_seconds = time.perf_counter() - t0
    data = FoldData(
        train=splits.ids(job.fold, "train"),
        val=splits.ids(job.fold, "val"),
        test=splits.ids(job.fold, "test"),
        labels={bag_id: label for bag_id, _, _, label in bags},
        bags=loaded,
    )
    optim = OptimConfig(epochs=job.epochs, select_after=job.select_after, patience=job.patience,
                        min_epochs=job.min_epochs, **optim_overrides)
    log: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        t0 = time.perf_counter()
        metrics = run_fold(job.fold, data, spec=spec, optim=optim, seed=2021 + job.seed,
                           device=torch.device("cpu"), out=FoldDir(Path(tmp)), meta={"run": "bench_quality"},
                           on_epoch=lambda epoch, row: log.append(row))
        seconds = time.perf_counter() - t0
    test = metrics["test"]
    return {
        "key": job.key(), **asdict(job),
        "auc": test["auc"], "balanced_accuracy": test["balanced_accuracy"], "seconds": seconds,
        "group_seconds": group_seconds, "selected_epoch": metrics["selected_epoch"],
        "epochs_run": metrics["epochs_run"], "train_loss": [row["train_loss"] for row in log],
        "val_auc": [row["val_auc"] for row in log],
        "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
    }


_GROUPS: dict[tuple, Any] = {}


def _groups(model: Any, job: Job, bag_id: str, feats: np.ndarray, coords: np.ndarray) -> Any:
    """The model's groups for a bag, cached per worker under its group_cache_key (as `wsip train` caches)."""
    key = getattr(model, "group_cache_key", None)
    if key is None:
        return None
    cache_key = (job.task, job.data_seed, job.min_n, job.max_n, job.bags, job.shift, bag_id, key)
    if cache_key not in _GROUPS:
        _GROUPS[cache_key] = model.make_groups(feats, coords)
    return _GROUPS[cache_key]


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


# ---------------------------------------------------------------- table


def print_markdown(records: list[dict[str, Any]], tasks: list[str], specs: list[str]) -> None:
    """The table again as markdown (row name, options, test AUC, balanced accuracy), to paste into the README."""
    labels = {spec: label for label, spec in ABLATIONS.items()}
    presets = sorted({str(parse_spec(spec)[1].get("preset")) for spec in specs if spec.startswith("gmmamba")})
    for task in tasks:
        print(f"\nmarkdown, task {task} (gmmamba preset: {', '.join(presets) or '-'}):\n\n"
              "| row | options | test AUC | bal. acc. |\n|---|---|---|---|")
        for spec in specs:
            rows = [r for r in records if r["task"] == task and r["spec"] == spec]
            if not rows:
                continue
            name, options, optim = parse_spec(spec)
            preset = options.pop("preset", None) if len(presets) == 1 else None  # said once, in the heading
            shown = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
                              for k, v in {**options, **optim}.items())
            label = labels.get(spec if preset is None else spec.replace(f":preset={preset}", ""), name)
            aucs, bas = [r["auc"] for r in rows], [r["balanced_accuracy"] for r in rows]
            cells = [f"{v[0]:.2f}" if len(v) == 1 else fmt(v, 2) for v in (aucs, bas)]  # one run: no spread
            print(f"| {label} | {f'`{shown}`' if shown else 'defaults'} | {cells[0]} | {cells[1]} |")


def with_preset(spec: str, preset: str | None) -> str:
    """`spec` with `preset=P` added when it is a gmmamba spec that sets no preset (`--preset`)."""
    if preset is None or spec.split(":")[0] != "gmmamba" or "preset" in parse_spec(spec)[1]:
        return spec
    return f"{spec}:preset={preset}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default=DEFAULT_TASKS, help="comma-separated: a,b,c (generated), d (real)")
    parser.add_argument("--models", default=None, help="comma-separated model specs (`ablations`: the paper's "
                        "ablation rows); default: every registered model")
    parser.add_argument("--preset", default=None, help="GMMamba preset for every gmmamba spec that sets none "
                        "(released | recommended)")
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="(seed, fold) pairs per model and task")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--select-after", type=int, default=2, help="select on val only for epoch > this")
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--min-epochs", type=int, default=6, help="early stop only for epoch > this")
    parser.add_argument("--min-n", type=int, default=200, help="fewest instances per generated bag")
    parser.add_argument("--max-n", type=int, default=1000, help="most instances per generated bag")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--shift", type=float, default=None, help="signal strength (default: CohortParams.shift)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each; <= 2 here)")
    parser.add_argument("--results", type=Path, default=None, help="JSONL of finished runs: appended, reused")
    parser.add_argument("--slides", type=int, default=80, help="task d: generated demo slides")
    parser.add_argument("--features", default=None, help="task d: feature-set folder holding h5_files/")
    parser.add_argument("--labels", default=None, help="task d: labels CSV slide_id,label[,case_id]")
    parser.add_argument("--focal-slides", type=int, default=48, help="task e: generated one-lesion slides")
    parser.add_argument("--small-bags", type=int, default=40, help="task f: bags of the small cohort")
    parser.add_argument("--resume", type=Path, default=None, help="CSV of finished runs: appended, reused")
    parser.add_argument("--reference", default="abmil", help="model the paired AUC differences are taken to")
    args = parser.parse_args(argv)

    from wsi_pipeline.models.mil import list_models

    tasks = args.task.split(",")
    specs = args.models.split(",") if args.models else list_models()
    expanded = (spec for name in specs for spec in (ABLATIONS.values() if name == "ablations" else [name]))
    specs = list(dict.fromkeys(with_preset(spec, args.preset) for spec in expanded))
    if "d" in tasks and bool(args.features) != bool(args.labels):
        parser.error("--task d takes --features and --labels together (or neither: generated slides)")
    jobs = []
    for task in tasks:
        n_bags = {"d": 0, "e": 0, "f": args.small_bags}.get(task, args.bags)
        n_slides = {"d": args.slides, "e": args.focal_slides}.get(task, 0)
        for spec in specs:
            for r in range(args.runs):
                jobs.append(Job(
                    task=task, spec=spec, seed=r // args.folds, fold=r % args.folds, folds=args.folds,
                    bags=n_bags, data_seed=args.data_seed, min_n=args.min_n, max_n=args.max_n, epochs=args.epochs,
                    select_after=args.select_after, patience=args.patience, min_epochs=args.min_epochs,
                    val_fraction=args.val_fraction, shift=args.shift, slides=n_slides,
                    features=args.features if task == "d" else None,
                    labels=args.labels if task == "d" else None,
                ))
    done: dict[str, dict[str, Any]] = {}
    if args.results and args.results.is_file():
        for line in args.results.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record
    if args.resume:
        done.update(load_csv(args.resume))
    todo = [j for j in jobs if j.key() not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already in {args.results}", file=sys.stderr, flush=True)

    def finished(record: dict[str, Any]) -> None:
        done[record["key"]] = record
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(record) + "\n")
        if args.resume:
            append_csv(args.resume, record)
        print(f"  {record['task']} {record['spec']} seed {record['seed']} fold {record['fold']}: AUC "
              f"{record['auc']:.3f} BA {record['balanced_accuracy']:.3f} {record['seconds']:.0f}s "
              f"loss {' '.join(f'{x:.2g}' for x in record['train_loss'])}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if args.jobs <= 1:
        _init_worker()
        for job in todo:
            finished(run_job(job))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker) as pool:
            for record in pool.map(run_job, todo):
                finished(record)
    wall = time.perf_counter() - t0
    records = [done[j.key()] for j in jobs]
    seeds = math.ceil(args.runs / args.folds)
    generated = f"{args.bags} bags of {args.min_n}-{args.max_n} instances; " if set(tasks) - {"d", "e"} else ""
    header = (f"MIL quality: {generated}{args.runs} runs "
              f"({seeds} seed(s) x {args.folds} folds, val {args.val_fraction}), up to {args.epochs} epochs "
              f"(select after {args.select_after}, patience {args.patience}); wall {wall:.0f}s")
    from wsi_pipeline.testing.synthetic_bags import TASKS

    print_table(records, tasks, specs, header, {**TASKS, **EXTRA_TASKS})
    print_markdown(records, tasks, specs)
    if args.reference in specs:
        paired_table(records, tasks, specs, args.reference)


if __name__ == "__main__":
    main()
