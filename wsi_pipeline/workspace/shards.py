"""`--shard i/N`: a deterministic split of a cohort over processes or a Slurm job array."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from wsi_pipeline.errors import InputError

T = TypeVar("T")


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """`"i/N"` → (i, N); None → Slurm's array variables when set, else None (no sharding).

    With Slurm, the task's index is relative to SLURM_ARRAY_TASK_MIN so arrays like 1-8 work too.
    """
    if spec:
        try:
            i_str, n_str = spec.split("/")
            i, n = int(i_str), int(n_str)
        except ValueError:
            raise InputError(f"--shard must look like i/N (e.g. 0/4), got {spec!r}") from None
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        return None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard i/N needs 0 <= i < N, got {i}/{n}")
    return i, n


def take_shard(items: Sequence[T], shard: tuple[int, int] | None, key: Callable[[T], Any] = str) -> list[T]:
    """Deterministic round-robin split over items sorted by `key` (same list on every worker)."""
    ordered = sorted(items, key=key)
    if shard is None:
        return ordered
    i, n = shard
    return ordered[i::n]
