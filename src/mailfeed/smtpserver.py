"""The MX daemon's SMTP receiver: aiosmtpd hooks, routing and durable storage.

aiosmtpd parses the SMTP dialogue (RFC 5321) and its extensions SIZE
(RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), PIPELINING (RFC 2920)
and STARTTLS (RFC 3207).  This module decides what to accept and stores it:

* A recipient is accepted only when a configured site claims it (an exact
  address entry first, then its domain, compared case-insensitively as an
  A-label).  Everything else is ``550 5.7.1 relay access denied``, including
  source routes (``<@relay:user@example.org>``), local parts with ``%``,
  ``!`` or a quoted ``@`` (the site's MTA could route on them, so accepting
  them could turn the site into a relay), addresses without a domain (so
  even ``<postmaster>`` is rejected, because no site has a postmaster
  mailbox for the MX host itself), address literals and domains with a trailing dot.
* DATA is read by :meth:`MxSMTP.smtp_DATA`, which overrides aiosmtpd's
  because aiosmtpd 1.4 keeps the whole message in memory until the final
  ``.``.  The override reads the lines into
  :class:`mailfeed.smtpdata.MessageData` (a bounded buffer, then an unnamed
  temporary file in the spool root) and keeps aiosmtpd's checks and its
  ``354``, ``501`` and ``503`` replies.  It uses aiosmtpd's documented
  ``smtp_<COMMAND>`` override and ``check_helo_needed``/``check_auth_needed``,
  and the private ``_reader`` and ``_set_post_data_state`` (aiosmtpd 1.4.6).
  A message over ``max_message_size`` gets ``552 5.3.4`` and a line over
  ``max_line_length`` ``500 5.5.2``, both after the final ``.``.  A
  ``SIZE=`` parameter over the limit gets ``552 5.3.4`` at MAIL (RFC 1870
  section 6.1).  Every refusal is logged with the session id and the peer.
* Message data with a bare CR or a bare LF is rejected with ``550 5.6.0``
  (RFC 5321 section 2.3.8 allows CR and LF only together).  DATA ends only at
  ``<CRLF>.<CRLF>``, so ``<LF>.<LF>`` and ``<LF>.<CRLF>`` never end a message
  early, and the rejection drops the whole data, so text smuggled after them
  never becomes a second message.
* A repeated RCPT is accepted and stored once.  Only exact repeats count:
  the local part is compared as sent (RFC 5321 section 2.4, so
  ``Bob@example.org`` and ``bob@example.org`` are two recipients, as Postfix
  keeps them), the domain without regard to case (:func:`recipient_key`).
* A transaction whose recipients belong to several sites is stored once per
  site, each copy with only that site's recipients in its block and its own
  ``Received:`` field (RFC 5321 section 4.4) between block and message.
* ``250`` is sent only after every copy is durable.  Storage runs in a
  thread pool, never in the event loop.  Any storage failure is answered
  ``451 4.3.0``.  When an earlier site's copy is already durable, it is kept
  and the client's retry stores it a second time: a copy visible in a spool
  may already have been fetched over POP3 or handed to a pipe, so removing
  it is not safe, and a duplicate is better than a lost message.
* Less than ``min_free_space`` octets free on the spool filesystem (plus the
  announced SIZE) is answered ``452 4.3.1`` at MAIL and at RCPT, before DATA.

Invariants: nothing is written to a spool before the final ``.`` of DATA.  A
site's copy contains only that site's recipients.  The reply to DATA is sent
after storage ends, never before.  A session keeps at most ``DATA_BUFFER_SIZE``
octets of message data in memory plus about two lines.  Its temporary file is
closed, and so removed, on every path: stored, rejected, failed, disconnected
or shut down.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import email.utils
import functools
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, AnyStr, BinaryIO, Protocol

from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from mailfeed.config import Limits, MxSpoolConfig, SiteConfig
from mailfeed.envelope import Envelope, InvalidAddress, validate_address
from mailfeed.mxconfig import ListenAddress, MxConfig, MxLimits, Routing
from mailfeed.smtpdata import DATA_BUFFER_SIZE, DataRejection, MessageData, find_bare_newline

__all__ = [
    "ERR_BARE_NEWLINE",
    "ERR_DECLARED_TOO_BIG",
    "ERR_LINE_TOO_LONG",
    "ERR_MESSAGE_TOO_BIG",
    "ERR_NO_SPACE",
    "ERR_RELAY_DENIED",
    "ERR_STORAGE",
    "MxHandler",
    "SmtpServer",
    "StoreFunction",
    "build_received",
    "check_recipient",
    "find_bare_newline",
    "free_space",
    "recipient_key",
]

log = logging.getLogger(__name__)

# Reply texts.  Codes from RFC 5321 section 4.2, enhanced codes from RFC 3463.
OK_SENDER = "250 2.1.0 Sender OK"
OK_RECIPIENT = "250 2.1.5 Recipient OK"
OK_QUEUED = "250 2.0.0 OK: queued as {queue_id}"
# RFC 3463 section 3.8: X.7.1 delivery not authorized.
ERR_RELAY_DENIED = "550 5.7.1 <{address}>: relay access denied"
# RFC 5321 section 2.3.8: CR and LF must appear only together as CRLF.
# RFC 3463 section 3.7: X.6.0 other or undefined media error.
ERR_BARE_NEWLINE = "550 5.6.0 Message data contains a bare CR or LF; end every line with CRLF"
# RFC 1870 section 6.3: 552 after the data of a message over the size limit;
# RFC 3463 section 3.4: X.3.4 message too big for system.
ERR_MESSAGE_TOO_BIG = "552 5.3.4 Error: message too big, the limit is {limit} octets"
# RFC 1870 section 6.1: 552 at MAIL when the declared SIZE exceeds the fixed
# maximum; RFC 3463 section 3.4: X.3.4 message too big for system.
ERR_DECLARED_TOO_BIG = "552 5.3.4 Error: message size exceeds the limit of {limit} octets"
# RFC 5321 section 4.5.3.1.6 (text line length); RFC 3463 section 3.6: X.5.2
# syntax error.
ERR_LINE_TOO_LONG = "500 5.5.2 Error: line too long, the limit is {limit} octets with CRLF"
# aiosmtpd 1.4's replies to DATA, kept unchanged (RFC 5321 section 4.3.2).
DATA_START = "354 End data with <CR><LF>.<CR><LF>"
ERR_DATA_NEEDS_RCPT = "503 Error: need RCPT command"
ERR_DATA_SYNTAX = "501 Syntax: DATA"
# RFC 3463 section 3.4: X.3.0 other or undefined mail system status.
ERR_STORAGE = "451 4.3.0 Error: cannot store the message now, try again later"
# RFC 3463 section 3.4: X.3.1 mail system full.
ERR_NO_SPACE = "452 4.3.1 Insufficient system storage"
# RFC 5321 section 4.5.3.1.10: 452 for too many recipients; RFC 3463 X.5.3.
ERR_TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
# RFC 3463 section 3.2: X.1.3 bad destination mailbox address syntax.
ERR_BAD_ADDRESS = "553 5.1.3 Error: invalid address <{address}>"
# RFC 6531 section 3.5: a non-ASCII address needs the SMTPUTF8 parameter.
ERR_NEEDS_SMTPUTF8 = "553 5.6.7 Error: a non-ASCII address needs MAIL FROM with SMTPUTF8"
# RFC 5321 section 3.8: 421 may close the session at any time.
ERR_TOO_MANY_CONNECTIONS = "421 4.7.0 {hostname} Error: too many connections"
ERR_TOO_MANY_ERRORS = "421 4.7.0 {hostname} Error: too many errors"
ERR_SHUTTING_DOWN = "421 4.3.2 {hostname} Service shutting down, try again later"

# Characters in a local part that a downstream MTA may treat as routing.
ROUTING_CHARACTERS = frozenset("@%!")
NULL_SENDER = "<>"
MAX_HELO_IN_RECEIVED = 255


class StoreFunction(Protocol):
    """The spool writer's signature, as mailfeed.spool.store_message has it."""

    def __call__(
        self,
        site: SiteConfig,
        envelope: Envelope,
        message: BinaryIO,
        limits: Limits,
        *,
        extensions: Sequence[tuple[str, str]] = (),
    ) -> Any: ...


