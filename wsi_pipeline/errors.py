"""One base class for every error a user can fix (bad slide, bad input, bad config, missing weights).

The CLI prints these as one line and exits 2 (usage/config) — never a traceback. Anything else is a bug.
"""


class UserError(Exception):
    """An error whose message names the file and the fix."""


class InputError(UserError, ValueError):
    """Bad command input (missing path, duplicate slide ids, malformed CSV or flag): exit code 2."""
