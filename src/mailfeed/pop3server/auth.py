"""The AUTHORIZATION state: CAPA, STLS, USER/PASS, APOP and AUTH (SASL).

RFC 1939 section 7 (USER, PASS, APOP), RFC 2595 section 4 (STLS), RFC 5034
(AUTH) with PLAIN (RFC 4616) and SCRAM-SHA-256 (RFC 7677).

Invariants:

* Without TLS, on a listener that is not loopback, no plaintext credentials
  (USER/PASS, APOP, AUTH PLAIN) are accepted unless ``allow_plaintext``.
* After STLS, bytes already received from the client are discarded before the
  TLS handshake, so nothing sent in plaintext is taken as a command.
* An unknown user and a wrong password get the same reply after the same
  delay; passwords are never logged.
* A successful login locks the maildrop until the session ends; a second
  login gets ``-ERR [IN-USE]``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from mailfeed.maildrop import Maildrop, MaildropError, MaildropInUse
from mailfeed.pop3server.connection import _Connection, _Overlong
from mailfeed.pop3server.replies import (
    ERR_AUTH_CANCELLED,
    ERR_AUTH_FAILED,
    ERR_AUTH_MALFORMED,
    ERR_AUTH_MECHANISM,
    ERR_IN_USE,
    ERR_MAILDROP_UNAVAILABLE,
    ERR_NO_MAILDROP,
    ERR_NO_USER,
    ERR_PLAINTEXT_DISALLOWED,
    ERR_STLS_UNAVAILABLE,
    ERR_SYNTAX,
    ERR_TLS_ACTIVE,
    IMPLEMENTATION,
    OK_AUTH_MECHANISMS,
    OK_CAPA,
    OK_LOGGED_IN,
    OK_STLS,
    OK_USER,
    SASL_CANCEL,
    SASL_CONTINUE,
    TERMINATOR,
)
from mailfeed.pop3server.states import State
from mailfeed.scram import MECHANISM as SCRAM_MECHANISM
from mailfeed.scram import ScramError, ScramServer

if TYPE_CHECKING:
    from mailfeed.pop3server.server import Pop3Server
    from mailfeed.pop3server.settings import Pop3Settings

log = logging.getLogger(__name__)

SASL_PLAIN = "PLAIN"


def ip_is_loopback(host: str) -> bool:
    """Return whether ``host`` (an IP address string) is a loopback address."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def plaintext_allowed(*, tls_active: bool, local_is_loopback: bool, allow_plaintext: bool) -> bool:
    """Return whether plaintext credentials may be sent on this connection."""
    return tls_active or local_is_loopback or allow_plaintext


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class AuthorizationCommands(ABC):
    """The AUTHORIZATION-state command handlers of :class:`Pop3Session`."""

    server: Pop3Server
    conn: _Connection
    id: str
    settings: Pop3Settings
    state: State
    user: str | None
    drop: Maildrop | None
    timestamp: str
    _pending_user: str | None
    _closing: bool

    @abstractmethod
    async def _bad(self, reply: str) -> None:
        """Reply to an invalid command, and close after too many."""

    @abstractmethod
    def _totals(self) -> tuple[int, int]:
        """Return the count and octets of the messages not marked deleted."""

    # -- AUTHORIZATION state

    def _plaintext_ok(self) -> bool:
        return plaintext_allowed(
            tls_active=self.conn.tls_active,
            local_is_loopback=self.server.is_loopback(self.conn.local_ip),
            allow_plaintext=self.settings.allow_plaintext,
        )

    def _sasl_mechanisms(self) -> list[str]:
        """Return the SASL mechanisms to offer in CAPA and AUTH.

        SCRAM-SHA-256 is offered only when every user's stored secret allows
        it, because a client that picks it cannot fall back after a failure.
        """
        mechanisms = [SASL_PLAIN] if self._plaintext_ok() else []
        if self.server.passwd.scram_for_all:
            mechanisms.append(SCRAM_MECHANISM)
        return mechanisms

    async def cmd_capa(self, args: str) -> None:
        plain = self._plaintext_ok()
        lines = [OK_CAPA, "TOP"]
        if plain:
            lines.append("USER")
        mechanisms = self._sasl_mechanisms()
        lines += [
            *(["SASL " + " ".join(mechanisms)] if mechanisms else []),
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
            for name in self._sasl_mechanisms():
                self.conn.reply(name)
            self.conn.write(TERMINATOR)
            return
        mechanism, _, initial_text = args.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self._sasl_mechanisms() and mechanism != SASL_PLAIN:
            await self._bad(ERR_AUTH_MECHANISM.format(mechanism=mechanism[:40]))
        elif mechanism == SASL_PLAIN:
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
