"""Filters over the wire chunks of a message streamed by RETR and TOP.

The octets fed to :class:`DotStuffer` are the octets LIST reports; the
stuffing adds only the extra dots of RFC 1939 section 3.
"""

from __future__ import annotations

from mailfeed.pop3server.replies import CRLF


class DotStuffer:
    """RFC 1939 section 3 byte-stuffing of wire chunks whose lines end in CRLF.

    A chunk must not end between CR and LF (``WireConverter`` output never does).
    """

    def __init__(self) -> None:
        self._line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if self._line_start and out.startswith(b"."):
            out = b"." + out
        self._line_start = out.endswith(CRLF)
        return out


class TopFilter:
    """Cut wire chunks after the header, the empty line and ``lines`` body lines (TOP)."""

    def __init__(self, lines: int) -> None:
        self._body_left = lines
        self._in_header = True
        self._line_start = True

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """Return the part of ``chunk`` to send and whether the output is complete."""
        pos = 0
        while pos < len(chunk):
            if not self._in_header and self._body_left == 0:
                return chunk[:pos], True
            if self._in_header and self._line_start and chunk.startswith(CRLF, pos):
                self._in_header = False
                pos += 2
                continue
            end = chunk.find(CRLF, pos)
            if end < 0:
                self._line_start = False
                return chunk, False
            pos = end + 2
            self._line_start = True
            if not self._in_header:
                self._body_left -= 1
        done = not self._in_header and self._body_left == 0
        return chunk, done
