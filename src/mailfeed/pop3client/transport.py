"""The POP3 client's transport: an asyncio stream protocol and a line reader.

:class:`_StreamProtocol` buffers received octets and stops reading above
:data:`READ_HIGH_WATER`, so TCP flow control slows the server down.
:class:`_Connection` reads lines bounded by ``max_line_length`` with a
timeout per phase.  Status lines are parsed here (RFC 1939 section 3,
response codes of RFC 2449 section 8): success is exactly ``+OK`` or
``+OK`` and text.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from typing import cast

from mailfeed.pop3client.errors import Pop3ProtocolError, Pop3Timeout, Pop3TlsError

__all__ = ["CRLF", "ERR", "MULTILINE_TERMINATOR", "OK", "READ_HIGH_WATER", "TERMINATION_OCTET"]

# Status indicators and the multi-line terminator (RFC 1939 section 3).
OK = b"+OK"
ERR = b"-ERR"
CRLF = b"\r\n"
TERMINATION_OCTET = ord(".")
MULTILINE_TERMINATOR = b".\r\n"

# A status line may carry a response code in brackets (RFC 2449 section 8).
_RESPONSE_CODE = re.compile(r"^\[([A-Za-z0-9/-]+)\]\s*")

# Bytes buffered before the client stops reading from the socket; TCP flow
# control then slows the server down.  A single line may grow the buffer up
# to max_line_length.
READ_HIGH_WATER = 256 * 1024


def _display(line: bytes) -> str:
    return line.decode("utf-8", "backslashreplace")


def _strip_line_end(line: bytes) -> bytes:
    if line.endswith(CRLF):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


@dataclass(frozen=True)
class _Status:
    ok: bool
    text: str
    code: str | None
    line: str


def _parse_status(line: bytes, command: str) -> _Status:
    """Parse a status line; raise Pop3ProtocolError unless it is +OK or -ERR."""
    body = _strip_line_end(line)
    shown = _display(body)
    if body == OK:
        return _Status(True, "", None, shown)
    if body.startswith(OK + b" "):
        return _Status(True, _display(body[4:]), None, shown)
    if body.startswith(ERR):
        text = _display(body[4:]).strip()
        match = _RESPONSE_CODE.match(text)
        code = match.group(1).upper() if match else None
        return _Status(False, text, code, shown)
    raise Pop3ProtocolError(
        f"invalid status line {shown[:200]!r} in reply to {command}: a POP3 status must be"
        " '+OK', '+OK text' or '-ERR text' (RFC 1939 section 3); closing the session"
    )


class _StreamProtocol(asyncio.Protocol):
    """Transport callbacks: a receive buffer with flow control, and drain."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake_reader()
        if len(self.buffer) >= READ_HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    async def wait_more(self, have: int) -> None:
        """Wait until the buffer contains more than ``have`` octets or the stream ends."""
        if len(self.buffer) > have or self.eof:
            return
        if self._reading_paused and self.transport is not None:
            self.transport.resume_reading()
            self._reading_paused = False
        self._read_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    async def drain(self) -> None:
        if self._drain_waiter is not None:
            await self._drain_waiter

    def discard_buffer(self) -> int:
        dropped = len(self.buffer)
        self.buffer.clear()
        return dropped

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _LineTooLong(Exception):
    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


class _Connection:
    """Line reading and writing over one transport, with per-phase timeouts."""

    def __init__(self, protocol: _StreamProtocol, max_line_length: int) -> None:
        self.protocol = protocol
        self.max_line_length = max_line_length

    @property
    def buffer(self) -> bytearray:
        return self.protocol.buffer

    def write(self, data: bytes) -> None:
        transport = self.protocol.transport
        if transport is None or transport.is_closing() or self.protocol.eof:
            raise Pop3ProtocolError("the POP3 connection is closed")
        transport.write(data)

    async def drain(self, phase: str, seconds: float) -> None:
        await self._with_timeout(self.protocol.drain(), phase, seconds)

    async def wait_more(self, have: int, phase: str, seconds: float) -> None:
        """Wait for more octets; raise Pop3Timeout, or Pop3ProtocolError at end of stream."""
        await self._with_timeout(self.protocol.wait_more(have), phase, seconds)
        if len(self.buffer) <= have:
            raise Pop3ProtocolError(self._closed_message())

    async def read_line(self, phase: str, seconds: float) -> bytes:
        """Return the next line with its line end; raise _LineTooLong past the limit."""
        buffer = self.buffer
        scanned = 0
        while True:
            end = buffer.find(b"\n", scanned)
            if end >= 0:
                if end + 1 > self.max_line_length:
                    raise _LineTooLong(end + 1)
                line = bytes(buffer[: end + 1])
                del buffer[: end + 1]
                return line
            if len(buffer) > self.max_line_length:
                raise _LineTooLong(len(buffer))
            scanned = len(buffer)
            await self.wait_more(scanned, phase, seconds)

    async def start_tls(
        self, context: ssl.SSLContext, server_hostname: str, seconds: float
    ) -> int:
        """Upgrade to TLS; return how many buffered plaintext octets were dropped."""
        # Drop before the first await: loop.start_tls() moves the socket to
        # the TLS layer synchronously, so no plaintext octet can arrive later.
        dropped = self.protocol.discard_buffer()
        transport = self.protocol.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                new_transport = await loop.start_tls(
                    transport,
                    self.protocol,
                    context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=seconds,
                )
        except TimeoutError:
            raise Pop3TlsError(f"TLS handshake timed out after {seconds:g} s") from None
        except (ssl.SSLError, OSError) as exc:
            raise Pop3TlsError(f"TLS handshake failed: {exc}") from exc
        if new_transport is None:
            raise Pop3TlsError("TLS handshake failed: the event loop returned no transport")
        self.protocol.transport = new_transport
        return dropped

    def close(self) -> None:
        transport = self.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.abort()

    async def _with_timeout(self, waiter: object, phase: str, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await cast("asyncio.Future[None]", waiter)
        except TimeoutError:
            detail = ""
            if phase == "data" and bytes(self.buffer[-2:]) == b".\r":
                detail = "the reply ends in '.' and CR without LF, which is not a terminator"
            raise Pop3Timeout(phase, seconds, detail) from None

    def _closed_message(self) -> str:
        error = self.protocol.error
        reason = f" ({error})" if error is not None else ""
        return f"the POP3 server closed the connection in the middle of a reply{reason}"


@dataclass
class _Pending:
    """A command whose reply has not been read yet."""

    log_text: str
    multiline: bool
    abandoned: bool = False
