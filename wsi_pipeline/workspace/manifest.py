"""`manifest.csv`: one row per slide and stage output, the status vocabulary, and locked updates."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsi_pipeline.workspace.files import atomic_write
from wsi_pipeline.workspace.locks import file_lock

# The statuses a row can hold; FAILURES count towards exit code 1.
DONE, FAILED, NO_TISSUE, STALE = "done", "failed", "no_tissue", "stale"
FAILURES = (FAILED, NO_TISSUE)


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:  # a slide path as its bytes
        return list(csv.DictReader(f))


def manifest_rows(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """{slide_id: row} of a manifest (empty when there is none yet)."""
    return {r["slide_id"]: r for r in read_manifest(path)}


def update_manifest(path: str | os.PathLike[str], row: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Insert or replace the row for `row['slide_id']`, under a lock, written atomically."""
    path = Path(path)
    with file_lock(path.with_suffix(".lock")):
        rows = [r for r in read_manifest(path) if r.get("slide_id") != row["slide_id"]]
        rows.append({c: "" if row.get(c) is None else row.get(c) for c in columns})
        rows.sort(key=lambda r: r["slide_id"])
        with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
