"""Training progress on a rich-like `Progress`: one task per fold, advanced per epoch (a no-op without one)."""

from __future__ import annotations

from typing import Any, Protocol

from wsi_pipeline.stages.train.folds import EpochHook


class ProgressLike(Protocol):
    """The part of `rich.progress.Progress` the stage uses (one task per fold, advanced per epoch).

    Tasks carry a `status` field, so a `TextColumn("{task.fields[status]}")` can show it.
    """

    def add_task(self, description: str, *, total: float | None = ..., **fields: Any) -> Any: ...

    def update(self, task_id: Any, **kwargs: Any) -> None: ...


class FoldProgress:
    """The stage's events on a rich-like progress: a task "fold k" per fold, advanced per epoch, with a
    `status` field (loss and val score while training, the outcome at the end); a no-op without one."""

    def __init__(self, progress: ProgressLike | None) -> None:
        self.progress = progress
        self.task: Any = None

    def skipped(self, fold: int) -> None:
        if self.progress is not None:
            self.progress.add_task(f"fold {fold}", total=1, completed=1, status="done earlier")

    def started(self, fold: int, *, total: int) -> EpochHook | None:
        if self.progress is None:
            return None
        progress = self.progress
        task = self.task = progress.add_task(f"fold {fold}", total=total, status="")

        def on_epoch(epoch: int, row: dict[str, Any]) -> None:
            status = f"loss {row['train_loss']:.3f} · val F1+AUC {row['val_score']:.3f}"
            progress.update(task, completed=epoch + 1, status=status)

        return on_epoch

    def finished(self, metrics: dict[str, Any]) -> None:
        """An early stop ends the bar where training ended, rather than leaving it part-filled."""
        if self.progress is not None:
            epochs = metrics["epochs_run"]
            status = f"selected epoch {metrics['selected_epoch']} · test AUC {metrics['test']['auc']:.3f}"
            self.progress.update(self.task, total=epochs, completed=epochs, status=status)
