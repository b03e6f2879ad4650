"""SMTP (RFC 5321) and LMTP (RFC 2033) delivery targets over smtplib.

Both read replies with one bounded reader (line length and line count,
RFC 5321 section 4.2.1).  SMTP uses BODY=8BITMIME (RFC 6152), SMTPUTF8
(RFC 6531) and SIZE (RFC 1870) when offered; a 452 to RCPT after an
accepted recipient starts a further transaction (RFC 5321 section
4.5.3.1.10).  LMTP reads one reply per accepted recipient after DATA.

Invariant: a recipient is DELIVERED only on a 2xx reply for it; a lost
connection, a timeout or a malformed reply defers every open recipient.
"""

from __future__ import annotations

import logging
import smtplib
import socket
from typing import BinaryIO

from mailfeed.delivery.base import (
    CODE_LOCAL_TEMPFAIL,
    CODE_START_MAIL_INPUT,
    CODE_TOO_MANY_RECIPIENTS,
    DEFAULT_TIMEOUT,
    STATUS_BAD_CONNECTION,
    STATUS_NO_ANSWER,
    STATUS_NON_ASCII_TEMPORARY,
    Outcome,
    RecipientResult,
    outcome_for_code,
)
from mailfeed.delivery.convert import _CRLF, _scan, iter_converted
from mailfeed.envelope import Envelope

__all__ = [
    "DEFAULT_LMTP_PORT",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_REPLY_LINES",
    "DEFAULT_SMTP_PORT",
    "LmtpTarget",
    "SmtpTarget",
]

log = logging.getLogger(__name__)

# Longest reply line accepted from an SMTP or LMTP server, in octets.
# RFC 5321 section 4.5.3.1.5 sets 512 octets; servers send longer texts in
# practice, so the default is the limit Python's smtplib applies.
DEFAULT_MAX_LINE = 8192
# Maximum number of lines in one reply.  RFC 5321 sets no limit; an EHLO reply, the
# longest in practice, has a few dozen lines.
DEFAULT_MAX_REPLY_LINES = 1000
DEFAULT_SMTP_PORT = 25
# RFC 2033 section 7: port 24 is assigned to LMTP (for private use).
DEFAULT_LMTP_PORT = 24


class _ReplyReader:
    """Read one reply with bounded line length and line count (RFC 5321 4.2.1).

    Each line is three digits and then SP, "-" (more lines follow) or the
    line end, and every line of one reply carries the same code.  Anything
    else is a malformed reply, so the recipients are deferred.
    """

    def __init__(self, max_line: int, max_lines: int = DEFAULT_MAX_REPLY_LINES) -> None:
        self.max_line = max_line
        self.max_lines = max_lines

    def read(self, conn: smtplib.SMTP) -> tuple[int, str]:
        if conn.file is None:
            if conn.sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            conn.file = conn.sock.makefile("rb")
        lines: list[str] = []
        code = -1
        while True:
            line = conn.file.readline(self.max_line + 1)
            if not line:
                conn.close()
                raise smtplib.SMTPServerDisconnected("connection closed by the server")
            if len(line) > self.max_line:
                conn.close()
                raise smtplib.SMTPResponseException(
                    500, f"reply line longer than {self.max_line} octets"
                )
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            head = text[:3]
            if (
                not (head.isascii() and head.isdigit())
                or text[3:4] not in ("", " ", "-")
                or (lines and int(head) != code)
            ):
                conn.close()
                raise smtplib.SMTPServerDisconnected(f"malformed reply line {text[:80]!r}")
            code = int(head)
            lines.append(text[4:].strip())
            if text[3:4] != "-":
                break
            if len(lines) >= self.max_lines:
                conn.close()
                raise smtplib.SMTPServerDisconnected(
                    f"reply longer than {self.max_lines} lines"
                )
        return code, "\n".join(lines)


class _SmtpClient(smtplib.SMTP):
    """smtplib.SMTP whose replies are read with a configurable line limit."""

    def __init__(self, reader: _ReplyReader, **kwargs: object) -> None:
        self._reader = reader
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def getreply(self) -> tuple[int, bytes]:
        code, text = self._reader.read(self)
        return code, text.encode("utf-8")


class _LmtpClient(_SmtpClient, smtplib.LMTP):
    """smtplib.LMTP (its connect() reaches a UNIX socket) with the same reply reader."""


