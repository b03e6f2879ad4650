"""Test doubles for the fetcher: a recording local MTA and a stateful POP3 mailbox.

Both run an asyncio server in a thread on 127.0.0.1 port 0, so tests in the
main thread (or a ``mailfeed fetch`` subprocess) talk to them over real
sockets.

* :class:`RecordingMta` is an aiosmtpd SMTP server that stores every
  accepted transaction and replies with scripted codes: per recipient at
  RCPT, per message content at DATA, and 452 after a recipient limit.
* :class:`MailboxServer` is a small POP3 maildrop (RFC 1939) with UIDL,
  LIST, RETR, DELE, RSET and QUIT; deletions happen only on QUIT, as a real
  server does, so a killed or reset client leaves the mailbox unchanged.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

CRLF = b"\r\n"


class _LoopThread:
    """An asyncio loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Delivery:
    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]


class _LongLineSmtp(SMTP):  # type: ignore[misc]
    # Real MTAs (Postfix) accept lines far over RFC 5321's 1000 octets.
    line_length_limit = 8 * 1024 * 1024


class _MtaHandler:
    def __init__(self, mta: RecordingMta) -> None:
        self.mta = mta

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        limit = self.mta.recipient_limit
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Error: too many recipients"
        code = self.mta.rcpt_codes.get(address)
        if code is not None:
            return code
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = bytes(envelope.original_content or b"")
        if self.mta.data_code is not None:
            code = self.mta.data_code(data)
            if code is not None:
                return code
        with self.mta.lock:
            sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
            self.mta.deliveries.append(Delivery(
                sender, list(envelope.rcpt_tos), data,
                list(envelope.mail_options)))
        return "250 2.0.0 Ok: queued"


class RecordingMta:
    """A local MTA on 127.0.0.1 that records what it accepts."""

    def __init__(self, *, rcpt_codes: dict[str, str] | None = None,
                 data_code: Callable[[bytes], str | None] | None = None,
                 recipient_limit: int | None = None, smtputf8: bool = True) -> None:
        self.rcpt_codes = dict(rcpt_codes or {})
        self.data_code = data_code
        self.recipient_limit = recipient_limit
        self.deliveries: list[Delivery] = []
        self.lock = threading.Lock()
        self._thread = _LoopThread()
        handler = _MtaHandler(self)

        async def start() -> asyncio.base_events.Server:
            return await self._thread.loop.create_server(
                lambda: _LongLineSmtp(handler, decode_data=False, enable_SMTPUTF8=smtputf8,
                             hostname="mta.test"),
                "127.0.0.1", 0)

        self._server = self._thread.call(start())
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.url = f"smtp://127.0.0.1:{self.port}"

    def copies(self, recipient: str) -> int:
        with self.lock:
            return sum(d.recipients.count(recipient) for d in self.deliveries)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()

        self._thread.call(stop())
        self._thread.stop()


@dataclass
class _Message:
    uidl: str
    data: bytes
    deleted: bool = False