def free_space(path: Path) -> int:
    """Return the octets available to unprivileged users on path's filesystem.

    A path that does not exist yet is measured at its nearest existing parent.
    """
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize


def printable(text: str, limit: int = 256) -> str:
    """Return text safe to echo in a reply or header: printable ASCII only."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def check_recipient(routing: Routing, address: str, raw_argument: str) -> SiteConfig | None:
    """Return the site for an RCPT address, or None to deny relaying.

    ``raw_argument`` is the text after ``RCPT TO:`` as the client sent it,
    because aiosmtpd's parser drops a source route before calling the hook.
    """
    if raw_argument.lstrip().startswith("<@"):
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    if ROUTING_CHARACTERS.intersection(local):
        return None
    return routing.site_for(address)


def recipient_key(address: str) -> str:
    """Return the form of an address that detects a repeated RCPT.

    The local part is kept exactly, because it is case-sensitive (RFC 5321
    section 2.4): ``Bob@example.org`` and ``bob@example.org`` may be two
    mailboxes, and the site's MTA decides.  The domain is case-insensitive
    (RFC 5321 section 2.4, RFC 1035 section 2.3.3), so it is lower-cased.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{local}@{domain.lower()}"


def protocol_name(*, extended: bool, utf8: bool, tls: bool) -> str:
    """Return the ``with`` keyword of a Received field (RFC 3848, RFC 6531 3.7.3)."""
    if utf8:
        return "UTF8SMTPS" if tls else "UTF8SMTP"
    if extended:
        return "ESMTPS" if tls else "ESMTP"
    return "SMTPS" if tls else "SMTP"


