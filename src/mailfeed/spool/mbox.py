"""mboxrd writer with dotlock and fcntl locking, truncating back on failure.

Format (mboxrd): each message starts with a ``From_`` line
``From <sender or MAILER-DAEMON> <asctime in UTC>``.  Every line of the block
and message that matches ``^>*From `` gets one more ``>``.  Every line end
(CRLF, bare CR or LF) is stored as LF.  The message ends in LF (one is added
if missing) and is followed by one empty line.  A reader removes one ``>`` from each line
matching ``^>+From `` and gets the block and message back with LF line ends.

Locking, in this order: the dotlock ``<mbox>.lock``, then an exclusive
fcntl lock (lockf) on the mbox itself, both within ``Limits.lock_timeout``.
The dotlock is made the NFS-safe way: a file with a name of its own
(``<mbox>.lock.<host>.<pid>.<thread>``) is created and given ``<pid>
<hostname>``, then link(2)ed to ``<mbox>.lock``; the link count of the own
file (2) tells whether the link took, even when an NFS reply is lost.  So a
dotlock never exists without its owner in it, whatever signal arrives.
Before the first octet is appended, the dotlock is rewritten as ``<pid>
<hostname> <length>`` (the length of the mbox before this append) and
fsynced.

Invariants:

* An exception from :func:`deliver` means the mbox was truncated back to its
  old length (and fsynced); if even that fails, the dotlock stays behind with
  the old length in it.
* After SIGKILL, the dotlock stays behind.  The next writer (or reader, via
  :func:`recover_stale_lock`) finds its owner dead, truncates the mbox to the
  recorded length and removes the lock, so a partial message never survives.
* The mbox and the lock are opened with O_NOFOLLOW relative to the folder
  that holds them, and the mbox must be a regular file.

Readers use the same locks: the POP3 maildrop (:mod:`mailfeed.maildrop.mbox`)
takes :class:`MboxLock` with :meth:`MboxLock.acquire_existing` to scan and
to rewrite the mbox, so a stale lock it meets is recovered (the partial
append cut off) before it reads a single octet.  Recovery never creates a
missing mbox.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mailfeed.config import Limits
from mailfeed.errors import TempFailure
from mailfeed.faults import fault_point
from mailfeed.spool.prepare import PreparedMessage, count_bare_lf

log = logging.getLogger(__name__)

__all__ = [
    "FAULT_POINTS",
    "MBOX_NULL_SENDER",
    "STALE_LOCK_AGE",
    "MboxLock",
    "MboxrdEncoder",
    "StoredMbox",
    "deliver",
    "from_line",
    "recover_stale_lock",
]

MBOX_NULL_SENDER = "MAILER-DAEMON"
FILE_MODE = 0o600
# A dotlock from another host (whose owner we cannot check) is stale after
# this many seconds.  NOTE: fixed, not configurable; it must exceed the
# longest time any program holds the lock.
STALE_LOCK_AGE = 900.0
# Polling interval bounds while waiting for a lock, in seconds.
LOCK_POLL_MIN = 0.01
LOCK_POLL_MAX = 0.25
# Octets collected before each write(2).
WRITE_SIZE = 64 * 1024

FAULT_POINTS = (
    "mbox.after_lock",
    "mbox.mid_write",
    "mbox.after_write",
    "mbox.after_fsync",
)

# fcntl locks belong to the process, so threads of one process (the MX
# daemon's workers) also serialise stale-lock recovery with this lock.
_recovery_lock = threading.Lock()


def from_line(sender: str, when: float) -> bytes:
    """Return the ``From_`` line for a message from ``sender`` stored at ``when``."""
    stamp = time.asctime(time.gmtime(when))
    return f"From {sender or MBOX_NULL_SENDER} {stamp}\n".encode("utf-8", "surrogateescape")


class MboxrdEncoder:
    """Turn a stream of chunks into mboxrd lines: line ends to LF, ``^>*From `` quoted.

    mbox lines end in LF, so CRLF and a bare CR both become LF.  A bare CR
    is a line end in the delivered form too (it becomes CRLF on SMTP), so
    mapping it to LF keeps what the site receives unchanged, whereas keeping
    it would merge a CR CR LF pair into one line end.

    Chunks may split lines anywhere.  :attr:`size` and :attr:`wsize` count
    what a reader gets back after removing the quoting, including the LF
    added at the end when the message has none.
    """

    def __init__(self) -> None:
        self.size = 0
        self.wsize = 0
        self._pending_cr = False
        self._at_line_start = True
        self._in_prefix = False
        self._tail = b""
        self._prev_cr = False
        self._last = b"\n"

    def _count(self, data: bytes) -> bytes:
        if data:
            self.size += len(data)
            self.wsize += len(data) + count_bare_lf(data, self._prev_cr)
            self._prev_cr = data[-1:] == b"\r"
            self._last = data[-1:]
        return data

    def encode(self, chunk: bytes) -> Iterator[bytes]:
        """Yield the mboxrd form of one chunk (output may lag by a few octets)."""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        yield from self._quote(chunk)

    def _quote(self, data: bytes) -> Iterator[bytes]:
        pos = 0
        end = len(data)
        while pos < end:
            if self._at_line_start:
                self._at_line_start = False
                self._in_prefix = True
                self._tail = b""
            if self._in_prefix:
                if not self._tail:
                    stripped = data[pos:].lstrip(b">")
                    run = end - pos - len(stripped)
                    if run:
                        yield self._count(data[pos : pos + run])
                        pos += run
                    if pos == end:
                        return
                take = data[pos : pos + 5 - len(self._tail)]
                newline = take.find(b"\n")
                if newline >= 0:
                    take = take[: newline + 1]
                self._tail += take
                pos += len(take)
                if self._tail == b"From ":
                    yield b">"
                elif b"From "[: len(self._tail)] == self._tail:
                    return  # undecided until more data arrives
                self._in_prefix = False
                yield self._count(self._tail)
                if self._tail.endswith(b"\n"):
                    self._at_line_start = True
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                yield self._count(data[pos:])
                return
            yield self._count(data[pos : newline + 1])
            pos = newline + 1
            self._at_line_start = True

    def finish(self) -> Iterator[bytes]:
        """Yield what is held back, a final LF if missing, and the empty separator line."""
        if self._pending_cr:
            self._pending_cr = False
            yield from self._quote(b"\n")
        if self._in_prefix and self._tail:
            self._in_prefix = False
            yield self._count(self._tail)
        if self._last != b"\n":
            yield self._count(b"\n")
        yield b"\n"


@dataclass(frozen=True)
class StoredMbox:
    """The location of an append: the mbox, the offset of its ``From_`` line, sizes."""

    path: Path
    offset: int
    size: int
    wsize: int


def _hostname() -> str:
    return os.uname().nodename or "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse_lock(content: bytes) -> tuple[int | None, str | None, int | None]:
    parts = content.split()
    try:
        pid = int(parts[0]) if parts else None
        host = parts[1].decode("utf-8", "replace") if len(parts) > 1 else None
        length = int(parts[2]) if len(parts) > 2 else None
    except ValueError:
        return None, None, None
    return pid, host, length


def _read_lock(lock_name: str, dir_fd: int) -> tuple[bytes, os.stat_result] | None:
    try:
        fd = os.open(lock_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 4096), os.fstat(fd)
    finally:
        os.close(fd)


def _is_stale(content: bytes, st: os.stat_result) -> bool:
    pid, host, _length = _parse_lock(content)
    if pid is not None and host == _hostname():
        return not _pid_alive(pid)
    return time.time() - st.st_mtime > STALE_LOCK_AGE


def _lockf(fd: int, deadline: float, shown: Path) -> None:
    """Take the exclusive fcntl lock on ``fd`` (open for writing), polling until ``deadline``."""
    delay = LOCK_POLL_MIN
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise TempFailure(f"timed out waiting for the fcntl lock on {shown}")
        time.sleep(delay)
        delay = min(delay * 2, LOCK_POLL_MAX)


def _open_mbox(name: str, dir_fd: int, shown: Path, *, create: bool = True) -> int:
    """Open the mbox for appending (``create``: made if missing) or for reading and writing.

    Without ``create``, a missing mbox raises FileNotFoundError.
    """
    if create:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    else:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TempFailure(f"mbox {shown} rejected: it is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TempFailure(f"mbox {shown} rejected: it is not a regular file")
    return fd


def _open_parent(path: Path) -> int:
    try:
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TempFailure(f"cannot open mbox {path}: folder {path.parent} does not exist") from None


def recover_stale_lock(path: Path) -> bool:
    """Remove the dotlock of ``path`` if its owner is gone, truncating the mbox first.

    Return True when a stale lock was removed.  The mbox is truncated to the
    length recorded in the lock, under the mbox's fcntl lock.
    """
    dir_fd = _open_parent(path)
    try:
        return _recover(path, dir_fd, time.monotonic() + LOCK_POLL_MAX * 4)
    finally:
        os.close(dir_fd)


def _recover(path: Path, dir_fd: int, deadline: float) -> bool:
    lock_name = path.name + ".lock"
    seen = _read_lock(lock_name, dir_fd)
    if seen is None or not _is_stale(*seen):
        return False
    with _recovery_lock:
        try:
            fd = _open_mbox(path.name, dir_fd, path, create=False)
        except FileNotFoundError:
            # The owner died before it opened the mbox: nothing to cut back.
            fd = -1
        try:
            if fd >= 0:
                _lockf(fd, deadline, path)
            again = _read_lock(lock_name, dir_fd)
            if again is None:
                return False
            content, st = again
            if (
                content != seen[0]
                or st.st_ino != seen[1].st_ino
                or st.st_mtime_ns != seen[1].st_mtime_ns
            ):
                return False
            pid, host, length = _parse_lock(content)
            size = os.fstat(fd).st_size if fd >= 0 else 0
            if length is not None and size > length:
                os.ftruncate(fd, length)
                os.fsync(fd)
                log.warning(
                    "mbox %s: cut a partial append back from %d to %d octets "
                    "(lock owner pid %s on %s is gone)", path, size, length, pid, host)
            os.unlink(lock_name, dir_fd=dir_fd)
            log.warning("mbox %s: removed the stale dotlock of pid %s on %s", path, pid, host)
            return True
        finally:
            if fd >= 0:
                os.close(fd)


class MboxLock:
    """The dotlock and fcntl lock on one mbox, held while appending, scanning or rewriting.

    ``timeout`` bounds the wait for both locks together, in seconds.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.lock_name = path.name + ".lock"
        self.dir_fd = -1
        self.lock_fd = -1
        self.mbox_fd = -1

    def acquire(self) -> int:
        """Take both locks and return the mbox descriptor (opened for appending, created)."""
        fd = self._acquire(create=True)
        assert fd is not None
        return fd

    def acquire_existing(self) -> int | None:
        """Take both locks and return the mbox opened for reading and writing.

        Return None, holding no lock, when the mbox does not exist.  A stale
        dotlock met on the way is recovered first, as for a writer.
        """
        return self._acquire(create=False)

    def _acquire(self, *, create: bool) -> int | None:
        deadline = time.monotonic() + self.timeout
        self.dir_fd = _open_parent(self.path)
        try:
            self._dotlock(deadline)
            try:
                self.mbox_fd = _open_mbox(self.path.name, self.dir_fd, self.path, create=create)
            except FileNotFoundError:
                if create:
                    raise
                self.release(keep_dotlock=False)
                return None
            _lockf(self.mbox_fd, deadline, self.path)
        except BaseException:
            self.release(keep_dotlock=False)
            raise
        return self.mbox_fd

    def _dotlock(self, deadline: float) -> None:
        delay = LOCK_POLL_MIN
        while True:
            if self._link_dotlock():
                break
            if _recover(self.path, self.dir_fd, deadline):
                continue
            if time.monotonic() >= deadline:
                raise TempFailure(
                    f"timed out after {self.timeout:g} s waiting for the lock "
                    f"{self.path.parent / self.lock_name}; if no program holds it, remove it"
                )
            time.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)

    def _link_dotlock(self) -> bool:
        """Try once to create the dotlock with its content; True if it is ours.

        On success ``lock_fd`` is open on the dotlock.
        """
        own = f"{self.lock_name}.{_hostname()}.{os.getpid()}.{threading.get_ident()}"
        # A file of this name is a leftover of a dead process or thread that
        # had our pid and thread id: never a lock.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(own, dir_fd=self.dir_fd)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(own, flags, FILE_MODE, dir_fd=self.dir_fd)
        try:
            _write_all(fd, f"{os.getpid()} {_hostname()}\n".encode())
            try:
                os.link(own, self.lock_name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                        follow_symlinks=False)
            except FileExistsError:
                pass
            except OSError:
                # An error may hide a link that took (a lost NFS reply): the
                # link count decides.
                if os.fstat(fd).st_nlink != 2:
                    raise
        finally:
            try:
                if os.fstat(fd).st_nlink == 2:
                    # Ours, even if an exception is on its way: release() removes it.
                    self.lock_fd = fd
                os.unlink(own, dir_fd=self.dir_fd)
            finally:
                if self.lock_fd != fd:
                    os.close(fd)
        return self.lock_fd == fd

    def record_length(self, length: int) -> None:
        """Write the mbox's length before the append into the dotlock, durably."""
        data = f"{os.getpid()} {_hostname()} {length}\n".encode()
        os.pwrite(self.lock_fd, data, 0)
        os.fsync(self.lock_fd)

    def release(self, *, keep_dotlock: bool) -> None:
        """Drop both locks; ``keep_dotlock`` leaves the dotlock for stale recovery."""
        if self.mbox_fd >= 0:
            os.close(self.mbox_fd)  # closing drops the fcntl lock
            self.mbox_fd = -1
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
            if not keep_dotlock:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_name, dir_fd=self.dir_fd)
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _mbox_bytes(prepared: PreparedMessage, encoder: MboxrdEncoder) -> Iterable[bytes]:
    yield from_line(prepared.envelope.sender, time.time())
    for chunk in prepared.chunks():
        yield from encoder.encode(chunk)
    yield from encoder.finish()


