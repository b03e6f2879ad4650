"""Delivery targets on the site host: SMTP, LMTP, sendmail and Maildir.

A target takes an envelope and the original message (the block already
skipped) and returns one :class:`RecipientResult` per recipient, in envelope
order.  Targets are chosen by URL with :func:`target_from_url`:

``smtp://HOST:PORT``
    RFC 5321 over TCP: EHLO, MAIL, RCPT, DATA.  Uses ``BODY=8BITMIME``
    (RFC 6152) when offered and the message has 8-bit octets, ``SMTPUTF8``
    (RFC 6531) when an address needs it, ``SIZE`` (RFC 1870) when offered.
    A 452 reply to RCPT after at least one accepted recipient means "too
    many recipients" (RFC 5321 section 4.5.3.1.10): the rest go in a further
    transaction on the same connection.
``lmtp://HOST:PORT`` or ``lmtp:/path/to/socket``
    RFC 2033: LHLO, and after DATA one reply per accepted recipient.
``sendmail`` or ``sendmail:/path``
    ``sendmail -i -f SENDER -- RCPT...`` with the message on stdin, LF line
    ends.  The exit status applies to every recipient.
``maildir:/root``
    One Maildir per recipient at ``root/<recipient in lower case>``.

Invariants:

* The message is read in chunks of :data:`CHUNK_SIZE` octets and never held
  whole in memory.  Only line ends change: over SMTP and LMTP every bare CR
  and bare LF becomes CRLF, a final CRLF is added when missing and lines
  starting with "." are dot-stuffed (RFC 5321 section 4.5.2).  For sendmail
  and Maildir, CRLF and bare CR become LF and a final LF is added when
  missing.  The message is never parsed.
* The null sender is sent as ``MAIL FROM:<>`` and as ``-f <>``; it is never
  replaced by another address.
* A result is DELIVERED only after the server or program accepted the
  message for that recipient.  Any doubt (lost connection, timeout, reply
  that is neither 2xx nor 5xx) is DEFERRED, so a retry can only duplicate
  mail, never lose it.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import re
import selectors
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol
from urllib.parse import urlsplit

from mailfeed.envelope import Envelope
from mailfeed.errors import EX_OK, EX_TEMPFAIL, ChildStatus, ConfigError, classify_exit_status

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_REPLY_LINES",
    "DEFAULT_TIMEOUT",
    "LmtpTarget",
    "MaildirTarget",
    "Outcome",
    "RecipientResult",
    "SendmailTarget",
    "SmtpTarget",
    "Target",
    "target_from_url",
]

log = logging.getLogger(__name__)

# Octets read from the message per step.
CHUNK_SIZE = 64 * 1024
DEFAULT_TIMEOUT = 60.0
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
DEFAULT_SENDMAIL = "/usr/sbin/sendmail"
# Longest Maildir folder name, in octets (NAME_MAX on common file systems).
MAX_MAILDIR_NAME = 255

# Codes used for results that the target decides itself, without a reply
# from a server.  They follow RFC 5321 section 4.2 so that logs and DSNs read
# like server replies; the enhanced status codes are from RFC 3463.
CODE_LOCAL_TEMPFAIL = 451  # "Requested action aborted: local error"
CODE_ADDRESS_REJECTED = 553  # "mailbox name not allowed"
# RFC 5321 section 4.5.3.1.10: "452 too many recipients".
CODE_TOO_MANY_RECIPIENTS = 452
# RFC 5321 section 4.3.2: the intermediate reply to DATA.
CODE_START_MAIL_INPUT = 354
# RFC 6531 section 3.7.4.1 (and RFC 6533): non-ASCII address not permitted.
STATUS_NON_ASCII = "5.6.7"
# RFC 3463: "4.4.1 no answer from host", "4.4.2 bad connection".
STATUS_NO_ANSWER = "4.4.1"
STATUS_BAD_CONNECTION = "4.4.2"
STATUS_LOCAL_ERROR = "4.3.0"
STATUS_SYSTEM_FULL = "4.3.1"
STATUS_BAD_MAILBOX = "5.1.3"

_CRLF = b"\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_CR_LINE_END = re.compile(rb"\r\n?")


class Outcome(enum.Enum):
    """The delivery outcome for one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient, with the reply code and text behind it.

    ``code`` is the SMTP or LMTP reply code, or for the sendmail target the
    program's exit status; ``text`` is the reply text or a reason.
    """

    recipient: str
    outcome: Outcome
    code: int
    text: str


class Target(Protocol):
    """A delivery destination that returns one result per recipient, in envelope order.

    ``message`` is a seekable binary file positioned at the first octet of
    the original message; a target may seek back to that position.
    """

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]: ...


def outcome_for_code(code: int) -> Outcome:
    """Classify an SMTP or LMTP reply code (RFC 5321 section 4.2.1)."""
    if 200 <= code <= 299:
        return Outcome.DELIVERED
    if 500 <= code <= 599:
        return Outcome.FAILED
    # 4xx, and anything unexpected: a retry is safe.
    return Outcome.DEFERRED


# --- line-end conversion -------------------------------------------------


class _Converter:
    """Convert a stream's line ends chunk by chunk.

    With ``crlf`` every bare CR and bare LF becomes CRLF; with ``stuff`` a
    line starting with "." gets one more "." (RFC 5321 section 4.5.2).
    Without ``crlf``, CRLF and bare CR become LF.  A CR at the end of a
    chunk is held back until the next octet shows whether a LF follows.
    """

    def __init__(self, *, crlf: bool, stuff: bool) -> None:
        self.crlf = crlf
        self.stuff = stuff
        self.newline = _CRLF if crlf else b"\n"
        self.pending = b""
        self.at_line_start = True
        self.empty = True

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        if data.endswith(b"\r"):
            self.pending = b"\r"
            data = data[:-1]
        else:
            self.pending = b""
        return self._convert(data)

    def finish(self) -> bytes:
        """Return the rest, with a final line end added when missing."""
        out = self._convert(self.pending)
        self.pending = b""
        if not self.empty and not self.at_line_start:
            out += self.newline
            self.at_line_start = True
        return out

    def _convert(self, data: bytes) -> bytes:
        if not data:
            return b""
        pattern, newline = (_LINE_END, _CRLF) if self.crlf else (_CR_LINE_END, b"\n")
        data = pattern.sub(newline, data)
        if self.stuff:
            if self.at_line_start and data.startswith(b"."):
                data = b"." + data
            data = data.replace(b"\n.", b"\n..")
        self.empty = False
        self.at_line_start = data.endswith(self.newline)
        return data


def iter_converted(message: BinaryIO, *, crlf: bool, stuff: bool) -> Iterator[bytes]:
    """Yield the rest of ``message`` with line ends converted, chunk by chunk."""
    converter = _Converter(crlf=crlf, stuff=stuff)
    while chunk := message.read(CHUNK_SIZE):
        out = converter.feed(chunk)
        if out:
            yield out
    tail = converter.finish()
    if tail:
        yield tail


def _scan(message: BinaryIO) -> tuple[int, bool]:
    """Return the size in octets after CRLF conversion and whether 8-bit octets occur.

    The file is left where it was.
    """
    start = message.tell()
    size = 0
    eight_bit = False
    for chunk in iter_converted(message, crlf=True, stuff=False):
        size += len(chunk)
        if not eight_bit and not chunk.isascii():
            eight_bit = True
    message.seek(start)
    return size, eight_bit


# --- SMTP and LMTP ---------------------------------------------------------


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


class _LmtpClient(smtplib.LMTP):
    """smtplib.LMTP whose replies are read with a configurable line limit."""

    def __init__(self, reader: _ReplyReader, **kwargs: object) -> None:
        self._reader = reader
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def getreply(self) -> tuple[int, bytes]:
        code, text = self._reader.read(self)
        return code, text.encode("utf-8")


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

    def set(self, index: int, code: int, text: str, outcome: Outcome | None = None) -> None:
        result = RecipientResult(
            self.recipients[index], outcome or outcome_for_code(code), code, text
        )
        self.results[index] = result

    def open_indexes(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r is None]

    def defer_open(self, text: str, code: int = CODE_LOCAL_TEMPFAIL) -> None:
        for index in self.open_indexes():
            self.set(index, code, text, Outcome.DEFERRED)

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
        try:
            conn = self._connect()
            self._greet(conn)
            self._run(conn, envelope, message, start, size, eight_bit, state)
        except (OSError, smtplib.SMTPException) as exc:
            reason = _describe_error(exc)
            log.warning("delivery to %s failed: %s", self.peer, reason)
            status = STATUS_NO_ANSWER if isinstance(exc, TimeoutError) else STATUS_BAD_CONNECTION
            state.defer_open(f"{status} {self.peer}: {reason}")
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
        utf8_offered = conn.has_extn("smtputf8")
        need_utf8 = _needs_utf8(envelope.sender)
        if need_utf8 and not utf8_offered:
            for index in state.open_indexes():
                state.set(
                    index,
                    CODE_ADDRESS_REJECTED,
                    f"{STATUS_NON_ASCII} sender {envelope.sender!r} needs SMTPUTF8, "
                    f"which {self.peer} does not offer",
                )
            return
        for index in state.open_indexes():
            rcpt = envelope.recipients[index]
            if _needs_utf8(rcpt):
                if not utf8_offered:
                    state.set(
                        index,
                        CODE_ADDRESS_REJECTED,
                        f"{STATUS_NON_ASCII} recipient {rcpt!r} needs SMTPUTF8, "
                        f"which {self.peer} does not offer",
                    )
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
        for chunk in iter_converted(message, crlf=True, stuff=True):
            conn.send(chunk)
        conn.send(b"." + _CRLF)
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
        return conn


# --- sendmail --------------------------------------------------------------

# The null sender on the sendmail command line.  Postfix's sendmail parses
# the -f value as an RFC 822 address, so "<>" and "" both give the null
# sender.  NOTE: learned by reading Postfix's sendmail.c, not by running it.
SENDMAIL_NULL_SENDER = "<>"


class SendmailTarget:
    """Deliver by running ``sendmail -i -f SENDER -- RCPT...``.

    The exit status applies to all recipients, classified by
    :func:`mailfeed.errors.classify_exit_status`: 0 (EX_OK) is delivered; a
    temporary status (75, 71, death by a signal, a status outside sysexits
    such as 1) is deferred; any other sysexits code failed.  ``timeout``
    bounds the whole run, writing the message included: a program still
    running then is killed and every recipient is deferred.
    The message goes to the program's stdin with LF line ends.
    """

    def __init__(self, path: str = DEFAULT_SENDMAIL, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def argv(self, envelope: Envelope) -> list[str]:
        sender = envelope.sender or SENDMAIL_NULL_SENDER
        return [self.path, "-i", "-f", sender, "--", *envelope.recipients]

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]:
        code, outcome, text = self._run(envelope, message)
        return [RecipientResult(rcpt, outcome, code, text) for rcpt in envelope.recipients]

    def _run(self, envelope: Envelope, message: BinaryIO) -> tuple[int, Outcome, str]:
        argv = self.argv(envelope)
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors
                )
            except OSError as exc:
                log.error("failed to run %s: %s", self.path, exc)
                return EX_TEMPFAIL, Outcome.DEFERRED, f"failed to run {self.path}: {exc}"
            assert proc.stdin is not None
            # The timeout bounds the whole run, writing included: a program
            # that never reads its input must not block us once the pipe is full.
            deadline = time.monotonic() + self.timeout
            write_error: OSError | None = None
            try:
                try:
                    _feed(proc.stdin, iter_converted(message, crlf=False, stuff=False), deadline)
                finally:
                    proc.stdin.close()
            except TimeoutError:
                return self._kill(proc)
            except OSError as exc:
                # BrokenPipeError: the program quit early, and its exit status gives the reason.
                write_error = exc
            try:
                status = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return self._kill(proc)
            errors.seek(0)
            detail = errors.read(2048).decode("utf-8", "replace").strip()
        return self._classify(status, write_error, detail)

    def _kill(self, proc: subprocess.Popen[bytes]) -> tuple[int, Outcome, str]:
        proc.kill()
        proc.wait()
        log.warning("killed %s pid %d after the timeout of %g s", self.path, proc.pid,
                    self.timeout)
        return (
            EX_TEMPFAIL,
            Outcome.DEFERRED,
            f"{self.path} timed out after {self.timeout:g} s and was killed",
        )

    def _classify(
        self, status: int, write_error: OSError | None, detail: str
    ) -> tuple[int, Outcome, str]:
        suffix = f": {detail}" if detail else ""
        if status < 0:
            name = signal.Signals(-status).name
            return status, Outcome.DEFERRED, f"{self.path} killed by {name}{suffix}"
        if status == EX_OK and write_error is not None:
            # It exited 0 without reading the whole message: never count
            # a truncated message as delivered.
            return (
                EX_TEMPFAIL,
                Outcome.DEFERRED,
                f"{self.path} exited 0 but did not read the message: {write_error}",
            )
        verdict = classify_exit_status(status)
        if verdict is ChildStatus.OK:
            return status, Outcome.DELIVERED, f"{self.path} exited 0{suffix}"
        if verdict is ChildStatus.TEMPORARY:
            return status, Outcome.DEFERRED, f"{self.path} exited {status} (temporary){suffix}"
        return status, Outcome.FAILED, f"{self.path} exited {status}{suffix}"


def _feed(pipe: IO[bytes], chunks: Iterator[bytes], deadline: float) -> None:
    """Write ``chunks`` to ``pipe`` without blocking past ``deadline`` (monotonic).

    Raise TimeoutError when the reader has not taken everything by then, and
    BrokenPipeError when it quit.
    """
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_WRITE)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if not selector.select(remaining):
                    continue
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue


# --- Maildir ---------------------------------------------------------------


def maildir_name_error(recipient: str) -> str | None:
    """Return why ``recipient`` cannot name a Maildir folder, or None if it can."""
    name = recipient.lower()
    if not name:
        return "empty name"
    if "/" in name:
        return "contains '/'"
    if name.startswith("."):
        return "starts with '.'"
    if "\x00" in name:
        return "contains NUL"
    octets = len(name.encode("utf-8", "surrogateescape"))
    if octets > MAX_MAILDIR_NAME:
        return f"is {octets} octets, over the limit of {MAX_MAILDIR_NAME}"
    return None


class MaildirTarget:
    """Deliver into one Maildir per recipient at ``root/<recipient in lower case>``.

    Each copy is written to ``tmp/``, fsynced, renamed into ``new/``, and the
    ``new/`` folder is fsynced, so a delivered result survives a crash.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._counter = 0
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]:
        start = message.tell()
        results: list[RecipientResult] = []
        for rcpt in envelope.recipients:
            message.seek(start)
            results.append(self._deliver_one(rcpt, message))
        return results

    def _deliver_one(self, rcpt: str, message: BinaryIO) -> RecipientResult:
        problem = maildir_name_error(rcpt)
        if problem is not None:
            text = f"{STATUS_BAD_MAILBOX} recipient {rcpt!r} is not a valid Maildir name: {problem}"
            log.warning("%s", text)
            return RecipientResult(rcpt, Outcome.FAILED, CODE_ADDRESS_REJECTED, text)
        folder = self.root / rcpt.lower()
        try:
            path = self._write(folder, message)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error("writing to Maildir %s failed: %s", folder, exc)
            status = STATUS_SYSTEM_FULL if full else STATUS_LOCAL_ERROR
            # Every write failure is deferred: the folder may be fixed, and a
            # bounce for a local fault would lose the mail for its recipient.
            return RecipientResult(
                rcpt,
                Outcome.DEFERRED,
                CODE_LOCAL_TEMPFAIL,
                f"{status} writing to Maildir {folder} failed: {exc}",
            )
        return RecipientResult(rcpt, Outcome.DELIVERED, 250, f"2.0.0 delivered to {path}")

    def _unique_name(self) -> str:
        self._counter += 1
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micro}P{os.getpid()}Q{self._counter}.{self._host}"

    def _make_folder(self, folder: Path) -> None:
        if folder.is_symlink():
            raise OSError(errno.ELOOP, "Maildir folder is a symbolic link", str(folder))
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def _write(self, folder: Path, message: BinaryIO) -> Path:
        self._make_folder(folder)
        name = self._unique_name()
        tmp_path = folder / "tmp" / name
        new_path = folder / "new" / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp_path, flags, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=True) as out:
                for chunk in iter_converted(message, crlf=False, stuff=False):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            # link, unlike rename, fails with EEXIST instead of replacing a
            # message that already has this name in new/.
            os.link(tmp_path, new_path, follow_symlinks=False)
        finally:
            tmp_path.unlink(missing_ok=True)
        _fsync_dir(folder / "new")
        return new_path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- target URLs -----------------------------------------------------------

