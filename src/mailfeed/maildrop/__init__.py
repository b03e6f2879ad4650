"""A site's spool as a POP3 maildrop (RFC 1939 section 3): no sockets here.

The POP3 server opens the spool of the site a user logs in to and locks it
for the session.  This package lists the messages with their exact sizes and
unique-ids, streams each message in its wire form, and removes the deleted
ones when the server enters the UPDATE state.  Two spool formats are read:

Maildir (:mod:`.maildir`)
    Files in ``new/`` and ``cur/``; the name carries the size and the wire
    size, and its unique part is the unique-id.

mbox (:mod:`.mbox`)
    mboxrd: one ``>`` is removed from body lines matching ``^>+From ``.  The
    mbox is locked (dotlock, then fcntl) only while it is scanned and while
    it is rewritten, so the MX side can append during a session.  The locks
    are the spool writer's (:class:`mailfeed.spool.mbox.MboxLock`), so a
    stale lock left by a crashed writer is recovered, and its partial
    append cut off, before the scan.

Wire form and sizes (:mod:`.wire`)
    Every bare LF goes out as CRLF, and a last line without a line end gets
    one CRLF.  The size that LIST and STAT report is the octets RETR sends
    before dot-stuffing.

Unique-ids (RFC 1939 section 7, UIDL)
    1 to 70 characters of 0x21-0x7E, stable across sessions and restarts;
    each format's module describes how it derives them.

Invariants
    Nothing is removed except by :meth:`Maildrop.expunge`, which the server
    calls only in the UPDATE state.  An mbox is rewritten into a new file that
    is fsynced and renamed over the old one while both mbox locks are held, so
    a crash leaves either the old or the new mailbox, never a mix; writers
    must take the dotlock before opening the mbox (mailfeed's writer does).
    Every method here blocks: the asyncio server calls them in a thread,
    except ``open_quick``, which does no more than one open(2).

The interface, its message record and errors are in :mod:`.base`, and the
session lock in :mod:`.lock`.
"""

from __future__ import annotations

from mailfeed.config import SiteConfig
from mailfeed.maildrop.base import (
    MAX_UIDL_LENGTH,
    DropMessage,
    Maildrop,
    MaildropError,
    MaildropInUse,
)
from mailfeed.maildrop.maildir import MaildirDrop
from mailfeed.maildrop.mbox import DEFAULT_LOCK_TIMEOUT, MboxDrop
from mailfeed.maildrop.wire import MessageReader, WireConverter, wire_size_of

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
