"""The sendmail delivery target: ``sendmail -i -f SENDER -- RCPT...``.

The message goes to the program's standard input with LF line ends.  Its
exit status, classified by :func:`mailfeed.errors.classify_exit_status`,
applies to every recipient.

Invariant: the program never outlives :meth:`SendmailTarget.deliver`; the
target's timeout bounds the whole run, writing included, and then the
program is killed and every recipient deferred.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO, BinaryIO

from mailfeed.delivery.base import DEFAULT_TIMEOUT, Outcome, RecipientResult
from mailfeed.delivery.convert import iter_converted
from mailfeed.envelope import Envelope
from mailfeed.errors import EX_OK, EX_TEMPFAIL, ChildStatus, classify_exit_status

__all__ = ["DEFAULT_SENDMAIL", "SENDMAIL_NULL_SENDER", "SendmailTarget"]

log = logging.getLogger(__name__)

DEFAULT_SENDMAIL = "/usr/sbin/sendmail"

# The null sender on the sendmail command line.  Postfix's sendmail parses
# the -f value as an RFC 822 address, so "<>" and "" both give the null
# sender.  NOTE: learned by reading Postfix's sendmail.c, not by running it.
SENDMAIL_NULL_SENDER = "<>"


class SendmailTarget:
    """Deliver by running ``sendmail -i -f SENDER -- RCPT...``.

    The exit status applies to all recipients, classified by
    :func:`mailfeed.errors.classify_exit_status`: 0 (EX_OK) is delivered; a
    temporary status (75, 71, death by a signal, a status outside sysexits
    such as 1) is deferred; any other sysexits code failed.  ``timeout``
    bounds the whole run, writing the message included: a program still
    running then is killed and every recipient is deferred.
    The message goes to the program's stdin with LF line ends.
    """

    def __init__(self, path: str = DEFAULT_SENDMAIL, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def argv(self, envelope: Envelope) -> list[str]:
        sender = envelope.sender or SENDMAIL_NULL_SENDER
        return [self.path, "-i", "-f", sender, "--", *envelope.recipients]

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]:
        code, outcome, text = self._run(envelope, message)
        return [RecipientResult(rcpt, outcome, code, text) for rcpt in envelope.recipients]

    def _run(self, envelope: Envelope, message: BinaryIO) -> tuple[int, Outcome, str]:
        argv = self.argv(envelope)
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors
                )
            except OSError as exc:
                log.error("failed to run %s: %s", self.path, exc)
                return EX_TEMPFAIL, Outcome.DEFERRED, f"failed to run {self.path}: {exc}"
            assert proc.stdin is not None
            # The timeout bounds the whole run, writing included: a program
            # that never reads its input must not block us once the pipe is full.
            deadline = time.monotonic() + self.timeout
            write_error: OSError | None = None
            try:
                try:
                    _feed(proc.stdin, iter_converted(message, crlf=False, stuff=False), deadline)
                finally:
                    proc.stdin.close()
            except TimeoutError:
                return self._kill(proc)
            except OSError as exc:
                # BrokenPipeError: the program quit early, and its exit status gives the reason.
                write_error = exc
            try:
                status = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return self._kill(proc)
            errors.seek(0)
            detail = errors.read(2048).decode("utf-8", "replace").strip()
        return self._classify(status, write_error, detail)

    def _kill(self, proc: subprocess.Popen[bytes]) -> tuple[int, Outcome, str]:
        proc.kill()
        proc.wait()
        log.warning("killed %s pid %d after the timeout of %g s", self.path, proc.pid,
                    self.timeout)
        return (
            EX_TEMPFAIL,
            Outcome.DEFERRED,
            f"{self.path} timed out after {self.timeout:g} s and was killed",
        )

    def _classify(
        self, status: int, write_error: OSError | None, detail: str
    ) -> tuple[int, Outcome, str]:
        suffix = f": {detail}" if detail else ""
        if status < 0:
            name = signal.Signals(-status).name
            return status, Outcome.DEFERRED, f"{self.path} killed by {name}{suffix}"
        if status == EX_OK and write_error is not None:
            # It exited 0 without reading the whole message: never count
            # a truncated message as delivered.
            return (
                EX_TEMPFAIL,
                Outcome.DEFERRED,
                f"{self.path} exited 0 but did not read the message: {write_error}",
            )
        verdict = classify_exit_status(status)
        if verdict is ChildStatus.OK:
            return status, Outcome.DELIVERED, f"{self.path} exited 0{suffix}"
        if verdict is ChildStatus.TEMPORARY:
            return status, Outcome.DEFERRED, f"{self.path} exited {status} (temporary){suffix}"
        return status, Outcome.FAILED, f"{self.path} exited {status}{suffix}"


def _feed(pipe: IO[bytes], chunks: Iterator[bytes], deadline: float) -> None:
    """Write ``chunks`` to ``pipe`` without blocking past ``deadline`` (monotonic).

    Raise TimeoutError when the reader has not taken everything by then, and
    BrokenPipeError when it quit.
    """
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_WRITE)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if not selector.select(remaining):
                    continue
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue
