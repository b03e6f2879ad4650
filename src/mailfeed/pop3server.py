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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailfeed.config import SiteConfig
from mailfeed.maildrop import DropMessage, Maildrop, MaildropError, MaildropInUse, open_maildrop
from mailfeed.passwd import PasswdFile
from mailfeed.scram import MECHANISM as SCRAM_MECHANISM
from mailfeed.scram import ScramError, ScramServer

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

log = logging.getLogger(__name__)

CRLF = b"\r\n"
# RFC 1939 section 3: a multi-line response ends with a line holding a single dot.
TERMINATOR = b".\r\n"

# -- Replies.  RFC 1939 section 3: every response starts with "+OK" or "-ERR".
OK = "+OK"
ERR = "-ERR"
# Response codes: RFC 2449 section 8 (IN-USE) and RFC 3206 sections 4 and 5.
CODE_IN_USE = "[IN-USE]"
CODE_AUTH = "[AUTH]"
CODE_SYS_TEMP = "[SYS/TEMP]"
CODE_SYS_PERM = "[SYS/PERM]"

# RFC 1939 section 4 (greeting with the APOP timestamp of section 7).
OK_GREETING = "+OK {hostname} POP3 server ready {timestamp}"
# RFC 2449 section 5.
OK_CAPA = "+OK capability list follows"
# RFC 1939 section 7: USER must not reveal whether the mailbox exists.
OK_USER = "+OK send PASS"
# RFC 1939 section 7 (PASS, APOP) and RFC 5034 section 4 (AUTH).
OK_LOGGED_IN = "+OK maildrop locked and ready, {count} messages ({octets} octets)"
# RFC 1939 section 5: STAT is "+OK nn mm".
OK_STAT = "+OK {count} {octets}"
OK_LIST = "+OK {count} messages ({octets} octets)"
OK_LIST_ONE = "+OK {msgnum} {size}"
OK_UIDL = "+OK unique-id listing follows"
OK_UIDL_ONE = "+OK {msgnum} {uidl}"
OK_RETR = "+OK {size} octets"
OK_TOP = "+OK top of message follows"
OK_DELE = "+OK message {msgnum} deleted"
OK_NOOP = "+OK"
OK_RSET = "+OK maildrop has {count} messages ({octets} octets)"
# RFC 1939 section 6: QUIT in AUTHORIZATION, and after a successful UPDATE.
OK_QUIT = "+OK {hostname} POP3 server signing off"
OK_QUIT_UPDATE = "+OK {hostname} POP3 server signing off ({count} messages left)"
# RFC 2595 section 4.
OK_STLS = "+OK begin TLS negotiation"
# Mechanism list for AUTH without an argument (RFC 1734 practice; RFC 5034 requires a name).
OK_AUTH_MECHANISMS = "+OK SASL mechanisms follow"
# RFC 5034 section 4: a server challenge is "+" SP base64.
SASL_CONTINUE = "+ {challenge}"
SASL_CANCEL = "*"

ERR_UNKNOWN_COMMAND = "-ERR unknown command"
ERR_WRONG_STATE = "-ERR command not valid in this state"
ERR_SYNTAX = "-ERR invalid arguments: {detail}"
# RFC 2449 section 4: command lines are at most 255 octets including CRLF.
ERR_LINE_TOO_LONG = "-ERR command line over {limit} octets"
ERR_NO_SUCH_MESSAGE = "-ERR no such message"
ERR_ALREADY_DELETED = "-ERR message {msgnum} already deleted"
ERR_NO_USER = "-ERR send USER first"
# RFC 3206 section 5: [AUTH] for a credentials problem; the same text for an
# unknown user and a wrong password.
ERR_AUTH_FAILED = "-ERR [AUTH] invalid user name or password"
ERR_PLAINTEXT_DISALLOWED = "-ERR [AUTH] plaintext authentication needs TLS here; use STLS"
ERR_AUTH_MECHANISM = "-ERR unsupported SASL mechanism {mechanism}"
# RFC 5034 section 4: "*" from the client cancels, and the server replies -ERR.
ERR_AUTH_CANCELLED = "-ERR authentication cancelled"
ERR_AUTH_MALFORMED = "-ERR malformed SASL response"
# RFC 2449 section 8.1.2.
ERR_IN_USE = "-ERR [IN-USE] maildrop is locked by another session"
ERR_MAILDROP_UNAVAILABLE = "-ERR [SYS/TEMP] maildrop unavailable, try again later"
ERR_NO_MAILDROP = "-ERR [SYS/PERM] no maildrop is configured for this user"
ERR_MESSAGE_UNREADABLE = "-ERR [SYS/TEMP] message {msgnum} cannot be read now"
# RFC 1939 section 6: QUIT reports a failed UPDATE with -ERR.
ERR_UPDATE_FAILED = "-ERR [SYS/TEMP] deleted messages were not removed, try again later"
# RFC 2595 section 4.
ERR_STLS_UNAVAILABLE = "-ERR STLS is not available on this listener"
ERR_TLS_ACTIVE = "-ERR command not permitted when TLS active"
ERR_TOO_MANY_BAD_COMMANDS = "-ERR too many invalid commands, closing the connection"
ERR_TOO_MANY_CONNECTIONS = "-ERR [SYS/TEMP] too many connections, try again later"

