"""Maildir writer: one file per message, durable before it is visible.

Steps (each a named fault point, see :data:`FAULT_POINTS`):

1. open the Maildir and its ``tmp``, ``new`` and ``cur`` folders with
   O_NOFOLLOW, creating any that are missing with mode 0700;
2. create ``tmp/<unique>`` with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600;
3. write the chunks, then fsync the file;
4. link it as ``new/<unique>,S=<size>,W=<wsize>`` and unlink the tmp name;
5. fsync the ``new`` folder, so the name survives a power loss.

Invariants: a file appears in ``new`` only complete and fsynced.  On any
error the tmp file and, if it was already linked, the ``new`` file are
unlinked, so an exception means nothing was stored.  After SIGKILL a
file may remain in ``tmp``.  No reader takes a ``tmp`` file for a message,
and Maildir readers delete ``tmp`` files older than 36 hours.

All operations work relative to open folder descriptors, so a symbolic link
swapped in after the checks cannot redirect a write.  The folder that holds
the Maildir is opened as configured (the admin's path); from the Maildir
itself down, every component must be a real folder or file.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import itertools
import os
import time
from pathlib import Path

from mailfeed.errors import TempFailure
from mailfeed.faults import fault_point
from mailfeed.spool.prepare import PreparedMessage

__all__ = ["FAULT_POINTS", "MAILDIR_SUBDIRS", "deliver", "open_maildir", "unique_name"]

MAILDIR_SUBDIRS = ("tmp", "new", "cur")
DIR_MODE = 0o700
FILE_MODE = 0o600
# Attempts at a fresh unique name when one already exists (EEXIST).
MAX_NAME_ATTEMPTS = 5

FAULT_POINTS = (
    "maildir.after_tmp_open",
    "maildir.mid_write",
    "maildir.after_tmp_write",
    "maildir.after_fsync",
    "maildir.after_link",
    "maildir.after_dir_fsync",
)

_counter = itertools.count(1)
# _thread, not threading: one import less for mailfeed-fwd, one process per message.
_counter_lock = _thread.allocate_lock()
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _hostname() -> str:
    # The Maildir name uses '/' as nothing and ':' as the info separator.
    return os.uname().nodename.replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name() -> str:
    """Return a new unique base name: ``<sec>.M<usec>P<pid>Q<seq>R<hex>.<host>``."""
    with _counter_lock:
        seq = next(_counter)
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{seq}R{os.urandom(8).hex()}.{_hostname()}"


def _open_dir(name: str, parent_fd: int | None, shown: Path) -> int:
    """Open (creating if missing) one folder below ``parent_fd`` without following links.

    An OSError names the whole path ``shown``, not just ``name``.
    """
    try:
        return _open_dir_at(name, parent_fd, shown)
    except OSError as exc:
        if exc.strerror and exc.filename is not None and str(exc.filename) != str(shown):
            raise type(exc)(exc.errno, exc.strerror, str(shown)) from None
        raise


def _open_dir_at(name: str, parent_fd: int | None, shown: Path) -> int:
    for _ in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise TempFailure(
                    f"Maildir folder {shown} rejected: it is a symbolic link or not a folder"
                ) from None
            raise
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


class MaildirFds:
    """Open descriptors of a Maildir's ``tmp`` and ``new`` folders."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fds: list[int] = []
        try:
            try:
                parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise TempFailure(
                    f"cannot create Maildir {path}: folder {path.parent} does not exist"
                ) from None
            fds.append(parent)
            root = _open_dir(path.name, parent, path)
            fds.append(root)
            subdirs = {}
            for sub in MAILDIR_SUBDIRS:
                subdirs[sub] = _open_dir(sub, root, path / sub)
                fds.append(subdirs[sub])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(parent)
        os.close(root)
        os.close(subdirs["cur"])
        self.tmp_fd = subdirs["tmp"]
        self.new_fd = subdirs["new"]

    def close(self) -> None:
        os.close(self.tmp_fd)
        os.close(self.new_fd)


def open_maildir(path: Path) -> None:
    """Create the Maildir at ``path`` if missing, rejecting symbolic links."""
    MaildirFds(path).close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def deliver(path: Path, prepared: PreparedMessage) -> Path:
    """Store the prepared message in the Maildir at ``path``; return its path in ``new``."""
    fds = MaildirFds(path)
    try:
        return _deliver(fds, prepared)
    finally:
        fds.close()


def _deliver(fds: MaildirFds, prepared: PreparedMessage) -> Path:
    # The tmp name is set before the file is created, so an exception raised
    # by a signal handler right after the open still finds the file to unlink.
    tmp_name = ""
    fd = -1
    new_name: str | None = None
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(MAX_NAME_ATTEMPTS):
            tmp_name = unique_name()
            try:
                fd = os.open(tmp_name, flags, FILE_MODE, dir_fd=fds.tmp_fd)
                break
            except FileExistsError:
                tmp_name = ""  # another writer's file: never unlink it
        else:
            raise TempFailure(f"cannot create a unique file in {fds.path / 'tmp'}")
        fault_point("maildir.after_tmp_open")
        first = True
        for chunk in prepared.chunks():
            _write_all(fd, chunk)
            if first:
                fault_point("maildir.mid_write")
                first = False
        fault_point("maildir.after_tmp_write")
        os.fsync(fd)
        fault_point("maildir.after_fsync")

        new_name = f"{tmp_name},S={prepared.size},W={prepared.wsize}"
        os.link(tmp_name, new_name, src_dir_fd=fds.tmp_fd, dst_dir_fd=fds.new_fd,
                follow_symlinks=False)
        fault_point("maildir.after_link")
        os.unlink(tmp_name, dir_fd=fds.tmp_fd)
        tmp_name = ""
        os.fsync(fds.new_fd)
        fault_point("maildir.after_dir_fsync")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if tmp_name:
            _unlink_quietly(tmp_name, fds.tmp_fd)
        if new_name is not None:
            _unlink_quietly(new_name, fds.new_fd)
        raise
    os.close(fd)
    return fds.path / "new" / new_name


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