@dataclass
class MailboxServer:
    """A POP3 maildrop on 127.0.0.1 holding ``(uidl, bytes)`` messages."""

    messages: list[tuple[str, bytes]]
    user: str = "site1"
    password: str = "pw-site1-example"
    pipelining: bool = True
    commands: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.box = [_Message(uidl, data) for uidl, data in self.messages]
        self.sessions = 0
        self._thread = _LoopThread()

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(self._serve, "127.0.0.1", 0)

        self._server = self._thread.call(start())
        self.port = int(self._server.sockets[0].getsockname()[1])

    def uidls(self) -> list[str]:
        with self.lock:
            return [m.uidl for m in self.box]

    def add(self, uidl: str, data: bytes) -> None:
        with self.lock:
            self.box.append(_Message(uidl, data))

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()

        self._thread.call(stop())
        self._thread.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        with self.lock:
            view = [m for m in self.box]
        marked: set[int] = set()
        authed = False
        user_ok = False
        writer.write(b"+OK test maildrop ready\r\n")
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("latin-1").rstrip("\r\n")
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                with self.lock:
                    self.commands.append("PASS ***" if verb == "PASS" else line)
                if verb == "CAPA":
                    caps = ["USER", "UIDL", "TOP"] + (["PIPELINING"] if self.pipelining else [])
                    writer.write(b"+OK\r\n" + b"".join(c.encode() + CRLF for c in caps) + b".\r\n")
                elif verb == "USER":
                    user_ok = arg == self.user
                    writer.write(b"+OK\r\n")
                elif verb == "PASS":
                    authed = user_ok and arg == self.password
                    writer.write(b"+OK logged in\r\n" if authed else b"-ERR [AUTH] invalid\r\n")
                elif verb == "QUIT":
                    if authed:
                        with self.lock:
                            gone = {id(view[i]) for i in marked}
                            self.box = [m for m in self.box if id(m) not in gone]
                    writer.write(b"+OK bye\r\n")
                    await writer.drain()
                    return
                elif not authed:
                    writer.write(b"-ERR not logged in\r\n")
                else:
                    writer.write(self._transaction(verb, arg, view, marked))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def _transaction(self, verb: str, arg: str, view: Sequence[_Message],
                     marked: set[int]) -> bytes:
        live = [(i + 1, m) for i, m in enumerate(view) if i not in marked]
        if verb in ("UIDL", "LIST") and not arg:
            body = b"".join(
                f"{n} {m.uidl if verb == 'UIDL' else len(m.data)}\r\n".encode() for n, m in live)
            return b"+OK\r\n" + body + b".\r\n"
        if verb == "STAT":
            return f"+OK {len(live)} {sum(len(m.data) for _, m in live)}\r\n".encode()
        if verb == "NOOP":
            return b"+OK\r\n"
        if verb == "RSET":
            marked.clear()
            return b"+OK\r\n"
        try:
            index = int(arg) - 1
        except ValueError:
            return b"-ERR bad argument\r\n"
        if not 0 <= index < len(view) or index in marked:
            return b"-ERR no such message\r\n"
        message = view[index]
        if verb == "RETR":
            return b"+OK\r\n" + stuff(message.data) + b".\r\n"
        if verb == "DELE":
            marked.add(index)
            return b"+OK marked\r\n"
        if verb == "UIDL":
            return f"+OK {index + 1} {message.uidl}\r\n".encode()
        if verb == "LIST":
            return f"+OK {index + 1} {len(message.data)}\r\n".encode()
        return b"-ERR unknown command\r\n"


def stuff(data: bytes) -> bytes:
    """Return ``data`` byte-stuffed for a POP3 multi-line reply (RFC 1939 section 3)."""
    lines = data.split(CRLF)
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines)


def block_message(sender: str, recipients: Sequence[str], body: bytes) -> bytes:
    """Return a message with its envelope block, CRLF line ends."""
    lines = [f"X-Mailfeed-Sender: {sender or '<>'}",
             f"X-Mailfeed-Recipient-Number: {len(recipients)}"]
    lines += [f"X-Mailfeed-Recipient-Address: {rcpt}" for rcpt in recipients]
    return "".join(line + "\r\n" for line in lines).encode() + body


def write_config(path: Path, *, pop3_port: int, mta_url: str, state: Path,
                 quarantine: Path, extra_top: str = "", limits: str = "",
                 source_extra: str = "", sources: Sequence[tuple[str, int]] = (),
                 local_domains: Sequence[str] = ("example.org",), timeouts: str = "") -> Path:
    """Write a fetch configuration for one or more loopback sources."""
    listed = list(sources) or [("mx1", pop3_port)]
    text = (
        f'state = "{state}"\nquarantine = "{quarantine}"\n'
        f"local_domains = {list(local_domains)!r}\n"
        f'delivery = "{mta_url}"\n'
        f'dsn_reporting_mta = "site.example.org"\n{extra_top}\n'
        f"[limits]\n{limits}\n"
        "[limits.timeouts]\nconnect = 10\ngreeting = 10\nlogin = 10\ncommand = 10\n"
        f"data = 10\ndelivery = 20\n{timeouts}\n"
    )
    for name, port in listed:
        text += (
            f'\n[[source]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'
            f'tls = "none"\nuser = "site1"\npassword = "pw-site1-example"\n{source_extra}\n'
        )
    path.write_text(text)
    # The file holds an inline password, which the loader rejects in a file
    # that group or others may read.
    path.chmod(0o600)
    return path