IMPLEMENTATION = "mailfeed"
# RFC 1939 section 3: the autologout timer is at least 10 minutes.
RFC_MIN_IDLE_TIMEOUT = 600.0
MSGNUM_MAX_DIGITS = 10

# Command names as RFC 1939, RFC 2449, RFC 2595 and RFC 5034 spell them.
USER, PASS, APOP, AUTH, STLS, CAPA = "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA"
STAT, LIST, RETR, DELE, NOOP, RSET = "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET"
QUIT, TOP, UIDL = "QUIT", "TOP", "UIDL"
SASL_PLAIN = "PLAIN"


class State(enum.Enum):
    """RFC 1939 section 3 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


# Commands allowed in each state. Any other known command gets ERR_WRONG_STATE.
ALLOWED_COMMANDS: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({USER, PASS, APOP, AUTH, STLS, CAPA, QUIT}),
    State.TRANSACTION: frozenset(
        {STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL, CAPA}
    ),
    State.UPDATE: frozenset(),
}
KNOWN_COMMANDS = frozenset().union(*ALLOWED_COMMANDS.values())

# Maps a user name to its site, or None when the user has no maildrop.
SiteResolver = Callable[[str], SiteConfig | None]


@dataclass(frozen=True)
class Pop3Settings:
    """Limits and policy of the POP3 server; every limit here is enforced and tested."""

    hostname: str = field(default_factory=socket.gethostname)
    # Accept USER/PASS, APOP and AUTH PLAIN without TLS on any listener.
    allow_plaintext: bool = False
    max_connections: int = 100
    max_connections_per_address: int = 10
    # Seconds from connect to a successful login.
    login_timeout: float = 60.0
    # Seconds without a command after login (RFC 1939 autologout), and the
    # longest wait for a client to take output.
    idle_timeout: float = 600.0
    # Set False only in tests: allows idle_timeout under RFC 1939's 600 s.
    enforce_rfc_idle_minimum: bool = True
    # RFC 2449 section 4: 255 octets including CRLF.
    max_command_octets: int = 255
    # SASL lines (RFC 5034 section 4 lifts the command limit for them).
    max_sasl_octets: int = 8192
    max_bad_commands: int = 10
    # Delay before a failed login's reply: base * 2 ** (failures - 1), capped.
    auth_failure_delay: float = 1.0
    auth_failure_max_delay: float = 15.0
    # Seconds after which an address's failed logins are forgotten.
    auth_failure_window: float = 900.0
    tls_handshake_timeout: float = 30.0
    # Octets of pending output that trigger a write and a wait for drain.
    output_flush_octets: int = 64 * 1024
    # Octets of unprocessed client input before reading pauses.
    max_input_buffer: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.enforce_rfc_idle_minimum and self.idle_timeout < RFC_MIN_IDLE_TIMEOUT:
            raise ValueError(
                f"idle_timeout = {self.idle_timeout:g} s is under RFC 1939's minimum of "
                f"{RFC_MIN_IDLE_TIMEOUT:g} s; raise it"
            )
        if self.max_command_octets < 255:
            raise ValueError(
                f"max_command_octets = {self.max_command_octets} is under RFC 2449's 255"
            )
        for name in ("max_connections", "max_connections_per_address", "max_bad_commands"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")


@dataclass
class Pop3Stats:
    """Counters of one server since it started."""

    connections: int = 0
    rejected_connections: int = 0
    logins: int = 0
    failed_logins: int = 0
    # transport.write calls, to observe reply batching.
    writes: int = 0
    messages_sent: int = 0
    messages_removed: int = 0


def ip_is_loopback(host: str) -> bool:
    """Return whether ``host`` (an IP address string) is a loopback address."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def plaintext_allowed(*, tls_active: bool, local_is_loopback: bool, allow_plaintext: bool) -> bool:
    """Return whether plaintext credentials may be sent on this connection."""
    return tls_active or local_is_loopback or allow_plaintext


class DotStuffer:
    """RFC 1939 section 3 byte-stuffing of wire chunks whose lines end in CRLF.

    A chunk must not end between CR and LF (``WireConverter`` output never does).
    """

    def __init__(self) -> None:
        self._line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if self._line_start and out.startswith(b"."):
            out = b"." + out
        self._line_start = out.endswith(CRLF)
        return out