def build_received(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    session_id: str,
    tls: str | None,
    recipient: str | None,
    date: datetime,
) -> bytes:
    """Return a ``Received:`` field (RFC 5321 section 4.4), folded, CRLF-terminated."""
    lines = [f"Received: from {printable(helo, MAX_HELO_IN_RECEIVED)} ([{peer_ip}])"]
    lines.append(f"\tby {hostname} (mailfeed) with {protocol} id {queue_id}")
    comment = f"session {session_id}"
    if tls:
        comment += f"; {tls}"
    lines.append(f"\t({comment})")
    stamp = email.utils.format_datetime(date)
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>; {stamp}")
    else:
        lines[-1] += f"; {stamp}"
    text = "\r\n".join(lines) + "\r\n"
    return text.encode("utf-8", "surrogateescape")


def new_queue_id() -> str:
    """Return a fresh queue id: time in hex then 8 random hex digits."""
    return f"{int(time.time()):X}{secrets.token_hex(4).upper()}"


def tls_description(session: SmtpSession) -> str | None:
    """Describe the session's TLS cipher, or None without TLS."""
    if not session.ssl:
        return None
    cipher = session.ssl.get("cipher")
    if not cipher:
        return "TLS"
    name, version, bits = cipher
    return f"{version} cipher {name} ({bits} bits)"


class MxEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope plus the site chosen for each recipient at RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[tuple[str, SiteConfig]] = []


@dataclasses.dataclass(frozen=True)
class StoredCopy:
    """One site's durable copy of a message."""

    site: str
    recipients: tuple[str, ...]
    result: Any


class StorageError(Exception):
    """A copy failed; ``stored`` lists the copies already durable."""

    def __init__(self, site: str, cause: BaseException, stored: list[StoredCopy]) -> None:
        super().__init__(f"site {site}: {cause}")
        self.site = site
        self.cause = cause
        self.stored = stored


def group_by_site(routes: Sequence[tuple[str, SiteConfig]]) -> list[tuple[SiteConfig, list[str]]]:
    """Group recipients by site, in the order each site first appears."""
    groups: dict[str, tuple[SiteConfig, list[str]]] = {}
    for address, site in routes:
        groups.setdefault(site.name, (site, []))[1].append(address)
    return list(groups.values())


