"""One client's byte stream: the asyncio protocol under a POP3 session.

Invariants:

* Pipelined commands are answered in order.  Replies to the commands of one
  read are written with one write; output waits for the transport to drain
  above a bounded buffer, so a client that stops reading holds at most about
  ``output_flush_octets`` plus the transport's high-water mark.
* Reading pauses while more than ``max_input_buffer`` octets wait unread, and
  an overlong line is dropped as it arrives, so input memory stays bounded.
* :meth:`_Connection.discard_input` drops what arrived before the STLS
  handshake, so nothing sent in plaintext is taken as a command.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfeed.pop3server.replies import CRLF

if TYPE_CHECKING:
    from mailfeed.pop3server.server import Pop3Server


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
        # Pending output as a list of pieces, joined once per write: appending
        # to one buffer would copy every message chunk one more time.
        self._out: list[bytes] = []
        self._out_octets = 0
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
        if self._in.find(b"\n", self._pos) >= 0:
            # A pipelined command is already buffered: no timeout to arm.
            return self._take_line(limit)
        async with asyncio.timeout(timeout):
            while True:
                line = self._take_line(limit)
                if line is not None:
                    return line
                if self.eof:
                    return None
                # Clear before flushing: input that arrives while flush() yields
                # sets the event again instead of being missed.
                self._data.clear()
                await self.flush()
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
        return self._out_octets

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_octets += len(data)

    def reply(self, line: str) -> None:
        data = line.encode("utf-8") + CRLF
        self._out.append(data)
        self._out_octets += len(data)

    async def send(self, data: bytes) -> None:
        """Queue ``data``; write and wait for drain once enough is pending."""
        self._out.append(data)
        self._out_octets += len(data)
        if self._out_octets >= self._settings.output_flush_octets:
            await self.flush()

    def _take_output(self) -> bytes:
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out = []
        self._out_octets = 0
        return out

    async def flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self._take_output()
            raise _ConnectionClosed("connection closed")
        if self._out:
            self.transport.write(self._take_output())
            self.server.stats.writes += 1
            if self._writable.is_set():
                # A session reading messages on the event loop does not yield
                # while its client keeps up, so let other tasks run once per batch.
                await asyncio.sleep(0)
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
                self.transport.write(self._take_output())
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