def _command(conn: smtplib.SMTP, line: str) -> tuple[int, str]:
    """Send one command line (UTF-8) and return the reply code and text."""
    if "\r" in line or "\n" in line:
        raise ValueError(f"command contains a line end: {line!r}")
    conn.send(line.encode("utf-8", "surrogateescape") + _CRLF)
    code, text = conn.getreply()
    return code, text.decode("utf-8", "replace")


def _needs_utf8(address: str) -> bool:
    return not address.isascii()


class _Transaction:
    """Per-recipient bookkeeping for one delivery over SMTP or LMTP."""

    def __init__(self, envelope: Envelope) -> None:
        self.recipients = envelope.recipients
        self.results: list[RecipientResult | None] = [None] * len(self.recipients)

    def set(self, index: int, code: int, text: str, outcome: Outcome | None = None,
            *, unreachable: bool = False) -> None:
        result = RecipientResult(
            self.recipients[index], outcome or outcome_for_code(code), code, text, unreachable
        )
        self.results[index] = result

    def open_indexes(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r is None]

    def defer_open(self, text: str, code: int = CODE_LOCAL_TEMPFAIL, *,
                   unreachable: bool = False) -> None:
        for index in self.open_indexes():
            self.set(index, code, text, Outcome.DEFERRED, unreachable=unreachable)

    def final(self) -> list[RecipientResult]:
        done = [r for r in self.results if r is not None]
        assert len(done) == len(self.recipients)
        return done


class _SmtpFamilyTarget:
    """The SMTP dialogue shared by the SMTP and LMTP targets."""

    lmtp = False

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        helo: str | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        max_reply_lines: int = DEFAULT_MAX_REPLY_LINES,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        # smtplib would look the name up with getfqdn(), which may wait on DNS.
        self.helo = helo or socket.gethostname()
        self.reader = _ReplyReader(max_line, max_reply_lines)

    @property
    def peer(self) -> str:
        return self.host if self.port == 0 else f"{self.host}:{self.port}"

    def _connect(self) -> smtplib.SMTP:
        raise NotImplementedError

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]:
        state = _Transaction(envelope)
        start = message.tell()
        size, eight_bit = _scan(message)
        conn: smtplib.SMTP | None = None
        greeted = False
        try:
            conn = self._connect()
            self._greet(conn)
            greeted = True
            self._run(conn, envelope, message, start, size, eight_bit, state)
        except (OSError, smtplib.SMTPException) as exc:
            reason = _describe_error(exc)
            log.warning("delivery to %s failed: %s", self.peer, reason)
            status = STATUS_NO_ANSWER if isinstance(exc, TimeoutError) else STATUS_BAD_CONNECTION
            state.defer_open(f"{status} {self.peer}: {reason}", unreachable=not greeted)
        finally:
            if conn is not None:
                _close(conn)
        return state.final()

    def _greet(self, conn: smtplib.SMTP) -> None:
        code, text = conn.ehlo(self.helo)
        if code // 100 == 2 or self.lmtp:
            if code // 100 != 2:
                raise smtplib.SMTPHeloError(code, text)
            return
        # RFC 5321 section 3.2: fall back to HELO when EHLO is not supported.
        code, text = conn.helo(self.helo)
        if code // 100 != 2:
            raise smtplib.SMTPHeloError(code, text)

    def _run(
        self,
        conn: smtplib.SMTP,
        envelope: Envelope,
        message: BinaryIO,
        start: int,
        size: int,
        eight_bit: bool,
        state: _Transaction,
    ) -> None:
        # A non-ASCII address that the local server cannot take is deferred,
        # not failed: the fix is on this site (enable SMTPUTF8), and a failure
        # would bounce or drop mail that the MX host accepted.
        utf8_offered = conn.has_extn("smtputf8")
        need_utf8 = _needs_utf8(envelope.sender)
        if need_utf8 and not utf8_offered:
            text = self._no_smtputf8(f"sender {envelope.sender!r}")
            state.defer_open(text)
            return
        for index in state.open_indexes():
            rcpt = envelope.recipients[index]
            if _needs_utf8(rcpt):
                if not utf8_offered:
                    text = self._no_smtputf8(f"recipient {rcpt!r}")
                    state.set(index, CODE_LOCAL_TEMPFAIL, text, Outcome.DEFERRED)
                else:
                    need_utf8 = True

        options: list[str] = []
        if eight_bit and conn.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if need_utf8:
            options.append("SMTPUTF8")
        if conn.has_extn("size"):
            options.append(f"SIZE={size}")
        mail_line = f"MAIL FROM:<{envelope.sender}>" + "".join(" " + o for o in options)

        while state.open_indexes():
            accepted = self._one_transaction(conn, mail_line, envelope, state)
            if accepted is None:
                return
            message.seek(start)
            self._send_data(conn, accepted, message, state)

    def _no_smtputf8(self, what: str) -> str:
        """Log and return the reason for a non-ASCII address the server cannot take."""
        text = (f"{STATUS_NON_ASCII_TEMPORARY} {what} needs SMTPUTF8, which {self.peer} does "
                "not offer: enable SMTPUTF8 on the local MTA")
        log.warning("delivery to %s deferred: %s", self.peer, text)
        return text

    def _one_transaction(
        self, conn: smtplib.SMTP, mail_line: str, envelope: Envelope, state: _Transaction
    ) -> list[int] | None:
        """Send MAIL and RCPTs; return the accepted indexes, or None when done."""
        code, text = _command(conn, mail_line)
        if code // 100 != 2:
            log.info("%s rejected MAIL FROM:<%s>: %d %s", self.peer, envelope.sender, code, text)
            for index in state.open_indexes():
                state.set(index, code, text)
            _command(conn, "RSET")
            return None
        accepted: list[int] = []
        for index in state.open_indexes():
            rcpt = envelope.recipients[index]
            code, text = _command(conn, f"RCPT TO:<{rcpt}>")
            if code == CODE_TOO_MANY_RECIPIENTS and accepted:
                # RFC 5321 section 4.5.3.1.10: send the rest in a new transaction.
                log.info(
                    "%s took %d recipients in one transaction; the rest follow in another",
                    self.peer,
                    len(accepted),
                )
                break
            if code // 100 == 2:
                accepted.append(index)
            else:
                state.set(index, code, text)
        if not accepted:
            _command(conn, "RSET")
            return None
        return accepted

    def _send_data(
        self, conn: smtplib.SMTP, accepted: list[int], message: BinaryIO, state: _Transaction
    ) -> None:
        code, text = _command(conn, "DATA")
        if code != CODE_START_MAIL_INPUT:
            # A 2xx reply to DATA itself is a protocol error, not a delivery.
            outcome = Outcome.DEFERRED if code // 100 == 2 else None
            for index in accepted:
                state.set(index, code, text, outcome)
            return
        # The terminator goes out with the last chunk: sent alone after a
        # large write, Nagle's algorithm would hold it until the peer's
        # delayed ACK, about 40 ms per message on Linux.
        previous = b""
        for chunk in iter_converted(message, crlf=True, stuff=True):
            if previous:
                conn.send(previous)
            previous = chunk
        conn.send(previous + b"." + _CRLF)
        if not self.lmtp:
            code, body = conn.getreply()
            for index in accepted:
                state.set(index, code, body.decode("utf-8", "replace"))
            return
        # RFC 2033 section 4.2: one reply per accepted recipient, in RCPT order.
        for index in accepted:
            code, body = conn.getreply()
            state.set(index, code, body.decode("utf-8", "replace"))


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return f"{exc.smtp_code} {text}"
    return str(exc) or type(exc).__name__


