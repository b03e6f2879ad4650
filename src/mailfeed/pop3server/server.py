"""The POP3 service: listeners, per-server and per-address connection limits, reload, close."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Callable

from mailfeed.config import SiteConfig
from mailfeed.maildrop import Maildrop, open_maildrop
from mailfeed.passwd import PasswdFile
from mailfeed.pop3server.auth import ip_is_loopback
from mailfeed.pop3server.connection import _Connection, _Listener
from mailfeed.pop3server.replies import ERR_TOO_MANY_CONNECTIONS
from mailfeed.pop3server.session import Pop3Session
from mailfeed.pop3server.settings import Pop3Settings, Pop3Stats
from mailfeed.pop3server.throttle import _LoginThrottle

log = logging.getLogger(__name__)

# Maps a user name to its site, or None when the user has no maildrop.
SiteResolver = Callable[[str], SiteConfig | None]


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