TARGET_FORMS = (
    "smtp://HOST:PORT, lmtp://HOST:PORT, lmtp:/path/to/socket, sendmail, "
    "sendmail:/path/to/sendmail or maildir:/path/to/root"
)


def _invalid(url: str, why: str) -> ConfigError:
    return ConfigError(f"invalid delivery target {url!r}: {why}; expected {TARGET_FORMS}")


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise _invalid(url, "only a host and a port are allowed")
    try:
        port = parts.port
    except ValueError:
        raise _invalid(url, "the port is not a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise _invalid(url, "the host is missing")
    if port == 0:
        raise _invalid(url, "port 0 is not a valid destination")
    return host, port if port is not None else default_port


def target_from_url(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    helo: str | None = None,
    sendmail_path: str = DEFAULT_SENDMAIL,
    max_line: int = DEFAULT_MAX_LINE,
    max_reply_lines: int = DEFAULT_MAX_REPLY_LINES,
) -> Target:
    """Build the target that ``url`` names; raise ConfigError if it is invalid.

    ``max_line`` bounds each reply line from an SMTP or LMTP server, in
    octets, and ``max_reply_lines`` the lines of one reply.
    ``sendmail_path`` is the program for a bare ``sendmail`` URL.
    """
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "smtp" and rest.startswith("//"):
        host, port = _host_port(url, DEFAULT_SMTP_PORT)
        return SmtpTarget(host, port, timeout=timeout, helo=helo, max_line=max_line,
                          max_reply_lines=max_reply_lines)
    if scheme == "lmtp" and rest.startswith("//"):
        host, port = _host_port(url, DEFAULT_LMTP_PORT)
        return LmtpTarget(host, port, timeout=timeout, helo=helo, max_line=max_line,
                          max_reply_lines=max_reply_lines)
    if scheme == "lmtp" and rest.startswith("/"):
        return LmtpTarget(rest, 0, timeout=timeout, helo=helo, max_line=max_line,
                          max_reply_lines=max_reply_lines)
    if scheme == "sendmail" and not colon:
        return SendmailTarget(sendmail_path, timeout=timeout)
    if scheme == "sendmail" and rest.startswith("/") and not rest.startswith("//"):
        return SendmailTarget(rest, timeout=timeout)
    if scheme == "maildir" and rest.startswith("/") and not rest.startswith("//"):
        return MaildirTarget(rest)
    raise _invalid(url, "unknown form")

