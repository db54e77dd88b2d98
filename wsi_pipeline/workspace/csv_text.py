"""User CSVs (labels, slide lists) as text lines: UTF-8 with or without a BOM, or one line naming the bad line.

Decoded line by line (not by the `csv` module's file object) so that bytes that are not UTF-8 are reported
with their line number instead of a `UnicodeDecodeError` somewhere in a buffer (docs/reliability.md).
"""

from __future__ import annotations

import codecs
from pathlib import Path

from wsi_pipeline.errors import InputError


def decoded_lines(path: Path) -> list[str]:
    """The file's lines (line endings kept, as `csv.reader` wants them), a leading BOM dropped (Excel's
    "CSV UTF-8")."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise InputError(f"{path}: a folder, not a CSV file") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    lines = []
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: line {number} is not UTF-8 text (byte {line[exc.start]:#04x} at column "
                             f"{exc.start + 1}); save the CSV as UTF-8") from None
    return lines
