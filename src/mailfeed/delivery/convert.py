"""Line-end conversion and dot-stuffing of a message stream, chunk by chunk.

Over SMTP and LMTP every bare CR and bare LF becomes CRLF, a final CRLF is
added when missing and lines starting with "." are dot-stuffed (RFC 5321
section 4.5.2).  For sendmail and Maildir, CRLF and bare CR become LF and a
final LF is added when missing.  The message is read in chunks of
:data:`CHUNK_SIZE` octets, never held whole, and never parsed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["CHUNK_SIZE", "iter_converted"]

# Octets read from the message per step.
CHUNK_SIZE = 64 * 1024

_CRLF = b"\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_CR_LINE_END = re.compile(rb"\r\n?")


class _Converter:
    """Convert a stream's line ends chunk by chunk.

    With ``crlf`` every bare CR and bare LF becomes CRLF; with ``stuff`` a
    line starting with "." gets one more "." (RFC 5321 section 4.5.2).
    Without ``crlf``, CRLF and bare CR become LF.  A CR at the end of a
    chunk is held back until the next octet shows whether a LF follows.
    """

    def __init__(self, *, crlf: bool, stuff: bool) -> None:
        self.crlf = crlf
        self.stuff = stuff
        self.newline = _CRLF if crlf else b"\n"
        self.pending = b""
        self.at_line_start = True
        self.empty = True

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        if data.endswith(b"\r"):
            self.pending = b"\r"
            data = data[:-1]
        else:
            self.pending = b""
        return self._convert(data)

    def finish(self) -> bytes:
        """Return the rest, with a final line end added when missing."""
        out = self._convert(self.pending)
        self.pending = b""
        if not self.empty and not self.at_line_start:
            out += self.newline
            self.at_line_start = True
        return out

    def _convert(self, data: bytes) -> bytes:
        if not data:
            return b""
        pattern, newline = (_LINE_END, _CRLF) if self.crlf else (_CR_LINE_END, b"\n")
        data = pattern.sub(newline, data)
        if self.stuff:
            if self.at_line_start and data.startswith(b"."):
                data = b"." + data
            data = data.replace(b"\n.", b"\n..")
        self.empty = False
        self.at_line_start = data.endswith(self.newline)
        return data


def iter_converted(message: BinaryIO, *, crlf: bool, stuff: bool) -> Iterator[bytes]:
    """Yield the rest of ``message`` with line ends converted, chunk by chunk."""
    converter = _Converter(crlf=crlf, stuff=stuff)
    while chunk := message.read(CHUNK_SIZE):
        out = converter.feed(chunk)
        if out:
            yield out
    tail = converter.finish()
    if tail:
        yield tail


def _scan(message: BinaryIO) -> tuple[int, bool]:
    """Return the size in octets after CRLF conversion and whether 8-bit octets occur.

    The file is left where it was.
    """
    start = message.tell()
    size = 0
    eight_bit = False
    for chunk in iter_converted(message, crlf=True, stuff=False):
        size += len(chunk)
        if not eight_bit and not chunk.isascii():
            eight_bit = True
    message.seek(start)
    return size, eight_bit
