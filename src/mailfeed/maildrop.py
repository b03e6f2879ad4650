"""A site's spool as a POP3 maildrop (RFC 1939 section 3): no sockets here.

The POP3 server opens the spool of the site a user logs in to and locks it
for the session.  This module lists the messages with their exact sizes and
unique-ids, streams each message in its wire form, and removes the deleted
ones when the server enters the UPDATE state.  Two spool formats are read:

Maildir
    Files in ``new/`` and ``cur/`` named
    ``<unique>,S=<octets>,W=<wire octets>`` and optionally ``:2,<flags>``
    in ``cur/``.  ``S`` is the file size and ``W`` the size with every bare LF
    counted as CRLF.  A name without ``S``/``W`` (or whose ``S`` disagrees
    with the file size) costs one read of the file; the result is cached in
    memory by device, inode, size and mtime.  The session lock is an fcntl
    lock on ``mailfeed-pop3.lock`` inside the Maildir, plus an in-process
    guard, because fcntl locks do not exclude a second lock taken by the same
    process.

mbox (mboxrd)
    Messages start at ``From `` lines; body lines matching ``^>*From `` were
    stored with one extra ``>``, which is removed on the way out.  The writer
    puts one empty line after each message; that line is not part of the
    message.  The session lock is an fcntl lock on ``<mbox>.mailfeed-pop3.lock``
    (plus the in-process guard); the mbox itself is locked (dotlock, then
    fcntl on the file) only while it is scanned and while it is rewritten, so
    the MX side can append during a session.

Wire form and sizes
    A message goes out with every bare LF sent as CRLF; CRLF and bare CR are
    sent as stored.  A non-empty message whose last line has no line end gets
    one CRLF appended, and that CRLF counts in its size, so LIST, STAT and
    the octets RETR sends (before dot-stuffing) always agree.  An empty
    message is sent as zero octets.  :class:`WireConverter` produces this form
    and :func:`wire_size_of` counts it; both use the same rules.

Unique-ids (RFC 1939 section 7, UIDL)
    1 to 70 characters of 0x21-0x7E, stable across sessions and restarts.

    * Maildir: the unique part of the file name (before the first ``,`` or
      ``:``) when it is 1 to 70 safe characters and does not start with
      ``~``; otherwise ``~`` followed by 40 hex digits of its SHA-256.  The
      unique part never changes when a file moves from new/ to cur/ or gains
      flags, and Maildir writers never reuse it.
    * mbox: ``~`` followed by 40 hex digits of the SHA-256 of the ``From_``
      line and the stored message.  The ``From_`` line carries the envelope
      sender and the delivery time to the second, and mailfeed's messages
      start with the envelope block, so two different deliveries share a
      unique-id only if the same message bytes reached the same site in the
      same second.  Within one listing, repeats get ``-2``, ``-3``, ... in
      file order.  NOTE: such a repeat after an expunge would reuse the
      unique-id of the deleted copy; mbox has no place to store a counter.

Invariants
    Nothing is removed except by :meth:`Maildrop.expunge`, which the server
    calls only in the UPDATE state.  An mbox is rewritten into a new file that
    is fsynced and renamed over the old one while both mbox locks are held, so
    a crash leaves either the old or the new mailbox, never a mix; writers
    must take the dotlock before opening the mbox (mailfeed's writer does).
    Every method here blocks: the asyncio server calls them in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mailfeed.config import SiteConfig
from mailfeed.errors import TempFailure

__all__ = [
    "MAX_UIDL_LENGTH",
    "DropMessage",
    "MaildirDrop",
    "Maildrop",
    "MaildropError",
    "MaildropInUse",
    "MboxDrop",
    "MessageReader",
    "WireConverter",
    "open_maildrop",
    "wire_size_of",
]

log = logging.getLogger(__name__)

# RFC 1939 section 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UIDL_LENGTH = 70
UIDL_SAFE_RE = re.compile(rb"[\x21-\x7e]{1,70}")
HASHED_UIDL_PREFIX = "~"
HASHED_UIDL_HEX_DIGITS = 40

MAILDIR_LOCK_NAME = "mailfeed-pop3.lock"
MBOX_SESSION_LOCK_SUFFIX = ".mailfeed-pop3.lock"
MBOX_EXPUNGE_TMP_MARK = ".mailfeed-expunge-"
# A dotlock older than this is taken to be left over from a crashed writer.
STALE_DOTLOCK_SECONDS = 300.0
DEFAULT_LOCK_TIMEOUT = 30.0
LOCK_POLL_SECONDS = 0.05
READ_CHUNK_OCTETS = 256 * 1024
MBOX_SEPARATOR = b"From "
QUOTED_FROM_RE = re.compile(rb"^>(>*From )", re.MULTILINE)
# A partial line that may still become a quoted From line once more data arrives.
PARTIAL_QUOTED_FROM_RE = re.compile(rb">+(?:F(?:r(?:o(?:m)?)?)?)?")
MAILDIR_SIZE_RE = re.compile(r",([SW])=(\d+)")

# Paths held by a session of this process: fcntl locks do not exclude the same process.
_held_locks: set[str] = set()
_held_locks_guard = threading.Lock()
# (st_dev, st_ino, st_size, st_mtime_ns) -> wire size, for Maildir files without S=/W=.
_size_cache: dict[tuple[int, int, int, int], int] = {}
_SIZE_CACHE_MAX = 100_000


class MaildropError(TempFailure):
    """The maildrop cannot be read, locked or updated; retrying later may work."""


class MaildropInUse(MaildropError):
    """Another session holds the maildrop lock (POP3 response code IN-USE, RFC 2449)."""


@dataclass
class DropMessage:
    """One message of a locked maildrop as POP3 numbers and sizes it."""

    msgnum: int
    uidl: str
    # Octets the client receives before dot-stuffing (RFC 1939 LIST "exact size").
    size: int


class WireConverter:
    """Turn stored message bytes into the POP3 wire form, chunk by chunk.

    Bare LF becomes CRLF; CRLF and bare CR pass unchanged.  With ``unquote``
    (mboxrd), one ``>`` is removed from lines matching ``^>+From ``.
    :meth:`finish` appends CRLF when the output is non-empty and does not end
    with CRLF.  Output chunks never end between a CR and its LF.
    """

    def __init__(self, *, unquote: bool = False) -> None:
        self._unquote = unquote
        self._pending_cr = False
        self._tail = b""
        # mboxrd state: an incomplete line held back and whether the input is mid-line.
        self._carry = b""
        self._mid_line = False

    def feed(self, data: bytes) -> bytes:
        if self._unquote:
            data = self._unquote_chunk(data)
        return self._convert(data)

    def finish(self) -> bytes:
        data = self._carry
        self._carry = b""
        out = self._convert(data)
        if self._pending_cr:
            out += b"\r"
            self._pending_cr = False
            self._tail = (self._tail + b"\r")[-2:]
        if self._tail and self._tail != b"\r\n":
            out += b"\r\n"
            self._tail = b"\r\n"
        return out

    def _convert(self, data: bytes) -> bytes:
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if out:
            self._tail = (self._tail + out)[-2:]
        return out

    def _unquote_chunk(self, data: bytes) -> bytes:
        data = self._carry + data
        self._carry = b""
        head = b""
        if self._mid_line:
            newline = data.find(b"\n")
            if newline < 0:
                return data
            head, data = data[: newline + 1], data[newline + 1 :]
            self._mid_line = False
        last_newline = data.rfind(b"\n")
        body, tail = data[: last_newline + 1], data[last_newline + 1 :]
        body = QUOTED_FROM_RE.sub(rb"\1", body)
        if tail and PARTIAL_QUOTED_FROM_RE.fullmatch(tail):
            self._carry = tail
            tail = b""
        elif tail:
            tail = QUOTED_FROM_RE.sub(rb"\1", tail)
            self._mid_line = True
        return head + body + tail


def wire_size_of(stored: bytes, *, unquote: bool = False) -> int:
    """Return the octets :class:`WireConverter` produces for ``stored``."""
    if unquote:
        stored = QUOTED_FROM_RE.sub(rb"\1", stored)
    size = len(stored) + stored.count(b"\n") - stored.count(b"\r\n")
    if stored and not stored.endswith(b"\n"):
        size += 2
    return size


class MessageReader:
    """The wire form of one message, read from its file in chunks.

    Iterate for chunks (line ends converted, not dot-stuffed), or call
    :meth:`read_chunk` until it returns ``b""``.  Close it when done.
    """

    def __init__(
        self, fd: int, start: int, end: int | None, *, unquote: bool, chunk_octets: int
    ) -> None:
        self._fd = fd
        self._offset = start
        self._end = end
        self._chunk_octets = chunk_octets
        self._converter = WireConverter(unquote=unquote)
        self._done = False

    def read_chunk(self) -> bytes:
        """Return the next non-empty wire chunk, or ``b""`` at the end."""
        while not self._done:
            want = self._chunk_octets
            if self._end is not None:
                want = min(want, self._end - self._offset)
            data = os.pread(self._fd, want, self._offset) if want > 0 else b""
            if not data:
                self._done = True
                return self._converter.finish()
            self._offset += len(data)
            out = self._converter.feed(data)
            if out:
                return out
        return b""

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read_chunk():
            yield chunk

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MessageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hashed_uidl(data: bytes) -> str:
    return HASHED_UIDL_PREFIX + hashlib.sha256(data).hexdigest()[:HASHED_UIDL_HEX_DIGITS]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SessionLock:
    """An exclusive lock for one POP3 session: in-process guard plus an fcntl lock file."""

    def __init__(self, key: str, lock_file: Path | None, site: str) -> None:
        self._key = key
        self._lock_file = lock_file
        self._site = site
        self._fd = -1
        self.held = False

    def acquire(self) -> None:
        with _held_locks_guard:
            if self._key in _held_locks:
                raise MaildropInUse(f"maildrop of site {self._site!r} is locked by another session")
            _held_locks.add(self._key)
        try:
            if self._lock_file is not None:
                self._fd = self._lock_fd(self._lock_file)
        except BaseException:
            with _held_locks_guard:
                _held_locks.discard(self._key)
            raise
        self.held = True

    def _lock_fd(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MaildropError(
                f"cannot open lock file {path}: {exc.strerror}; check that the spool "
                "folder exists and is writable by the POP3 server"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise MaildropInUse(
                    f"maildrop of site {self._site!r} is locked by another process ({path})"
                ) from None
            raise MaildropError(f"cannot lock {path}: {exc.strerror}") from None
        return fd

    def release(self) -> None:
        if not self.held:
            return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with _held_locks_guard:
            _held_locks.discard(self._key)
        self.held = False


class Maildrop(ABC):
    """A site's spool seen by one POP3 session.

    Call :meth:`lock` first; it scans the spool and fills :attr:`messages`
    (numbered from 1).  :meth:`unlock` ends the session without changes.
    """

    def __init__(self, site: SiteConfig, *, chunk_octets: int = READ_CHUNK_OCTETS) -> None:
        self.site = site
        self.path = site.path
        self.chunk_octets = chunk_octets
        self.messages: list[DropMessage] = []
        self._session_lock = self._make_session_lock()

    @abstractmethod
    def _make_session_lock(self) -> _SessionLock: ...

    @abstractmethod
    def _scan(self) -> list[DropMessage]: ...

    @abstractmethod
    def open(self, msgnum: int) -> MessageReader:
        """Open message ``msgnum`` for reading in its wire form."""

    @abstractmethod
    def _expunge(self, doomed: list[DropMessage]) -> None: ...

    @property
    def locked(self) -> bool:
        return self._session_lock.held

    def lock(self) -> None:
        """Lock the maildrop for this session and list its messages.

        Raise :class:`MaildropInUse` if another session has it locked, or
        :class:`MaildropError` if the spool cannot be read.
        """
        self._session_lock.acquire()
        try:
            self.messages = self._scan()
        except OSError as exc:
            self._session_lock.release()
            raise MaildropError(f"cannot read the spool {self.path}: {exc}") from None
        except BaseException:
            self._session_lock.release()
            raise

    def unlock(self) -> None:
        """Release the session lock; nothing is removed."""
        self._session_lock.release()

    def message(self, msgnum: int) -> DropMessage:
        if not 1 <= msgnum <= len(self.messages):
            raise KeyError(msgnum)
        return self.messages[msgnum - 1]

    def expunge(self, msgnums: Iterable[int]) -> None:
        """Remove the given messages from the spool, durably, under the session lock."""
        if not self.locked:
            raise MaildropError(f"expunge of site {self.site.name!r} without the session lock")
        doomed = [self.message(n) for n in sorted(set(msgnums))]
        if doomed:
            self._expunge(doomed)


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
            size = self._wire_size(self.path / folder / name, name)
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

    def _wire_size(self, path: Path, name: str) -> int | None:
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
            _fsync_dir(self.path / folder)


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

    # -- mbox locks: dotlock first, then fcntl on the mbox itself.

    def _dotlock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _take_dotlock(self) -> Path:
        dotlock = self._dotlock_path()
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fd = os.open(dotlock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._break_stale_dotlock(dotlock)
            else:
                with os.fdopen(fd, "w") as fp:
                    fp.write(f"{os.getpid()}@{socket.gethostname()}\n")
                return dotlock
            if time.monotonic() >= deadline:
                raise MaildropError(
                    f"timed out after {self.lock_timeout:g} s waiting for {dotlock}; remove it "
                    "if no program is writing the mbox"
                )
            time.sleep(LOCK_POLL_SECONDS)

    @staticmethod
    def _break_stale_dotlock(dotlock: Path) -> None:
        try:
            age = time.time() - dotlock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_DOTLOCK_SECONDS:
            log.warning("removing stale dotlock %s (%.0f s old)", dotlock, age)
            dotlock.unlink(missing_ok=True)

    def _lock_mbox_fd(self, fd: int) -> None:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise MaildropError(
                    f"timed out after {self.lock_timeout:g} s waiting for the fcntl lock "
                    f"on {self.path}"
                )
            time.sleep(LOCK_POLL_SECONDS)

    def _open_locked(self) -> tuple[Path, int] | None:
        """Take both mbox locks; return the dotlock and an fd, or None if there is no mbox."""
        dotlock = self._take_dotlock()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            dotlock.unlink(missing_ok=True)
            return None
        except BaseException:
            dotlock.unlink(missing_ok=True)
            raise
        try:
            self._lock_mbox_fd(fd)
        except BaseException:
            os.close(fd)
            dotlock.unlink(missing_ok=True)
            raise
        return dotlock, fd

    # -- scanning

    def _scan(self) -> list[DropMessage]:
        opened = self._open_locked()
        self._entries = {}
        if opened is None:
            self._scanned_end = 0
            self._scanned_inode = None
            return []
        dotlock, fd = opened
        try:
            info = os.fstat(fd)
            self._scanned_inode = (info.st_dev, info.st_ino)
            with os.fdopen(os.dup(fd), "rb") as fp:
                return self._parse(fp)
        finally:
            os.close(fd)
            dotlock.unlink(missing_ok=True)

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
        dotlock, fd = opened
        try:
            info = os.fstat(fd)
            replaced = (info.st_dev, info.st_ino) != self._scanned_inode
            if replaced or info.st_size < self._scanned_end:
                raise MaildropError(
                    f"mbox {self.path} was replaced or shortened by another program during "
                    "the session; nothing removed"
                )
            self._rewrite(fd, info, {m.msgnum for m in doomed})
        finally:
            os.close(fd)
            dotlock.unlink(missing_ok=True)

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
        _fsync_dir(folder)

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


def open_maildrop(site: SiteConfig, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Maildrop:
    """Return the maildrop of ``site`` (not yet locked).

    Raise :class:`MaildropError` for a spool format that POP3 cannot serve
    (the pipe format hands mail to another program and keeps nothing).
    """
    if site.format == "maildir":
        return MaildirDrop(site)
    if site.format == "mbox":
        return MboxDrop(site, lock_timeout=lock_timeout)
    raise MaildropError(
        f"site {site.name!r} uses spool format {site.format!r}, which POP3 cannot serve; "
        "use maildir or mbox"
    )
