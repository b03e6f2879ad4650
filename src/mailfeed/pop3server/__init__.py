"""mailfeed's POP3 server over the site spools (asyncio).

Hand-written because no maintained Python library serves POP3 (the standard
library has only the ``poplib`` client).  The ``mailfeed mx`` daemon starts
it; each user in the passwd-file maps to one site, whose spool is the
maildrop (see :mod:`mailfeed.maildrop`).

Implemented:

* RFC 1939: USER, PASS, APOP, STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP
  and UIDL.  The AUTHORIZATION, TRANSACTION and UPDATE states (section 3)
  come with a table of the commands each state allows, and the autologout
  timer (section 3) is enforced.
* RFC 2449: CAPA with TOP, USER, UIDL, PIPELINING, RESP-CODES, SASL, EXPIRE
  NEVER and IMPLEMENTATION; the 255-octet command limit (section 4); the
  IN-USE response code.  RFC 3206: AUTH-RESP-CODE, [AUTH] and [SYS/...].
* RFC 2595: STLS, and implicit TLS on a separate listener.
* RFC 5034: AUTH PLAIN (RFC 4616) and SCRAM-SHA-256 (RFC 7677), with an
  initial response.  SCRAM's server-final-message goes out as a ``+``
  challenge that the client answers with an empty line, then ``+OK``.

Invariants:

* Messages are removed only in the UPDATE state, entered by QUIT from
  TRANSACTION.  A session that drops, times out, is killed or ends in error
  removes nothing.
* The maildrop is locked from login to the end of the session; a second
  login gets ``-ERR [IN-USE]``.
* Pipelined commands are answered in order.  Replies to the commands of one
  read are written with one write; output waits for the transport to drain
  above a bounded buffer, so a client that stops reading holds at most about
  ``output_flush_octets`` plus the transport's high-water mark.
* After STLS, bytes already received from the client are discarded before the
  TLS handshake, so nothing sent in plaintext is taken as a command.
* Without TLS, on a listener that is not loopback, no plaintext credentials
  (USER/PASS, APOP, AUTH PLAIN) are accepted unless ``allow_plaintext``.
* RETR and TOP stream the message from disk in chunks, dot-stuffing every
  line; the octets sent before stuffing equal the size LIST reports.
* Logs carry the session id, the peer and the user; passwords are never
  logged.

Modules:

* :mod:`.replies`: reply texts and response codes.
* :mod:`.states`: command names, the states and the commands each allows.
* :mod:`.settings`: ``Pop3Settings`` (limits and policy) and ``Pop3Stats``.
* :mod:`.connection`: the asyncio protocol: input lines, batched output,
  backpressure and the STLS switch.
* :mod:`.stuffing`: dot-stuffing and the TOP cut of streamed messages.
* :mod:`.throttle`: the delay after failed logins.
* :mod:`.auth`: the AUTHORIZATION commands and the plaintext policy.
* :mod:`.session`: ``Pop3Session``: command dispatch, TRANSACTION and UPDATE.
* :mod:`.server`: ``Pop3Server``: listeners, connection limits, reload, close.
"""

from __future__ import annotations

from mailfeed.pop3server.auth import ip_is_loopback, plaintext_allowed

# Every reply constant (OK_*, ERR_*, CODE_*) stays reachable from the package,
# where the reply-text tests read them.
from mailfeed.pop3server.replies import *  # noqa: F403
from mailfeed.pop3server.server import Pop3Server, SiteResolver
from mailfeed.pop3server.settings import Pop3Settings, Pop3Stats
from mailfeed.pop3server.states import ALLOWED_COMMANDS, State
from mailfeed.pop3server.states import KNOWN_COMMANDS as KNOWN_COMMANDS
from mailfeed.pop3server.stuffing import DotStuffer, TopFilter
from mailfeed.pop3server.throttle import _LoginThrottle as _LoginThrottle

__all__ = [
    "ALLOWED_COMMANDS",
    "DotStuffer",
    "Pop3Server",
    "Pop3Settings",
    "Pop3Stats",
    "SiteResolver",
    "State",
    "TopFilter",
    "ip_is_loopback",
    "plaintext_allowed",
]
