"""Pipe writer: hand the block and message to a local delivery agent.

The site's ``command`` (for example ``dovecot-lda -d site1``) runs with the
block and message streamed on its standard input.  Its exit status decides
the outcome by :func:`mailfeed.errors.classify_exit_status`:

* OK (0): stored;
* TEMPORARY (75, 71, death by a signal, or any status that is not a sysexits
  code): :class:`~mailfeed.errors.TempFailure`, so the mail stays queued;
* PERMANENT (another sysexits code, 64 to 78): :class:`DeliveryAgentError`
  with that exit code, passed on to our caller unchanged.

Invariant: the agent never outlives :func:`deliver`.  If writing to it fails
or our caller is interrupted (the deadline), it is killed and reaped.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from mailfeed.errors import ChildStatus, MailfeedError, TempFailure, classify_exit_status
from mailfeed.faults import fault_point
from mailfeed.spool.prepare import PreparedMessage

__all__ = ["FAULT_POINTS", "STDERR_EXCERPT", "DeliveryAgentError", "deliver"]

log = logging.getLogger(__name__)

FAULT_POINTS = ("pipe.mid_write",)
# Octets of the agent's standard error quoted in an error message.
STDERR_EXCERPT = 400


class DeliveryAgentError(MailfeedError):
    """The delivery agent failed with a sysexits code; ``exit_code`` is that code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _describe(command: Sequence[str], status: int, stderr: bytes) -> str:
    text = stderr[-STDERR_EXCERPT:].decode("utf-8", "replace").strip()
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    detail = f": {text}" if text else ""
    return f"delivery agent {command[0]} {how}{detail}"


def deliver(command: Sequence[str], prepared: PreparedMessage) -> None:
    """Run ``command`` with the prepared message on its input; raise on failure."""
    try:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
    except OSError as exc:
        raise TempFailure(f"cannot run delivery agent {command[0]}: {exc.strerror}") from None
    assert proc.stdin is not None and proc.stderr is not None
    finished = False
    try:
        broken = False
        first = True
        for chunk in prepared.chunks():
            if broken:
                continue  # keep reading, so limits and sizes still apply
            try:
                proc.stdin.write(chunk)
            except BrokenPipeError:
                broken = True
            if first:
                fault_point("pipe.mid_write")
                first = False
        try:
            proc.stdin.close()
        except BrokenPipeError:
            broken = True
        stderr = proc.stderr.read()
        status = proc.wait()
        finished = True
    finally:
        if not finished:
            _kill(proc)
    verdict = classify_exit_status(status)
    if verdict is ChildStatus.OK and broken:
        raise TempFailure(f"delivery agent {command[0]} exited 0 before reading the message")
    if verdict is ChildStatus.OK:
        return
    message = _describe(command, status, stderr)
    if verdict is ChildStatus.TEMPORARY:
        raise TempFailure(message)
    raise DeliveryAgentError(message, status)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    log.warning("killed delivery agent pid %d after an error", proc.pid)
