"""Where does a focal signal get lost inside GMMamba / 2DMamba? One instrumented training run (docs/gmmamba.md §16).

Trains one model (AdamW lr 1e-4, wd 1e-5, one bag per step, features z-scored with the training bags: the
product's protocol) on half of a cohort whose positive instances are known, and after every epoch measures on
the other half:

- **probe AUC** per stage: a logistic regression (5-fold CV on held-out bags) separating positive from negative
  instances in that stage's representation (GMMamba: input projection, IMM's first BiMamba output, its second
  BiMamba output on the survivors, the pooled group vectors and CSS's super-features (positive = the group holds
  a positive instance); 2DMamba: embedding, the 2-D Mamba block's output, the LayerNorm'd cells). Does the
  signal survive the stage?
- **attention on positives**: the share of each positive bag's attention that lands on its positive instances;
- **positives dropped**: the share of positive instances IMM's mask removes (GMMamba);
- **gradient norm** per module, mean over the epoch's steps.

Cohorts: (b) dispersed single instances from `synthetic_bags` (80 bags of 100-300), or (e) 24 focal slides of
`bench_quality.py` (its `--focal-slides 24` cache; positive = a patch within the lesion's radius of its
centre). Writes a JSON of the curves and a PNG figure per model:
`python benchmarks/diagnose_mil.py --task b --model gmmamba --out docs/figures`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def cohort(task: str, n_bags: int, shift: float | None = None) -> list[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """[(features, coords, label, positive mask)] with the instance-level truth; `shift`: the signal strength."""
    if task == "e":
        return focal_cohort()
    from wsi_pipeline.testing.synthetic_bags import CohortParams, make_cohort

    params = CohortParams(min_instances=100, max_instances=300)
    bags = make_cohort(task, n_bags, seed=0, params=params if shift is None else replace(params, shift=shift))
    return [(b.features, b.coords, b.label, b.positive) for b in bags]


def focal_cohort() -> list[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """Task (e)'s slides with each patch marked positive when it overlaps the lesion disc (from the GeoJSON)."""
    from bench_quality import FOCAL, demo_features

    from wsi_pipeline.stages.train.labels import read_labels
    from wsi_pipeline.workspace.feature_store import read_bag

    features, labels = demo_features(24, tag="e", **FOCAL)
    annotations = Path(labels).parent / "annotations"
    out = []
    for slide_id, label, _ in read_labels(Path(labels)):
        feats, coords = read_bag(Path(features) / "h5_files" / f"{slide_id}.h5")
        positive = np.zeros(len(coords), bool)
        geojson = annotations / f"{slide_id}.geojson"
        if geojson.is_file():
            for feature in json.loads(geojson.read_text())["features"]:
                ring = np.asarray(feature["geometry"]["coordinates"][0], float)
                centre, radius = ring.mean(0), np.linalg.norm(ring - ring.mean(0), axis=1).max()
                nearest = np.clip(centre, coords, coords + 256)  # the patch's point closest to the centre
                positive |= np.linalg.norm(nearest - centre, axis=1) < radius
        out.append((feats, coords, int(label == "tumour"), positive))
    return out


