"""The exclusive lock a POP3 session holds on its maildrop.

An fcntl lock file excludes other processes; an in-process set of held
paths excludes a second session of this process, which fcntl locks do not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

from mailfeed.maildrop.base import MaildropError, MaildropInUse

# Paths held by a session of this process: fcntl locks do not exclude the same process.
_held_locks: set[str] = set()
_held_locks_guard = threading.Lock()


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
