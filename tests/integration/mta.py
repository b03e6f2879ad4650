"""Test MTAs on 127.0.0.1 port 0: an aiosmtpd SMTP/LMTP server and a scripted LMTP server.

:class:`RecordingHandler` records every transaction (sender, MAIL options,
recipients and the exact bytes after dot-unstuffing) and answers scripted
codes per recipient and for DATA.  It limits the recipients of one
transaction like Postfix's smtpd_recipient_limit.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"


@dataclass
class Transaction:
    sender: str
    mail_options: list[str]
    recipients: list[str]
    content: bytes


@dataclass
class RecordingHandler:
    """An aiosmtpd handler that records transactions and answers scripted replies."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    # LMTP: one reply per recipient after DATA, by recipient (default 250).
    lmtp_data_replies: dict[str, str] = field(default_factory=dict)
    recipient_limit: int = 1000
    lmtp: bool = False
    transactions: list[Transaction] = field(default_factory=list)
    mail_commands: int = 0

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.recipient_limit:
            return TOO_MANY_RECIPIENTS
        reply = self.rcpt_replies.get(address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return reply or "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # aiosmtpd passes the null reverse-path as "<>"; record it as "".
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        self.transactions.append(
            Transaction(sender, list(envelope.mail_options), list(envelope.rcpt_tos),
                        bytes(envelope.original_content))
        )
        if self.lmtp:
            return "\r\n".join(
                self.lmtp_data_replies.get(rcpt, "250 2.0.0 delivered")
                for rcpt in envelope.rcpt_tos
            )
        return self.data_reply or "250 OK queued"


class ServerThread:
    """An asyncio loop in a thread serving one aiosmtpd server."""

    def __init__(self, handler: RecordingHandler, *, lmtp: bool = False,
                 unix_path: str | None = None, smtputf8: bool = True,
                 size_limit: int | None = 33554432) -> None:
        self.handler = handler
        handler.lmtp = lmtp
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        cls = LMTP if lmtp else SMTP
        self.factory = lambda: cls(handler, enable_SMTPUTF8=smtputf8, decode_data=False,
                                   data_size_limit=size_limit, hostname="mta.test")
        self.unix_path = unix_path
        self.server: asyncio.AbstractServer | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        if self.unix_path:
            self.server = self.loop.run_until_complete(
                self.loop.create_unix_server(self.factory, self.unix_path))
        else:
            self.server = self.loop.run_until_complete(
                self.loop.create_server(self.factory, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(10), "test MTA did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def scripted_server(script: list[tuple[str, str]]) -> Iterator[tuple[int, list[bytes]]]:
    """Serve one connection that answers client lines from a script.

    Each step is (expected command prefix, reply bytes).  The prefix "*DATA"
    reads the message up to the final "." line and then sends the reply;
    the reply "!close" closes the connection, and so does the prefix
    "!close" without reading a line.  The reply "!stall" sends nothing until
    the client closes the connection.  Received lines are recorded.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed or timed out without a client
        with conn, conn.makefile("rb") as reader:
            conn.sendall(b"220 scripted.test ready\r\n")
            for prefix, reply in script:
                if prefix == "!close":
                    return
                if prefix == "*DATA":
                    while True:
                        line = reader.readline()
                        received.append(line)
                        if line in (b".\r\n", b""):
                            break
                else:
                    line = reader.readline()
                    received.append(line)
                    if not line.upper().startswith(prefix.upper().encode()):
                        conn.sendall(b"500 unexpected command\r\n")
                        return
                if reply == "!close":
                    return
                if reply == "!stall":
                    # Send nothing; wait until the client gives up and closes.
                    while reader.readline():
                        pass
                    return
                conn.sendall(reply.encode() + b"\r\n")
            reader.readline()  # QUIT
            conn.sendall(b"221 bye\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, received
    finally:
        listener.close()
        thread.join(10)