def probe_auc(x: np.ndarray, y: np.ndarray, *, cap: int = 1500, seed: int = 0) -> float:
    """5-fold CV AUC of a logistic regression separating y from the rest in x (negatives subsampled to `cap`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if len(pos) < 5 or len(neg) < 5:
        return float("nan")
    neg = rng.choice(neg, min(len(neg), cap), replace=False)
    idx = np.concatenate([pos, neg])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
    return float(cross_val_score(clf, x[idx], y[idx], cv=5, scoring="roc_auc").mean())


def gmmamba_stages(model: Any, feats: Any, groups: list[np.ndarray]) -> dict[str, Any]:
    """GMMamba's forward, group by group (the released loop), keeping every stage's per-instance output."""
    import torch

    x = model.proj(feats)
    imm = model.imm
    order = np.concatenate(groups)
    r1s, r2s, kept, f_gr = [], [], [], []
    for g in groups:
        xg = x[torch.as_tensor(g)][None]
        r1 = xg + imm.mamba1(imm.ln_a(xg))
        keep, _ = imm._survivors(r1[0])
        r2 = r1[:, keep] + imm.mamba2(imm.ln_b(r1[:, keep]))
        f, _ = imm(x[torch.as_tensor(g)])
        r1s.append(r1[0])
        r2s.append(r2[0])
        kept.append(g[keep.numpy()])
        f_gr.append(f)
    f_gr = torch.stack(f_gr)
    sampled = model.css(f_gr)[0] if model.css is not None else f_gr
    return {"input projection": x, "IMM BiMamba 1": (torch.cat(r1s), order), "IMM BiMamba 2": (torch.cat(r2s),
            np.concatenate(kept)), "group vectors": f_gr, "CSS output": sampled,
            "class token (bags)": model.aggregator(sampled)[None], "kept": np.concatenate(kept)}


def mamba2d_stages(model: Any, feats: Any, groups: list[np.ndarray]) -> dict[str, Any]:
    """2DMamba's forward keeping the embedding, the block's output and the normalised cells of the patches."""
    import torch

    from wsi_pipeline.models.mil.cellgrid import grid_frame

    rows, cols = (np.asarray(g) for g in groups)
    (top, left), (height, width) = grid_frame(rows, cols, crop=model.grid == "crop", extent=model.grid_size)
    cell = torch.as_tensor((rows - top) * width + (cols - left), dtype=torch.long)
    x = model.embed(feats)
    h = model.pad_token.expand(height * width, -1).index_copy(0, cell, x)[None]
    for norm, mamba in zip(model.norms, model.mambas, strict=True):
        h = h + mamba(norm(h), (height, width))
    return {"embedding": x, "2-D Mamba block": h[0][cell], "LayerNorm cells": model.norm(h[0])[cell]}


def evaluate(model: Any, name: str, bags: list, groups: list, mean: Any, std: Any) -> dict[str, float]:
    """Probe AUCs per stage, attention on positives and positives dropped, on the held-out bags."""
    import torch

    stages: dict[str, list] = {}
    labels: dict[str, list] = {}
    attention, dropped = [], []
    model.eval()
    with torch.no_grad():
        for (feats, coords, label, positive), groups_b in zip(bags, groups, strict=True):
            f = (torch.from_numpy(feats) - mean) / std
            _, attn = model(f, torch.from_numpy(coords), groups_b)
            if label:
                attention.append(float(attn[torch.from_numpy(positive)].sum()))
            run = gmmamba_stages if name == "gmmamba" else mamba2d_stages
            out = run(model, f, groups_b)
            for stage, value in out.items():
                if stage == "kept":
                    continue
                if isinstance(value, tuple):  # per-instance, in a different order
                    value, ids = value
                    y = positive[ids]
                elif stage == "class token (bags)":
                    y = np.array([bool(label)])
                elif stage in ("group vectors", "CSS output"):
                    y = np.array([positive[g].any() for g in groups_b])
                else:
                    y = positive
                stages.setdefault(stage, []).append(value.numpy())
                labels.setdefault(stage, []).append(y)
            if name == "gmmamba" and positive.any():
                dropped.append(1 - positive[out["kept"]].sum() / positive.sum())
    result = {f"probe: {s}": probe_auc(np.concatenate(v), np.concatenate(labels[s])) for s, v in stages.items()}
    result["attention on positives"] = float(np.mean(attention))
    if dropped:
        result["positives dropped by the mask"] = float(np.mean(dropped))
    return result


MODULES = {"gmmamba": ["proj", "imm.mamba1", "imm.mamba2", "imm.pool_scorer", "css", "aggregator", "head",
                       "instance_path"],
           "2dmamba": ["embed", "mambas", "attention", "classifier", "instance_path"]}


def main(argv: list[str] | None = None) -> None:
    import torch

    from wsi_pipeline.models.mil import bag_loss, create_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="b", choices=["a", "b", "c", "e"])
    parser.add_argument("--model", default="gmmamba", help="name[:option=value...], as bench_quality.py")
    parser.add_argument("--bags", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--shift", type=float, default=None, help="signal strength (default: CohortParams.shift)")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args(argv)
    from bench_quality import parse_spec

    torch.set_num_threads(1)
    torch.manual_seed(2021)
    name, options, _ = parse_spec(args.model)
    bags = cohort(args.task, args.bags, args.shift)
    train, test = bags[: len(bags) // 2], bags[len(bags) // 2:]
    model = create_model(name, in_dim=bags[0][0].shape[1], n_classes=2, **options)
    groups = [model.make_groups(f, c) for f, c, _, _ in bags]
    g_train, g_test = groups[: len(train)], groups[len(train):]
    stacked = torch.from_numpy(np.concatenate([f for f, _, _, _ in train]))
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    modules = {m: model.get_submodule(m) for m in MODULES[name] if _has(model, m)}
    curves: list[dict[str, float]] = [{"epoch": 0, **evaluate(model, name, test, g_test, mean, std)}]
    order = np.random.default_rng(0)
    for epoch in range(1, args.epochs + 1):
        model.train()
        norms = {m: 0.0 for m in modules}
        losses = []
        for i in order.permutation(len(train)):
            feats, coords, label, _ = train[i]
            logits, _ = model((torch.from_numpy(feats) - mean) / std, torch.from_numpy(coords), g_train[i])
            loss = bag_loss(model, logits, torch.tensor([label]))  # the trainer's loss (deep supervision, §16)
            optimiser.zero_grad()
            loss.backward()
            for m, module in modules.items():
                grads = [p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None]
                norms[m] += float(torch.stack(grads).sum().sqrt()) / len(train) if grads else 0.0
            optimiser.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "train loss": float(np.mean(losses)), **{f"grad: {m}": v for m, v in norms.items()},
               **evaluate(model, name, test, g_test, mean, std)}
        curves.append(row)
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    tag = f"{args.task}{f'_shift{args.shift:g}' if args.shift else ''}_{args.model.replace(':', '_').replace('=', '-')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"diagnose_{tag}.json").write_text(json.dumps(curves, indent=1))
    plot(curves, args.out / f"diagnose_{tag}.png", f"{args.model} on task ({args.task})")


def _has(model: Any, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def plot(curves: list[dict[str, float]], path: Path, title: str) -> None:
    """Three panels over epochs: probe AUC per stage; attention on / mask drop of positives; gradient norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [c["epoch"] for c in curves]
    for key in curves[0]:
        if key.startswith("probe: "):
            axes[0].plot(epochs, [c[key] for c in curves], marker="o", label=key[7:])
    axes[0].set(title="linear probe: positive vs negative (AUC)", xlabel="epoch", ylim=(0.4, 1.02))
    for key in ("attention on positives", "positives dropped by the mask"):
        if key in curves[0]:
            axes[1].plot(epochs, [c[key] for c in curves], marker="o", label=key)
    axes[1].set(title="positive instances", xlabel="epoch", ylim=(0, 1))
    for key in curves[1]:
        if key.startswith("grad: "):
            axes[2].plot(epochs[1:], [c[key] for c in curves[1:]], marker="o", label=key[6:])
    axes[2].set(title="gradient norm per module (mean per step)", xlabel="epoch", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
