"""The POP3 connection's byte stream, driven in memory without sockets."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mailfeed.pop3server.connection import _Connection, _Listener
from mailfeed.pop3server.settings import Pop3Settings, Pop3Stats


class _Server:
    """The parts of Pop3Server a connection uses."""

    def __init__(self) -> None:
        self.settings = Pop3Settings(hostname="mx.example.net")
        self.stats = Pop3Stats()

    def _accept(self, conn: _Connection) -> None:
        pass

    def _release(self, conn: _Connection) -> None:
        pass


class _Transport(asyncio.Transport):
    """Keeps what is written; on each write, delivers the next queued input soon after."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.written: list[bytes] = []
        self.conn: _Connection | None = None
        self.on_write: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1110) if name in ("peername", "sockname") else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        if self.on_write and self.conn is not None:
            self.loop.call_soon(self.conn.data_received, self.on_write.pop(0))

    def is_closing(self) -> bool:
        return False


def test_input_arriving_while_output_is_written_is_not_missed() -> None:
    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        server = _Server()
        conn = _Connection(cast(Any, server), _Listener(False, None))
        transport = _Transport(loop)
        transport.conn = conn
        conn.connection_made(transport)
        conn.data_received(b"NOOP\r\n")
        lines = [cast(bytes, await conn.readline(255, 5))]
        conn.reply("+OK")
        # The next command arrives while readline flushes the reply.
        transport.on_write.append(b"STAT\r\n")
        lines.append(cast(bytes, await asyncio.wait_for(conn.readline(255, 5), 2)))
        return lines + transport.written

    assert asyncio.run(scenario()) == [b"NOOP\r\n", b"STAT\r\n", b"+OK\r\n"]
