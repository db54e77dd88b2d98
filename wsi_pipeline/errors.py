"""One family for every error a user can fix: a bad slide, input, config, name, or missing weights.

The CLI prints a `UserError` as one line (the file and the fix are in the message) and exits 2 — never a
traceback. Anything else is a bug.
"""

import re
from collections.abc import Iterable

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes some libraries put in messages


class UserError(Exception):
    """An error whose message names the file (or option) and the fix."""


class InputError(UserError, ValueError):
    """Bad command input (missing path, duplicate slide ids, malformed CSV or flag)."""


class ConfigError(UserError, ValueError):
    """A training config that cannot be run."""


class UnknownNameError(UserError, ValueError):
    """A name that is not registered (encoder, model, model option, grouping, ...)."""


class StorageError(UserError):
    """The workspace cannot take a write: a read-only or unwritable folder, a full disk, an exceeded quota.

    Never a per-slide failure: every later slide would fail the same way, so the stage stops (docs/reliability.md).
    """


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type when it has none): what a manifest row and the
    CLI show."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return text[0] if text else type(exc).__name__


def name_some(items: Iterable[object], *, shown: int = 5) -> str:
    """The first few items of a list for a one-line message: `a, b, c ... and 7 more`."""
    items = list(items)
    text = ", ".join(str(i) for i in items[:shown])
    return text + (f" ... and {len(items) - shown} more" if len(items) > shown else "")
