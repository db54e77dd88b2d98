"""The labels CSV a user gives (`slide_id,label[,case_id]`): read for training (`data.labels`) and for scoring
an external cohort (`wsip predict --labels`), so both accept and refuse exactly the same files."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from wsi_pipeline.errors import ConfigError, name_some
from wsi_pipeline.workspace.csv_text import decoded_lines
from wsi_pipeline.workspace.slide_id import check_slide_id


def read_labels(path: Path) -> list[tuple[str, str, str]]:
    """(slide_id, label, case_id) per row, in file order; a blank or missing case_id is the slide id."""
    if not path.is_file():
        raise ConfigError(f"{path}: labels CSV not found (fix data.labels; relative paths resolve from the YAML)")
    rows, blank = [], []
    reader = csv.DictReader(decoded_lines(path))
    reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("slide_id", "label") if c not in reader.fieldnames]
    if missing:
        found = ", ".join(reader.fieldnames) or "no header"
        raise ConfigError(
            f"{path}: missing column(s) {', '.join(missing)} (need slide_id,label[,case_id]; found: {found})"
        )
    for r in reader:
        sid, label, case = ((r.get(k) or "").strip() for k in ("slide_id", "label", "case_id"))
        if sid or label:
            if sid:
                check_slide_id(sid, where=f"{path}:{reader.line_num}: ")
            rows.append((sid, label, case or sid))
            if not (sid and label):
                blank.append(reader.line_num)
    if not rows:
        raise ConfigError(f"{path}: no slides listed (add rows slide_id,label[,case_id])")
    if blank:
        raise ConfigError(f"{path}: empty slide_id or label on line(s) {name_some(blank)} (fill them in or drop them)")
    dupes = [sid for sid, n in Counter(sid for sid, _, _ in rows).items() if n > 1]
    if dupes:
        raise ConfigError(f"{path}: slide_id listed twice: {name_some(dupes)} (keep one row per slide)")
    _check_label_spellings(rows, path)
    return rows


def _check_label_spellings(rows: Sequence[tuple[str, str, str]], path: Path) -> None:
    """Labels that differ only in case (`tumor`/`Tumor`) would silently become two classes."""
    spellings: dict[str, set[str]] = {}
    for _, label, _ in rows:
        spellings.setdefault(label.casefold(), set()).add(label)
    clash = next((sorted(v) for v in spellings.values() if len(v) > 1), None)
    if clash:
        raise ConfigError(f"{path}: labels {' / '.join(map(repr, clash))} differ only in case; spell each class "
                          "one way in the CSV")