def _close(conn: smtplib.SMTP) -> None:
    try:
        if conn.sock is not None:
            conn.quit()
    except (OSError, smtplib.SMTPException):
        pass
    finally:
        conn.close()


class SmtpTarget(_SmtpFamilyTarget):
    """Deliver over SMTP (RFC 5321) to HOST:PORT."""

    def _connect(self) -> smtplib.SMTP:
        conn = _SmtpClient(self.reader, timeout=self.timeout, local_hostname=self.helo)
        code, text = conn.connect(self.host, self.port)
        if code != 220:
            raise smtplib.SMTPConnectError(code, text)
        _no_delay(conn)
        return conn


class LmtpTarget(_SmtpFamilyTarget):
    """Deliver over LMTP (RFC 2033) to HOST:PORT or to a unix socket (port 0)."""

    lmtp = True

    def _connect(self) -> smtplib.SMTP:
        conn = _LmtpClient(self.reader, timeout=self.timeout, local_hostname=self.helo)
        host = self.host
        code, text = conn.connect(host, self.port) if self.port else conn.connect(host)
        if code != 220:
            raise smtplib.SMTPConnectError(code, text)
        if self.port:
            _no_delay(conn)
        return conn


def _no_delay(conn: smtplib.SMTP) -> None:
    """Send each command at once: replies are awaited one by one anyway."""
    if conn.sock is not None:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
