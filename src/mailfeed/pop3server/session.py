"""One client's POP3 session: command dispatch, TRANSACTION and UPDATE.

RFC 1939 sections 3, 5 and 6 (STAT, LIST, RETR, DELE, NOOP, RSET, QUIT),
section 7 (TOP, UIDL); RFC 2449 section 4 (command length).  The
AUTHORIZATION commands come from :class:`AuthorizationCommands`; the
maildrop is reached only through :class:`mailfeed.maildrop.Maildrop`.

Invariants:

* Messages are removed only in the UPDATE state, entered by QUIT from
  TRANSACTION.  A session that drops, times out, is killed or ends in error
  removes nothing.
* RETR and TOP stream the message from disk in chunks, dot-stuffing every
  line; the octets sent before stuffing equal the size LIST reports.
* Logs carry the session id, the peer and the user.  Per-command lines
  (RETR, DELE) are DEBUG; INFO has one line per session with the messages
  and octets sent, and the unique-id of every removed message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from mailfeed.maildrop import DropMessage, Maildrop, MaildropError
from mailfeed.pop3server.auth import AuthorizationCommands
from mailfeed.pop3server.connection import _Connection, _ConnectionClosed, _Overlong
from mailfeed.pop3server.replies import (
    ERR_ALREADY_DELETED,
    ERR_LINE_TOO_LONG,
    ERR_MESSAGE_UNREADABLE,
    ERR_NO_SUCH_MESSAGE,
    ERR_SYNTAX,
    ERR_TOO_MANY_BAD_COMMANDS,
    ERR_UNKNOWN_COMMAND,
    ERR_UPDATE_FAILED,
    ERR_WRONG_STATE,
    OK_DELE,
    OK_GREETING,
    OK_LIST,
    OK_LIST_ONE,
    OK_NOOP,
    OK_QUIT,
    OK_QUIT_UPDATE,
    OK_RETR,
    OK_RSET,
    OK_STAT,
    OK_TOP,
    OK_UIDL,
    OK_UIDL_ONE,
    TERMINATOR,
)
from mailfeed.pop3server.states import (
    ALLOWED_COMMANDS,
    APOP,
    AUTH,
    CAPA,
    DELE,
    KNOWN_COMMANDS,
    LIST,
    NOOP,
    PASS,
    QUIT,
    RETR,
    RSET,
    STAT,
    STLS,
    TOP,
    UIDL,
    USER,
    State,
)
from mailfeed.pop3server.stuffing import DotStuffer, TopFilter

if TYPE_CHECKING:
    from mailfeed.pop3server.server import Pop3Server

log = logging.getLogger(__name__)

MSGNUM_MAX_DIGITS = 10
# Removed messages are logged at INFO by unique-id, this many to a line.  One
# line per message took about a tenth of the server's CPU in a pipelined drain.
REMOVED_UIDLS_PER_LOG_LINE = 50


class Pop3Session(AuthorizationCommands):
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
        self._retrieved = 0
        self._retrieved_octets = 0

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
            log.info("session %s: %s: closed (user %s): sent %d messages (%d octets)",
                     self.id, self.conn.peer, self.user, self._retrieved, self._retrieved_octets)

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
        # The first inline_read_octets of a message are read on the event loop,
        # because a thread hop costs more than such a read.  The rest of a
        # larger message is read in a thread.
        inline_left = self.settings.inline_read_octets
        reader = drop.open_quick(message.msgnum) if inline_left else None
        if reader is None:
            try:
                reader = await asyncio.to_thread(drop.open, message.msgnum)
            except (MaildropError, OSError) as exc:
                log.error("session %s: message %s: cannot open: %s", self.id, message.uidl,
                          exc)
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
            while not reader.done:
                try:
                    if inline_left > 0:
                        before = reader.octets_read
                        chunk = reader.read_chunk(inline_left)
                        inline_left -= reader.octets_read - before
                    else:
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
            reader.close()
        if top_lines is None:
            self.server.stats.messages_sent += 1
            if sent != message.size:
                log.error("session %s: message %s: sent %d octets but listed %d; "
                          "the file changed during the session", self.id, message.uidl,
                          sent, message.size)
            self._retrieved += 1
            self._retrieved_octets += sent
            log.debug("session %s: RETR %s (%d octets)", self.id, message.uidl, sent)

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
        log.debug("session %s: DELE %s", self.id, message.uidl)
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
        for first in range(0, len(uidls), REMOVED_UIDLS_PER_LOG_LINE):
            batch = uidls[first : first + REMOVED_UIDLS_PER_LOG_LINE]
            log.info("session %s: removed %d messages: %s", self.id, len(batch), " ".join(batch))
        self.deleted.clear()
        left = len(drop.messages) - len(doomed)
        self.conn.reply(OK_QUIT_UPDATE.format(hostname=self.settings.hostname, count=left))