class TopFilter:
    """Cut wire chunks after the header, the empty line and ``lines`` body lines (TOP)."""

    def __init__(self, lines: int) -> None:
        self._body_left = lines
        self._in_header = True
        self._line_start = True

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """Return the part of ``chunk`` to send and whether the output is complete."""
        pos = 0
        while pos < len(chunk):
            if not self._in_header and self._body_left == 0:
                return chunk[:pos], True
            if self._in_header and self._line_start and chunk.startswith(CRLF, pos):
                self._in_header = False
                pos += 2
                continue
            end = chunk.find(CRLF, pos)
            if end < 0:
                self._line_start = False
                return chunk, False
            pos = end + 2
            self._line_start = True
            if not self._in_header:
                self._body_left -= 1
        done = not self._in_header and self._body_left == 0
        return chunk, done


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class _LoginThrottle:
    """Failed logins per client address, and the delay the next failure costs."""

    MAX_TRACKED = 10_000

    def __init__(self, settings: Pop3Settings) -> None:
        self._settings = settings
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, address: str) -> float:
        """Record a failure; return the seconds to wait before replying."""
        now = time.monotonic()
        count, last = self._failures.get(address, (0, now))
        if now - last > self._settings.auth_failure_window:
            count = 0
        count += 1
        if len(self._failures) >= self.MAX_TRACKED:
            self._prune(now)
        self._failures[address] = (count, now)
        delay = self._settings.auth_failure_delay * 2 ** min(count - 1, 30)
        return float(min(delay, self._settings.auth_failure_max_delay))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _prune(self, now: float) -> None:
        window = self._settings.auth_failure_window
        for address, (_count, last) in list(self._failures.items()):
            if now - last > window:
                del self._failures[address]
        if len(self._failures) >= self.MAX_TRACKED:
            self._failures.clear()


class _Overlong:
    """Marker for a line longer than the limit (already discarded)."""


OVERLONG = _Overlong()


class _ConnectionClosed(Exception):
    """The client went away or stopped taking output in time."""


