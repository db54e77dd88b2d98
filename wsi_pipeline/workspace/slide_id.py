"""Names that become one path component in the workspace: slide ids, run names, patch configs.

Every per-slide output is `<folder>/<slide_id><suffix>`, so a slide id is checked once, here, before any
path is built from it (docs/reliability.md, "Names"): no path separator, no leading '.' (which also rules out
`..` and our own hidden temp and lock files), no NUL or other control character, valid UTF-8, at most
`MAX_BYTES` bytes (room for the longest suffix and temp marker within a file system's 255-byte names).
`Layout` refuses to build a path from a name that fails these checks, so no caller can leave the workspace.
"""

from __future__ import annotations

from typing import NewType

from wsi_pipeline.errors import InputError

SlideId = NewType("SlideId", str)
"""A slide id that passed `check_slide_id`: safe as one file name inside a workspace folder."""

MAX_BYTES = 200


def shown(text: str, limit: int = 80) -> str:
    """`text` printable on one line and encodable as UTF-8: undecodable bytes (a file name that is not UTF-8)
    become `\\xNN`, control characters their escapes, and a long name is cut with its length given."""
    data = text.encode("utf-8", "surrogateescape")
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in data.decode("utf-8", "backslashreplace"))
    return escaped if len(escaped) <= limit else f"{escaped[:limit]}… ({len(data)} bytes)"


def name_problem(text: str) -> str | None:
    """Why `text` cannot be one file name in the workspace, or None when it can."""
    if not text:
        return "is empty"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_BYTES:
        return f"is {size} bytes long, more than {MAX_BYTES} (shorten the name)"
    if "/" in text or "\\" in text:
        return "contains a path separator"
    if text.startswith("."):
        return "starts with '.' (hidden files and '..' are not slide names)"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "contains a control character"
    if text != text.strip():
        return "starts or ends with a space (a labels CSV could never name it)"
    return None


def check_name(text: str, what: str) -> str:
    """`text` unchanged when it is a safe single file name, else a one-line `InputError` naming it."""
    problem = name_problem(text)
    if problem is not None:
        raise InputError(f"{what} {shown(text)!r} {problem}; every output is named by it inside the workspace")
    return text


def check_slide_id(text: str, *, where: str = "") -> SlideId:
    """A `SlideId`, or a one-line `InputError` (prefixed with `where`, e.g. `labels.csv:3: `)."""
    return SlideId(check_name(text, f"{where}slide id"))
