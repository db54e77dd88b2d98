"""The report's plots, drawn by matplotlib as SVG: learning curves, ROC curves, the confusion matrix, and a
cohort's ROC / PR curves with bootstrap bands and its reliability diagram (docs/evaluation.md).

matplotlib is imported inside the functions (the CLI's light commands never pay for it), and figures are
made with `matplotlib.figure.Figure` directly — no pyplot, no global backend or figure state. SVG text
stays text (`svg.fonttype: none`: smaller, searchable) and ids are salted with a constant, so the same run
gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from wsi_pipeline.stages.report.collect import FoldRecord

_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "wsip", "font.size": 9, "axes.spines.top": False,
          "axes.spines.right": False, "legend.frameon": False}


@contextmanager
def _figure(width: float, height: float, ncols: int = 1) -> Iterator[tuple[Any, Any]]:
    """(figure, axes) in the report's style; the caller draws, `_svg` renders."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(width, height), layout="constrained")
        yield figure, figure.subplots(1, ncols, squeeze=False)[0]


def _svg(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def learning_curves(folds: Sequence[FoldRecord]) -> bytes:
    """Train loss and val score per epoch, one line per fold; a star marks each fold's selected epoch."""
    from matplotlib.ticker import MaxNLocator

    with _figure(8.0, 3.0, ncols=2) as (figure, (loss_ax, score_ax)):
        for i, fold in enumerate(folds):
            colour = f"C{i % 10}"
            epochs = [int(r["epoch"]) for r in fold.log]
            loss_ax.plot(epochs, [float(r["train_loss"]) for r in fold.log], color=colour, label=f"fold {fold.fold}")
            scores = [float(r["val_score"]) for r in fold.log]
            score_ax.plot(epochs, scores, color=colour)
            selected = fold.metrics.get("selected_epoch", -1)
            if selected in epochs:
                score_ax.plot([selected], [scores[epochs.index(selected)]], marker="*", markersize=12,
                              color=colour, linestyle="none")
        for ax in (loss_ax, score_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        loss_ax.set(xlabel="epoch", ylabel="train loss", title="training loss")
        score_ax.set(xlabel="epoch", ylabel="val F1 + AUC", title="validation score (★ selected epoch)")
        loss_ax.legend(fontsize=8)
        return _svg(figure)


def roc_curves(folds: Sequence[FoldRecord], classes: Sequence[str]) -> bytes | None:
    """Test-fold ROC curves. Binary: one per fold (AUC from its metrics.json) plus all test folds pooled; more
    classes: one-vs-rest per class over the pooled test folds. None when no fold has both classes."""
    from sklearn.metrics import roc_auc_score, roc_curve

    rows = [(fold, r) for fold in folds for r in fold.preds]
    y = np.array([classes.index(r["label"]) for _, r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for _, r in rows]).reshape(len(rows), len(classes))
    curves: list[tuple[np.ndarray, np.ndarray, str, dict]] = []
    if len(classes) == 2:
        for fold in folds:
            mask = np.array([f is fold for f, _ in rows], bool)
            if len(set(y[mask].tolist())) == 2:
                fpr, tpr, _ = roc_curve(y[mask], probs[mask, 1])
                curves.append((fpr, tpr, f"fold {fold.fold} (AUC {fold.metrics['test']['auc']:.2f})", {}))
        targets = [(1, "all test folds")]
    else:
        targets = [(c, f"{name} vs rest") for c, name in enumerate(classes)]
    for c, label in targets:
        if 0 < (y == c).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == c, probs[:, c])
            pooled = {"color": "black", "linewidth": 2} if len(classes) == 2 else {}
            curves.append((fpr, tpr, f"{label} (AUC {roc_auc_score(y == c, probs[:, c]):.2f})", pooled))
    if not curves:
        return None
    with _figure(4.2, 3.6) as (figure, (ax,)):
        for fpr, tpr, label, style in curves:
            ax.plot(fpr, tpr, label=label, **style)
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        positive = f" (positive: {classes[1]})" if len(classes) == 2 else ""
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, test folds{positive}",
               xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
        ax.legend(fontsize=7, loc="lower right")
        return _svg(figure)


def confusion_matrix(folds: Sequence[FoldRecord], classes: Sequence[str]) -> bytes | None:
    """The test folds' confusion matrices (at each fold's selected epoch), summed; rows are the true class."""
    matrices = [np.asarray(f.metrics["test"]["confusion_matrix"]) for f in folds
                if "confusion_matrix" in f.metrics.get("test", {})]
    if not matrices:
        return None
    return confusion_counts(np.sum(matrices, axis=0), classes, "confusion, test folds")


def confusion_counts(total: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """A C × C count matrix (rows: true class) as a heat table."""
    total = np.asarray(total)
    with _figure(1.6 + 0.8 * len(classes), 1.4 + 0.7 * len(classes)) as (figure, (ax,)):
        ax.imshow(total, cmap="Blues", vmin=0)
        for (i, j), n in np.ndenumerate(total):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > total.max() / 2 else "black")
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=30, ha="right")
        ax.set_yticks(ticks, classes)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        return _svg(figure)


def curves_with_bands(curves: dict[str, Any], positive: str, title: str) -> bytes:
    """ROC and precision–recall curves (`evaluation.summary.curve_bands`) with their 95% bootstrap bands."""
    roc, pr = curves["roc"], curves["pr"]
    with _figure(7.6, 3.4, ncols=2) as (figure, (roc_ax, pr_ax)):
        roc_ax.fill_between(roc["fpr"], *roc["band"], step="post", color="C0", alpha=0.25, label="95% band")
        roc_ax.step(roc["fpr"], roc["tpr"], where="post", color="C0", label="ROC")
        roc_ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
                   aspect="equal", title=f"ROC (positive: {positive})")
        pr_ax.fill_between(pr["recall"], *pr["band"], color="C1", alpha=0.25, label="95% band")
        pr_ax.plot(pr["recall"], pr["precision"], color="C1", label="precision–recall")
        pr_ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), aspect="equal",
                  title="precision–recall")
        for ax in (roc_ax, pr_ax):
            ax.legend(fontsize=7, loc="lower right" if ax is roc_ax else "lower left")
        figure.suptitle(title, fontsize=9)
        return _svg(figure)


def reliability_diagram(calibration: dict[str, Any], title: str) -> bytes:
    """Observed share against mean predicted probability per bin (`evaluation.calibration`); point size ~ count."""
    bins = calibration["bins"]
    with _figure(3.6, 3.4) as (figure, (ax,)):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", label="perfectly calibrated")
        ax.plot([b["confidence"] for b in bins], [b["observed"] for b in bins], color="C2", marker="o",
                label=f"ECE {calibration['ece']:.3f}")
        for b in bins:
            ax.annotate(str(b["count"]), (b["confidence"], b["observed"]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points")
        ax.set(xlabel="predicted probability", ylabel="observed share", xlim=(0, 1), ylim=(0, 1.02),
               aspect="equal", title=title)
        ax.legend(fontsize=7, loc="upper left")
        return _svg(figure)
