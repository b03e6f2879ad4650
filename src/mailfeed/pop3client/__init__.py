"""mailfeed's asyncio POP3 client with RFC 2449 PIPELINING.

The fetcher drains a site's mailbox through this client.  It is hand-written
because Python's ``poplib`` does not fit the job.  It blocks the event loop,
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

Modules: :mod:`~mailfeed.pop3client.errors`, :mod:`~mailfeed.pop3client.transport`
(stream protocol, line reader, status lines), :mod:`~mailfeed.pop3client.listing`
(UIDL and LIST), :mod:`~mailfeed.pop3client.body` (RETR results),
:mod:`~mailfeed.pop3client.auth` (SASL constants, APOP timestamp, secret
masking) and :mod:`~mailfeed.pop3client.client` (:func:`connect`,
:class:`Pop3Client`).  Every public name is importable from
``mailfeed.pop3client`` itself.

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

# The private names below are used by the tests.
from mailfeed.pop3client.auth import _apop_timestamp as _apop_timestamp
from mailfeed.pop3client.auth import mask_secrets
from mailfeed.pop3client.body import MESSAGE_MIN_RATE, RetrFailure, RetrResult, Sink
from mailfeed.pop3client.body import _BodyOutcome as _BodyOutcome
from mailfeed.pop3client.client import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_RETR_WINDOW,
    Pop3Client,
    Timeouts,
    TlsMode,
    TraceCallback,
    client_ssl_context,
    connect,
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
from mailfeed.pop3client.transport import _Connection as _Connection
from mailfeed.pop3client.transport import _parse_status as _parse_status
from mailfeed.pop3client.transport import _StreamProtocol as _StreamProtocol

__all__ = [
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_RETR_WINDOW",
    "MESSAGE_MIN_RATE",
    "Pop3AuthError",
    "Pop3Client",
    "Pop3Error",
    "Pop3ProtocolError",
    "Pop3ServerError",
    "Pop3Timeout",
    "Pop3TlsError",
    "RetrFailure",
    "RetrResult",
    "Sink",
    "Timeouts",
    "TlsMode",
    "TraceCallback",
    "UidlListing",
    "client_ssl_context",
    "connect",
    "mask_secrets",
    "parse_list_listing",
    "parse_uidl_listing",
]
