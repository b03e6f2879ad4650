"""A minimal pipelining POP3 drain client that measures servers, not clients.

It logs in with USER and PASS (RFC 1939 section 7) sent together and lists
the mailbox with UIDL (section 7).  Then it sends every RETR (and DELE unless
``keep``) and QUIT in one pipelined stream (RFC 2449 section 6.6
PIPELINING), while a concurrent reader consumes the replies.  It stores
nothing: a message body is read and dropped, so the time is the server's and
the link's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["DrainResult", "PopError", "drain", "drain_sync"]

# End of a multi-line reply (RFC 1939 section 3).
TERMINATOR = b"\r\n.\r\n"


class PopError(RuntimeError):
    """A POP3 server replied -ERR where the drain expected +OK."""


@dataclass
class DrainResult:
    """Counts and times of one drain session, in seconds since connect."""

    messages: int = 0
    octets: int = 0
    session_start: float = 0.0   # connect to the end of the UIDL reply
    elapsed: float = 0.0         # connect to the end of the QUIT reply


async def _status(reader: asyncio.StreamReader, command: str) -> bytes:
    line = await reader.readuntil(b"\r\n")
    if not line.startswith(b"+OK"):
        raise PopError(f"{command} failed: {line.decode('latin-1').strip()}")
    return line


async def _multiline(reader: asyncio.StreamReader, command: str, *,
                     keep: bool = True) -> tuple[bytes, int]:
    """Read a +OK status line and the dot-stuffed body after it.

    Returns the body (or b"" unless ``keep``) and its length in octets.  A
    body larger than the reader's buffer limit is read in pieces.
    """
    await _status(reader, command)
    first = await reader.readexactly(1)
    if first == b".":
        second = await reader.readexactly(1)
        if second == b"\r":
            await reader.readexactly(1)
            return b"", 0
        first += second
    pieces = [first]
    size = len(first)
    while True:
        try:
            rest = await reader.readuntil(TERMINATOR)
        except asyncio.LimitOverrunError as exc:
            # exc.consumed octets cannot contain the start of the terminator.
            piece = await reader.readexactly(max(1, exc.consumed))
            size += len(piece)
            if keep:
                pieces.append(piece)
            continue
        size += len(rest) - 3
        if keep:
            pieces.append(rest[:-3])
        return (b"".join(pieces) if keep else b""), size


async def drain(host: str, port: int, user: str, password: str, *, keep: bool = False,
                limit: int = 0, timeout: float = 600.0) -> DrainResult:
    """Drain the mailbox (or its first ``limit`` messages) and return what it took."""
    result = DrainResult()
    started = time.perf_counter()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=16 * 1024 * 1024), timeout)
    try:
        await asyncio.wait_for(_session(reader, writer, user, password, keep, limit, result,
                                        started), timeout)
    finally:
        writer.close()
    result.elapsed = time.perf_counter() - started
    return result


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str,
                   password: str, keep: bool, limit: int, result: DrainResult,
                   started: float) -> None:
    await _status(reader, "greeting")
    writer.write(f"USER {user}\r\nPASS {password}\r\nUIDL\r\n".encode())
    await _status(reader, "USER")
    await _status(reader, "PASS")
    listing, _size = await _multiline(reader, "UIDL")
    result.session_start = time.perf_counter() - started
    numbers = [int(line.split(b" ", 1)[0]) for line in listing.split(b"\r\n") if line]
    if limit:
        numbers = numbers[:limit]

    async def send_commands() -> None:
        for number in numbers:
            writer.write(b"RETR %d\r\n" % number)
            if not keep:
                writer.write(b"DELE %d\r\n" % number)
            await writer.drain()
        writer.write(b"QUIT\r\n")
        await writer.drain()

    sender = asyncio.create_task(send_commands())
    try:
        for number in numbers:
            _body, size = await _multiline(reader, f"RETR {number}", keep=False)
            result.messages += 1
            result.octets += size
            if not keep:
                await _status(reader, f"DELE {number}")
        await _status(reader, "QUIT")
    finally:
        await sender


def drain_sync(host: str, port: int, user: str, password: str, *, keep: bool = False,
               limit: int = 0, timeout: float = 600.0) -> DrainResult:
    return asyncio.run(drain(host, port, user, password, keep=keep, limit=limit,
                             timeout=timeout))
