"""Fault injection for the kill-anywhere sweep (docs/reliability.md): a run of the real `wsip` can be stopped
by SIGKILL at a chosen progress event, early, midway or late, and a test then checks that the rerun recovers.

The stages call `point(event)` at a few places where a kill is most telling:

- `slide`: a slide's lock was just taken, before its work (a kill leaves a lock whose holder is dead);
- `write`: an atomic write's temp file is complete, before its rename (a kill leaves a temp file);
- `chunk`: a feature chunk's rows are written, before its completion marker (a kill inside a slide);
- `step`: a training step (one bag) is done (a kill inside an epoch).

`WSIP_FAULT_AT=<event>:<n>` kills this process at the n-th (1-based) `point(<event>)` it reaches;
`WSIP_FAULT_LOG=<file>` appends every event's name to `<file>` (how a sweep learns a run's events, in order).
Each process counts its own events. With both variables unset, as always outside tests, `point` only looks
them up.
"""

from __future__ import annotations

import os
import signal

FAULT_AT_ENV, FAULT_LOG_ENV = "WSIP_FAULT_AT", "WSIP_FAULT_LOG"
EVENTS = ("slide", "write", "chunk", "step")
_seen: dict[str, int] = {}


def point(event: str) -> None:
    """Count `event`; log it and kill the process here when the environment asks for it."""
    target, log = os.environ.get(FAULT_AT_ENV), os.environ.get(FAULT_LOG_ENV)
    if target is None and log is None:
        return
    _seen[event] = n = _seen.get(event, 0) + 1
    if log:
        with open(log, "a") as f:
            f.write(event + "\n")
    if target == f"{event}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)