class MxHandler:
    """aiosmtpd hooks: the accept/reject policy and the hand-off to storage."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_HELO(
        self, smtp: MxSMTP, session: SmtpSession, envelope: MxEnvelope, hostname: str
    ) -> str:
        session.host_name = hostname
        return f"250 {self.server.config.hostname}"

    async def handle_EHLO(
        self,
        smtp: MxSMTP,
        session: SmtpSession,
        envelope: MxEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # The MX accepts no authentication: never advertise AUTH.
        lines = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        # aiosmtpd processes commands strictly in order, which is what RFC 2920
        # requires of a server, but its EHLO reply omits the keyword.
        lines.insert(len(lines) - 1, "250-PIPELINING")
        return lines

    async def handle_MAIL(
        self,
        smtp: MxSMTP,
        session: SmtpSession,
        envelope: MxEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        sender = "" if address == NULL_SENDER else address
        try:
            validate_address(sender, allow_null=True)
        except InvalidAddress as exc:
            log.info("session=%s peer=%s sender rejected: %s", smtp.session_id, smtp.peer, exc)
            return ERR_BAD_ADDRESS.format(address=printable(address))
        if not sender.isascii() and "SMTPUTF8" not in mail_options:
            return ERR_NEEDS_SMTPUTF8
        declared = 0
        for option in mail_options:
            if option[:5].upper() == "SIZE=" and option[5:].isdigit():
                declared = int(option[5:])
        limit = self.server.spool.limits.max_message_size
        if limit and declared > limit:
            log.info(
                "session=%s peer=%s message rejected at MAIL: SIZE=%d exceeds the limit of %d",
                smtp.session_id, smtp.peer, declared, limit,
            )
            return ERR_DECLARED_TOO_BIG.format(limit=limit)
        if not self.server.has_space(self.server.spool.spool_root, declared):
            log.warning(
                "session=%s peer=%s spool %s is below min_free_space; replying 452",
                smtp.session_id, smtp.peer, self.server.spool.spool_root,
            )
            return ERR_NO_SPACE
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        smtp.declared_size = declared
        return OK_SENDER

    async def handle_RCPT(
        self,
        smtp: MxSMTP,
        session: SmtpSession,
        envelope: MxEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.server.spool.limits.max_recipients:
            return ERR_TOO_MANY_RECIPIENTS
        site = check_recipient(self.server.routing, address, smtp.last_rcpt_argument)
        if site is None:
            log.info(
                "session=%s peer=%s relay denied for %r", smtp.session_id, smtp.peer, address
            )
            return ERR_RELAY_DENIED.format(address=printable(address))
        try:
            validate_address(address)
        except InvalidAddress as exc:
            log.info("session=%s peer=%s recipient rejected: %s", smtp.session_id, smtp.peer, exc)
            return ERR_BAD_ADDRESS.format(address=printable(address))
        if not address.isascii() and not envelope.smtp_utf8:
            return ERR_NEEDS_SMTPUTF8
        if not self.server.has_space(site.path, smtp.declared_size):
            log.warning(
                "session=%s peer=%s site=%s spool %s is below min_free_space; replying 452",
                smtp.session_id, smtp.peer, site.name, site.path,
            )
            return ERR_NO_SPACE
        key = recipient_key(address)
        if any(recipient_key(known) == key for known in envelope.rcpt_tos):
            return OK_RECIPIENT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.routes.append((address, site))
        return OK_RECIPIENT

    async def store_data(
        self, smtp: MxSMTP, session: SmtpSession, envelope: MxEnvelope, data: MessageData
    ) -> str:
        """Check and store the data of a DATA command; return the reply.

        :meth:`MxSMTP.smtp_DATA` calls it in place of aiosmtpd's
        ``handle_DATA`` hook, after the final ``.`` and only for data without
        a line or size rejection.
        """
        if data.bare_offset >= 0:
            log.warning(
                "session=%s peer=%s message rejected: bare %s at offset %d of DATA",
                smtp.session_id, smtp.peer, "CR" if data.bare_octet == 0x0D else "LF",
                data.bare_offset,
            )
            return ERR_BARE_NEWLINE
        queue_id = self.server.queue_ids()
        sender = "" if envelope.mail_from == NULL_SENDER else (envelope.mail_from or "")
        peer_ip = str(smtp.peer[0]) if isinstance(smtp.peer, tuple) else str(smtp.peer)
        received = functools.partial(
            build_received,
            helo=session.host_name or "unknown",
            peer_ip=peer_ip,
            hostname=self.server.config.hostname,
            protocol=protocol_name(
                extended=session.extended_smtp, utf8=envelope.smtp_utf8, tls=bool(session.ssl)
            ),
            queue_id=queue_id,
            session_id=smtp.session_id,
            tls=tls_description(session),
            date=self.server.clock(),
        )
        groups = group_by_site(envelope.routes)
        # The idle timeout must not close the session while storage runs: the
        # client would then resend a message that may be stored.
        smtp.pause_timeout()
        try:
            copies = await data.run(
                self.server.executor, self.server.store_copies, groups, sender, data, received
            )
        except StorageError as exc:
            if exc.stored:
                log.error(
                    "session=%s peer=%s queue_id=%s site=%s storage failed: %s; copies "
                    "already stored for %s will be stored again when the client retries",
                    smtp.session_id, smtp.peer, queue_id, exc.site, exc.cause,
                    ", ".join(f"{c.site} ({c.result})" for c in exc.stored),
                )
            else:
                log.error(
                    "session=%s peer=%s queue_id=%s site=%s storage failed: %s; replying 451",
                    smtp.session_id, smtp.peer, queue_id, exc.site, exc.cause,
                )
            return ERR_STORAGE
        finally:
            smtp.resume_timeout()
        for copy in copies:
            log.info(
                "session=%s peer=%s queue_id=%s site=%s stored=%s sender=<%s> recipients=%d "
                "size=%d",
                smtp.session_id, smtp.peer, queue_id, copy.site, copy.result, sender,
                len(copy.recipients), data.size,
            )
        return OK_QUEUED.format(queue_id=queue_id)


class MxSMTP(SMTP):
    """aiosmtpd's protocol with connection limits, an error limit and draining.

    One instance serves one TCP connection.
    """

    def __init__(self, owner: SmtpServer, handler: MxHandler, **kwargs: Any) -> None:
        self.mx_handler = handler
        limits = owner.config.limits
        # aiosmtpd sizes its StreamReader from this attribute in __init__.
        self.line_length_limit = limits.max_line_length
        super().__init__(handler, **kwargs)
        # aiosmtpd keeps this dict on the class; give each connection its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.owner = owner
        self.session_id = owner.session_ids()
        self.peer: Any = None
        self.last_rcpt_argument = ""
        self.declared_size = 0
        self.error_count = 0
        self.rejected = False
        self.closing = False
        self.draining = False

    def _create_envelope(self) -> MxEnvelope:
        return MxEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and self._original_transport is None:
            self.peer = transport.get_extra_info("peername")
            refusal = self.owner.admit(self)
            if refusal is not None:
                self.rejected = True
                log.warning(
                    "session=%s peer=%s connection refused: %s", self.session_id, self.peer, refusal
                )
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(refusal.encode("ascii") + b"\r\n")
                transport.close()
                return
            log.info("session=%s peer=%s connected", self.session_id, self.peer)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.rejected:
            return
        self.owner.release(self)
        log.info("session=%s peer=%s disconnected", self.session_id, self.peer)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self.rejected:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        # The timeout counts idle time: any data from the client restarts it,
        # so a long DATA that keeps flowing is not cut off.
        self._reset_timeout()
        super().data_received(data)

    async def smtp_DATA(self, arg: str | None) -> None:
        """Receive message data into a bounded buffer, then store it.

        This replaces aiosmtpd 1.4.6's ``SMTP.smtp_DATA``, which keeps every
        line in memory.  The checks before ``354`` and their replies are
        aiosmtpd's.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope, session = self.envelope, self.session
        assert isinstance(envelope, MxEnvelope) and session is not None
        if not envelope.rcpt_tos:
            await self.push(ERR_DATA_NEEDS_RCPT)
            return
        if arg:
            await self.push(ERR_DATA_SYNTAX)
            return
        await self.push(DATA_START)
        data = MessageData(
            spill_dir=self.owner.spool.spool_root,
            executor=self.owner.data_executor,
            size_limit=self.data_size_limit,
            line_length_limit=self.line_length_limit,
            buffer_size=self.owner.data_buffer_size,
            session_id=self.session_id,
        )
        try:
            try:
                await data.receive(self._reader)
            except asyncio.CancelledError:
                # aiosmtpd cancels this coroutine when the connection ends.
                log.info("session=%s peer=%s connection lost during DATA",
                         self.session_id, self.peer)
                self._writer.close()
                raise
            except asyncio.IncompleteReadError:
                log.info("session=%s peer=%s connection closed during DATA",
                         self.session_id, self.peer)
                self._writer.close()
                return
            if data.rejection is DataRejection.LINE_TOO_LONG:
                reply = ERR_LINE_TOO_LONG.format(limit=self.line_length_limit)
            elif data.rejection is DataRejection.TOO_BIG:
                reply = ERR_MESSAGE_TOO_BIG.format(limit=self.data_size_limit)
            elif data.rejection is DataRejection.WRITE_FAILED:
                reply = ERR_STORAGE
            else:
                reply = await self.mx_handler.store_data(self, session, envelope, data)
            if data.rejection is not None:
                log.info("session=%s peer=%s message rejected: %s after %d octets",
                         self.session_id, self.peer, data.rejection.value, data.size)
        finally:
            data.close()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply)

    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd 1.4 replies to an over-limit SIZE= itself with a bare
        # "552" and logs nothing.  Hiding the limit from it lets
        # MxHandler.handle_MAIL send 552 5.3.4 and log the rejection.
        limit = self.data_size_limit
        self.data_size_limit = None
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.data_size_limit = limit

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.last_rcpt_argument = arg or ""
        if arg is not None and arg[:3].upper() == "TO:":
            self.last_rcpt_argument = arg[3:]
        await super().smtp_RCPT(arg)

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        if self.closing:
            return
        code = status[:1] if isinstance(status, bytes) else status[:1].encode()
        if code in (b"4", b"5"):
            self.error_count += 1
            if self.error_count >= self.owner.config.limits.max_errors:
                log.warning(
                    "session=%s peer=%s closing after %d error replies",
                    self.session_id, self.peer, self.error_count,
                )
                await self.close_with(ERR_TOO_MANY_ERRORS)
                return
        if self.draining and self.is_idle():
            await self.close_with(ERR_SHUTTING_DOWN)

    def is_idle(self) -> bool:
        """Return True between transactions (no MAIL given yet)."""
        return self.envelope is None or self.envelope.mail_from is None

    async def close_with(self, reply: str) -> None:
        """Send a 421 reply and close the connection."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            await super().push(reply.format(hostname=self.owner.config.hostname))
        if self.transport is not None:
            self.transport.close()

    def pause_timeout(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_timeout(self) -> None:
        if self.transport is not None:
            self._reset_timeout()

    def begin_drain(self) -> None:
        """Close now if idle, else after the transaction in progress ends."""
        self.draining = True
        transport = self.transport
        if not self.is_idle() or transport is None or self.closing:
            return
        self.closing = True
        if transport.is_closing():
            return
        assert isinstance(transport, asyncio.WriteTransport)
        text = ERR_SHUTTING_DOWN.format(hostname=self.owner.config.hostname)
        # A TLS transport whose SSL protocol already ended raises
        # AttributeError on write (Python 3.11 asyncio.sslproto).
        with contextlib.suppress(AttributeError, ConnectionError, RuntimeError):
            transport.write(text.encode("ascii") + b"\r\n")
        transport.close()

    def abort(self) -> None:
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()


class SmtpServer:
    """SMTP listeners inside the caller's event loop, with live reload.

    ``store`` defaults to mailfeed.spool.store_message; ``free_space_of``,
    ``clock``, ``queue_ids`` and ``session_ids`` may be replaced (tests inject
    them).
    """

    def __init__(
        self,
        config: MxConfig,
        *,
        tls_context: ssl.SSLContext | None = None,
        store: StoreFunction | None = None,
        free_space_of: Callable[[Path], int] = free_space,
        clock: Callable[[], datetime] | None = None,
        queue_ids: Callable[[], str] = new_queue_id,
        session_ids: Callable[[], str] = lambda: secrets.token_hex(4),
        data_buffer_size: int = DATA_BUFFER_SIZE,
    ) -> None:
        self.config = config
        self.tls_context = tls_context
        self._store = store
        self.free_space_of = free_space_of
        self.clock = clock or (lambda: datetime.now(UTC).astimezone())
        self.queue_ids = queue_ids
        self.session_ids = session_ids
        self.connections: set[MxSMTP] = set()
        self.per_address: collections.Counter[str] = collections.Counter()
        self.servers: list[asyncio.Server] = []
        self.executor = ThreadPoolExecutor(
            max_workers=config.limits.storage_threads, thread_name_prefix="mailfeed-store"
        )
        # Writes of message data to temporary files, apart from storage so
        # that a slow spool (a pipe to an LDA) does not stall receiving.
        self.data_executor = ThreadPoolExecutor(
            max_workers=config.limits.storage_threads, thread_name_prefix="mailfeed-data"
        )
        self.data_buffer_size = data_buffer_size
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = True

    @property
    def routing(self) -> Routing:
        return self.config.routing

    @property
    def spool(self) -> MxSpoolConfig:
        return self.config.spool

    @property
    def limits(self) -> MxLimits:
        return self.config.limits

    def reload(self, config: MxConfig, tls_context: ssl.SSLContext | None) -> None:
        """Use new sites, limits and TLS for new commands; listeners stay as they are."""
        self.config = config
        self.tls_context = tls_context

    def store(self) -> StoreFunction:
        if self._store is None:
            from mailfeed.spool import store_message

            self._store = store_message
        return self._store

    def has_space(self, path: Path, declared: int) -> bool:
        minimum = self.limits.min_free_space
        if minimum <= 0:
            return True
        try:
            return self.free_space_of(path) >= minimum + declared
        except OSError as exc:
            log.error("cannot measure free space of %s: %s; replying 452", path, exc)
            return False

    def store_copies(
        self,
        groups: list[tuple[SiteConfig, list[str]]],
        sender: str,
        data: MessageData,
        received: Callable[..., bytes],
    ) -> list[StoredCopy]:
        """Store one copy per site, in order; raise StorageError on the first failure.

        Runs in a storage thread.
        """
        store = self.store()
        stored: list[StoredCopy] = []
        limits = self.spool.limits
        for site, recipients in groups:
            trace = received(recipient=recipients[0] if len(recipients) == 1 else None)
            site_limits = limits
            if limits.max_message_size:
                site_limits = limits.replace(
                    max_message_size=limits.max_message_size + len(trace)
                )
            try:
                envelope = Envelope(sender, tuple(recipients))
                with data.open_reader(trace) as message:
                    result = store(site, envelope, message, site_limits)
            except Exception as exc:  # every failure becomes a 451, never a lost message
                raise StorageError(site.name, exc, stored) from exc
            stored.append(StoredCopy(site.name, tuple(recipients), _stored_name(result)))
        return stored

    def admit(self, conn: MxSMTP) -> str | None:
        """Register a new connection, or return the 421 reply that refuses it."""
        hostname = self.config.hostname
        if not self.accepting:
            return ERR_SHUTTING_DOWN.format(hostname=hostname)
        address = _peer_address(conn.peer)
        if len(self.connections) >= self.limits.max_connections:
            return ERR_TOO_MANY_CONNECTIONS.format(hostname=hostname)
        if self.per_address[address] >= self.limits.max_connections_per_address:
            return ERR_TOO_MANY_CONNECTIONS.format(hostname=hostname)
        self.connections.add(conn)
        self.per_address[address] += 1
        self._idle.clear()
        return None

    def release(self, conn: MxSMTP) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        address = _peer_address(conn.peer)
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]
        if not self.connections:
            self._idle.set()

    def make_protocol(self) -> MxSMTP:
        return MxSMTP(
            self,
            MxHandler(self),
            data_size_limit=self.spool.limits.max_message_size or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.config.hostname,
            ident="ESMTP mailfeed",
            tls_context=self.tls_context,
            timeout=self.limits.smtp_timeout,
            auth_require_tls=True,
        )

    async def start(self, addresses: Sequence[ListenAddress]) -> list[tuple[str, int]]:
        """Listen on every address; return the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        for address in addresses:
            server = await loop.create_server(
                self.make_protocol, address.host, address.port, reuse_address=True
            )
            self.servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                bound.append((str(name[0]), int(name[1])))
                log.info("SMTP listening on %s port %d", name[0], name[1])
        return bound

    def stop_accepting(self) -> None:
        """Close the listening sockets; sessions in progress continue."""
        self.accepting = False
        for server in self.servers:
            server.close()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let transactions end within ``grace`` seconds, then abort."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.begin_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning(
                "%d SMTP sessions still open after %.0f s; closing them",
                len(self.connections), grace,
            )
            for conn in list(self.connections):
                conn.abort()
        # A storage call or temporary file write already under way finishes
        # before the process exits.
        loop = asyncio.get_running_loop()
        for executor in (self.data_executor, self.executor):
            await loop.run_in_executor(None, functools.partial(executor.shutdown, wait=True))


def _peer_address(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _stored_name(result: Any) -> str:
    """Return a short name for a StoredMessage: the base name of its location."""
    location = getattr(result, "location", None)
    if location is None:
        return str(result)
    return os.path.basename(str(location)) or str(location)
