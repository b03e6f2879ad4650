"""mailfeed's asyncio POP3 client with RFC 2449 PIPELINING.

The fetcher drains a site's mailbox through this client.  It is hand-written
because Python's ``poplib`` does not fit the job: it blocks the event loop,
cannot pipeline commands, raises one exception class for every failure,
rejects lines over 2048 octets, and takes any status beginning with ``+``
(such as ``+ERR``) for success.

Implemented:

* RFC 1939: USER/PASS, APOP, STAT, LIST, UIDL, RETR, TOP, DELE, QUIT,
  multi-line replies with byte-stuffing (section 3).
* RFC 2449: CAPA, PIPELINING (section 6.6), response codes (section 8).
* RFC 2595 section 4: STLS; RFC 8314: implicit TLS.
* RFC 5034: AUTH with SASL PLAIN and SCRAM-SHA-256 (RFC 5802, RFC 7677).
* RFC 3206: the SYS/TEMP, SYS/PERM and AUTH response codes.

Invariants:

* A status line is success only when it is exactly ``+OK`` or ``+OK`` followed
  by a space and text.  ``-ERR`` is a server error; anything else is a
  protocol error, after which the session is closed.
* Replies are read in the order the commands were sent (a queue of pending
  replies).  A reply whose reader gave up is read and discarded before the
  next one, so the session never loses sync.
* No credential leaves the client before TLS is up when TLS is required, and
  no plaintext credential goes to a host that is not loopback unless the
  caller sets ``allow_plaintext``.  After STLS, every octet received before
  the handshake is dropped, so an injected reply is never read.
* Memory stays flat while retrieving: each message is streamed into the
  caller's sink; at most one line (bounded by ``max_line_length``) and a
  read buffer are held.
* Secrets never reach the trace callback or the log: :func:`mask_secrets` is
  the one place that hides them.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from mailfeed.errors import TempFailure

__all__ = [
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_RETR_WINDOW",
    "Pop3AuthError",
    "Pop3Client",
    "Pop3Error",
    "Pop3ProtocolError",
    "Pop3ServerError",
    "Pop3Timeout",
    "Pop3TlsError",
    "RetrResult",
    "Timeouts",
    "TlsMode",
    "TraceCallback",
    "UidlListing",
    "client_ssl_context",
    "connect",
    "mask_secrets",
]

# Longest line accepted in any reply, counting its CRLF.  RFC 5322 allows 998
# octets plus CRLF, but real mail carries much longer lines; one such line is
# the most the client holds in memory.
DEFAULT_MAX_LINE_LENGTH = 4 * 1024 * 1024

# Most RETR commands outstanding at once when the server offers PIPELINING.
DEFAULT_RETR_WINDOW = 64

TraceCallback = Callable[[str, str], None]
"""Called with ``("C", line)`` for each command sent and ``("S", line)`` for
each status line received; secrets are already masked."""


class Pop3Error(TempFailure):
    """Base of the client's errors.

    The mail stays on the server whatever went wrong, so every POP3 error is
    a temporary failure for the program that ends with it.
    """


class Pop3ProtocolError(Pop3Error):
    """The server broke the protocol; the session is closed.

    Raised for a status line that is neither ``+OK``/``+OK text`` nor
    ``-ERR...``, a reply cut off before its terminator, a line longer than
    ``max_line_length`` where no per-message failure is possible, and a
    connection closed in the middle of a reply.
    """


class Pop3ServerError(Pop3Error):
    """The server answered ``-ERR``.

    ``command`` is the command (secrets masked), ``text`` the reply text after
    ``-ERR``, and ``code`` the RFC 2449 section 8 / RFC 3206 response code
    without brackets (``IN-USE``, ``LOGIN-DELAY``, ``SYS/TEMP``,
    ``SYS/PERM``, ``AUTH``) or None.
    """

    def __init__(self, command: str, text: str, code: str | None) -> None:
        self.command = command
        self.text = text
        self.code = code
        super().__init__(f"POP3 server rejected {command}: -ERR {text}".rstrip())


class Pop3AuthError(Pop3ServerError):
    """Authentication failed or no acceptable mechanism is available."""


class Pop3TlsError(Pop3Error):
    """TLS was required but could not be established.

    Raised before any credential is sent: STLS missing from CAPA or refused,
    a failed handshake or certificate check, or plaintext refused for a host
    that is not loopback.
    """


class Pop3Timeout(Pop3Error):
    """The server did not answer within the timeout of one phase.

    ``phase`` is one of ``connect``, ``greeting``, ``login``, ``command`` or
    ``data``; ``seconds`` is the timeout that expired.  The session is closed.
    """

    def __init__(self, phase: str, seconds: float, detail: str = "") -> None:
        self.phase = phase
        self.seconds = seconds
        message = f"POP3 {phase} timed out after {seconds:g} s"
        super().__init__(f"{message}: {detail}" if detail else message)


class TlsMode(enum.Enum):
    """How the connection is protected."""

    IMPLICIT = "implicit"  # TLS from the first octet (RFC 8314, port 995)
    STARTTLS = "starttls"  # plain TCP, then STLS (RFC 2595), required
    NONE = "none"  # plaintext: loopback only unless allow_plaintext is set


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for each phase of a session.

    ``connect`` covers TCP connect and TLS handshakes; ``greeting`` the
    greeting and the CAPA that follows; ``login`` each step of authentication;
    ``command`` the status line of any other command; ``data`` the silence
    allowed between two chunks of a multi-line reply (so a large message may
    take longer as long as octets keep arriving).
    """

    connect: float = 30.0
    greeting: float = 30.0
    login: float = 60.0
    command: float = 60.0
    data: float = 120.0


