"""An mboxrd spool as a POP3 maildrop.

Messages start at ``From `` lines; body lines matching ``^>*From `` were
stored with one extra ``>``, which is removed on the way out.  The writer
puts one empty line after each message; that line is not part of the
message.  The session lock is an fcntl lock on ``<mbox>.mailfeed-pop3.lock``
(plus the in-process guard); the mbox itself is locked only while it is
scanned and while it is rewritten, so the MX side can append during a
session.

The mbox locks are the writer's own (:class:`mailfeed.spool.mbox.MboxLock`):
the dotlock ``<mbox>.lock`` made by link(2) with ``<pid> <host>`` in it,
then an exclusive fcntl lock on the mbox.  A dotlock whose owner is gone is
recovered before the scan exactly as a writer would: the mbox is cut back to
the length the dead writer recorded, and fsynced, so a partial append is
never listed or served.

The unique-id is ``~`` followed by 40 hex digits of the SHA-256 of the
``From_`` line and the stored message.  The ``From_`` line carries the
envelope sender and the delivery time to the second, and mailfeed's
messages start with the envelope block, so two different deliveries share
a unique-id only if the same message bytes reached the same site in the
same second.  Within one listing, repeats get ``-2``, ``-3``, ... in file
order.  NOTE: such a repeat after an expunge would reuse the unique-id of
the deleted copy; mbox has no place to store a counter.

Expunge rewrites the mbox into a new file that is fsynced and renamed over
the old one while both mbox locks are held, so a crash leaves either the
old or the new mailbox, never a mix; writers must take the dotlock before
opening the mbox (mailfeed's writer does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from mailfeed.config import SiteConfig
from mailfeed.durable import fsync_dir
from mailfeed.errors import TempFailure
from mailfeed.maildrop.base import (
    READ_CHUNK_OCTETS,
    DropMessage,
    Maildrop,
    MaildropError,
    _hashed_uidl,
)
from mailfeed.maildrop.lock import _SessionLock
from mailfeed.maildrop.wire import QUOTED_FROM_RE, MessageReader
from mailfeed.spool.mbox import MboxLock

log = logging.getLogger(__name__)

MBOX_SESSION_LOCK_SUFFIX = ".mailfeed-pop3.lock"
MBOX_EXPUNGE_TMP_MARK = ".mailfeed-expunge-"
# Seconds to wait for the mbox locks (dotlock and fcntl together).
DEFAULT_LOCK_TIMEOUT = 30.0
MBOX_SEPARATOR = b"From "


@dataclass
class _MboxEntry:
    # Offsets into the mbox: the From_ line, the message, the end of the message.
    separator_start: int
    start: int
    end: int


class MboxDrop(Maildrop):
    """An mboxrd spool (see the module docstring for locking, rewriting and unique-ids)."""

    def __init__(
        self,
        site: SiteConfig,
        *,
        chunk_octets: int = READ_CHUNK_OCTETS,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self._entries: dict[int, _MboxEntry] = {}
        self._scanned_end = 0
        self._scanned_inode: tuple[int, int] | None = None
        self.lock_timeout = lock_timeout
        super().__init__(site, chunk_octets=chunk_octets)

    def _make_session_lock(self) -> _SessionLock:
        lock_file = self.path.with_name(self.path.name + MBOX_SESSION_LOCK_SUFFIX)
        if not lock_file.parent.is_dir():
            return _SessionLock(f"mbox:{os.path.realpath(self.path)}", None, self.site.name)
        return _SessionLock(f"mbox:{os.path.realpath(self.path)}", lock_file, self.site.name)

    # -- mbox locks: the writer's MboxLock (dotlock, then fcntl on the mbox).

    def _open_locked(self) -> tuple[MboxLock, int] | None:
        """Take both mbox locks; return them and the mbox fd, or None if there is no mbox."""
        lock = MboxLock(self.path, self.lock_timeout)
        try:
            fd = lock.acquire_existing()
        except TempFailure as exc:
            raise MaildropError(str(exc)) from exc
        if fd is None:
            return None
        return lock, fd

    # -- scanning

    def _scan(self) -> list[DropMessage]:
        opened = self._open_locked()
        self._entries = {}
        if opened is None:
            self._scanned_end = 0
            self._scanned_inode = None
            return []
        lock, fd = opened
        try:
            info = os.fstat(fd)
            self._scanned_inode = (info.st_dev, info.st_ino)
            with os.fdopen(os.dup(fd), "rb") as fp:
                return self._parse(fp)
        finally:
            lock.release(keep_dotlock=False)

    def _parse(self, fp: Iterable[bytes]) -> list[DropMessage]:
        messages: list[DropMessage] = []
        seen: dict[str, int] = {}
        offset = 0
        current: _MboxScan | None = None

        def close_message(scan: _MboxScan) -> None:
            entry, size, digest = scan.finish()
            if entry.end == entry.start and not scan.separator:
                return  # nothing before the first From_ line
            uidl = _hashed_uidl(digest)
            count = seen.get(uidl, 0) + 1
            seen[uidl] = count
            if count > 1:
                uidl = f"{uidl}-{count}"
            msgnum = len(messages) + 1
            messages.append(DropMessage(msgnum, uidl, size))
            self._entries[msgnum] = entry

        for line in fp:
            if line.startswith(MBOX_SEPARATOR):
                if current is not None:
                    close_message(current)
                current = _MboxScan(offset, line)
            else:
                if current is None:
                    # Text before the first From_ line: keep it visible as a message.
                    current = _MboxScan(offset, b"")
                current.add(line)
            offset += len(line)
        if current is not None:
            close_message(current)
        self._scanned_end = offset
        return messages

    def open_quick(self, msgnum: int) -> MessageReader | None:
        try:
            return self.open(msgnum)
        except OSError:
            return None  # open() in a thread raises it again for the caller to report

    def open(self, msgnum: int) -> MessageReader:
        entry = self._entries[msgnum]
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return MessageReader(
            fd, entry.start, entry.end, unquote=True, chunk_octets=self.chunk_octets
        )

    # -- expunge

    def _expunge(self, doomed: list[DropMessage]) -> None:
        opened = self._open_locked()
        if opened is None:
            raise MaildropError(f"mbox {self.path} has disappeared; nothing removed")
        lock, fd = opened
        try:
            info = os.fstat(fd)
            replaced = (info.st_dev, info.st_ino) != self._scanned_inode
            if replaced or info.st_size < self._scanned_end:
                raise MaildropError(
                    f"mbox {self.path} was replaced or shortened by another program during "
                    "the session; nothing removed"
                )
            self._rewrite(fd, info, {m.msgnum for m in doomed})
            log.info(
                "site %s: mbox %s rewritten without %d messages, keeping %d octets "
                "appended since the scan", self.site.name, self.path, len(doomed),
                info.st_size - self._scanned_end)
        finally:
            # After the rename the fd is on the old inode.  Closing it drops
            # the fcntl lock, and the dotlock is removed last, so a writer
            # waiting on the dotlock opens the new file.
            lock.release(keep_dotlock=False)

    def _rewrite(self, fd: int, info: os.stat_result, doomed: set[int]) -> None:
        """Write the kept messages and anything appended since the scan to a new file.

        The new file is fsynced and renamed over the mbox, then the folder is
        fsynced.  Rename, not truncate-in-place, so that a crash at any point
        leaves a complete mailbox.
        """
        folder = self.path.parent
        for stale in folder.glob(f".{self.path.name}{MBOX_EXPUNGE_TMP_MARK}*"):
            stale.unlink(missing_ok=True)
        tmp = folder / f".{self.path.name}{MBOX_EXPUNGE_TMP_MARK}{os.getpid()}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            keep: list[tuple[int, int]] = []
            position = 0
            for msgnum in sorted(self._entries):
                entry = self._entries[msgnum]
                if msgnum in doomed:
                    keep.append((position, entry.separator_start))
                    position = self._next_start(msgnum)
            keep.append((position, info.st_size))
            for start, end in keep:
                self._copy_range(fd, out, start, end)
            os.fchmod(out, stat.S_IMODE(info.st_mode))
            if os.geteuid() == 0:
                os.fchown(out, info.st_uid, info.st_gid)
            os.fsync(out)
        except BaseException:
            os.close(out)
            tmp.unlink(missing_ok=True)
            raise
        os.close(out)
        os.replace(tmp, self.path)
        fsync_dir(folder)

    def _next_start(self, msgnum: int) -> int:
        following = self._entries.get(msgnum + 1)
        return following.separator_start if following is not None else self._scanned_end

    def _copy_range(self, src: int, dst: int, start: int, end: int) -> None:
        while start < end:
            data = os.pread(src, min(self.chunk_octets, end - start), start)
            if not data:
                raise MaildropError(f"mbox {self.path} ended early at offset {start}")
            view = memoryview(data)
            while view:
                written = os.write(dst, view)
                view = view[written:]
            start += len(data)


class _MboxScan:
    """Size and digest of one mbox message, built line by line.

    The last line is held back until the next line arrives, because an empty
    last line is the separator the writer adds, not message content.
    """

    def __init__(self, separator_start: int, separator: bytes) -> None:
        self.separator = separator
        self.separator_start = separator_start
        self.start = separator_start + len(separator)
        self.end = self.start
        self._digest = hashlib.sha256(separator)
        self._size = 0
        self._held: bytes | None = None

    def add(self, line: bytes) -> None:
        if self._held is not None:
            self._commit(self._held)
        self._held = line

    def _commit(self, line: bytes) -> None:
        self._digest.update(line)
        self.end += len(line)
        unquoted = line[1:] if QUOTED_FROM_RE.match(line) else line
        self._size += len(unquoted)
        if unquoted.endswith(b"\n") and not unquoted.endswith(b"\r\n"):
            self._size += 1

    def finish(self) -> tuple[_MboxEntry, int, bytes]:
        held = self._held
        self._held = None
        # An empty last line is the separator; any other last line is content.
        if held is not None and held not in (b"\n", b"\r\n"):
            self._commit(held)
            if not held.endswith(b"\n"):
                self._size += 2
        entry = _MboxEntry(self.separator_start, self.start, self.end)
        return entry, self._size, self._digest.digest()
