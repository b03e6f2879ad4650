"""The POP3 client session: :func:`connect` and :class:`Pop3Client`.

See the package docstring for the RFCs implemented and the invariants.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import enum
import hashlib
import io
import ipaddress
import itertools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from mailfeed.pop3client.auth import (
    MAX_AUTH_COMMAND_OCTETS,
    SASL_CANCEL,
    SASL_CHALLENGE_PREFIX,
    SASL_PLAIN,
    _apop_timestamp,
    _check_argument,
    mask_secrets,
)
from mailfeed.pop3client.body import (
    MESSAGE_MIN_RATE,
    SINK_CHUNK,
    RetrFailure,
    RetrResult,
    Sink,
    _BodyOutcome,
    _Deadline,
    _DiscardingSink,
)
from mailfeed.pop3client.errors import (
    Pop3AuthError,
    Pop3Error,
    Pop3ProtocolError,
    Pop3ServerError,
    Pop3Timeout,
    Pop3TlsError,
)
from mailfeed.pop3client.listing import UidlListing, parse_list_listing, parse_uidl_listing
from mailfeed.pop3client.transport import (
    CRLF,
    MULTILINE_TERMINATOR,
    TERMINATION_OCTET,
    _Connection,
    _display,
    _LineTooLong,
    _parse_status,
    _Pending,
    _Status,
    _StreamProtocol,
    _strip_line_end,
)
from mailfeed.scram import MECHANISM as SCRAM_MECHANISM
from mailfeed.scram import ScramClient, ScramError

__all__ = [
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_RETR_WINDOW",
    "Pop3Client",
    "Timeouts",
    "TlsMode",
    "TraceCallback",
    "client_ssl_context",
    "connect",
]

# A server appends CRLF to a message whose last line has none (RFC 1939
# section 3), and some leave it out of LIST: Dovecot serving a Maildir file
# takes LIST from its W= size, which does not count that CRLF.  A reply
# exactly this much longer than LIST is therefore accepted.
UNCOUNTED_FINAL_CRLF = 2

_LOG = logging.getLogger("mailfeed.pop3client")

# Capability names (RFC 2449 section 6, RFC 2595 section 4).
CAPA_PIPELINING = "PIPELINING"
CAPA_SASL = "SASL"
CAPA_STLS = "STLS"
CAPA_USER = "USER"

# The shortest line limit accepted: RFC 2449 section 4 allows status lines
# of 512 octets including CRLF.
MIN_MAX_LINE_LENGTH = 512

_session_numbers = itertools.count(1)

# Maximum length of a reply line, counting its CRLF.  RFC 5322 allows 998
# octets plus CRLF, but real mail carries much longer lines.  One such line is
# the largest amount of data the client keeps in memory.
DEFAULT_MAX_LINE_LENGTH = 4 * 1024 * 1024

# Most RETR (or DELE) commands outstanding at once when the server offers
# PIPELINING.  It bounds commands in flight, not memory: replies stream into
# the sinks, and reading pauses at READ_HIGH_WATER.  A drain of up to this
# many messages sends all its RETRs in one flight.
DEFAULT_RETR_WINDOW = 1000

TraceCallback = Callable[[str, str], None]
"""Called with ``("C", line)`` for each command sent and ``("S", line)`` for
each status line received; secrets are already masked."""


class TlsMode(enum.Enum):
    """Protection of the connection: implicit TLS, STARTTLS or none."""

    IMPLICIT = "implicit"  # TLS from the first octet (RFC 8314, port 995)
    STARTTLS = "starttls"  # plain TCP, then STLS (RFC 2595), required
    NONE = "none"  # plaintext: loopback only unless allow_plaintext is set


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for each phase of a session.

    ``connect`` covers TCP connect and TLS handshakes.  ``greeting`` covers
    the greeting and the CAPA that follows, ``login`` each step of
    authentication, and ``command`` the status line of any other command.
    ``data`` is the silence allowed between two chunks of a multi-line reply,
    so a large message may take longer as long as octets keep arriving.
    ``message`` bounds one RETR reply as a whole, so a server that streams a
    message without end cannot hold the session: the reply may take
    ``message`` plus its LIST size divided by :data:`MESSAGE_MIN_RATE` seconds.
    """

    connect: float = 30.0
    greeting: float = 30.0
    login: float = 60.0
    command: float = 60.0
    data: float = 120.0
    message: float = 600.0