@dataclass(frozen=True)
class UidlListing:
    """The parsed reply to UIDL.

    ``entries`` maps message numbers to valid, unique unique-ids.
    ``defects`` lists each rejected line as ``(raw line, reason)``; a reason
    names the message number where one could be read.
    """

    entries: dict[int, str] = field(default_factory=dict)
    defects: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RetrResult:
    """The outcome of one RETR.

    ``size`` counts the unstuffed octets written to the sink, line ends as
    sent.  When ``ok`` is False the sink holds an incomplete or doubtful
    message that the caller must discard; ``error`` says why.
    """

    msgnum: int
    ok: bool
    size: int
    error: str | None = None


def mask_secrets(line: str, *, sasl_response: bool = False) -> str:
    """Return a command line fit for logs and traces.

    Hides the argument of PASS, the digest of APOP, the initial response of
    AUTH, and a whole SASL response line (``sasl_response=True``).
    """
    raise NotImplementedError


def client_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """Build a context that verifies the server certificate and host name.

    Trusts the system store, or only ``cafile`` (PEM) when given.
    """
    raise NotImplementedError


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
    against the certificate (default ``host``).  Raises
    :class:`Pop3TlsError` before anything is sent when plaintext is not
    allowed, and on any STLS failure; :class:`Pop3Timeout`;
    :class:`Pop3ProtocolError` for a bad greeting; OSError when the TCP
    connect fails.
    """
    raise NotImplementedError


class Pop3Client:
    """One POP3 session.  Create it with :func:`connect`.

    Methods must not run concurrently, and no other command may be issued
    while a :meth:`retrieve` iteration is open.
    """

    capabilities: dict[str, list[str]]
    """CAPA reply: upper-case capability name -> its arguments (RFC 2449)."""

    @property
    def pipelining(self) -> bool:
        """True when the server offered PIPELINING."""
        raise NotImplementedError

    @property
    def tls_active(self) -> bool:
        """True when the session runs over TLS."""
        raise NotImplementedError

    async def login(self, user: str, password: str) -> str:
        """Authenticate with the best mechanism the server offers.

        Order: SASL SCRAM-SHA-256, SASL PLAIN (only over TLS or to loopback),
        APOP (only with a valid greeting timestamp), USER/PASS.  Returns the
        text of the final ``+OK``.  Raises :class:`Pop3AuthError` on
        ``-ERR``, a failed SCRAM server check, or no usable mechanism.
        """
        raise NotImplementedError

    async def stat(self) -> tuple[int, int]:
        """Return (message count, maildrop size in octets)."""
        raise NotImplementedError

    async def list_all(self) -> dict[int, int]:
        """Return LIST as message number -> size; malformed lines are logged and skipped."""
        raise NotImplementedError

    async def uidl_all(self) -> UidlListing:
        """Return the parsed UIDL listing; malformed lines become defects."""
        raise NotImplementedError

    async def uidl_and_list(self) -> tuple[UidlListing, dict[int, int]]:
        """Run UIDL and LIST, in one flight when the server offers PIPELINING."""
        raise NotImplementedError

    def retrieve(
        self,
        msgnums: Sequence[int],
        *,
        open_sink: Callable[[int], BinaryIO],
        expected_sizes: Mapping[int, int] | None = None,
        window: int = DEFAULT_RETR_WINDOW,
    ) -> AsyncIterator[RetrResult]:
        """Retrieve messages, yielding one :class:`RetrResult` each, in order."""
        raise NotImplementedError

    async def top(self, msgnum: int, lines: int) -> bytes:
        """Return the unstuffed reply to ``TOP msgnum lines``."""
        raise NotImplementedError

    async def delete_many(self, msgnums: Sequence[int]) -> dict[int, bool]:
        """Send DELE for each message (one flight when pipelining)."""
        raise NotImplementedError

    async def quit(self) -> bool:
        """Send QUIT and close; True only when the server answered ``+OK``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the connection without QUIT (the server then deletes nothing)."""
        raise NotImplementedError
