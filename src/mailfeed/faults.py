"""Named fault-injection points for crash tests.

Each durable step of the spools calls :func:`fault_point` with a name such as
``maildir.after_tmp_write``.  The environment variable ``MAILFEED_FAULT``
selects which points fire and how, as comma-separated ``NAME:ACTION`` pairs::

    MAILFEED_FAULT=maildir.after_tmp_write:kill
    MAILFEED_FAULT=mbox.after_write:enospc,maildir.after_link:eio

Actions: ``kill`` sends SIGKILL to the own process (a crash with no cleanup),
``enospc`` and ``eio`` raise OSError with that errno (a failing disk).

Invariant: the variable is read once, at import; when it is unset,
:func:`fault_point` is one dictionary truth test.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["FAULT_ENV", "configure", "fault_point"]

FAULT_ENV = "MAILFEED_FAULT"
ACTIONS = ("kill", "enospc", "eio")

_faults: dict[str, str] = {}
# Set when MAILFEED_FAULT was malformed at import: every fault point then
# raises, so a crash test cannot pass by silently injecting nothing.
_INVALID = "invalid"


def configure(spec: str | None) -> None:
    """Set the active faults from a ``NAME:ACTION,...`` spec (None or "" clears them).

    Raise ValueError naming the entry when an entry is malformed.
    """
    faults: dict[str, str] = {}
    for entry in (spec or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, action = entry.rpartition(":")
        if not sep or not name or action not in ACTIONS:
            raise ValueError(
                f"invalid {FAULT_ENV} entry {entry!r}: expected NAME:ACTION with ACTION "
                f"one of {', '.join(ACTIONS)}"
            )
        faults[name] = action
    _faults.clear()
    _faults.update(faults)


def fault_point(name: str) -> None:
    """Fire the fault configured for ``name``, if any; otherwise do nothing."""
    if not _faults:
        return
    if _INVALID in _faults:
        raise ValueError(_faults[_INVALID])
    action = _faults.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at fault point {name})")


try:
    configure(os.environ.get(FAULT_ENV))
except ValueError as exc:
    _faults[_INVALID] = str(exc)
