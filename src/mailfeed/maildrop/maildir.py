"""A Maildir spool as a POP3 maildrop.

Files in ``new/`` and ``cur/`` are named ``<unique>,S=<octets>,W=<wire
octets>`` and optionally ``:2,<flags>`` in ``cur/``.  ``S`` is the file size
and ``W`` the size with every bare LF counted as CRLF.  A name without
``S``/``W`` (or whose ``S`` disagrees with the file size) costs one read of
the file; the result is cached in memory by device, inode, size and mtime.
The session lock is an fcntl lock on ``mailfeed-pop3.lock`` inside the
Maildir, plus the in-process guard.

The unique-id is the unique part of the file name (before the first ``,``
or ``:``) when it is 1 to 70 safe characters and does not start with
``~``; otherwise ``~`` followed by 40 hex digits of its SHA-256.  The unique
part never changes when a file moves from new/ to cur/ or gains flags, and
Maildir writers never reuse it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from mailfeed.config import SiteConfig
from mailfeed.durable import fsync_dir
from mailfeed.maildrop.base import (
    HASHED_UIDL_PREFIX,
    READ_CHUNK_OCTETS,
    UIDL_SAFE_RE,
    DropMessage,
    Maildrop,
    MaildropError,
    _hashed_uidl,
)
from mailfeed.maildrop.lock import _SessionLock
from mailfeed.maildrop.wire import MessageReader

log = logging.getLogger(__name__)

MAILDIR_LOCK_NAME = "mailfeed-pop3.lock"
MAILDIR_SIZE_RE = re.compile(r",([SW])=(\d+)")
# (st_dev, st_ino, st_size, st_mtime_ns) -> wire size, for Maildir files without S=/W=.
_size_cache: dict[tuple[int, int, int, int], int] = {}
_SIZE_CACHE_MAX = 100_000




@dataclass
class _MaildirEntry:
    folder: str
    name: str
    unique: str


class MaildirDrop(Maildrop):
    """A Maildir spool (see the module docstring for names, sizes and unique-ids)."""

    def __init__(self, site: SiteConfig, *, chunk_octets: int = READ_CHUNK_OCTETS) -> None:
        self._entries: dict[int, _MaildirEntry] = {}
        super().__init__(site, chunk_octets=chunk_octets)
        self._root = os.fspath(self.path)

    def _make_session_lock(self) -> _SessionLock:
        lock_file = self.path / MAILDIR_LOCK_NAME if self.path.is_dir() else None
        return _SessionLock(f"maildir:{os.path.realpath(self.path)}", lock_file, self.site.name)

    def _scan(self) -> list[DropMessage]:
        names: list[tuple[str, str]] = []
        for folder in ("new", "cur"):
            try:
                listing = os.listdir(self.path / folder)
            except FileNotFoundError:
                continue
            names.extend((folder, name) for name in listing if not name.startswith("."))
        names.sort(key=lambda item: item[1])
        messages: list[DropMessage] = []
        self._entries = {}
        seen: dict[str, int] = {}
        for folder, name in names:
            # A str path: pathlib's joins cost as much as the open itself.
            size = self._wire_size(f"{self._root}/{folder}/{name}", name)
            if size is None:
                continue
            unique = name.split(":", 1)[0].split(",", 1)[0]
            uidl = self._uidl_for(unique)
            count = seen.get(uidl, 0) + 1
            seen[uidl] = count
            if count > 1:
                # Two files with one unique part break the Maildir rules; keep both visible.
                log.warning("site %s: duplicate Maildir unique part %r", self.site.name, unique)
                uidl = _hashed_uidl(f"{folder}/{name}".encode())
            msgnum = len(messages) + 1
            messages.append(DropMessage(msgnum, uidl, size))
            self._entries[msgnum] = _MaildirEntry(folder, name, unique)
        return messages

    @staticmethod
    def _uidl_for(unique: str) -> str:
        raw = unique.encode("utf-8", "surrogateescape")
        if UIDL_SAFE_RE.fullmatch(raw) and not unique.startswith(HASHED_UIDL_PREFIX):
            return unique
        return _hashed_uidl(raw)

    def _wire_size(self, path: str, name: str) -> int | None:
        sizes = dict(MAILDIR_SIZE_RE.findall(name.split(":", 1)[0]))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # moved or removed by another program since the listing
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                log.warning("site %s: skipping symlink %s", self.site.name, path)
                return None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            if "S" in sizes and "W" in sizes and int(sizes["S"]) == info.st_size:
                if info.st_size == 0:
                    return 0
                last = os.pread(fd, 1, info.st_size - 1)
                return int(sizes["W"]) + (0 if last == b"\n" else 2)
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            cached = _size_cache.get(key)
            if cached is not None:
                return cached
            size = self._count_wire_size(fd)
            if len(_size_cache) >= _SIZE_CACHE_MAX:
                _size_cache.clear()
            _size_cache[key] = size
            return size
        finally:
            os.close(fd)

    def _count_wire_size(self, fd: int) -> int:
        total = 0
        with MessageReader(os.dup(fd), 0, None, unquote=False, chunk_octets=self.chunk_octets) as r:
            for chunk in r:
                total += len(chunk)
        return total

    def _locate(self, entry: _MaildirEntry) -> Path | None:
        path = self.path / entry.folder / entry.name
        if os.path.lexists(path):
            return path
        # Another program may have moved the file to cur/ or changed its flags.
        for folder in ("cur", "new"):
            try:
                listing = os.listdir(self.path / folder)
            except FileNotFoundError:
                continue
            for name in listing:
                if name.split(":", 1)[0].split(",", 1)[0] == entry.unique:
                    return self.path / folder / name
        return None

    def open_quick(self, msgnum: int) -> MessageReader | None:
        entry = self._entries[msgnum]
        try:
            # A str path, as in _scan.
            fd = os.open(f"{self._root}/{entry.folder}/{entry.name}",
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None  # moved, renamed or unreadable: open() searches and reports
        return MessageReader(fd, 0, None, unquote=False, chunk_octets=self.chunk_octets)

    def open(self, msgnum: int) -> MessageReader:
        entry = self._entries[msgnum]
        path = self._locate(entry)
        if path is None:
            raise MaildropError(f"message {msgnum} of site {self.site.name!r} has disappeared")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return MessageReader(fd, 0, None, unquote=False, chunk_octets=self.chunk_octets)

    def _expunge(self, doomed: list[DropMessage]) -> None:
        folders: set[str] = set()
        for message in doomed:
            entry = self._entries[message.msgnum]
            path = self._locate(entry)
            if path is None:
                log.info("site %s: message %s already gone", self.site.name, message.uidl)
                continue
            os.unlink(path)
            folders.add(path.parent.name)
            log.debug("site %s: removed %s (%s)", self.site.name, message.uidl, path.name)
        for folder in folders:
            fsync_dir(self.path / folder)