def client_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """Build a context that verifies the server certificate and host name.

    Trusts the system store, or only ``cafile`` (PEM) when given.
    """
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def connect(
    host: str,
    port: int,
    *,
    tls: TlsMode,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeouts: Timeouts | None = None,
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    allow_plaintext: bool = False,
    trace: TraceCallback | None = None,
    session_id: str | None = None,
) -> Pop3Client:
    """Open a session: connect, read the greeting, CAPA, STLS when asked.

    Returns a client in the AUTHORIZATION state; call :meth:`Pop3Client.login`
    next.  ``ssl_context`` defaults to :func:`client_ssl_context` (system
    store, verification on).  ``server_hostname`` overrides the name checked
    against the certificate (default ``host``).  ``max_line_length`` counts a
    line with its CRLF.  Raises :class:`Pop3TlsError` before anything is sent
    when plaintext is not allowed, and on any STLS or handshake failure;
    :class:`Pop3Timeout`; :class:`Pop3ServerError` for a ``-ERR`` greeting;
    :class:`Pop3ProtocolError` for a malformed one; OSError when the TCP
    connect fails.
    """
    if max_line_length < MIN_MAX_LINE_LENGTH:
        raise ValueError(
            f"max_line_length={max_line_length} is too small: use at least {MIN_MAX_LINE_LENGTH}"
        )
    timeouts = timeouts if timeouts is not None else Timeouts()
    loopback = _is_loopback(host)
    if tls is TlsMode.NONE and not (loopback or allow_plaintext):
        raise Pop3TlsError(
            f"refusing plaintext POP3 to {host}, which is not a loopback address:"
            " use TLS (implicit or STARTTLS) or set allow_plaintext"
        )
    context = None
    if tls is not TlsMode.NONE:
        context = ssl_context if ssl_context is not None else client_ssl_context()
    hostname = server_hostname or host
    session = session_id or f"pop3c-{next(_session_numbers)}"
    loop = asyncio.get_running_loop()
    protocol = _StreamProtocol()
    try:
        async with asyncio.timeout(timeouts.connect):
            await loop.create_connection(
                lambda: protocol,
                host,
                port,
                ssl=context if tls is TlsMode.IMPLICIT else None,
                server_hostname=hostname if tls is TlsMode.IMPLICIT else None,
                ssl_handshake_timeout=timeouts.connect if tls is TlsMode.IMPLICIT else None,
            )
    except TimeoutError:
        raise Pop3Timeout("connect", timeouts.connect, f"{host} port {port}") from None
    except ssl.SSLError as exc:
        raise Pop3TlsError(f"TLS handshake with {host} port {port} failed: {exc}") from exc

    client = Pop3Client(
        _Connection(protocol, max_line_length),
        peer=f"{host}:{port}",
        session_id=session,
        timeouts=timeouts,
        loopback=loopback,
        allow_plaintext=allow_plaintext,
        tls_active=tls is TlsMode.IMPLICIT,
        trace=trace,
    )
    try:
        await client._open(tls, context, hostname)
    except BaseException:
        await client.close()
        raise
    return client


