"""The Maildir delivery target: one Maildir per recipient.

A Maildir file is the final copy, and nothing downstream can recover its
envelope, so the target writes the envelope into the file as final
delivery agents do.  Each copy starts with two header fields, then the
message with LF line ends::

    Return-Path: <SENDER>          ("<>" for the null sender)
    Delivered-To: RECIPIENT        (the recipient of this copy)

Return-Path is the field that RFC 5321 section 4.4 has the final delivery
add, with the reverse-path of MAIL FROM in angle brackets.  Delivered-To
(RFC 9228) names the envelope recipient of this copy, bare.  Both carry the
addresses as the envelope has them: the case is kept (only the folder name
is in lower case), and UTF-8 addresses (RFC 6531) are written as UTF-8
(RFC 6532).  This is the form that Postfix 3.7's virtual(8) writes into a
Maildir, less its X-Original-To field.  No Received field is added, because
the target is not a transfer hop: virtual(8) adds none either, and the MX
already wrote the Received field of the SMTP hop.

Each copy is written to ``tmp/``, fsynced, linked into ``new/`` under a
unique name, and ``new/`` is fsynced, so a DELIVERED result survives a
crash.  Between :meth:`MaildirTarget.begin_batch` and
:meth:`MaildirTarget.sync` (the fetcher's group commit) the fsync of each
``new/`` folder is done once, in ``sync``, instead of after every copy: a
DELIVERED result is then durable only after ``sync`` returned, and the
fetcher records it only then.  Each file is still fsynced before ``deliver``
returns.  The message is streamed chunk by chunk and never held whole.  A
recipient that cannot name a folder safely (``/``, a leading dot, NUL, over
255 octets) fails; an I/O error defers.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO

from mailfeed.delivery.base import (
    CODE_ADDRESS_REJECTED,
    CODE_LOCAL_TEMPFAIL,
    STATUS_BAD_MAILBOX,
    STATUS_LOCAL_ERROR,
    STATUS_SYSTEM_FULL,
    Outcome,
    RecipientResult,
)
from mailfeed.delivery.convert import iter_converted
from mailfeed.durable import fsync_dir
from mailfeed.envelope import Envelope

__all__ = ["MAX_MAILDIR_NAME", "MaildirTarget", "maildir_name_error", "trace_fields"]

log = logging.getLogger(__name__)

# Longest Maildir folder name, in octets (NAME_MAX on common file systems).
MAX_MAILDIR_NAME = 255


def maildir_name_error(recipient: str) -> str | None:
    """Return why ``recipient`` cannot name a Maildir folder, or None if it can."""
    name = recipient.lower()
    if not name:
        return "empty name"
    if "/" in name:
        return "contains '/'"
    if name.startswith("."):
        return "starts with '.'"
    if "\x00" in name:
        return "contains NUL"
    octets = len(name.encode("utf-8", "surrogateescape"))
    if octets > MAX_MAILDIR_NAME:
        return f"is {octets} octets, over the limit of {MAX_MAILDIR_NAME}"
    return None


def trace_fields(sender: str, recipient: str) -> bytes:
    """Return the Return-Path and Delivered-To fields of one copy, each ending in LF.

    The envelope codec has already rejected control characters and invalid
    UTF-8 in both addresses, so neither can end a field early.
    """
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()


class MaildirTarget:
    """Deliver into one Maildir per recipient at ``root/<recipient in lower case>``.

    Each copy starts with :func:`trace_fields` for its recipient.  It is
    written to ``tmp/``, fsynced, linked into ``new/``, and the ``new/``
    folder is fsynced, so a delivered result survives a crash.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._counter = 0
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        # new/ folders linked into since begin_batch(); None: fsync each at once.
        self._unsynced: set[Path] | None = None
        self._lock = threading.Lock()

    def begin_batch(self) -> None:
        """Defer the fsync of each ``new/`` folder to :meth:`sync`."""
        with self._lock:
            if self._unsynced is None:
                self._unsynced = set()

    def sync(self) -> None:
        """Fsync every ``new/`` folder linked into since the last call; raise OSError."""
        with self._lock:
            folders = self._unsynced
            if folders is None:
                return
            self._unsynced = set()
        for folder in sorted(folders):
            fsync_dir(folder)

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]:
        start = message.tell()
        results: list[RecipientResult] = []
        for rcpt in envelope.recipients:
            message.seek(start)
            results.append(self._deliver_one(envelope.sender, rcpt, message))
        return results

    def _deliver_one(self, sender: str, rcpt: str, message: BinaryIO) -> RecipientResult:
        problem = maildir_name_error(rcpt)
        if problem is not None:
            text = f"{STATUS_BAD_MAILBOX} recipient {rcpt!r} is not a valid Maildir name: {problem}"
            log.warning("%s", text)
            return RecipientResult(rcpt, Outcome.FAILED, CODE_ADDRESS_REJECTED, text)
        folder = self.root / rcpt.lower()
        try:
            path = self._write(folder, trace_fields(sender, rcpt), message)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error("writing to Maildir %s failed: %s", folder, exc)
            status = STATUS_SYSTEM_FULL if full else STATUS_LOCAL_ERROR
            # Every write failure is deferred: the folder may be fixed, and a
            # bounce for a local fault would lose the mail for its recipient.
            return RecipientResult(
                rcpt,
                Outcome.DEFERRED,
                CODE_LOCAL_TEMPFAIL,
                f"{status} writing to Maildir {folder} failed: {exc}",
            )
        return RecipientResult(rcpt, Outcome.DELIVERED, 250, f"2.0.0 delivered to {path}")

    def _unique_name(self) -> str:
        # deliver() may run in several threads at once: the counter keeps names unique.
        with self._lock:
            self._counter += 1
            counter = self._counter
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micro}P{os.getpid()}Q{counter}.{self._host}"

    def _make_folder(self, folder: Path) -> None:
        if folder.is_symlink():
            raise OSError(errno.ELOOP, "Maildir folder is a symbolic link", str(folder))
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def _write(self, folder: Path, header: bytes, message: BinaryIO) -> Path:
        self._make_folder(folder)
        name = self._unique_name()
        tmp_path = folder / "tmp" / name
        new_path = folder / "new" / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp_path, flags, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=True) as out:
                out.write(header)
                for chunk in iter_converted(message, crlf=False, stuff=False):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            # link, unlike rename, fails with EEXIST instead of replacing a
            # message that already has this name in new/.
            os.link(tmp_path, new_path, follow_symlinks=False)
        finally:
            tmp_path.unlink(missing_ok=True)
        with self._lock:
            unsynced = self._unsynced
            if unsynced is not None:
                unsynced.add(folder / "new")
        if unsynced is None:
            fsync_dir(folder / "new")
        return new_path