class _Connection(asyncio.Protocol):
    """Buffered, flow-controlled byte stream of one client, STLS-capable."""

    def __init__(self, server: Pop3Server, listener: _Listener) -> None:
        self.server = server
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.tls_active = listener.implicit_tls
        self._settings = server.settings
        self._in = bytearray()
        self._pos = 0
        self._discarding = False
        self._out = bytearray()
        self._data = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False
        self.eof = False
        self.peer = "?"
        self.peer_ip = ""
        self.local_ip = ""

    # -- asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.peer_ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        if isinstance(local, tuple):
            self.local_ip = str(local[0])
        self.server._accept(self)

    def data_received(self, data: bytes) -> None:
        if self._pos:
            del self._in[: self._pos]
            self._pos = 0
        self._in += data
        self._data.set()
        if len(self._in) > self._settings.max_input_buffer and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self._data.set()
        # Keep a plaintext transport open so that replies to commands sent
        # before the client's FIN still go out; SSL transports cannot do that.
        return not self.tls_active

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._data.set()
        self._writable.set()
        self.server._release(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- input

    def _take_line(self, limit: int) -> bytes | _Overlong | None:
        line = self._split_line(limit)
        if self._reading_paused and len(self._in) - self._pos < self._settings.max_input_buffer:
            assert self.transport is not None
            self.transport.resume_reading()
            self._reading_paused = False
        return line

    def _split_line(self, limit: int) -> bytes | _Overlong | None:
        end = self._in.find(b"\n", self._pos)
        if end < 0:
            if len(self._in) - self._pos > limit:
                # Drop the overlong line's start now so that memory stays bounded.
                self._discarding = True
                del self._in[:]
                self._pos = 0
            return None
        line = bytes(self._in[self._pos : end + 1])
        self._pos = end + 1
        if self._pos >= len(self._in):
            del self._in[:]
            self._pos = 0
        if self._discarding:
            self._discarding = False
            return OVERLONG
        if len(line) > limit:
            return OVERLONG
        return line

    def has_line(self) -> bool:
        return self._in.find(b"\n", self._pos) >= 0

    async def readline(self, limit: int, timeout: float) -> bytes | _Overlong | None:
        """Return the next line (with its line end), OVERLONG, or None at EOF.

        Pending output is written before waiting, so the replies to one read
        of pipelined commands leave in one write.  Raise TimeoutError.
        """
        async with asyncio.timeout(timeout):
            while True:
                line = self._take_line(limit)
                if line is not None:
                    return line
                if self.eof:
                    return None
                await self.flush()
                self._data.clear()
                await self._data.wait()

    def discard_input(self) -> int:
        """Drop every byte received but not yet read; return how many."""
        dropped = len(self._in) - self._pos
        del self._in[:]
        self._pos = 0
        self._discarding = False
        return dropped

    # -- output

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def write(self, data: bytes) -> None:
        self._out += data

    def reply(self, line: str) -> None:
        self._out += line.encode("utf-8") + CRLF

    async def send(self, data: bytes) -> None:
        """Queue ``data``; write and wait for drain once enough is pending."""
        self._out += data
        if len(self._out) >= self._settings.output_flush_octets:
            await self.flush()

    async def flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self._out.clear()
            raise _ConnectionClosed("connection closed")
        if self._out:
            self.transport.write(bytes(self._out))
            self._out.clear()
            self.server.stats.writes += 1
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(self._settings.idle_timeout):
                    await self._writable.wait()
            except TimeoutError:
                raise _ConnectionClosed("client stopped reading") from None
        if self.transport.is_closing():
            raise _ConnectionClosed("connection closed")

    async def start_tls(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=True,
            ssl_handshake_timeout=self._settings.tls_handshake_timeout,
        )
        if transport is None:
            raise _ConnectionClosed("TLS handshake did not complete")
        self.transport = transport
        self.tls_active = True
        self._reading_paused = False

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._out:
                self.transport.write(bytes(self._out))
                self._out.clear()
                self.server.stats.writes += 1
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass
class _Listener:
    implicit_tls: bool
    # Context for STLS on a plaintext listener.
    stls_context: ssl.SSLContext | None


class Pop3Session:
    """One client's RFC 1939 session: the state machine over a _Connection."""

    def __init__(self, server: Pop3Server, conn: _Connection, session_id: str) -> None:
        self.server = server
        self.conn = conn
        self.id = session_id
        self.settings = server.settings
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self._pending_user: str | None = None
        self.drop: Maildrop | None = None
        self.deleted: set[int] = set()
        self.bad_commands = 0
        self._update_owns_lock = False
        self.timestamp = (
            f"<{secrets.token_hex(16)}.{os.getpid()}@{self.settings.hostname}>"
        )
        self._handlers: dict[str, Callable[[str], Awaitable[None]]] = {
            USER: self.cmd_user, PASS: self.cmd_pass, APOP: self.cmd_apop,
            AUTH: self.cmd_auth, STLS: self.cmd_stls, CAPA: self.cmd_capa,
            STAT: self.cmd_stat, LIST: self.cmd_list, RETR: self.cmd_retr,
            DELE: self.cmd_dele, NOOP: self.cmd_noop, RSET: self.cmd_rset,
            QUIT: self.cmd_quit, TOP: self.cmd_top, UIDL: self.cmd_uidl,
        }  # fmt: skip
        self._closing = False

    # -- main loop

    async def run(self) -> None:
        log.info("session %s: connect from %s%s", self.id, self.conn.peer,
                 " (TLS)" if self.conn.tls_active else "")
        try:
            self.conn.reply(
                OK_GREETING.format(hostname=self.settings.hostname, timestamp=self.timestamp)
            )
            while not self._closing:
                await self._step()
        except TimeoutError:
            log.info("session %s: %s timed out in state %s", self.id, self.conn.peer,
                     self.state.value)
        except _ConnectionClosed as exc:
            log.info("session %s: %s: %s", self.id, self.conn.peer, exc)
        except (ConnectionError, ssl.SSLError) as exc:
            log.info("session %s: %s: connection failed: %s", self.id, self.conn.peer, exc)
        except asyncio.CancelledError:
            log.info("session %s: %s: ended by server shutdown", self.id, self.conn.peer)
            self.conn.abort()
            raise
        except Exception:
            log.exception("session %s: %s: internal error", self.id, self.conn.peer)
        finally:
            self._release_drop()
            self.conn.close()
            log.info("session %s: %s: closed (user %s)", self.id, self.conn.peer, self.user)

    def _release_drop(self) -> None:
        if self.drop is not None and not self._update_owns_lock and self.drop.locked:
            if self.deleted:
                log.info("session %s: %d deletions discarded: session ended without QUIT",
                         self.id, len(self.deleted))
            self.drop.unlock()

    async def _step(self) -> None:
        timeout = (
            self.settings.login_timeout
            if self.state is State.AUTHORIZATION
            else self.settings.idle_timeout
        )
        line = await self.conn.readline(self.settings.max_sasl_octets, timeout)
        if line is None:
            self._closing = True
            return
        if isinstance(line, _Overlong):
            await self._bad(ERR_LINE_TOO_LONG.format(limit=self.settings.max_command_octets))
            return
        text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword != AUTH and len(line) > self.settings.max_command_octets:
            await self._bad(ERR_LINE_TOO_LONG.format(limit=self.settings.max_command_octets))
            return
        if keyword not in KNOWN_COMMANDS:
            log.debug("session %s: unknown command %r", self.id, keyword[:8])
            await self._bad(ERR_UNKNOWN_COMMAND)
            return
        if keyword not in ALLOWED_COMMANDS[self.state]:
            await self._bad(ERR_WRONG_STATE)
            return
        await self._handlers[keyword](args)
        if self.conn.pending_output >= self.settings.output_flush_octets:
            await self.conn.flush()

    async def _bad(self, reply: str) -> None:
        self.bad_commands += 1
        if self.bad_commands >= self.settings.max_bad_commands:
            log.info("session %s: %s: %d invalid commands, disconnecting", self.id,
                     self.conn.peer, self.bad_commands)
            self.conn.reply(ERR_TOO_MANY_BAD_COMMANDS)
            self._closing = True
            return
        self.conn.reply(reply)

    # -- AUTHORIZATION state

    def _plaintext_ok(self) -> bool:
        return plaintext_allowed(
            tls_active=self.conn.tls_active,
            local_is_loopback=self.server.is_loopback(self.conn.local_ip),
            allow_plaintext=self.settings.allow_plaintext,
        )

    async def cmd_capa(self, args: str) -> None:
        plain = self._plaintext_ok()
        lines = [OK_CAPA, "TOP"]
        if plain:
            lines.append("USER")
        mechanisms = ([SASL_PLAIN] if plain else []) + [SCRAM_MECHANISM]
        lines += [
            "SASL " + " ".join(mechanisms),
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            "EXPIRE NEVER",
            "UIDL",
            f"IMPLEMENTATION {IMPLEMENTATION}",
        ]
        if self.state is State.AUTHORIZATION and self._stls_available():
            lines.append("STLS")
        for line in lines:
            self.conn.reply(line)
        self.conn.write(TERMINATOR)

    def _stls_available(self) -> bool:
        return self.conn.listener.stls_context is not None and not self.conn.tls_active

    async def cmd_stls(self, args: str) -> None:
        if self.conn.tls_active:
            self.conn.reply(ERR_TLS_ACTIVE)
            return
        context = self.conn.listener.stls_context
        if context is None:
            self.conn.reply(ERR_STLS_UNAVAILABLE)
            return
        self.conn.reply(OK_STLS)
        await self.conn.flush()
        # RFC 2595 section 4 and the STARTTLS injection attacks: nothing the
        # client sent in plaintext after STLS may be read as a command.
        dropped = self.conn.discard_input()
        if dropped:
            log.warning("session %s: %s: discarded %d octets sent after STLS in plaintext",
                        self.id, self.conn.peer, dropped)
        await self.conn.start_tls(context)
        self._pending_user = None
        log.info("session %s: %s: TLS started", self.id, self.conn.peer)

    async def cmd_user(self, args: str) -> None:
        if not self._plaintext_ok():
            self.conn.reply(ERR_PLAINTEXT_DISALLOWED)
            return
        if not args:
            await self._bad(ERR_SYNTAX.format(detail="USER needs a name"))
            return
        self._pending_user = args
        self.conn.reply(OK_USER)

    async def cmd_pass(self, args: str) -> None:
        user = self._pending_user
        self._pending_user = None
        if not self._plaintext_ok():
            self.conn.reply(ERR_PLAINTEXT_DISALLOWED)
            return
        if user is None:
            await self._bad(ERR_NO_USER)
            return
        passwd = self.server.passwd
        ok = await asyncio.to_thread(passwd.verify, user, args)
        await self._finish_auth(user, ok, "USER/PASS")

    async def cmd_apop(self, args: str) -> None:
        if not self._plaintext_ok():
            self.conn.reply(ERR_PLAINTEXT_DISALLOWED)
            return
        user, _, digest = args.rpartition(" ")
        if not user or len(digest) != 32:
            await self._bad(ERR_SYNTAX.format(detail="APOP needs a name and an MD5 digest"))
            return
        secret = self.server.passwd.plain_secret(user)
        # Unknown users and users without a plain secret cost the same MD5.
        key = secret if secret is not None else secrets.token_hex(16)
        expected = hashlib.md5(
            (self.timestamp + key).encode("utf-8", "surrogateescape")
        ).hexdigest()
        ok = hmac.compare_digest(expected, digest.lower()) and secret is not None
        await self._finish_auth(user, ok, "APOP")

    async def cmd_auth(self, args: str) -> None:
        if not args:
            self.conn.reply(OK_AUTH_MECHANISMS)
            if self._plaintext_ok():
                self.conn.reply(SASL_PLAIN)
            self.conn.reply(SCRAM_MECHANISM)
            self.conn.write(TERMINATOR)
            return
        mechanism, _, initial_text = args.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == SASL_PLAIN:
            if not self._plaintext_ok():
                self.conn.reply(ERR_PLAINTEXT_DISALLOWED)
                return
            await self._auth_plain(initial_text)
        elif mechanism == SCRAM_MECHANISM:
            await self._auth_scram(initial_text)
        else:
            await self._bad(ERR_AUTH_MECHANISM.format(mechanism=mechanism[:40]))

    async def _first_sasl_response(self, initial_text: str) -> bytes | None:
        """Return the initial response decoded, asking for it if the AUTH line had none.

        Return None after a reply has been queued (cancel, malformed, EOF).
        """
        if initial_text == "":
            self.conn.reply(SASL_CONTINUE.format(challenge=""))
            text = await self._read_sasl_line()
            if text is None:
                return None
        else:
            text = initial_text
        return self._decode_sasl(text)

    async def _read_sasl_line(self) -> str | None:
        line = await self.conn.readline(self.settings.max_sasl_octets,
                                        self.settings.login_timeout)
        if line is None:
            self._closing = True
            return None
        if isinstance(line, _Overlong):
            self.conn.reply(ERR_AUTH_MALFORMED)
            return None
        return line.rstrip(b"\r\n").decode("ascii", "replace")

    def _decode_sasl(self, text: str) -> bytes | None:
        if text == SASL_CANCEL:
            self.conn.reply(ERR_AUTH_CANCELLED)
            return None
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.conn.reply(ERR_AUTH_MALFORMED)
            return None

    async def _auth_plain(self, initial_text: str) -> None:
        response = await self._first_sasl_response(initial_text)
        if response is None:
            return
        parts = response.split(b"\0")
        if len(parts) != 3:
            self.conn.reply(ERR_AUTH_MALFORMED)
            return
        authzid, authcid, password = (p.decode("utf-8", "surrogateescape") for p in parts)
        if authzid and authzid != authcid:
            await self._finish_auth(authcid, False, "AUTH PLAIN")
            return
        passwd = self.server.passwd
        ok = await asyncio.to_thread(passwd.verify, authcid, password)
        await self._finish_auth(authcid, ok, "AUTH PLAIN")

    async def _auth_scram(self, initial_text: str) -> None:
        response = await self._first_sasl_response(initial_text)
        if response is None:
            return
        scram = ScramServer(self.server.passwd.scram_credentials)
        try:
            server_first = await asyncio.to_thread(scram.first, response.decode("utf-8"))
        except (ScramError, UnicodeError):
            self.conn.reply(ERR_AUTH_MALFORMED)
            return
        self.conn.reply(SASL_CONTINUE.format(challenge=_b64(server_first)))
        text = await self._read_sasl_line()
        if text is None:
            return
        client_final = self._decode_sasl(text)
        if client_final is None:
            return
        user = scram.username or ""
        try:
            server_final = scram.final(client_final.decode("utf-8"))
        except (ScramError, UnicodeError):
            await self._finish_auth(user, False, "AUTH SCRAM-SHA-256")
            return
        # RFC 5034 has no success-with-data, so the server-final-message goes
        # out as a last challenge and the client sends an empty line.
        self.conn.reply(SASL_CONTINUE.format(challenge=_b64(server_final)))
        last = await self._read_sasl_line()
        if last is None:
            return
        if last not in ("", "="):
            self.conn.reply(ERR_AUTH_CANCELLED if last == SASL_CANCEL else ERR_AUTH_MALFORMED)
            return
        await self._finish_auth(user, True, "AUTH SCRAM-SHA-256")

    async def _finish_auth(self, user: str, ok: bool, method: str) -> None:
        """Reply to a login attempt: delay failures, lock the maildrop on success."""
        if not ok:
            self.server.stats.failed_logins += 1
            delay = self.server.throttle.failed(self.conn.peer_ip)
            log.info("session %s: %s: %s login failed for user %r; replying in %.1f s",
                     self.id, self.conn.peer, method, user[:64], delay)
            if delay > 0:
                await self.conn.flush()
                await asyncio.sleep(delay)
            self.conn.reply(ERR_AUTH_FAILED)
            return
        self.server.throttle.succeeded(self.conn.peer_ip)
        site = self.server.site_for_user(user)
        if site is None:
            log.warning("session %s: %s: user %r has no site configured", self.id,
                        self.conn.peer, user)
            self.conn.reply(ERR_NO_MAILDROP)
            return
        try:
            drop = self.server.open_drop(site)
            await asyncio.to_thread(drop.lock)
        except MaildropInUse as exc:
            log.info("session %s: %s: user %r: %s", self.id, self.conn.peer, user, exc)
            self.conn.reply(ERR_IN_USE)
            return
        except MaildropError as exc:
            log.error("session %s: %s: user %r: %s", self.id, self.conn.peer, user, exc)
            self.conn.reply(ERR_MAILDROP_UNAVAILABLE)
            return
        self.drop = drop
        self.user = user
        self.state = State.TRANSACTION
        self.server.stats.logins += 1
        count, octets = self._totals()
        log.info("session %s: %s: user %r logged in by %s, site %s, %d messages",
                 self.id, self.conn.peer, user, method, site.name, count)
        self.conn.reply(OK_LOGGED_IN.format(count=count, octets=octets))

    # -- TRANSACTION state

    def _totals(self) -> tuple[int, int]:
        assert self.drop is not None
        live = [m for m in self.drop.messages if m.msgnum not in self.deleted]
        return len(live), sum(m.size for m in live)

    async def _message_arg(self, text: str) -> DropMessage | None:
        """Parse a message number; reply and return None when it is invalid or deleted."""
        assert self.drop is not None
        if not text.isdigit() or len(text) > MSGNUM_MAX_DIGITS:
            await self._bad(ERR_SYNTAX.format(detail="expected a message number"))
            return None
        msgnum = int(text)
        if not 1 <= msgnum <= len(self.drop.messages) or msgnum in self.deleted:
            self.conn.reply(ERR_NO_SUCH_MESSAGE)
            return None
        return self.drop.message(msgnum)

    async def cmd_stat(self, args: str) -> None:
        count, octets = self._totals()
        self.conn.reply(OK_STAT.format(count=count, octets=octets))

    async def _listing(self, args: str, one: str, header: str, value: str) -> None:
        assert self.drop is not None
        if args:
            message = await self._message_arg(args.strip())
            if message is not None:
                self.conn.reply(one.format(msgnum=message.msgnum, size=message.size,
                                           uidl=message.uidl))
            return
        count, octets = self._totals()
        self.conn.reply(header.format(count=count, octets=octets))
        for message in self.drop.messages:
            if message.msgnum not in self.deleted:
                line = f"{message.msgnum} {getattr(message, value)}\r\n"
                await self.conn.send(line.encode("ascii"))
        self.conn.write(TERMINATOR)

    async def cmd_list(self, args: str) -> None:
        await self._listing(args, OK_LIST_ONE, OK_LIST, "size")

    async def cmd_uidl(self, args: str) -> None:
        await self._listing(args, OK_UIDL_ONE, OK_UIDL, "uidl")

    async def cmd_retr(self, args: str) -> None:
        message = await self._message_arg(args.strip())
        if message is not None:
            await self._send_message(message, None)

    async def cmd_top(self, args: str) -> None:
        parts = args.split()
        if len(parts) != 2 or not parts[1].isdigit() or len(parts[1]) > MSGNUM_MAX_DIGITS:
            await self._bad(ERR_SYNTAX.format(detail="TOP needs a message number and a line count"))
            return
        message = await self._message_arg(parts[0])
        if message is not None:
            await self._send_message(message, int(parts[1]))

    async def _send_message(self, message: DropMessage, top_lines: int | None) -> None:
        assert self.drop is not None
        drop = self.drop
        try:
            reader = await asyncio.to_thread(drop.open, message.msgnum)
        except (MaildropError, OSError) as exc:
            log.error("session %s: message %s: cannot open: %s", self.id, message.uidl, exc)
            self.conn.reply(ERR_MESSAGE_UNREADABLE.format(msgnum=message.msgnum))
            return
        sent = 0
        try:
            if top_lines is None:
                self.conn.reply(OK_RETR.format(size=message.size))
            else:
                self.conn.reply(OK_TOP)
            stuffer = DotStuffer()
            top = TopFilter(top_lines) if top_lines is not None else None
            while True:
                try:
                    chunk = await asyncio.to_thread(reader.read_chunk)
                except OSError as exc:
                    # The status line has gone out: the only safe end is to drop the link.
                    log.error("session %s: message %s: read failed after %d octets: %s",
                              self.id, message.uidl, sent, exc)
                    raise _ConnectionClosed("message read failed") from None
                if not chunk:
                    break
                done = False
                if top is not None:
                    chunk, done = top.feed(chunk)
                sent += len(chunk)
                await self.conn.send(stuffer.feed(chunk))
                if done:
                    break
            self.conn.write(TERMINATOR)
        finally:
            await asyncio.to_thread(reader.close)
        if top_lines is None:
            self.server.stats.messages_sent += 1
            if sent != message.size:
                log.error("session %s: message %s: sent %d octets but listed %d; "
                          "the file changed during the session", self.id, message.uidl,
                          sent, message.size)
            log.info("session %s: RETR %s (%d octets)", self.id, message.uidl, sent)

    async def cmd_dele(self, args: str) -> None:
        assert self.drop is not None
        text = args.strip()
        if text.isdigit() and len(text) <= MSGNUM_MAX_DIGITS and int(text) in self.deleted:
            self.conn.reply(ERR_ALREADY_DELETED.format(msgnum=int(text)))
            return
        message = await self._message_arg(text)
        if message is None:
            return
        self.deleted.add(message.msgnum)
        log.info("session %s: DELE %s", self.id, message.uidl)
        self.conn.reply(OK_DELE.format(msgnum=message.msgnum))

    async def cmd_noop(self, args: str) -> None:
        self.conn.reply(OK_NOOP)

    async def cmd_rset(self, args: str) -> None:
        if self.deleted:
            log.info("session %s: RSET undeletes %d messages", self.id, len(self.deleted))
        self.deleted.clear()
        count, octets = self._totals()
        self.conn.reply(OK_RSET.format(count=count, octets=octets))

    async def cmd_quit(self, args: str) -> None:
        self._closing = True
        if self.state is State.AUTHORIZATION:
            self.conn.reply(OK_QUIT.format(hostname=self.settings.hostname))
            return
        assert self.drop is not None
        self.state = State.UPDATE
        drop, doomed = self.drop, sorted(self.deleted)
        uidls = [drop.message(n).uidl for n in doomed]

        def update() -> None:
            try:
                drop.expunge(doomed)
            finally:
                drop.unlock()

        # The thread runs to its end even if this task is cancelled: an
        # interrupted expunge would leave the spool half-updated.
        self._update_owns_lock = True
        try:
            await asyncio.shield(asyncio.to_thread(update))
        except (MaildropError, OSError) as exc:
            log.error("session %s: user %r: UPDATE failed: %s", self.id, self.user, exc)
            self.conn.reply(ERR_UPDATE_FAILED)
            return
        self.server.stats.messages_removed += len(doomed)
        for uidl in uidls:
            log.info("session %s: removed %s", self.id, uidl)
        self.deleted.clear()
        left = len(drop.messages) - len(doomed)
        self.conn.reply(OK_QUIT_UPDATE.format(hostname=self.settings.hostname, count=left))


class Pop3Server:
    """The POP3 service: listeners, sessions, limits, credentials and sites.

    ``site_for_user`` maps a user name to the site whose spool is the
    user's maildrop.  ``is_loopback`` decides, from the local address of a
    connection, whether it arrived on a loopback listener (where plaintext
    logins are allowed); tests replace it.
    """

    def __init__(
        self,
        settings: Pop3Settings,
        passwd: PasswdFile,
        site_for_user: SiteResolver,
        *,
        is_loopback: Callable[[str], bool] = ip_is_loopback,
        open_drop: Callable[[SiteConfig], Maildrop] = open_maildrop,
    ) -> None:
        self.settings = settings
        self.passwd = passwd
        self.site_for_user = site_for_user
        self.is_loopback = is_loopback
        self.open_drop = open_drop
        self.stats = Pop3Stats()
        self.throttle = _LoginThrottle(settings)
        self._servers: list[asyncio.Server] = []
        self._sessions: dict[_Connection, asyncio.Task[None]] = {}
        self._per_address: dict[str, int] = {}
        self._next_id = 0

    async def start(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
    ) -> asyncio.Server:
        """Listen on ``host``:``port`` (0 picks a free port; read it from the result).

        With ``implicit_tls`` the listener speaks TLS from the first byte
        (port 995 style); otherwise ``ssl_context``, if given, enables STLS.
        """
        if implicit_tls and ssl_context is None:
            raise ValueError("implicit_tls needs an ssl_context")
        listener = _Listener(implicit_tls, None if implicit_tls else ssl_context)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self, listener),
            host,
            port,
            ssl=ssl_context if implicit_tls else None,
            ssl_handshake_timeout=self.settings.tls_handshake_timeout if implicit_tls else None,
        )
        self._servers.append(server)
        for sock in server.sockets:
            log.info("POP3 listening on %s%s", sock.getsockname()[:2],
                     " (implicit TLS)" if implicit_tls else "")
        return server

    def reload(self, passwd: PasswdFile, site_for_user: SiteResolver) -> None:
        """Use new credentials and sites for logins from now on; sessions keep their maildrop."""
        self.passwd = passwd
        self.site_for_user = site_for_user
        log.info("POP3 credentials and sites reloaded (%d users)", len(passwd))

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def _accept(self, conn: _Connection) -> None:
        self.stats.connections += 1
        address = conn.peer_ip
        if (
            len(self._sessions) >= self.settings.max_connections
            or self._per_address.get(address, 0) >= self.settings.max_connections_per_address
        ):
            self.stats.rejected_connections += 1
            log.warning("POP3 connection from %s rejected: connection limit reached", conn.peer)
            conn.reply(ERR_TOO_MANY_CONNECTIONS)
            conn.close()
            return
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._next_id += 1
        session = Pop3Session(self, conn, f"{self._next_id:x}-{secrets.token_hex(3)}")
        self._sessions[conn] = asyncio.get_running_loop().create_task(session.run())

    def _release(self, conn: _Connection) -> None:
        if self._sessions.pop(conn, None) is None:
            return
        count = self._per_address.get(conn.peer_ip, 1) - 1
        if count > 0:
            self._per_address[conn.peer_ip] = count
        else:
            self._per_address.pop(conn.peer_ip, None)

    async def close(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """Stop listening, then end the sessions.

        ``graceful``: wait up to ``timeout`` seconds for sessions to end by
        themselves; otherwise (and after the wait) cancel them.  A cancelled
        session removes nothing, except that an UPDATE already under way
        finishes.
        """
        for server in self._servers:
            server.close()
        tasks = list(self._sessions.values())
        if graceful and tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            tasks = list(pending)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        log.info("POP3 server closed")