class Pop3Client:
    """One POP3 session.  Create it with :func:`connect`.

    Methods must not run concurrently, and no other command may be issued
    while a :meth:`retrieve` iteration is open.  After a protocol error or a
    timeout the session is closed and every later command raises that error.
    """

    capabilities: dict[str, list[str]]
    """CAPA reply: upper-case capability name -> its arguments (RFC 2449)."""

    def __init__(
        self,
        connection: _Connection,
        *,
        peer: str,
        session_id: str,
        timeouts: Timeouts,
        loopback: bool,
        allow_plaintext: bool,
        tls_active: bool,
        trace: TraceCallback | None,
    ) -> None:
        self.capabilities = {}
        self.greeting = ""
        self.peer = peer
        self.session_id = session_id
        self._conn = connection
        self._timeouts = timeouts
        self._loopback = loopback
        self._allow_plaintext = allow_plaintext
        self._tls_active = tls_active
        self._trace = trace
        self._timestamp: str | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._broken: Pop3Error | None = None
        self._retrieving = False
        self._closed = False

    # -- session state -------------------------------------------------

    @property
    def pipelining(self) -> bool:
        """True when the server offered PIPELINING."""
        return CAPA_PIPELINING in self.capabilities

    @property
    def tls_active(self) -> bool:
        """True when the session runs over TLS."""
        return self._tls_active

    @property
    def apop_timestamp(self) -> str | None:
        """The greeting's APOP timestamp when it is a valid msg-id, else None."""
        return self._timestamp

    @property
    def max_line_length(self) -> int:
        """Longest line accepted, counting its CRLF."""
        return self._conn.max_line_length

    async def __aenter__(self) -> Pop3Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _open(self, tls: TlsMode, context: ssl.SSLContext | None, hostname: str) -> None:
        line = await self._read_line("greeting", self._timeouts.greeting)
        status = self._status_of(line, "the greeting")
        if not status.ok:
            raise self._server_error(Pop3ServerError, "the greeting", status)
        self.greeting = status.text
        self._timestamp = _apop_timestamp(status.text)
        await self._capa()
        if tls is TlsMode.STARTTLS:
            assert context is not None
            await self._starttls(context, hostname)

    async def _capa(self) -> None:
        pending = self._send_one("CAPA", multiline=True)
        status = await self._read_status(pending, "greeting", self._timeouts.greeting)
        capabilities: dict[str, list[str]] = {}
        if status.ok:
            for line in await self._read_lines("greeting", self._timeouts.greeting):
                words = _display(line).split()
                if words:
                    capabilities[words[0].upper()] = words[1:]
        self.capabilities = capabilities
        _LOG.debug("%s %s: capabilities %s", self.session_id, self.peer, sorted(capabilities))

    async def _starttls(self, context: ssl.SSLContext, hostname: str) -> None:
        if CAPA_STLS not in self.capabilities:
            raise self._fail(
                Pop3TlsError(
                    f"STARTTLS is required but {self.peer} does not list STLS in its CAPA reply;"
                    " no credentials were sent. The server lacks STLS or someone on the path"
                    " removed it"
                )
            )
        pending = self._send_one("STLS", multiline=False)
        status = await self._read_status(pending, "greeting", self._timeouts.greeting)
        if not status.ok:
            raise self._fail(
                Pop3TlsError(
                    f"STARTTLS is required but {self.peer} refused STLS: {status.line!r};"
                    " no credentials were sent"
                )
            )
        try:
            dropped = await self._conn.start_tls(context, hostname, self._timeouts.connect)
        except Pop3Error as exc:
            raise self._fail(exc) from None
        if dropped:
            _LOG.warning(
                "%s %s: dropped %d octets received after the STLS reply and before TLS;"
                " a man in the middle may have injected them",
                self.session_id,
                self.peer,
                dropped,
            )
        self._tls_active = True
        # RFC 2595 section 4: the client must discard what it learnt before TLS.
        await self._capa()

    # -- transport and reply layer -------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise Pop3ProtocolError(f"the POP3 session {self.session_id} is closed")

    def _fail(self, error: Pop3Error) -> Pop3Error:
        """Mark the session broken by ``error``, close it, and return the error to raise."""
        if self._broken is None:
            self._broken = error
            _LOG.warning("%s %s: session closed: %s", self.session_id, self.peer, error)
        self._conn.abort()
        return error

    def _emit_trace(self, direction: str, text: str) -> None:
        if self._trace is not None:
            self._trace(direction, text)

    def _send(
        self, lines: Sequence[str], *, multiline: bool, secret: bool = False
    ) -> list[_Pending]:
        """Write the command lines in one flight and queue their pending replies."""
        self._check_usable()
        pendings: list[_Pending] = []
        for line in lines:
            log_text = mask_secrets(line, sasl_response=secret)
            self._emit_trace("C", log_text)
            pendings.append(_Pending(log_text, multiline))
        data = b"".join(line.encode("utf-8") + CRLF for line in lines)
        try:
            self._conn.write(data)
        except Pop3Error as exc:
            raise self._fail(exc) from None
        self._pending.extend(pendings)
        return pendings

    def _send_one(self, line: str, *, multiline: bool, secret: bool = False) -> _Pending:
        return self._send([line], multiline=multiline, secret=secret)[0]

    async def _flush(self, phase: str, seconds: float) -> None:
        try:
            await self._conn.drain(phase, seconds)
        except Pop3Error as exc:
            raise self._fail(exc) from None

    async def _read_line(self, phase: str, seconds: float) -> bytes:
        """Read one line; any failure breaks the session."""
        try:
            return await self._conn.read_line(phase, seconds)
        except _LineTooLong as exc:
            raise self._fail(
                Pop3ProtocolError(
                    f"a reply line of at least {exc.length} octets exceeds"
                    f" max_line_length={self._conn.max_line_length}"
                )
            ) from None
        except Pop3Error as exc:
            raise self._fail(exc) from None
        except BaseException:
            # Cancelled in the middle of a reply: the position in the stream is lost.
            self._fail(Pop3ProtocolError("a read was cancelled in the middle of a reply"))
            raise

    def _status_of(self, line: bytes, command: str) -> _Status:
        try:
            status = _parse_status(line, command)
        except Pop3ProtocolError as exc:
            raise self._fail(exc) from None
        self._emit_trace("S", status.line)
        return status

    async def _read_raw_reply(self, pending: _Pending, phase: str, seconds: float) -> bytes:
        """Read the first line of ``pending``'s reply, after the abandoned ones before it."""
        await self._skip_abandoned()
        if not self._pending or self._pending[0] is not pending:
            raise RuntimeError("POP3 replies must be read in the order the commands were sent")
        line = await self._read_line(phase, seconds)
        self._pending.popleft()
        return line

    async def _read_status(self, pending: _Pending, phase: str, seconds: float) -> _Status:
        line = await self._read_raw_reply(pending, phase, seconds)
        return self._status_of(line, pending.log_text)

    async def _skip_abandoned(self) -> None:
        while self._pending and self._pending[0].abandoned:
            pending = self._pending[0]
            line = await self._read_line("command", self._timeouts.command)
            self._pending.popleft()
            status = self._status_of(line, pending.log_text)
            if status.ok and pending.multiline:
                await self._read_body(_DiscardingSink().write)
            _LOG.debug(
                "%s %s: discarded the reply to abandoned %s", self.session_id, self.peer,
                pending.log_text,
            )

    async def _read_lines(self, phase: str, seconds: float) -> list[bytes]:
        """Read an unstuffed multi-line listing (CAPA, UIDL, LIST) without line ends."""
        lines: list[bytes] = []
        while True:
            line = await self._read_line(phase, seconds)
            if line == MULTILINE_TERMINATOR:
                return lines
            if line[:1] == b".":
                line = line[1:]
            lines.append(_strip_line_end(line))

    async def _read_body(
        self, write: Callable[[bytes], object], deadline: _Deadline | None = None
    ) -> _BodyOutcome:
        """Stream one multi-line body, unstuffed, into ``write``.

        Reads up to and including the terminator in every case, so the
        session stays in sync: after the first defect (a line over
        max_line_length, a dot-leading line that was not stuffed, a failed
        write) the rest of the body is read and discarded.  Raises
        Pop3Timeout or Pop3ProtocolError (connection closed) and then the
        session is broken; Pop3Timeout of phase ``message`` when ``deadline``
        passes before the terminator.
        """
        try:
            return await self._stream_body(write, deadline)
        except Pop3Error as exc:
            raise self._fail(exc) from None
        except BaseException:
            self._fail(Pop3ProtocolError("a read was cancelled in the middle of a reply"))
            raise

    async def _stream_body(
        self, write: Callable[[bytes], object], deadline: _Deadline | None
    ) -> _BodyOutcome:
        conn = self._conn
        buffer = conn.buffer
        limit = conn.max_line_length
        outcome = _BodyOutcome()
        chunks: list[bytes] = []
        chunk_size = 0
        long_line = 0  # octets of an over-long line read so far, 0 when none

        def emit(data: bytes) -> None:
            nonlocal chunk_size
            if outcome.defect is None and data:
                chunks.append(data)
                chunk_size += len(data)
            outcome.size += len(data)

        def flush() -> None:
            nonlocal chunk_size
            if chunks and outcome.defect is None:
                try:
                    write(b"".join(chunks))
                except OSError as exc:
                    outcome.defect = f"writing the message failed: {exc}"
                    outcome.failure = RetrFailure.SINK_ERROR
            chunks.clear()
            chunk_size = 0

        while True:
            pos = 0
            run_start = 0
            finished = False
            while True:
                end = buffer.find(b"\n", pos)
                if end < 0:
                    break
                line_end = end + 1
                if long_line:
                    long_line += line_end - pos
                    self._note_long_line(outcome, long_line, limit)
                    long_line = 0
                    pos = run_start = line_end
                    continue
                if line_end - pos > limit:
                    emit(bytes(buffer[run_start:pos]))
                    self._note_long_line(outcome, line_end - pos, limit)
                    pos = run_start = line_end
                    continue
                if buffer[pos] == TERMINATION_OCTET:
                    emit(bytes(buffer[run_start:pos]))
                    if line_end - pos == 3 and buffer[pos + 1] == 0x0D:
                        pos = run_start = line_end
                        finished = True
                        break
                    if buffer[pos + 1] != TERMINATION_OCTET and outcome.defect is None:
                        outcome.defect = (
                            f"line at octet {outcome.size} starts with a single '.' that the"
                            " server did not byte-stuff (RFC 1939 section 3), so the message"
                            " content is uncertain"
                        )
                        outcome.failure = RetrFailure.UNSTUFFED_DOT
                    run_start = pos + 1
                pos = line_end
            if not long_line:
                emit(bytes(buffer[run_start:pos]))
            del buffer[:pos]
            if chunk_size >= SINK_CHUNK or finished:
                flush()
            if finished:
                return outcome
            if long_line or len(buffer) > limit:
                # An over-long line: drop what has arrived and keep counting.
                long_line += len(buffer)
                buffer.clear()
                await self._wait_body(0, deadline)
                continue
            await self._wait_body(len(buffer), deadline)

    async def _wait_body(self, have: int, deadline: _Deadline | None) -> None:
        """Wait for more of a body: the data timeout, cut short by ``deadline``."""
        seconds = self._timeouts.data
        if deadline is not None:
            remaining = deadline.at - time.monotonic()
            if remaining <= seconds:
                try:
                    if remaining > 0:
                        await self._conn.wait_more(have, "message", remaining)
                        return
                except Pop3Timeout:
                    pass
                raise Pop3Timeout("message", deadline.seconds, deadline.what)
        await self._conn.wait_more(have, "data", seconds)

    @staticmethod
    def _note_long_line(outcome: _BodyOutcome, length: int, limit: int) -> None:
        if outcome.defect is None:
            outcome.defect = (
                f"a line of {length} octets exceeds max_line_length={limit}; the message was"
                " read to its end and discarded. Raise max_line_length to accept it"
            )
            outcome.failure = RetrFailure.LINE_TOO_LONG

    def _server_error(
        self, kind: type[Pop3ServerError], command: str, status: _Status
    ) -> Pop3ServerError:
        return kind(command, status.text, status.code)

    async def _simple(self, line: str, phase: str, seconds: float) -> _Status:
        """Send one single-line command and return its +OK status; raise on -ERR."""
        pending = self._send_one(line, multiline=False)
        status = await self._read_status(pending, phase, seconds)
        if not status.ok:
            raise self._server_error(Pop3ServerError, pending.log_text, status)
        return status

    async def _listing(self, pending: _Pending) -> list[bytes]:
        status = await self._read_status(pending, "command", self._timeouts.command)
        if not status.ok:
            raise self._server_error(Pop3ServerError, pending.log_text, status)
        return await self._read_lines("data", self._timeouts.data)

    # -- authentication --------------------------------------------------

    async def login(self, user: str, password: str) -> str:
        """Authenticate with the best mechanism the server offers.

        Order: SASL SCRAM-SHA-256, SASL PLAIN, APOP (only with a valid
        greeting timestamp), USER/PASS.  PLAIN and USER/PASS send the password
        itself, so they are used only over TLS, to loopback, or with
        ``allow_plaintext``.  Returns the text of the final ``+OK``.  Raises
        :class:`Pop3AuthError` on ``-ERR``, a failed SCRAM server check, or
        when no mechanism is usable; there is no fallback to a weaker
        mechanism after a failure.
        """
        _check_argument("user name", user)
        _check_argument("password", password)
        self._check_usable()
        mechanisms = [name.upper() for name in self.capabilities.get(CAPA_SASL, [])]
        cleartext_ok = self._tls_active or self._loopback or self._allow_plaintext
        if SCRAM_MECHANISM in mechanisms:
            method = SCRAM_MECHANISM
            text = await self._auth_scram(user, password)
        elif SASL_PLAIN in mechanisms and cleartext_ok:
            method = SASL_PLAIN
            text = await self._auth_plain(user, password)
        elif self._timestamp is not None:
            method = "APOP"
            text = await self._apop(user, password, self._timestamp)
        elif cleartext_ok and (CAPA_USER in self.capabilities or not self.capabilities):
            method = "USER"
            text = await self._user_pass(user, password)
        else:
            raise Pop3AuthError(
                "login",
                "",
                None,
                message=(
                    f"no usable login mechanism at {self.peer}: the server offers"
                    f" SASL {mechanisms or 'none'}, no APOP timestamp, and plaintext passwords"
                    f" are not allowed without TLS (tls_active={self._tls_active})"
                ),
            )
        _LOG.info("%s %s: logged in as %s with %s", self.session_id, self.peer, user, method)
        return text

    async def _login_status(self, pending: _Pending) -> _Status:
        status = await self._read_status(pending, "login", self._timeouts.login)
        if not status.ok:
            raise self._server_error(Pop3AuthError, pending.log_text, status)
        return status

    async def _user_pass(self, user: str, password: str) -> str:
        if not self.pipelining:
            await self._login_status(self._send_one(f"USER {user}", multiline=False))
            pending = self._send_one(f"PASS {password}", multiline=False)
            return (await self._login_status(pending)).text
        # RFC 2449 section 6.6: with PIPELINING, USER and PASS go in one flight.
        # The password goes to the same server either way; a rejected USER
        # makes the PASS reply one to discard.  No other command is sent
        # before PASS succeeded, so a failed login reads no mailbox.
        user_pending, pass_pending = self._send(
            [f"USER {user}", f"PASS {password}"], multiline=False
        )
        try:
            await self._login_status(user_pending)
        except Pop3AuthError:
            pass_pending.abandoned = True
            raise
        return (await self._login_status(pass_pending)).text

    async def _apop(self, user: str, password: str, timestamp: str) -> str:
        digest = hashlib.md5(
            (timestamp + password).encode("utf-8"), usedforsecurity=False
        ).hexdigest()
        pending = self._send_one(f"APOP {user} {digest}", multiline=False)
        return (await self._login_status(pending)).text

    async def _auth_plain(self, user: str, password: str) -> str:
        response = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        pending, challenge = await self._auth_start(SASL_PLAIN, response)
        if challenge is not None:
            pending = self._send_one(response, multiline=False, secret=True)
        return (await self._login_status(pending)).text

    async def _auth_start(
        self, mechanism: str, initial: str
    ) -> tuple[_Pending, bytes | None]:
        """Send AUTH; return the pending reply and None, or a first challenge.

        The initial response rides on the AUTH line when it fits in 255
        octets (RFC 5034 section 4); otherwise the server's empty challenge is
        read here and the caller sends the response.
        """
        line = f"AUTH {mechanism} {initial}"
        if len(line) + len(CRLF) <= MAX_AUTH_COMMAND_OCTETS:
            return self._send_one(line, multiline=False), None
        pending = self._send_one(f"AUTH {mechanism}", multiline=False)
        challenge = await self._read_challenge(pending)
        return pending, challenge

    async def _read_challenge(self, pending: _Pending) -> bytes:
        """Read a SASL challenge; raise Pop3AuthError for a status line instead."""
        line = await self._read_raw_reply(pending, "login", self._timeouts.login)
        body = _strip_line_end(line)
        if body.startswith(SASL_CHALLENGE_PREFIX) or body == b"+":
            self._emit_trace("S", _display(body))
            try:
                return base64.b64decode(body[2:], validate=True)
            except ValueError:
                await self._sasl_cancel()
                raise Pop3AuthError(
                    pending.log_text, "", None,
                    message=f"invalid base64 in the SASL challenge {_display(body)[:80]!r}",
                ) from None
        status = self._status_of(line, pending.log_text)
        if status.ok:
            raise Pop3AuthError(
                pending.log_text, status.text, None,
                message=(
                    f"the server answered {status.line!r} before the SASL exchange ended;"
                    " it did not prove that it knows the password"
                ),
            )
        raise self._server_error(Pop3AuthError, pending.log_text, status)

    async def _sasl_cancel(self) -> None:
        pending = self._send_one(SASL_CANCEL, multiline=False, secret=True)
        line = await self._read_raw_reply(pending, "login", self._timeouts.login)
        self._emit_trace("S", _display(_strip_line_end(line)))

    async def _auth_scram(self, user: str, password: str) -> str:
        scram = ScramClient(user, password)
        first = base64.b64encode(scram.first().encode("utf-8")).decode("ascii")
        pending, challenge = await self._auth_start(SCRAM_MECHANISM, first)
        if challenge is not None:
            pending = self._send_one(first, multiline=False, secret=True)
        server_first = await self._read_challenge(pending)
        try:
            final = scram.final(server_first.decode("utf-8"))
        except (ScramError, UnicodeDecodeError) as exc:
            await self._sasl_cancel()
            raise Pop3AuthError(
                pending.log_text, "", None, message=f"invalid SCRAM server-first-message: {exc}"
            ) from exc
        response = base64.b64encode(final.encode("utf-8")).decode("ascii")
        pending = self._send_one(response, multiline=False, secret=True)
        server_final = await self._read_challenge(pending)
        try:
            scram.check(server_final.decode("utf-8"))
        except (ScramError, UnicodeDecodeError) as exc:
            await self._sasl_cancel()
            raise Pop3AuthError(
                pending.log_text, "", None,
                message=f"the server failed SCRAM verification: {exc}; it may be an impostor",
            ) from exc
        pending = self._send_one("", multiline=False, secret=True)
        return (await self._login_status(pending)).text

    # -- mailbox commands ----------------------------------------------

    async def stat(self) -> tuple[int, int]:
        """Return (message count, maildrop size in octets)."""
        status = await self._simple("STAT", "command", self._timeouts.command)
        words = status.text.split()
        if len(words) < 2 or not words[0].isdigit() or not words[1].isdigit():
            raise self._fail(
                Pop3ProtocolError(f"invalid STAT reply {status.line!r}: expected '+OK count size'")
            )
        return int(words[0]), int(words[1])

    async def list_all(self) -> dict[int, int]:
        """Return LIST as message number -> size; malformed lines are logged and skipped."""
        self._check_idle()
        lines = await self._listing(self._send_one("LIST", multiline=True))
        return self._sizes_from(lines)

    async def uidl_all(self) -> UidlListing:
        """Return the parsed UIDL listing; malformed lines become defects, never errors."""
        self._check_idle()
        lines = await self._listing(self._send_one("UIDL", multiline=True))
        return parse_uidl_listing(lines)

    async def uidl_and_list(self) -> tuple[UidlListing, dict[int, int]]:
        """Run UIDL and LIST, in one flight when the server offers PIPELINING."""
        self._check_idle()
        if not self.pipelining:
            return await self.uidl_all(), await self.list_all()
        uidl, listing = self._send(["UIDL", "LIST"], multiline=True)
        try:
            uidl_lines = await self._listing(uidl)
        except Pop3ServerError:
            listing.abandoned = True
            raise
        return parse_uidl_listing(uidl_lines), self._sizes_from(await self._listing(listing))

    def _sizes_from(self, lines: list[bytes]) -> dict[int, int]:
        sizes, defects = parse_list_listing(lines)
        for _, reason in defects:
            _LOG.warning("%s %s: LIST: %s", self.session_id, self.peer, reason)
        return sizes

    def _check_idle(self) -> None:
        if self._retrieving:
            raise RuntimeError("a retrieve() iteration is open: finish it or call its aclose()")
        self._check_usable()

    def retrieve(
        self,
        msgnums: Sequence[int],
        *,
        open_sink: Callable[[int], Sink],
        expected_sizes: Mapping[int, int] | None = None,
        window: int = DEFAULT_RETR_WINDOW,
    ) -> AsyncIterator[RetrResult]:
        """Retrieve messages, yielding one :class:`RetrResult` each, in order.

        With PIPELINING, up to ``window`` RETR commands are outstanding; they
        are sent in batches whenever half the window has drained, so a drain
        of N <= window messages costs one flight.  Without it, one RETR at a
        time.  ``open_sink(msgnum)`` is called when the ``+OK`` for that
        message arrives; the unstuffed octets are written to it as they come
        in, and the caller closes it.

        A message fails (``ok=False``) on ``-ERR``, when its unstuffed size
        differs from ``expected_sizes`` (LIST sizes, line ends counted as
        sent), when a line starts with an unstuffed '.', when writing the
        sink raises OSError, or when a line is longer than max_line_length:
        such a message is read to its terminator and discarded, so the session
        stays in sync and the next messages still arrive.  When the
        connection ends or times out in the middle of a reply, that message
        is yielded with ``ok=False`` and then the iterator raises the
        Pop3Error that broke the session.  An exception from ``open_sink`` is
        raised after the message's reply has been read and discarded.
        Closing the iterator early leaves the remaining replies to be read
        and discarded before the next command.
        """
        if window < 1:
            raise ValueError(f"window={window} is invalid: it must be at least 1")
        for msgnum in msgnums:
            if msgnum < 1:
                raise ValueError(f"message number {msgnum} is invalid: numbers start at 1")
        self._check_idle()
        return self._retrieve(list(msgnums), open_sink, expected_sizes or {}, window)

    async def _retrieve(
        self,
        msgnums: list[int],
        open_sink: Callable[[int], Sink],
        expected_sizes: Mapping[int, int],
        window: int,
    ) -> AsyncIterator[RetrResult]:
        if not self.pipelining:
            window = 1
        self._retrieving = True
        outstanding: collections.deque[tuple[int, _Pending]] = collections.deque()
        next_index = 0
        try:
            while next_index < len(msgnums) or outstanding:
                if next_index < len(msgnums) and len(outstanding) <= window // 2:
                    batch = msgnums[next_index : next_index + window - len(outstanding)]
                    pendings = self._send([f"RETR {n}" for n in batch], multiline=True)
                    outstanding.extend(zip(batch, pendings, strict=True))
                    next_index += len(batch)
                    await self._flush("command", self._timeouts.command)
                msgnum, pending = outstanding.popleft()
                result, fatal = await self._read_retr(
                    msgnum, pending, open_sink, expected_sizes.get(msgnum)
                )
                yield result
                if fatal is not None:
                    raise fatal
        finally:
            for _, pending in outstanding:
                pending.abandoned = True
            self._retrieving = False

    async def _read_retr(
        self,
        msgnum: int,
        pending: _Pending,
        open_sink: Callable[[int], Sink],
        expected_size: int | None,
    ) -> tuple[RetrResult, Pop3Error | None]:
        try:
            status = await self._read_status(pending, "command", self._timeouts.command)
        except Pop3Error as exc:
            return RetrResult(msgnum, False, 0, str(exc), RetrFailure.BROKEN), exc
        if not status.ok:
            rejected = f"server rejected RETR {msgnum}: {status.line}"
            _LOG.warning("%s %s: %s", self.session_id, self.peer, rejected)
            return RetrResult(msgnum, False, 0, rejected, RetrFailure.SERVER_ERROR), None
        try:
            sink = open_sink(msgnum)
        except BaseException:
            await self._read_body(_DiscardingSink().write)
            raise
        budget = self._timeouts.message + (expected_size or 0) / MESSAGE_MIN_RATE
        deadline = _Deadline(
            time.monotonic() + budget,
            budget,
            f"RETR {msgnum} did not end within limits.timeouts.message = "
            f"{self._timeouts.message:g} s plus {MESSAGE_MIN_RATE} octets/s of its size",
        )
        try:
            outcome = await self._read_body(sink.write, deadline)
        except Pop3Error as exc:
            failed = RetrResult(msgnum, False, 0, f"message {msgnum}: {exc}", RetrFailure.BROKEN)
            return failed, exc
        error, failure = outcome.defect, outcome.failure
        if (
            error is None
            and expected_size is not None
            and outcome.size not in (expected_size, expected_size + UNCOUNTED_FINAL_CRLF)
        ):
            error = (
                f"size mismatch: LIST gave {expected_size} octets, RETR delivered"
                f" {outcome.size}"
            )
            failure = RetrFailure.SIZE_MISMATCH
        if error is not None:
            error = f"message {msgnum}: {error}"
            _LOG.warning("%s %s: %s", self.session_id, self.peer, error)
            return RetrResult(msgnum, False, outcome.size, error, failure), None
        return RetrResult(msgnum, True, outcome.size), None

    async def top(self, msgnum: int, lines: int) -> bytes:
        """Return the unstuffed reply to ``TOP msgnum lines``; raise Pop3ServerError on -ERR."""
        if msgnum < 1 or lines < 0:
            raise ValueError(f"TOP {msgnum} {lines} is invalid")
        self._check_idle()
        pending = self._send_one(f"TOP {msgnum} {lines}", multiline=True)
        status = await self._read_status(pending, "command", self._timeouts.command)
        if not status.ok:
            raise self._server_error(Pop3ServerError, pending.log_text, status)
        content = io.BytesIO()
        outcome = await self._read_body(content.write)
        if outcome.defect is not None:
            raise Pop3ProtocolError(f"TOP {msgnum}: {outcome.defect}")
        return content.getvalue()

    async def delete_many(
        self, msgnums: Sequence[int], *, window: int = DEFAULT_RETR_WINDOW
    ) -> dict[int, bool]:
        """Send DELE for each message; return message number -> accepted.

        With PIPELINING the commands go in flights of at most ``window``,
        each read back before the next is sent, so neither side's buffers
        fill up however many messages there are.  Without it, one at a
        time.  A ``-ERR`` is logged and gives False.  Messages are removed
        only when the server answers QUIT with ``+OK`` (RFC 1939 section 6).
        """
        if window < 1:
            raise ValueError(f"window={window} is invalid: it must be at least 1")
        self._check_idle()
        results: dict[int, bool] = {}
        if self.pipelining:
            for start in range(0, len(msgnums), window):
                batch = msgnums[start : start + window]
                pendings = self._send([f"DELE {n}" for n in batch], multiline=False)
                await self._flush("command", self._timeouts.command)
                for msgnum, pending in zip(batch, pendings, strict=True):
                    results[msgnum] = await self._dele_result(msgnum, pending)
        else:
            for msgnum in msgnums:
                pending = self._send_one(f"DELE {msgnum}", multiline=False)
                results[msgnum] = await self._dele_result(msgnum, pending)
        return results

    async def _dele_result(self, msgnum: int, pending: _Pending) -> bool:
        status = await self._read_status(pending, "command", self._timeouts.command)
        if not status.ok:
            _LOG.warning(
                "%s %s: server rejected DELE %d: %s", self.session_id, self.peer, msgnum,
                status.line,
            )
        return status.ok

    async def delete_and_quit(
        self, msgnums: Sequence[int], *, window: int = DEFAULT_RETR_WINDOW
    ) -> tuple[dict[int, bool], bool]:
        """Send DELE for each message and then QUIT; return (accepted by number, QUIT ok).

        With PIPELINING, QUIT goes in the flight of the last DELEs, so a
        drain of up to ``window`` messages ends in one flight; the DELE
        flights before it are of ``window`` commands each.  The DELE replies
        are read as in :meth:`delete_many` and QUIT's as in :meth:`quit`.
        A Pop3Error while reading the DELE replies is raised; the server may
        then have deleted the messages already.
        """
        if window < 1:
            raise ValueError(f"window={window} is invalid: it must be at least 1")
        self._check_idle()
        if not self.pipelining or not msgnums:
            return await self.delete_many(msgnums, window=window), await self.quit()
        results: dict[int, bool] = {}
        quit_pending: _Pending | None = None
        for start in range(0, len(msgnums), window):
            batch = msgnums[start : start + window]
            lines = [f"DELE {n}" for n in batch]
            last = start + window >= len(msgnums)
            pendings = self._send([*lines, "QUIT"] if last else lines, multiline=False)
            if last:
                quit_pending = pendings.pop()
            await self._flush("command", self._timeouts.command)
            for msgnum, pending in zip(batch, pendings, strict=True):
                results[msgnum] = await self._dele_result(msgnum, pending)
        assert quit_pending is not None
        return results, await self._quit_reply(quit_pending)

    async def quit(self) -> bool:
        """Send QUIT and close; return True only when the server replied ``+OK``.

        Never raises a Pop3Error: a failure to send or read gives False,
        which means the server may not have deleted the marked messages.
        """
        try:
            self._check_idle()
            pending = self._send_one("QUIT", multiline=False)
        except Pop3Error as exc:
            _LOG.warning("%s %s: QUIT failed: %s", self.session_id, self.peer, exc)
            await self.close()
            return False
        return await self._quit_reply(pending)

    async def _quit_reply(self, pending: _Pending) -> bool:
        try:
            status = await self._read_status(pending, "command", self._timeouts.command)
        except Pop3Error as exc:
            _LOG.warning("%s %s: QUIT failed: %s", self.session_id, self.peer, exc)
            await self.close()
            return False
        if not status.ok:
            _LOG.warning("%s %s: server rejected QUIT: %s", self.session_id, self.peer, status.line)
        await self.close()
        return status.ok

    async def close(self) -> None:
        """Close the connection without QUIT (the server then deletes nothing)."""
        if self._closed:
            return
        self._closed = True
        self._conn.close()
