"""The maildrop interface a POP3 session uses, its message record and its errors.

Nothing is removed except by :meth:`Maildrop.expunge`, which the server
calls only in the UPDATE state.  Every method blocks: the asyncio server
calls them in a thread, except :meth:`Maildrop.open_quick`, which does no
more than one open(2).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfeed.config import SiteConfig
from mailfeed.errors import TempFailure
from mailfeed.maildrop.wire import MessageReader

if TYPE_CHECKING:
    from mailfeed.maildrop.lock import _SessionLock

# RFC 1939 section 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UIDL_LENGTH = 70
UIDL_SAFE_RE = re.compile(rb"[\x21-\x7e]{1,70}")
HASHED_UIDL_PREFIX = "~"
HASHED_UIDL_HEX_DIGITS = 40
READ_CHUNK_OCTETS = 256 * 1024


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


def _hashed_uidl(data: bytes) -> str:
    return HASHED_UIDL_PREFIX + hashlib.sha256(data).hexdigest()[:HASHED_UIDL_HEX_DIGITS]


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

    def open_quick(self, msgnum: int) -> MessageReader | None:
        """Open message ``msgnum`` if that takes no more than an open(2), else None.

        The asyncio server calls this on its event loop and falls back to
        :meth:`open` in a thread on None.  The default always returns None.
        """
        return None

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