def deliver(path: Path, prepared: PreparedMessage, limits: Limits) -> StoredMbox:
    """Append the prepared message to the mbox at ``path``; see the module invariants."""
    lock = MboxLock(path, limits.lock_timeout)
    fd = lock.acquire()
    keep_dotlock = False
    try:
        old_length = os.fstat(fd).st_size
        lock.record_length(old_length)
        fault_point("mbox.after_lock")
        encoder = MboxrdEncoder()
        try:
            first = True
            buffer: list[bytes] = []
            buffered = 0
            for data in _mbox_bytes(prepared, encoder):
                buffer.append(data)
                buffered += len(data)
                if first or buffered >= WRITE_SIZE:
                    _write_all(fd, b"".join(buffer))
                    buffer.clear()
                    buffered = 0
                if first:
                    # Only the From_ line is on disk: a partial message.
                    fault_point("mbox.mid_write")
                    first = False
            _write_all(fd, b"".join(buffer))
            fault_point("mbox.after_write")
            os.fsync(fd)
            fault_point("mbox.after_fsync")
        except BaseException:
            keep_dotlock = not _truncate(fd, old_length)
            raise
    finally:
        lock.release(keep_dotlock=keep_dotlock)
    return StoredMbox(path, old_length, encoder.size, encoder.wsize)


def _truncate(fd: int, length: int) -> bool:
    """Truncate the mbox back to ``length`` and fsync; return False if that failed."""
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    except OSError:
        return False
    return True
