"""The MX side's spools: store the block and one message for a site.

:func:`store_message` is the one entry point, used by ``mailfeed-fwd`` and by
the MX daemon's SMTP receiver (from worker threads).  It dispatches on the
site's format: ``maildir`` (:mod:`mailfeed.spool.maildir`), ``mbox``
(:mod:`mailfeed.spool.mbox`) or ``pipe`` (:mod:`mailfeed.spool.pipe`).  The
message passes through :class:`~mailfeed.spool.prepare.PreparedMessage`,
which adds the block and removes any ``X-Mailfeed-*`` header fields.

Invariants: the spools know nothing of sockets; an exception means nothing
was stored; the only shared mutable state is the lock-protected counter in
the Maildir names and the lock that serialises mbox stale-lock recovery, so
concurrent calls from threads are safe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from mailfeed.config import Limits, SiteConfig
from mailfeed.envelope import Envelope
from mailfeed.errors import ConfigError, DataError
from mailfeed.spool.prepare import PreparedMessage

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["StoredMessage", "store_message"]


class StoredMessage(NamedTuple):
    """Where a message was stored and its sizes.

    ``location`` is the Maildir file, the mbox path, or ``pipe:<command>``.
    ``size`` is S, the octets of block plus message as a reader gets them
    (for an mbox: after removing the quoting, with LF line ends), and
    ``wsize`` is W, the same with every bare LF counted as CRLF.  A
    NamedTuple, not a dataclass: ``dataclasses`` imports ``inspect``, which
    mailfeed-fwd would pay for on every message.
    """

    location: str
    size: int
    wsize: int


def store_message(
    site: SiteConfig,
    envelope: Envelope,
    message: BinaryIO,
    limits: Limits,
    *,
    extensions: Iterable[tuple[str, str]] = (),
) -> StoredMessage:
    """Store the block for ``envelope`` and the message read from ``message``.

    Raise DataError when the envelope has more than ``limits.max_recipients``
    recipients or the message is over ``limits.max_message_size``,
    TempFailure or OSError on storage failures, and ConfigError for an
    unknown format.
    """
    count = len(envelope.recipients)
    if count > limits.max_recipients:
        raise DataError(
            f"{count} recipients, over max_recipients of {limits.max_recipients}"
        )
    prepared = PreparedMessage(envelope, message, limits, extensions=extensions)
    if site.format == "maildir":
        from mailfeed.spool import maildir

        path = maildir.deliver(site.path, prepared)
        return StoredMessage(str(path), prepared.size, prepared.wsize)
    if site.format == "mbox":
        from mailfeed.spool import mbox

        stored = mbox.deliver(site.path, prepared, limits)
        return StoredMessage(str(stored.path), stored.size, stored.wsize)
    if site.format == "pipe":
        from mailfeed.spool import pipe

        pipe.deliver(site.command, prepared)
        return StoredMessage(f"pipe:{site.command[0]}", prepared.size, prepared.wsize)
    raise ConfigError(f"site {site.name}: unknown spool format {site.format!r}")
